//! Sinks: processors that forward events elsewhere. [`stdout`] prints them,
//! `nats` publishes them to JetStream and `kafka` produces them to topics; all
//! of them acknowledge a batch only once every event in it is delivered, so a
//! consumer's checkpoint never runs ahead of the destination.

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
pub mod stdout;
pub mod template;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::connect::{ConnectError, KafkaOptions, NatsOptions};
use crate::consumer::EventProcessor;

#[cfg(feature = "kafka")]
pub use kafka::KafkaSink;
#[cfg(feature = "nats")]
pub use nats::NatsSink;
pub use stdout::StdoutSink;
pub use template::{Template, TemplateError};

/// `sink = { kind = ... }` of a subscription.
///
/// Templates name where each event goes, with `{category}`, `{stream}` (the
/// stream's id within its category) and `{name}` (the event's name) filled in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON lines on standard output.
    #[default]
    Stdout,
    /// JetStream publishes through `[nats]`.
    Nats {
        /// Subject template, e.g. `events.{category}.{stream}`; values are encoded
        /// into valid subject tokens.
        subject: String,
        /// A JetStream stream to create when missing, capturing the template's
        /// subjects. Leave unset when the stream is managed elsewhere.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<String>,
        /// Publishes awaiting their acknowledgement at once.
        #[serde(default = "default_max_in_flight")]
        max_in_flight: usize,
    },
    /// Idempotent produces through `[kafka]`, keyed by stream.
    Kafka {
        /// Topic template, e.g. `events.{category}`.
        topic: String,
    },
}

pub(crate) fn default_max_in_flight() -> usize {
    1024
}

/// Why a sink could not be built. Failures while forwarding are
/// [`ProcessError`](crate::consumer::ProcessError)s and go through the
/// consumer's error policy instead.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(
        "cannot reach the sink's destination: {0}; check the connection settings and that the server is running"
    )]
    Unavailable(String),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("the sink is misconfigured: {0}")]
    Invalid(String),
}

impl From<ConnectError> for SinkError {
    fn from(error: ConnectError) -> Self {
        match error {
            ConnectError::Unavailable(reason) => SinkError::Unavailable(reason),
            ConnectError::Invalid(reason) => SinkError::Invalid(reason),
        }
    }
}

/// The sink `sink` describes, connected with the `[nats]` / `[kafka]` options,
/// for a group that reads its categories as `partitions` partitions (which
/// `{partition}` in a template counts in).
pub async fn build(
    sink: &SinkConfig,
    nats: &NatsOptions,
    kafka: &KafkaOptions,
    partitions: u32,
) -> Result<Arc<dyn EventProcessor>, SinkError> {
    let _ = (nats, kafka, partitions);
    Ok(match sink {
        SinkConfig::Stdout => Arc::new(StdoutSink::new()),
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka { topic } => Arc::new(
            KafkaSink::connect(kafka, topic)
                .await?
                .with_partitions(partitions),
        ),
        #[cfg(feature = "nats")]
        SinkConfig::Nats {
            subject,
            stream,
            max_in_flight,
        } => Arc::new(
            NatsSink::connect(nats, subject, stream.as_deref(), *max_in_flight)
                .await?
                .with_partitions(partitions),
        ),
        #[allow(unreachable_patterns)]
        other => {
            return Err(SinkError::Invalid(format!(
                "this weir was built without the feature the {other:?} sink needs"
            )));
        }
    })
}
