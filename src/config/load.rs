//! Loading: the figment layers (defaults < TOML file < `WEIR_*` environment < CLI
//! overrides), the environment variables (including misspelled ones), and extraction
//! section by section so that one bad section does not hide the problems of another.

use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::{Figment, Provider};
use serde::de::DeserializeOwned;

use super::{Config, ConfigError, EMBEDDED_DEFAULT, ENV_PREFIX, Overrides, Problem, SECTIONS};

impl Config {
    /// Loads the layers: defaults, the TOML file (`file`, or the embedded default when
    /// none), `WEIR_*` environment variables, then `overrides`; then validates.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        // `vars()` panics on a variable that is not UTF-8, even one weir does not read.
        let env = std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        });
        Self::load_with_env(file, overrides, env)
    }

    /// [`Config::load`] with the environment given, so tests need not touch the process's.
    pub fn load_with_env(
        file: Option<&Path>,
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut problems = misspelled_env_vars(&env);
        let figment = figment(file, overrides, &env);
        let mut config = Config::default();

        match figment.data() {
            Ok(dict) => {
                for key in dict.values().flat_map(|d| d.keys()) {
                    if !SECTIONS.contains(&key.as_str()) {
                        problems.push(Problem {
                            key: key.clone(),
                            message: format!(
                                "unknown section; expected one of {}",
                                SECTIONS.join(", ")
                            ),
                        });
                    }
                }
                extract_section(&figment, "node", &mut config.node, &mut problems);
                extract_section(&figment, "store", &mut config.store, &mut problems);
                extract_section(&figment, "bus", &mut config.bus, &mut problems);
                extract_section(&figment, "nats", &mut config.nats, &mut problems);
                extract_section(&figment, "kafka", &mut config.kafka, &mut problems);
                extract_section(&figment, "broker", &mut config.broker, &mut problems);
                extract_section(&figment, "http", &mut config.http, &mut problems);
                extract_section(&figment, "log", &mut config.log, &mut problems);
                extract_section(&figment, "demo", &mut config.demo, &mut problems);
                extract_section(&figment, "lifecycle", &mut config.lifecycle, &mut problems);
                extract_section(
                    &figment,
                    "subscriptions",
                    &mut config.subscriptions,
                    &mut problems,
                );
                extract_section(&figment, "ingest", &mut config.ingest, &mut problems);
            }
            // The file cannot be read or parsed: one problem, not one per section.
            Err(error) => {
                let message = match file {
                    Some(path) if !path.exists() => {
                        format!("file {} does not exist", path.display())
                    }
                    _ => error.to_string(),
                };
                problems.insert(
                    0,
                    Problem {
                        key: "config".into(),
                        message,
                    },
                );
                return Err(ConfigError { problems });
            }
        }
        problems.extend(config.validate());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// The layers, lowest first: each later `merge` wins on the keys it sets.
fn figment(file: Option<&Path>, overrides: &Overrides, env: &[(String, String)]) -> Figment {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    figment = match file {
        Some(path) => figment.merge(Toml::file_exact(path)),
        None => figment.merge(Toml::string(EMBEDDED_DEFAULT)),
    };
    for (name, value) in env {
        if let Some(key) = config_env_key(name) {
            figment = figment.merge(EnvVar {
                name: name.clone(),
                key,
                value: value.clone(),
            });
        }
    }
    let set = |figment: Figment, key: &str, value: &Option<String>| match value {
        Some(value) => figment.merge(Serialized::default(key, value)),
        None => figment,
    };
    figment = set(figment, "node.id", &overrides.node_id);
    figment = set(figment, "node.role", &overrides.role.map(|r| r.to_string()));
    figment = set(
        figment,
        "store.kind",
        &overrides
            .store_kind
            .map(|k| format!("{k:?}").to_lowercase()),
    );
    figment = set(figment, "store.url", &overrides.store_url);
    figment = set(figment, "store.schema", &overrides.schema);
    set(figment, "http.listen", &overrides.listen)
}

/// One `WEIR_*` variable. Its value stays a string (extraction converts it where a
/// number or boolean is wanted), so `WEIR_NODE__ID=42` is the id "42"; errors name the
/// variable it came from.
struct EnvVar {
    name: String,
    key: String,
    value: String,
}

impl Provider for EnvVar {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(format!("environment variable {}", self.name))
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Serialized::default(&self.key, &self.value).data()
    }
}

/// The config key an environment variable sets (`WEIR_STORE__URL` → `store.url`), if any.
fn config_env_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?.to_lowercase();
    let (section, _) = rest.split_once("__")?;
    SECTIONS.contains(&section).then(|| rest.replace("__", "."))
}

/// `WEIR_STORE_URL` is almost surely meant as `WEIR_STORE__URL`; silently ignoring it
/// would run a node against the wrong store.
fn misspelled_env_vars(env: &[(String, String)]) -> Vec<Problem> {
    env.iter()
        .filter_map(|(name, _)| {
            let rest = name.strip_prefix(ENV_PREFIX)?.to_lowercase();
            let section = SECTIONS.iter().find(|s| {
                rest.starts_with(&format!("{s}_")) && !rest.starts_with(&format!("{s}__"))
            })?;
            Some(Problem {
                key: name.clone(),
                message: format!(
                    "use a double underscore after the section: {ENV_PREFIX}{}__{}",
                    section.to_uppercase(),
                    &name[ENV_PREFIX.len() + section.len() + 1..]
                ),
            })
        })
        .collect()
}

fn extract_section<T: DeserializeOwned>(
    figment: &Figment,
    section: &str,
    into: &mut T,
    problems: &mut Vec<Problem>,
) {
    match figment.extract_inner_lossy::<T>(section) {
        Ok(value) => *into = value,
        // Sections absent from every layer keep their defaults.
        Err(e) if e.missing() => {}
        Err(errors) => problems.extend(errors.into_iter().map(|e| {
            let origin = e
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            Problem {
                key: key_path(section, &e.path),
                message: format!("{}{origin}", e.kind),
            }
        })),
    }
}

/// `store.connect_timeout`, `subscriptions[0].sources[1]`: figment reports the path of
/// an error inside a section with the section last.
fn key_path(section: &str, path: &[String]) -> String {
    let inner = match path.split_last() {
        Some((last, rest)) if last == section => rest,
        _ => path,
    };
    let mut key = section.to_owned();
    for segment in inner {
        if segment.parse::<usize>().is_ok() {
            key.push_str(&format!("[{segment}]"));
        } else {
            key.push('.');
            key.push_str(segment);
        }
    }
    key
}
