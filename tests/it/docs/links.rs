//! What the docs point at: `weir::` paths and relative links.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use regex::Regex;

use super::markdown::Doc;
use super::root;

/// Whether `path` (`weir::bus::nats::decode_subject_token`) names modules of src/
/// and, after the last module, an item that module declares or re-exports.
pub fn rust_path_exists(path: &str) -> Result<(), String> {
    let mut dir = root().join("src");
    let mut module = dir.join("lib.rs");
    for segment in path.split("::").skip(1) {
        let file = [
            dir.join(format!("{segment}.rs")),
            dir.join(segment).join("mod.rs"),
        ]
        .into_iter()
        .find(|f| f.is_file());
        if let Some(file) = file {
            module = file;
            dir = dir.join(segment);
            continue;
        }
        let text = fs::read_to_string(&module).unwrap();
        let escaped = regex::escape(segment);
        let item = format!(
            r"\b(fn|struct|enum|trait|const|static|type|mod)\s+{escaped}\b|pub(\([a-z]+\))?\s+use\s[^;]*\b{escaped}\s*[,}};]"
        );
        if Regex::new(&item).unwrap().is_match(&text) {
            return Ok(());
        }
        let module = module.strip_prefix(root()).unwrap_or(&module);
        return Err(format!(
            "`{path}`: {} declares no {segment}",
            module.display()
        ));
    }
    Ok(())
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let doc = Doc::new("", text);
    doc.prose()
        .into_iter()
        .filter_map(|(_, line)| line.strip_prefix('#'))
        .map(|heading| anchor(heading.trim_start_matches('#')))
        .collect()
}

/// Every relative link of the doc's prose must lead to a file, and to a heading of
/// it when it names one. `dir` is the doc's directory on disk.
pub fn link_problems(doc: &Doc, dir: &Path) -> (usize, Vec<String>) {
    let link = Regex::new(r"\]\(([^)\s]+)\)").unwrap();
    let mut checked = 0;
    let mut problems = Vec::new();
    for (line, text) in doc.prose() {
        for found in link.captures_iter(text) {
            let target = &found[1];
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, fragment) = target.split_once('#').unwrap_or((target, ""));
            let text = match file {
                "" => Some(doc.text.clone()),
                file if dir.join(file).is_dir() => Some(String::new()),
                file => fs::read_to_string(dir.join(file)).ok(),
            };
            match text {
                None => problems.push(format!("{}: {target}: no such file", doc.at(line))),
                Some(text) if !fragment.is_empty() && !anchors(&text).contains(fragment) => {
                    problems.push(format!(
                        "{}: {target}: no heading #{fragment}",
                        doc.at(line)
                    ))
                }
                Some(_) => {}
            }
        }
    }
    (checked, problems)
}

/// The directory a document lives in.
pub fn doc_dir(doc: &Doc) -> PathBuf {
    root().join(&doc.path).parent().unwrap().to_path_buf()
}

// Each check, given a wrong document, fails

#[test]
fn a_wrong_rust_path_or_link_is_caught() {
    assert!(rust_path_exists("weir::metrics::CATALOG").is_ok());
    assert!(rust_path_exists("weir::telemetry::metrics::CATALOG").is_err());
    let doc = Doc::new(
        "docs/wrong.md",
        "# Title\n\n[ok](#title), [gone](nowhere.md), [file](fleet.md#no-such-heading), [up](../README.md)\n",
    );
    let (checked, problems) = link_problems(&doc, &root().join("docs"));
    assert_eq!(checked, 4);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!(
        anchor("Partitions: one category over the `whole` fleet"),
        "partitions-one-category-over-the-whole-fleet"
    );
}
