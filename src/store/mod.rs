//! The event store: the [`EventStore`] trait every backend implements, its error type,
//! and append notifications. Backends: [`memory`] (always built) and `postgres`
//! (feature `postgres`). One conformance suite
//! (`tests/it/store_conformance.rs`) runs against each.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::event::{
    Category, Cursor, NewEvent, Source, StoredEvent, StreamName, ValidationError, WriteCondition,
};

pub mod memory;

pub use memory::MemoryStore;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "append to stream {category}/{stream} rejected: it required {condition}, but {}; nothing was written",
        describe_head(*.last_position)
    )]
    WriteConditionFailed {
        category: Category,
        stream: StreamName,
        condition: WriteCondition,
        /// The stream's last position when the append was checked (`None`: empty).
        last_position: Option<u64>,
    },
    #[error("invalid append: {0}")]
    InvalidAppend(String),
    #[error(
        "append to stream {category}/{stream} rejected: its event {index} is {size} bytes (payload and metadata as JSON), more than store.max_event_bytes = {limit}; nothing was written: make the event smaller (store large data elsewhere and refer to it) or raise store.max_event_bytes"
    )]
    EventTooLarge {
        category: Category,
        stream: StreamName,
        /// Which of the stream's events in the append, from 0.
        index: usize,
        size: usize,
        limit: usize,
    },
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error(
        "the store schema {schema:?} is at migration {found}, this weir needs {expected}: run `weir migrate`"
    )]
    NotMigrated {
        schema: String,
        found: i32,
        expected: i32,
    },
    #[error(
        "the store schema {schema:?} is at migration {found}, newer than this weir knows ({known}): upgrade weir"
    )]
    SchemaTooNew {
        schema: String,
        found: i32,
        known: i32,
    },
    #[error(
        "cannot reach the event store: {0}; check [store] url and that the database is running"
    )]
    Unavailable(String),
    #[error("the event store failed: {0}")]
    Backend(String),
    #[error(
        "category {category} is reserved for weir's own records (names starting with '$'): only weir appends to it; append to a category whose name does not start with '$', and read this one with `weir read --source 'category:{category}'`"
    )]
    ReservedCategory { category: Category },
    #[error(
        "category {category} is not reserved: only weir's own categories (names starting with '$') take weir's records and are pruned; the events of every other category are kept for good"
    )]
    NotReserved { category: Category },
    #[error(
        "this event store cannot {0}: use the memory or the Postgres store, or implement it for this backend"
    )]
    Unsupported(&'static str),
    #[error(
        "subscriber {subscriber} of group {group} is registered by another process, {holder}: two processes run with one node id, and the one that registered last keeps it, so this one consumes nothing; give each process its own [node] id, or stop this one"
    )]
    MemberTaken {
        group: String,
        subscriber: String,
        /// The process (`node@token`) whose record it is.
        holder: String,
    },
}

fn describe_head(last_position: Option<u64>) -> String {
    match last_position {
        None => "the stream is empty".to_owned(),
        Some(position) => format!("its last position is {position}"),
    }
}

impl Error {
    /// Retrying may succeed (a connection was lost or could not be made); other
    /// errors will fail the same way again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

tokio::task_local! {
    /// Set while [`EventStore::append_reserved`] runs: the permission to append to
    /// a reserved category travels with that one call, so every backend keeps a
    /// single append path and checks it with [`check_category`].
    static RESERVED_APPEND: ();
}

/// Refuses an append to a reserved category unless it comes through
/// [`EventStore::append_reserved`]; backends call it first thing in
/// `append_batch`.
pub(crate) fn check_category(category: &Category) -> Result<()> {
    if category.is_reserved() && RESERVED_APPEND.try_with(|_| ()).is_err() {
        return Err(Error::ReservedCategory {
            category: category.clone(),
        });
    }
    Ok(())
}

/// Refuses a category that is not reserved, where only weir's own may go (to be
/// appended to as weir, or pruned).
pub(crate) fn check_reserved(category: &Category) -> Result<()> {
    if category.is_reserved() {
        Ok(())
    } else {
        Err(Error::NotReserved {
            category: category.clone(),
        })
    }
}

/// Events to append to one stream, under a condition on that stream's state.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAppend {
    pub stream: StreamName,
    pub condition: WriteCondition,
    pub events: Vec<NewEvent>,
}

