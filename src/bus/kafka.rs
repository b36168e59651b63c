//! [`KafkaBus`]: the allocation bus over Kafka, plus what the Kafka sink shares
//! with it: the client settings built from `[kafka]` ([`client_config`]) and
//! creating missing topics ([`ensure_topics`]).
//!
//! Two topics per namespace. `{namespace}.decisions` holds decisions, each part
//! keyed by group and part number (`GROUP#PART`), so that compaction keeps the
//! newest decision's every part; all parts of a group go to one partition (chosen
//! from the group's name), in order. A decision that changes little is a delta
//! ([`super::chain`]) keyed `GROUP#delta.EPOCH.REVISION`; the next whole decision
//! tombstones those keys and the keys of the parts it no longer has. The topic is created
//! with `cleanup.policy=compact`, and a node warns at start if an existing one is
//! not compacted. Nothing here relies on compaction having run: readers start from
//! the beginning of every partition and keep the newest decision per group.
//!
//! What a start-up reads is bounded by the decisions that changed since the last
//! compaction, not by the fleet's age: an unchanged decision is not written again
//! at every refresh (a refresh is a digest, sent with the signals), only every
//! [`REPUBLISH_UNCHANGED_AFTER`]. Observers cannot
//! miss a decision here (they read the topic from the beginning and then follow
//! it, and compaction keeps the newest record of every key); the slow republish
//! only restores a topic that was deleted and made again. `{namespace}.signals` holds signals, kept
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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use futures::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::BusConfig;
use super::chain::{Chain, Publication};
use super::message::{BusMessage, Decision, DecisionReader, Digest, Frame, decode_frame, encode};
use super::{AllocationBus, BusMeter, BusSubscription, Error, Result};
use crate::connect::KafkaOptions;
use crate::connect::kafka_client::{
    CONNECT_TIMEOUT, ClusterError, DropOffRuntime, PUBLISH_TIMEOUT, TopicSpec, client_config,
    ensure_topics, is_transient, payload_limit, property_error, set_default,
};
use crate::metrics;

impl From<ClusterError> for Error {
    fn from(error: ClusterError) -> Self {
        match error {
            ClusterError::Unreachable { .. } => Error::Unavailable(error.to_string()),
            other => Error::Backend(other.to_string()),
        }
    }
}

/// How long the readiness check waits for a broker's answer: it is polled, and a
/// node whose bus takes longer is not ready anyway.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an unchanged decision goes without being written again. Refreshes in
/// between are skipped: they would only grow the topic that every start reads.
pub const REPUBLISH_UNCHANGED_AFTER: Duration = Duration::from_secs(60 * 60);

/// How long [`KafkaBus::retained`] may take to read the decisions topic.
pub const RETAINED_TIMEOUT: Duration = Duration::from_secs(60);

/// The `cleanup.policy` of `topic`, as the cluster describes it.
async fn cleanup_policy(kafka: &KafkaOptions, topic: &str) -> std::result::Result<String, String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        client_config(kafka).create().map_err(|e| e.to_string())?;
    let admin = DropOffRuntime::new(admin);
    let options = AdminOptions::new().request_timeout(Some(CONNECT_TIMEOUT));
    let described = tokio::time::timeout(
        CONNECT_TIMEOUT,
        admin.describe_configs([&ResourceSpecifier::Topic(topic)], &options),
    )
    .await
    .map_err(|_| "describing the topic timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let resource = described
        .into_iter()
        .next()
        .ok_or("no description came back")?
        .map_err(|code| code.to_string())?;
    Ok(resource
        .get("cleanup.policy")
        .and_then(|entry| entry.value.clone())
        .unwrap_or_else(|| "delete".to_owned()))
}

