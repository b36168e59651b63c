//! Routes end to end: a group's consumer forwarding through a sink whose routes
//! send consecutive events of one stream to different destinations, read back
//! by the independent readers of `common::reader` (plain clients sharing no
//! code with weir). Each stream's events must arrive in order, across
//! destinations, through a crash of the consumer and its restart.
//!
//! On NATS every route's subject is captured by one JetStream stream, whose
//! stored order is one log over all destinations: a stream's events must appear
//! there in position order. On Kafka each destination is a topic of its own,
//! with no order between topics to read; there each destination's share of a
//! stream must arrive in order, and nothing may be missing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use weir::broker::{SingletonBroker, SubscriberSpec};
use weir::config::{KafkaOptions, NatsOptions};
use weir::consumer::{ConsumerSettings, EventProcessor};
use weir::event::{Category, EventName, NewEvent, StoredEvent, StreamName, WriteCondition};
use weir::runtime::{ConsumerStores, EventRuntime};
use weir::sink::{RouteConfig, Routing, SinkConfig, SinkContext, Unmatched};
use weir::store::{EventStore, MemoryStore};

use crate::common::reader::{Analysis, Deliveries, Delivery, Reader};
use crate::common::{self, unique_name};

const STREAMS: usize = 12;
/// Per round, each stream gets one event of each name, in this order: the
/// routes send consecutive events of a stream to different destinations.
const NAMES: [&str; 4] = ["Placed", "Paid", "Noted", "Shipped"];
const WAIT: Duration = Duration::from_secs(60);

fn routes(toml_text: &str) -> Vec<RouteConfig> {
    #[derive(serde::Deserialize)]
    struct Holder {
        routes: Vec<RouteConfig>,
    }
    toml::from_str::<Holder>(toml_text).expect("routes").routes
}

/// Appends one round: for every stream, one event of each of [`NAMES`],
/// streams interleaved.
async fn append_round(store: &dyn EventStore, category: &str, round: usize) -> Vec<StoredEvent> {
    let mut appended = Vec::new();
    for name in NAMES {
        for stream in 0..STREAMS {
            appended.extend(
                store
                    .append(
                        &Category::new(category).unwrap(),
                        &StreamName::new(format!("s-{stream}")).unwrap(),
                        WriteCondition::Any,
                        vec![NewEvent::new(
                            EventName::new(name).unwrap(),
                            json!({ "round": round }),
                        )],
                    )
                    .await
                    .unwrap(),
            );
        }
    }
    appended
}

fn settings() -> ConsumerSettings {
    ConsumerSettings {
        poll_interval: Duration::from_millis(20),
        // Small batches, checkpoints far apart: a crash repeats events.
        batch_size: 10,
        checkpoint_every: 35,
        checkpoint_interval: Duration::from_secs(60),
        ..ConsumerSettings::default()
    }
}

fn runtime(
    stores: &ConsumerStores,
    sink: Arc<dyn EventProcessor>,
    group: &str,
    category: &str,
) -> EventRuntime {
    let runtime = EventRuntime::new(
        "node",
        Arc::new(SingletonBroker::new()),
        stores.clone(),
        settings(),
    )
    .with_shutdown_grace(Duration::from_secs(5));
    let source = format!("category:{category}").parse().unwrap();
    runtime
        .register_subscription_consumer(SubscriberSpec::new(group, "node/1", [source]), sink, None)
        .unwrap();
    runtime
}

/// Runs a consumer over three rounds of appends, crashing it (no checkpoint
/// stored) after the first and starting it again, until `deliveries` holds
/// every event.
async fn forward_through_a_crash(
    sink: Arc<dyn EventProcessor>,
    group: &str,
    category: &str,
    deliveries: &Deliveries,
) -> Vec<StoredEvent> {
    let store = Arc::new(MemoryStore::new());
    let stores = ConsumerStores::in_memory(store.clone());
    let mut appended = append_round(store.as_ref(), category, 0).await;
    let first = runtime(&stores, Arc::clone(&sink), group, category);
    first.start().await.unwrap();
    wait_for(deliveries, &appended, "the first round").await;
    appended.extend(append_round(store.as_ref(), category, 1).await);
    // Part-way through the second round's batches, a crash.
    tokio::time::sleep(Duration::from_millis(30)).await;
    first.abort().await;
    let second = runtime(&stores, sink, group, category);
    second.start().await.unwrap();
    appended.extend(append_round(store.as_ref(), category, 2).await);
    wait_for(deliveries, &appended, "every round").await;
    second.stop().await;
    appended
}