impl StreamAppend {
    pub fn new(stream: StreamName, condition: WriteCondition, events: Vec<NewEvent>) -> Self {
        Self {
            stream,
            condition,
            events,
        }
    }
}

/// A hint that events may have been appended. Lossy by design: a reader that misses
/// one still polls, and one that lags behind the channel treats it as "anything".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendNotice {
    Category(Category),
    /// Anything may have changed (e.g. after the notification connection was restored).
    Any,
}

/// Events read at a time by the default [`EventStore::events_by_id`].
const LOOKUP_PAGE: usize = 1000;

/// How many notices a slow listener may fall behind before it sees [`AppendNotice::Any`].
const NOTICE_CAPACITY: usize = 1024;

/// The first quick look again after a notice whose read found nothing.
const FIRST_RECHECK: Duration = Duration::from_millis(5);

/// Append notices for one source; what a consumer waits on between reads.
pub struct AppendWatcher {
    receiver: broadcast::Receiver<AppendNotice>,
    /// Armed by a notice: the next waits are this short, doubling up to the poll
    /// interval, because the append may not be readable yet.
    recheck: Option<Duration>,
}

impl AppendWatcher {
    /// Waits, after a read of `source` found nothing new, until it is worth reading
    /// again: an append that may concern it was announced, or `poll` passed.
    ///
    /// A notice can arrive before its append is readable: log and category reads
    /// stay below the oldest transaction still in progress, and another writer's
    /// transaction may hold that back a little longer. So after a notice the next
    /// waits are short (5 ms, doubling up to `poll`) instead of a whole `poll`.
    pub async fn wait(&mut self, source: &Source, poll: Duration) {
        let timeout = self.recheck.map_or(poll, |recheck| recheck.min(poll));
        tokio::select! {
            biased;
            () = self.appended(source) => self.recheck = Some(FIRST_RECHECK),
            () = tokio::time::sleep(timeout) => {
                self.recheck = self.recheck.map(|d| d * 2).filter(|d| *d < poll);
            }
        }
    }

    /// Returns once an append that may concern `source` has been announced.
    /// Returns at once, as a wake-up, if notices were missed; never returns if the
    /// store has gone, so callers pair it with a poll timeout.
    pub async fn appended(&mut self, source: &Source) {
        loop {
            match self.receiver.recv().await {
                Ok(AppendNotice::Any) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                Ok(AppendNotice::Category(category)) if source.covers_category(&category) => {
                    return;
                }
                Ok(AppendNotice::Category(_)) => {}
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    }
}

/// The sending side of append notices, shared by the backends.
#[derive(Debug, Clone)]
pub(crate) struct Notifier {
    sender: broadcast::Sender<AppendNotice>,
}

impl Default for Notifier {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(NOTICE_CAPACITY).0,
        }
    }
}

impl Notifier {
    pub(crate) fn notify(&self, notice: AppendNotice) {
        // No receiver is not an error: nobody is waiting.
        let _ = self.sender.send(notice);
    }

    pub(crate) fn watch(&self) -> AppendWatcher {
        AppendWatcher {
            receiver: self.sender.subscribe(),
            recheck: None,
        }
    }
}