/// Warns when the decisions topic is not compacted: then nothing removes
/// superseded decisions, and every start reads more of them.
fn warn_unless_compacted(topic: &str, policy: std::result::Result<String, String>) {
    match policy {
        Ok(policy) if policy.split(',').any(|p| p.trim() == "compact") => {}
        Ok(policy) => tracing::warn!(
            topic, %policy,
            "the decisions topic is not compacted, so superseded decisions are never removed and every node start reads them all; set cleanup.policy=compact on it"
        ),
        Err(error) => tracing::warn!(
            topic, %error,
            "cannot read the decisions topic's cleanup.policy; it should be compact, or every node start reads every decision ever published"
        ),
    }
}

/// The partition of the decisions topic that holds `group`'s decisions: a
/// stable hash (FNV-1a) of its name, so every node agrees.
fn partition_of(group: &str, partitions: i32) -> i32 {
    let hash = group.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    i32::try_from(hash % u64::from(partitions.max(1).unsigned_abs())).unwrap_or(0)
}

/// The key of part `part` of `group`'s decisions. The part number comes last and
/// holds no `#`, so keys of different groups never collide.
fn part_key(group: &str, part: u32) -> String {
    format!("{group}#{part}")
}

/// The key of the delta making decision `version` of `group`; like a part key,
/// its last `#`-separated field is never a number.
fn delta_key(group: &str, (epoch, revision): (u64, u64)) -> String {
    format!("{group}#delta.{epoch}.{revision}")
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
    kafka: KafkaOptions,
    producer: DropOffRuntime<FutureProducer>,
    producer_config: ClientConfig,
    consumer_config: ClientConfig,
    decisions_topic: String,
    signals_topic: String,
    meter: Arc<BusMeter>,
    /// Partitions of the decisions topic when the bus connected.
    decision_partitions: i32,
    /// Per group, what this bus last wrote or read of its decisions.
    written: std::sync::Mutex<BTreeMap<String, Written>>,
    /// Decision records read by retained reads, for tests of what a start costs.
    records_read: AtomicU64,
}

/// What the decisions topic holds of one group, as far as this bus knows.
#[derive(Debug, Default, Clone)]
struct Written {
    /// The version this bus published last, and when.
    published: Option<((u64, u64), Instant)>,
    /// The most parts any decision of the group had (their keys may hold records).
    parts: u32,
    /// The decision this bus published last and the deltas since its snapshot.
    chain: Option<Chain>,
    /// When this bus last wrote a whole decision of the group.
    snapshot_at: Option<Instant>,
    /// Keys of deltas the topic may hold: tombstoned with the next snapshot.
    delta_keys: BTreeSet<String>,
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
    pub async fn connect(kafka: &KafkaOptions, bus: &BusConfig) -> Result<KafkaBus> {
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
            meter: BusMeter::new(),
            decision_partitions: 1,
            written: std::sync::Mutex::new(BTreeMap::new()),
            records_read: AtomicU64::new(0),
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
        let mut inner = inner;
        let probe = Arc::clone(&inner);
        let partitions = blocking(move || {
            let topic = probe.decisions_topic.as_str();
            probe.partitions(probe.producer.client(), topic, CONNECT_TIMEOUT)
        })
        .await??
        .len();
        if let Some(inner) = Arc::get_mut(&mut inner) {
            inner.decision_partitions = i32::try_from(partitions).unwrap_or(i32::MAX).max(1);
        }
        warn_unless_compacted(
            &inner.decisions_topic,
            cleanup_policy(kafka, &inner.decisions_topic).await,
        );
        Ok(KafkaBus { inner })
    }

    /// Decision records read by [`retained`](AllocationBus::retained) calls so
    /// far, tombstones included: what starting a coordinator costs.
    #[cfg(any(test, feature = "testing"))]
    pub fn retained_records_read(&self) -> u64 {
        self.inner.records_read.load(Ordering::Relaxed)
    }

    /// The topic decisions are published to.
    pub fn decisions_topic(&self) -> &str {
        &self.inner.decisions_topic
    }

