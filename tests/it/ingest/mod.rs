//! Ingest end to end: messages published by a plain NATS or Kafka client land
//! in a Postgres store exactly once, each key's messages in transport order;
//! a node stopped, or aborted as a crash would, and another started resumes
//! from the stored position (nothing twice, nothing lost); a fenced owner's
//! append fails whole; and a round trip, weir's own sink carrying a category
//! out and an ingest bringing it back into another schema, keeps ids, names,
//! payloads and each stream's order. `nats` and `kafka` hold the tests of each
//! bus; the store's fencing is checked here on both stores.

mod fleet;
#[cfg(feature = "kafka")]
mod kafka;
mod nats;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use weir::broker::{Grant, SingletonBroker, SubscriberSpec};
use weir::consumer::{CheckpointError, ConsumerSettings};
use weir::event::{
    Category, Cursor, EventName, NewEvent, Source, StoredEvent, StreamName, WriteCondition,
};
use weir::ingest::{Connected, IngestConfig, IngestStore, MemoryIngestStore, Shape};
use weir::postgres::PostgresIngestStore;
use weir::runtime::{ConsumerStores, EventRuntime};
use weir::store::{EventStore, MemoryStore, StreamAppend};

use crate::common::{TestPostgres, unique_name};
use crate::nats::nats_url;

/// How long a test waits for what it expects.
const WAIT: Duration = Duration::from_secs(60);

/// One node's runtime ingesting `config` into `db`, on a broker of its own
/// that gives it every source it requests.
async fn start_node(
    node: &str,
    db: &TestPostgres,
    config: &IngestConfig,
    connected: Connected,
) -> EventRuntime {
    let runtime = EventRuntime::new(
        node,
        Arc::new(SingletonBroker::new()),
        ConsumerStores::postgres(Arc::clone(&db.store)),
        ConsumerSettings::default(),
    )
    .with_shutdown_grace(Duration::from_secs(5));
    runtime
        .register_ingest(
            SubscriberSpec::new(&config.name, format!("{node}/ingest"), connected.sources),
            Shape::new(config, 1 << 20).expect("a valid ingest"),
            connected.bus,
            Arc::new(PostgresIngestStore::new(Arc::clone(&db.store))),
            config.consumer.clone(),
        )
        .expect("register the ingest");
    runtime.start().await.expect("start the runtime");
    runtime
}

/// A node forwarding category `orders` of `db` through `sink`: the way out of
/// a round trip.
async fn start_bridge(
    db: &TestPostgres,
    sink: Arc<dyn weir::consumer::EventProcessor>,
) -> EventRuntime {
    let out = EventRuntime::new(
        "out",
        Arc::new(SingletonBroker::new()),
        ConsumerStores::postgres(Arc::clone(&db.store)),
        ConsumerSettings::default(),
    );
    out.register_subscription_consumer(
        SubscriberSpec::new("bridge", "out/1", ["category:orders".parse().unwrap()]),
        sink,
        None,
    )
    .expect("register the bridge");
    out.start().await.expect("start the bridge");
    out
}

/// Every event of `category` in `store`, in read order.
async fn events_of(store: &dyn EventStore, category: &str) -> Vec<StoredEvent> {
    let source = Source::Category(Category::new(category).unwrap());
    store
        .read(&source, Cursor::START, 1_000_000)
        .await
        .expect("read")
}

