//! Tests of configuration, by concern: `load` (layering, environment, extraction),
//! `validate` (the checks and how problems are reported), `redact` (printing
//! without secrets) and `shipped` (the repository's example files are valid). This
//! module holds their shared helpers.

mod load;
mod redact;
mod shipped;
mod validate;

use super::*;
use crate::broker::{BrokerRole, BrokerSettings};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A directory of its own under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "weir-config-test-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).expect("create a temp dir");
        Self(path)
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write a config file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// Loads `toml` as the config file, with `pairs` as the whole environment.
fn load_toml(toml: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = TempDir::new();
    let path = dir.file("weir.toml", toml);
    Config::load_with_env(Some(&path), &Overrides::default(), env(pairs))
}

fn load_ok(toml: &str, pairs: &[(&str, &str)]) -> Config {
    load_toml(toml, pairs).unwrap_or_else(|e| panic!("{e}"))
}

fn load_err(toml: &str, pairs: &[(&str, &str)]) -> ConfigError {
    match load_toml(toml, pairs) {
        Ok(config) => panic!("expected problems with {toml:?}, got {config:#?}"),
        Err(error) => error,
    }
}

fn keys(error: &ConfigError) -> Vec<&str> {
    error.problems.iter().map(|p| p.key.as_str()).collect()
}

/// The problem at exactly `key`; fails listing every problem otherwise.
fn problem<'a>(error: &'a ConfigError, key: &str) -> &'a Problem {
    error
        .problems
        .iter()
        .find(|p| p.key == key)
        .unwrap_or_else(|| panic!("no problem at {key:?} in:\n{error}"))
}

fn without_node_id(mut config: Config) -> Config {
    config.node.id = None;
    config
}
