//! [`Journal`]: records lifecycle events without ever holding up or failing the
//! work they describe. [`Journal::record`] only puts the event in a bounded queue;
//! one task drains it, appending in batches to `$weir`, and prunes the category
//! past its retention. When the store is down the queue keeps what it can and,
//! once full, drops the oldest events, counting them in
//! `weir_lifecycle_dropped_total`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{LifecycleEvent, LifecycleSettings, category, event_name, stream_name};
use crate::event::{Cursor, IdempotencyKey, NewEvent, StreamName, WriteCondition};
use crate::metrics;
use crate::store::{EventStore, StreamAppend};

/// Events waiting for the store, at most; beyond, the oldest are dropped.
pub const QUEUE_CAPACITY: usize = 10_000;

/// Events appended at once.
const BATCH: usize = 500;

/// The wait before trying an unreachable store again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// How long stopping waits for the last events to be written.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where lifecycle events are recorded. Cheap to clone; clones share one queue.
/// [`Journal::disabled`] records nothing, for tests and embedders that want none.
#[derive(Clone, Default)]
pub struct Journal {
    shared: Option<Arc<Shared>>,
}

struct Shared {
    /// Stored in each event's metadata: which node saw it happen.
    node: String,
    /// Where [`Journal::record_now`] writes at once.
    store: Arc<dyn EventStore>,
    queue: Mutex<VecDeque<Pending>>,
    wake: Notify,
    /// A batch taken from the queue is being written.
    writing: AtomicBool,
}

struct Pending {
    stream: StreamName,
    event: NewEvent,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.shared {
            None => f.write_str("Journal(disabled)"),
            Some(shared) => write!(f, "Journal({})", shared.node),
        }
    }
}

/// The task that writes a [`Journal`]'s events: stop it after everything that
/// records has stopped, so that their last events are written too.
pub struct JournalTask {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl JournalTask {
    /// Writes what is still queued (waiting up to a few seconds for the store),
    /// then ends the task.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for JournalTask {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Journal {
    /// A journal that records nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// A journal recording into `store` as `node`, and the task that writes and
    /// prunes; a disabled journal and an idle task if `settings` say so.
    pub fn start(
        store: Arc<dyn EventStore>,
        node: impl Into<String>,
        settings: &LifecycleSettings,
    ) -> (Self, JournalTask) {
        Self::start_keeping(store, node, settings, None)
    }

    /// As [`Journal::start`], pruning only what every one of `readers` has read.
    pub fn start_keeping(
        store: Arc<dyn EventStore>,
        node: impl Into<String>,
        settings: &LifecycleSettings,
        readers: Option<Arc<dyn LifecycleReaders>>,
    ) -> (Self, JournalTask) {
        let cancel = CancellationToken::new();
        if !settings.enabled {
            let task = JournalTask { cancel, task: None };
            return (Self::disabled(), task);
        }
        let shared = Arc::new(Shared {
            node: node.into(),
            store: Arc::clone(&store),
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            writing: AtomicBool::new(false),
        });
        let writer = Writer {
            shared: Arc::clone(&shared),
            store,
            settings: settings.clone(),
            readers,
        };
        let task = crate::ambient::spawn(writer.run(cancel.clone()));
        let task = JournalTask {
            cancel,
            task: Some(task),
        };
        (
            Self {
                shared: Some(shared),
            },
            task,
        )
    }

    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Queues `event` to be recorded. Never waits and never fails: with the queue
    /// full, the oldest queued event is dropped and counted.
    pub fn record(&self, event: LifecycleEvent) {
        let Some(shared) = &self.shared else {
            return;
        };
        let Some(pending) = shared.pending(&event) else {
            return;
        };
        shared.enqueue(|queue| queue.push_back(pending));
        shared.wake.notify_one();
    }

    /// Writes `event` now, past the queue, and says whether the store took it:
    /// for a record that must be in the store before the work it announces
    /// starts (an admin write). A disabled journal takes it without writing.
    pub async fn record_now(&self, event: LifecycleEvent) -> crate::store::Result<()> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let Some(pending) = shared.pending(&event) else {
            return Ok(());
        };
        shared
            .store
            .append_reserved(&category(), appends(&[pending]))
            .await
            .map(drop)
    }

