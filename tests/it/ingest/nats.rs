//! Ingest from NATS JetStream: a stream the test's plain client creates and
//! publishes to; weir reads it with consumers of its own.

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream;
use weir::consumer::DeadLetterStore;
use weir::ingest::IngestStore;
use weir::postgres::{PostgresDeadLetterStore, PostgresIngestStore};
use weir::sink::NatsSink;

use super::*;
use crate::common::unique_name;
use crate::nats::{StreamCleanup, nats_config, nats_url, shared_client};

pub(super) struct Fixture {
    jetstream: jetstream::Context,
    pub(super) stream: String,
    pub(super) prefix: String,
    _cleanup: StreamCleanup,
}

async fn fixture() -> Option<Fixture> {
    Fixture::start().await
}

impl Fixture {
    /// A stream of the test's own capturing `PREFIX.>`, created by the test (weir
    /// never creates what it ingests).
    pub(super) async fn start() -> Option<Fixture> {
        let client = shared_client().await?;
        let jetstream = jetstream::new(client);
        let stream = unique_name("INGEST");
        let prefix = unique_name("ingest");
        jetstream
            .create_stream(jetstream::stream::Config {
                name: stream.clone(),
                subjects: vec![format!("{prefix}.>")],
                ..Default::default()
            })
            .await
            .expect("create the stream");
        Some(Fixture {
            jetstream,
            _cleanup: StreamCleanup {
                url: nats_url(),
                streams: vec![stream.clone()],
            },
            stream,
            prefix,
        })
    }

    pub(super) async fn publish(
        &self,
        subject: String,
        payload: Vec<u8>,
        headers: &[(&str, &str)],
    ) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        self.jetstream
            .publish_with_headers(subject, map, payload.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    /// Messages `from..to` of keys `k0`..`k9`, to `PREFIX.eu.KEY` (even keys)
    /// and `PREFIX.us.KEY`, named by one header or another.
    async fn publish_range(&self, from: usize, to: usize) {
        for n in from..to {
            let key = format!("k{}", n % 10);
            let region = if n % 2 == 0 { "eu" } else { "us" };
            let header = if n % 3 == 0 {
                "ce_type"
            } else {
                "Weir-Event-Name"
            };
            self.publish(
                format!("{}.{region}.{key}", self.prefix),
                payload(&key, n),
                &[(header, "Placed")],
            )
            .await;
        }
    }

    fn config(&self, name: &str) -> IngestConfig {
        ingest_config(&format!(
            r#"
            name = "{name}"
            from = {{ kind = "nats", stream = "{}", subjects = ["{prefix}.eu.>", "{prefix}.us.>"] }}
            into = {{ category = "orders", stream = "{{subject.2}}" }}
            consumer = {{ batch_size = 40 }}
            "#,
            self.stream,
            prefix = self.prefix
        ))
    }
}

async fn connected(config: &IngestConfig) -> Connected {
    weir::ingest::connect(config, &nats_config(&nats_url()), &Default::default())
        .await
        .expect("connect the ingest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_land_once_in_order_across_a_stop_and_a_crash() {
    let (Some(fixture), Some(db)) = (fixture().await, TestPostgres::start().await) else {
        return;
    };
    let config = fixture.config("orders-in");
    fixture.publish_range(0, 150).await;
    // A producer's retry: the same message again, under the same ce-id.
    let retried = [("Weir-Event-Name", "Placed"), ("ce-id", "retry-1")];
    fixture
        .publish(
            format!("{}.eu.k0", fixture.prefix),
            payload("k0", 150),
            &retried,
        )
        .await;
    fixture
        .publish(
            format!("{}.eu.k0", fixture.prefix),
            payload("k0", 150),
            &retried,
        )
        .await;
    // A bad message: kept as a dead letter (the default policy is `continue`).
    fixture
        .publish(
            format!("{}.us.k1", fixture.prefix),
            b"not json".to_vec(),
            &[("Weir-Event-Name", "Placed")],
        )
        .await;

    let node = start_node("node-1", &db, &config, connected(&config).await).await;
    wait_for_count(db.store.as_ref(), "orders", 151).await;
    node.stop().await;

    fixture.publish_range(151, 250).await;
    let node = start_node("node-2", &db, &config, connected(&config).await).await;
    wait_for_count(db.store.as_ref(), "orders", 250).await;
    // A crash while messages arrive: whatever it appended, it appended with its position.
    let publishing = fixture.publish_range(250, 400);
    let crash = async {
        while events_of(db.store.as_ref(), "orders").await.len() < 260 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        node.abort().await;
    };
    tokio::join!(publishing, crash);
    let node = start_node("node-3", &db, &config, connected(&config).await).await;
    let events = wait_for_count(db.store.as_ref(), "orders", 400).await;
    assert_exactly_once_in_order(&events, 400);
    assert!(events.iter().all(|e| e.name.as_str() == "Placed"));

    let letters = PostgresDeadLetterStore::new(Arc::clone(&db.store))
        .list(Some("orders-in"), 0, 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].kind, "not_json");
    assert_eq!(
        letters[0].sequence, 153,
        "the bad message's stream sequence"
    );
    assert!(
        letters[0].error.contains("not json") && letters[0].error.contains("Weir-Event-Name"),
        "{}",
        letters[0].error
    );

    // The positions stored are the last stream sequences of each subject filter.
    let positions = PostgresIngestStore::new(Arc::clone(&db.store))
        .positions(Some("orders-in"))
        .await
        .unwrap();
    assert_eq!(positions.len(), 2);
    assert_eq!(positions.iter().map(|p| p.position).max(), Some(402));
    // Status lists both sources, running, with the positions they claimed
    // (node-3 may have found nothing left to read if node-2 read it all
    // before it was aborted).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = node.status();
        let ingest: Vec<_> = status
            .consumers
            .iter()
            .filter(|c| c.key.group == "orders-in")
            .collect();
        let claimed = |c: &&weir::runtime::ConsumerReport| {
            c.state == weir::consumer::ConsumerState::Running && c.position.is_some()
        };
        if ingest.len() == 2 && ingest.iter().all(claimed) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{ingest:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_through_the_nats_sink_keeps_ids_names_payloads_and_order() {
    let (Some(fixture), Some(out_db), Some(in_db)) = (
        fixture().await,
        TestPostgres::start().await,
        TestPostgres::start().await,
    ) else {
        return;
    };
    // The sink publishes into the test's stream: `PREFIX.CATEGORY.STREAM`.
    let sink = NatsSink::connect(
        &nats_config(&nats_url()),
        &format!("{}.{{category}}.{{stream}}", fixture.prefix),
        Some(&fixture.stream),
        1024,
    )
    .await
    .expect("connect the sink");
    let out = start_bridge(&out_db, Arc::new(sink)).await;
    let mut sent = append_rounds(out_db.store.as_ref(), "orders", 7, 10).await;

    let config = ingest_config(&format!(
        r#"
        name = "orders-back"
        from = {{ kind = "nats", stream = "{}", subjects = ["{}.orders.>"] }}
        into = {{ category = "copies", stream = "{{header.Weir-Stream}}" }}
        payload = "weir"
        "#,
        fixture.stream, fixture.prefix
    ));
    let back = start_node("in", &in_db, &config, connected(&config).await).await;
    sent.extend(append_rounds(out_db.store.as_ref(), "orders", 7, 10).await);
    let events = wait_for_count(in_db.store.as_ref(), "copies", sent.len()).await;
    assert_round_trip(&sent, &events);
    back.stop().await;
    out.stop().await;
}
