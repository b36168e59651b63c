//! Sinks: processors that forward events elsewhere. [`stdout`] prints them,
//! `nats` publishes them to JetStream and `kafka` produces them to topics; all
//! of them acknowledge a batch only once every event in it is delivered, so a
//! consumer's checkpoint never runs ahead of the destination.

pub mod cloudevents;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
pub mod route;
pub mod stdout;
pub mod template;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::connect::{ConnectError, KafkaOptions, NatsOptions};
use crate::consumer::EventProcessor;

pub use cloudevents::Format;
#[cfg(feature = "kafka")]
pub use kafka::KafkaSink;
#[cfg(feature = "nats")]
pub use nats::NatsSink;
pub use route::{RouteConfig, RouteMatch, Routing, Unmatched};
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
        /// How events are put on the wire.
        #[serde(default)]
        format: Format,
        /// The CloudEvents `source` template; by default
        /// `weir://{category}/{stream}`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cloudevents_source: Option<String>,
    },
    /// Idempotent produces through `[kafka]`, keyed by stream.
    Kafka {
        /// Topic template, e.g. `events.{category}`.
        topic: String,
        /// How events are put on the wire.
        #[serde(default)]
        format: Format,
        /// The CloudEvents `source` template; by default
        /// `weir://{category}/{stream}`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cloudevents_source: Option<String>,
    },
}

impl SinkConfig {
    /// A NATS sink to `subject` with the other settings at their defaults.
    pub fn nats(subject: impl Into<String>) -> Self {
        SinkConfig::Nats {
            subject: subject.into(),
            stream: None,
            max_in_flight: default_max_in_flight(),
            format: Format::default(),
            cloudevents_source: None,
        }
    }

    /// A Kafka sink to `topic` with the other settings at their defaults.
    pub fn kafka(topic: impl Into<String>) -> Self {
        SinkConfig::Kafka {
            topic: topic.into(),
            format: Format::default(),
            cloudevents_source: None,
        }
    }
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

/// What a sink is built from besides its own section.
#[derive(Debug, Clone, Copy)]
pub struct SinkContext<'a> {
    /// The group it forwards for, which its metrics are labelled with.
    pub group: &'a str,
    /// How many partitions the group reads its categories as, which
    /// `{partition}` in a template counts in.
    pub partitions: u32,
    pub routing: &'a Routing,
}

impl Default for SinkContext<'_> {
    /// No group, one partition, no routes.
    fn default() -> Self {
        Self {
            group: "",
            partitions: 1,
            routing: &route::NO_ROUTES,
        }
    }
}

/// The sink `sink` describes, connected with the `[nats]` / `[kafka]` options.
pub async fn build(
    sink: &SinkConfig,
    nats: &NatsOptions,
    kafka: &KafkaOptions,
    context: SinkContext<'_>,
) -> Result<Arc<dyn EventProcessor>, SinkError> {
    let _ = (nats, kafka);
    if !context.routing.routes.is_empty() && matches!(sink, SinkConfig::Stdout) {
        return Err(SinkError::Invalid(
            "routes need a nats or kafka sink".into(),
        ));
    }
    Ok(match sink {
        SinkConfig::Stdout => Arc::new(StdoutSink::new()),
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka {
            topic,
            format,
            cloudevents_source,
        } => Arc::new(
            KafkaSink::connect_with(
                kafka,
                kafka::KafkaSinkSettings {
                    topic,
                    format: *format,
                    cloudevents_source: cloudevents_source.as_deref(),
                    context,
                },
            )
            .await?,
        ),
        #[cfg(feature = "nats")]
        SinkConfig::Nats {
            subject,
            stream,
            max_in_flight,
            format,
            cloudevents_source,
        } => Arc::new(
            NatsSink::connect_with(
                nats,
                nats::NatsSinkSettings {
                    subject,
                    stream: stream.as_deref(),
                    max_in_flight: *max_in_flight,
                    format: *format,
                    cloudevents_source: cloudevents_source.as_deref(),
                    context,
                },
            )
            .await?,
        ),
        #[allow(unreachable_patterns)]
        other => {
            return Err(SinkError::Invalid(format!(
                "this weir was built without the feature the {other:?} sink needs"
            )));
        }
    })
}