    /// Waits until every event recorded so far is written, or `timeout` passes;
    /// `true` if written. For tests and tools; recording never needs it.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let Some(shared) = &self.shared else {
            return true;
        };
        shared.wake.notify_one();
        let deadline = tokio::time::Instant::now() + timeout;
        while !shared.is_idle() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Pending>> {
        // Only whole entries are pushed and popped, so a poisoned queue is whole.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds to the queue with `add`, then drops the oldest events beyond
    /// [`QUEUE_CAPACITY`], counting them.
    fn enqueue(&self, add: impl FnOnce(&mut VecDeque<Pending>)) {
        let mut queue = self.queue();
        add(&mut queue);
        let overflow = queue.len().saturating_sub(QUEUE_CAPACITY);
        queue.drain(..overflow);
        drop(queue);
        dropped(
            overflow,
            "the lifecycle event queue is full (the store is slow or down)",
        );
    }

    /// `event` as it is appended: its stream, and a key of its own, so that
    /// writing a batch again after a lost connection cannot store it twice.
    fn pending(&self, event: &LifecycleEvent) -> Option<Pending> {
        let (name, payload) = event.to_parts();
        let (Some(name), Some(stream)) = (event_name(&name), stream_name(&event.stream())) else {
            tracing::warn!(
                ?event,
                "a lifecycle event with an invalid name or stream was not recorded"
            );
            return None;
        };
        let key = IdempotencyKey::new(crate::ambient::event_id().to_string()).ok();
        let mut event = NewEvent::new(name, payload).with_metadata(json!({ "node": self.node }));
        event.idempotency_key = key;
        Some(Pending { stream, event })
    }

    fn is_idle(&self) -> bool {
        // `writing` is set before the batch leaves the queue and cleared after it
        // is written, so an empty queue with no write in progress means done.
        !self.writing.load(Ordering::SeqCst) && self.queue().is_empty()
    }
}

/// Counts and logs events that could not be recorded.
fn dropped(count: usize, why: &str) {
    if count > 0 {
        ::metrics::counter!(metrics::LIFECYCLE_DROPPED).increment(count as u64);
        tracing::warn!(dropped = count, "{why}: lifecycle events dropped");
    }
}

/// Who reads the lifecycle events: subscriptions to `$weir`, whose checkpoints
/// say how far they have got. Retention keeps what any of them has still to
/// read, so that a paused or failing subscriber does not lose events to it.
#[async_trait::async_trait]
pub trait LifecycleReaders: Send + Sync + 'static {
    /// The lowest cursor any reader of `$weir` has reached; `None` when nobody
    /// reads it.
    async fn lowest(&self) -> crate::store::Result<Option<Cursor>>;
}

/// Deletes lifecycle events older than `retention` from `store` (each stream
/// keeps its last) that every reader has read (at or before `read_up_to`, if
/// given); returns how many. What every node does each
/// [`LifecycleSettings::prune_interval`]; idempotent, so nodes need not agree on
/// who does it.
pub async fn prune(
    store: &dyn EventStore,
    retention: Duration,
    read_up_to: Option<Cursor>,
) -> crate::store::Result<u64> {
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let before = crate::ambient::now()
        .checked_sub_signed(retention)
        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
    store.prune(&category(), before, read_up_to).await
}

/// The journal's task: writes queued events in batches, prunes on a timer.
struct Writer {
    shared: Arc<Shared>,
    store: Arc<dyn EventStore>,
    settings: LifecycleSettings,
    readers: Option<Arc<dyn LifecycleReaders>>,
}

