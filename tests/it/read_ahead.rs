//! A consumer reads its next batch while its processor works on the current one,
//! and keeps its promises while doing so, on the memory backends and on Postgres:
//!
//! - the next batch is read while the processor holds this one, and nothing
//!   beyond it: at most one batch ahead;
//! - stopped (withdrawn) mid-stream, it checkpoints exactly the last event its
//!   processor acknowledged, processes nothing of what it read ahead, and the
//!   next owner sees every remaining event once, in order;
//! - fenced while its processor holds a batch, it hands nothing of what it read
//!   ahead to the processor;
//! - stopped by its error policy mid-batch, its checkpoint covers only the
//!   events processed, and the next owner resumes at the failed event.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::Semaphore;
use weir::consumer::source::{Board, ConsumerContext, RunningConsumer};
use weir::consumer::{ConsumerSettings, ConsumerState, ErrorPolicy, EventProcessor, ProcessError};
use weir::event::{Category, Cursor, Source, StoredEvent, StreamName};
use weir::runtime::ConsumerStores;
use weir::store::{AppendWatcher, EventStore, StreamAppend};

use crate::common::{self, wait_until};

/// A guard against hangs, never a timing assertion.
const WAIT: Duration = Duration::from_secs(30);
const GROUP: &str = "g";
const BATCH: usize = 3;

/// The stores, with the event store wrapped to record every read.
struct Backend {
    stores: ConsumerStores,
    reads: Arc<Reads>,
    _db: Option<common::TestPostgres>,
}

impl Backend {
    fn with(stores: ConsumerStores, db: Option<common::TestPostgres>) -> Self {
        let reads = Arc::new(Reads {
            inner: Arc::clone(&stores.events),
            after: Mutex::default(),
        });
        Self {
            stores: ConsumerStores {
                events: reads.clone(),
                ..stores
            },
            reads,
            _db: db,
        }
    }

    fn memory() -> Self {
        Self::with(
            ConsumerStores::in_memory(Arc::new(weir::store::MemoryStore::new())),
            None,
        )
    }

    async fn postgres() -> Option<Self> {
        let db = common::TestPostgres::start().await?;
        let stores = ConsumerStores::postgres(Arc::clone(&db.store));
        Some(Self::with(stores, Some(db)))
    }
}

on_every_backend!(
    Backend:
    the_next_batch_is_read_while_the_processor_holds_this_one_and_no_further,
    a_consumer_stopped_mid_stream_checkpoints_what_was_acknowledged_and_drops_its_read_ahead,
    a_fenced_consumer_processes_nothing_it_read_ahead,
    a_policy_stop_mid_batch_checkpoints_only_the_processed_events,
);

/// An event store that records the cursor of every read after which it was
/// asked for events.
struct Reads {
    inner: Arc<dyn EventStore>,
    after: Mutex<Vec<Cursor>>,
}

impl Reads {
    fn after(&self) -> Vec<Cursor> {
        self.after.lock().unwrap().clone()
    }
}

#[async_trait]
impl EventStore for Reads {
    async fn append_batch(
        &self,
        category: &Category,
        appends: Vec<StreamAppend>,
    ) -> weir::store::Result<Vec<StoredEvent>> {
        self.inner.append_batch(category, appends).await
    }
    async fn read(
        &self,
        source: &Source,
        after: Cursor,
        limit: usize,
    ) -> weir::store::Result<Vec<StoredEvent>> {
        self.after.lock().unwrap().push(after);
        self.inner.read(source, after, limit).await
    }
    async fn latest(
        &self,
        category: &Category,
        stream: &StreamName,
    ) -> weir::store::Result<Option<StoredEvent>> {
        self.inner.latest(category, stream).await
    }
    async fn head(&self, source: &Source) -> weir::store::Result<Option<StoredEvent>> {
        self.inner.head(source).await
    }
    async fn watch(&self) -> weir::store::Result<AppendWatcher> {
        self.inner.watch().await
    }
}

fn source() -> Source {
    "category:orders".parse().unwrap()
}

