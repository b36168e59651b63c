//! The README and `docs/` cannot drift from weir: what they show is checked against
//! weir itself.
//!
//! - Every ```` ```toml ```` block is loaded by weir's configuration loader, merged
//!   over the embedded default (`config/weir.toml`) first, so that a block showing
//!   one section is checked too. The loader refuses unknown keys by name. A block
//!   whose info string says `invalid` (```` ```toml invalid ````) shows a refused
//!   configuration, and must be refused: the mark cannot hide a block that loads.
//!   Files a block names (`ca_file = "/etc/weir/ca.pem"`) do not exist where the
//!   tests run, so each `*_file` value is pointed at a temporary file first; every
//!   other check of the loader runs as written.
//! - Every key in the first column of a configuration table (`| key |`,
//!   ``| `kafka` key |``, ``| `consumer` key |``, ...) is one the loader knows: set
//!   alone, it draws no "unknown field" or "unknown section" problem.
//! - Every command line of a ```` ```sh ````, ```` ```console ```` or
//!   ```` ```bash ```` block is checked by its program: `weir` (also as `cargo run
//!   --`, `target/release/weir` or the image in `docker run ... weir`) parses with
//!   weir's own clap definition; `cargo run --example X` needs `examples/X.rs`;
//!   `cargo test --test it FILTER` needs the module and the test the filter names;
//!   other programs must be on a short list (`commands::OTHER_PROGRAMS`), and every repository path an
//!   argument names must exist.
//! - Every inline `` `weir SUBCOMMAND --flag ...` `` names real subcommands and
//!   flags (synopses with placeholders are not parsed whole).
//! - Every `WEIR_*` variable is a configuration key (`WEIR_SECTION__KEY`, its
//!   value accepted when one is shown) or a name the code, tests or scripts read.
//! - Every `weir::` path names a real module and item.
//! - Every relative link leads to a file, and to a heading when it names one.
//!
//! The checks live in the submodules, each with tests that feed it a wrong
//! document and watch it fail.

mod commands;
mod configuration;
mod links;
mod markdown;

use std::fs;
use std::path::PathBuf;

use regex::Regex;

use commands::{check_command_blocks, check_inline_weir};
use configuration::{
    check_toml_blocks, check_variable, key_is_known, repository_text, table_keys, weir_variables,
};
use links::{doc_dir, link_problems, rust_path_exists};
use markdown::Doc;

// ---------------------------------------------------------------------------------
// Documents

/// The repository's root, where the docs' relative paths start.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every `docs/*.md`.
fn documents() -> Vec<Doc> {
    let mut paths = vec!["README.md".to_owned()];
    let mut docs: Vec<String> = fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    paths.extend(docs);
    paths
        .iter()
        .map(|path| Doc::new(path, &fs::read_to_string(root().join(path)).unwrap()))
        .collect()
}

/// Fails with every problem found, one per line, or when a check found nothing to
/// check (a broken extractor must not pass quietly).
#[track_caller]
fn assert_clean(what: &str, checked: usize, at_least: usize, problems: Vec<String>) {
    eprintln!("{what}: {checked} checked");
    assert!(
        problems.is_empty(),
        "{what}: {} problems\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(
        checked >= at_least,
        "{what}: only {checked} checked, expected at least {at_least}: is the extractor broken?"
    );
}

// ---------------------------------------------------------------------------------
// The checks

#[test]
fn every_toml_block_loads_with_the_real_loader() {
    let (checked, problems) = check_toml_blocks(&documents());
    assert_clean("toml blocks", checked, 8, problems);
}

#[test]
fn every_key_of_a_configuration_table_is_known_to_the_loader() {
    let mut checked = 0;
    let mut problems = Vec::new();
    for doc in documents() {
        for (line, context, key) in table_keys(&doc) {
            checked += 1;
            if let Err(problem) = key_is_known(context, &key) {
                problems.push(format!(
                    "{}: `{key}` ({context:?}): {problem}",
                    doc.at(line)
                ));
            }
        }
    }
    assert_clean("configuration table keys", checked, 50, problems);
}

#[test]
fn every_command_of_a_shell_block_parses() {
    let (parsed, problems) = check_command_blocks(&documents());
    assert_clean("shell blocks", parsed, 25, problems);
}

#[test]
fn every_inline_weir_command_names_real_subcommands_and_flags() {
    let mut checked = 0;
    let mut problems = Vec::new();
    for doc in documents() {
        for (line, code) in doc.inline_code() {
            if code.starts_with("weir ") {
                checked += 1;
                if let Err(problem) = check_inline_weir(&code) {
                    problems.push(format!("{}: {problem}", doc.at(line)));
                }
            }
        }
    }
    assert_clean("inline weir commands", checked, 40, problems);
}

#[test]
fn every_weir_variable_is_a_configuration_key_or_read_by_the_repository() {
    let repository = repository_text();
    let mut checked = 0;
    let mut problems = Vec::new();
    for doc in documents() {
        let found = weir_variables(&doc);
        for (line, name, _) in &found {
            checked += 1;
            // The variables a line sets are one environment (`export A=.. B=..`).
            let env: Vec<(String, String)> = found
                .iter()
                .filter(|(at, _, _)| at == line)
                .filter_map(|(_, name, value)| Some((name.clone(), value.clone()?)))
                .collect();
            if let Err(problem) = check_variable(name, &env, &repository) {
                problems.push(format!("{}: {problem}", doc.at(*line)));
            }
        }
    }
    assert_clean("WEIR_* variables", checked, 20, problems);
}

#[test]
fn every_weir_path_names_a_real_item() {
    let path = Regex::new(r"\bweir(::[A-Za-z_][A-Za-z0-9_]*)+").unwrap();
    let mut checked = 0;
    let mut problems = Vec::new();
    for doc in documents() {
        for (line, text) in doc.prose() {
            for found in path.find_iter(text) {
                checked += 1;
                if let Err(problem) = rust_path_exists(found.as_str()) {
                    problems.push(format!("{}: {problem}", doc.at(line)));
                }
            }
        }
    }
    assert_clean("weir:: paths", checked, 3, problems);
}

#[test]
fn every_relative_link_leads_somewhere() {
    let mut checked = 0;
    let mut problems = Vec::new();
    for doc in documents() {
        let (count, found) = link_problems(&doc, &doc_dir(&doc));
        checked += count;
        problems.extend(found);
    }
    assert_clean("relative links", checked, 30, problems);
}