impl Writer {
    async fn run(self, cancel: CancellationToken) {
        let mut prune_timer = tokio::time::interval(self.settings.prune_interval());
        prune_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                () = self.shared.wake.notified() => {
                    if !self.write_queued(&cancel).await {
                        break;
                    }
                }
                _ = prune_timer.tick() => self.prune().await,
            }
        }
        let flushed =
            tokio::time::timeout(FLUSH_TIMEOUT, self.write_queued(&CancellationToken::new())).await;
        if flushed.is_err() {
            let left = self.shared.queue().len();
            dropped(
                left,
                "stopping, and the store did not take the last lifecycle events in time",
            );
        }
    }

    /// Writes batches until the queue is empty; waits and tries again while the
    /// store is unreachable. `false` if cancelled meanwhile.
    async fn write_queued(&self, cancel: &CancellationToken) -> bool {
        loop {
            self.shared.writing.store(true, Ordering::SeqCst);
            let batch: Vec<Pending> = {
                let mut queue = self.shared.queue();
                let take = queue.len().min(BATCH);
                queue.drain(..take).collect()
            };
            if batch.is_empty() {
                self.shared.writing.store(false, Ordering::SeqCst);
                return true;
            }
            match self
                .store
                .append_reserved(&category(), appends(&batch))
                .await
            {
                Ok(_) => {}
                Err(error) if error.is_retryable() => {
                    tracing::warn!(%error, events = batch.len(), "cannot record lifecycle events yet; trying again");
                    self.requeue(batch);
                    self.shared.writing.store(false, Ordering::SeqCst);
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => return false,
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                    }
                }
                Err(error) => dropped(
                    batch.len(),
                    &format!("the store refused lifecycle events ({error})"),
                ),
            }
        }
    }

    /// Puts a batch that could not be written back at the front of the queue,
    /// dropping the oldest if events recorded meanwhile leave no room.
    fn requeue(&self, batch: Vec<Pending>) {
        self.shared.enqueue(|queue| {
            for pending in batch.into_iter().rev() {
                queue.push_front(pending);
            }
        });
    }

    async fn prune(&self) {
        let read_up_to = match &self.readers {
            None => None,
            Some(readers) => match readers.lowest().await {
                // Nobody reads: age alone decides.
                Ok(None) => None,
                Ok(Some(lowest)) => Some(lowest),
                Err(error) => {
                    tracing::warn!(%error, "cannot read how far the readers of lifecycle events have got; pruning later");
                    return;
                }
            },
        };
        match prune(self.store.as_ref(), self.settings.retention, read_up_to).await {
            Ok(0) => {}
            Ok(pruned) => {
                tracing::info!(pruned, retention = %humantime::format_duration(self.settings.retention), "pruned old lifecycle events")
            }
            Err(error) => {
                tracing::warn!(%error, "could not prune old lifecycle events; trying again later")
            }
        }
    }
}

