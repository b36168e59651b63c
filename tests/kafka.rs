//! The Kafka allocation bus and the Kafka sink, against the Kafka-protocol broker
//! at `WEIR_TEST_KAFKA_BROKERS`. Without one the tests that need it skip, or fail
//! under `WEIR_REQUIRE_SERVICES=1`. Every test works in namespaces and topics of
//! its own.
//!
//! The bus test bodies take a [`BusBackend`], so that every backend's suite can
//! run them; here they run on Kafka and, as the reference, on the memory bus.

#![cfg(feature = "kafka")]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use weir::broker::allocation::Handover;
use weir::bus::{
    AllocationBus, BusMessage, BusSubscription, Decision, Error, KafkaBus, MemoryBus, Signal,
};
use weir::config::{BusConfig, KafkaConfig};
use weir::consumer::EventProcessor;
use weir::event::{
    Category, Cursor, EventName, NewEvent, Source, StoredEvent, StreamName, WriteCondition,
};
use weir::sink::kafka::encode_topic_value;
use weir::sink::{KafkaSink, SinkError};
use weir::store::{EventStore, MemoryStore};

use common::{init_logging, service_missing, unique_name};

/// How long a test waits for what it expects before failing.
const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Backends

/// What the shared bus test bodies need of a backend.
#[async_trait]
trait BusBackend: Send + Sync {
    /// A handle on the bus of `fleet`, as one node of that fleet would connect.
    /// Handles of one fleet share a bus; fleets are isolated from each other.
    async fn connect(&self, fleet: &str) -> Arc<dyn AllocationBus>;

    /// Delivers `bytes`, which need not be a valid message, to the subscribers
    /// of `fleet`'s bus, where `group`'s decisions travel.
    async fn publish_raw(&self, fleet: &str, group: &str, bytes: &[u8]);
}

/// The reference: one [`MemoryBus`] per fleet.
#[derive(Default)]
struct MemoryBackend {
    fleets: Mutex<HashMap<String, MemoryBus>>,
}

impl MemoryBackend {
    fn fleet(&self, fleet: &str) -> MemoryBus {
        self.fleets
            .lock()
            .expect("not poisoned")
            .entry(fleet.to_owned())
            .or_default()
            .clone()
    }
}

#[async_trait]
impl BusBackend for MemoryBackend {
    async fn connect(&self, fleet: &str) -> Arc<dyn AllocationBus> {
        Arc::new(self.fleet(fleet))
    }

    async fn publish_raw(&self, fleet: &str, _group: &str, bytes: &[u8]) {
        self.fleet(fleet).publish_raw(bytes.to_vec());
    }
}

/// A fleet per namespace on the test broker; every connect is a new client.
struct KafkaBackend {
    kafka: KafkaConfig,
}

impl KafkaBackend {
    async fn bus(&self, fleet: &str) -> KafkaBus {
        let bus = BusConfig {
            namespace: fleet.to_owned(),
            ..BusConfig::default()
        };
        KafkaBus::connect(&self.kafka, &bus)
            .await
            .expect("connect to the test broker")
    }
}

#[async_trait]
impl BusBackend for KafkaBackend {
    async fn connect(&self, fleet: &str) -> Arc<dyn AllocationBus> {
        Arc::new(self.bus(fleet).await)
    }

    async fn publish_raw(&self, fleet: &str, group: &str, bytes: &[u8]) {
        self.bus(fleet)
            .await
            .publish_raw(group, bytes)
            .await
            .expect("publish raw bytes");
    }
}

