//! Ingest from Kafka: a topic of several partitions that the test creates and
//! a plain producer writes keyed records to; weir assigns itself each
//! partition and reads from the offset it stored.

use std::sync::Arc;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use weir::config::KafkaOptions;
use weir::connect::kafka_client::{TopicSpec, ensure_topics};
use weir::consumer::DeadLetterStore;
use weir::ingest::IngestStore;
use weir::postgres::{PostgresDeadLetterStore, PostgresIngestStore};
use weir::sink::KafkaSink;

use super::*;
use crate::common::unique_name;
use crate::kafka::test_kafka;

struct Fixture {
    kafka: KafkaOptions,
    topic: String,
    producer: FutureProducer,
}

/// A topic of three partitions of the test's own, and a plain producer.
async fn fixture() -> Option<Fixture> {
    let kafka = KafkaOptions {
        partitions: 3,
        ..test_kafka().await?
    };
    let topic = unique_name("ingest");
    ensure_topics(&kafka, &[TopicSpec::new(&topic)])
        .await
        .expect("create the topic");
    let producer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("enable.idempotence", "true")
        .create()
        .expect("a producer");
    Some(Fixture {
        kafka,
        topic,
        producer,
    })
}

impl Fixture {
    async fn produce(&self, key: &str, payload: &[u8], headers: &[(&str, &str)]) {
        let headers = headers
            .iter()
            .fold(OwnedHeaders::new(), |all, (name, value)| {
                all.insert(Header {
                    key: name,
                    value: Some(*value),
                })
            });
        self.producer
            .send(
                FutureRecord::to(&self.topic)
                    .key(key)
                    .payload(payload)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(error, _)| error)
            .expect("produce");
    }

    /// Records `from..to` keyed `k0`..`k9`, named by one header or another.
    async fn produce_range(&self, from: usize, to: usize) {
        for n in from..to {
            let key = format!("k{}", n % 10);
            let header = if n % 3 == 0 {
                "ce-type"
            } else {
                "Weir-Event-Name"
            };
            self.produce(&key, &payload(&key, n), &[(header, "Placed")])
                .await;
        }
    }

    fn config(&self, name: &str) -> IngestConfig {
        ingest_config(&format!(
            r#"
            name = "{name}"
            from = {{ kind = "kafka", topics = ["{}"] }}
            into = {{ category = "orders", stream = "{{key}}" }}
            consumer = {{ batch_size = 40 }}
            "#,
            self.topic
        ))
    }

    async fn connected(&self, config: &IngestConfig) -> Connected {
        weir::ingest::connect(config, &Default::default(), &self.kafka)
            .await
            .expect("connect the ingest")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_land_once_in_order_across_a_stop_and_a_crash() {
    let (Some(fixture), Some(db)) = (fixture().await, TestPostgres::start().await) else {
        return;
    };
    let config = fixture.config("orders-in");
    fixture.produce_range(0, 150).await;
    let retried = [("Weir-Event-Name", "Placed"), ("ce_id", "retry-1")];
    fixture.produce("k0", &payload("k0", 150), &retried).await;
    fixture.produce("k0", &payload("k0", 150), &retried).await;
    fixture
        .produce("k1", b"not json", &[("Weir-Event-Name", "Placed")])
        .await;

    let connected = fixture.connected(&config).await;
    assert_eq!(connected.sources.len(), 3, "one source per partition");
    let node = start_node("node-1", &db, &config, connected).await;
    wait_for_count(db.store.as_ref(), "orders", 151).await;
    node.stop().await;

    fixture.produce_range(151, 250).await;
    let node = start_node("node-2", &db, &config, fixture.connected(&config).await).await;
    wait_for_count(db.store.as_ref(), "orders", 250).await;
    let producing = fixture.produce_range(250, 400);
    let crash = async {
        while events_of(db.store.as_ref(), "orders").await.len() < 260 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        node.abort().await;
    };
    tokio::join!(producing, crash);
    let node = start_node("node-3", &db, &config, fixture.connected(&config).await).await;
    let events = wait_for_count(db.store.as_ref(), "orders", 400).await;
    assert_exactly_once_in_order(&events, 400);

    let letters = PostgresDeadLetterStore::new(Arc::clone(&db.store))
        .list(Some("orders-in"), 0, 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].kind, "not_json");
    assert!(
        letters[0].error.contains("not json"),
        "{}",
        letters[0].error
    );
    // Each partition's stored offset is its last record's: 402 records in all.
    let positions = PostgresIngestStore::new(Arc::clone(&db.store))
        .positions(Some("orders-in"))
        .await
        .unwrap();
    assert_eq!(positions.len(), 3);
    assert_eq!(positions.iter().map(|p| p.position + 1).sum::<u64>(), 402);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_through_the_kafka_sink_keeps_ids_names_payloads_and_order() {
    let (Some(fixture), Some(out_db), Some(in_db)) = (
        fixture().await,
        TestPostgres::start().await,
        TestPostgres::start().await,
    ) else {
        return;
    };
    // The sink's topic is the fixture's: `{category}` is not in the template.
    let sink = KafkaSink::connect(&fixture.kafka, &fixture.topic)
        .await
        .expect("connect the sink");
    let out = start_bridge(&out_db, Arc::new(sink)).await;
    let mut sent = append_rounds(out_db.store.as_ref(), "orders", 7, 10).await;

    let config = ingest_config(&format!(
        r#"
        name = "orders-back"
        from = {{ kind = "kafka", topics = ["{}"] }}
        into = {{ category = "copies", stream = "{{header.Weir-Stream}}" }}
        payload = "weir"
        "#,
        fixture.topic
    ));
    let back = start_node("in", &in_db, &config, fixture.connected(&config).await).await;
    sent.extend(append_rounds(out_db.store.as_ref(), "orders", 7, 10).await);
    let events = wait_for_count(in_db.store.as_ref(), "copies", sent.len()).await;
    assert_round_trip(&sent, &events);
    back.stop().await;
    out.stop().await;
}
