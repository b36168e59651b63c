//! The EventRuntime end to end: real events appended to a store (memory and
//! Postgres) are processed by registered consumers under their settings and error
//! policies, with checkpoints and dead letters stored beside them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::time::Instant;
use uuid::Uuid;
use weir::broker::{Broker, BrokerError, BrokerRole, SingletonBroker, Subscriber, SubscriberSpec};
use weir::consumer::policy::ErrorPolicy;
use weir::consumer::{ConsumerSettings, ConsumerState, EventProcessor, Isolation, ProcessError};
use weir::event::{
    Category, Cursor, EventName, NewEvent, Source, StoredEvent, StreamName, WriteCondition,
};
use weir::runtime::{EventRuntime, Outcome, RuntimeError};
use weir::store::EventStore;

use crate::common;
use crate::common::ConsumerBackend as Backend;

const WAIT: Duration = Duration::from_secs(20);

on_every_backend!(
    Backend:
    subscription_consumers_process_every_event_once_in_stream_order,
    consumers_wake_on_appends_without_polling,
    a_restarted_consumer_resumes_after_its_checkpoint,
    filtered_events_move_the_checkpoint_and_are_not_read_again_after_a_restart,
    checkpoints_are_stored_every_n_events,
    a_fenced_consumer_stops_and_leaves_the_checkpoint_alone,
    continue_skips_failing_events_as_dead_letters,
    retry_tries_again_then_hands_over_to_its_next_policy,
    stop_halts_only_the_failing_source,
    exit_and_raise_stop_the_runtime,
    a_batch_failing_without_an_index_is_split_to_find_the_event,
    changing_the_partition_count_loses_and_repeats_nothing,
);

fn category(name: &str) -> Category {
    Category::new(name).unwrap()
}

fn source(text: &str) -> Source {
    text.parse().unwrap()
}

/// Appends `count` events to stream `stream` of `category`, each with payload `{"n": i}`
/// (plus `extra` fields for the indexes in `marked`).
async fn append(
    store: &dyn EventStore,
    category_name: &str,
    stream: &str,
    count: usize,
    marked: &[usize],
) -> Vec<StoredEvent> {
    let events = (0..count)
        .map(|n| {
            let payload = if marked.contains(&n) {
                json!({"n": n, "poison": true})
            } else {
                json!({"n": n})
            };
            NewEvent::new(EventName::new("Happened").unwrap(), payload)
        })
        .collect();
    append_events(store, category_name, stream, events).await
}

async fn append_events(
    store: &dyn EventStore,
    category_name: &str,
    stream: &str,
    events: Vec<NewEvent>,
) -> Vec<StoredEvent> {
    store
        .append(
            &category(category_name),
            &StreamName::new(stream).unwrap(),
            WriteCondition::Any,
            events,
        )
        .await
        .unwrap()
}

/// Records what it processes; fails on events whose payload has `"poison": true`,
/// with kind `poison`, as often as `failures` says (forever by default).
#[derive(Default)]
struct Recorder {
    processed: Mutex<Vec<StoredEvent>>,
    batches: Mutex<Vec<usize>>,
    threads: Mutex<Vec<String>>,
    attempts: Mutex<HashMap<Uuid, usize>>,
    /// How many times a poisoned event fails before it succeeds; `None`: always.
    failures: Option<usize>,
    /// Fail the whole batch without saying which event.
    no_index: bool,
}

impl Recorder {
    fn failing(times: usize) -> Self {
        Self {
            failures: Some(times),
            ..Self::default()
        }
    }

    fn processed(&self) -> Vec<StoredEvent> {
        self.processed.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.processed.lock().unwrap().len()
    }

