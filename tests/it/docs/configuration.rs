//! The configuration the docs show: TOML blocks, the keys of configuration tables
//! and `WEIR_*` variables, checked with weir's own loader.

use std::fs;
use std::path::{Path, PathBuf};

use regex::Regex;
use weir::config::{Config, EMBEDDED_DEFAULT, Overrides};

use super::markdown::{Block, Doc, one_doc};
use super::root;

/// Placeholders the docs write in place of a real variable name.
const PLACEHOLDER_VARIABLES: &[&str] = &["WEIR_SECTION__KEY"];

fn embedded_default() -> toml::Table {
    EMBEDDED_DEFAULT
        .parse()
        .expect("the embedded default is TOML")
}

/// `over` merged into `base`, tables key by key; anything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base)), toml::Value::Table(over)) => merge(base, over),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Points every `*_file` string at an existing, non-empty file in `dir`.
fn substitute_files(table: &mut toml::Table, dir: &Path) {
    for (key, value) in table.iter_mut() {
        match value {
            toml::Value::Table(inner) => substitute_files(inner, dir),
            toml::Value::Array(items) => {
                for item in items.iter_mut() {
                    if let toml::Value::Table(inner) = item {
                        substitute_files(inner, dir);
                    }
                }
            }
            toml::Value::String(path) if key.ends_with("_file") => {
                let file = dir.join(key.as_str());
                fs::write(&file, "placeholder-contents\n").unwrap();
                *path = file.to_string_lossy().into_owned();
            }
            _ => {}
        }
    }
}

/// Loads `table` with weir's loader, as a file, with no `WEIR_*` variable set.
fn load(mut table: toml::Table) -> Result<Config, Vec<String>> {
    let dir = tempfile::tempdir().unwrap();
    substitute_files(&mut table, dir.path());
    let path = dir.path().join("weir.toml");
    fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
    Config::load_with_env(Some(&path), &Overrides::default(), Vec::new())
        .map_err(|error| error.problems.iter().map(ToString::to_string).collect())
}

/// The problems of one ```` ```toml ```` block, merged over the embedded default.
fn toml_block_problems(doc: &Doc, block: &Block) -> Option<String> {
    let loaded = match block.body.parse::<toml::Table>() {
        Ok(table) => {
            let mut merged = embedded_default();
            merge(&mut merged, table);
            load(merged)
        }
        Err(error) => Err(vec![format!("not TOML: {error}")]),
    };
    match (loaded, block.marked("invalid")) {
        (Ok(_), false) | (Err(_), true) => None,
        (Err(problems), false) => Some(format!(
            "{}: the loader refuses this block:\n  {}",
            doc.at(block.line),
            problems.join("\n  ")
        )),
        (Ok(_), true) => Some(format!(
            "{}: marked invalid, but the loader accepts it",
            doc.at(block.line)
        )),
    }
}

pub fn check_toml_blocks(docs: &[Doc]) -> (usize, Vec<String>) {
    let mut checked = 0;
    let mut problems = Vec::new();
    for doc in docs {
        for block in doc.blocks().iter().filter(|b| b.language() == "toml") {
            checked += 1;
            problems.extend(toml_block_problems(doc, block));
        }
    }
    (checked, problems)
}