/// The test broker's settings, or `None` (after noting the skip, or failing
/// under `WEIR_REQUIRE_SERVICES=1`) when there is none.
async fn test_kafka() -> Option<KafkaConfig> {
    init_logging();
    let Ok(brokers) = std::env::var("WEIR_TEST_KAFKA_BROKERS") else {
        service_missing(
            "Kafka",
            "WEIR_TEST_KAFKA_BROKERS is not set (scripts/test.sh starts a broker and sets it)",
        );
        return None;
    };
    let first = brokers.split(',').next().unwrap_or_default().trim();
    let reachable = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(first),
    )
    .await;
    match reachable {
        Ok(Ok(_)) => Some(KafkaConfig {
            brokers,
            ..KafkaConfig::default()
        }),
        Ok(Err(error)) => {
            service_missing("Kafka", format!("{first}: {error}"));
            None
        }
        Err(_) => {
            service_missing("Kafka", format!("{first} did not answer"));
            None
        }
    }
}

/// Defines `memory::NAME` and `kafka::NAME` running the body `NAME(&backend)`.
macro_rules! bus_suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::MemoryBackend::default()).await;
                }
            )*
        }
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(kafka) = super::test_kafka().await {
                        // Several partitions, so that readers must cover them all.
                        let kafka = weir::config::KafkaConfig { partitions: 3, ..kafka };
                        super::$name(&super::KafkaBackend { kafka }).await;
                    }
                }
            )*
        }
    };
}

bus_suite!(
    a_late_subscriber_gets_the_newest_decision_of_every_group,
    stale_decisions_do_not_replace_newer_ones,
    split_decisions_arrive_whole,
    signals_reach_those_subscribed_when_they_were_published,
    invalid_payloads_are_counted_and_skipped,
    fleets_are_isolated,
    retained_gives_the_newest_complete_decision_per_group,
);

// ---------------------------------------------------------------------------
// Helpers

fn source(text: &str) -> Source {
    text.parse().expect("test sources are valid")
}

fn decision(group: &str, epoch: u64, revision: u64) -> Decision {
    Decision {
        group: group.into(),
        epoch,
        revision,
        coordinator: format!("node-{epoch}"),
        issued_at: Utc::now(),
        owners: [(
            format!("{group}-1"),
            [source(&format!("category:{group}")), source("log")].into(),
        )]
        .into(),
        handovers: [(
            source(&format!("stream:{group}/r-{revision}")),
            Handover {
                from: format!("{group}-1"),
                to: format!("{group}-2"),
            },
        )]
        .into(),
    }
}

/// A decision of about 2.8 MB: larger than any backend's default payload limit.
fn large_decision(group: &str, revision: u64) -> Decision {
    let mut owners = BTreeMap::new();
    for subscriber in 0..100 {
        let sources: BTreeSet<Source> = (0..1_000)
            .map(|i| source(&format!("stream:orders/order-{subscriber:03}-{i:04}")))
            .collect();
        owners.insert(format!("{group}-{subscriber}"), sources);
    }
    Decision {
        owners,
        ..decision(group, 1, revision)
    }
}

fn released(group: &str, sequence: u64) -> Signal {
    Signal::Released {
        group: group.into(),
        subscriber: format!("{group}-1"),
        source: source("log"),
        cursor: Some(Cursor::new(7, sequence)),
    }
}

fn joined(group: &str, subscriber: &str) -> Signal {
    Signal::Joined {
        group: group.into(),
        subscriber: subscriber.into(),
        node: "node-9".into(),
    }
}

async fn next(subscription: &mut BusSubscription) -> BusMessage {
    tokio::time::timeout(PATIENCE, subscription.next())
        .await
        .expect("a message in time")
        .expect("the bus is still open")
}

/// What a subscription delivered until `done` held: every decision and every
/// signal, in order.
#[derive(Debug, Default)]
struct Seen {
    decisions: Vec<Decision>,
    signals: Vec<Signal>,
}

impl Seen {
    fn newest(&self, group: &str) -> Option<(u64, u64)> {
        self.decisions
            .iter()
            .rev()
            .find(|d| d.group == group)
            .map(Decision::version)
    }
}

async fn read_until(subscription: &mut BusSubscription, done: impl Fn(&Seen) -> bool) -> Seen {
    let mut seen = Seen::default();
    while !done(&seen) {
        match next(subscription).await {
            BusMessage::Decision(d) => {
                if let Some(before) = seen.decisions.iter().rev().find(|s| s.group == d.group) {
                    assert!(
                        d.is_newer_than(before),
                        "went back from {before:?} to {d:?}"
                    );
                }
                seen.decisions.push(d);
            }
            BusMessage::Signal(s) => seen.signals.push(s),
        }
    }
    seen
}