    async fn wait_for(&self, count: usize) {
        let started = Instant::now();
        while self.count() < count {
            assert!(
                started.elapsed() < WAIT,
                "processed {} of {count}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl EventProcessor for Recorder {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        self.batches.lock().unwrap().push(events.len());
        self.threads
            .lock()
            .unwrap()
            .push(std::thread::current().name().unwrap_or("").to_owned());
        for (index, event) in events.iter().enumerate() {
            if event.payload.get("poison").is_some() {
                let mut attempts = self.attempts.lock().unwrap();
                let tried = attempts.entry(event.id).or_default();
                *tried += 1;
                if self.failures.is_none_or(|times| *tried <= times) {
                    let error =
                        ProcessError::new("poison", format!("event {} is poisoned", event.id));
                    if self.no_index {
                        return Err(error);
                    }
                    // Those before it are done.
                    self.processed
                        .lock()
                        .unwrap()
                        .extend_from_slice(&events[..index]);
                    return Err(error.at(index));
                }
            }
        }
        self.processed.lock().unwrap().extend_from_slice(events);
        Ok(())
    }
}

fn settings() -> ConsumerSettings {
    ConsumerSettings {
        poll_interval: Duration::from_millis(50),
        batch_size: 10,
        checkpoint_every: 10,
        checkpoint_interval: Duration::from_secs(3600),
        ..ConsumerSettings::default()
    }
}

fn runtime(backend: &Backend, broker: Arc<dyn Broker>) -> EventRuntime {
    EventRuntime::new("node-a", broker, backend.stores.clone(), settings())
        .with_shutdown_grace(Duration::from_secs(5))
}

fn spec(group: &str, sources: &[&str]) -> SubscriberSpec {
    SubscriberSpec::new(
        group,
        format!("{group}-1"),
        sources.iter().map(|s| source(s)),
    )
}

async fn checkpoint(backend: &Backend, group: &str, of: &str) -> Cursor {
    backend
        .stores
        .checkpoints
        .load(group, &source(of))
        .await
        .unwrap()
        .map_or(Cursor::START, |c| c.cursor)
}

fn consumer_state(runtime: &EventRuntime, group: &str, of: &str) -> Option<ConsumerState> {
    runtime
        .status()
        .consumers
        .into_iter()
        .find(|c| c.key.group == group && c.key.source == source(of))
        .map(|c| c.state)
}

async fn wait_for_state(
    runtime: &EventRuntime,
    group: &str,
    of: &str,
    wanted: fn(&ConsumerState) -> bool,
) {
    let started = Instant::now();
    loop {
        let state = consumer_state(runtime, group, of);
        if state.as_ref().is_some_and(wanted) {
            return;
        }
        assert!(started.elapsed() < WAIT, "consumer of {of} is {state:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn subscription_consumers_process_every_event_once_in_stream_order(backend: Backend) {
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    let recorder = Arc::new(Recorder::default());
    runtime
        .register_subscription_consumer(
            spec("billing", &["category:orders", "category:refunds"]),
            recorder.clone(),
            None,
        )
        .unwrap();
    runtime.start().await.unwrap();
    let store = backend.stores.events.as_ref();
    let mut appended = Vec::new();
    for stream in 0..5 {
        appended.extend(append(store, "orders", &format!("order-{stream}"), 40, &[]).await);
        appended.extend(append(store, "refunds", &format!("refund-{stream}"), 10, &[]).await);
    }
    // Not subscribed: never processed.
    append(store, "audit", "audit-1", 5, &[]).await;
    recorder.wait_for(appended.len()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let processed = recorder.processed();
    assert_eq!(
        processed.len(),
        appended.len(),
        "processed more than appended"
    );
    let mut counts: HashMap<Uuid, usize> = HashMap::new();
    for event in &processed {
        *counts.entry(event.id).or_default() += 1;
    }
    assert!(appended.iter().all(|e| counts.get(&e.id) == Some(&1)));
    let mut next: BTreeMap<String, u64> = BTreeMap::new();
    for event in &processed {
        let expected = next
            .entry(format!("{}/{}", event.category, event.stream))
            .or_default();
        assert_eq!(
            event.position, *expected,
            "{}/{} out of order",
            event.category, event.stream
        );
        *expected += 1;
    }
    runtime.stop().await;
    // Stopping stored each source's checkpoint at its last event.
    let last_order = appended
        .iter()
        .filter(|e| e.category.as_str() == "orders")
        .map(|e| e.cursor)
        .max();
    assert_eq!(
        Some(checkpoint(&backend, "billing", "category:orders").await),
        last_order
    );
}

async fn consumers_wake_on_appends_without_polling(backend: Backend) {
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    let recorder = Arc::new(Recorder::default());
    let never_poll = ConsumerSettings {
        poll_interval: Duration::from_secs(3600),
        ..settings()
    };
    runtime
        .register_subscription_consumer(
            spec("g", &["category:orders"]),
            recorder.clone(),
            Some(never_poll),
        )
        .unwrap();
    runtime.start().await.unwrap();
    // Let the consumer reach its wait, then append: only a notification wakes it.
    wait_for_state(&runtime, "g", "category:orders", |s| {
        *s == ConsumerState::Running
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    append(backend.stores.events.as_ref(), "orders", "order-1", 3, &[]).await;
    recorder.wait_for(3).await;
    append(backend.stores.events.as_ref(), "orders", "order-2", 2, &[]).await;
    recorder.wait_for(5).await;
    runtime.stop().await;
}

async fn a_restarted_consumer_resumes_after_its_checkpoint(backend: Backend) {
    let store = Arc::clone(&backend.stores.events);
    let first = append(store.as_ref(), "orders", "order-1", 25, &[]).await;
    let recorder = Arc::new(Recorder::default());
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    runtime
        .register_consumer(
            "projection",
            source("category:orders"),
            recorder.clone(),
            None,
        )
        .unwrap();
    runtime.start().await.unwrap();
    recorder.wait_for(25).await;
    runtime.stop().await;
    assert_eq!(
        checkpoint(&backend, "projection", "category:orders").await,
        first[24].cursor
    );

    let second = append(store.as_ref(), "orders", "order-1", 5, &[]).await;
    let again = Arc::new(Recorder::default());
    let restarted = self::runtime(&backend, Arc::new(SingletonBroker::new()));
    restarted
        .register_consumer("projection", source("category:orders"), again.clone(), None)
        .unwrap();
    restarted.start().await.unwrap();
    again.wait_for(5).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ids: Vec<Uuid> = again.processed().iter().map(|e| e.id).collect();
    assert_eq!(ids, second.iter().map(|e| e.id).collect::<Vec<_>>());
    restarted.stop().await;
}

/// Appends one event per name to `stream` of `category`, payload `{"n": i}`.
async fn append_named(
    store: &dyn EventStore,
    category_name: &str,
    stream: &str,
    names: &[&str],
) -> Vec<StoredEvent> {
    let events = names
        .iter()
        .enumerate()
        .map(|(n, name)| NewEvent::new(EventName::new(*name).unwrap(), json!({ "n": n })))
        .collect();
    append_events(store, category_name, stream, events).await
}

async fn filtered_events_move_the_checkpoint_and_are_not_read_again_after_a_restart(
    backend: Backend,
) {
    let store = Arc::clone(&backend.stores.events);
    // The batch's last events are ones the filter drops: the checkpoint must
    // still pass them.
    let names = [
        "OrderPlaced",
        "Debug",
        "OrderPlaced",
        "OrderViewed",
        "Debug",
        "OrderShipped",
        "Debug",
        "OrderViewed",
    ];
    let first = append_named(store.as_ref(), "orders", "order-1", &names).await;
    let filter: weir::consumer::EventFilter = toml::from_str(
        r#"names = ["Order*"]
                         exclude_names = ["OrderViewed"]"#,
    )
    .unwrap();
    let filtered = ConsumerSettings {
        batch_size: 3,
        filter: Some(filter),
        ..settings()
    };
    let recorder = Arc::new(Recorder::default());
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    runtime
        .register_subscription_consumer(
            spec("g", &["category:orders"]),
            recorder.clone(),
            Some(filtered.clone()),
        )
        .unwrap();
    runtime.start().await.unwrap();
    recorder.wait_for(3).await;
    // Until the consumer has passed the filtered tail too.
    let last = first.last().unwrap().cursor;
    let started = Instant::now();
    while runtime
        .status()
        .consumers
        .iter()
        .find(|c| c.key.group == "g")
        .and_then(|c| c.cursor)
        != Some(last)
    {
        assert!(
            started.elapsed() < WAIT,
            "the consumer never passed the tail"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    runtime.stop().await;
    let names_of = |events: Vec<StoredEvent>| -> Vec<String> {
        events.iter().map(|e| e.name.as_str().to_owned()).collect()
    };
    assert_eq!(
        names_of(recorder.processed()),
        ["OrderPlaced", "OrderPlaced", "OrderShipped"]
    );
    assert_eq!(checkpoint(&backend, "g", "category:orders").await, last);

    // After a restart, only what came since is read: nothing filtered before
    // is read again, and the filter goes on dropping.
    let second = append_named(store.as_ref(), "orders", "order-1", &["Debug", "OrderPaid"]).await;
    let again = Arc::new(Recorder::default());
    let restarted = self::runtime(&backend, Arc::new(SingletonBroker::new()));
    restarted
        .register_subscription_consumer(
            spec("g", &["category:orders"]),
            again.clone(),
            Some(filtered),
        )
        .unwrap();
    restarted.start().await.unwrap();
    again.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    restarted.stop().await;
    assert_eq!(names_of(again.processed()), ["OrderPaid"]);
    assert_eq!(
        checkpoint(&backend, "g", "category:orders").await,
        second[1].cursor
    );
}

async fn checkpoints_are_stored_every_n_events(backend: Backend) {
    let store = Arc::clone(&backend.stores.events);
    let events = append(store.as_ref(), "orders", "order-1", 25, &[]).await;
    let recorder = Arc::new(Recorder::default());
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    let every_ten = ConsumerSettings {
        batch_size: 5,
        checkpoint_every: 10,
        ..settings()
    };
    runtime
        .register_consumer(
            "g",
            source("category:orders"),
            recorder.clone(),
            Some(every_ten),
        )
        .unwrap();
    runtime.start().await.unwrap();
    recorder.wait_for(25).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Stored after the 10th and 20th events; the last 5 wait for the next store.
    assert_eq!(
        checkpoint(&backend, "g", "category:orders").await,
        events[19].cursor
    );
    assert_eq!(*recorder.batches.lock().unwrap(), [5, 5, 5, 5, 5]);
    runtime.stop().await;
    assert_eq!(
        checkpoint(&backend, "g", "category:orders").await,
        events[24].cursor
    );
}

async fn a_fenced_consumer_stops_and_leaves_the_checkpoint_alone(backend: Backend) {
    let store = Arc::clone(&backend.stores.events);
    let recorder = Arc::new(Recorder::default());
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    let save_each = ConsumerSettings {
        checkpoint_every: 1,
        ..settings()
    };
    runtime
        .register_consumer(
            "g",
            source("category:orders"),
            recorder.clone(),
            Some(save_each),
        )
        .unwrap();
    runtime.start().await.unwrap();
    let before = append(store.as_ref(), "orders", "order-1", 3, &[]).await;
    recorder.wait_for(3).await;
    wait_for_saved(&backend, before[2].cursor).await;

    // Someone else takes the source over.
    let (_, cursor) = backend
        .stores
        .checkpoints
        .claim("g", &source("category:orders"), "intruder")
        .await
        .unwrap();
    assert_eq!(cursor, before[2].cursor);
    append(store.as_ref(), "orders", "order-1", 3, &[]).await;
    wait_for_state(&runtime, "g", "category:orders", |s| {
        matches!(s, ConsumerState::Fenced(_))
    })
    .await;
    let Some(ConsumerState::Fenced(reason)) = consumer_state(&runtime, "g", "category:orders")
    else {
        unreachable!()
    };
    assert!(reason.contains("intruder"), "{reason}");
    assert!(!runtime.status().is_healthy());
    // It processed the batch whose save was refused, then nothing more.
    let processed = recorder.count();
    append(store.as_ref(), "orders", "order-1", 3, &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(recorder.count(), processed);
    let row = backend
        .stores
        .checkpoints
        .load("g", &source("category:orders"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.owner.as_str(), row.cursor),
        ("intruder", before[2].cursor)
    );
    runtime.stop().await;
    let row = backend
        .stores
        .checkpoints
        .load("g", &source("category:orders"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        row.cursor, before[2].cursor,
        "stopping a fenced consumer saved nothing"
    );
}

async fn wait_for_saved(backend: &Backend, cursor: Cursor) {
    let started = Instant::now();
    while checkpoint(backend, "g", "category:orders").await != cursor {
        assert!(
            started.elapsed() < WAIT,
            "checkpoint never reached {cursor}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn continue_skips_failing_events_as_dead_letters(backend: Backend) {
    let store = Arc::clone(&backend.stores.events);
    let events = append(store.as_ref(), "orders", "order-1", 12, &[3, 7]).await;
    let recorder = Arc::new(Recorder::default());
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    runtime
        .register_subscription_consumer(spec("g", &["category:orders"]), recorder.clone(), None)
        .unwrap();
    runtime.start().await.unwrap();
    recorder.wait_for(10).await;
    runtime.stop().await;
    let processed: Vec<u64> = recorder.processed().iter().map(|e| e.position).collect();
    assert_eq!(processed, [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]);
    let letters = backend
        .stores
        .dead_letters
        .list(Some("g"), 0, 10)
        .await
        .unwrap();
    let skipped: Vec<Uuid> = letters.iter().map(|l| l.event_id).collect();
    assert_eq!(skipped, [events[3].id, events[7].id]);
    assert_eq!(letters[0].kind, "poison");
    assert_eq!(letters[0].attempts, 1);
    assert_eq!(letters[0].source, source("category:orders"));
    assert!(
        letters[0].error.contains("poisoned"),
        "{}",
        letters[0].error
    );
    assert_eq!(
        checkpoint(&backend, "g", "category:orders").await,
        events[11].cursor
    );
}

async fn retry_tries_again_then_hands_over_to_its_next_policy(backend: Backend) {
    let store = Arc::clone(&backend.stores.events);
    let events = append(store.as_ref(), "orders", "order-1", 5, &[1]).await;
    let more = append(store.as_ref(), "refunds", "refund-1", 5, &[2]).await;
    let fast_retry = |then| ConsumerSettings {
        error_policy: ErrorPolicy::retry(
            Duration::from_millis(5),
            Duration::from_millis(20),
            3,
            then,
        ),
        ..settings()
    };
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    // Fails twice, then succeeds on the third try: processed once, no dead letter.
    let recovers = Arc::new(Recorder::failing(2));
    runtime
        .register_consumer(
            "recovers",
            source("category:orders"),
            recovers.clone(),
            Some(fast_retry(ErrorPolicy::Stop)),
        )
        .unwrap();
    // Fails for ever: three tries, then the next policy (continue) skips it.
    let gives_up = Arc::new(Recorder::default());
    runtime
        .register_consumer(
            "gives-up",
            source("category:refunds"),
            gives_up.clone(),
            Some(fast_retry(ErrorPolicy::Continue)),
        )
        .unwrap();
    runtime.start().await.unwrap();
    recovers.wait_for(5).await;
    gives_up.wait_for(4).await;
    runtime.stop().await;
    let ids: Vec<Uuid> = recovers.processed().iter().map(|e| e.id).collect();
    assert_eq!(ids, events.iter().map(|e| e.id).collect::<Vec<_>>());
    assert_eq!(recovers.attempts.lock().unwrap()[&events[1].id], 3);
    assert!(
        backend
            .stores
            .dead_letters
            .list(Some("recovers"), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let letters = backend
        .stores
        .dead_letters
        .list(Some("gives-up"), 0, 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].event_id, letters[0].attempts), (more[2].id, 3));
    assert_eq!(gives_up.attempts.lock().unwrap()[&more[2].id], 3);
}

async fn stop_halts_only_the_failing_source(backend: Backend) {
    let store = Arc::clone(&backend.stores.events);
    let orders = append(store.as_ref(), "orders", "order-1", 6, &[2]).await;
    append(store.as_ref(), "refunds", "refund-1", 6, &[]).await;
    let recorder = Arc::new(Recorder::default());
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    let stop = ConsumerSettings {
        error_policy: ErrorPolicy::Stop,
        ..settings()
    };
    runtime
        .register_subscription_consumer(
            spec("g", &["category:orders", "category:refunds"]),
            recorder.clone(),
            Some(stop),
        )
        .unwrap();
    runtime.start().await.unwrap();
    wait_for_state(&runtime, "g", "category:orders", |s| {
        matches!(s, ConsumerState::Failed(_))
    })
    .await;
    // The other source goes on.
    append(store.as_ref(), "refunds", "refund-2", 4, &[]).await;
    recorder.wait_for(2 + 10).await;
    let Some(ConsumerState::Failed(reason)) = consumer_state(&runtime, "g", "category:orders")
    else {
        unreachable!()
    };
    assert!(reason.contains(&orders[2].id.to_string()), "{reason}");
    assert!(!runtime.status().is_healthy());
    // Stored up to the event before the failure, which is left for later.
    assert_eq!(
        checkpoint(&backend, "g", "category:orders").await,
        orders[1].cursor
    );
    append(store.as_ref(), "orders", "order-2", 2, &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let orders_processed = recorder
        .processed()
        .iter()
        .filter(|e| e.category.as_str() == "orders")
        .count();
    assert_eq!(orders_processed, 2);
    runtime.stop().await;
}

async fn exit_and_raise_stop_the_runtime(backend: Backend) {
    let store = Arc::clone(&backend.stores.events);
    append(store.as_ref(), "orders", "order-1", 4, &[2]).await;
    for (policy, expected) in [
        (ErrorPolicy::Exit { code: 75 }, Ok(Outcome::Exit(75))),
        (ErrorPolicy::Raise, Err("poison")),
    ] {
        let recorder = Arc::new(Recorder::default());
        let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
        let group = format!("{policy:?}").to_lowercase().replace(' ', "");
        let group: String = group.chars().filter(char::is_ascii_alphanumeric).collect();
        runtime
            .register_consumer(
                &group,
                source("category:orders"),
                recorder.clone(),
                Some(ConsumerSettings {
                    error_policy: policy,
                    ..settings()
                }),
            )
            .unwrap();
        // Runs until the policy stops it: the shutdown signal never comes.
        let outcome = tokio::time::timeout(WAIT, runtime.run_until(std::future::pending()))
            .await
            .expect("the policy stopped the runtime");
        match (outcome, expected) {
            (Ok(outcome), Ok(expected)) => assert_eq!(outcome, expected),
            (Err(RuntimeError::Raised(error)), Err(kind)) => assert_eq!(error.kind(), kind),
            (other, expected) => panic!("{other:?}, expected {expected:?}"),
        }
        assert_eq!(recorder.count(), 2);
        // The events before the failure are stored as processed.
        let events = store
            .read(&source("category:orders"), Cursor::START, 10)
            .await
            .unwrap();
        assert_eq!(
            checkpoint(&backend, &group, "category:orders").await,
            events[1].cursor
        );
    }
}

async fn a_batch_failing_without_an_index_is_split_to_find_the_event(backend: Backend) {
    let store = Arc::clone(&backend.stores.events);
    let events = append(store.as_ref(), "orders", "order-1", 8, &[5]).await;
    let recorder = Arc::new(Recorder {
        no_index: true,
        ..Recorder::default()
    });
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    runtime
        .register_consumer("g", source("category:orders"), recorder.clone(), None)
        .unwrap();
    runtime.start().await.unwrap();
    recorder.wait_for(7).await;
    runtime.stop().await;
    let processed: Vec<u64> = recorder.processed().iter().map(|e| e.position).collect();
    assert_eq!(processed, [0, 1, 2, 3, 4, 6, 7]);
    let letters = backend
        .stores
        .dead_letters
        .list(Some("g"), 0, 10)
        .await
        .unwrap();
    assert_eq!(
        letters.iter().map(|l| l.event_id).collect::<Vec<_>>(),
        [events[5].id]
    );
}

// ---- lifecycle and settings (memory only: nothing here depends on the store) ----

/// A subscriber that counts what it is given.
#[derive(Default)]
struct Counting {
    accepted: AtomicUsize,
}

#[async_trait]
impl Subscriber for Counting {
    async fn accept(&self, _: &Source) -> Result<(), weir::broker::SubscriberError> {
        self.accepted.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn withdraw(&self, _: &Source) -> Result<Option<Cursor>, weir::broker::SubscriberError> {
        Ok(None)
    }
}

#[tokio::test]
async fn subscribers_are_handed_to_the_broker() {
    let backend = Backend::memory();
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    let subscriber = Arc::new(Counting::default());
    runtime
        .register_subscriber(spec("g", &["log", "category:a"]), subscriber.clone())
        .unwrap();
    runtime.start().await.unwrap();
    assert_eq!(subscriber.accepted.load(Ordering::SeqCst), 2);
    runtime.stop().await;
}

#[tokio::test]
async fn registering_after_start_and_a_coordinator_only_broker_are_refused() {
    let backend = Backend::memory();
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    runtime.start().await.unwrap();
    let late = runtime.register_subscription_consumer(
        spec("g", &["log"]),
        Arc::new(Recorder::default()),
        None,
    );
    assert!(
        matches!(late, Err(RuntimeError::AlreadyStarted)),
        "{late:?}"
    );
    let late = runtime.register_consumer("g", source("log"), Arc::new(Recorder::default()), None);
    assert!(matches!(late, Err(RuntimeError::AlreadyStarted)));
    runtime.stop().await;
    assert!(matches!(runtime.start().await, Err(RuntimeError::Stopped)));

    let services = common::fleet::Services::memory();
    let coordinator = weir::broker::DistributedBroker::new(
        "node-c",
        BrokerRole::Coordinator,
        common::fleet::settings(),
        services.fleet(),
    );
    let runtime = self::runtime(&backend, Arc::new(coordinator));
    let refused = runtime.register_subscription_consumer(
        spec("g", &["log"]),
        Arc::new(Recorder::default()),
        None,
    );
    assert!(
        matches!(
            refused,
            Err(RuntimeError::Broker(BrokerError::CoordinatorOnly { .. }))
        ),
        "{refused:?}"
    );
    let refused = runtime.register_subscriber(spec("g", &["log"]), Arc::new(Counting::default()));
    assert!(matches!(
        refused,
        Err(RuntimeError::Broker(BrokerError::CoordinatorOnly { .. }))
    ));
}

#[tokio::test]
async fn given_settings_win_over_the_defaults() {
    let backend = Backend::memory();
    let store = Arc::clone(&backend.stores.events);
    append(store.as_ref(), "orders", "order-1", 21, &[]).await;
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    assert_eq!(runtime.default_settings().batch_size, 10);
    let defaults = Arc::new(Recorder::default());
    let own = Arc::new(Recorder::default());
    runtime
        .register_consumer(
            "defaults",
            source("category:orders"),
            defaults.clone(),
            None,
        )
        .unwrap();
    runtime
        .register_consumer(
            "own",
            source("category:orders"),
            own.clone(),
            Some(ConsumerSettings {
                batch_size: 7,
                ..settings()
            }),
        )
        .unwrap();
    runtime.start().await.unwrap();
    defaults.wait_for(21).await;
    own.wait_for(21).await;
    runtime.stop().await;
    assert_eq!(*defaults.batches.lock().unwrap(), [10, 10, 1]);
    assert_eq!(*own.batches.lock().unwrap(), [7, 7, 7]);

    let invalid = ConsumerSettings {
        batch_size: 0,
        ..settings()
    };
    let runtime = self::runtime(&backend, Arc::new(SingletonBroker::new()));
    let refused = runtime.register_consumer(
        "bad",
        source("log"),
        Arc::new(Recorder::default()),
        Some(invalid),
    );
    match refused {
        Err(RuntimeError::InvalidSettings { group, problems }) => {
            assert_eq!(group, "bad");
            assert!(problems.contains("batch_size"), "{problems}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn isolated_consumers_process_on_their_own_threads() {
    let backend = Backend::memory();
    let store = Arc::clone(&backend.stores.events);
    append(store.as_ref(), "orders", "order-1", 3, &[]).await;
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    let mut recorders = Vec::new();
    for (group, isolation) in [
        ("main", Isolation::Main),
        ("shared-1", Isolation::SharedThread),
        ("shared-2", Isolation::SharedThread),
        ("dedicated", Isolation::DedicatedThread),
    ] {
        let recorder = Arc::new(Recorder::default());
        runtime
            .register_consumer(
                group,
                source("category:orders"),
                recorder.clone(),
                Some(ConsumerSettings {
                    isolation,
                    ..settings()
                }),
            )
            .unwrap();
        recorders.push((group, recorder));
    }
    runtime.start().await.unwrap();
    for (_, recorder) in &recorders {
        recorder.wait_for(3).await;
    }
    runtime.stop().await;
    let thread = |group: &str| -> String {
        let recorder = &recorders.iter().find(|(g, _)| *g == group).unwrap().1;
        recorder.threads.lock().unwrap()[0].clone()
    };
    assert!(!thread("main").starts_with("weir-"), "{}", thread("main"));
    assert_eq!(thread("shared-1"), "weir-shared");
    assert_eq!(thread("shared-2"), "weir-shared");
    assert_eq!(thread("dedicated"), "weir-dedicated");
}

/// Checkpoint saves fail while `failing` is set, as when the database is briefly
/// unreachable.
struct FlakyCheckpoints {
    inner: weir::consumer::MemoryCheckpointStore,
    failing: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl weir::consumer::CheckpointStore for FlakyCheckpoints {
    async fn claim(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
    ) -> Result<(weir::consumer::Claim, Cursor), weir::consumer::CheckpointError> {
        self.inner.claim(group, source, owner).await
    }
    async fn claim_granted(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
        grant: weir::broker::Grant,
    ) -> Result<(weir::consumer::Claim, Cursor), weir::consumer::CheckpointError> {
        self.inner.claim_granted(group, source, owner, grant).await
    }
    async fn save(
        &self,
        claim: &weir::consumer::Claim,
        cursor: Cursor,
    ) -> Result<(), weir::consumer::CheckpointError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(weir::store::Error::Unavailable("switched off by the test".into()).into());
        }
        self.inner.save(claim, cursor).await
    }
    async fn verify(
        &self,
        claim: &weir::consumer::Claim,
    ) -> Result<(), weir::consumer::CheckpointError> {
        self.inner.verify(claim).await
    }
    async fn load(
        &self,
        group: &str,
        source: &Source,
    ) -> Result<Option<weir::consumer::Checkpoint>, weir::consumer::CheckpointError> {
        self.inner.load(group, source).await
    }
    async fn list(
        &self,
        group: Option<&str>,
    ) -> Result<Vec<weir::consumer::Checkpoint>, weir::consumer::CheckpointError> {
        self.inner.list(group).await
    }
}

#[tokio::test]
async fn stopping_keeps_trying_to_store_the_final_checkpoint_within_the_grace_period() {
    let checkpoints = Arc::new(FlakyCheckpoints {
        inner: weir::consumer::MemoryCheckpointStore::new(),
        failing: std::sync::atomic::AtomicBool::new(false),
    });
    let mut backend = Backend::memory();
    backend.stores.checkpoints = checkpoints.clone();
    let store = Arc::clone(&backend.stores.events);
    let runtime = Arc::new(runtime(&backend, Arc::new(SingletonBroker::new())));
    let recorder = Arc::new(Recorder::default());
    runtime
        .register_consumer("g", source("category:orders"), recorder.clone(), None)
        .unwrap();
    runtime.start().await.unwrap();
    let events = append(store.as_ref(), "orders", "order-1", 5, &[]).await;
    recorder.wait_for(5).await;

    checkpoints.failing.store(true, Ordering::SeqCst);
    let stopping = tokio::spawn({
        let runtime = Arc::clone(&runtime);
        async move { runtime.stop().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stopping.is_finished(), "stop gave up on the checkpoint");
    checkpoints.failing.store(false, Ordering::SeqCst);
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
    assert_eq!(
        checkpoint(&backend, "g", "category:orders").await,
        events[4].cursor
    );
}

/// A group that consumed `category:orders` as two partitions, one further along
/// than the other, changes to four: the new partitions process exactly the events
/// the old ones had not handled, each once, each stream in order; then back to
/// the whole category, likewise.
async fn changing_the_partition_count_loses_and_repeats_nothing(backend: Backend) {
    let store = backend.stores.events.as_ref();
    let mut appended = Vec::new();
    for round in 0..3 {
        for stream in 0..40 {
            appended.extend(
                append(
                    store,
                    "orders",
                    &format!("order-{stream}"),
                    1 + round % 2,
                    &[],
                )
                .await,
            );
        }
    }
    appended.sort_by_key(|e| e.cursor);
    // The old layout: 0/2 handled everything, 1/2 a third of the events.
    let old_layout = [
        ("category:orders@0/2", appended.last().unwrap().cursor),
        ("category:orders@1/2", appended[appended.len() / 3].cursor),
    ];
    let checkpoints = &backend.stores.checkpoints;
    for (old, cursor) in old_layout {
        let (claim, _) = checkpoints
            .claim("resize", &source(old), "old-node")
            .await
            .unwrap();
        checkpoints.save(&claim, cursor).await.unwrap();
    }
    let handled = |e: &StoredEvent, layout: &[(&str, Cursor)]| {
        layout
            .iter()
            .any(|(old, cursor)| e.cursor <= *cursor && source(old).holds(e))
    };
    let expected: Vec<&StoredEvent> = appended
        .iter()
        .filter(|e| !handled(e, &old_layout))
        .collect();
    assert!(!expected.is_empty() && expected.len() < appended.len());

    let quarters: Vec<String> = (0..4).map(|i| format!("category:orders@{i}/4")).collect();
    let quarters: Vec<&str> = quarters.iter().map(String::as_str).collect();
    let processed = consume_until_idle(&backend, &quarters, expected.len()).await;
    assert_exactly(&processed, &expected);

    // And back to one source: everything was handled by the quarters.
    let more = append(store, "orders", "order-new", 5, &[]).await;
    let processed = consume_until_idle(&backend, &["category:orders"], more.len()).await;
    assert_exactly(&processed, &more.iter().collect::<Vec<_>>());
}

/// Runs group `resize` over `sources` until `count` events are processed and a
/// moment more; what it processed.
async fn consume_until_idle(backend: &Backend, sources: &[&str], count: usize) -> Vec<StoredEvent> {
    let runtime = runtime(backend, Arc::new(SingletonBroker::new()));
    let recorder = Arc::new(Recorder::default());
    runtime
        .register_subscription_consumer(spec("resize", sources), recorder.clone(), None)
        .unwrap();
    runtime.start().await.unwrap();
    recorder.wait_for(count).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    runtime.stop().await;
    recorder.processed()
}

/// `processed` holds each of `expected` exactly once, each stream in order.
fn assert_exactly(processed: &[StoredEvent], expected: &[&StoredEvent]) {
    let mut counts: HashMap<Uuid, usize> = HashMap::new();
    for event in processed {
        *counts.entry(event.id).or_default() += 1;
    }
    let missing = expected
        .iter()
        .filter(|e| !counts.contains_key(&e.id))
        .count();
    assert_eq!(missing, 0, "{missing} of {} events lost", expected.len());
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "repeated: {repeated:?}");
    assert_eq!(
        processed.len(),
        expected.len(),
        "processed events it should have skipped"
    );
    let mut last: HashMap<&str, u64> = HashMap::new();
    for event in processed {
        if let Some(before) = last.insert(event.stream.as_str(), event.position) {
            assert!(
                before < event.position,
                "stream {} out of order",
                event.stream
            );
        }
    }
}

/// Checkpoints whose claims panic, so that a consumer task ends.
struct PanickingCheckpoints(weir::consumer::MemoryCheckpointStore);

#[async_trait]
impl weir::consumer::CheckpointStore for PanickingCheckpoints {
    async fn claim(
        &self,
        _: &str,
        _: &Source,
        _: &str,
    ) -> Result<(weir::consumer::Claim, Cursor), weir::consumer::CheckpointError> {
        panic!("the checkpoint store broke");
    }
    async fn claim_granted(
        &self,
        _: &str,
        _: &Source,
        _: &str,
        _: weir::broker::Grant,
    ) -> Result<(weir::consumer::Claim, Cursor), weir::consumer::CheckpointError> {
        panic!("the checkpoint store broke");
    }
    async fn verify(
        &self,
        claim: &weir::consumer::Claim,
    ) -> Result<(), weir::consumer::CheckpointError> {
        self.0.verify(claim).await
    }
    async fn save(
        &self,
        claim: &weir::consumer::Claim,
        cursor: Cursor,
    ) -> Result<(), weir::consumer::CheckpointError> {
        self.0.save(claim, cursor).await
    }
    async fn load(
        &self,
        group: &str,
        source: &Source,
    ) -> Result<Option<weir::consumer::Checkpoint>, weir::consumer::CheckpointError> {
        self.0.load(group, source).await
    }
    async fn list(
        &self,
        group: Option<&str>,
    ) -> Result<Vec<weir::consumer::Checkpoint>, weir::consumer::CheckpointError> {
        self.0.list(group).await
    }
}

/// A consumer task that panics reports its consumer failed with the panic's
/// message, and the runtime stops and returns the error, so that `weir run` exits
/// non-zero for its orchestrator to restart it.
#[tokio::test]
async fn a_consumer_task_that_panics_fails_its_consumer_and_the_runtime() {
    let mut backend = Backend::memory();
    backend.stores.checkpoints = Arc::new(PanickingCheckpoints(Default::default()));
    let runtime = runtime(&backend, Arc::new(SingletonBroker::new()));
    runtime
        .register_consumer(
            "panics",
            source("category:orders"),
            Arc::new(Recorder::default()),
            None,
        )
        .unwrap();
    let outcome = tokio::time::timeout(WAIT, runtime.run_until(std::future::pending()))
        .await
        .expect("the panic stopped the runtime");
    match outcome {
        Err(RuntimeError::TaskEnded(reason)) => {
            assert!(reason.contains("the checkpoint store broke"), "{reason}");
        }
        other => panic!("expected TaskEnded, got {other:?}"),
    }
    let status = runtime.status();
    assert!(!status.is_healthy());
    assert!(
        status.consumers.iter().any(|c| matches!(
            &c.state,
            ConsumerState::Failed(reason) if reason.contains("panicked")
        )),
        "{status:?}"
    );
}

/// A membership store whose registrations panic, so that the observer task ends.
struct PanickingMembership(weir::broker::membership::MemoryMembershipStore);

#[async_trait]
impl weir::broker::membership::MembershipStore for PanickingMembership {
    async fn register(
        &self,
        _: &weir::broker::membership::Registration,
    ) -> weir::store::Result<weir::broker::membership::MemberRecord> {
        panic!("the membership store broke");
    }
    async fn heartbeat(
        &self,
        node: &str,
        keys: &[weir::broker::membership::SubscriberKey],
    ) -> weir::store::Result<Vec<weir::broker::membership::SubscriberKey>> {
        self.0.heartbeat(node, keys).await
    }
    async fn leave(&self, group: &str, subscriber: &str) -> weir::store::Result<bool> {
        self.0.leave(group, subscriber).await
    }
    async fn live(
        &self,
        group: &str,
        timeout: Duration,
    ) -> weir::store::Result<Vec<weir::broker::membership::MemberRecord>> {
        self.0.live(group, timeout).await
    }
    async fn live_all(
        &self,
        timeout: Duration,
    ) -> weir::store::Result<Vec<weir::broker::membership::MemberRecord>> {
        self.0.live_all(timeout).await
    }
    async fn groups(&self) -> weir::store::Result<Vec<String>> {
        self.0.groups().await
    }
    async fn purge(&self, older_than: Duration) -> weir::store::Result<u64> {
        self.0.purge(older_than).await
    }
}

/// A broker task that ends (here the observer, which panics) makes the broker
/// errored with the reason at once, and the runtime stops with the error.
#[tokio::test]
async fn a_broker_task_that_ends_makes_the_node_unready_and_the_runtime_fail() {
    let backend = Backend::memory();
    let services = weir::broker::distributed::FleetServices {
        membership: Arc::new(PanickingMembership(Default::default())),
        leases: Arc::new(weir::broker::lease::MemoryLeaseStore::new()),
        bus: Arc::new(weir::bus::MemoryBus::new()),
    };
    let broker = weir::broker::DistributedBroker::new(
        "node-a",
        BrokerRole::Observer,
        common::fleet::settings(),
        services,
    );
    let runtime = runtime(&backend, Arc::new(broker));
    runtime
        .register_subscription_consumer(
            spec("g", &["category:orders"]),
            Arc::new(Recorder::default()),
            None,
        )
        .unwrap();
    runtime.start().await.unwrap();
    let started = Instant::now();
    let reason = loop {
        if let weir::broker::BrokerStatus::Errored(reason) = runtime.status().broker {
            break reason;
        }
        assert!(started.elapsed() < WAIT, "the broker still looks fine");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(reason.contains("observer task panicked"), "{reason}");
    let outcome = tokio::time::timeout(WAIT, runtime.wait_until(std::future::pending()))
        .await
        .expect("the ended task stopped the runtime");
    assert!(
        matches!(&outcome, Err(RuntimeError::TaskEnded(r)) if r.contains("membership store broke")),
        "{outcome:?}"
    );
}
