//! [`KafkaSink`]: produces each event to a Kafka topic, with an idempotent
//! producer, and acknowledges a batch only once the brokers stored all of it.
//!
//! - **Topic**: the sink's template (e.g. `events.{category}`) with each value
//!   encoded by [`encode_topic_value`], so any category, stream or event name
//!   gives a legal topic name and values never change the template's shape.
//!   Topics are created when missing, with `[kafka]`'s partitions and
//!   replication; the sink remembers which exist, so it asks once per topic.
//! - **Key**: the stream's full name, `category/stream`: every event of a stream
//!   goes to one partition, so consumers of the topic see each stream in order.
//!   A route may render its own key.
//! - **Value**: in weir's format the stored event as JSON, as the stdout sink
//!   prints it; in CloudEvents binary mode the payload, in structured mode the
//!   envelope (see [`super::cloudevents`]).
//! - **Headers**: `Weir-Event-Id`, `Weir-Event-Name`, `Weir-Category`,
//!   `Weir-Stream`, `Weir-Position`, `Weir-Sequence` in every format, so routers
//!   can act without parsing the value; then `Content-Type: application/json`
//!   in weir's format, the Kafka binding's `ce_` headers and `content-type:
//!   application/json` in binary mode, and `content-type:
//!   application/cloudevents+json; charset=UTF-8` in structured mode.
//!
//! With routes, when consecutive events of one stream go to different topics
//! (or keys), the later one is produced only once the broker has acknowledged
//! the earlier: a stream's events are stored in order even across topics.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use super::cloudevents::{self, CloudEvents, Format};
use super::route::{Routed, Router, count_unrouted, unrouted};
use super::template::escape_bytes;
use super::{SinkContext, SinkError, Template};
use crate::connect::KafkaOptions;
use crate::connect::kafka_client::{
    CONNECT_TIMEOUT, ClusterError, DropOffRuntime, PUBLISH_TIMEOUT, TopicSpec, client_config,
    ensure_topics, is_transient, set_default,
};
use crate::consumer::processor::KIND_TOO_LARGE;
use crate::consumer::{EventProcessor, ProcessError};
use crate::event::StoredEvent;
use crate::metrics;

/// The longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// Produces events to the topics a template names; see the module docs.
pub struct KafkaSink {
    producer: DropOffRuntime<FutureProducer>,
    kafka: KafkaOptions,
    router: Router<Destination>,
    format: Format,
    cloudevents: CloudEvents,
    /// The group it forwards for, for its metrics.
    group: String,
    /// Topics known to exist, so that creating them is not a per-event cost.
    known_topics: Mutex<HashSet<String>>,
}

/// Where a route (or the sink) sends an event: a topic template, and a key
/// template (`None`: the stream's full name).
#[derive(Debug, Clone)]
pub struct Destination {
    topic: Template,
    key: Option<Template>,
}

impl Destination {
    fn with_partitions(self, partitions: u32) -> Self {
        Self {
            topic: self.topic.with_partitions(partitions),
            key: self.key.map(|key| key.with_partitions(partitions)),
        }
    }

    fn key_of(&self, event: &StoredEvent) -> String {
        match &self.key {
            Some(key) => key.render(event, Cow::Borrowed),
            None => format!("{}/{}", event.category, event.stream),
        }
    }
}

/// One event's topic and key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    topic: String,
    key: String,
}

/// Everything a [`KafkaSink`] is built from but the connection.
#[derive(Debug, Clone, Copy)]
pub struct KafkaSinkSettings<'a> {
    /// The topic template, e.g. `events.{category}`.
    pub topic: &'a str,
    pub format: Format,
    pub cloudevents_source: Option<&'a str>,
    /// The group, its partitions and its routes.
    pub context: SinkContext<'a>,
}

