//! Delivery guarantees across handovers, proved with in-process nodes (broker and
//! runtime each) sharing one event store, checkpoint store and bus, while an
//! appender writes events to 30 streams of 6 categories:
//!
//! - nodes join and one leaves gracefully mid-stream: every event is processed
//!   exactly once, each stream in order;
//! - a node is aborted without storing its checkpoints: exactly the events it
//!   processed after its sources' last checkpoints are processed a second time,
//!   every other event once, none lost.
//!
//! Both run on the memory backends and on Postgres.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common;
use crate::common::fleet::{self, Services};
use async_trait::async_trait;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;
use weir::broker::{BrokerRole, DistributedBroker, SubscriberSpec};
use weir::consumer::{ConsumerSettings, EventProcessor, ProcessError};
use weir::event::{Category, EventName, NewEvent, Source, StoredEvent, StreamName, WriteCondition};
use weir::runtime::{ConsumerStores, EventRuntime};

const GROUP: &str = "g";
const CATEGORIES: usize = 6;
const STREAMS: usize = 30;
const EVENTS: usize = 3000;
const WAIT: Duration = Duration::from_secs(60);

struct Backend {
    services: Services,
    stores: ConsumerStores,
    _db: Option<common::TestPostgres>,
}

impl Backend {
    fn memory() -> Self {
        Self {
            services: Services::memory(),
            stores: ConsumerStores::in_memory(Arc::new(weir::store::MemoryStore::new())),
            _db: None,
        }
    }

    async fn postgres() -> Option<Self> {
        let services = Services::postgres().await?;
        let db = common::TestPostgres::start().await?;
        Some(Self {
            services,
            stores: ConsumerStores::postgres(Arc::clone(&db.store)),
            _db: Some(db),
        })
    }
}

on_every_backend!(
    Backend:
    planned_handovers_process_every_event_exactly_once,
    a_crash_reprocesses_exactly_what_followed_its_checkpoints,
    partitions_spread_one_category_over_the_fleet,
);

/// One processing of one event, by one node.
#[derive(Debug, Clone)]
struct Processed {
    event: StoredEvent,
    node: String,
}

#[derive(Default)]
struct Ledger {
    processed: Mutex<Vec<Processed>>,
}

impl Ledger {
    fn all(&self) -> Vec<Processed> {
        self.processed.lock().unwrap().clone()
    }

    fn distinct(&self) -> usize {
        let processed = self.processed.lock().unwrap();
        processed
            .iter()
            .map(|p| p.event.id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }
}

struct Recording {
    node: String,
    ledger: Arc<Ledger>,
}

#[async_trait]
impl EventProcessor for Recording {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        // Takes a moment, like real work, so handovers meet batches in flight.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let mut processed = self.ledger.processed.lock().unwrap();
        processed.extend(events.iter().map(|event| Processed {
            event: event.clone(),
            node: self.node.clone(),
        }));
        Ok(())
    }
}

struct World {
    backend: Backend,
    settings: ConsumerSettings,
    ledger: Arc<Ledger>,
    nodes: BTreeMap<String, EventRuntime>,
    started: usize,
    /// What every node's subscriber requests.
    sources: Vec<Source>,
    /// Where the appender writes: (categories, streams).
    layout: (usize, usize),
}

fn sources() -> Vec<Source> {
    (0..CATEGORIES)
        .map(|c| format!("category:c{c}").parse().unwrap())
        .collect()
}

impl World {
    fn new(backend: Backend, settings: ConsumerSettings) -> Self {
        common::init_logging();
        Self {
            backend,
            settings,
            ledger: Arc::default(),
            nodes: BTreeMap::new(),
            started: 0,
            sources: sources(),
            layout: (CATEGORIES, STREAMS),
        }
    }

    /// The same world with its subscribers requesting `sources`, and the appender
    /// writing to `streams` streams of `categories` categories.
    fn with_layout(mut self, sources: Vec<Source>, categories: usize, streams: usize) -> Self {
        self.sources = sources;
        self.layout = (categories, streams);
        self
    }

    async fn start_node(&mut self) -> String {
        self.started += 1;
        let name = format!("node-{}", self.started);
        let broker = DistributedBroker::new(
            &name,
            BrokerRole::Full,
            fleet::settings(),
            self.backend.services.fleet(),
        );
        let runtime = EventRuntime::new(
            &name,
            Arc::new(broker),
            self.backend.stores.clone(),
            self.settings.clone(),
        )
        .with_shutdown_grace(Duration::from_secs(10));
        let processor = Recording {
            node: name.clone(),
            ledger: Arc::clone(&self.ledger),
        };
        runtime
            .register_subscription_consumer(
                SubscriberSpec::new(GROUP, format!("{GROUP}@{name}"), self.sources.clone()),
                Arc::new(processor),
                None,
            )
            .unwrap();
        runtime.start().await.unwrap();
        self.nodes.insert(name.clone(), runtime);
        name
    }

