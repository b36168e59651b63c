//! Ingest: messages of Kafka topics and NATS JetStream subjects appended into a
//! category of the store, exactly once, spread over the fleet.
//!
//! Each Kafka partition of an ingested topic and each NATS subject filter is an
//! ingest source ([`crate::event::IngestSource`]), requested by every node's
//! [`IngestSubscriber`] of the ingest's group and allocated by the coordinator
//! like any other source. The owner of a source claims it (the same claims and
//! grants that fence checkpoints), reads its bus from the position stored in
//! the store, and appends each batch together with its last position in one
//! transaction that only a current claim can commit ([`IngestStore`]).
//!
//! - `config`: the `[[ingest]]` section and its checks;
//! - `template`, `message`: what a message becomes (stream, name, key, payload);
//! - `store`: the [`IngestStore`] trait and its memory backend;
//! - `reader`: the consumer of one source; `subscriber`: one per node and group;
//! - `kafka`, `nats`: the two buses (features `kafka`, `nats`).

pub mod config;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod message;
#[cfg(feature = "nats")]
pub mod nats;
pub mod reader;
pub mod store;
pub mod subscriber;
pub mod template;

use std::sync::Arc;

pub use config::{IngestConfig, IngestFrom, IngestInto, PayloadMode};
pub use message::{Message, Shape};
pub use reader::{IngestBus, IngestContext, Transport};
pub use store::{IngestPosition, IngestStore, MemoryIngestStore};
pub use subscriber::IngestSubscriber;

use crate::connect::{KafkaOptions, NatsOptions};
use crate::event::{IngestSource, Source};

/// An ingest's bus, connected, and the sources it reads.
pub struct Connected {
    pub bus: Arc<dyn IngestBus>,
    pub sources: Vec<Source>,
}

/// Connects to the bus `config` reads from and lists its sources: each
/// partition of its Kafka topics (as they are now: a partition added later is
/// read after a restart), or each of its NATS subject filters.
pub async fn connect(
    config: &IngestConfig,
    nats: &NatsOptions,
    kafka: &KafkaOptions,
) -> Result<Connected, String> {
    let _ = (nats, kafka);
    let source = |key: String| IngestSource::new(config.name.as_str(), key).map(Source::Ingest);
    match &config.from {
        #[cfg(feature = "kafka")]
        IngestFrom::Kafka { topics } => {
            let bus = kafka::KafkaIngest::new(kafka, &config.name)?;
            let sources = bus
                .partitions(topics)
                .await?
                .into_iter()
                .map(|(topic, partition)| source(format!("{topic}@{partition}")))
                .collect::<Result<_, _>>()?;
            Ok(Connected {
                bus: Arc::new(bus),
                sources,
            })
        }
        #[cfg(feature = "nats")]
        IngestFrom::Nats { stream, subjects } => {
            let bus = nats::NatsIngest::connect(nats, stream, &config.name).await?;
            let sources = subjects
                .iter()
                .map(|subject| source(subject.clone()))
                .collect::<Result<_, _>>()?;
            Ok(Connected {
                bus: Arc::new(bus),
                sources,
            })
        }
        #[allow(unreachable_patterns)]
        _ => Err("this weir was built without the feature this ingest's bus needs".into()),
    }
}
