//! Ingest from Kafka: one source per partition of the ingested topics. A
//! reader assigns itself its partition (no consumer group, no rebalances: the
//! coordinator is what moves partitions between nodes) and starts at the
//! offset after the one stored in the store; it commits nothing to Kafka.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::message::Message;
use super::reader::{IngestBus, Transport};
use crate::connect::KafkaOptions;
use crate::connect::kafka_client::{DropOffRuntime, client_config, property_error, set_default};
use crate::event::IngestSource;

/// How long a metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a reader asks the broker where its partition ends, for its lag.
const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// Kafka, as the ingest named `name` reads it.
pub struct KafkaIngest {
    config: ClientConfig,
}

impl KafkaIngest {
    /// Checks the `[kafka]` options by building a client with them.
    pub fn new(kafka: &KafkaOptions, name: &str) -> Result<Self, String> {
        let mut config = client_config(kafka);
        // Required by librdkafka, never joined: partitions are assigned.
        config.set("group.id", format!("weir.ingest.{name}"));
        config.set("enable.auto.commit", "false");
        config.set("enable.auto.offset.store", "false");
        config.set("enable.partition.eof", "false");
        set_default(&mut config, "fetch.wait.max.ms", "100");
        let _checked = DropOffRuntime::new(
            config
                .create::<BaseConsumer>()
                .map_err(|error| property_error(kafka, error).to_string())?,
        );
        Ok(Self { config })
    }

    /// Every partition of `topics`, as `(topic, partition)`: the sources.
    pub async fn partitions(&self, topics: &[String]) -> Result<Vec<(String, i32)>, String> {
        let config = self.config.clone();
        let topics = topics.to_vec();
        tokio::task::spawn_blocking(move || {
            let consumer = DropOffRuntime::new(
                config.create::<BaseConsumer>().map_err(|e| e.to_string())?,
            );
            let mut found = Vec::new();
            for topic in topics {
                let metadata = consumer
                    .fetch_metadata(Some(&topic), REQUEST_TIMEOUT)
                    .map_err(|e| format!("cannot read the metadata of Kafka topic {topic:?}: {e}"))?;
                let partitions: Vec<i32> = metadata
                    .topics()
                    .iter()
                    .filter(|t| t.name() == topic && t.error().is_none())
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect();
                if partitions.is_empty() {
                    return Err(format!(
                        "Kafka topic {topic:?} does not exist or has no partitions: create it, then start weir"
                    ));
                }
                found.extend(partitions.into_iter().map(|p| (topic.clone(), p)));
            }
            Ok(found)
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

#[async_trait]
impl IngestBus for KafkaIngest {
    async fn open(
        &self,
        source: &IngestSource,
        after: Option<u64>,
    ) -> Result<Box<dyn Transport>, String> {
        let (topic, partition) = source
            .kafka_partition()
            .ok_or_else(|| format!("{source} names no Kafka partition"))?;
        let consumer: StreamConsumer = self.config.create().map_err(|e| e.to_string())?;
        let start = after.map_or(Offset::Beginning, |p| {
            Offset::Offset(i64::try_from(p).unwrap_or(i64::MAX).saturating_add(1))
        });
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, start)
            .map_err(|e| e.to_string())?;
        consumer.assign(&assignment).map_err(|e| e.to_string())?;
        Ok(Box::new(KafkaReader {
            consumer: Arc::new(DropOffRuntime::new(consumer)),
            topic: topic.to_owned(),
            partition,
            measured: None,
            near_end: true,
        }))
    }
}

struct KafkaReader {
    consumer: Arc<DropOffRuntime<StreamConsumer>>,
    topic: String,
    partition: i32,
    /// When the lag was last measured.
    measured: Option<Instant>,
    /// The last batch was smaller than asked for: the reader is near the
    /// partition's end, and its lag is measured after every batch.
    near_end: bool,
}

fn owned(message: &rdkafka::message::BorrowedMessage<'_>) -> Message {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .filter_map(|h| {
                    Some((h.key.to_owned(), String::from_utf8(h.value?.to_vec()).ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    Message {
        position: u64::try_from(message.offset()).unwrap_or(0),
        key: message.key().map(<[u8]>::to_vec),
        topic: Some(message.topic().to_owned()),
        partition: Some(message.partition()),
        subject: None,
        headers,
        payload: message.payload().unwrap_or_default().to_vec(),
    }
}

#[async_trait]
impl Transport for KafkaReader {
    async fn next(&mut self, max: usize) -> Result<Vec<Message>, String> {
        let first = self.consumer.recv().await.map_err(|e| e.to_string())?;
        let mut messages = vec![owned(&first)];
        drop(first);
        // Then whatever librdkafka has fetched already, up to a batch.
        while messages.len() < max {
            match self.consumer.recv().now_or_never() {
                Some(Ok(message)) => messages.push(owned(&message)),
                _ => break,
            }
        }
        self.near_end = messages.len() < max;
        Ok(messages)
    }

    async fn lag(&mut self, position: Option<u64>) -> Option<u64> {
        if !self.near_end && self.measured.is_some_and(|at| at.elapsed() < LAG_INTERVAL) {
            return None;
        }
        self.measured = Some(Instant::now());
        let (consumer, topic, partition) = (
            Arc::clone(&self.consumer),
            self.topic.clone(),
            self.partition,
        );
        let (low, high) = tokio::task::spawn_blocking(move || {
            consumer.fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)
        })
        .await
        .ok()?
        .ok()?;
        let next = position.map_or(low, |p| {
            i64::try_from(p).unwrap_or(i64::MAX).saturating_add(1)
        });
        u64::try_from(high.saturating_sub(next)).ok()
    }
}
