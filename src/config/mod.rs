//! Configuration: figment layers (defaults < TOML file < `WEIR_*` environment < CLI
//! flags), extracted section by section so that every problem is reported at once,
//! then validated by a pure function. Connectivity is not checked here.
//!
//! This module holds the [`Config`] type, the CLI [`Overrides`], the problem and error
//! types and the small public API; the rest is split by concern:
//! - `sections`: the section types that live in config, with their defaults
//!   (the others live with their layer and are re-exported here);
//! - `load`: the figment layering, the `WEIR_*` environment and section extraction;
//! - `validate`: the pure checks, one per section;
//! - `redact`: hiding secrets in anything that prints configuration.

mod load;
mod redact;
mod sections;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::broker::{BrokerRole, BrokerSettings};
pub use crate::bus::{BusConfig, BusKind};
pub use crate::connect::{KafkaOptions, NatsOptions, NatsTls, is_secret_property};
pub use crate::ingest::IngestConfig;
pub use crate::lifecycle::LifecycleSettings;
pub use crate::sink::SinkConfig;
pub use crate::telemetry::logging::LogFormat;
pub use redact::redact_url;
pub use sections::{
    DemoConfig, HttpConfig, LogConfig, NodeConfig, StoreConfig, StoreKind, StoreTls,
    SubscriptionConfig, reachable,
};
#[cfg(feature = "postgres")]
pub(crate) use validate::{postgres_tls, store_tls_problem};

/// The embedded default: memory store and bus. Used when no config file is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/weir.toml");

/// Environment variables read by weir: `WEIR_SECTION__KEY` (double underscore nests).
pub const ENV_PREFIX: &str = "WEIR_";

/// The exit code for invalid configuration or usage (BSD `EX_USAGE`).
pub const EXIT_INVALID_CONFIG: i32 = 64;

/// The top-level keys: anything else is an unknown section, and only `WEIR_<SECTION>__*`
/// variables are read from the environment.
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
    "lifecycle",
    "subscriptions",
    "ingest",
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
    #[serde(default)]
    pub lifecycle: LifecycleSettings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<SubscriptionConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingest: Vec<IngestConfig>,
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
    /// The node id: configured, or generated once per process.
    pub fn node_id(&self) -> String {
        self.node.id.clone().unwrap_or_else(|| {
            static GENERATED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            GENERATED
                .get_or_init(|| format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
                .clone()
        })
    }
}