// ---------------------------------------------------------------------------
// Bus test bodies

async fn a_late_subscriber_gets_the_newest_decision_of_every_group(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let coordinator = backend.connect(&fleet).await;
    for (group, epoch, revision) in [
        ("orders", 1, 1),
        ("orders", 1, 2),
        ("payments", 3, 9),
        ("orders", 2, 0),
        ("payments", 3, 10),
    ] {
        coordinator
            .publish(&decision(group, epoch, revision).into())
            .await
            .expect("publish");
    }
    coordinator
        .publish(&released("orders", 1).into())
        .await
        .expect("publish");

    let observer = backend.connect(&fleet).await;
    let mut late = observer.subscribe().await.expect("subscribe");
    let seen = read_until(&mut late, |seen| {
        seen.newest("orders") == Some((2, 0)) && seen.newest("payments") == Some((3, 10))
    })
    .await;
    assert!(seen.signals.is_empty(), "old signals: {:?}", seen.signals);

    // Live messages follow.
    let newer = decision("orders", 2, 1);
    coordinator
        .publish(&newer.clone().into())
        .await
        .expect("publish");
    coordinator
        .publish(&released("orders", 2).into())
        .await
        .expect("publish");
    let seen = read_until(&mut late, |seen| {
        !seen.decisions.is_empty() && !seen.signals.is_empty()
    })
    .await;
    assert_eq!(seen.decisions, vec![newer]);
    // The signal published before subscribing never arrives; this one does.
    assert_eq!(seen.signals, vec![released("orders", 2)]);
}

async fn stale_decisions_do_not_replace_newer_ones(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let bus = backend.connect(&fleet).await;
    let mut early = bus.subscribe().await.expect("subscribe");
    let current = decision("orders", 5, 1);
    bus.publish(&current.clone().into()).await.expect("publish");
    // A deposed coordinator's late decision: higher revision, lower epoch.
    bus.publish(&decision("orders", 4, 99).into())
        .await
        .expect("publish");
    // The same version again is not newer either.
    bus.publish(&decision("orders", 5, 1).into())
        .await
        .expect("publish");

    let other_node = backend.connect(&fleet).await;
    assert_eq!(
        other_node.retained().await.expect("retained"),
        vec![current.clone()]
    );
    let mut late = other_node.subscribe().await.expect("subscribe");
    let seen = read_until(&mut late, |seen| seen.newest("orders").is_some()).await;
    assert_eq!(seen.decisions, vec![current.clone()]);

    // Decisions of one group arrive in order, so once the next one is here the
    // stale ones have been and gone without being delivered.
    let next_one = decision("orders", 5, 2);
    bus.publish(&next_one.clone().into())
        .await
        .expect("publish");
    let seen = read_until(&mut early, |seen| seen.newest("orders") == Some((5, 2))).await;
    assert_eq!(seen.decisions, vec![current, next_one.clone()]);
    let seen = read_until(&mut late, |seen| seen.newest("orders") == Some((5, 2))).await;
    assert_eq!(seen.decisions, vec![next_one]);
}

async fn split_decisions_arrive_whole(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let bus = backend.connect(&fleet).await;
    let mut subscription = bus.subscribe().await.expect("subscribe");
    let big = large_decision("orders", 1);
    let other = large_decision("payments", 4);
    bus.publish(&big.clone().into()).await.expect("publish");
    bus.publish(&other.clone().into()).await.expect("publish");
    let seen = read_until(&mut subscription, |seen| seen.decisions.len() == 2).await;
    assert_eq!(seen.decisions, vec![big.clone(), other.clone()]);

    let mut retained = backend
        .connect(&fleet)
        .await
        .retained()
        .await
        .expect("retained");
    retained.sort_by(|a, b| a.group.cmp(&b.group));
    assert_eq!(retained, vec![big, other]);
}