/// Where a table's keys live.
#[derive(Clone, Copy, Debug)]
pub enum KeyContext<'a> {
    /// Full dotted keys (`store.url`).
    Top,
    /// Keys of a top-level section (`kafka`).
    Section(&'a str),
    /// Keys of a `[[subscriptions]]` entry.
    Subscription,
    /// Keys of a subscription's `consumer`.
    Consumer,
    /// Keys of an `[[ingest]]` entry.
    Ingest,
    /// Keys of a subscription's `sink` of this kind.
    Sink(&'a str),
}

/// Whether the loader knows `key` where `context` puts it: set alone to a string, it
/// must draw no "unknown field" or "unknown section" problem. (A string may be the
/// wrong type for the key; that is a different problem and does not count.)
pub fn key_is_known(context: KeyContext, key: &str) -> Result<(), String> {
    let probe = toml::Value::String("probe".into());
    let mut nested = probe;
    for segment in key.split('.').rev() {
        let mut table = toml::Table::new();
        table.insert(segment.to_owned(), nested);
        nested = toml::Value::Table(table);
    }
    let toml::Value::Table(setting) = nested else {
        unreachable!()
    };
    let subscription = |extra: toml::Table| -> toml::Table {
        let mut entry: toml::Table = "group = \"g\"\nsources = [\"log\"]".parse().unwrap();
        merge(&mut entry, extra);
        let mut over = toml::Table::new();
        over.insert(
            "subscriptions".into(),
            toml::Value::Array(vec![entry.into()]),
        );
        over
    };
    let over = match context {
        KeyContext::Top => setting,
        KeyContext::Section(section) => toml::Table::from_iter([(section.into(), setting.into())]),
        KeyContext::Subscription => subscription(setting),
        KeyContext::Ingest => {
            let mut entry: toml::Table = "name = \"n\"\nfrom = { kind = \"kafka\", topics = [\"t\"] }\ninto = { category = \"c\", stream = \"{key}\" }"
                .parse()
                .unwrap();
            merge(&mut entry, setting);
            toml::Table::from_iter([("ingest".into(), toml::Value::Array(vec![entry.into()]))])
        }
        KeyContext::Consumer => subscription(toml::Table::from_iter([(
            "consumer".into(),
            setting.into(),
        )])),
        KeyContext::Sink(kind) => {
            let mut sink: toml::Table =
                format!("kind = \"{kind}\"\nsubject = \"s\"\ntopic = \"t\"")
                    .parse()
                    .unwrap();
            sink.retain(|name, _| name == "kind" || sink_needs(kind, name));
            merge(&mut sink, setting);
            subscription(toml::Table::from_iter([("sink".into(), sink.into())]))
        }
    };
    let mut table = embedded_default();
    merge(&mut table, over);
    let problems = load(table).err().unwrap_or_default();
    match problems
        .iter()
        .find(|p| p.contains("unknown field") || p.contains("unknown section"))
    {
        Some(problem) => Err(problem.clone()),
        None => Ok(()),
    }
}

/// The keys a sink of `kind` cannot do without.
fn sink_needs(kind: &str, key: &str) -> bool {
    matches!((kind, key), ("nats", "subject") | ("kafka", "topic"))
}

/// The context a table's first header cell names, if it is a table of keys.
fn key_context(header: &str) -> Option<KeyContext<'static>> {
    let header = header.trim();
    if header == "key" {
        return Some(KeyContext::Top);
    }
    let named = header.strip_suffix(" key")?;
    match named {
        "`[[subscriptions]]`" => Some(KeyContext::Subscription),
        "`[[ingest]]`" => Some(KeyContext::Ingest),
        "`consumer`" => Some(KeyContext::Consumer),
        "NATS `sink`" => Some(KeyContext::Sink("nats")),
        "Kafka `sink`" => Some(KeyContext::Sink("kafka")),
        "`kafka`" => Some(KeyContext::Section("kafka")),
        "`nats`" => Some(KeyContext::Section("nats")),
        _ => None,
    }
}

/// Every key in the first column of the doc's key tables, with its context.
pub fn table_keys(doc: &Doc) -> Vec<(usize, KeyContext<'static>, String)> {
    let code = Regex::new(r"`([^`]+)`").unwrap();
    let mut keys = Vec::new();
    let mut context = None;
    let mut previous_was_table = false;
    for (line, text) in doc.prose() {
        let is_table = text.starts_with('|');
        let first_cell = text.split('|').nth(1).unwrap_or_default();
        if is_table && !previous_was_table {
            context = key_context(first_cell);
        } else if is_table && !first_cell.trim_start().starts_with("---") {
            for found in code.captures_iter(first_cell) {
                if let Some(context) = context {
                    keys.push((line, context, found[1].trim_end_matches(".*").to_owned()));
                }
            }
        }
        previous_was_table = is_table;
    }
    keys
}