/// An event store. Object safe, so a node can hold `Arc<dyn EventStore>` chosen by config.
///
/// Contract (checked by the conformance suite on every backend):
/// - Appends to one stream are totally ordered; positions start at 0 and have no gaps.
/// - An append whose condition does not hold writes nothing.
/// - [`EventStore::append_batch`] is atomic across the streams of one category.
/// - An event whose idempotency key its category already holds is not written again;
///   the stored event is returned in its place.
/// - Reads after a cursor never skip an event, however many writers append
///   concurrently: an event becomes readable only once every event before it in read
///   order is committed.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends to several streams of one category, all or nothing. Returns the stored
    /// events in the order given.
    async fn append_batch(
        &self,
        category: &Category,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<StoredEvent>>;

    /// Reads up to `limit` events of `source` after `after`, in read order.
    async fn read(&self, source: &Source, after: Cursor, limit: usize) -> Result<Vec<StoredEvent>>;

    /// The last event of a stream, if it has any.
    async fn latest(&self, category: &Category, stream: &StreamName)
    -> Result<Option<StoredEvent>>;

    /// The last readable event of a source, for measuring how far a reader lags.
    async fn head(&self, source: &Source) -> Result<Option<StoredEvent>>;

    /// Notices of appends, for waking readers without polling hard.
    async fn watch(&self) -> Result<AppendWatcher>;

    /// How far a reader at `after` lags behind in `source`: the readable events
    /// after it, counted up to `limit`, and when the oldest of them was stored.
    /// Its cost grows with `limit`, never with the whole backlog. The default reads
    /// the events; backends count them instead.
    async fn backlog(&self, source: &Source, after: Cursor, limit: u64) -> Result<Backlog> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let events = self.read(source, after, limit).await?;
        Ok(Backlog {
            events: events.len() as u64,
            oldest: events.iter().map(|event| event.observed_at).min(),
        })
    }

    /// The events with these ids, in read order; ids the store does not hold
    /// (never appended, or pruned since) are left out. The default reads the
    /// whole log; backends look the ids up instead.
    async fn events_by_id(&self, ids: &[Uuid]) -> Result<Vec<StoredEvent>> {
        let mut wanted: HashSet<Uuid> = ids.iter().copied().collect();
        let mut found = Vec::with_capacity(wanted.len());
        let mut after = Cursor::START;
        while !wanted.is_empty() {
            let page = self.read(&Source::Log, after, LOOKUP_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.cursor;
            found.extend(page.into_iter().filter(|event| wanted.remove(&event.id)));
        }
        Ok(found)
    }

    /// Answers once the store is reachable and its schema in place; the error
    /// says what is wrong. One quick attempt, for health checks.
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    /// How long the oldest transaction still in progress has been holding log and
    /// category readers back (events appended after it began stay unreadable until
    /// it ends). Zero where nothing can hold readers back.
    async fn visibility_horizon(&self) -> Result<Duration> {
        Ok(Duration::ZERO)
    }

    /// Appends to a reserved category (`$weir`): weir's own records, which
    /// [`EventStore::append_batch`] refuses to anyone else. Refuses any other
    /// category.
    async fn append_reserved(
        &self,
        category: &Category,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<StoredEvent>> {
        check_reserved(category)?;
        RESERVED_APPEND
            .scope((), self.append_batch(category, appends))
            .await
    }

    /// Deletes the events of a reserved `category` stored before `before` and,
    /// if `read_up_to` is given, at or before that cursor (what every reader
    /// has read), except the last event of each stream, which is kept so that
    /// the stream's positions go on from where they were. Returns how many were
    /// deleted. Refuses any category that is not reserved: weir prunes only its
    /// own records.
    async fn prune(
        &self,
        category: &Category,
        before: DateTime<Utc>,
        read_up_to: Option<Cursor>,
    ) -> Result<u64> {
        check_reserved(category)?;
        let _ = (before, read_up_to);
        Err(Error::Unsupported("prune"))
    }

    /// Appends to one stream under `condition`.
    async fn append(
        &self,
        category: &Category,
        stream: &StreamName,
        condition: WriteCondition,
        events: Vec<NewEvent>,
    ) -> Result<Vec<StoredEvent>> {
        self.append_batch(
            category,
            vec![StreamAppend::new(stream.clone(), condition, events)],
        )
        .await
    }
}

#[async_trait]
impl<S: EventStore + ?Sized> EventStore for Arc<S> {
    async fn append_batch(
        &self,
        category: &Category,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<StoredEvent>> {
        (**self).append_batch(category, appends).await
    }
    async fn read(&self, source: &Source, after: Cursor, limit: usize) -> Result<Vec<StoredEvent>> {
        (**self).read(source, after, limit).await
    }
    async fn latest(
        &self,
        category: &Category,
        stream: &StreamName,
    ) -> Result<Option<StoredEvent>> {
        (**self).latest(category, stream).await
    }
    async fn head(&self, source: &Source) -> Result<Option<StoredEvent>> {
        (**self).head(source).await
    }
    async fn watch(&self) -> Result<AppendWatcher> {
        (**self).watch().await
    }
    async fn backlog(&self, source: &Source, after: Cursor, limit: u64) -> Result<Backlog> {
        (**self).backlog(source, after, limit).await
    }
    async fn events_by_id(&self, ids: &[Uuid]) -> Result<Vec<StoredEvent>> {
        (**self).events_by_id(ids).await
    }
    async fn ping(&self) -> Result<()> {
        (**self).ping().await
    }
    async fn visibility_horizon(&self) -> Result<Duration> {
        (**self).visibility_horizon().await
    }
    async fn append_reserved(
        &self,
        category: &Category,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<StoredEvent>> {
        (**self).append_reserved(category, appends).await
    }
    async fn prune(
        &self,
        category: &Category,
        before: DateTime<Utc>,
        read_up_to: Option<Cursor>,
    ) -> Result<u64> {
        (**self).prune(category, before, read_up_to).await
    }
}

/// What a reader has still to read: see [`EventStore::backlog`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Readable events after the reader's cursor, up to the limit asked for.
    pub events: u64,
    /// When the oldest of them was stored; `None` when there are none.
    pub oldest: Option<chrono::DateTime<chrono::Utc>>,
}

/// Timestamps are kept to the microsecond, as Postgres keeps them, so an appended event
/// equals the same event read back, on every backend.
pub(crate) fn store_precision(
    time: chrono::DateTime<chrono::Utc>,
) -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    time.trunc_subsecs(6)
}

/// The largest event a store accepts unless told otherwise: 1 MiB, the default
/// largest message of both NATS and Kafka, so that what is stored can be forwarded.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1_048_576;

/// The size an event counts against the store's limit: the bytes of its payload
/// and of its metadata, each written as compact JSON. Its name, stream and
/// idempotency key do not count (names are short by validation).
pub fn event_size(event: &NewEvent) -> usize {
    /// Counts bytes without keeping them.
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a `Value` to a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut counter, &event.payload);
    let _ = serde_json::to_writer(&mut counter, &event.metadata);
    counter.0
}

