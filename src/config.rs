//! Configuration: figment layers (defaults < TOML file < `WEIR_*` environment < CLI
//! flags), extracted section by section so that every problem is reported at once,
//! then validated by a pure function. Connectivity is not checked here.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::{Figment, Provider};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::broker::{BrokerRole, BrokerSettings};
pub use crate::bus::{BusConfig, BusKind};
pub use crate::connect::{KafkaOptions, NatsOptions, NatsTls, is_secret_property};
use crate::consumer::ConsumerSettings;
use crate::event::{NameKind, Source, validate_name};
pub use crate::sink::SinkConfig;
pub use crate::telemetry::logging::LogFormat;

/// The embedded default: memory store and bus. Used when no config file is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/weir.toml");

/// Environment variables read by weir: `WEIR_SECTION__KEY` (double underscore nests).
pub const ENV_PREFIX: &str = "WEIR_";

/// The exit code for invalid configuration or usage (BSD `EX_USAGE`).
pub const EXIT_INVALID_CONFIG: i32 = 64;

const SECTIONS: &[&str] = &[
    "node",
    "store",
    "bus",
    "nats",
    "kafka",
    "broker",
    "http",
    "log",
    "demo",
    "subscriptions",
];

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
    pub nats: NatsOptions,
    #[serde(default)]
    pub kafka: KafkaOptions,
    #[serde(default)]
    pub broker: BrokerSettings,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub demo: DemoConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// `[node]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique within the fleet. Generated at start when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub role: BrokerRole,
    /// How long stopping waits for each consumer's batch in hand.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Placement tags of this node's subscribers; a group's `required_tags` must
    /// all be among them for its sources to be placed here.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub tags: BTreeSet<String>,
}

fn default_shutdown_grace() -> Duration {
    crate::runtime::DEFAULT_SHUTDOWN_GRACE
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: None,
            role: BrokerRole::default(),
            shutdown_grace: default_shutdown_grace(),
            tags: BTreeSet::new(),
        }
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
    /// The largest event an append may carry, in bytes of payload and metadata
    /// as JSON; larger ones are refused with nothing written.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
}

fn default_max_event_bytes() -> usize {
    crate::store::DEFAULT_MAX_EVENT_BYTES
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
            max_event_bytes: default_max_event_bytes(),
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
            .field("max_event_bytes", &self.max_event_bytes)
            .finish()
    }
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

/// `[log]`: what is logged, and how. `RUST_LOG` and `--log` override `level`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A filter: a level (`info`) or directives (`info,weir::broker=debug`).
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `pretty` lines for a person, `json` lines for a log pipeline.
    #[serde(default)]
    pub format: LogFormat,
}

fn default_log_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::default(),
        }
    }
}

/// `[demo]`: an appender that writes a trickle of sample events into the store,
/// so that a newcomer sees events flow. Also switched on by `weir run --demo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Events appended per second, over all demo streams.
    #[serde(default = "default_demo_rate")]
    pub rate: u32,
    /// The demo writes to streams `CATEGORY/1`..`CATEGORY/streams` of each category.
    #[serde(default = "default_demo_categories")]
    pub categories: Vec<String>,
    #[serde(default = "default_demo_streams")]
    pub streams: u32,
}

fn default_demo_rate() -> u32 {
    5
}
fn default_demo_categories() -> Vec<String> {
    vec!["orders".into(), "payments".into()]
}
fn default_demo_streams() -> u32 {
    3
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            rate: default_demo_rate(),
            categories: default_demo_categories(),
            streams: default_demo_streams(),
        }
    }
}

/// `[[subscriptions]]`: one subscriber group, the sources it consumes and where
/// its events go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    pub group: String,
    pub sources: Vec<Source>,
    /// Subscriber instances of this group on each node.
    #[serde(default = "default_instances")]
    pub instances: usize,
    /// Tags a node must carry (`node.tags`) to be given this group's sources.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub required_tags: BTreeSet<String>,
    /// Where the events go.
    #[serde(default)]
    pub sink: SinkConfig,
    /// How its consumers read, checkpoint and handle failures; every key optional.
    #[serde(default)]
    pub consumer: ConsumerSettings,
}

fn default_instances() -> usize {
    1
}