impl<'a> KafkaSinkSettings<'a> {
    /// Producing to `topic`, in weir's format, without routes.
    pub fn new(topic: &'a str) -> Self {
        Self {
            topic,
            format: Format::Weir,
            cloudevents_source: None,
            context: SinkContext::default(),
        }
    }
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("brokers", &self.kafka.brokers)
            .field("router", &self.router)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// Parses a topic template, refusing literal text Kafka topic names cannot hold.
fn topic_template(topic: &str) -> Result<Template, SinkError> {
    let template = Template::parse(topic)?;
    let literal = template.with_placeholders_as("x");
    if let Some(bad) = literal.chars().find(|&c| !is_topic_char(c)) {
        return Err(SinkError::Invalid(format!(
            "topic template {topic:?} has {bad:?}, which Kafka topic names cannot hold: use letters, digits, '.', '_' and '-'"
        )));
    }
    Ok(template)
}

impl From<ClusterError> for SinkError {
    fn from(error: ClusterError) -> Self {
        match error {
            ClusterError::Unreachable { .. } => SinkError::Unavailable(error.to_string()),
            other => SinkError::Invalid(other.to_string()),
        }
    }
}

/// Encodes `value` into characters legal in a Kafka topic name (`[A-Za-z0-9._-]`):
/// ASCII letters, digits and `-` stay as they are; every other byte of the
/// value's UTF-8 form becomes `_` and two uppercase hex digits. So `.` is `_2E`,
/// `_` is `_5F`, `/` is `_2F` and `é` is `_C3_A9`: `Big Orders` gives
/// `Big_20Orders`. [`decode_topic_value`] reverses it.
pub fn encode_topic_value(value: &str) -> Cow<'_, str> {
    escape_bytes(
        value,
        |byte| byte.is_ascii_alphanumeric() || byte == b'-',
        '_',
    )
}

/// The value [`encode_topic_value`] encoded as `encoded`; `None` if `encoded` is
/// not such an encoding.
pub fn decode_topic_value(encoded: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut rest = encoded.bytes();
    while let Some(byte) = rest.next() {
        match byte {
            b'_' => {
                let high = char::from(rest.next()?).to_digit(16)?;
                let low = char::from(rest.next()?).to_digit(16)?;
                bytes.push(u8::try_from(high * 16 + low).ok()?);
            }
            byte if byte.is_ascii_alphanumeric() || byte == b'-' => bytes.push(byte),
            _ => return None,
        }
    }
    String::from_utf8(bytes).ok()
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._-".contains(c)
}

