//! The commands the docs show: shell blocks split into simple commands, each
//! checked by its program, and inline `weir ...` synopses.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use regex::Regex;
use weir::cli::Cli;

use super::markdown::{Block, Doc, one_doc};
use super::root;

/// Programs a command block may run besides `weir`, `cargo` and the repository's
/// scripts. Their arguments are not parsed, but repository paths among them must
/// exist. A program not listed fails the test: list it once it is worth showing.
const OTHER_PROGRAMS: &[&str] = &[
    "alias",
    "cd",
    "curl",
    "docker",
    "export",
    "kill",
    "kubectl",
    "kustomize",
    "nats",
    "printf",
    "promtool",
];

/// Top-level directories whose paths, when a command names them, must exist.
const REPOSITORY_DIRS: &[&str] = &[
    "config/",
    "deploy/",
    "docs/",
    "examples/",
    "grafana/",
    "scripts/",
    "src/",
    "tests/",
];

/// A command line split into simple commands (at `|`, `&&`, `||`, `;` and `&`), each
/// a list of words with quotes removed; a `#` starting a word starts a comment.
fn shell_commands(line: &str) -> Vec<Vec<String>> {
    let mut commands = vec![Vec::new()];
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => word.get_or_insert_default().extend(chars.next()),
            (Some(_), c) => word.get_or_insert_default().push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_default();
            }
            (None, '\\') => word.get_or_insert_default().extend(chars.next()),
            (None, '#') if word.is_none() => break,
            (None, '|' | '&' | ';') => {
                commands.last_mut().unwrap().extend(word.take());
                if !commands.last().unwrap().is_empty() {
                    commands.push(Vec::new());
                }
            }
            (None, c) if c.is_whitespace() => commands.last_mut().unwrap().extend(word.take()),
            (None, c) => word.get_or_insert_default().push(c),
        }
    }
    commands.last_mut().unwrap().extend(word);
    commands.retain(|command| !command.is_empty());
    commands
}

/// The command lines of a shell block: continuation lines joined, and in a
/// `console` block only the lines after a `$ ` prompt (the rest is output).
fn command_lines(block: &Block) -> Vec<String> {
    let console = block.language() == "console";
    let mut lines = Vec::new();
    let mut pending: Option<String> = None;
    for line in block.body.lines() {
        let line = match (&mut pending, console) {
            (Some(previous), _) => {
                previous.push(' ');
                previous.push_str(line);
                pending.take().unwrap()
            }
            (None, true) => match line.strip_prefix("$ ") {
                Some(command) => command.to_owned(),
                None => continue,
            },
            (None, false) => line.to_owned(),
        };
        match line.strip_suffix('\\') {
            Some(start) => pending = Some(start.to_owned()),
            None => lines.push(line),
        }
    }
    lines.extend(pending);
    lines
}

/// Whether `args` (after the program's name) parse as a `weir` command line.
fn weir_parses(args: &[String]) -> Result<(), String> {
    let argv = std::iter::once("weir".to_owned()).chain(args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(_) => Ok(()),
        Err(error)
            if matches!(
                error.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            Ok(())
        }
        Err(error) => Err(format!("weir {}: {}", args.join(" "), error.render())),
    }
}

