//! The section types defined by config itself (`[node]`, `[store]`, `[http]`, `[log]`,
//! `[demo]`, `[[subscriptions]]`) and their defaults. Sections owned by a lower layer
//! (`[bus]`, `[nats]`, `[kafka]`, `[broker]`, a subscription's `sink` and `consumer`)
//! are defined there, next to the code that reads them.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{LogFormat, Problem, SinkConfig};
use crate::broker::BrokerRole;
use crate::consumer::{ConsumerSettings, EventFilter};
use crate::event::Source;
use crate::sink::{RouteConfig, Routing, Unmatched};

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
    /// A hot standby that reads of events go to (optional); the same `[store.tls]`
    /// applies to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_url: Option<String>,
    /// The standby's replay lag past which reads go to the primary.
    #[serde(default = "default_read_max_lag", with = "humantime_serde")]
    pub read_max_lag: Duration,
    /// `[store.tls]`: certificate files for TLS towards Postgres; `sslmode` is
    /// read from `url`.
    #[serde(default, skip_serializing_if = "StoreTls::is_empty")]
    pub tls: StoreTls,
}

/// `[store.tls]` (its `Debug` hides the key's password: see `redact.rs`)
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreTls {
    /// PEM file of the certificate authorities that sign the server's certificate
    /// (libpq's `sslrootcert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate, for servers that verify clients (`sslcert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `cert_file` (`sslkey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
    /// The password of an encrypted `key_file` (`sslpassword`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_password: Option<String>,
}

impl StoreTls {
    fn is_empty(&self) -> bool {
        self == &StoreTls::default()
    }
}

fn default_max_event_bytes() -> usize {
    crate::store::DEFAULT_MAX_EVENT_BYTES
}

fn default_read_max_lag() -> Duration {
    Duration::from_secs(5)
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
            read_url: None,
            read_max_lag: default_read_max_lag(),
            tls: StoreTls::default(),
        }
    }
}

/// `[http]` (its `Debug` hides the admin tokens: see `redact.rs`)
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where `/metrics`, `/livez`, `/readyz`, `/status` and `/admin/` are served.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The URL other nodes and the CLI reach this node's admin API at; by
    /// default `http://` and `listen` (a wildcard address as this host's
    /// loopback, which only suits a fleet on one host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// The bearer token admin writes need, recorded under the name `admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// A file holding the admin token (trailing whitespace ignored), instead of
    /// `admin_token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// More tokens, by name: `[http.admin_tokens] ci = "..."`. Writes are
    /// recorded under the name of the token that made them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub admin_tokens: std::collections::BTreeMap<String, String>,
}

impl HttpConfig {
    /// Every admin token as (name, token), reading `admin_token_file`.
    pub fn admin_tokens(&self) -> std::io::Result<Vec<(String, String)>> {
        let mut tokens: Vec<(String, String)> = self
            .admin_tokens
            .iter()
            .map(|(name, token)| (name.clone(), token.clone()))
            .collect();
        if let Some(token) = &self.admin_token {
            tokens.push(("admin".into(), token.clone()));
        }
        if let Some(path) = &self.admin_token_file {
            let token = std::fs::read_to_string(path)?;
            tokens.push(("admin".into(), token.trim_end().to_owned()));
        }
        Ok(tokens)
    }

    /// A problem with where a node of a fleet serves `listen`: beyond
    /// loopback, other nodes name it to the CLI by `advertise`, and the default
    /// (a wildcard read as loopback) would send the CLI, and its token, to
    /// whatever listens on the CLI's own host.
    pub fn unadvertised(&self) -> Option<Problem> {
        let listen: std::net::SocketAddr = self.listen.parse().ok()?;
        if listen.ip().is_loopback() || self.advertise.is_some() {
            return None;
        }
        Some(Problem {
            key: "http.advertise".to_owned(),
            message: format!(
                "http.listen {} is reached from other hosts, so set http.advertise to the URL they reach this node at (e.g. http://10.0.0.5:{}), or listen on loopback only",
                self.listen,
                listen.port()
            ),
        })
    }

    /// Where this node's admin API is reached from elsewhere.
    pub fn admin_url(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| format!("http://{}", reachable(&self.listen)))
    }
}

/// `listen`, with a wildcard address replaced by this host's loopback.
pub fn reachable(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(address) if address.ip().is_unspecified() => {
            let loopback: std::net::IpAddr = if address.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(loopback, address.port()).to_string()
        }
        _ => listen.to_owned(),
    }
}

fn default_listen() -> String {
    "127.0.0.1:9600".into()
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            advertise: None,
            admin_token: None,
            admin_token_file: None,
            admin_tokens: std::collections::BTreeMap::new(),
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
    /// Which events the group processes; the others are passed over (the
    /// checkpoint moves past them) and counted. Every event when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<EventFilter>,
    /// Where the events go.
    #[serde(default)]
    pub sink: SinkConfig,
    /// Destinations by event, tried in order before the sink's own template.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// What becomes of an event no route matches.
    #[serde(default)]
    pub unmatched: Unmatched,
    /// How its consumers read, checkpoint and handle failures; every key optional.
    #[serde(default)]
    pub consumer: ConsumerSettings,
    /// Each category source (and the log) is consumed as this many partitions,
    /// each a source of its own, allocated over the fleet like any other: a power
    /// of two from 1 (the whole category, one consumer) to 1,024.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
}

fn default_instances() -> usize {
    1
}

fn default_partitions() -> u32 {
    1
}

impl SubscriptionConfig {
    /// The consumer settings its consumers run with: `consumer`, and `filter`.
    pub fn consumer_settings(&self) -> ConsumerSettings {
        ConsumerSettings {
            filter: self.filter.clone(),
            ..self.consumer.clone()
        }
    }

    /// Its routes and what becomes of the events they miss.
    pub fn routing(&self) -> Routing {
        Routing {
            routes: self.routes.clone(),
            unmatched: self.unmatched,
        }
    }

    /// What its sink is built with besides the sink section.
    pub fn sink_context<'a>(&'a self, routing: &'a Routing) -> crate::sink::SinkContext<'a> {
        crate::sink::SinkContext {
            group: &self.group,
            partitions: self.partitions,
            routing,
        }
    }

    /// The sources the group's subscribers request: each category source and the
    /// log split into `partitions`; stream sources and partitions named in
    /// `sources` as they are. Empty when `partitions` is invalid (validation says
    /// why).
    pub fn allocated_sources(&self) -> Vec<Source> {
        let mut sources = Vec::new();
        for source in &self.sources {
            match source {
                Source::Log | Source::Category(_) => match source.split(self.partitions) {
                    Ok(parts) => sources.extend(parts),
                    Err(_) => return Vec::new(),
                },
                other => sources.push(other.clone()),
            }
        }
        sources.sort();
        sources.dedup();
        sources
    }
}