impl KafkaSink {
    /// The same sink with `{partition}` in its templates counting in
    /// `partitions` partitions: those its group reads its categories as.
    #[must_use]
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.router = self
            .router
            .map(|destination| destination.with_partitions(partitions));
        self
    }

    /// A sink producing to the topics `topic` names (a template such as
    /// `events.{category}`) through the cluster `kafka` describes. Fails with
    /// [`SinkError::Unavailable`] when no broker answers within
    /// [`CONNECT_TIMEOUT`], and with [`SinkError::Invalid`] when librdkafka
    /// refuses a `[kafka.properties]` entry.
    pub async fn connect(kafka: &KafkaOptions, topic: &str) -> Result<KafkaSink, SinkError> {
        Self::connect_with(kafka, KafkaSinkSettings::new(topic)).await
    }

    /// The sink `settings` describe, through the cluster `kafka` describes; see
    /// [`KafkaSink::connect`].
    pub async fn connect_with(
        kafka: &KafkaOptions,
        settings: KafkaSinkSettings<'_>,
    ) -> Result<KafkaSink, SinkError> {
        let mut routes = Vec::with_capacity(settings.context.routing.routes.len());
        for (index, route) in settings.context.routing.routes.iter().enumerate() {
            let Some(topic) = &route.topic else {
                return Err(SinkError::Invalid(format!(
                    "route {index} has no topic: a route of a Kafka sink needs one"
                )));
            };
            let destination = Destination {
                topic: topic_template(topic)?,
                key: route.key.as_deref().map(Template::parse).transpose()?,
            };
            routes.push((route.matches.clone(), destination));
        }
        let default = Destination {
            topic: topic_template(settings.topic)?,
            key: None,
        };
        let router = Router::new(routes, settings.context.routing.unmatched, default)
            .map(|destination| destination.with_partitions(settings.context.partitions));
        let cloudevents = CloudEvents::new(settings.cloudevents_source)?;

        let mut config = client_config(kafka);
        // Retries neither duplicate nor reorder events within a partition.
        set_default(&mut config, "enable.idempotence", "true");
        // librdkafka would keep retrying for 5 minutes; a batch that cannot be
        // stored should reach the consumer's error policy well before that.
        set_default(
            &mut config,
            "message.timeout.ms",
            &PUBLISH_TIMEOUT.as_millis().to_string(),
        );
        let producer: FutureProducer = config.create().map_err(|error| match error {
            KafkaError::ClientConfig(..) => SinkError::Invalid(format!(
                "librdkafka refused the [kafka] settings: {error}; fix or remove that property"
            )),
            other => SinkError::Invalid(format!("cannot create a Kafka producer: {other}")),
        })?;
        let producer = DropOffRuntime::new(producer);

        let sink = KafkaSink {
            producer,
            kafka: kafka.clone(),
            router,
            format: settings.format,
            cloudevents,
            group: settings.context.group.to_owned(),
            known_topics: Mutex::new(HashSet::new()),
        };
        sink.probe().await?;
        let constant: BTreeSet<String> = sink
            .router
            .destinations()
            .filter(|destination| destination.topic.is_constant())
            .map(|destination| destination.topic.with_placeholders_as(""))
            .collect();
        if !constant.is_empty() {
            for topic in &constant {
                check_topic(topic).map_err(SinkError::Invalid)?;
            }
            let specs: Vec<TopicSpec> = constant.iter().map(TopicSpec::new).collect();
            ensure_topics(kafka, &specs).await?;
            sink.remember(constant);
        }
        Ok(sink)
    }

    /// The topic `event` goes to (its route's, or the sink's own); an error
    /// says why it has none.
    pub fn topic_of(&self, event: &StoredEvent) -> Result<String, String> {
        let destination = match self.router.route(event) {
            Routed::To(destination) => destination,
            Routed::Skip | Routed::DeadLetter => self.router.default_destination(),
        };
        let topic = destination.topic.render(event, encode_topic_value);
        check_topic(&topic)?;
        Ok(topic)
    }

    /// Where `event` goes: `Ok(None)` when it is skipped, an error when it
    /// cannot be sent (no legal topic, or a dead letter by `unmatched`).
    fn target_of(&self, event: &StoredEvent) -> Result<Option<Target>, ProcessError> {
        let destination = match self.router.route(event) {
            Routed::To(destination) => destination,
            Routed::Skip => return Ok(None),
            Routed::DeadLetter => return Err(unrouted(event)),
        };
        let topic = destination.topic.render(event, encode_topic_value);
        check_topic(&topic).map_err(|reason| ProcessError::new("invalid-topic", reason))?;
        Ok(Some(Target {
            topic,
            key: destination.key_of(event),
        }))
    }

    /// The value the sink sends for `event`, written into `body`.
    fn encode(&self, event: &StoredEvent, body: &mut Vec<u8>) -> serde_json::Result<()> {
        match self.format {
            Format::Weir => serde_json::to_writer(body, event),
            Format::CloudeventsBinary => serde_json::to_writer(body, &event.payload),
            Format::CloudeventsStructured => self.cloudevents.envelope(event, body),
        }
    }

    /// The headers the sink sends with `event`.
    pub fn headers(&self, event: &StoredEvent) -> OwnedHeaders {
        let id = event.id.to_string();
        let position = event.position.to_string();
        let sequence = event.sequence.to_string();
        let headers = OwnedHeaders::new_with_capacity(14)
            .insert(header("Weir-Event-Id", &id))
            .insert(header("Weir-Event-Name", event.name.as_str()))
            .insert(header("Weir-Category", event.category.as_str()))
            .insert(header("Weir-Stream", event.stream.as_str()))
            .insert(header("Weir-Position", &position))
            .insert(header("Weir-Sequence", &sequence));
        match self.format {
            Format::Weir => headers.insert(header("Content-Type", cloudevents::JSON_CONTENT_TYPE)),
            Format::CloudeventsStructured => {
                headers.insert(header("content-type", cloudevents::STRUCTURED_CONTENT_TYPE))
            }
            Format::CloudeventsBinary => {
                let attributes = self.cloudevents.attributes(event);
                let mut headers = headers
                    .insert(header("ce_specversion", cloudevents::SPEC_VERSION))
                    .insert(header("content-type", cloudevents::JSON_CONTENT_TYPE));
                for (name, value) in attributes.named() {
                    headers = headers.insert(header(&format!("ce_{name}"), value));
                }
                headers
            }
        }
    }

    async fn probe(&self) -> Result<(), SinkError> {
        let producer = FutureProducer::clone(&self.producer);
        let brokers = self.kafka.brokers.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, CONNECT_TIMEOUT)
                .map(drop)
        })
        .await
        .map_err(|error| SinkError::Unavailable(error.to_string()))?
        .map_err(|error| {
            SinkError::Unavailable(format!(
                "no Kafka broker at {brokers} answered within {} s ({error})",
                CONNECT_TIMEOUT.as_secs()
            ))
        })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // Only inserts happen under the lock; a poisoned set is still whole.
        self.known_topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn remember(&self, topics: impl IntoIterator<Item = String>) {
        self.known().extend(topics);
    }

    // Long because it is one loop over the batch that keeps the in-flight
    // window, the per-stream order rule and the full local queue together.
    /// Produces `events` to `targets` (`None`: skipped), all in flight at once
    /// but for one rule: when a stream's event goes elsewhere than the stream's
    /// previous one, the deliveries up to that previous one are settled first.
    /// Waits for every delivery; returns the first event that failed.
    async fn produce(
        &self,
        events: &[StoredEvent],
        targets: &[Option<Target>],
    ) -> Result<(), (usize, ProcessError)> {
        let mut in_flight: VecDeque<(usize, DeliveryFuture)> = VecDeque::new();
        let mut failed: Option<(usize, ProcessError)> = None;
        let mut record_failure = |index: usize, error: ProcessError| {
            if failed.as_ref().is_none_or(|(first, _)| index < *first) {
                failed = Some((index, error));
            }
        };
        // Per stream of the batch, where its last event went and that event's
        // index.
        let mut last_sent: HashMap<(&str, &str), (&Target, usize)> = HashMap::new();
        let mut body = Vec::with_capacity(512);
        'events: for (index, (event, target)) in events.iter().zip(targets).enumerate() {
            let Some(target) = target else {
                continue;
            };
            let stream = (event.category.as_str(), event.stream.as_str());
            if let Some((previous, sent)) = last_sent.get(&stream) {
                if *previous != target {
                    if let Err((i, error)) = settle_through(&mut in_flight, *sent, targets).await {
                        record_failure(i, error);
                        break 'events;
                    }
                }
            }
            body.clear();
            if let Err(error) = self.encode(event, &mut body) {
                record_failure(index, ProcessError::new("encode", error));
                break;
            }
            let topic = target.topic.as_str();
            let mut record = FutureRecord::to(topic)
                .key(&target.key)
                .payload(&body)
                .headers(self.headers(event));
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        in_flight.push_back((index, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The local queue is full: wait for the oldest send to
                        // finish, which makes room, then try again.
                        let Some((sent, delivery)) = in_flight.pop_front() else {
                            record_failure(
                                index,
                                ProcessError::transient(
                                    "queue_full",
                                    format!(
                                        "producing to Kafka topic {topic:?}: the producer queue is full"
                                    ),
                                ),
                            );
                            break 'events;
                        };
                        if let Err(error) = settle(&targets_topic(targets, sent), delivery).await {
                            record_failure(sent, error);
                            break 'events;
                        }
                        record = back;
                    }
                    Err((error, _)) => {
                        record_failure(index, publish_error(topic, &error));
                        break 'events;
                    }
                }
            }
            last_sent.insert(stream, (target, index));
        }
        for (index, delivery) in in_flight {
            if let Err(error) = settle(&targets_topic(targets, index), delivery).await {
                record_failure(index, error);
            }
        }
        match failed {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }
}

