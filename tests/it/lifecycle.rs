//! Lifecycle events, end to end on in-process nodes (memory and Postgres): a
//! scripted scenario records each of its transitions in `$weir`, in order, read
//! back through the ordinary `EventStore::read`; retention prunes them down to
//! each stream's last; the `log` never shows them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::time::Instant;
use weir::broker::distributed::FleetServices;
use weir::broker::lease::MemoryLeaseStore;
use weir::broker::membership::MemoryMembershipStore;
use weir::broker::{BrokerRole, DistributedBroker, SubscriberSpec};
use weir::bus::MemoryBus;
use weir::consumer::{ConsumerSettings, EventProcessor, ProcessError};
use weir::event::{
    Category, Cursor, EventName, NewEvent, Source, StoredEvent, StreamName, WriteCondition,
};
use weir::lifecycle::{self, Journal, JournalTask, LifecycleEvent, LifecycleSettings};
use weir::postgres::{PostgresLeaseStore, PostgresMembershipStore};
use weir::runtime::{ConsumerStores, EventRuntime};
use weir::store::{EventStore, MemoryStore};

use crate::common;

const WAIT: Duration = Duration::from_secs(30);
const GROUP: &str = "g";

/// One backend's stores and a bus the nodes share.
struct Backend {
    stores: ConsumerStores,
    fleet: FleetServices,
    _db: Option<common::TestPostgres>,
}

impl Backend {
    fn memory() -> Self {
        let stores = ConsumerStores::in_memory(Arc::new(MemoryStore::new()));
        Self {
            stores,
            fleet: FleetServices {
                membership: Arc::new(MemoryMembershipStore::new()),
                leases: Arc::new(MemoryLeaseStore::new()),
                bus: Arc::new(MemoryBus::new()),
            },
            _db: None,
        }
    }

    async fn postgres() -> Option<Self> {
        let db = common::TestPostgres::start().await?;
        Some(Self {
            stores: ConsumerStores::postgres(Arc::clone(&db.store)),
            fleet: FleetServices {
                membership: Arc::new(PostgresMembershipStore::new(Arc::clone(&db.store))),
                leases: Arc::new(PostgresLeaseStore::new(Arc::clone(&db.store))),
                bus: Arc::new(MemoryBus::new()),
            },
            _db: Some(db),
        })
    }
}

on_every_backend!(
    Backend:
    a_scripted_scenario_records_each_transition_in_order,
);

/// Fails permanently on events whose payload has `"poison": true`.
struct Poisoned;

#[async_trait]
impl EventProcessor for Poisoned {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        match events
            .iter()
            .position(|e| e.payload.get("poison").is_some())
        {
            Some(index) => Err(ProcessError::permanent("poison", "a poisoned event").at(index)),
            None => Ok(()),
        }
    }
}

fn settings() -> ConsumerSettings {
    ConsumerSettings {
        poll_interval: Duration::from_millis(50),
        checkpoint_every: 1,
        ..ConsumerSettings::default()
    }
}

fn orders() -> Source {
    "category:orders".parse().unwrap()
}

/// A node of role `role` named `name`, recording into `journal`, running one
/// subscriber `SUBSCRIBER` of [`GROUP`] (consuming `category:orders`) unless it
/// only coordinates.
async fn start_node(
    backend: &Backend,
    journal: &Journal,
    name: &str,
    role: BrokerRole,
    subscriber: &str,
) -> EventRuntime {
    let broker =
        DistributedBroker::new(name, role, common::fleet::settings(), backend.fleet.clone())
            .with_journal(journal.clone());
    let runtime = EventRuntime::new(name, Arc::new(broker), backend.stores.clone(), settings())
        .with_shutdown_grace(Duration::from_secs(5))
        .with_journal(journal.clone());
    if role.observes() {
        let spec = SubscriberSpec::new(GROUP, subscriber, [orders()]);
        runtime
            .register_subscription_consumer(spec, Arc::new(Poisoned), None)
            .unwrap();
    }
    runtime.start().await.unwrap();
    runtime
}

/// A lifecycle event with what varies from run to run (incarnations, ids,
/// reasons) left out.
fn summary(event: &LifecycleEvent) -> String {
    use LifecycleEvent as E;
    let node = |node: &str| node.split('@').next().unwrap_or_default().to_owned();
    match event {
        E::LeaderElected { node: n, .. } => format!("LeaderElected {}", node(n)),
        E::LeaderDeposed {
            node: n, reason, ..
        } => format!("LeaderDeposed {} {reason}", node(n)),
        E::MemberJoined { subscriber, .. } => format!("MemberJoined {subscriber}"),
        E::MemberLeft { subscriber, .. } => format!("MemberLeft {subscriber}"),
        E::MemberDeclaredDead { subscriber, .. } => format!("MemberDeclaredDead {subscriber}"),
        E::SourceAssigned {
            source, subscriber, ..
        } => format!("SourceAssigned {source} {subscriber}"),
        E::SourceReleased {
            source, subscriber, ..
        } => format!("SourceReleased {source} {subscriber}"),
        E::SourceReassigned {
            source, from, to, ..
        } => format!("SourceReassigned {source} {from} {to}"),
        E::ConsumerFenced { subscriber, .. } => format!("ConsumerFenced {subscriber}"),
        E::ConsumerErrored { subscriber, .. } => format!("ConsumerErrored {subscriber}"),
        E::DeadLetterRecorded { kind, .. } => format!("DeadLetterRecorded {kind}"),
        other => format!("{other:?}"),
    }
}