/// One append per stream, each stream's events in the order recorded.
fn appends(batch: &[Pending]) -> Vec<StreamAppend> {
    let mut appends: Vec<StreamAppend> = Vec::new();
    for pending in batch {
        match appends.iter_mut().find(|a| a.stream == pending.stream) {
            Some(append) => append.events.push(pending.event.clone()),
            None => appends.push(StreamAppend::new(
                pending.stream.clone(),
                WriteCondition::Any,
                vec![pending.event.clone()],
            )),
        }
    }
    appends
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use async_trait::async_trait;

    use super::*;
    use crate::event::{Category, Cursor, Source, StoredEvent};
    use crate::lifecycle::{CATEGORY, LifecycleEvent};
    use crate::store::{AppendWatcher, Error, MemoryStore};

    fn elected(epoch: u64) -> LifecycleEvent {
        LifecycleEvent::LeaderElected {
            node: "n1@a".into(),
            epoch,
        }
    }

    async fn read(store: &dyn EventStore, source: &Source) -> Vec<StoredEvent> {
        store.read(source, Cursor::START, 100_000).await.unwrap()
    }

    fn lifecycle() -> Source {
        format!("category:{CATEGORY}").parse().unwrap()
    }

    fn epochs(stored: &[StoredEvent]) -> Vec<u64> {
        stored
            .iter()
            .filter_map(LifecycleEvent::from_stored)
            .filter_map(|event| match event {
                LifecycleEvent::LeaderElected { epoch, .. } => Some(epoch),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn recorded_events_reach_the_reserved_category_in_order_and_not_the_log() {
        let store = Arc::new(MemoryStore::new());
        let (journal, task) = Journal::start(store.clone(), "n1", &LifecycleSettings::default());
        for epoch in 1..=3 {
            journal.record(elected(epoch));
        }
        journal.record(LifecycleEvent::GroupPaused {
            group: "billing".into(),
            by: Some("ops".into()),
        });
        assert!(journal.flush(Duration::from_secs(5)).await);
        task.stop().await;

        let stored = read(store.as_ref(), &lifecycle()).await;
        assert_eq!(epochs(&stored), [1, 2, 3]);
        assert_eq!(stored[3].stream.as_str(), "group-billing");
        assert_eq!(stored[0].metadata["node"], "n1");
        assert!(read(store.as_ref(), &Source::Log).await.is_empty());
    }

    #[tokio::test]
    async fn a_disabled_journal_records_nothing_and_never_waits() {
        let store = Arc::new(MemoryStore::new());
        let settings = LifecycleSettings {
            enabled: false,
            ..LifecycleSettings::default()
        };
        let (journal, task) = Journal::start(store.clone(), "n1", &settings);
        assert!(!journal.is_enabled());
        journal.record(elected(1));
        Journal::disabled().record(elected(2));
        assert!(journal.flush(Duration::ZERO).await);
        task.stop().await;
        assert!(read(store.as_ref(), &lifecycle()).await.is_empty());
    }

    #[tokio::test]
    async fn events_recorded_before_stop_are_written_by_stop() {
        let store = Arc::new(MemoryStore::new());
        let (journal, task) = Journal::start(store.clone(), "n1", &LifecycleSettings::default());
        journal.record(elected(1));
        task.stop().await;
        assert_eq!(epochs(&read(store.as_ref(), &lifecycle()).await), [1]);
    }

    /// A memory store whose appends fail as unreachable while `down`.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryStore,
        down: AtomicBool,
    }

    #[async_trait]
    impl EventStore for Flaky {
        async fn append_batch(
            &self,
            category: &Category,
            appends: Vec<StreamAppend>,
        ) -> crate::store::Result<Vec<StoredEvent>> {
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::Unavailable("down for the test".into()));
            }
            self.inner.append_batch(category, appends).await
        }
        async fn read(
            &self,
            source: &Source,
            after: Cursor,
            limit: usize,
        ) -> crate::store::Result<Vec<StoredEvent>> {
            self.inner.read(source, after, limit).await
        }
        async fn latest(
            &self,
            category: &Category,
            stream: &StreamName,
        ) -> crate::store::Result<Option<StoredEvent>> {
            self.inner.latest(category, stream).await
        }
        async fn head(&self, source: &Source) -> crate::store::Result<Option<StoredEvent>> {
            self.inner.head(source).await
        }
        async fn watch(&self) -> crate::store::Result<AppendWatcher> {
            self.inner.watch().await
        }
    }

    #[tokio::test]
    async fn while_the_store_is_down_recording_never_waits_and_only_the_oldest_overflow_is_dropped()
    {
        let store = Arc::new(Flaky::default());
        store.down.store(true, Ordering::SeqCst);
        let (journal, task) = Journal::start(store.clone(), "n1", &LifecycleSettings::default());
        let overflow = 5;
        let recorded = QUEUE_CAPACITY as u64 + overflow;
        let started = std::time::Instant::now();
        for epoch in 1..=recorded {
            journal.record(elected(epoch));
        }
        // Recording is a push onto a queue, however long the store stays down.
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!journal.flush(Duration::from_millis(300)).await);

        store.down.store(false, Ordering::SeqCst);
        assert!(journal.flush(Duration::from_secs(20)).await);
        task.stop().await;
        let expected: Vec<u64> = (overflow + 1..=recorded).collect();
        assert_eq!(epochs(&read(store.as_ref(), &lifecycle()).await), expected);
    }
}