/// Refuses the batch if one of its events is larger than `limit` bytes (see
/// [`event_size`]).
pub(crate) fn check_sizes(
    category: &Category,
    appends: &[StreamAppend],
    limit: usize,
) -> Result<()> {
    for append in appends {
        for (index, event) in append.events.iter().enumerate() {
            let size = event_size(event);
            if size > limit {
                return Err(Error::EventTooLarge {
                    category: category.clone(),
                    stream: append.stream.clone(),
                    index,
                    size,
                    limit,
                });
            }
        }
    }
    Ok(())
}

/// Checks what every backend must reject before touching storage: an empty append,
/// a stream named twice, or an idempotency key used twice in one batch.
pub(crate) fn validate_batch(appends: &[StreamAppend]) -> Result<()> {
    if appends.is_empty() || appends.iter().all(|a| a.events.is_empty()) {
        return Err(Error::InvalidAppend("no events to append".into()));
    }
    let mut streams = std::collections::HashSet::new();
    let mut keys = std::collections::HashSet::new();
    for append in appends {
        if append.events.is_empty() {
            return Err(Error::InvalidAppend(format!(
                "stream {} is given no events",
                append.stream
            )));
        }
        if !streams.insert(&append.stream) {
            return Err(Error::InvalidAppend(format!(
                "stream {} appears twice in one batch: give each stream once",
                append.stream
            )));
        }
        for key in append
            .events
            .iter()
            .filter_map(|e| e.idempotency_key.as_ref())
        {
            if !keys.insert(key) {
                return Err(Error::InvalidAppend(format!(
                    "idempotency key {key:?} appears twice in one batch"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn after_a_notice_the_watcher_looks_again_soon_then_less_often() {
        let notifier = Notifier::default();
        let mut watcher = notifier.watch();
        let orders: Source = "category:orders".parse().unwrap();
        let poll = Duration::from_millis(100);
        let waited = |started: tokio::time::Instant| started.elapsed().as_millis();

        // Nothing announced: a whole poll interval.
        let started = tokio::time::Instant::now();
        watcher.wait(&orders, poll).await;
        assert_eq!(waited(started), 100);

        // A notice wakes it at once; the reads after it find nothing (the append is
        // not readable yet), so it looks again after 5, 10, 20, 40, 80 ms (capped
        // at the poll interval), then goes back to polling.
        notifier.notify(AppendNotice::Category(Category::new("orders").unwrap()));
        let started = tokio::time::Instant::now();
        watcher.wait(&orders, poll).await;
        assert_eq!(waited(started), 0);
        for expected in [5, 10, 20, 40, 80, 100, 100] {
            let started = tokio::time::Instant::now();
            watcher.wait(&orders, poll).await;
            assert_eq!(waited(started), expected);
        }

        // Notices for other categories do not wake it.
        notifier.notify(AppendNotice::Category(Category::new("refunds").unwrap()));
        let started = tokio::time::Instant::now();
        watcher.wait(&orders, poll).await;
        assert_eq!(waited(started), 100);
    }
}
