//! [`KafkaBus`]: the allocation bus over Kafka, plus what the Kafka sink shares
//! with it: the client settings built from `[kafka]` ([`client_config`]) and
//! creating missing topics ([`ensure_topics`]).
//!
//! Two topics per namespace. `{namespace}.decisions` holds decisions keyed by
//! group, so every part of one group's decisions lands on one partition in order;
//! it is created with `cleanup.policy=compact`, but nothing here relies on
//! compaction having run: readers start from the beginning of every partition and
//! keep the newest decision per group. `{namespace}.signals` holds signals, kept
//! for `bus.signal_retention`; a subscription reads it from where it ended when
//! the subscription started, so a signal reaches those subscribed when it was
//! published.
//!
//! Readers assign partitions themselves instead of joining a consumer group:
//! every observer must see every partition, group joins cost seconds, and weir
//! keeps no consumer offsets (a subscription always starts from the beginning of
//! the decisions). librdkafka still requires a `group.id`, which is set but never
//! joined.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use futures::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::message::{BusMessage, Decision, DecisionAssembler, Frame, decode_frame, encode};
use super::{AllocationBus, BusSubscription, Error, Result, encode_decision_parts};
use crate::config::{BusConfig, KafkaConfig};
use crate::telemetry::metrics;

/// How long connecting, creating topics and reading partition metadata may take
/// before the cluster counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a bus publish or a sink's delivery waits for the broker to store it
/// (librdkafka's `message.timeout.ms`, unless `[kafka.properties]` sets it).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`KafkaBus::retained`] may take to read the decisions topic.
pub const RETAINED_TIMEOUT: Duration = Duration::from_secs(60);

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// What a record costs beyond its key and value: the record batch header and the
/// record's own framing, with room to spare.
const RECORD_OVERHEAD: usize = 512;

/// Why weir could not set up its use of a Kafka cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("librdkafka refused the [kafka] settings: {0}; fix or remove that property")]
    InvalidProperty(String),
    #[error("cannot reach Kafka at {brokers}: {reason}")]
    Unreachable { brokers: String, reason: String },
    #[error("cannot create Kafka topic {topic:?}: {reason}")]
    Topic { topic: String, reason: String },
}

impl From<ClusterError> for Error {
    fn from(error: ClusterError) -> Self {
        match error {
            ClusterError::Unreachable { .. } => Error::Unavailable(error.to_string()),
            other => Error::Backend(other.to_string()),
        }
    }
}

/// librdkafka settings for `kafka`: `bootstrap.servers` from `brokers`, then every
/// `[kafka.properties]` entry as it is written.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    config.set("client.id", "weir");
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config
}

/// Sets `key` to `value` unless the operator set it in `[kafka.properties]`.
pub(crate) fn set_default(config: &mut ClientConfig, key: &str, value: &str) {
    if config.get(key).is_none() {
        config.set(key, value);
    }
}

/// A topic to create when it is missing, with its topic-level settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub settings: Vec<(String, String)>,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            settings: Vec::new(),
        }
    }

    /// The same topic with `key` (e.g. `retention.ms`) set to `value`.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((key.into(), value.into()));
        self
    }
}