/// Settles the deliveries at the front of `in_flight` up to event `through`:
/// the first that failed, with its index, if any did.
async fn settle_through(
    in_flight: &mut VecDeque<(usize, DeliveryFuture)>,
    through: usize,
    targets: &[Option<Target>],
) -> Result<(), (usize, ProcessError)> {
    while in_flight.front().is_some_and(|(i, _)| *i <= through) {
        if let Some((i, delivery)) = in_flight.pop_front() {
            settle(&targets_topic(targets, i), delivery)
                .await
                .map_err(|error| (i, error))?;
        }
    }
    Ok(())
}

/// The topic of `targets[index]`, for messages.
fn targets_topic(targets: &[Option<Target>], index: usize) -> String {
    targets
        .get(index)
        .and_then(Option::as_ref)
        .map(|target| target.topic.clone())
        .unwrap_or_default()
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value.as_bytes()),
    }
}

/// Waits for one delivery report.
async fn settle(topic: &str, delivery: DeliveryFuture) -> Result<(), ProcessError> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, _))) => Err(publish_error(topic, &error)),
        Err(_) => Err(ProcessError::transient(
            "shutdown",
            format!(
                "producing to Kafka topic {topic:?}: the producer shut down before the broker answered"
            ),
        )),
    }
}

/// A failed produce, classified: a message larger than the broker accepts is
/// permanent (`too_large`); what [`is_transient`] names (unreachable, timed out,
/// no leader) is transient; any other refusal is permanent.
fn publish_error(topic: &str, error: &KafkaError) -> ProcessError {
    let message = format!("producing to Kafka topic {topic:?} failed: {error}");
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
            ProcessError::permanent(KIND_TOO_LARGE, message)
        }
        Some(code) if is_transient(code) => ProcessError::transient("unavailable", message),
        _ => ProcessError::permanent("publish", message),
    }
}