/// CLI flags that override every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub node_id: Option<String>,
    pub role: Option<BrokerRole>,
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
                extract_section(
                    &figment,
                    "subscriptions",
                    &mut config.subscriptions,
                    &mut problems,
                );
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
        problems.extend(check_grace_within_handover(&config));
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

        let bus = &self.bus;
        if let Some(feature) = bus.kind.missing_feature() {
            problem(
                "bus.kind",
                format!("this weir was built without the `{feature}` feature"),
            );
        }
        if !is_token(&bus.namespace) {
            problem(
                "bus.namespace",
                format!(
                    "{:?} is not a valid namespace: use 1 to 48 letters, digits, '-' and '_'",
                    bus.namespace
                ),
            );
        }
        if bus.signal_retention < Duration::from_secs(1) {
            problem("bus.signal_retention", "must be at least 1s".into());
        }
        for (key, message) in self.nats.validate() {
            problem(&format!("nats.{key}"), message);
        }
        for (key, message) in self.kafka.validate() {
            problem(&format!("kafka.{key}"), message);
        }
        for (key, message) in self.demo.validate() {
            problem(&format!("demo.{key}"), message);
        }
        for tag in &self.node.tags {
            if !is_token(tag) {
                problem(
                    "node.tags",
                    format!("{tag:?} is not a valid tag: use 1 to 48 letters, digits, '-' and '_'"),
                );
            }
        }

        for (key, message) in self.broker.validate() {
            problem(&format!("broker.{key}"), message);
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

        if let Err(error) = crate::telemetry::logging::parse_filter(&self.log.level, "log.level") {
            problem("log.level", error.reason);
        }

        let mut groups = std::collections::HashSet::new();
        for (i, subscription) in self.subscriptions.iter().enumerate() {
            let key = |field: &str| format!("subscriptions[{i}].{field}");
            if let Err(e) = validate_name(NameKind::Group, &subscription.group) {
                problem(&key("group"), e.to_string());
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
            for (field, message) in subscription.consumer.validate() {
                problem(&key(&format!("consumer.{field}")), message);
            }
            for tag in &subscription.required_tags {
                if !is_token(tag) {
                    problem(
                        &key("required_tags"),
                        format!(
                            "{tag:?} is not a valid tag: use 1 to 48 letters, digits, '-' and '_'"
                        ),
                    );
                }
            }
            for (field, message) in subscription.sink.validate() {
                problem(&key(&format!("sink.{field}")), message);
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
        let nats = &mut printable.nats;
        for secret in [&mut nats.password, &mut nats.token, &mut nats.nkey_seed] {
            if secret.is_some() {
                *secret = Some("<redacted>".into());
            }
        }
        for (key, value) in printable.kafka.properties.iter_mut() {
            if is_secret_property(key) {
                *value = "<redacted>".into();
            }
        }
        toml::to_string_pretty(&printable)
            .unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

impl BusKind {
    /// The cargo feature this backend needs, when this build lacks it.
    pub fn missing_feature(self) -> Option<&'static str> {
        match self {
            BusKind::Memory => None,
            BusKind::Nats => (!cfg!(feature = "nats")).then_some("nats"),
            BusKind::Kafka => (!cfg!(feature = "kafka")).then_some("kafka"),
        }
    }
}

impl NatsOptions {
    /// Problems as (key within `[nats]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| problems.push((key.to_owned(), message));
        let servers: Vec<&str> = self.url.split(',').map(str::trim).collect();
        for server in &servers {
            match url::Url::parse(server) {
                Ok(url) if ["nats", "tls", "ws", "wss"].contains(&url.scheme()) => {}
                _ => problem(
                    "url",
                    format!(
                        "{server:?} is not a NATS server URL; write nats://HOST:PORT or tls://HOST:PORT"
                    ),
                ),
            }
        }
        let methods = [
            self.user.is_some(),
            self.token.is_some(),
            self.nkey_seed.is_some(),
            self.credentials_file.is_some(),
        ];
        if methods.iter().filter(|set| **set).count() > 1 {
            problem(
                "user",
                "set only one of user/password, token, nkey_seed and credentials_file".into(),
            );
        }
        if self.user.is_some() != self.password.is_some() {
            problem(
                "password",
                "user and password go together: set both or neither".into(),
            );
        }
        if let Some(seed) = &self.nkey_seed {
            if !seed.starts_with("SU") {
                problem(
                    "nkey_seed",
                    "is not a user NKey seed: it starts with \"SU\" (the public key starts with \"U\")".into(),
                );
            }
        }
        if let Some(path) = &self.credentials_file {
            if !path.is_file() {
                problem(
                    "credentials_file",
                    format!("{} is not a readable file", path.display()),
                );
            }
        }
        let tls = &self.tls;
        for (key, path) in [
            ("tls.ca_file", &tls.ca_file),
            ("tls.cert_file", &tls.cert_file),
            ("tls.key_file", &tls.key_file),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    problem(key, format!("{} is not a readable file", path.display()));
                }
            }
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            problem(
                "tls.key_file",
                "a client certificate needs its key: set both cert_file and key_file or neither"
                    .into(),
            );
        }
        if self.connect_timeout.is_zero() {
            problem("connect_timeout", "must be longer than 0s".into());
        }
        problems
    }
}

impl KafkaOptions {
    /// Problems as (key within `[kafka]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.brokers.split(',').any(|broker| {
            let broker = broker.trim();
            broker
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        }) {
            problems.push((
                "brokers".into(),
                format!(
                    "{:?} is not a broker list; write HOST:PORT[,HOST:PORT...]",
                    self.brokers
                ),
            ));
        }
        if self.partitions < 1 {
            problems.push(("partitions".into(), "must be at least 1".into()));
        }
        if self.replication < 1 {
            problems.push(("replication".into(), "must be at least 1".into()));
        }
        if self.properties.contains_key("bootstrap.servers") {
            problems.push((
                "properties".into(),
                "set the brokers with kafka.brokers, not bootstrap.servers".into(),
            ));
        }
        problems
    }
}