/// Creates those of `topics` that do not exist yet, with `kafka.partitions`
/// partitions and `kafka.replication` replicas; existing topics are left as they
/// are. Existing topics are looked up first, so an account that may write to
/// topics but not create them works as long as the topics are there.
pub async fn ensure_topics(kafka: &KafkaConfig, topics: &[TopicSpec]) -> Result<(), ClusterError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(kafka)
        .create()
        .map_err(|error| property_error(kafka, error))?;
    let names: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
    let (admin, existing) = tokio::task::spawn_blocking(move || {
        let existing = existing_topics(&admin, &names);
        (DropOffRuntime::new(admin), existing)
    })
    .await
    .map_err(|error| unreachable(kafka, &error.to_string()))?;
    let existing = existing.map_err(|error| cluster_error(kafka, None, error))?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .filter(|topic| !existing.contains(&topic.name))
        .map(|topic| {
            topic.settings.iter().fold(
                NewTopic::new(
                    &topic.name,
                    kafka.partitions,
                    TopicReplication::Fixed(kafka.replication),
                ),
                |new, (key, value)| new.set(key, value),
            )
        })
        .collect();
    if new_topics.is_empty() {
        return Ok(());
    }
    let options = AdminOptions::new()
        .request_timeout(Some(CONNECT_TIMEOUT))
        .operation_timeout(Some(CONNECT_TIMEOUT));
    let created = tokio::time::timeout(
        CONNECT_TIMEOUT + Duration::from_secs(1),
        admin.create_topics(&new_topics, &options),
    )
    .await
    .map_err(|_| unreachable(kafka, "creating topics timed out"))?
    .map_err(|error| cluster_error(kafka, None, error))?;
    for result in created {
        match result {
            // Another node may have created it meanwhile.
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) if is_transient(code) => {
                return Err(unreachable(
                    kafka,
                    &format!("creating topic {topic:?} failed: {code}"),
                ));
            }
            Err((topic, code)) => {
                return Err(ClusterError::Topic {
                    topic,
                    reason: format!(
                        "{code}; create it yourself, or give weir's Kafka account the right to create topics"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Which of `names` the cluster has, by one metadata request each.
fn existing_topics(
    admin: &AdminClient<DefaultClientContext>,
    names: &[String],
) -> Result<BTreeSet<String>, KafkaError> {
    let mut existing = BTreeSet::new();
    for name in names {
        let metadata = admin.inner().fetch_metadata(Some(name), CONNECT_TIMEOUT)?;
        if metadata
            .topics()
            .iter()
            .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
        {
            existing.insert(name.clone());
        }
    }
    Ok(existing)
}

fn unreachable(kafka: &KafkaConfig, reason: &str) -> ClusterError {
    ClusterError::Unreachable {
        brokers: kafka.brokers.clone(),
        reason: reason.to_owned(),
    }
}

fn property_error(kafka: &KafkaConfig, error: KafkaError) -> ClusterError {
    match error {
        KafkaError::ClientConfig(..) => ClusterError::InvalidProperty(error.to_string()),
        other => cluster_error(kafka, None, other),
    }
}

/// Classifies a client error: transport problems mean the cluster is unreachable.
fn cluster_error(kafka: &KafkaConfig, topic: Option<&str>, error: KafkaError) -> ClusterError {
    match error.rdkafka_error_code() {
        Some(code) if is_transient(code) => unreachable(kafka, &error.to_string()),
        _ => match topic {
            Some(topic) => ClusterError::Topic {
                topic: topic.to_owned(),
                reason: error.to_string(),
            },
            None => unreachable(kafka, &error.to_string()),
        },
    }
}

/// Error codes that say the cluster could not be reached or did not answer in
/// time, as opposed to refusing what was asked.
pub(crate) fn is_transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::TimedOutQueue
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::BrokerNotAvailable
            | RDKafkaErrorCode::CoordinatorNotAvailable
            | RDKafkaErrorCode::NotCoordinator
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
    )
}

/// Holds a librdkafka client and closes it on a thread of its own when dropped:
/// closing waits for the client's threads and outstanding requests, which must
/// not hold up an async runtime's worker.
pub(crate) struct DropOffRuntime<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> DropOffRuntime<T> {
    pub(crate) fn new(client: T) -> Self {
        Self(Some(client))
    }
}

impl<T: Send + 'static> Deref for DropOffRuntime<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_ref().expect("taken only in drop")
    }
}

impl<T: Send + 'static> Drop for DropOffRuntime<T> {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            // If no thread can be started the client is closed here instead,
            // which is slower but still correct.
            let _ = std::thread::Builder::new()
                .name("weir-kafka-close".into())
                .spawn(move || drop(client));
        }
    }
}