async fn signals_reach_those_subscribed_when_they_were_published(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let coordinator = backend.connect(&fleet).await;
    let mut first = coordinator.subscribe().await.expect("subscribe");
    let node = backend.connect(&fleet).await;
    let mut second = node.subscribe().await.expect("subscribe");
    let signals = vec![
        joined("orders", "orders-3"),
        released("orders", 4),
        Signal::Leaving {
            group: "orders".into(),
            subscriber: "orders-3".into(),
            node: "node-9".into(),
        },
    ];
    for signal in &signals {
        node.publish(&signal.clone().into()).await.expect("publish");
    }
    for subscription in [&mut first, &mut second] {
        let seen = read_until(subscription, |seen| seen.signals.len() == 3).await;
        assert_eq!(seen.signals, signals);
    }

    let mut later = backend
        .connect(&fleet)
        .await
        .subscribe()
        .await
        .expect("subscribe");
    let after = joined("orders", "orders-4");
    node.publish(&after.clone().into()).await.expect("publish");
    let seen = read_until(&mut later, |seen| !seen.signals.is_empty()).await;
    assert_eq!(seen.signals, vec![after.clone()]);
    let seen = read_until(&mut first, |seen| !seen.signals.is_empty()).await;
    assert_eq!(seen.signals, vec![after]);
}

async fn invalid_payloads_are_counted_and_skipped(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let bus = backend.connect(&fleet).await;
    let mut subscription = bus.subscribe().await.expect("subscribe");
    backend
        .publish_raw(&fleet, "orders", b"\x00\xffnot json at all")
        .await;
    backend
        .publish_raw(
            &fleet,
            "orders",
            br#"{"v":2,"kind":"decision","group":"orders","shiny":true}"#,
        )
        .await;
    backend
        .publish_raw(
            &fleet,
            "orders",
            br#"{"v":1,"kind":"decision","group":"orders"}"#,
        )
        .await;
    let first = decision("orders", 1, 1);
    bus.publish(&first.clone().into()).await.expect("publish");
    backend.publish_raw(&fleet, "orders", b"{").await;
    let second = decision("orders", 1, 2);
    bus.publish(&second.clone().into()).await.expect("publish");
    bus.publish(&released("orders", 1).into())
        .await
        .expect("publish");

    let seen = read_until(&mut subscription, |seen| {
        seen.newest("orders") == Some((1, 2)) && !seen.signals.is_empty()
    })
    .await;
    assert_eq!(seen.decisions, vec![first, second]);
    assert_eq!(seen.signals, vec![released("orders", 1)]);
    assert_eq!(subscription.invalid_messages(), 4);
    assert!(
        subscription
            .invalid_counter()
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );
}

async fn fleets_are_isolated(backend: &dyn BusBackend) {
    let (fleet_a, fleet_b) = (unique_name("fleet"), unique_name("fleet"));
    let bus_a = backend.connect(&fleet_a).await;
    let bus_b = backend.connect(&fleet_b).await;
    let mut subscription_a = bus_a.subscribe().await.expect("subscribe");
    // Fleet B goes first with the same group and higher versions: were the
    // fleets sharing a bus, A would see B's messages before its own.
    let decision_b = decision("orders", 9, 9);
    bus_b
        .publish(&decision_b.clone().into())
        .await
        .expect("publish");
    bus_b
        .publish(&joined("orders", "b-1").into())
        .await
        .expect("publish");
    let decision_a = decision("orders", 1, 1);
    bus_a
        .publish(&decision_a.clone().into())
        .await
        .expect("publish");
    bus_a
        .publish(&joined("orders", "a-1").into())
        .await
        .expect("publish");

    let seen = read_until(&mut subscription_a, |seen| {
        !seen.decisions.is_empty() && !seen.signals.is_empty()
    })
    .await;
    assert_eq!(seen.decisions, vec![decision_a.clone()]);
    assert_eq!(seen.signals, vec![joined("orders", "a-1")]);
    assert_eq!(bus_a.retained().await.expect("retained"), vec![decision_a]);
    assert_eq!(bus_b.retained().await.expect("retained"), vec![decision_b]);
}