    async fn stop_node(&mut self, name: &str) {
        self.nodes.remove(name).unwrap().stop().await;
    }

    async fn crash_node(&mut self, name: &str) {
        self.nodes.remove(name).unwrap().abort().await;
    }

    /// Appends `EVENTS` events in batches of 10 to random streams, pausing a little
    /// between appends; returns them all.
    fn start_appending(&self) -> JoinHandle<Vec<StoredEvent>> {
        let store = Arc::clone(&self.backend.stores.events);
        let (categories, streams) = self.layout;
        tokio::spawn(async move {
            let mut appended = Vec::with_capacity(EVENTS);
            let mut n = 0usize;
            while appended.len() < EVENTS {
                let stream = n % streams;
                n += 7; // a stride coprime to the stream count visits every stream in turn
                let category = Category::new(format!("c{}", stream % categories)).unwrap();
                let events = (0..10)
                    .map(|i| NewEvent::new(EventName::new("Happened").unwrap(), json!({"i": i})))
                    .collect();
                let stored = store
                    .append(
                        &category,
                        &StreamName::new(format!("s{stream}")).unwrap(),
                        WriteCondition::Any,
                        events,
                    )
                    .await
                    .unwrap();
                appended.extend(stored);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            appended
        })
    }

    /// Waits until `fraction` of the events have been processed.
    async fn until_processed(&self, fraction: f64) {
        let wanted = (EVENTS as f64 * fraction) as usize;
        let started = Instant::now();
        while self.ledger.distinct() < wanted {
            assert!(
                started.elapsed() < WAIT,
                "only {} of {wanted} processed",
                self.ledger.distinct()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every appended event has been processed and nothing more comes.
    async fn until_all_processed(&self, appended: &[StoredEvent]) {
        let started = Instant::now();
        while self.ledger.distinct() < appended.len() {
            assert!(
                started.elapsed() < WAIT,
                "only {} of {} processed",
                self.ledger.distinct(),
                appended.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Anything processed twice would show up within a few batches.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    async fn stop_all(mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            self.stop_node(&name).await;
        }
    }
}

/// Checkpoints every 50 events or second, and on every withdraw.
fn settings() -> ConsumerSettings {
    ConsumerSettings {
        batch_size: 20,
        checkpoint_every: 50,
        checkpoint_interval: Duration::from_secs(1),
        poll_interval: Duration::from_millis(100),
        ..ConsumerSettings::default()
    }
}

fn counts(processed: &[Processed]) -> HashMap<Uuid, usize> {
    let mut counts = HashMap::new();
    for p in processed {
        *counts.entry(p.event.id).or_default() += 1;
    }
    counts
}

async fn planned_handovers_process_every_event_exactly_once(backend: Backend) {
    let mut world = World::new(backend, settings());
    let first = world.start_node().await;
    world.start_node().await;
    let appender = world.start_appending();
    world.until_processed(0.2).await;
    world.start_node().await;
    world.until_processed(0.45).await;
    // The first node is likely the leader: leadership moves too.
    world.stop_node(&first).await;
    world.until_processed(0.7).await;
    world.start_node().await;
    let appended = appender.await.unwrap();
    world.until_all_processed(&appended).await;

    let processed = world.ledger.all();
    let counts = counts(&processed);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} events processed more than once: {twice:?}",
        twice.len()
    );
    assert!(
        appended.iter().all(|e| counts.get(&e.id) == Some(&1)),
        "an event was lost"
    );
    assert_eq!(processed.len(), appended.len());
    // Each stream in order, whichever nodes processed it.
    let mut next: BTreeMap<(String, String), u64> = BTreeMap::new();
    for p in &processed {
        let key = (p.event.category.to_string(), p.event.stream.to_string());
        let expected = next.entry(key).or_default();
        assert_eq!(
            p.event.position, *expected,
            "{}/{} out of order",
            p.event.category, p.event.stream
        );
        *expected += 1;
    }
    // The work really moved: more than one node processed events.
    let nodes: std::collections::BTreeSet<&str> =
        processed.iter().map(|p| p.node.as_str()).collect();
    assert!(nodes.len() >= 3, "{nodes:?}");
    world.stop_all().await;
}

async fn a_crash_reprocesses_exactly_what_followed_its_checkpoints(backend: Backend) {
    // Checkpoints only when a source is withdrawn, so the victim surely dies with
    // events processed after its last one.
    let withdraw_only = ConsumerSettings {
        checkpoint_every: u64::MAX,
        checkpoint_interval: Duration::from_secs(3600),
        ..settings()
    };
    let mut world = World::new(backend, withdraw_only);
    world.start_node().await;
    world.start_node().await;
    let victim = world.start_node().await;
    let appender = world.start_appending();
    world.until_processed(0.4).await;
    world.crash_node(&victim).await;
    // Right after the crash, before anyone else claims its sources: where its
    // checkpoints stand.
    let victim_id = format!("{GROUP}@{victim}");
    let checkpoints = world
        .backend
        .stores
        .checkpoints
        .list(Some(GROUP))
        .await
        .unwrap();
    let saved: HashMap<Source, _> = checkpoints
        .into_iter()
        .filter(|c| c.owner == victim_id)
        .map(|c| (c.source, c.cursor))
        .collect();
    assert!(
        !saved.is_empty(),
        "the victim owned no source when it crashed"
    );
    let processed_by_victim = world.ledger.all();
    let expected_again: Vec<Uuid> = processed_by_victim
        .iter()
        .filter(|p| p.node == victim)
        .filter(|p| {
            let source: Source = format!("category:{}", p.event.category).parse().unwrap();
            saved
                .get(&source)
                .is_some_and(|cursor| p.event.cursor > *cursor)
        })
        .map(|p| p.event.id)
        .collect();

    assert!(
        !expected_again.is_empty(),
        "the victim processed nothing after its checkpoints"
    );

    let appended = appender.await.unwrap();
    world.until_all_processed(&appended).await;
    let counts = counts(&world.ledger.all());
    for event in &appended {
        let expected = if expected_again.contains(&event.id) {
            2
        } else {
            1
        };
        assert_eq!(
            counts.get(&event.id).copied().unwrap_or(0),
            expected,
            "event {} of {}/{} at position {}",
            event.id,
            event.category,
            event.stream,
            event.position
        );
    }
    eprintln!(
        "{} events processed again after the crash, as expected",
        expected_again.len()
    );
    world.stop_all().await;
}

/// How many sources each node consumes now.
fn running_per_node(world: &World) -> BTreeMap<String, usize> {
    world
        .nodes
        .iter()
        .map(|(name, runtime)| {
            let running = runtime
                .status()
                .consumers
                .iter()
                .filter(|c| matches!(c.state, weir::consumer::source::ConsumerState::Running))
                .count();
            (name.clone(), running)
        })
        .collect()
}

/// Every event of `appended` processed exactly once, each stream in order.
fn assert_exactly_once_in_order(processed: &[Processed], appended: &[StoredEvent]) {
    let counts = counts(processed);
    let twice = counts.values().filter(|n| **n > 1).count();
    assert_eq!(twice, 0, "{twice} events processed more than once");
    let lost = appended
        .iter()
        .filter(|e| !counts.contains_key(&e.id))
        .count();
    assert_eq!(lost, 0, "{lost} events lost");
    let mut last: HashMap<(String, String), u64> = HashMap::new();
    for p in processed {
        let key = (p.event.category.to_string(), p.event.stream.to_string());
        if let Some(before) = last.insert(key, p.event.position) {
            assert!(
                before < p.event.position,
                "{}/{} out of order",
                p.event.category,
                p.event.stream
            );
        }
    }
}

/// One category of 12 partitions over three nodes: each owns four; a graceful
/// stop moves a node's partitions with nothing lost or repeated; a crash loses
/// nothing.
async fn partitions_spread_one_category_over_the_fleet(backend: Backend) {
    let partitions = Source::Category(Category::new("c0").unwrap())
        .split(12)
        .unwrap();
    let mut world = World::new(backend, settings()).with_layout(partitions, 1, 500);
    let first = world.start_node().await;
    world.start_node().await;
    world.start_node().await;
    let appender = world.start_appending();
    let started = Instant::now();
    while running_per_node(&world).values().any(|n| *n != 4) {
        assert!(
            started.elapsed() < WAIT,
            "not 4 each: {:?}",
            running_per_node(&world)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    world.until_processed(0.4).await;
    world.stop_node(&first).await;
    let appended = appender.await.unwrap();
    world.until_all_processed(&appended).await;
    assert_exactly_once_in_order(&world.ledger.all(), &appended);
    let nodes: std::collections::BTreeSet<String> =
        world.ledger.all().iter().map(|p| p.node.clone()).collect();
    assert_eq!(nodes.len(), 3, "every node processed a share: {nodes:?}");

    // A crash: its partitions move and nothing is lost (some may repeat).
    let victim = world.start_node().await;
    let appender = world.start_appending();
    world.until_processed(1.2).await;
    world.crash_node(&victim).await;
    let more = appender.await.unwrap();
    world
        .until_all_processed(&[appended, more.clone()].concat())
        .await;
    let counts = counts(&world.ledger.all());
    let lost = more.iter().filter(|e| !counts.contains_key(&e.id)).count();
    assert_eq!(lost, 0, "{lost} events lost after the crash");
    world.stop_all().await;
}