/// Appends `count` events, and waits until they are readable from [`source`]:
/// these tests count the consumer's reads, and one that found the events still
/// held back (by another test's open transaction on the Postgres server) would
/// be one read more.
async fn append(store: &dyn EventStore, count: usize) -> Vec<StoredEvent> {
    let events = common::append_orders(store, (0..count).map(|n| json!({"n": n}))).await;
    let last = events.last().expect("events were appended").cursor;
    common::wait_until_readable(store, &source(), last).await;
    events
}

/// Checkpoints only when stopping, so that what is stored is what the stop
/// stored.
fn settings(error_policy: ErrorPolicy) -> ConsumerSettings {
    ConsumerSettings {
        error_policy,
        poll_interval: Duration::from_millis(50),
        batch_size: BATCH,
        checkpoint_every: 1_000,
        checkpoint_interval: Duration::from_secs(3600),
        ..ConsumerSettings::default()
    }
}

fn spawn(
    backend: &Backend,
    owner: &str,
    processor: Arc<dyn EventProcessor>,
    settings: ConsumerSettings,
) -> (RunningConsumer, Board) {
    let board = Board::default();
    let context = ConsumerContext {
        group: GROUP.into(),
        owner: owner.into(),
        events: Arc::clone(&backend.stores.events),
        checkpoints: Arc::clone(&backend.stores.checkpoints),
        dead_letters: Arc::clone(&backend.stores.dead_letters),
        processor,
        settings,
        executor: weir::consumer::settings::Executor::Main,
        board: board.clone(),
        pause: Default::default(),
    };
    (RunningConsumer::spawn(Arc::new(context), source()), board)
}

fn state(board: &Board) -> Option<ConsumerState> {
    board
        .states_now()
        .into_iter()
        .next()
        .map(|(_, state)| state)
}

/// Records every batch it is handed; holds each until the test lets it go, and
/// fails permanently at the event of position `fail_at`, if set.
struct Gated {
    gate: Semaphore,
    fail_at: Option<u64>,
    batches: Mutex<Vec<Vec<u64>>>,
}

impl Gated {
    fn new(permits: usize, fail_at: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            gate: Semaphore::new(permits),
            fail_at,
            batches: Mutex::default(),
        })
    }

    fn batches(&self) -> Vec<Vec<u64>> {
        self.batches.lock().unwrap().clone()
    }

    fn positions(&self) -> Vec<u64> {
        self.batches().concat()
    }
}

#[async_trait]
impl EventProcessor for Gated {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        self.batches
            .lock()
            .unwrap()
            .push(events.iter().map(|e| e.position).collect());
        self.gate.acquire().await.unwrap().forget();
        match events.iter().position(|e| Some(e.position) == self.fail_at) {
            Some(index) => Err(ProcessError::permanent("refused", "not this one").at(index)),
            None => Ok(()),
        }
    }
}

/// Starts a consumer whose processor holds its first batch, and waits until the
/// batch after it has been read ahead.
async fn holding_first_batch(
    backend: &Backend,
    events: &[StoredEvent],
    fail_at: Option<u64>,
) -> (RunningConsumer, Board, Arc<Gated>) {
    let processor = Gated::new(0, fail_at);
    let policy = if fail_at.is_some() {
        ErrorPolicy::Stop
    } else {
        ErrorPolicy::Continue
    };
    let (consumer, board) = spawn(backend, "node-a", processor.clone(), settings(policy));
    let ahead = events[BATCH - 1].cursor;
    wait_until(
        "the first batch is in the processor and the next read ahead",
        || !processor.batches().is_empty() && backend.reads.after().contains(&ahead),
    )
    .await;
    (consumer, board, processor)
}

/// What the next owner processes, once it has processed `count` events.
async fn next_owner_processes(backend: &Backend, count: usize) -> Vec<u64> {
    let processor = Gated::new(1_000, None);
    let (consumer, _board) = spawn(
        backend,
        "node-b",
        processor.clone(),
        settings(ErrorPolicy::Continue),
    );
    wait_until("the next owner processes the rest", || {
        processor.positions().len() >= count
    })
    .await;
    consumer.stop(WAIT).await;
    processor.positions()
}