async fn retained_gives_the_newest_complete_decision_per_group(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let bus = backend.connect(&fleet).await;
    assert_eq!(bus.retained().await.expect("retained"), vec![]);
    let big = large_decision("refunds", 3);
    for message in [
        decision("orders", 1, 1),
        decision("payments", 2, 1),
        decision("orders", 1, 2),
        large_decision("refunds", 2),
        decision("payments", 1, 7),
        big.clone(),
        decision("orders", 1, 3),
    ] {
        bus.publish(&message.into()).await.expect("publish");
    }
    bus.publish(&released("orders", 1).into())
        .await
        .expect("publish");

    let mut retained = backend
        .connect(&fleet)
        .await
        .retained()
        .await
        .expect("retained");
    retained.sort_by(|a, b| a.group.cmp(&b.group));
    let versions: Vec<(&str, (u64, u64))> = retained
        .iter()
        .map(|d| (d.group.as_str(), d.version()))
        .collect();
    assert_eq!(
        versions,
        vec![
            ("orders", (1, 3)),
            ("payments", (2, 1)),
            ("refunds", (1, 3))
        ]
    );
    assert_eq!(retained[2], big);
}

// ---------------------------------------------------------------------------
// Kafka only

/// Every record of `topic` on the test broker, read from the beginning until
/// `count` have arrived.
async fn read_topic(kafka: &KafkaConfig, topic: &str, count: usize) -> Vec<Record> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", "weir-tests")
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        assignment
            .add_partition_offset(topic, partition.id(), Offset::Beginning)
            .expect("assignable");
    }
    consumer.assign(&assignment).expect("assign");
    let mut records = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while records.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} records of {topic}", records.len()))
            .expect("a record");
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8(h.value.unwrap_or_default().to_vec())
                                .expect("UTF-8 header"),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        records.push(Record {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            key: String::from_utf8(message.key().unwrap_or_default().to_vec()).expect("UTF-8"),
            headers,
            value: message.payload().unwrap_or_default().to_vec(),
        });
    }
    records
}