/// The largest payload a producer configured by `config` sends: its
/// `message.max.bytes` less what the record around the payload needs.
pub(crate) fn payload_limit(config: &ClientConfig, key_len: usize) -> usize {
    let max = config
        .get("message.max.bytes")
        .and_then(|value| value.trim().parse::<usize>().ok())
        .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
    max.saturating_sub(RECORD_OVERHEAD + key_len)
}

/// Runs a blocking librdkafka call on the blocking pool.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> std::result::Result<T, Error> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|error| Error::Backend(format!("a Kafka client call failed: {error}")))
}

/// The allocation bus on a Kafka cluster. Clones share one producer.
#[derive(Clone)]
pub struct KafkaBus {
    inner: Arc<Inner>,
}

struct Inner {
    kafka: KafkaConfig,
    producer: DropOffRuntime<FutureProducer>,
    producer_config: ClientConfig,
    consumer_config: ClientConfig,
    decisions_topic: String,
    signals_topic: String,
    invalid: Arc<AtomicU64>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("brokers", &self.inner.kafka.brokers)
            .field("decisions_topic", &self.inner.decisions_topic)
            .field("signals_topic", &self.inner.signals_topic)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Connects to the cluster `kafka` names and creates the namespace's topics
    /// when they are missing. Fails with [`Error::Unavailable`] when no broker
    /// answers within [`CONNECT_TIMEOUT`].
    pub async fn connect(kafka: &KafkaConfig, bus: &BusConfig) -> Result<KafkaBus> {
        let decisions_topic = format!("{}.decisions", bus.namespace);
        let signals_topic = format!("{}.signals", bus.namespace);

        let mut producer_config = client_config(kafka);
        // Retries keep their order, so the parts of a decision and the signals of
        // a subscriber arrive as they were sent.
        set_default(&mut producer_config, "enable.idempotence", "true");
        set_default(
            &mut producer_config,
            "message.timeout.ms",
            &PUBLISH_TIMEOUT.as_millis().to_string(),
        );
        // A bus publish is awaited alone; batching would only delay it.
        set_default(&mut producer_config, "linger.ms", "0");
        let producer: FutureProducer = producer_config
            .create()
            .map_err(|error| Error::from(property_error(kafka, error)))?;
        let producer = DropOffRuntime::new(producer);

        let mut consumer_config = client_config(kafka);
        consumer_config.set("group.id", format!("{}.bus-reader", bus.namespace));
        consumer_config.set("enable.auto.commit", "false");
        consumer_config.set("enable.auto.offset.store", "false");
        consumer_config.set("enable.partition.eof", "false");
        // Signals should reach the coordinator promptly even on brokers that hold
        // an empty fetch for the whole wait.
        set_default(&mut consumer_config, "fetch.wait.max.ms", "100");
        // Catches a bad consumer-only property now rather than at subscribe.
        let _checked = DropOffRuntime::new(
            consumer_config
                .create::<BaseConsumer>()
                .map_err(|error| Error::from(property_error(kafka, error)))?,
        );

        let inner = Arc::new(Inner {
            kafka: kafka.clone(),
            producer,
            producer_config,
            consumer_config,
            decisions_topic,
            signals_topic,
            invalid: Arc::new(AtomicU64::new(0)),
        });
        inner.probe().await?;
        ensure_topics(
            kafka,
            &[
                TopicSpec::new(&inner.decisions_topic).with("cleanup.policy", "compact"),
                TopicSpec::new(&inner.signals_topic).with(
                    "retention.ms",
                    bus.signal_retention.as_millis().max(1).to_string(),
                ),
            ],
        )
        .await?;
        Ok(KafkaBus { inner })
    }

    /// The topic decisions are published to.
    pub fn decisions_topic(&self) -> &str {
        &self.inner.decisions_topic
    }

    /// The topic signals are published to.
    pub fn signals_topic(&self) -> &str {
        &self.inner.signals_topic
    }

    /// Sends `bytes` to the decisions topic as they are, keyed by `group`, so
    /// tests can deliver payloads that do not decode.
    pub async fn publish_raw(&self, group: &str, bytes: &[u8]) -> Result<()> {
        let topic = self.inner.decisions_topic.clone();
        self.inner.send(&topic, group, bytes).await
    }

