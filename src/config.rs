//! Configuration: figment layers (defaults < TOML file < `WEIR_*` environment < CLI
//! flags), extracted section by section so that every problem is reported at once,
//! then validated by a pure function. Connectivity is not checked here.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::{Figment, Provider};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::event::{Category, Source};

/// The embedded default: memory store and bus. Used when no config file is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/weir.toml");

/// Environment variables read by weir: `WEIR_SECTION__KEY` (double underscore nests).
pub const ENV_PREFIX: &str = "WEIR_";

/// The exit code for invalid configuration or usage (BSD `EX_USAGE`).
pub const EXIT_INVALID_CONFIG: i32 = 64;

const SECTIONS: &[&str] = &["node", "store", "bus", "http", "subscriptions"];

/// The whole configuration of one weir node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: NodeConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub bus: BusConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// `[node]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique within the fleet. Generated at start when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub role: Role,
}

/// What a node does in the fleet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Elects and allocates; runs no subscribers.
    Coordinator,
    /// Runs subscribers; never coordinates.
    Observer,
    /// Both.
    #[default]
    Full,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Coordinator => "coordinator",
            Role::Observer => "observer",
            Role::Full => "full",
        })
    }
}

/// Which event store backend to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Memory,
    Postgres,
}

/// `[store]`
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub kind: StoreKind,
    /// `postgres://user:password@host:port/database` (or libpq `key=value` form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The schema holding the `weir_*` tables.
    #[serde(default = "default_schema")]
    pub schema: String,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

fn default_schema() -> String {
    "weir".into()
}
fn default_pool_size() -> usize {
    16
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::default(),
            url: None,
            schema: default_schema(),
            pool_size: default_pool_size(),
            connect_timeout: default_connect_timeout(),
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("kind", &self.kind)
            .field("url", &self.url.as_deref().map(redact_url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Which allocation bus backend to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    #[default]
    Memory,
    Nats,
    Kafka,
}

/// `[bus]`: connection settings arrive with the NATS and Kafka buses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    #[serde(default)]
    pub kind: BusKind,
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where `/metrics`, `/livez`, `/readyz` and `/status` are served.
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "127.0.0.1:9600".into()
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
}

/// `[[subscriptions]]`: one subscriber group and the sources it consumes. Sinks and
/// consumer settings arrive with the runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    pub group: String,
    pub sources: Vec<Source>,
    /// Subscriber instances of this group on each node.
    #[serde(default = "default_instances")]
    pub instances: usize,
}

fn default_instances() -> usize {
    1
}

/// CLI flags that override every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub node_id: Option<String>,
    pub role: Option<Role>,
    pub store_kind: Option<StoreKind>,
    pub store_url: Option<String>,
    pub schema: Option<String>,
    pub listen: Option<String>,
}