impl DemoConfig {
    /// Problems as (key within `[demo]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if !(1..=100_000).contains(&self.rate) {
            problems.push((
                "rate".into(),
                format!("{} is out of range: use 1 to 100000", self.rate),
            ));
        }
        if self.categories.is_empty() {
            problems.push(("categories".into(), "give at least one category".into()));
        }
        for category in &self.categories {
            if let Err(error) = crate::event::Category::new(category.as_str()) {
                problems.push(("categories".into(), error.to_string()));
            }
        }
        if self.streams == 0 {
            problems.push(("streams".into(), "must be at least 1".into()));
        }
        problems
    }
}

impl SinkConfig {
    /// Problems as (key within `sink`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        match self {
            SinkConfig::Stdout => {}
            SinkConfig::Nats {
                subject,
                stream,
                max_in_flight,
            } => {
                if !cfg!(feature = "nats") {
                    problems.push((
                        "kind".into(),
                        "this weir was built without the `nats` feature".into(),
                    ));
                }
                if let Err(message) = check_template(subject, |c| !c.is_whitespace() && c != '*' && c != '>')
                    .and_then(|()| {
                        if subject.split('.').any(str::is_empty) {
                            Err("has an empty subject token: do not start or end with '.' or write '..'".into())
                        } else {
                            Ok(())
                        }
                    })
                {
                    problems.push(("subject".into(), format!("{subject:?} {message}")));
                }
                if let Some(stream) = stream {
                    if stream.is_empty()
                        || stream
                            .chars()
                            .any(|c| c.is_whitespace() || ".*>/\\".contains(c))
                    {
                        problems.push((
                            "stream".into(),
                            format!("{stream:?} is not a JetStream stream name: no spaces, '.', '*', '>', '/' or '\\'"),
                        ));
                    }
                }
                if *max_in_flight == 0 {
                    problems.push(("max_in_flight".into(), "must be at least 1".into()));
                }
            }
            SinkConfig::Kafka { topic } => {
                if !cfg!(feature = "kafka") {
                    problems.push((
                        "kind".into(),
                        "this weir was built without the `kafka` feature".into(),
                    ));
                }
                if let Err(message) =
                    check_template(topic, |c| c.is_ascii_alphanumeric() || "._-".contains(c))
                {
                    problems.push(("topic".into(), format!("{topic:?} {message}")));
                }
            }
        }
        problems
    }
}

/// Checks that `template`'s placeholders are known and its literal characters
/// pass `literal_ok`.
fn check_template(template: &str, literal_ok: impl Fn(char) -> bool) -> Result<(), String> {
    let parsed = crate::sink::template::Template::parse(template).map_err(|e| e.reason)?;
    match parsed
        .with_placeholders_as("")
        .chars()
        .find(|c| !literal_ok(*c))
    {
        Some(c) => Err(format!("may not contain {c:?}")),
        None => Ok(()),
    }
}

/// Letters, digits, '-' and '_', 1 to 48 of them: safe in subjects, topics and
/// label values alike.
fn is_token(value: &str) -> bool {
    (1..=48).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

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

fn is_simple_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 48
}

/// A stopping consumer may take `node.shutdown_grace` to finish its batch and store
/// its checkpoint; a coordinator gives a moving source to its new owner after
/// `broker.handover_timeout` whether released or not. A grace longer than the
/// handover would let the new owner start before the old one's checkpoint is
/// stored, repeating events a planned handover promises to process once.
fn check_grace_within_handover(config: &Config) -> Option<Problem> {
    let (grace, handover) = (config.node.shutdown_grace, config.broker.handover_timeout);
    // A zero handover timeout is reported by the broker's own checks.
    (grace > handover && !handover.is_zero()).then(|| Problem {
        key: "node.shutdown_grace".to_owned(),
        message: format!(
            "{} is longer than broker.handover_timeout ({}): a source could move to its new owner before this node stores its checkpoint, and events would be processed twice; make shutdown_grace at most handover_timeout",
            humantime::format_duration(grace),
            humantime::format_duration(handover)
        ),
    })
}

fn check_postgres_url(url: &str) -> Result<(), String> {
    #[cfg(feature = "postgres")]
    {
        url.parse::<tokio_postgres::Config>()
            .map(|_| ())
            .map_err(|e| format!("is not a valid Postgres connection string: {e}"))
    }
    #[cfg(not(feature = "postgres"))]
    {
        let _ = url;
        Ok(())
    }
}

/// Hides the password in a Postgres connection string, for anything that prints
/// configuration: the user-info password and `password=` query parameters of a URL
/// (multi-host URLs too), and the `password` value of the libpq `key=value` form
/// (spaces around `=` and quoted values included).
pub fn redact_url(url: &str) -> String {
    if url.contains("://") {
        redact_uri(url)
    } else {
        redact_key_values(url)
    }
}

fn redact_uri(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = url[..scheme_end].to_owned();
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    let Some((path, query)) = tail.split_once('?') else {
        out.push_str(tail);
        return out;
    };
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query, None),
    };
    out.push_str(path);
    out.push('?');
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => param.to_owned(),
        })
        .collect();
    out.push_str(&params.join("&"));
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