    /// Payloads dropped because they did not decode, over all subscriptions and
    /// [`retained`](AllocationBus::retained) reads of this bus.
    pub fn invalid_messages(&self) -> u64 {
        self.inner.invalid.load(Ordering::Relaxed)
    }

    /// The counter behind [`KafkaBus::invalid_messages`], for metrics.
    pub fn invalid_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.inner.invalid)
    }
}

impl Inner {
    /// Fails with [`Error::Unavailable`] unless a broker answers a metadata request.
    async fn probe(self: &Arc<Self>) -> Result<()> {
        let inner = Arc::clone(self);
        blocking(move || {
            inner
                .producer
                .client()
                .fetch_metadata(None, CONNECT_TIMEOUT)
                .map(drop)
        })
        .await?
        .map_err(|error| {
            Error::Unavailable(format!(
                "no Kafka broker at {} answered within {} s ({error})",
                self.kafka.brokers,
                CONNECT_TIMEOUT.as_secs()
            ))
        })
    }

    fn payload_limit(&self, key: &str) -> usize {
        payload_limit(&self.producer_config, key.len())
    }

    /// Produces one record and waits until the broker has stored it.
    async fn send(&self, topic: &str, key: &str, payload: &[u8]) -> Result<()> {
        self.producer
            .send_result(FutureRecord::to(topic).key(key).payload(payload))
            .map_err(|(error, _)| self.publish_error(payload.len(), key, error))?
            .await
            .map_err(|_| Error::Closed)?
            .map(drop)
            .map_err(|(error, _)| self.publish_error(payload.len(), key, error))
    }

