//! The shape of `src/`, checked on every test run so that it cannot drift:
//!
//! - **Layers**: `layers.txt` lists the top-level modules, lowest first. A module
//!   may name (`crate::x`) only modules listed above it, so data flows one way and
//!   no two modules depend on each other, however indirectly. Test code (inline
//!   `#[cfg(test)] mod ... { }` blocks, files named `tests.rs` and files in a
//!   `tests/` folder) may reach
//!   anywhere.
//! - **Size**: no source file over [`MAX_FILE_LINES`] lines and no function over
//!   [`MAX_FN_LINES`] lines, test code aside. A function may be longer when a
//!   comment right above it, or on its first lines, says why (it contains the
//!   words "long because").
//! - **Tasks**: node code starts its tasks with `ambient::spawn` (or
//!   `ambient::spawn_into` a `JoinSet`), never `tokio::spawn` or
//!   `JoinSet::spawn`, so that the simulation can freeze a node's process whole.
//!   Only the command line's load generators and signal handling, which are not
//!   part of a node, may start tasks of their own.
//!
//! The checker's own tests at the bottom show that each rule fails when broken.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use regex::Regex;

const MAX_FILE_LINES: usize = 800;
const MAX_FN_LINES: usize = 80;

/// One `.rs` file of `src/`, its test code removed.
struct SourceFile {
    /// Path relative to `src/`.
    path: String,
    /// The top-level module it belongs to, `None` for `lib.rs` and `main.rs`.
    module: Option<String>,
    /// Lines with comments, string contents and test blocks blanked, so line
    /// numbers still match the file.
    code: Vec<String>,
    /// The file as written, for the comments that explain a long function.
    raw: Vec<String>,
    /// Whether the whole file is test code (`tests.rs`).
    test_only: bool,
}

fn read_sources(src: &Path) -> Vec<SourceFile> {
    let mut files = Vec::new();
    let mut pending = vec![src.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let mut entries: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("cannot list {}: {error}", dir.display()))
            .map(|entry| entry.expect("readable directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let text = fs::read_to_string(&path).expect("source files are UTF-8");
                let relative = path
                    .strip_prefix(src)
                    .expect("below src")
                    .to_string_lossy()
                    .replace('\\', "/");
                let top = relative.split('/').next().unwrap_or_default();
                let top = top.strip_suffix(".rs").unwrap_or(top);
                let module = (!["lib", "main"].contains(&top)).then(|| top.to_owned());
                let test_only = relative
                    .split('/')
                    .any(|part| part == "tests" || part == "tests.rs");
                files.push(SourceFile {
                    test_only,
                    path: relative,
                    module,
                    code: strip(&text),
                    raw: text.lines().map(str::to_owned).collect(),
                });
            }
        }
    }
    files
}