/// Waits until `category` holds `count` events (failing if it holds more).
async fn wait_for_count(store: &dyn EventStore, category: &str, count: usize) -> Vec<StoredEvent> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let events = events_of(store, category).await;
        assert!(
            events.len() <= count,
            "{} events, more than the {count} sent",
            events.len()
        );
        if events.len() == count {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {count} events arrived within {WAIT:?}",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks what a test's plain client sent (payloads `{"key": K, "n": N}`, N
/// increasing per key) arrived exactly once: no transport position twice, no
/// (key, n) twice, each stream (one per key) in the order sent.
fn assert_exactly_once_in_order(events: &[StoredEvent], expected: usize) {
    assert_eq!(events.len(), expected);
    let positions: BTreeSet<(String, u64)> = events
        .iter()
        .map(|e| {
            let ingest = &e.metadata["ingest"];
            (
                ingest["source"].as_str().unwrap().to_owned(),
                ingest["position"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        positions.len(),
        expected,
        "a transport position stored twice"
    );
    let mut streams: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for event in events {
        assert_eq!(
            event.payload["key"].as_str(),
            Some(event.stream.as_str()),
            "{event:?}"
        );
        streams
            .entry(event.stream.as_str())
            .or_default()
            .push(event.payload["n"].as_u64().unwrap());
    }
    for (stream, ns) in &streams {
        let mut by_position = ns.clone();
        by_position.sort_unstable();
        by_position.dedup();
        assert_eq!(ns, &by_position, "stream {stream} out of order or repeated");
    }
}

fn payload(key: &str, n: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({"key": key, "n": n})).unwrap()
}

/// The ingest config of a test, from TOML.
fn ingest_config(toml: &str) -> IngestConfig {
    let config: IngestConfig = toml::from_str(toml).expect("ingest TOML");
    assert_eq!(config.validate(), Vec::<(String, String)>::new());
    config
}

/// Events of several streams appended in rounds to `category` of `store`:
/// what a round trip carries out.
async fn append_rounds(
    store: &dyn EventStore,
    category: &str,
    streams: usize,
    rounds: usize,
) -> Vec<StoredEvent> {
    let mut all = Vec::new();
    for round in 0..rounds {
        for s in 0..streams {
            all.extend(
                store
                    .append(
                        &Category::new(category).unwrap(),
                        &StreamName::new(format!("order-{s}")).unwrap(),
                        WriteCondition::Any,
                        vec![NewEvent::new(
                            EventName::new(if round % 2 == 0 { "Placed" } else { "Shipped" })
                                .unwrap(),
                            json!({"round": round, "stream": s}),
                        )],
                    )
                    .await
                    .expect("append"),
            );
        }
    }
    all
}

/// What came back in equals what went out: ids, names, payloads, per stream
/// in order, nothing twice.
fn assert_round_trip(sent: &[StoredEvent], back: &[StoredEvent]) {
    let key = |e: &StoredEvent| {
        (
            e.id,
            e.name.to_string(),
            e.stream.to_string(),
            e.payload.to_string(),
        )
    };
    let sent_keys: Vec<_> = sent.iter().map(key).collect();
    let back_keys: BTreeSet<_> = back.iter().map(key).collect();
    assert_eq!(back.len(), sent.len(), "nothing twice");
    assert_eq!(
        back_keys,
        sent_keys.iter().cloned().collect::<BTreeSet<_>>()
    );
    let per_stream = |events: &[StoredEvent]| {
        let mut streams: BTreeMap<String, Vec<uuid::Uuid>> = BTreeMap::new();
        for event in events {
            streams
                .entry(event.stream.to_string())
                .or_default()
                .push(event.id);
        }
        streams
    };
    let mut back_sorted = back.to_vec();
    back_sorted.sort_by_key(|e| (e.stream.to_string(), e.position));
    assert_eq!(
        per_stream(&back_sorted),
        per_stream(sent),
        "each stream in order"
    );
}

// ---------------------------------------------------------------------------
// The store's fencing, on both stores

fn one_event(n: u64) -> Vec<StreamAppend> {
    let event = NewEvent::new(EventName::new("E").unwrap(), json!(n));
    vec![StreamAppend::new(
        StreamName::new("s").unwrap(),
        WriteCondition::Any,
        vec![event],
    )]
}

/// The events of stream `s` of `ingested`: a stream read, which no other
/// test's open transaction holds back.
async fn stream_s(events: &dyn EventStore) -> Vec<StoredEvent> {
    let source: Source = "stream:ingested/s".parse().unwrap();
    events
        .read(&source, Cursor::START, 100)
        .await
        .expect("read")
}

async fn a_fenced_owners_append_fails_whole(store: &dyn IngestStore, events: &dyn EventStore) {
    let source: Source = "ingest:in/orders@0".parse().unwrap();
    let category = Category::new("ingested").unwrap();
    let (old, position) = store
        .claim("in", &source, "node-1/ingest", Some(Grant::new(3, 1)))
        .await
        .unwrap();
    assert_eq!(position, None, "nothing stored yet");
    store
        .append(&old, &category, &one_event(0), 41)
        .await
        .unwrap();
    let (new, position) = store
        .claim("in", &source, "node-2/ingest", Some(Grant::new(3, 2)))
        .await
        .unwrap();
    assert_eq!(
        position,
        Some(41),
        "the new owner resumes after the old one's last append"
    );
    let refused = store
        .append(&old, &category, &one_event(1), 42)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, CheckpointError::Fenced { .. }),
        "{refused}"
    );
    let refused = store.append(&old, &category, &[], 43).await.unwrap_err();
    assert!(
        matches!(refused, CheckpointError::Fenced { .. }),
        "a position alone is fenced too"
    );
    let stored = stream_s(events).await;
    assert_eq!(
        stored
            .iter()
            .map(|e| e.payload.clone())
            .collect::<Vec<Value>>(),
        [json!(0)]
    );
    let positions = store.positions(Some("in")).await.unwrap();
    assert_eq!(
        positions.iter().map(|p| p.position).collect::<Vec<_>>(),
        [41],
        "the fenced position was not stored"
    );
    store
        .append(&new, &category, &one_event(1), 42)
        .await
        .unwrap();
    assert_eq!(stream_s(events).await.len(), 2);
    // An idempotency key the category holds stores nothing again, and moves the position.
    let keyed = |n| {
        let event = NewEvent::new(EventName::new("E").unwrap(), json!(n))
            .with_idempotency_key("k-1".parse().unwrap());
        vec![StreamAppend::new(
            StreamName::new("s").unwrap(),
            WriteCondition::Any,
            vec![event],
        )]
    };
    store.append(&new, &category, &keyed(2), 43).await.unwrap();
    store.append(&new, &category, &keyed(3), 44).await.unwrap();
    assert_eq!(stream_s(events).await.len(), 3);
    let positions = store.positions(None).await.unwrap();
    assert_eq!(
        positions.iter().map(|p| p.position).collect::<Vec<_>>(),
        [44]
    );
}

#[tokio::test]
async fn a_fenced_owners_append_fails_whole_in_memory() {
    let events = Arc::new(MemoryStore::new());
    let store = MemoryIngestStore::new(events.clone());
    a_fenced_owners_append_fails_whole(&store, events.as_ref()).await;
}

#[tokio::test]
async fn a_fenced_owners_append_fails_whole_in_postgres() {
    let Some(db) = TestPostgres::start().await else {
        return;
    };
    let store = PostgresIngestStore::new(Arc::clone(&db.store));
    a_fenced_owners_append_fails_whole(&store, db.store.as_ref()).await;
}