/// Builds `sink` with `routing` for a group of its own, and forwards a
/// category of its own through it, through a crash, until `reader` has it all.
async fn forward_routed(
    sink: &SinkConfig,
    nats: &NatsOptions,
    kafka: &KafkaOptions,
    routing: &Routing,
    reader: &Reader,
) -> Vec<StoredEvent> {
    let group = unique_name("routed");
    let context = SinkContext {
        group: &group,
        partitions: 1,
        routing,
    };
    let sink = weir::sink::build(sink, nats, kafka, context)
        .await
        .expect("the sink connects");
    let category = unique_name("orders");
    forward_through_a_crash(sink, &group, &category, &reader.deliveries).await
}

async fn wait_for(deliveries: &Deliveries, events: &[StoredEvent], what: &str) {
    let started = Instant::now();
    loop {
        let ids = deliveries.ids();
        let missing = events
            .iter()
            .filter(|e| !ids.contains(&e.id.to_string()))
            .count();
        if missing == 0 {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "{what}: {missing} of {} events never arrived; unreadable: {:?}",
            events.len(),
            deliveries.unreadable()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every event arrived, none out of order within its stream in `log`.
#[track_caller]
fn assert_in_order(log: &[Delivery], what: &str) {
    let analysis = Analysis::of(log);
    assert!(
        analysis.reorders.is_empty(),
        "{what}: {} reorders, the first: {:?}",
        analysis.reorders.len(),
        analysis.reorders.first()
    );
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_routes_keep_each_streams_order_across_subjects_through_a_crash() {
    let Some(client) = crate::nats::shared_client().await else {
        return;
    };
    drop(client);
    let prefix = unique_name("routes");
    let stream = prefix.to_uppercase();
    let _cleanup = crate::nats::StreamCleanup {
        url: common::nats_url(),
        streams: vec![stream.clone()],
    };
    // One JetStream stream capturing every route's subjects: one log to read
    // the order of all destinations from.
    let reader = crate::common::reader::nats(&common::nats_url(), &stream, &format!("{prefix}.>"))
        .await
        .expect("the reader starts");
    let routing = Routing {
        routes: routes(&format!(
            r#"
            [[routes]]
            match = {{ names = ["Placed"] }}
            subject = "{prefix}.placed.{{category}}.{{stream}}"
            [[routes]]
            match = {{ names = ["Pa*"] }}
            subject = "{prefix}.paid.{{stream}}"
            [[routes]]
            match = {{ names = ["Shipped"], category = "nowhere" }}
            subject = "{prefix}.never"
            "#
        )),
        unmatched: Unmatched::Default,
    };
    let nats = NatsOptions {
        url: common::nats_url(),
        ..NatsOptions::default()
    };
    let sink = SinkConfig::nats(format!("{prefix}.other.{{name}}"));
    let appended = forward_routed(&sink, &nats, &KafkaOptions::default(), &routing, &reader).await;
    let log = reader.deliveries.snapshot();
    assert_in_order(&log, "the one stream over every subject");
    assert_eq!(
        reader.deliveries.ids().len(),
        appended.len(),
        "nothing missing, nothing else"
    );
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_routes_keep_each_streams_order_per_destination_through_a_crash() {
    let Some(brokers) = common::kafka_brokers() else {
        return;
    };
    let prefix = unique_name("routes");
    let topics: Vec<String> = ["placed", "paid", "other"]
        .iter()
        .map(|t| format!("{prefix}.{t}"))
        .collect();
    let reader = crate::common::reader::kafka(&brokers, &topics)
        .await
        .expect("the reader starts");
    let routing = Routing {
        routes: routes(&format!(
            r#"
            [[routes]]
            match = {{ names = ["Placed"] }}
            topic = "{prefix}.placed"
            key = "{{stream}}"
            [[routes]]
            match = {{ names = ["Pa*"] }}
            topic = "{prefix}.paid"
            "#
        )),
        unmatched: Unmatched::Default,
    };
    let kafka = KafkaOptions {
        brokers: brokers.clone(),
        ..KafkaOptions::default()
    };
    let sink = SinkConfig::kafka(format!("{prefix}.other"));
    let appended = forward_routed(&sink, &NatsOptions::default(), &kafka, &routing, &reader).await;
    // Which destination each event went to, by its name.
    let destination_of = |event: &StoredEvent| -> &'static str {
        match event.name.as_str() {
            "Placed" => "placed",
            "Paid" => "paid",
            _ => "other",
        }
    };
    let log = reader.deliveries.snapshot();
    for topic in ["placed", "paid", "other"] {
        let sent: std::collections::HashSet<String> = appended
            .iter()
            .filter(|e| destination_of(e) == topic)
            .map(|e| e.id.to_string())
            .collect();
        let share: Vec<Delivery> = log
            .iter()
            .filter(|d| sent.contains(&d.id))
            .cloned()
            .collect();
        let arrived: std::collections::HashSet<String> =
            share.iter().map(|d| d.id.clone()).collect();
        assert_eq!(arrived, sent, "{topic}: everything routed there arrived");
        assert_in_order(&share, topic);
    }
    assert_eq!(reader.deliveries.ids().len(), appended.len());
}