    fn publish_error(&self, size: usize, key: &str, error: KafkaError) -> Error {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => Error::TooLarge {
                size,
                limit: self.payload_limit(key),
            },
            Some(code) if is_transient(code) => Error::Unavailable(format!(
                "Kafka at {} did not store a bus message: {error}",
                self.kafka.brokers
            )),
            _ => Error::Backend(format!("Kafka refused a bus message: {error}")),
        }
    }

    /// The partitions of `topic`.
    fn partitions(&self, consumer: &impl Consumer, topic: &str) -> Result<Vec<i32>> {
        let metadata = consumer
            .fetch_metadata(Some(topic), CONNECT_TIMEOUT)
            .map_err(|error| self.read_error(topic, error))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(Error::Backend(format!(
                "Kafka topic {topic:?} has no partitions; was it deleted while weir ran? Restart the node to create it again"
            )));
        }
        Ok(partitions)
    }

    fn read_error(&self, topic: &str, error: KafkaError) -> Error {
        match error.rdkafka_error_code() {
            Some(code) if is_transient(code) => Error::Unavailable(format!(
                "reading Kafka topic {topic:?} at {} failed: {error}",
                self.kafka.brokers
            )),
            _ => Error::Backend(format!("reading Kafka topic {topic:?} failed: {error}")),
        }
    }

    /// Where each partition of `topic` ends now, as `(partition, low, high)`.
    fn watermarks(&self, consumer: &impl Consumer, topic: &str) -> Result<Vec<(i32, i64, i64)>> {
        self.partitions(consumer, topic)?
            .into_iter()
            .map(|partition| {
                consumer
                    .fetch_watermarks(topic, partition, CONNECT_TIMEOUT)
                    .map(|(low, high)| (partition, low, high))
                    .map_err(|error| self.read_error(topic, error))
            })
            .collect()
    }

    fn consumer<C: rdkafka::config::FromClientConfig>(&self) -> Result<C> {
        self.consumer_config
            .create()
            .map_err(|error| Error::from(property_error(&self.kafka, error)))
    }

    fn count_invalid(&self) {
        self.invalid.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::BUS_INVALID_MESSAGES).increment(1);
    }

    /// The newest complete decision per group in the decisions topic, read from
    /// the beginning up to where each partition ended when the read started.
    fn read_retained(&self, deadline: Instant) -> Result<Vec<Decision>> {
        let topic = self.decisions_topic.as_str();
        let consumer: BaseConsumer = self.consumer()?;
        let consumer = DropOffRuntime::new(consumer);
        // partition -> offset the read must reach
        let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
        let mut assignment = TopicPartitionList::new();
        for (partition, low, high) in self.watermarks(&*consumer, topic)? {
            if high > low {
                remaining.insert(partition, high);
                assignment
                    .add_partition_offset(topic, partition, Offset::Beginning)
                    .map_err(|error| self.read_error(topic, error))?;
            }
        }
        let mut assembler = DecisionAssembler::new();
        let mut newest: BTreeMap<String, Decision> = BTreeMap::new();
        if remaining.is_empty() {
            return Ok(Vec::new());
        }
        consumer
            .assign(&assignment)
            .map_err(|error| self.read_error(topic, error))?;
        while !remaining.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Unavailable(format!(
                    "reading the retained decisions from Kafka topic {topic:?} at {} took longer than {} s",
                    self.kafka.brokers,
                    RETAINED_TIMEOUT.as_secs()
                )));
            }
            match consumer.poll(left.min(Duration::from_millis(200))) {
                Some(Ok(message)) => {
                    let partition = message.partition();
                    if remaining
                        .get(&partition)
                        .is_some_and(|&high| message.offset() + 1 >= high)
                    {
                        remaining.remove(&partition);
                    }
                    metrics::bus_message("decision", "received");
                    match decode_frame(message.payload().unwrap_or_default()) {
                        Ok(Frame::Decision(part)) => {
                            if let Some(decision) = assembler.push(part) {
                                newest.insert(decision.group.clone(), decision);
                            }
                        }
                        Ok(Frame::Signal(_)) => {
                            tracing::debug!(topic, "ignored a signal in the decisions topic");
                        }
                        Err(error) => {
                            self.count_invalid();
                            tracing::warn!(
                                %error, topic, partition, offset = message.offset(),
                                "skipped a decisions record that cannot be read"
                            );
                        }
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, topic, "reading retained decisions: retrying");
                }
                None => {
                    // Records below the high watermark may be gone (compacted or
                    // past retention): the position says how far the read got.
                    if let Ok(positions) = consumer.position() {
                        for element in positions.elements() {
                            if let Offset::Offset(at) = element.offset()
                                && remaining
                                    .get(&element.partition())
                                    .is_some_and(|&high| at >= high)
                            {
                                remaining.remove(&element.partition());
                            }
                        }
                    }
                }
            }
        }
        Ok(newest.into_values().collect())
    }

    /// A consumer assigned every decisions partition from the beginning and every
    /// signals partition from where it ends now.
    fn subscribed_consumer(&self) -> Result<StreamConsumer> {
        let consumer: StreamConsumer = self.consumer()?;
        let mut assignment = TopicPartitionList::new();
        for partition in self.partitions(&consumer, &self.decisions_topic)? {
            assignment
                .add_partition_offset(&self.decisions_topic, partition, Offset::Beginning)
                .map_err(|error| self.read_error(&self.decisions_topic, error))?;
        }
        // Exact offsets rather than Offset::End, which librdkafka resolves only
        // once it starts fetching: a signal published between now and then would
        // be missed.
        for (partition, _, high) in self.watermarks(&consumer, &self.signals_topic)? {
            assignment
                .add_partition_offset(&self.signals_topic, partition, Offset::Offset(high))
                .map_err(|error| self.read_error(&self.signals_topic, error))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|error| self.read_error(&self.decisions_topic, error))?;
        Ok(consumer)
    }
}

/// One subscription's consumer and what it needs to label what it reads.
struct Reader {
    consumer: DropOffRuntime<StreamConsumer>,
    decisions_topic: String,
}

