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

use crate::config::{Config, SinkConfig};
use crate::consumer::EventProcessor;

#[cfg(feature = "kafka")]
pub use kafka::KafkaSink;
#[cfg(feature = "nats")]
pub use nats::NatsSink;
pub use stdout::StdoutSink;
pub use template::{Template, TemplateError};

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

/// The sink `sink` describes, connected with `config`'s `[nats]` / `[kafka]`
/// settings.
pub async fn build(
    sink: &SinkConfig,
    config: &Config,
) -> Result<Arc<dyn EventProcessor>, SinkError> {
    let _ = config;
    Ok(match sink {
        SinkConfig::Stdout => Arc::new(StdoutSink::new()),
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka { topic } => Arc::new(KafkaSink::connect(&config.kafka, topic).await?),
        #[cfg(feature = "nats")]
        SinkConfig::Nats {
            subject,
            stream,
            max_in_flight,
        } => Arc::new(
            NatsSink::connect(&config.nats, subject, stream.as_deref(), *max_in_flight).await?,
        ),
        #[allow(unreachable_patterns)]
        other => {
            return Err(SinkError::Invalid(format!(
                "this weir was built without the feature the {other:?} sink needs"
            )));
        }
    })
}