#[derive(Debug)]
struct Record {
    topic: String,
    partition: i32,
    key: String,
    headers: Vec<(String, String)>,
    value: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producers_message_size_limit_passes_through_and_splits_decisions() {
    let Some(mut kafka) = test_kafka().await else {
        return;
    };
    kafka
        .properties
        .insert("message.max.bytes".into(), "4000".into());
    let namespace = unique_name("fleet");
    let bus = KafkaBus::connect(
        &kafka,
        &BusConfig {
            namespace: namespace.clone(),
            ..BusConfig::default()
        },
    )
    .await
    .expect("connect");
    let mut owners = BTreeMap::new();
    owners.insert(
        "orders-1".to_owned(),
        (0..1_000)
            .map(|i| source(&format!("stream:orders/order-{i:05}")))
            .collect(),
    );
    let wide = Decision {
        owners,
        ..decision("orders", 1, 1)
    };
    bus.publish(&wide.clone().into()).await.expect("publish");
    let mut subscription = bus.subscribe().await.expect("subscribe");
    assert_eq!(next(&mut subscription).await, BusMessage::Decision(wide));

    // Under the limit, so in several records.
    let records = read_topic(&kafka, bus.decisions_topic(), 2).await;
    assert!(
        records
            .iter()
            .all(|r| r.value.len() <= 4000 && r.key == "orders")
    );
}

#[tokio::test]
async fn an_unreachable_cluster_is_unavailable_in_bounded_time() {
    init_logging();
    // Nothing listens on port 1.
    let kafka = KafkaConfig {
        brokers: "127.0.0.1:1".into(),
        ..KafkaConfig::default()
    };
    let bus = tokio::time::timeout(
        Duration::from_secs(60),
        KafkaBus::connect(&kafka, &BusConfig::default()),
    )
    .await
    .expect("connect gives up by itself");
    let error = bus.expect_err("nothing to connect to");
    assert!(matches!(error, Error::Unavailable(_)), "{error:?}");
    assert!(error.is_retryable());
    assert!(error.to_string().contains("127.0.0.1:1"), "{error}");

    let sink = tokio::time::timeout(
        Duration::from_secs(60),
        KafkaSink::connect(&kafka, "events.{category}"),
    )
    .await
    .expect("connect gives up by itself");
    let error = sink.expect_err("nothing to connect to");
    assert!(matches!(error, SinkError::Unavailable(_)), "{error:?}");
}

#[tokio::test]
async fn a_bad_property_is_reported_by_name() {
    init_logging();
    let kafka = KafkaConfig {
        properties: [("linger.ms".to_owned(), "soon".to_owned())].into(),
        ..KafkaConfig::default()
    };
    let error = KafkaBus::connect(&kafka, &BusConfig::default())
        .await
        .expect_err("librdkafka refuses it");
    assert!(!error.is_retryable());
    let message = error.to_string();
    assert!(message.contains("linger.ms"), "{message}");
    assert!(message.contains("fix or remove"), "{message}");

    let error = KafkaSink::connect(&kafka, "events")
        .await
        .expect_err("librdkafka refuses it");
    assert!(matches!(error, SinkError::Invalid(_)), "{error:?}");
    assert!(error.to_string().contains("linger.ms"), "{error}");
}

// ---------------------------------------------------------------------------
// The sink

async fn append(
    store: &MemoryStore,
    category: &str,
    stream: &str,
    count: usize,
) -> Vec<StoredEvent> {
    let events = (0..count)
        .map(|n| {
            NewEvent::new(
                EventName::new(if n % 2 == 0 { "Placed" } else { "Paid" }).expect("valid"),
                serde_json::json!({ "n": n, "stream": stream }),
            )
        })
        .collect();
    store
        .append(
            &Category::new(category).expect("valid"),
            &StreamName::new(stream).expect("valid"),
            WriteCondition::Any,
            events,
        )
        .await
        .expect("append")
}

fn header<'a>(record: &'a Record, key: &str) -> &'a str {
    record
        .headers
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} header in {record:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_delivers_a_batch_complete_and_in_order_per_stream() {
    let Some(mut kafka) = test_kafka().await else {
        return;
    };
    kafka.partitions = 3;
    let prefix = unique_name("events");
    let sink = KafkaSink::connect(&kafka, &format!("{prefix}.{{category}}"))
        .await
        .expect("connect");

    let store = MemoryStore::new();
    let odd = "Crème brûlée.eu_2";
    let mut batch = Vec::new();
    // Streams interleaved within the batch, as a category's read order has them.
    for round in 0..3 {
        for (category, stream) in [
            ("orders", "order-1"),
            (odd, "dessert/7"),
            ("orders", "order-2"),
            (odd, "dessert/8"),
        ] {
            let _ = round;
            batch.extend(append(&store, category, stream, 4).await);
        }
    }
    sink.process(&batch).await.expect("the batch is delivered");

    let orders_topic = format!("{prefix}.orders");
    let odd_topic = format!("{prefix}.Cr_C3_A8me_20br_C3_BBl_C3_A9e_2Eeu_5F2");
    assert_eq!(
        format!("{prefix}.{}", encode_topic_value(odd)),
        odd_topic,
        "the documented encoding"
    );
    let mut records = read_topic(&kafka, &orders_topic, 24).await;
    records.extend(read_topic(&kafka, &odd_topic, 24).await);

    let mut by_stream: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    for record in &records {
        by_stream
            .entry(record.key.clone())
            .or_default()
            .push(record);
    }
    let expected_keys: BTreeSet<String> = batch
        .iter()
        .map(|e| format!("{}/{}", e.category, e.stream))
        .collect();
    assert_eq!(
        by_stream.keys().cloned().collect::<BTreeSet<_>>(),
        expected_keys
    );
    for (key, records) in &by_stream {
        let sent: Vec<&StoredEvent> = batch
            .iter()
            .filter(|e| format!("{}/{}", e.category, e.stream) == *key)
            .collect();
        let received: Vec<StoredEvent> = records
            .iter()
            .map(|r| serde_json::from_slice(&r.value).expect("the stored event as JSON"))
            .collect();
        assert_eq!(received.iter().collect::<Vec<_>>(), sent, "stream {key}");
        let partitions: BTreeSet<i32> = records.iter().map(|r| r.partition).collect();
        assert_eq!(
            partitions.len(),
            1,
            "stream {key} spread over {partitions:?}"
        );
        for (record, event) in records.iter().zip(&received) {
            let topic = if event.category.as_str() == odd {
                &odd_topic
            } else {
                &orders_topic
            };
            assert_eq!(&record.topic, topic);
            assert_eq!(header(record, "Weir-Event-Id"), event.id.to_string());
            assert_eq!(header(record, "Weir-Event-Name"), event.name.as_str());
            assert_eq!(header(record, "Weir-Category"), event.category.as_str());
            assert_eq!(header(record, "Weir-Stream"), event.stream.as_str());
            assert_eq!(header(record, "Weir-Position"), event.position.to_string());
            assert_eq!(header(record, "Weir-Sequence"), event.sequence.to_string());
            assert_eq!(header(record, "Content-Type"), "application/json");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_a_legal_topic_fails_at_its_index_after_the_ones_before() {
    let Some(kafka) = test_kafka().await else {
        return;
    };
    let prefix = unique_name("events");
    let sink = KafkaSink::connect(&kafka, &format!("{prefix}.{{category}}"))
        .await
        .expect("connect");
    let store = MemoryStore::new();
    let mut batch = append(&store, "orders", "order-1", 2).await;
    // 120 two-byte characters encode to 720: longer than a topic may be.
    batch.extend(append(&store, &"é".repeat(120), "s-1", 1).await);
    batch.extend(append(&store, "orders", "order-1", 1).await);

    let error = sink
        .process(&batch)
        .await
        .expect_err("no topic for event 2");
    assert_eq!(error.kind(), "invalid-topic");
    assert_eq!(error.index(), Some(2));
    assert!(error.message().contains("249"), "{error}");
    let records = read_topic(&kafka, &format!("{prefix}.orders"), 2).await;
    let positions: Vec<String> = records
        .iter()
        .map(|r| header(r, "Weir-Position").to_owned())
        .collect();
    assert_eq!(positions, ["0", "1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_delivery_fails_at_the_first_refused_event() {
    let Some(mut kafka) = test_kafka().await else {
        return;
    };
    kafka
        .properties
        .insert("message.max.bytes".into(), "2000".into());
    let topic = unique_name("events");
    let sink = KafkaSink::connect(&kafka, &topic).await.expect("connect");
    let store = MemoryStore::new();
    let mut batch = append(&store, "orders", "order-1", 2).await;
    let big = NewEvent::new(
        EventName::new("Huge").expect("valid"),
        serde_json::json!({ "blob": "x".repeat(5_000) }),
    );
    batch.extend(
        store
            .append(
                &Category::new("orders").expect("valid"),
                &StreamName::new("order-1").expect("valid"),
                WriteCondition::Any,
                vec![big],
            )
            .await
            .expect("append"),
    );
    batch.extend(append(&store, "orders", "order-2", 1).await);

    let error = sink
        .process(&batch)
        .await
        .expect_err("event 2 is too large");
    assert_eq!(error.kind(), "publish");
    assert_eq!(error.index(), Some(2));
    let records = read_topic(&kafka, &topic, 2).await;
    assert_eq!(
        records
            .iter()
            .map(|r| header(r, "Weir-Position"))
            .collect::<Vec<_>>(),
        ["0", "1"]
    );
}