async fn stored_cursor(backend: &Backend) -> Cursor {
    let row = backend.stores.checkpoints.load(GROUP, &source()).await;
    row.unwrap().expect("a checkpoint row").cursor
}

async fn the_next_batch_is_read_while_the_processor_holds_this_one_and_no_further(
    backend: Backend,
) {
    let events = append(backend.stores.events.as_ref(), 4 * BATCH).await;
    let (consumer, _board, processor) = holding_first_batch(&backend, &events, None).await;
    // However long the processor takes, the store is not asked for more.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        backend.reads.after(),
        [Cursor::START, events[BATCH - 1].cursor],
        "one batch read ahead, no more"
    );
    assert_eq!(processor.batches(), [vec![0, 1, 2]]);
    consumer.abort().await;
}

async fn a_consumer_stopped_mid_stream_checkpoints_what_was_acknowledged_and_drops_its_read_ahead(
    backend: Backend,
) {
    let events = append(backend.stores.events.as_ref(), 4 * BATCH).await;
    let (consumer, _board, processor) = holding_first_batch(&backend, &events, None).await;
    // A withdraw asks the consumer to stop; only then does the processor finish
    // the batch in hand.
    let mut stopping = Box::pin(consumer.stop(WAIT));
    assert!(futures::poll!(&mut stopping).is_pending());
    processor.gate.add_permits(1_000);
    let stopped_at = stopping.await;

    let last_acknowledged = events[BATCH - 1].cursor;
    assert_eq!(stopped_at, Some(last_acknowledged));
    assert_eq!(stored_cursor(&backend).await, last_acknowledged);
    assert_eq!(
        processor.batches(),
        [vec![0, 1, 2]],
        "nothing read ahead is processed after the stop"
    );
    let rest = next_owner_processes(&backend, events.len() - BATCH).await;
    assert_eq!(
        rest,
        (BATCH as u64..events.len() as u64).collect::<Vec<_>>()
    );
}

async fn a_fenced_consumer_processes_nothing_it_read_ahead(backend: Backend) {
    let events = append(backend.stores.events.as_ref(), 4 * BATCH).await;
    let (consumer, board, processor) = holding_first_batch(&backend, &events, None).await;
    // While the processor is stuck in its batch, another owner takes the source.
    let checkpoints = &backend.stores.checkpoints;
    let (_, cursor) = checkpoints.claim(GROUP, &source(), "node-b").await.unwrap();
    assert_eq!(cursor, Cursor::START);
    processor.gate.add_permits(1_000);
    wait_until("the consumer finds itself fenced", || {
        matches!(state(&board), Some(ConsumerState::Fenced(_)))
    })
    .await;
    assert!(consumer.is_fenced());
    assert_eq!(processor.batches(), [vec![0, 1, 2]]);
    let row = checkpoints.load(GROUP, &source()).await.unwrap().unwrap();
    assert_eq!((row.owner.as_str(), row.cursor), ("node-b", Cursor::START));
}

async fn a_policy_stop_mid_batch_checkpoints_only_the_processed_events(backend: Backend) {
    let events = append(backend.stores.events.as_ref(), 4 * BATCH).await;
    let (consumer, board, processor) = holding_first_batch(&backend, &events, Some(1)).await;
    processor.gate.add_permits(1_000);
    wait_until("the error policy stops the consumer", || {
        matches!(state(&board), Some(ConsumerState::Failed(_)))
    })
    .await;
    assert!(consumer.is_finished());
    assert_eq!(processor.batches(), [vec![0, 1, 2]]);
    assert_eq!(stored_cursor(&backend).await, events[0].cursor);
    let rest = next_owner_processes(&backend, events.len() - 1).await;
    assert_eq!(rest, (1..events.len() as u64).collect::<Vec<_>>());
}