/// Reads `key = value` pairs as libpq does (values optionally single-quoted, with
/// backslash escapes) and prints them back with the password hidden.
fn redact_key_values(text: &str) -> String {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            pairs.push(key);
            continue;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            value.push('\'');
            while let Some(c) = chars.next() {
                value.push(c);
                match c {
                    '\\' => value.extend(chars.next()),
                    '\'' => break,
                    _ => {}
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        if key.eq_ignore_ascii_case("password") {
            value = "***".into();
        }
        pairs.push(format!("{key}={value}"));
    }
    pairs.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

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

    #[test]
    fn broker_settings_layer_like_every_section() {
        let config = load_toml(
            "[broker]\nheartbeat_interval = \"1s\"\n",
            &[("WEIR_BROKER__LEASE_TTL", "30s")],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.broker.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(config.broker.lease_ttl, Duration::from_secs(30));
        assert_eq!(
            config.broker.member_timeout,
            BrokerSettings::default().member_timeout
        );
        let error = load_err(
            "[broker]\nheartbeat_interval = \"5s\"\n",
            &[("WEIR_BROKER__HANDOVER_TIMEOUT", "0s")],
        );
        let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["broker.handover_timeout", "broker.member_timeout"]);
    }

    #[test]
    fn the_shutdown_grace_may_not_exceed_the_handover_timeout() {
        let defaults = load_ok("", &[]);
        assert!(defaults.node.shutdown_grace <= defaults.broker.handover_timeout);
        load_ok(
            "[node]\nshutdown_grace = \"10s\"\n[broker]\nhandover_timeout = \"10s\"\n",
            &[],
        );
        let error = load_err(
            "[node]\nshutdown_grace = \"30s\"\n",
            &[("WEIR_BROKER__HANDOVER_TIMEOUT", "10s")],
        );
        let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["node.shutdown_grace"]);
        assert!(
            error.problems[0].message.contains("handover_timeout (10s)"),
            "{error}"
        );
    }

    fn load_ok(toml: &str, pairs: &[(&str, &str)]) -> Config {
        load_toml(toml, pairs).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn sinks_bus_connections_and_tags_are_read_and_checked() {
        let config = load_ok(
            r#"
                [node]
                tags = ["bridge"]

                [bus]
                kind = "kafka"
                namespace = "fleet-a"

                [nats]
                url = "nats://10.0.0.1:4222, tls://10.0.0.2:4222"
                user = "weir"
                password = "hunter2"

                [kafka]
                brokers = "10.0.0.1:9092"
                partitions = 3
                properties = { "sasl.password" = "s3cret", "security.protocol" = "SASL_SSL" }

                [[subscriptions]]
                group = "bridge"
                sources = ["category:orders"]
                required_tags = ["bridge"]
                sink = { kind = "nats", subject = "events.{category}.{stream}", stream = "EVENTS" }

                [[subscriptions]]
                group = "to-kafka"
                sources = ["log"]
                sink = { kind = "kafka", topic = "events.{category}" }
            "#,
            &[],
        );
        assert_eq!(
            config.subscriptions[0].required_tags,
            ["bridge".to_owned()].into()
        );
        assert_eq!(
            config.subscriptions[0].sink,
            SinkConfig::Nats {
                subject: "events.{category}.{stream}".into(),
                stream: Some("EVENTS".into()),
                max_in_flight: crate::sink::default_max_in_flight(),
            }
        );
        assert_eq!(
            config.subscriptions[1].sink,
            SinkConfig::Kafka {
                topic: "events.{category}".into()
            }
        );
        let printed = config.to_redacted_toml();
        assert!(
            !printed.contains("hunter2") && !printed.contains("s3cret"),
            "{printed}"
        );
        assert!(printed.contains("SASL_SSL"), "{printed}");
        let debug = format!("{:?} {:?}", config.nats, config.kafka);
        assert!(
            !debug.contains("hunter2") && !debug.contains("s3cret"),
            "{debug}"
        );

        let error = load_err(
            r#"
                [node]
                tags = ["no spaces"]

                [nats]
                url = "http://localhost"
                user = "weir"
                nkey_seed = "UABC"

                [kafka]
                brokers = "localhost"
                replication = 0

                [demo]
                rate = 0

                [[subscriptions]]
                group = "a"
                sources = ["log"]
                sink = { kind = "nats", subject = "events.{categroy}", max_in_flight = 0 }

                [[subscriptions]]
                group = "b"
                sources = ["log"]
                sink = { kind = "kafka", topic = "events/{category}" }
            "#,
            &[],
        );
        let mut found = keys(&error);
        found.sort_unstable();
        found.dedup();
        assert_eq!(
            found,
            [
                "demo.rate",
                "kafka.brokers",
                "kafka.replication",
                "nats.nkey_seed",
                "nats.password",
                "nats.url",
                "nats.user",
                "node.tags",
                "subscriptions[0].sink.max_in_flight",
                "subscriptions[0].sink.subject",
                "subscriptions[1].sink.topic",
            ],
            "{error}"
        );
        assert!(
            problem(&error, "subscriptions[0].sink.subject")
                .message
                .contains("{category}")
        );
    }

    #[test]
    fn templates_accept_known_placeholders_only() {
        let subject = |c: char| !c.is_whitespace() && c != '*' && c != '>';
        assert!(check_template("events.{category}.{stream}.{name}", subject).is_ok());
        assert!(check_template("events.{category", subject).is_err());
        assert!(check_template("events.}", subject).is_err());
        assert!(check_template("events.*", subject).is_err());
        assert!(check_template("", subject).is_err());
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

    #[test]
    fn embedded_default_loads_to_the_rust_defaults() {
        let loaded = Config::load_with_env(None, &Overrides::default(), Vec::new())
            .expect("the embedded default is valid");
        assert_eq!(without_node_id(loaded), Config::default());

        // The file agrees with the Rust defaults on its own, not only because the
        // defaults layer lies beneath it.
        let parsed: Config = toml::from_str(EMBEDDED_DEFAULT).expect("the embedded default parses");
        assert_eq!(without_node_id(parsed), Config::default());
        assert_eq!(Config::default().store.kind, StoreKind::Memory);
        assert_eq!(Config::default().bus.kind, BusKind::Memory);
        assert!(Config::default().validate().is_empty());
    }

    #[test]
    fn each_layer_beats_the_one_below_on_the_same_key() {
        let dir = TempDir::new();
        let file = dir.file(
            "weir.toml",
            r#"
                [node]
                id = "file-node"
                role = "observer"

                [store]
                kind = "postgres"
                url = "postgres://file@127.0.0.1:5432/file"
                schema = "from_file"
                pool_size = 4

                [http]
                listen = "127.0.0.1:1001"
            "#,
        );
        let environment = env(&[
            ("WEIR_NODE__ID", "env-node"),
            ("WEIR_NODE__ROLE", "coordinator"),
            ("WEIR_STORE__URL", "postgres://env@127.0.0.1:5432/env"),
            ("WEIR_STORE__SCHEMA", "from_env"),
            ("WEIR_STORE__POOL_SIZE", "8"),
            ("WEIR_HTTP__LISTEN", "127.0.0.1:1002"),
        ]);
        let overrides = Overrides {
            node_id: Some("cli-node".into()),
            role: Some(BrokerRole::Full),
            store_kind: Some(StoreKind::Postgres),
            store_url: Some("postgres://cli@127.0.0.1:5432/cli".into()),
            schema: Some("from_cli".into()),
            listen: Some("127.0.0.1:1003".into()),
        };

        // Defaults alone (through the embedded default).
        let defaults = Config::load_with_env(None, &Overrides::default(), Vec::new()).unwrap();
        assert_eq!(defaults.store.schema, "weir");
        assert_eq!(defaults.http.listen, "127.0.0.1:9600");
        assert_eq!(defaults.node.role, BrokerRole::Full);

        // The file beats the defaults.
        let from_file = Config::load_with_env(Some(&file), &Overrides::default(), Vec::new())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(from_file.node.id.as_deref(), Some("file-node"));
        assert_eq!(from_file.node.role, BrokerRole::Observer);
        assert_eq!(from_file.store.kind, StoreKind::Postgres);
        assert_eq!(
            from_file.store.url.as_deref(),
            Some("postgres://file@127.0.0.1:5432/file")
        );
        assert_eq!(from_file.store.schema, "from_file");
        assert_eq!(from_file.store.pool_size, 4);
        assert_eq!(from_file.http.listen, "127.0.0.1:1001");
        // Keys the file leaves out keep their defaults.
        assert_eq!(from_file.store.connect_timeout, Duration::from_secs(5));

        // The environment beats the file.
        let from_env =
            Config::load_with_env(Some(&file), &Overrides::default(), environment.clone())
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(from_env.node.id.as_deref(), Some("env-node"));
        assert_eq!(from_env.node.role, BrokerRole::Coordinator);
        assert_eq!(
            from_env.store.url.as_deref(),
            Some("postgres://env@127.0.0.1:5432/env")
        );
        assert_eq!(from_env.store.schema, "from_env");
        assert_eq!(from_env.store.pool_size, 8);
        assert_eq!(from_env.http.listen, "127.0.0.1:1002");

        // The command line beats the environment; what it does not set stays as the
        // environment had it.
        let from_cli = Config::load_with_env(Some(&file), &overrides, environment)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(from_cli.node.id.as_deref(), Some("cli-node"));
        assert_eq!(from_cli.node.role, BrokerRole::Full);
        assert_eq!(from_cli.store.kind, StoreKind::Postgres);
        assert_eq!(
            from_cli.store.url.as_deref(),
            Some("postgres://cli@127.0.0.1:5432/cli")
        );
        assert_eq!(from_cli.store.schema, "from_cli");
        assert_eq!(from_cli.store.pool_size, 8);
        assert_eq!(from_cli.http.listen, "127.0.0.1:1003");
    }

    #[test]
    fn overrides_beat_the_embedded_default_and_the_environment_on_store_kind() {
        // The embedded default says memory; the environment says postgres; the flag
        // says memory again, and the url from the environment then is a problem.
        let environment = env(&[
            ("WEIR_STORE__KIND", "postgres"),
            ("WEIR_STORE__URL", "postgres://env@127.0.0.1:5432/env"),
        ]);
        let from_env =
            Config::load_with_env(None, &Overrides::default(), environment.clone()).unwrap();
        assert_eq!(from_env.store.kind, StoreKind::Postgres);
        let overrides = Overrides {
            store_kind: Some(StoreKind::Memory),
            ..Overrides::default()
        };
        let error = Config::load_with_env(None, &overrides, environment).unwrap_err();
        assert_eq!(keys(&error), ["store.url"]);
        assert!(problem(&error, "store.url").message.contains("memory"));
    }

    #[test]
    fn durations_are_written_in_human_form() {
        let config = load_toml("[store]\nconnect_timeout = \"500ms\"\n", &[]).unwrap();
        assert_eq!(config.store.connect_timeout, Duration::from_millis(500));
        let config = load_toml("[store]\nconnect_timeout = \"10s\"\n", &[]).unwrap();
        assert_eq!(config.store.connect_timeout, Duration::from_secs(10));
        let config = load_toml(
            "[store]\nconnect_timeout = \"10s\"\n",
            &[("WEIR_STORE__CONNECT_TIMEOUT", "2m")],
        )
        .unwrap();
        assert_eq!(config.store.connect_timeout, Duration::from_secs(120));

        let error = load_err("[store]\nconnect_timeout = \"soon\"\n", &[]);
        assert_eq!(error.problems.len(), 1, "{error}");
        let soon = problem(&error, "store.connect_timeout");
        assert!(soon.message.contains("soon"), "{soon}");
        assert!(soon.message.contains("duration"), "{soon}");

        let error = load_err("[store]\nconnect_timeout = \"0s\"\n", &[]);
        assert!(
            problem(&error, "store.connect_timeout")
                .message
                .contains("longer than 0s")
        );
    }

    #[test]
    fn log_settings_are_read_and_checked() {
        let config = load_ok(
            "[log]\nlevel = \"warn,weir=debug\"\nformat = \"json\"\n",
            &[],
        );
        assert_eq!(config.log.level, "warn,weir=debug");
        assert_eq!(config.log.format, LogFormat::Json);
        let from_env = load_ok("", &[("WEIR_LOG__FORMAT", "json")]);
        assert_eq!(from_env.log.format, LogFormat::Json);

        let error = load_err("[log]\nlevel = \"[\"\nformat = \"xml\"\n", &[]);
        let mut found = keys(&error);
        found.sort_unstable();
        assert_eq!(found, ["log.format"], "{error}");
        let error = load_err("[log]\nlevel = \"info,[\"\n", &[]);
        assert_eq!(keys(&error), ["log.level"], "{error}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let error = load_err(
            r#"
                [store]
                kind = "postgres"
                schema = "Bad-Schema"
                pool_size = 0

                [bus]
                kind = "nats"
                namespace = "a.b"

                [http]
                listen = "nope"

                [[subscriptions]]
                group = "billing"
                sources = []

                [[subscriptions]]
                group = "billing"
                sources = ["log"]
                instances = 0
            "#,
            &[("WEIR_STORE_URL", "postgres://misspelled@127.0.0.1/db")],
        );
        let mut found = keys(&error);
        found.sort_unstable();
        assert_eq!(
            found,
            [
                "WEIR_STORE_URL",
                "bus.namespace",
                "http.listen",
                "store.pool_size",
                "store.schema",
                "store.url",
                "subscriptions[0].sources",
                "subscriptions[1].group",
                "subscriptions[1].instances",
            ],
            "{error}"
        );
        assert!(problem(&error, "store.url").message.contains("required"));
        assert!(
            problem(&error, "store.schema")
                .message
                .contains("Bad-Schema")
        );
        assert!(
            problem(&error, "store.pool_size")
                .message
                .contains("1 to 1000")
        );
        assert!(problem(&error, "http.listen").message.contains("\"nope\""));
        assert!(
            problem(&error, "subscriptions[0].sources")
                .message
                .contains("at least one source")
        );
        assert!(
            problem(&error, "subscriptions[1].group")
                .message
                .contains("twice")
        );
        let shown = error.to_string();
        for key in keys(&error) {
            assert!(shown.contains(key), "{key} missing from:\n{shown}");
        }
    }

    #[test]
    fn schema_names_are_simple_identifiers() {
        for good in ["weir", "_w", "weir_cli_0123456789ab", &"a".repeat(48)] {
            let config = load_toml(&format!("[store]\nschema = {good:?}\n"), &[]);
            assert!(config.is_ok(), "{good:?}: {}", config.unwrap_err());
        }
        for bad in [
            "",
            "Weir",
            "1weir",
            "we-ir",
            "we ir",
            "weir\"",
            &"a".repeat(49),
        ] {
            let error = load_err(&format!("[store]\nschema = {bad:?}\n"), &[]);
            assert_eq!(keys(&error), ["store.schema"], "{bad:?}");
        }
    }

    #[test]
    fn unknown_keys_and_sections_are_problems_naming_the_key() {
        let error = load_err(
            "verbose = true\n[store]\ncolour = \"blue\"\n[stroe]\nkind = \"memory\"\n",
            &[],
        );
        let colour = problem(&error, "store.colour");
        assert!(colour.message.contains("colour"), "{colour}");
        assert!(problem(&error, "stroe").message.contains("unknown section"));
        assert!(
            problem(&error, "verbose")
                .message
                .contains("unknown section")
        );
        assert_eq!(error.problems.len(), 3, "{error}");

        // The same through the environment: a well-formed name with an unknown key.
        let error = load_err("", &[("WEIR_HTTP__PORT", "9600")]);
        let port = problem(&error, "http.port");
        assert!(port.message.contains("port"), "{port}");
    }

    #[test]
    fn misspelled_env_vars_suggest_the_double_underscore() {
        let error = load_err(
            "",
            &[
                ("WEIR_STORE_URL", "postgres://u@h/db"),
                ("WEIR_STORE_CONNECT_TIMEOUT", "1s"),
                ("WEIR_HTTP_LISTEN", "127.0.0.1:1"),
            ],
        );
        assert_eq!(
            keys(&error),
            [
                "WEIR_STORE_URL",
                "WEIR_STORE_CONNECT_TIMEOUT",
                "WEIR_HTTP_LISTEN"
            ]
        );
        assert!(
            problem(&error, "WEIR_STORE_URL")
                .message
                .contains("WEIR_STORE__URL")
        );
        assert!(
            problem(&error, "WEIR_STORE_CONNECT_TIMEOUT")
                .message
                .contains("WEIR_STORE__CONNECT_TIMEOUT")
        );
        assert!(
            problem(&error, "WEIR_HTTP_LISTEN")
                .message
                .contains("WEIR_HTTP__LISTEN")
        );
    }

    #[test]
    fn unrelated_env_vars_are_ignored() {
        let environment = env(&[
            (
                "WEIR_TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            ),
            ("WEIR_REQUIRE_SERVICES", "1"),
            ("WEIR_CONFIG", "/nonexistent/weir.toml"),
            ("WEIR_LOG", "debug"),
            ("WEIR_", "x"),
            ("WEIR", "x"),
            ("STORE__URL", "postgres://not-weir@h/db"),
            ("weir_store__url", "postgres://lowercase@h/db"),
            ("PATH", "/usr/bin"),
        ]);
        let config = Config::load_with_env(None, &Overrides::default(), environment)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(without_node_id(config), Config::default());
    }

    #[test]
    fn store_url_needs_the_postgres_store_and_every_bus_kind_loads() {
        let error = load_err(
            "[store]\nkind = \"memory\"\nurl = \"postgres://u@127.0.0.1/db\"\n",
            &[],
        );
        assert_eq!(keys(&error), ["store.url"]);
        assert!(problem(&error, "store.url").message.contains("memory"));

        for bus in ["nats", "kafka"] {
            let config = load_ok(&format!("[bus]\nkind = {bus:?}\n"), &[]);
            assert_eq!(format!("{:?}", config.bus.kind).to_lowercase(), bus);
        }

        let error = load_err("[bus]\nkind = \"carrier-pigeon\"\n", &[]);
        assert!(
            error.problems.iter().any(|p| p.key.contains("bus")),
            "{error}"
        );

        let error = load_err(
            "[store]\nkind = \"postgres\"\nurl = \"definitely not a url\"\n",
            &[],
        );
        assert_eq!(keys(&error), ["store.url"], "{error}");
        let config = load_toml(
            "[store]\nkind = \"postgres\"\nurl = \"host=127.0.0.1 user=postgres dbname=test\"\n",
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.store.kind, StoreKind::Postgres);
    }

    #[test]
    fn a_missing_config_file_is_a_problem() {
        let dir = TempDir::new();
        let missing = dir.0.join("missing.toml");
        let error =
            Config::load_with_env(Some(&missing), &Overrides::default(), Vec::new()).unwrap_err();
        let problem = problem(&error, "config");
        assert!(problem.message.contains("does not exist"), "{problem}");
        assert!(
            problem.message.contains(&missing.display().to_string()),
            "{problem}"
        );
    }

    #[test]
    fn node_ids_are_validated_and_generated_once() {
        let error = load_err("[node]\nid = \"\"\n", &[]);
        assert_eq!(keys(&error), ["node.id"]);
        assert!(problem(&error, "node.id").message.contains("node id"));

        let config = Config::default();
        let id = config.node_id();
        assert!(id.starts_with("node-"), "{id}");
        assert_eq!(config.node_id(), id);
        let named = load_toml("[node]\nid = \"node-7\"\n", &[]).unwrap();
        assert_eq!(named.node_id(), "node-7");
    }

    #[test]
    fn redact_url_hides_passwords_and_keeps_the_rest() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            redact_url("postgresql://user:secret@127.0.0.1:5432/db?sslmode=disable"),
            "postgresql://user:***@127.0.0.1:5432/db?sslmode=disable"
        );
        for unchanged in [
            "postgres://u@h/db",
            "postgres://postgres@127.0.0.1:5432/test",
            "host=h user=u dbname=db",
        ] {
            assert_eq!(redact_url(unchanged), unchanged);
        }
        assert_eq!(
            redact_url("host=h password=secret user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(
            redact_url("host=h PASSWORD=secret user=u"),
            "host=h PASSWORD=*** user=u"
        );
    }

    #[test]
    fn printed_configuration_never_shows_the_password() {
        for url in [
            "postgres://u:hunter2hunter2@127.0.0.1:5432/db",
            "host=127.0.0.1 password=hunter2hunter2 user=u",
        ] {
            let config = Config::load_with_env(
                None,
                &Overrides {
                    store_kind: Some(StoreKind::Postgres),
                    store_url: Some(url.into()),
                    ..Overrides::default()
                },
                Vec::new(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(config.store.url.as_deref(), Some(url), "kept for use");
            let printed = config.to_redacted_toml();
            assert!(!printed.contains("hunter2"), "{printed}");
            assert!(printed.contains("***"), "{printed}");
            let debug = format!("{config:?}");
            assert!(!debug.contains("hunter2"), "{debug}");
        }
    }

    #[test]
    fn printed_configuration_loads_back_to_the_same_configuration() {
        let config = load_toml(
            r#"
                [node]
                id = "node-1"
                role = "observer"

                [store]
                kind = "postgres"
                url = "postgres://u@127.0.0.1:5432/db"
                schema = "w"
                pool_size = 3
                connect_timeout = "1s 500ms"

                [[subscriptions]]
                group = "billing"
                sources = ["category:orders", "stream:orders/o-1", "log"]
                instances = 2
            "#,
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.store.connect_timeout, Duration::from_millis(1500));
        let printed = config.to_redacted_toml();
        let reloaded = load_toml(&printed, &[]).unwrap_or_else(|e| panic!("{e}\n{printed}"));
        assert_eq!(reloaded, config, "{printed}");
    }

    #[test]
    fn config_error_display_lists_every_problem_line() {
        let error = ConfigError {
            problems: vec![
                Problem {
                    key: "store.url".into(),
                    message: "is required".into(),
                },
                Problem {
                    key: "http.listen".into(),
                    message: "\"nope\" is not an address".into(),
                },
                Problem {
                    key: "WEIR_STORE_URL".into(),
                    message: "use WEIR_STORE__URL".into(),
                },
            ],
        };
        assert_eq!(
            error.to_string(),
            "invalid configuration:\n  - store.url: is required\n  - http.listen: \"nope\" is not an address\n  - WEIR_STORE_URL: use WEIR_STORE__URL"
        );

        let error = load_err("[store]\npool_size = 0\n[http]\nlisten = \"nope\"\n", &[]);
        let shown = error.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 1 + error.problems.len(), "{shown}");
        assert_eq!(lines[0], "invalid configuration:");
        for (line, problem) in lines[1..].iter().zip(&error.problems) {
            assert_eq!(*line, format!("  - {problem}"));
        }
    }

    proptest! {
        #[test]
        fn redacted_urls_never_contain_the_password(
            password in "[A-Za-z0-9]{10,20}",
            form in 0usize..3,
        ) {
            let url = match form {
                0 => format!("postgres://user:{password}@db.example:5432/weir"),
                1 => format!("postgresql://user:{password}@10.0.0.1/weir?sslmode=disable"),
                _ => format!("host=db.example port=5432 password={password} user=user"),
            };
            let redacted = redact_url(&url);
            prop_assert!(!redacted.contains(&password), "{}", redacted);
            prop_assert!(redacted.contains("user"), "{}", redacted);
        }
    }

    #[test]
    fn deserialisation_problems_are_keyed_section_first() {
        let error = load_err("[store]\nconnect_timeout = \"soon\"\n", &[]);
        assert_eq!(keys(&error), ["store.connect_timeout"]);
        let error = load_err("[store]\ncolour = \"blue\"\n", &[]);
        assert!(
            keys(&error)
                .iter()
                .all(|k| *k == "store" || *k == "store.colour"),
            "{error}"
        );
        let error = load_err(
            "[[subscriptions]]\ngroup = \"g\"\nsources = [\"bogus\"]\n",
            &[],
        );
        assert_eq!(keys(&error), ["subscriptions[0].sources[0]"]);
    }

    #[test]
    fn an_unreadable_file_is_reported_once() {
        let dir = TempDir::new();
        let missing = dir.0.join("missing.toml");
        let error =
            Config::load_with_env(Some(&missing), &Overrides::default(), Vec::new()).unwrap_err();
        assert_eq!(keys(&error), ["config"], "{error}");
        let error = load_err("[store\n", &[]);
        assert_eq!(error.problems.len(), 1, "{error}");
    }

    #[test]
    fn env_values_that_look_like_numbers_can_set_string_keys() {
        let config = load_toml("", &[("WEIR_NODE__ID", "42")]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.node.id.as_deref(), Some("42"));
    }

    #[test]
    fn redact_url_hides_passwords_in_every_form_postgres_accepts() {
        for url in [
            "postgres://u:hunter2@h1:5432,h2:5433/db",
            "postgres://u@h/db?password=hunter2",
            "host=h password = hunter2 user=u",
            "host=h password='hunter2 hunter2' user=u",
            "postgres://u:hunter2@h:badport/db",
        ] {
            let redacted = redact_url(url);
            assert!(!redacted.contains("hunter2"), "{url:?} -> {redacted:?}");
        }
    }
}
