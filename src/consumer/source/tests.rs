use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::consumer::processor::from_fn;
use crate::consumer::testing::append_order;
use crate::consumer::{CheckpointStore, MemoryCheckpointStore, MemoryDeadLetterStore};
use crate::store::MemoryStore;

/// The consumer's state on its board.
fn state(board: &Board, source: &Source) -> Option<ConsumerState> {
    board
        .states_now()
        .into_iter()
        .find(|(key, _)| &key.source == source)
        .map(|(_, state)| state)
}

#[tokio::test]
async fn a_consumer_fenced_just_before_it_is_stopped_reports_stopped() {
    let events = Arc::new(MemoryStore::new());
    let checkpoints = Arc::new(MemoryCheckpointStore::new());
    let board = Board::default();
    let context = Arc::new(ConsumerContext {
        group: "g".into(),
        owner: "a".into(),
        events: events.clone(),
        checkpoints: checkpoints.clone(),
        dead_letters: Arc::new(MemoryDeadLetterStore::new()),
        processor: Arc::new(from_fn(|_| async { Ok(()) })),
        settings: ConsumerSettings {
            poll_interval: Duration::from_millis(10),
            ..ConsumerSettings::default()
        },
        executor: Executor::Main,
        board: board.clone(),
        pause: Default::default(),
    });
    let orders: Source = "category:orders".parse().unwrap();
    let consumer = RunningConsumer::spawn(context, orders.clone());
    tokio::time::timeout(Duration::from_secs(30), async {
        while state(&board, &orders) != Some(ConsumerState::Running) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the consumer never ran");

    // Another owner claims the source; the consumer finds out at its next batch
    // and ends on its own, fenced, before anyone asks it to stop.
    checkpoints.claim("g", &orders, "b").await.unwrap();
    append_order(&events).await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while !consumer.is_fenced() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the consumer was never fenced");

    // The withdraw that follows stops it as it would a running one: it must not
    // stay fenced, or it would count as a source this node owns.
    assert_eq!(consumer.stop(Duration::from_secs(1)).await, None);
    assert_eq!(state(&board, &orders), Some(ConsumerState::Stopped));
}

/// Appends one event per name to stream `o-1` of `orders`, with `tenant` in
/// its metadata.
async fn append_named(store: &MemoryStore, names: &[(&str, &str)]) -> Vec<StoredEvent> {
    use crate::event::{Category, EventName, NewEvent, StreamName, WriteCondition};
    let events = names
        .iter()
        .map(|(name, tenant)| {
            NewEvent::new(EventName::new(*name).unwrap(), serde_json::json!({}))
                .with_metadata(serde_json::json!({ "tenant": tenant }))
        })
        .collect();
    store
        .append(
            &Category::new("orders").unwrap(),
            &StreamName::new("o-1").unwrap(),
            WriteCondition::Any,
            events,
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn filtered_events_are_counted_and_passed_over_up_to_the_end_of_the_batch() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let rendered = recorder.handle();
    // The test's runtime has one thread, the consumer's task runs on it.
    let _recording = ::metrics::set_default_local_recorder(&recorder);

    let events = Arc::new(MemoryStore::new());
    let checkpoints = Arc::new(MemoryCheckpointStore::new());
    let board = Board::default();
    let processed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&processed);
    let filter: crate::consumer::EventFilter = toml::from_str(
        r#"
        names = ["Order*"]
        exclude_names = ["OrderViewed"]
        metadata = { tenant = "eu" }
        "#,
    )
    .unwrap();
    let context = Arc::new(ConsumerContext {
        group: "g".into(),
        owner: "a".into(),
        events: events.clone(),
        checkpoints: checkpoints.clone(),
        dead_letters: Arc::new(MemoryDeadLetterStore::new()),
        processor: Arc::new(from_fn(move |event: StoredEvent| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(event.name.as_str().to_owned());
                Ok(())
            }
        })),
        settings: ConsumerSettings {
            poll_interval: Duration::from_millis(10),
            batch_size: 4,
            checkpoint_every: 1,
            filter: Some(filter),
            ..ConsumerSettings::default()
        },
        executor: Executor::Main,
        board: board.clone(),
        pause: Default::default(),
    });
    // Batches of four: the second holds nothing the filter keeps, the third
    // ends with events it drops.
    let appended = append_named(
        &events,
        &[
            ("OrderPlaced", "eu"),
            ("OrderViewed", "eu"),
            ("OrderPlaced", "us"),
            ("Debug", "eu"),
            ("Debug", "eu"),
            ("OrderViewed", "eu"),
            ("Debug", "eu"),
            ("OrderPlaced", "us"),
            ("OrderShipped", "eu"),
            ("OrderViewed", "eu"),
            ("Debug", "eu"),
        ],
    )
    .await;
    let orders: Source = "category:orders".parse().unwrap();
    let consumer = RunningConsumer::spawn(context, orders.clone());
    let last = appended.last().unwrap().cursor;
    let key = ConsumerKey {
        group: "g".into(),
        owner: "a".into(),
        source: orders.clone(),
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        while board.entries().get(&key).and_then(|entry| entry.cursor) != Some(last) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the consumer never reached the last event");
    assert_eq!(consumer.stop(Duration::from_secs(5)).await, Some(last));
    assert_eq!(*processed.lock().unwrap(), ["OrderPlaced", "OrderShipped"]);
    let stored = checkpoints.load("g", &orders).await.unwrap().unwrap();
    assert_eq!(
        stored.cursor, last,
        "the checkpoint passes the filtered tail"
    );
    let text = rendered.render();
    assert!(
        text.contains(r#"weir_events_filtered_total{group="g"} 9"#),
        "{text}"
    );
    assert!(
        text.contains(r#"weir_consumer_events_total{group="g"} 2"#),
        "{text}"
    );
}