/// Checks what encoding cannot guarantee: the length, and the names Kafka
/// reserves.
fn check_topic(topic: &str) -> Result<(), String> {
    if topic.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "topic {}... is {} characters long, more than Kafka's {MAX_TOPIC_LEN}: use a shorter topic template or fewer placeholders",
            topic.get(..40).unwrap_or(topic),
            topic.len()
        ));
    }
    if topic == "." || topic == ".." {
        return Err(format!("{topic:?} is not a legal Kafka topic name"));
    }
    Ok(())
}

#[async_trait]
impl EventProcessor for KafkaSink {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        let started = Instant::now();
        let mut targets: Vec<Option<Target>> = Vec::with_capacity(events.len());
        // The first event that cannot be sent, and why; the events before it are
        // sent and acknowledged before the error is returned.
        let mut stop: Option<(usize, ProcessError)> = None;
        for (index, event) in events.iter().enumerate() {
            match self.target_of(event) {
                Ok(target) => targets.push(target),
                Err(error) => {
                    stop = Some((index, error));
                    break;
                }
            }
        }

        let missing: BTreeSet<String> = {
            let known = self.known();
            targets
                .iter()
                .flatten()
                .filter(|t| !known.contains(&t.topic))
                .map(|t| t.topic.clone())
                .collect()
        };
        if !missing.is_empty() {
            let specs: Vec<TopicSpec> = missing.iter().map(TopicSpec::new).collect();
            match ensure_topics(&self.kafka, &specs).await {
                Ok(()) => self.remember(missing),
                Err(error) => {
                    let first = targets
                        .iter()
                        .position(|t| t.as_ref().is_some_and(|t| missing.contains(&t.topic)))
                        .unwrap_or_default();
                    targets.truncate(first);
                    // Mostly a cluster that cannot be reached; a refusal stalls the
                    // source (visible as retrying) rather than dropping its events.
                    stop = Some((first, ProcessError::transient("topic", error)));
                }
            }
        }

        let sendable = targets.len();
        let outcome = self.produce(&events[..sendable], &targets).await;
        let reached = outcome.as_ref().err().map_or(sendable, |(index, _)| *index);
        let skipped = targets[..reached].iter().filter(|t| t.is_none()).count();
        count_unrouted(&self.group, skipped as u64);
        outcome.map_err(|(index, error)| error.at(index))?;
        metrics::sink_batch("kafka", sendable - skipped, started.elapsed());
        match stop {
            Some((index, error)) => Err(error.at(index)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_values_stay_as_they_are() {
        assert!(matches!(
            encode_topic_value("order-42"),
            Cow::Borrowed("order-42")
        ));
        assert_eq!(encode_topic_value("a.b_c/d é"), "a_2Eb_5Fc_2Fd_20_C3_A9");
    }

    #[test]
    fn malformed_encodings_do_not_decode() {
        for bad in ["_", "_4", "_ZZ", "a.b", "a b", "_C3"] {
            assert_eq!(decode_topic_value(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn overlong_and_reserved_topics_are_refused() {
        assert!(check_topic(&"a".repeat(MAX_TOPIC_LEN)).is_ok());
        let error = check_topic(&"a".repeat(MAX_TOPIC_LEN + 1)).expect_err("too long");
        assert!(error.contains("249"), "{error}");
        assert!(check_topic("..").is_err());
    }

    proptest! {
        #[test]
        fn encoding_is_legal_and_reversible(value in "\\PC{0,40}") {
            let encoded = encode_topic_value(&value);
            prop_assert!(encoded.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
            prop_assert_eq!(decode_topic_value(&encoded), Some(value));
        }
    }
}