/// Reads `$weir` through the ordinary store API.
async fn lifecycle_events(store: &dyn EventStore) -> Vec<StoredEvent> {
    let source: Source = format!("category:{}", lifecycle::CATEGORY).parse().unwrap();
    store.read(&source, Cursor::START, 10_000).await.unwrap()
}

/// Reads `$weir` from `seen` on until the events after it, summarised, are
/// `expected` (in any order within the step: they come from different tasks);
/// returns the new count.
async fn expect_step(store: &dyn EventStore, seen: usize, expected: &[&str], step: &str) -> usize {
    let started = Instant::now();
    let mut expected: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
    expected.sort();
    loop {
        let events = lifecycle_events(store).await;
        let mut new: Vec<String> = events[seen.min(events.len())..]
            .iter()
            .map(|e| summary(&LifecycleEvent::from_stored(e).expect("a lifecycle event")))
            .collect();
        new.sort();
        if new == expected {
            return events.len();
        }
        assert!(
            new.len() <= expected.len() && started.elapsed() < WAIT,
            "{step}: expected {expected:?}, recorded {new:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn append(store: &dyn EventStore, payload: serde_json::Value) -> StoredEvent {
    let event = NewEvent::new(EventName::new("Placed").unwrap(), payload);
    let category = Category::new("orders").unwrap();
    let stream = StreamName::new("order-1").unwrap();
    store
        .append(&category, &stream, WriteCondition::Any, vec![event])
        .await
        .unwrap()
        .remove(0)
}

async fn a_scripted_scenario_records_each_transition_in_order(backend: Backend) {
    common::init_logging();
    let store = Arc::clone(&backend.stores.events);
    let (journal, task): (Journal, JournalTask) =
        Journal::start(Arc::clone(&store), "test", &LifecycleSettings::default());

    let coordinator = start_node(&backend, &journal, "node-c", BrokerRole::Coordinator, "").await;
    let mut seen = expect_step(
        store.as_ref(),
        0,
        &["LeaderElected node-c"],
        "a leader is elected",
    )
    .await;

    let a = start_node(&backend, &journal, "node-a", BrokerRole::Observer, "a/1").await;
    let step = ["MemberJoined a/1", "SourceAssigned category:orders a/1"];
    seen = expect_step(
        store.as_ref(),
        seen,
        &step,
        "a member joins and is given the source",
    )
    .await;

    append(store.as_ref(), json!({"n": 1, "poison": true})).await;
    let step = ["DeadLetterRecorded poison"];
    seen = expect_step(store.as_ref(), seen, &step, "a dead letter is recorded").await;

    let b = start_node(&backend, &journal, "node-b", BrokerRole::Observer, "b/1").await;
    seen = expect_step(
        store.as_ref(),
        seen,
        &["MemberJoined b/1"],
        "a second member joins",
    )
    .await;

    a.stop().await;
    let step = ["MemberLeft a/1", "SourceReassigned category:orders a/1 b/1"];
    seen = expect_step(
        store.as_ref(),
        seen,
        &step,
        "a member leaves, its source moves",
    )
    .await;

    // Wait for b's consumer to claim the source, then claim it over its head.
    let started = Instant::now();
    while backend
        .stores
        .checkpoints
        .load(GROUP, &orders())
        .await
        .unwrap()
        .is_none_or(|row| row.owner != "b/1")
    {
        assert!(started.elapsed() < WAIT, "b/1 never claimed the source");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    backend
        .stores
        .checkpoints
        .claim(GROUP, &orders(), "intruder")
        .await
        .unwrap();
    append(store.as_ref(), json!({"n": 2})).await;
    let step = ["ConsumerFenced b/1"];
    expect_step(store.as_ref(), seen, &step, "the consumer is fenced").await;

    b.stop().await;
    coordinator.stop().await;
    task.stop().await;
    // Stopping the journal wrote what the stopping nodes recorded: the leader's
    // last term ends the record. (Postgres may show it a moment later, once
    // other transactions on the server have ended.)
    let started = Instant::now();
    let recorded = loop {
        let recorded = lifecycle_events(store.as_ref()).await;
        let last = recorded.last().and_then(LifecycleEvent::from_stored);
        if last
            .as_ref()
            .is_some_and(|last| summary(last) == "LeaderDeposed node-c stopped")
        {
            break recorded;
        }
        assert!(
            started.elapsed() < WAIT,
            "the journal was not flushed on stop: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // The log shows the orders, never weir's own events.
    let log = store
        .read(&Source::Log, Cursor::START, 10_000)
        .await
        .unwrap();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(log.iter().all(|e| e.category.as_str() == "orders"));

    // Retention: everything older than now goes, but each stream's last event.
    let pruned = lifecycle::prune(store.as_ref(), Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!(pruned as usize, recorded.len() - 2);
    let kept: Vec<String> = lifecycle_events(store.as_ref())
        .await
        .iter()
        .map(|e| e.stream.to_string())
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(
        kept.contains(&"fleet".to_owned()) && kept.contains(&"group-g".to_owned()),
        "{kept:?}"
    );
}

/// Fails permanently on every event: a group that cannot take weir's records.
struct Refusing;

#[async_trait]
impl EventProcessor for Refusing {
    async fn process(&self, _: &[StoredEvent]) -> Result<(), ProcessError> {
        Err(ProcessError::permanent("refused", "takes nothing").at(0))
    }
}

/// A group subscribed to `$weir` whose processor refuses its events (under the
/// default `continue` policy) gets dead letters of them, but no lifecycle
/// record of those dead letters: each record would be one more event to refuse,
/// and so on forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_reading_weirs_records_does_not_feed_on_its_own_dead_letters() {
    let backend = Backend::memory();
    let store = Arc::clone(&backend.stores.events);
    let (journal, task) = Journal::start(Arc::clone(&store), "test", &LifecycleSettings::default());
    let broker = DistributedBroker::new(
        "node-w",
        BrokerRole::Full,
        common::fleet::settings(),
        backend.fleet.clone(),
    )
    .with_journal(journal.clone());
    let runtime = EventRuntime::new(
        "node-w",
        Arc::new(broker),
        backend.stores.clone(),
        settings(),
    )
    .with_journal(journal.clone());
    let weir: Source = format!("category:{}", lifecycle::CATEGORY).parse().unwrap();
    runtime
        .register_subscription_consumer(
            SubscriberSpec::new("watcher", "node-w/1", [weir]),
            Arc::new(Refusing),
            None,
        )
        .unwrap();
    runtime.start().await.unwrap();
    let dead_letters = Arc::clone(&backend.stores.dead_letters);
    let started = Instant::now();
    while dead_letters
        .list(Some("watcher"), 0, 10)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(started.elapsed() < WAIT, "no lifecycle event was refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Long enough for a record of a dead letter to be written, read and
    // refused several times over (the consumer polls every 50 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(journal.flush(Duration::from_secs(5)).await);
    let recorded: Vec<StoredEvent> = lifecycle_events(store.as_ref())
        .await
        .into_iter()
        .filter(|event| event.name.as_str() == "DeadLetterRecorded")
        .collect();
    assert!(
        recorded.is_empty(),
        "dead letters of weir's own records were recorded as lifecycle events: {recorded:?}"
    );
    runtime.stop().await;
    task.stop().await;
}

/// Retention keeps the lifecycle events a subscriber of `$weir` has still to
/// read (a paused or failing one), whatever their age: only what the lowest
/// checkpoint of a `$weir` source has passed goes.
#[tokio::test]
async fn retention_keeps_what_a_reader_of_weirs_records_has_still_to_read() {
    use weir::lifecycle::LifecycleReaders;
    let backend = Backend::memory();
    let store = Arc::clone(&backend.stores.events);
    let (journal, task) = Journal::start(Arc::clone(&store), "test", &LifecycleSettings::default());
    for epoch in 1..=5 {
        journal.record(LifecycleEvent::LeaderElected {
            node: "n1@a".into(),
            epoch,
        });
    }
    assert!(journal.flush(Duration::from_secs(5)).await);
    task.stop().await;
    let recorded = lifecycle_events(store.as_ref()).await;
    assert_eq!(recorded.len(), 5);

    // A reader of `$weir` that has got to the second event, and one of another
    // category far ahead.
    let checkpoints = Arc::clone(&backend.stores.checkpoints);
    let weir: Source = format!("category:{}", lifecycle::CATEGORY).parse().unwrap();
    let (claim, _) = checkpoints.claim("watcher", &weir, "w/1").await.unwrap();
    checkpoints.save(&claim, recorded[1].cursor).await.unwrap();
    let (claim, _) = checkpoints.claim("bridge", &orders(), "b/1").await.unwrap();
    checkpoints
        .save(&claim, Cursor::new(u64::MAX >> 2, u64::MAX >> 2))
        .await
        .unwrap();
    let readers = weir::consumer::LifecycleCheckpoints(checkpoints);
    let lowest = readers.lowest().await.unwrap();
    assert_eq!(lowest, Some(recorded[1].cursor));

    // Everything is past a zero retention; only what the reader has read goes.
    let pruned = lifecycle::prune(store.as_ref(), Duration::ZERO, lowest)
        .await
        .unwrap();
    assert_eq!(pruned, 2);
    let kept: Vec<Cursor> = lifecycle_events(store.as_ref())
        .await
        .iter()
        .map(|event| event.cursor)
        .collect();
    let unread: Vec<Cursor> = recorded[2..].iter().map(|event| event.cursor).collect();
    assert_eq!(
        kept, unread,
        "events the reader has still to read were pruned"
    );
}