/// Whether a `cargo test` filter names a module of `tests/it/main.rs` and, below
/// it, a module or test function of that name.
fn test_filter_exists(filter: &str) -> Result<(), String> {
    let it = root().join("tests/it");
    let main = fs::read_to_string(it.join("main.rs")).unwrap();
    let mut segments = filter.split("::").filter(|s| !s.is_empty());
    let module = segments.next().unwrap_or_default();
    if !main.contains(&format!("mod {module};")) {
        return Err(format!(
            "`{filter}`: tests/it/main.rs declares no module {module}"
        ));
    }
    let Some(last) = segments.last() else {
        return Ok(());
    };
    let mut files = vec![it.join(format!("{module}.rs"))];
    files.extend(rust_files(&it.join(module)));
    let item = Regex::new(&format!(r"\b(fn|mod)\s+{}\b", regex::escape(last))).unwrap();
    let found = files
        .iter()
        .filter_map(|file| fs::read_to_string(file).ok())
        .any(|text| item.is_match(&text));
    if found {
        Ok(())
    } else {
        Err(format!(
            "`{filter}`: no test or module {last} in tests/it/{module}"
        ))
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.map(Result::unwrap) {
        let path = entry.path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files
}

/// The arguments of `cargo ARGS`: `cargo run` runs weir (or an example), `cargo
/// test --test it FILTER` must name real tests; other subcommands are not checked.
fn check_cargo(args: &[String]) -> Result<bool, String> {
    let value_of = |flag: &str| {
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1).cloned()
    };
    let dash = args.iter().position(|a| a == "--");
    match args.first().map(String::as_str) {
        Some("run") => match (value_of("--example"), dash) {
            (Some(example), _) if root().join(format!("examples/{example}.rs")).is_file() => {
                Ok(false)
            }
            (Some(example), _) => Err(format!("cargo run: no examples/{example}.rs")),
            (None, Some(dash)) => weir_parses(&args[dash + 1..]).map(|()| true),
            (None, None) => weir_parses(&[]).map(|()| true),
        },
        Some("test") => {
            let Some(target) = value_of("--test") else {
                return Ok(false);
            };
            let tests = root().join("tests");
            if !tests.join(&target).is_dir() && !tests.join(format!("{target}.rs")).is_file() {
                return Err(format!("cargo test --test {target}: no such test target"));
            }
            let end = dash.unwrap_or(args.len());
            let at = args.iter().position(|a| *a == target).unwrap();
            let filters = args[at + 1..end].iter().filter(|a| !a.starts_with('-'));
            filters
                .map(|f| test_filter_exists(f))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// Checks one simple command; `Ok(true)` when it was a `weir` command line.
/// Variables set before the program (`WEIR_X__Y=1 weir ...`, `export ...`) are
/// checked with every other `WEIR_*` name of the docs.
fn check_command(words: &[String]) -> Result<bool, String> {
    let assignment = Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*=").unwrap();
    let start = words.iter().take_while(|w| assignment.is_match(w)).count();
    let words = &words[start..];
    let Some((program, args)) = words.split_first() else {
        return Ok(false);
    };
    for path in words.iter().filter_map(|a| a.rsplit('=').next()) {
        let relative = path.trim_end_matches('/');
        if REPOSITORY_DIRS.iter().any(|dir| path.starts_with(dir))
            && !root().join(relative).exists()
        {
            return Err(format!(
                "{program}: {path} does not exist in the repository"
            ));
        }
    }
    match program.as_str() {
        "weir" | "target/release/weir" | "target/debug/weir" => weir_parses(args).map(|()| true),
        "cargo" => check_cargo(args),
        "docker" if args.first().is_some_and(|a| a == "run") => {
            match args.iter().position(|a| a == "weir") {
                Some(image) => weir_parses(&args[image + 1..]).map(|()| true),
                None => Ok(false),
            }
        }
        script if script.starts_with("scripts/") => Ok(false), // existence checked above
        other if OTHER_PROGRAMS.contains(&other) => Ok(false),
        other => Err(format!(
            "{other}: not a program the docs may show; if it is worth showing, add it to OTHER_PROGRAMS"
        )),
    }
}

/// Checks every command of the docs' shell blocks, and inline `cargo run ...`.
/// Returns how many `weir` command lines were parsed, and the problems.
pub fn check_command_blocks(docs: &[Doc]) -> (usize, Vec<String>) {
    let mut parsed = 0;
    let mut problems = Vec::new();
    for doc in docs {
        let mut lines: Vec<(usize, String)> = Vec::new();
        for block in doc.blocks() {
            if matches!(block.language(), "sh" | "console" | "bash" | "shell") {
                lines.extend(command_lines(&block).into_iter().map(|l| (block.line, l)));
            }
        }
        let inline = doc.inline_code().into_iter();
        lines.extend(inline.filter(|(_, code)| code.starts_with("cargo run ")));
        for (line, text) in lines {
            for command in shell_commands(&text) {
                match check_command(&command) {
                    Ok(weir) => parsed += usize::from(weir),
                    Err(problem) => problems.push(format!("{}: {problem}", doc.at(line))),
                }
            }
        }
    }
    (parsed, problems)
}

/// Checks an inline `weir SUBCOMMAND... --flag ...`: each subcommand word (or each
/// of `a|b`) is a subcommand, and each `--flag` one the command reached accepts.
pub fn check_inline_weir(code: &str) -> Result<(), String> {
    let root = Cli::command();
    let globals: BTreeSet<String> = root
        .get_arguments()
        .filter(|a| a.is_global_set())
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect();
    let mut command = &root;
    let mut words = code.split_whitespace().skip(1).peekable();
    while let Some(word) = words.peek() {
        if command.get_subcommands().next().is_none() || word.starts_with('-') {
            break;
        }
        let alternatives: Vec<&str> = word.split('|').collect();
        if !alternatives
            .iter()
            .all(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        {
            break;
        }
        for alternative in &alternatives {
            if command.find_subcommand(alternative).is_none() {
                return Err(format!(
                    "`{code}`: {alternative} is not a subcommand of {}",
                    command.get_name()
                ));
            }
        }
        command = command.find_subcommand(alternatives[0]).unwrap();
        words.next();
    }
    let flag = Regex::new(r"^[\[(]*--([a-z][a-z0-9-]*)").unwrap();
    for word in words.take_while(|w| *w != "|") {
        let Some(found) = flag.captures(word) else {
            continue;
        };
        let name = &found[1];
        let known = command.get_arguments().any(|a| a.get_long() == Some(name))
            || globals.contains(name)
            || name == "help"
            || name == "version";
        if !known {
            return Err(format!(
                "`{code}`: {} has no flag --{name}",
                command.get_name()
            ));
        }
    }
    Ok(())
}

// Each check, given a wrong document, fails

#[test]
fn a_wrong_command_is_caught() {
    for (text, wanted) in [
        ("```sh\nweir raed --source log\n```\n", "raed"),
        ("```sh\nweir read --sauce log\n```\n", "--sauce"),
        (
            "```console\n$ cargo run -- checkpoints reset --group g\n```\n",
            "--to-start",
        ),
        (
            "```sh\nWEIR_X__Y=1 weir run --config config/nowhere.toml\n```\n",
            "config/nowhere.toml",
        ),
        (
            "```sh\ncargo test --test it no_such_module::\n```\n",
            "no_such_module",
        ),
        (
            "```sh\ncargo test --test it simulation::no_such_test\n```\n",
            "no_such_test",
        ),
        ("```sh\nfrobnicate --all\n```\n", "frobnicate"),
        ("```sh\ndocker run --rm weir confg check\n```\n", "confg"),
        ("Run `cargo run --example nowhere` to see.\n", "nowhere"),
    ] {
        let (_, problems) = check_command_blocks(&one_doc(text));
        assert!(
            problems.len() == 1 && problems[0].contains(wanted),
            "{text}: {problems:?}"
        );
    }
    let good = "```sh\nprintf '%s\\n' '{\"a\": 1}' \\\n  | weir append --category c --stream s # note\n```\n";
    assert_eq!(check_command_blocks(&one_doc(good)), (1, Vec::new()));
}

#[test]
fn a_wrong_inline_command_is_caught() {
    assert!(
        check_inline_weir(
            "weir checkpoints reset --group G [--source S] (--to-start \\| --to-end)"
        )
        .is_ok()
    );
    assert!(check_inline_weir("weir groups pause|resume").is_ok());
    assert!(check_inline_weir("weir groups pause|resum").is_err());
    assert!(check_inline_weir("weir checkpoints reset --to-beginning").is_err());
    assert!(check_inline_weir("weir status --fleet --config x.toml").is_ok());
}