    /// The topic signals are published to.
    pub fn signals_topic(&self) -> &str {
        &self.inner.signals_topic
    }

    /// Sends `bytes` as they are to the partition of the decisions topic that
    /// holds `group`'s decisions, keyed by `group`, so tests can deliver payloads
    /// that do not decode in order with the group's decisions. (The key alone
    /// left the partition to the client's hash, so with several partitions a
    /// payload could be read after decisions published later.)
    #[cfg(any(test, feature = "testing"))]
    pub async fn publish_raw(&self, group: &str, bytes: &[u8]) -> Result<()> {
        self.inner.send_keyed(group, group, Some(bytes)).await
    }

    /// Payloads dropped because they did not decode, over all subscriptions and
    /// [`retained`](AllocationBus::retained) reads of this bus.
    pub fn invalid_messages(&self) -> u64 {
        self.inner.meter.invalid().load(Ordering::Relaxed)
    }

    /// The counter behind [`KafkaBus::invalid_messages`], for metrics.
    pub fn invalid_counter(&self) -> Arc<AtomicU64> {
        self.inner.meter.invalid()
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
        self.send_record(FutureRecord::to(topic).key(key).payload(payload))
            .await
    }

    /// Produces one decision record (a tombstone without `payload`) to the
    /// partition of `group`, and waits until the broker has stored it.
    async fn send_decision(&self, group: &str, part: u32, payload: Option<&[u8]>) -> Result<()> {
        self.send_keyed(group, &part_key(group, part), payload)
            .await
    }

    /// Produces one record of `group` keyed `key` (a tombstone without
    /// `payload`) to the group's partition of the decisions topic.
    async fn send_keyed(&self, group: &str, key: &str, payload: Option<&[u8]>) -> Result<()> {
        let record = FutureRecord::to(&self.decisions_topic)
            .key(key)
            .partition(partition_of(group, self.decision_partitions));
        match payload {
            Some(payload) => self.send_record(record.payload(payload)).await,
            None => self.send_record::<[u8]>(record).await,
        }
    }

    async fn send_record<P: rdkafka::message::ToBytes + ?Sized>(
        &self,
        record: FutureRecord<'_, str, P>,
    ) -> Result<()> {
        let size = record.payload.map_or(0, |p| p.to_bytes().len());
        let key = record.key.unwrap_or_default().to_owned();
        self.producer
            .send_result(record)
            .map_err(|(error, _)| self.publish_error(size, &key, error))?
            .await
            .map_err(|_| Error::Closed)?
            .map(drop)
            .map_err(|(error, _)| self.publish_error(size, &key, error))
    }

    /// Publishes `decision` unless this bus wrote the same version within
    /// [`REPUBLISH_UNCHANGED_AFTER`]; tombstones the keys of parts an earlier
    /// decision of the group had and this one has not.
    async fn publish_decision(&self, decision: &Decision) -> Result<()> {
        let group = decision.group.as_str();
        let limit = self.payload_limit(&part_key(group, u32::MAX));
        let known = self.written(group);
        if known.published.is_some_and(|(version, at)| {
            version == decision.version() && at.elapsed() < REPUBLISH_UNCHANGED_AFTER
        }) {
            return Ok(());
        }
        // A change is written only on top of the decision this bus wrote last.
        let chain = known.chain.filter(|chain| {
            known
                .published
                .is_some_and(|(version, _)| version == chain.decision.version())
        });
        self.forget_chain(group);
        let publication = Chain::plan(chain.as_ref(), decision, limit);
        let parts = publication.payloads();
        if let Some(part) = parts.iter().find(|part| part.len() > limit) {
            return Err(Error::TooLarge {
                size: part.len(),
                limit,
            });
        }
        if let Publication::Delta(payload) = &publication {
            let key = delta_key(group, decision.version());
            self.send_keyed(group, &key, Some(payload)).await?;
            metrics::bus_message("delta", "sent");
            self.note_published(decision, &publication, chain, known.parts, Some(key));
            return Ok(());
        }
        let count = u32::try_from(parts.len()).unwrap_or(u32::MAX);
        let sends = (1..)
            .zip(parts)
            .map(|(part, payload)| self.send_decision(group, part, Some(payload)));
        // Pipelined; Ok only once every part is stored.
        for result in join_all(sends).await {
            result?;
            metrics::bus_message("decision", "sent");
        }
        // Parts beyond this decision's and the deltas before it are superseded:
        // tombstoned for compaction.
        for part in count + 1..=known.parts {
            self.send_decision(group, part, None).await?;
        }
        for key in &known.delta_keys {
            self.send_keyed(group, key, None).await?;
        }
        // The bare group key is where weir kept whole decisions before.
        if known.published.is_none() {
            // Best effort: a leftover costs a start one more record to read.
            let legacy = FutureRecord::<str, [u8]>::to(&self.decisions_topic).key(group);
            if let Err(error) = self.send_record(legacy).await {
                tracing::debug!(%error, group, "could not tombstone the group's old decision key");
            }
        }
        self.note_published(decision, &publication, None, count, None);
        Ok(())
    }

