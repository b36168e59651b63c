//! The `[kafka]` settings: how weir reaches Kafka, for the Kafka bus and the
//! Kafka sink alike. They exist whatever features are compiled in, so that a
//! config file is read the same way by every build.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// `[kafka]`: how to reach Kafka, for the Kafka bus and Kafka sinks.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaOptions {
    /// `host:port[,host:port...]` (librdkafka's `bootstrap.servers`).
    #[serde(default = "default_kafka_brokers")]
    pub brokers: String,
    /// Partitions of the topics weir creates when they are missing.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of the topics weir creates.
    #[serde(default = "default_replication")]
    pub replication: i32,
    /// Any librdkafka property, passed through as is: `security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `ssl.ca.location`, timeouts...
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

fn default_kafka_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn default_partitions() -> i32 {
    1
}
fn default_replication() -> i32 {
    1
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self {
            brokers: default_kafka_brokers(),
            partitions: default_partitions(),
            replication: default_replication(),
            properties: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(key, value)| {
                let shown = if is_secret_property(key) {
                    "<redacted>"
                } else {
                    value.as_str()
                };
                (key.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaOptions")
            .field("brokers", &self.brokers)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("properties", &properties)
            .finish()
    }
}

/// librdkafka properties that hold secrets and are never printed.
pub fn is_secret_property(key: &str) -> bool {
    key.contains("password") || key.contains("secret") || key.ends_with(".key.pem")
}