/// Every `WEIR_*` name of the docs, with the value it is given where it is given one.
pub fn weir_variables(doc: &Doc) -> Vec<(usize, String, Option<String>)> {
    let variable = Regex::new(r#"\bWEIR_[A-Z0-9_]*[A-Z0-9](?:=([^\s`'"]+))?"#).unwrap();
    let mut found = Vec::new();
    for (index, line) in doc.text.lines().enumerate() {
        for capture in variable.captures_iter(line) {
            let whole = capture.get(0).unwrap().as_str();
            let name = whole.split('=').next().unwrap().to_owned();
            found.push((
                index + 1,
                name,
                capture.get(1).map(|v| v.as_str().to_owned()),
            ));
        }
    }
    found
}

/// The text of every file weir's code, tests, scripts and deployment consist of,
/// but these checks', which name variables only to test themselves.
pub fn repository_text() -> String {
    let checks = [
        root().join("tests/it/docs.rs"),
        root().join("tests/it/docs"),
    ];
    let mut text = String::new();
    let mut dirs: Vec<PathBuf> = ["src", "tests", "scripts", "deploy", "config", ".ci"]
        .iter()
        .map(|d| root().join(d))
        .collect();
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().map(Result::unwrap) {
            let path = entry.path();
            if checks.iter().any(|c| path.starts_with(c)) {
                continue;
            } else if path.is_dir() {
                dirs.push(path);
            } else {
                text.push_str(&fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    text
}

/// A `WEIR_SECTION__KEY` must be a key the loader knows and the environment layer
/// reads, with its value accepted when `env` (what the doc's line sets) shows one;
/// any other `WEIR_*` name must be one the repository reads.
pub fn check_variable(
    name: &str,
    env: &[(String, String)],
    repository: &str,
) -> Result<(), String> {
    if PLACEHOLDER_VARIABLES.contains(&name) {
        return Ok(());
    }
    let Some(rest) = name
        .strip_prefix("WEIR_")
        .filter(|rest| rest.contains("__"))
    else {
        if Regex::new(&format!(r"\b{name}\b"))
            .unwrap()
            .is_match(repository)
        {
            return Ok(());
        }
        return Err(format!(
            "{name}: not a configuration key, and nothing in the repository reads it"
        ));
    };
    let key = rest.to_lowercase().replace("__", ".");
    key_is_known(KeyContext::Top, &key).map_err(|problem| format!("{name}: {problem}"))?;
    let shown = env.iter().any(|(set, _)| set == name);
    let env = if shown {
        env.to_vec()
    } else {
        vec![(name.to_owned(), "probe".to_owned())]
    };
    let problems = match Config::load_with_env(None, &Overrides::default(), env) {
        Ok(_) => Vec::new(),
        Err(error) => error.problems,
    };
    let ours = |p: &&weir::config::Problem| {
        p.key == name || (shown && (p.key == key || p.key.starts_with(&format!("{key}."))))
    };
    match problems.iter().find(ours) {
        Some(problem) => Err(format!("{name}: {problem}")),
        None => Ok(()),
    }
}

// Each check, given a wrong document, fails

#[test]
fn a_misspelled_or_unknown_key_in_a_toml_block_is_caught() {
    let (_, problems) = check_toml_blocks(&one_doc("```toml\n[store]\npool_sise = 4\n```\n"));
    assert!(problems[0].contains("pool_sise"), "{problems:?}");
    let (_, problems) = check_toml_blocks(&one_doc("```toml\n[stor]\nkind = \"memory\"\n```\n"));
    assert!(problems[0].contains("unknown section"), "{problems:?}");
    let nested = "```toml\n[[subscriptions]]\ngroup = \"g\"\nsources = [\"log\"]\nconsumer = { batch_sise = 5 }\n```\n";
    let (_, problems) = check_toml_blocks(&one_doc(nested));
    assert!(problems[0].contains("batch_sise"), "{problems:?}");
}

#[test]
fn a_block_marked_invalid_must_be_refused() {
    let (_, problems) =
        check_toml_blocks(&one_doc("```toml invalid\n[store]\npool_size = 4\n```\n"));
    assert!(problems[0].contains("marked invalid"), "{problems:?}");
    let (checked, problems) = check_toml_blocks(&one_doc(
        "```toml invalid\n[store]\nkind = \"postgres\"\n```\n",
    ));
    assert_eq!((checked, problems.len()), (1, 0), "{problems:?}");
}

#[test]
fn an_unknown_key_in_a_configuration_table_is_caught() {
    let doc = &one_doc(
        "| key | default |\n|---|---|\n| `store.pool_sise` | `16` |\n| `broker.lease_ttl` | `10s` |\n",
    )[0];
    let keys = table_keys(doc);
    assert_eq!(keys.len(), 2);
    assert!(key_is_known(keys[0].1, &keys[0].2).is_err());
    assert!(key_is_known(keys[1].1, &keys[1].2).is_ok());
    assert!(key_is_known(KeyContext::Consumer, "batch_sise").is_err());
    assert!(key_is_known(KeyContext::Sink("nats"), "max_in_flight").is_ok());
    assert!(key_is_known(KeyContext::Sink("nats"), "max_inflight").is_err());
    assert!(key_is_known(KeyContext::Section("kafka"), "broker").is_err());
}

#[test]
fn an_unknown_variable_is_caught() {
    let repository = "reads WEIR_TEST_KNOWN here";
    let set = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    };
    assert!(check_variable("WEIR_STORE__URL", &[], repository).is_ok());
    assert!(check_variable("WEIR_TEST_KNOWN", &[], repository).is_ok());
    assert!(check_variable("WEIR_STORE__URI", &[], repository).is_err());
    assert!(check_variable("WEIR_STOR__URL", &[], repository).is_err());
    assert!(check_variable("WEIR_TEST_UNKNOWN", &[], repository).is_err());
    let listen = set(&[("WEIR_HTTP__LISTEN", "nowhere")]);
    assert!(check_variable("WEIR_HTTP__LISTEN", &listen, repository).is_err());
    // A URL alone is refused (the store is memory); with the kind beside it, not.
    let url = ("WEIR_STORE__URL", "postgres://weir@db:5432/weir");
    assert!(check_variable("WEIR_STORE__URL", &set(&[url]), repository).is_err());
    let both = set(&[("WEIR_STORE__KIND", "postgres"), url]);
    assert!(check_variable("WEIR_STORE__URL", &both, repository).is_ok());
    let doc = Doc::new("x.md", "`WEIR_STORE__KIND=postgres` and `WEIR_LOG`");
    let names: Vec<_> = weir_variables(&doc)
        .into_iter()
        .map(|(_, n, v)| (n, v))
        .collect();
    assert_eq!(
        names,
        [
            ("WEIR_STORE__KIND".into(), Some("postgres".into())),
            ("WEIR_LOG".into(), None)
        ]
    );
}