/// One thing wrong with the configuration, at its key path (`store.url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why the configuration could not be used. Lists every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl Config {
    /// Loads the layers: defaults, the TOML file (`file`, or the embedded default when
    /// none), `WEIR_*` environment variables, then `overrides`; then validates.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_with_env(file, overrides, std::env::vars())
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

        if let Ok(dict) = figment.data() {
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
        }
        extract_section(&figment, "node", &mut config.node, &mut problems);
        extract_section(&figment, "store", &mut config.store, &mut problems);
        extract_section(&figment, "bus", &mut config.bus, &mut problems);
        extract_section(&figment, "http", &mut config.http, &mut problems);
        extract_section(
            &figment,
            "subscriptions",
            &mut config.subscriptions,
            &mut problems,
        );
        if let Some(path) = file.filter(|p| !p.exists()) {
            problems.insert(
                0,
                Problem {
                    key: "config".into(),
                    message: format!("file {} does not exist", path.display()),
                },
            );
        }
        problems.extend(config.validate());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Checks everything that can be checked without connecting anywhere.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_owned(),
                message,
            })
        };

        if let Some(id) = &self.node.id {
            if let Err(e) = crate::event::StreamName::new(id.as_str()) {
                problem("node.id", e.to_string().replace("stream name", "node id"));
            }
        }

        let store = &self.store;
        match (store.kind, &store.url) {
            (StoreKind::Memory, Some(_)) => problem(
                "store.url",
                "is set but store.kind is \"memory\": set store.kind = \"postgres\" to use it, or remove the url".into(),
            ),
            (StoreKind::Postgres, None) => problem(
                "store.url",
                "is required when store.kind is \"postgres\", e.g. postgres://user@127.0.0.1:5432/weir".into(),
            ),
            (StoreKind::Postgres, Some(url)) => {
                if let Err(message) = check_postgres_url(url) {
                    problem("store.url", message);
                }
            }
            (StoreKind::Memory, None) => {}
        }
        if store.kind == StoreKind::Postgres && !cfg!(feature = "postgres") {
            problem(
                "store.kind",
                "this weir was built without the `postgres` feature".into(),
            );
        }
        if !is_simple_identifier(&store.schema) {
            problem(
                "store.schema",
                format!(
                    "{:?} is not a valid schema name: use 1 to 48 lowercase letters, digits and '_', starting with a letter or '_'",
                    store.schema
                ),
            );
        }
        if !(1..=1000).contains(&store.pool_size) {
            problem(
                "store.pool_size",
                format!("{} is out of range: use 1 to 1000", store.pool_size),
            );
        }
        if store.connect_timeout.is_zero() {
            problem("store.connect_timeout", "must be longer than 0s".into());
        }

        if self.bus.kind != BusKind::Memory {
            problem(
                "bus.kind",
                format!(
                    "{:?} is not available in this version of weir yet: use \"memory\"",
                    self.bus.kind
                )
                .to_lowercase(),
            );
        }

        if let Err(e) = self.http.listen.parse::<SocketAddr>() {
            problem(
                "http.listen",
                format!(
                    "{:?} is not an address: {e}; write IP:PORT, e.g. 0.0.0.0:9600",
                    self.http.listen
                ),
            );
        }

        let mut groups = std::collections::HashSet::new();
        for (i, subscription) in self.subscriptions.iter().enumerate() {
            let key = |field: &str| format!("subscriptions[{i}].{field}");
            if let Err(e) = Category::new(subscription.group.as_str()) {
                problem(
                    &key("group"),
                    e.to_string().replace("category name", "group name"),
                );
            } else if !groups.insert(subscription.group.as_str()) {
                problem(
                    &key("group"),
                    format!("group {:?} is configured twice", subscription.group),
                );
            }
            if subscription.sources.is_empty() {
                problem(&key("sources"), "give at least one source".into());
            }
            if subscription.instances == 0 {
                problem(&key("instances"), "must be at least 1".into());
            }
        }
        problems
    }

    /// The node id: configured, or generated once per process.
    pub fn node_id(&self) -> String {
        self.node.id.clone().unwrap_or_else(|| {
            static GENERATED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            GENERATED
                .get_or_init(|| format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
                .clone()
        })
    }

    /// The effective configuration as TOML, with passwords redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut printable = self.clone();
        printable.node.id = Some(self.node_id());
        printable.store.url = printable.store.url.as_deref().map(redact_url);
        toml::to_string_pretty(&printable)
            .unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

fn figment(file: Option<&Path>, overrides: &Overrides, env: &[(String, String)]) -> Figment {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    figment = match file {
        Some(path) => figment.merge(Toml::file_exact(path)),
        None => figment.merge(Toml::string(EMBEDDED_DEFAULT)),
    };
    // The same as figment's `Env` provider (values parsed as its `Value`s), but over
    // the environment given, and only for variables that name a config key.
    for (name, value) in env {
        if let Some(key) = config_env_key(name) {
            let value = value
                .parse::<figment::value::Value>()
                .unwrap_or_else(|_| value.as_str().into());
            figment = figment.merge(Serialized::default(&key, value));
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
    match figment.extract_inner::<T>(section) {
        Ok(value) => *into = value,
        // Sections absent from every layer keep their defaults.
        Err(e) if e.missing() => {}
        Err(errors) => problems.extend(errors.into_iter().map(|e| {
            let key = if e.path.is_empty() {
                section.to_owned()
            } else {
                e.path.join(".")
            };
            let origin = e
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            Problem {
                key,
                message: format!("{}{origin}", e.kind),
            }
        })),
    }
}

fn is_simple_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 48
}

fn check_postgres_url(url: &str) -> Result<(), String> {
    #[cfg(feature = "postgres")]
    {
        url.parse::<tokio_postgres::Config>()
            .map(|_| ())
            .map_err(|e| format!("{:?} is not a Postgres URL: {e}", redact_url(url)))
    }
    #[cfg(not(feature = "postgres"))]
    {
        let _ = url;
        Ok(())
    }
}

/// Hides the password of a URL (`postgres://u:***@h/db`) or libpq string
/// (`password=***`), for anything that prints configuration.
pub fn redact_url(url: &str) -> String {
    if let Ok(mut parsed) = url::Url::parse(url) {
        if parsed.password().is_some() && parsed.set_password(Some("***")).is_ok() {
            return parsed.to_string();
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|part| match part.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where the config file comes from: `--config PATH`, else `WEIR_CONFIG`.
pub fn config_path(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| std::env::var_os("WEIR_CONFIG").map(PathBuf::from))
}