impl Reader {
    async fn next(&self) -> Vec<u8> {
        loop {
            match self.consumer.recv().await {
                Ok(message) => {
                    let kind = if message.topic() == self.decisions_topic {
                        "decision"
                    } else {
                        "signal"
                    };
                    metrics::bus_message(kind, "received");
                    return message.payload().unwrap_or_default().to_vec();
                }
                Err(error) => {
                    // librdkafka reconnects by itself; these are reports, and
                    // waiting a little keeps a down broker from flooding the log.
                    tracing::warn!(%error, "reading the Kafka allocation bus failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

#[async_trait]
impl AllocationBus for KafkaBus {
    async fn publish(&self, message: &BusMessage) -> Result<()> {
        let inner = &self.inner;
        match message {
            BusMessage::Decision(decision) => {
                let key = decision.group.as_str();
                let limit = inner.payload_limit(key);
                let parts = encode_decision_parts(decision, limit);
                if let Some(part) = parts.iter().find(|part| part.len() > limit) {
                    return Err(Error::TooLarge {
                        size: part.len(),
                        limit,
                    });
                }
                let sends = parts
                    .iter()
                    .map(|part| inner.send(&inner.decisions_topic, key, part));
                // Pipelined; Ok only once every part is stored.
                for result in join_all(sends).await {
                    result?;
                    metrics::bus_message("decision", "sent");
                }
                Ok(())
            }
            BusMessage::Signal(signal) => {
                let key = signal.group();
                let payload = encode(message);
                let limit = inner.payload_limit(key);
                if payload.len() > limit {
                    return Err(Error::TooLarge {
                        size: payload.len(),
                        limit,
                    });
                }
                inner.send(&inner.signals_topic, key, &payload).await?;
                metrics::bus_message("signal", "sent");
                Ok(())
            }
        }
    }

    async fn subscribe(&self) -> Result<BusSubscription> {
        let inner = Arc::clone(&self.inner);
        let consumer = blocking(move || inner.subscribed_consumer()).await??;
        let reader = Reader {
            consumer: DropOffRuntime::new(consumer),
            decisions_topic: self.inner.decisions_topic.clone(),
        };
        let payloads = futures::stream::unfold(reader, |reader| async move {
            let payload = reader.next().await;
            Some((payload, reader))
        })
        .boxed();
        Ok(BusSubscription::new(
            payloads,
            Arc::clone(&self.inner.invalid),
        ))
    }

    async fn retained(&self) -> Result<Vec<Decision>> {
        let inner = Arc::clone(&self.inner);
        let deadline = Instant::now() + RETAINED_TIMEOUT;
        blocking(move || inner.read_retained(deadline)).await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_pass_through_after_the_brokers() {
        let kafka = KafkaConfig {
            brokers: "k1:9092,k2:9092".into(),
            properties: [
                ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
                ("client.id".to_owned(), "billing".to_owned()),
            ]
            .into(),
            ..KafkaConfig::default()
        };
        let mut config = client_config(&kafka);
        assert_eq!(config.get("bootstrap.servers"), Some("k1:9092,k2:9092"));
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("client.id"), Some("billing"));
        set_default(&mut config, "client.id", "other");
        set_default(&mut config, "linger.ms", "0");
        assert_eq!(config.get("client.id"), Some("billing"));
        assert_eq!(config.get("linger.ms"), Some("0"));
    }

    #[test]
    fn the_payload_limit_follows_message_max_bytes() {
        let mut config = ClientConfig::new();
        assert_eq!(
            payload_limit(&config, 10),
            DEFAULT_MESSAGE_MAX_BYTES - RECORD_OVERHEAD - 10
        );
        config.set("message.max.bytes", "4000");
        assert_eq!(payload_limit(&config, 0), 4000 - RECORD_OVERHEAD);
    }

    #[test]
    fn unreachable_clusters_are_retryable_bus_errors() {
        let error = Error::from(ClusterError::Unreachable {
            brokers: "127.0.0.1:1".into(),
            reason: "timed out".into(),
        });
        assert!(error.is_retryable());
        let error = Error::from(ClusterError::InvalidProperty("bad".into()));
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("fix or remove"), "{error}");
    }
}
