//! The configuration files shipped in the repository's `config/` directory, the
//! embedded default (`weir.toml`) among them, parse and pass validation: a key renamed or a check
//! tightened in code must not leave an example that `weir config check` rejects.

use super::*;

/// Every `*.toml` under the repository's `config/` directory, sorted.
fn shipped_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

/// Problems other than a backend this build was compiled without: the examples name
/// Postgres, NATS and Kafka, and must still count as valid in a build lacking one.
fn real_problems(problems: Vec<Problem>) -> Vec<Problem> {
    problems
        .into_iter()
        .filter(|p| !p.message.contains("this weir was built without the"))
        .collect()
}

#[test]
fn every_shipped_config_file_parses_and_validates() {
    let files = shipped_files();
    let names: Vec<_> = files.iter().filter_map(|f| f.file_name()).collect();
    // The embedded default is one of them, so an empty or moved directory fails here.
    assert!(names.iter().any(|n| *n == "weir.toml"), "{files:?}");
    for file in &files {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        // Directly, so that every key must be known without the defaults beneath.
        let parsed: Config = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", file.display()));
        assert_eq!(real_problems(parsed.validate()), [], "{}", file.display());
        // And through the layers, as `weir --config FILE` reads it, with an empty
        // environment so that the test does not depend on the caller's WEIR_* variables.
        match Config::load_with_env(Some(file), &Overrides::default(), Vec::new()) {
            Ok(_) => {}
            Err(error) => assert_eq!(real_problems(error.problems), [], "{}", file.display()),
        }
    }
}
