//! The Kafka allocation bus and the Kafka sink, against the Kafka-protocol broker
//! at `WEIR_TEST_KAFKA_BROKERS`. Without one the tests that need it skip, or fail
//! under `WEIR_REQUIRE_SERVICES=1`. Every test works in namespaces and topics of
//! its own.
//!
//! The bus runs the shared bus suite (`tests/it/common/bus_suite.rs`) here, on a
//! topic layout with several partitions, besides the tests only Kafka needs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use weir::bus::{AllocationBus, BusMessage, Decision, Error, Frame, KafkaBus, decode_frame};
use weir::config::{BusConfig, KafkaOptions};
use weir::consumer::EventProcessor;
use weir::event::{Category, EventName, NewEvent, StoredEvent, StreamName, WriteCondition};
use weir::sink::kafka::KafkaSinkSettings;
use weir::sink::kafka::encode_topic_value;
use weir::sink::{Format, KafkaSink, SinkError};
use weir::store::{EventStore, MemoryStore};

use crate::common::bus_suite::{BusBackend, PATIENCE, decision, next, source};
use crate::common::cloudevents::Received;
use crate::common::{init_logging, kafka_brokers, service_missing, unique_name};

// ---------------------------------------------------------------------------
// The bus

/// A fleet per namespace on the test broker; every connect is a new client.
struct KafkaBackend {
    kafka: KafkaOptions,
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

impl KafkaBackend {
    /// `None` (after noting the skip, or failing under
    /// `WEIR_REQUIRE_SERVICES=1`) when there is no test broker.
    async fn start() -> Option<Self> {
        let kafka = test_kafka().await?;
        // Several partitions, so that readers must cover them all.
        Some(Self {
            kafka: KafkaOptions {
                partitions: 3,
                ..kafka
            },
        })
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
pub async fn test_kafka() -> Option<KafkaOptions> {
    init_logging();
    let brokers = kafka_brokers()?;
    let first = brokers.split(',').next().unwrap_or_default().trim();
    let reachable = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(first),
    )
    .await;
    match reachable {
        Ok(Ok(_)) => Some(KafkaOptions {
            brokers,
            ..KafkaOptions::default()
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

mod suite {
    crate::bus_suite!(super::KafkaBackend::start());
}

// ---------------------------------------------------------------------------
// Kafka only

/// Every record of `topic` on the test broker, read from the beginning until
/// `count` have arrived.
async fn read_topic(kafka: &KafkaOptions, topic: &str, count: usize) -> Vec<Record> {
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
    assert_eq!(
        next(&mut subscription).await,
        BusMessage::Decision(wide.clone())
    );

    // Under the limit, so in several records, each part under its own key so
    // that compaction keeps them all; the group's old key is tombstoned.
    let first = read_topic(&kafka, bus.decisions_topic(), 1).await;
    let parts = match decode_frame(&first[0].value).expect("a decision part") {
        Frame::Decision(part) => usize::try_from(part.parts).unwrap(),
        other => panic!("not a decision part: {other:?}"),
    };
    assert!(parts > 1, "split");
    let records = read_topic(&kafka, bus.decisions_topic(), parts + 1).await;
    let mut keys: Vec<&str> = records
        .iter()
        .filter(|r| !r.value.is_empty())
        .map(|r| r.key.as_str())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), parts, "{keys:?}");
    assert!(records.iter().all(|r| r.value.len() <= 4000));
    assert!(
        keys.iter().all(|key| key.starts_with("orders#")),
        "{keys:?}"
    );
    let partitions: BTreeSet<i32> = records.iter().map(|r| r.partition).collect();
    assert_eq!(partitions.len(), 1, "one group, one partition");

    // A smaller decision tombstones the keys of the parts it no longer has.
    bus.publish(&decision("orders", 1, 2).into())
        .await
        .expect("publish");
    let records = read_topic(&kafka, bus.decisions_topic(), 2 * parts + 1).await;
    // Partitions interleave in the read, so tombstones are told apart by key:
    // the group's old bare key was tombstoned by the first publish.
    let tombstones: BTreeSet<&str> = records
        .iter()
        .filter(|r| r.value.is_empty() && r.key != "orders")
        .map(|r| r.key.as_str())
        .collect();
    let expected: BTreeSet<String> = (2..=parts).map(|part| format!("orders#{part}")).collect();
    assert_eq!(
        tombstones,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_reads_as_much_however_often_decisions_were_refreshed() {
    let Some(kafka) = test_kafka().await else {
        return;
    };
    let config = BusConfig {
        namespace: unique_name("fleet"),
        ..BusConfig::default()
    };
    let leader = KafkaBus::connect(&kafka, &config).await.expect("connect");
    let current = decision("orders", 3, 7);
    leader
        .publish(&current.clone().into())
        .await
        .expect("publish");
    let records_at_start = |bus: KafkaBus| async move {
        let retained = bus.retained().await.expect("retained");
        (retained, bus.retained_records_read())
    };
    let fresh = KafkaBus::connect(&kafka, &config).await.expect("connect");
    let (retained, before) = records_at_start(fresh).await;
    assert_eq!(retained, vec![current.clone()]);
    // A day's worth of refreshes, compressed: the same decision again and again.
    for _ in 0..200 {
        leader
            .publish(&current.clone().into())
            .await
            .expect("publish");
    }
    let fresh = KafkaBus::connect(&kafka, &config).await.expect("connect");
    let (retained, after) = records_at_start(fresh).await;
    assert_eq!(retained, vec![current]);
    assert_eq!(after, before, "a start reads no more after 200 refreshes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_check_fails_once_the_decisions_topic_is_gone() {
    let Some(kafka) = test_kafka().await else {
        return;
    };
    let config = BusConfig {
        namespace: unique_name("fleet"),
        ..BusConfig::default()
    };
    let bus = KafkaBus::connect(&kafka, &config).await.expect("connect");
    bus.check().await.expect("reachable, with its topic");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()
        .expect("an admin client");
    let deleted = admin
        .delete_topics(&[bus.decisions_topic()], &AdminOptions::new())
        .await
        .expect("delete the decisions topic");
    assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    let started = Instant::now();
    let error = loop {
        match bus.check().await {
            Err(error) => break error,
            Ok(()) if started.elapsed() < PATIENCE => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(()) => panic!("the check passes without the decisions topic"),
        }
    };
    assert!(error.to_string().contains(bus.decisions_topic()), "{error}");
}

#[tokio::test]
async fn an_unreachable_cluster_is_unavailable_in_bounded_time() {
    init_logging();
    // Nothing listens on port 1.
    let kafka = KafkaOptions {
        brokers: "127.0.0.1:1".into(),
        ..KafkaOptions::default()
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
    let kafka = KafkaOptions {
        properties: [("linger.ms".to_owned(), "soon".to_owned())].into(),
        ..KafkaOptions::default()
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
    // Permanent: the error policy decides (with `continue`, a dead letter), the
    // consumer never retries it forever.
    assert_eq!(error.kind(), "too_large");
    assert!(!error.is_transient(), "{error}");
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

// ---------------------------------------------------------------------------
// CloudEvents

/// What a record read back looks like to the CloudEvents SDK.
fn received(record: &Record) -> Received {
    Received::kafka(
        record
            .headers
            .iter()
            .map(|(key, value)| (key.clone(), value.clone().into_bytes()))
            .collect(),
        record.value.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_in_both_modes_read_back_with_the_sdk_attribute_for_attribute() {
    let Some(kafka) = test_kafka().await else {
        return;
    };
    let store = MemoryStore::new();
    let mut batch = append(&store, "orders", "order-1", 3).await;
    batch.extend(append(&store, "Big Orders", "order/2 é", 2).await);
    for (format, source, expected_source) in [
        (
            Format::CloudeventsBinary,
            None,
            (|e: &StoredEvent| match e.category.as_str() {
                "orders" => "weir://orders/order-1".to_owned(),
                _ => "weir://Big%20Orders/order%2F2%20%C3%A9".to_owned(),
            }) as fn(&StoredEvent) -> String,
        ),
        (
            Format::CloudeventsStructured,
            Some("urn:shop:{category}:{name}"),
            |e: &StoredEvent| match e.category.as_str() {
                "orders" => format!("urn:shop:orders:{}", e.name),
                _ => format!("urn:shop:Big%20Orders:{}", e.name),
            },
        ),
    ] {
        let topic = unique_name("cloudevents");
        let sink = KafkaSink::connect_with(
            &kafka,
            KafkaSinkSettings {
                format,
                cloudevents_source: source,
                ..KafkaSinkSettings::new(&topic)
            },
        )
        .await
        .expect("connect");
        sink.process(&batch).await.expect("the batch is delivered");
        let records = read_topic(&kafka, &topic, batch.len()).await;
        assert_eq!(records.len(), batch.len());
        for record in &records {
            let stored = batch
                .iter()
                .find(|e| e.id.to_string() == header(record, "Weir-Event-Id"))
                .expect("a sent event");
            // weir's own headers stay in every format.
            assert_eq!(header(record, "Weir-Event-Name"), stored.name.as_str());
            assert_eq!(header(record, "Weir-Category"), stored.category.as_str());
            assert_eq!(header(record, "Weir-Stream"), stored.stream.as_str());
            assert_eq!(header(record, "Weir-Position"), stored.position.to_string());
            assert_eq!(header(record, "Weir-Sequence"), stored.sequence.to_string());
            assert!(
                !record.headers.iter().any(|(key, _)| key == "Content-Type"),
                "only the binding's content-type: {record:?}"
            );
            assert_eq!(record.key, format!("{}/{}", stored.category, stored.stream));
            match format {
                Format::CloudeventsBinary => {
                    assert_eq!(header(record, "ce_specversion"), "1.0");
                    assert_eq!(header(record, "ce_id"), stored.id.to_string());
                    assert_eq!(header(record, "ce_type"), stored.name.as_str());
                    assert_eq!(header(record, "ce_subject"), stored.stream.as_str());
                    assert_eq!(header(record, "content-type"), "application/json");
                    let body: serde_json::Value =
                        serde_json::from_slice(&record.value).expect("JSON");
                    assert_eq!(body, stored.payload, "the payload is the value");
                }
                _ => {
                    assert_eq!(
                        header(record, "content-type"),
                        "application/cloudevents+json; charset=UTF-8"
                    );
                    assert!(
                        !record.headers.iter().any(|(key, _)| key.starts_with("ce_")),
                        "{record:?}"
                    );
                }
            }
            let event = received(record).to_event();
            crate::common::cloudevents::check(&event, stored, &expected_source(stored));
        }
    }
}

// ---------------------------------------------------------------------------
// Routes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_pick_each_events_topic_and_key() {
    let Some(kafka) = test_kafka().await else {
        return;
    };
    let prefix = unique_name("routes");
    #[derive(serde::Deserialize)]
    struct Holder {
        routes: Vec<weir::sink::RouteConfig>,
    }
    let routes = toml::from_str::<Holder>(&format!(
        r#"
        [[routes]]
        match = {{ names = ["Placed"], category = "orders" }}
        topic = "{prefix}.placed"
        key = "{{stream}}:{{name}}"
        [[routes]]
        match = {{ names = ["Pa*"] }}
        topic = "{prefix}.{{name}}"
        "#
    ))
    .expect("routes")
    .routes;
    let store = MemoryStore::new();
    // append() alternates Placed and Paid: refunds' Placed and its Noted event
    // (indexes 3 and 5) match no route.
    let mut batch = append(&store, "orders", "order-1", 3).await;
    batch.extend(append(&store, "refunds", "refund-1", 2).await);
    batch.extend(
        store
            .append(
                &Category::new("refunds").expect("valid"),
                &StreamName::new("refund-1").expect("valid"),
                WriteCondition::Any,
                vec![NewEvent::new(
                    EventName::new("Noted").expect("valid"),
                    serde_json::json!({}),
                )],
            )
            .await
            .expect("append"),
    );
    batch.extend(append(&store, "orders", "order-1", 1).await);

    for unmatched in [
        weir::sink::Unmatched::Default,
        weir::sink::Unmatched::Skip,
        weir::sink::Unmatched::DeadLetter,
    ] {
        let own = format!("{prefix}.{unmatched:?}").to_lowercase();
        let routing = weir::sink::Routing {
            routes: routes.clone(),
            unmatched,
        };
        let sink = KafkaSink::connect_with(
            &kafka,
            KafkaSinkSettings {
                context: weir::sink::SinkContext {
                    routing: &routing,
                    ..Default::default()
                },
                ..KafkaSinkSettings::new(&own)
            },
        )
        .await
        .expect("connect");
        let outcome = sink.process(&batch).await;
        match unmatched {
            weir::sink::Unmatched::DeadLetter => {
                let error = outcome.expect_err("refunds' Placed matches no route");
                assert_eq!(error.index(), Some(3));
                assert_eq!(error.kind(), "unrouted");
                assert!(error.is_dead_letter(), "{error}");
            }
            _ => outcome.expect("delivered"),
        }
        if unmatched == weir::sink::Unmatched::Default {
            let own_records = read_topic(&kafka, &own, 2).await;
            let names: Vec<&str> = own_records
                .iter()
                .map(|r| header(r, "Weir-Event-Name"))
                .collect();
            assert_eq!(names, ["Placed", "Noted"]);
            assert_eq!(own_records[1].key, "refunds/refund-1");
        }
    }
    // Each run sent the same routed events; read the first run's.
    let placed = read_topic(&kafka, &format!("{prefix}.placed"), 3).await;
    let keys: Vec<&str> = placed.iter().take(3).map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["order-1:Placed", "order-1:Placed", "order-1:Placed"]);
    let paid = read_topic(&kafka, &format!("{prefix}.Paid"), 2).await;
    let paid_keys: Vec<&str> = paid.iter().take(2).map(|r| r.key.as_str()).collect();
    assert_eq!(paid_keys, ["orders/order-1", "refunds/refund-1"]);
}