/// The text with comments and string literals blanked and every
/// `#[cfg(test)]` item (a test module or function) removed, line for line.
fn strip(text: &str) -> Vec<String> {
    let mut out = String::with_capacity(text.len());
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let rest = &chars[i..];
        if rest.starts_with(&['/', '/']) {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if rest.starts_with(&['/', '*']) {
            i += 2;
            while i < chars.len() && !chars[i..].starts_with(&['*', '/']) {
                out.push(if chars[i] == '\n' { '\n' } else { ' ' });
                i += 1;
            }
            i += 2;
        } else if chars[i] == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if chars.get(i) == Some(&'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            out.push('"');
            i += 1;
        } else if chars[i] == '\'' && chars.get(i + 2) == Some(&'\'') {
            // A char literal such as '{' must not count as a brace.
            out.push_str("' '");
            i += 3;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    blank_test_items(&out).lines().map(str::to_owned).collect()
}

/// Blanks each item that follows `#[cfg(test)]`, up to its closing brace or
/// semicolon, keeping its newlines.
fn blank_test_items(code: &str) -> String {
    let mut out: Vec<char> = code.chars().collect();
    let marker: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + marker.len() <= out.len() {
        if out[i..i + marker.len()] != marker[..] {
            i += 1;
            continue;
        }
        let mut j = i + marker.len();
        let mut depth = 0usize;
        while j < out.len() {
            match out[j] {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                ';' if depth == 0 => break,
                _ => {}
            }
            j += 1;
        }
        let end = j.min(out.len() - 1);
        for c in &mut out[i..=end] {
            if *c != '\n' {
                *c = ' ';
            }
        }
        i = j + 1;
    }
    out.into_iter().collect()
}

/// `module -> module it names`, with the first place that names it.
fn edges(files: &[SourceFile]) -> BTreeMap<(String, String), String> {
    let path = Regex::new(r"\bcrate::([a-z_][a-z0-9_]*)").expect("valid regex");
    let mut edges = BTreeMap::new();
    for file in files.iter().filter(|f| !f.test_only) {
        let Some(from) = &file.module else { continue };
        for (n, line) in file.code.iter().enumerate() {
            for capture in path.captures_iter(line) {
                let to = capture[1].to_owned();
                if &to != from {
                    edges
                        .entry((from.clone(), to))
                        .or_insert_with(|| format!("src/{}:{}", file.path, n + 1));
                }
            }
        }
    }
    edges
}

/// The module order of a `layers.txt`: one name per line, lowest first; `#`
/// starts a comment.
fn read_layers(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Every way `src/` breaks the layer order, one line each.
fn layer_violations(files: &[SourceFile], layers: &[String]) -> Vec<String> {
    let rank: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .map(|(rank, name)| (name.as_str(), rank))
        .collect();
    let modules: BTreeSet<&str> = files.iter().filter_map(|f| f.module.as_deref()).collect();
    let mut problems: Vec<String> = modules
        .iter()
        .filter(|module| !rank.contains_key(*module))
        .map(|module| format!("module `{module}` is not in layers.txt: add it where it belongs"))
        .collect();
    for ((from, to), place) in edges(files) {
        let (Some(&low), Some(&high)) = (rank.get(to.as_str()), rank.get(from.as_str())) else {
            continue;
        };
        if low >= high {
            problems.push(format!(
                "{place}: `{from}` names `crate::{to}`, which is not below it in layers.txt"
            ));
        }
    }
    problems
}

/// Files and functions over the size limits, test code aside.
fn size_violations(files: &[SourceFile]) -> Vec<String> {
    let function = Regex::new(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?fn\s+(\w+)")
        .expect("valid regex");
    let mut problems = Vec::new();
    for file in files.iter().filter(|f| !f.test_only) {
        let code_lines = file.code.len()
            - file
                .code
                .iter()
                .rev()
                .take_while(|l| l.trim().is_empty())
                .count();
        if code_lines > MAX_FILE_LINES {
            problems.push(format!(
                "src/{}: {code_lines} lines, over {MAX_FILE_LINES}: split it by concern",
                file.path
            ));
        }
        for (start, line) in file.code.iter().enumerate() {
            let Some(capture) = function.captures(line) else {
                continue;
            };
            let length = function_length(&file.code[start..]);
            if length > MAX_FN_LINES && !explained(&file.raw, start) {
                problems.push(format!(
                    "src/{}:{}: fn {} is {length} lines, over {MAX_FN_LINES}: split it, or say in a comment above it why it is long (\"long because ...\")",
                    file.path,
                    start + 1,
                    &capture[5]
                ));
            }
        }
    }
    problems
}

/// Lines from a function's signature to its closing brace (1 for a bodiless
/// declaration).
fn function_length(lines: &[String]) -> usize {
    let mut depth = 0usize;
    let mut opened = false;
    for (n, line) in lines.iter().enumerate() {
        for c in line.chars() {
            match c {
                '{' => {
                    depth += 1;
                    opened = true;
                }
                '}' => depth = depth.saturating_sub(1),
                ';' if !opened && depth == 0 => return n + 1,
                _ => {}
            }
        }
        if opened && depth == 0 {
            return n + 1;
        }
    }
    lines.len()
}

/// Whether the comment right above line `start` of `lines` (or one on the
/// function's first lines) says why the function is long.
fn explained(lines: &[String], start: usize) -> bool {
    let above = lines[..start.min(lines.len())]
        .iter()
        .rev()
        .take_while(|l| {
            let l = l.trim_start();
            l.starts_with("//") || l.starts_with("#[")
        })
        .any(|l| l.to_lowercase().contains("long because"));
    let inside = lines
        .iter()
        .skip(start)
        .take(4)
        .any(|l| l.trim_start().starts_with("//") && l.to_lowercase().contains("long because"));
    above || inside
}

/// Where a task may start without belonging to a node's process.
const TASKS_OUTSIDE_NODES: [&str; 3] = ["ambient.rs", "cli/bench", "cli/signal.rs"];

fn task_violations(files: &[SourceFile]) -> Vec<String> {
    let spawn = Regex::new(r"tokio::spawn\(|tokio::task::spawn\(|\b(tasks|set|work|fetches|appliers|writers|joins?)\.spawn\(")
        .expect("valid pattern");
    let mut problems = Vec::new();
    for file in files.iter().filter(|file| !file.test_only) {
        if TASKS_OUTSIDE_NODES
            .iter()
            .any(|allowed| file.path.starts_with(allowed))
        {
            continue;
        }
        for (index, line) in file.code.iter().enumerate() {
            if spawn.is_match(line) {
                problems.push(format!(
                    "src/{}:{}: start the task with crate::ambient::spawn (or spawn_into), so that it belongs to the node's process",
                    file.path,
                    index + 1
                ));
            }
        }
    }
    problems
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let layers = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("layers.txt"))
        .expect("layers.txt at the crate root names the order of src/'s modules");
    let problems = layer_violations(&read_sources(&src_dir()), &read_layers(&layers));
    assert!(
        problems.is_empty(),
        "src/ runs against layers.txt:\n{}",
        problems.join("\n")
    );
}

#[test]
fn files_and_functions_stay_small() {
    let problems = size_violations(&read_sources(&src_dir()));
    assert!(
        problems.is_empty(),
        "src/ has grown past its limits:\n{}",
        problems.join("\n")
    );
}

#[test]
fn node_tasks_start_in_the_nodes_process() {
    let problems = task_violations(&read_sources(&src_dir()));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_task_started_around_the_process_is_caught() {
    let files = tree(&[
        (
            "consumer.rs",
            "pub fn go() {\n    tokio::spawn(async {});\n}\n",
        ),
        (
            "cli/bench.rs",
            "pub fn load() {\n    tokio::spawn(async {});\n}\n",
        ),
        (
            "broker/tests.rs",
            "fn t() {\n    tokio::spawn(async {});\n}\n",
        ),
    ]);
    let problems = task_violations(&files);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("src/consumer.rs:2:"),
        "{problems:?}"
    );
}

/// A throwaway `src/` tree for the checker's own tests.
fn tree(files: &[(&str, &str)]) -> Vec<SourceFile> {
    let dir = tempfile::tempdir().expect("temporary directory");
    for (path, text) in files {
        let path = dir.path().join(path);
        fs::create_dir_all(path.parent().expect("has a parent")).expect("created");
        fs::write(path, text).expect("written");
    }
    read_sources(dir.path())
}

#[test]
fn an_upward_import_or_a_cycle_is_caught() {
    let layers = read_layers("event\nstore # comment\n");
    let fine = tree(&[
        ("event.rs", "pub struct Event;\n"),
        ("store/mod.rs", "use crate::event::Event;\n"),
    ]);
    assert!(layer_violations(&fine, &layers).is_empty());

    let cycle = tree(&[
        (
            "event.rs",
            "// crate::store in a comment is fine\nuse crate::store::Store;\n",
        ),
        (
            "store/mod.rs",
            "use crate::event::Event;\npub struct Store;\n",
        ),
    ]);
    let problems = layer_violations(&cycle, &layers);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("src/event.rs:2: `event` names `crate::store`"));

    let unlisted = tree(&[("sink.rs", "use crate::event::Event;\n")]);
    assert!(layer_violations(&unlisted, &layers)[0].contains("`sink` is not in layers.txt"));
}

#[test]
fn test_code_may_reach_any_layer() {
    let layers = read_layers("event\nstore\n");
    let files = tree(&[
        (
            "event.rs",
            "pub struct Event;\n#[cfg(test)]\nmod tests {\n    use crate::store::Store;\n}\n",
        ),
        ("event/tests.rs", "use crate::store::Store;\n"),
        ("store.rs", "pub struct Store;\n"),
    ]);
    assert!(layer_violations(&files, &layers).is_empty());
}

#[test]
fn a_long_function_is_caught_unless_explained() {
    let body = "    let x = '{';\n".repeat(MAX_FN_LINES);
    let files = tree(&[("event.rs", &format!("pub fn long() {{\n{body}}}\n"))]);
    let problems = size_violations(&files);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("fn long is 82 lines"));
    assert!(function_length(&["fn short();".to_owned()]) == 1);
}