    /// Notes that `publication` of `decision` is stored, after `chain`; the
    /// topic holds part keys up to `parts` and, for a delta, `delta_key`.
    fn note_published(
        &self,
        decision: &Decision,
        publication: &Publication,
        chain: Option<Chain>,
        parts: u32,
        delta_key: Option<String>,
    ) {
        let mut written = self.lock_written();
        let entry = written.entry(decision.group.clone()).or_default();
        entry.published = Some((decision.version(), Instant::now()));
        entry.parts = parts;
        entry.chain = Some(Chain::after(chain, decision, publication));
        match delta_key {
            Some(key) => {
                entry.delta_keys.insert(key);
            }
            None => {
                entry.delta_keys.clear();
                entry.snapshot_at = Some(Instant::now());
            }
        }
    }

    /// Until a publication succeeds, the next is a snapshot.
    fn forget_chain(&self, group: &str) {
        if let Some(entry) = self.lock_written().get_mut(group) {
            entry.chain = None;
        }
    }

    fn lock_written(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Written>> {
        self.written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// After a digest: writes the decision it names again, whole, if this bus
    /// wrote it and has written no whole decision of the group for
    /// [`REPUBLISH_UNCHANGED_AFTER`], which restores a topic that was deleted and
    /// made again.
    async fn refresh(&self, digest: &Digest) -> Result<()> {
        let known = self.written(&digest.group);
        let stale = known
            .snapshot_at
            .is_some_and(|at| at.elapsed() >= REPUBLISH_UNCHANGED_AFTER);
        match known.chain {
            Some(chain) if stale && chain.decision.version() == digest.version() => {
                self.forget_chain(&digest.group);
                if let Some(entry) = self.lock_written().get_mut(&digest.group) {
                    entry.published = None;
                }
                self.publish_decision(&chain.decision).await
            }
            _ => Ok(()),
        }
    }

    /// What this bus knows the decisions topic holds of `group`.
    fn written(&self, group: &str) -> Written {
        self.written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(group)
            .cloned()
            .unwrap_or_default()
    }

    /// Notes that the topic holds part records up to `parts` for `group`.
    fn saw_parts(&self, group: &str, parts: u32) {
        let mut written = self
            .written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = written.entry(group.to_owned()).or_default();
        entry.parts = entry.parts.max(parts);
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

    /// The partitions of `topic`, asking for at most `timeout`.
    fn partitions<C: rdkafka::client::ClientContext>(
        &self,
        client: &rdkafka::client::Client<C>,
        topic: &str,
        timeout: Duration,
    ) -> Result<Vec<i32>> {
        let metadata = client
            .fetch_metadata(Some(topic), timeout)
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
        self.partitions(consumer.client(), topic, CONNECT_TIMEOUT)?
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

    /// Counts a payload of a retained read that cannot be read, in the bus's own
    /// count only: the node's metric is the subscriptions' to count.
    fn count_invalid(&self) {
        self.meter.invalid().fetch_add(1, Ordering::Relaxed);
    }

    /// A consumer assigned every decisions partition from the beginning and every
    /// signals partition from where it ends now.
    fn subscribed_consumer(&self) -> Result<StreamConsumer> {
        let consumer: StreamConsumer = self.consumer()?;
        let mut assignment = TopicPartitionList::new();
        for partition in
            self.partitions(consumer.client(), &self.decisions_topic, CONNECT_TIMEOUT)?
        {
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

/// One subscription's consumer.
struct Reader {
    consumer: DropOffRuntime<StreamConsumer>,
}

impl Reader {
    async fn next(&self) -> Vec<u8> {
        loop {
            match self.consumer.recv().await {
                // A record without a payload is a tombstone: compaction's cue to
                // drop the decision part of its key, nothing to read.
                Ok(message) => match message.payload() {
                    Some(payload) => return payload.to_vec(),
                    None => continue,
                },
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
    /// One metadata request for the decisions topic: answers whether a broker
    /// is reachable and still has the topic.
    async fn check(&self) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let topic = inner.decisions_topic.as_str();
            inner
                .partitions(inner.producer.client(), topic, CHECK_TIMEOUT)
                .map(drop)
        })
        .await?
    }

    async fn publish(&self, message: &BusMessage) -> Result<()> {
        let inner = &self.inner;
        match message {
            BusMessage::Decision(decision) => inner.publish_decision(decision).await,
            // Digests travel with the signals: news for those listening now.
            BusMessage::Signal(_) | BusMessage::Digest(_) => {
                let (kind, key) = match message {
                    BusMessage::Digest(digest) => ("digest", digest.group.as_str()),
                    BusMessage::Signal(signal) => ("signal", signal.group()),
                    BusMessage::Decision(_) => unreachable!("matched above"),
                };
                let payload = encode(message);
                let limit = inner.payload_limit(key);
                if payload.len() > limit {
                    return Err(Error::TooLarge {
                        size: payload.len(),
                        limit,
                    });
                }
                inner.send(&inner.signals_topic, key, &payload).await?;
                metrics::bus_message(kind, "sent");
                match message {
                    BusMessage::Digest(digest) => inner.refresh(digest).await,
                    _ => Ok(()),
                }
            }
        }
    }

    async fn publish_whole(&self, decision: &Decision) -> Result<()> {
        if let Some(entry) = self.inner.lock_written().get_mut(&decision.group) {
            // Unknown chain, nothing published: the next write is a snapshot.
            entry.chain = None;
            entry.published = None;
        }
        self.inner.publish_decision(decision).await
    }

    async fn subscribe(&self) -> Result<BusSubscription> {
        let inner = Arc::clone(&self.inner);
        let consumer = blocking(move || inner.subscribed_consumer()).await??;
        let reader = Reader {
            consumer: DropOffRuntime::new(consumer),
        };
        let payloads = futures::stream::unfold(reader, |reader| async move {
            let payload = reader.next().await;
            Some((payload, reader))
        })
        .boxed();
        Ok(BusSubscription::new(
            payloads,
            Arc::clone(&self.inner.meter),
        ))
    }

    async fn retained(&self) -> Result<Vec<Decision>> {
        let inner = Arc::clone(&self.inner);
        let deadline = Instant::now() + RETAINED_TIMEOUT;
        blocking(move || inner.read_retained(deadline)).await?
    }
}

mod retained;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_pass_through_after_the_brokers() {
        let kafka = KafkaOptions {
            brokers: "k1:9092,k2:9092".into(),
            properties: [
                ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
                ("client.id".to_owned(), "billing".to_owned()),
            ]
            .into(),
            ..KafkaOptions::default()
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
