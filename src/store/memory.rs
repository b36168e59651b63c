//! The in-memory event store: the embedded default and the reference for the store
//! contract. Each append is one transaction, committed whole under a lock, so read
//! order is commit order and no reader can skip an event.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    AppendNotice, AppendWatcher, Backlog, DEFAULT_MAX_EVENT_BYTES, Error, EventStore, Notifier,
    Result, StreamAppend, check_category, check_reserved, check_sizes, store_precision,
    validate_batch,
};
use crate::event::{
    Category, Cursor, IdempotencyKey, Partition, Source, StoredEvent, StreamName, slice_of,
};

/// An event store held in process memory; everything is lost when the process ends.
pub struct MemoryStore {
    state: RwLock<State>,
    notifier: Notifier,
    /// The largest event accepted, in bytes (see [`super::event_size`]).
    max_event_bytes: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            state: RwLock::default(),
            notifier: Notifier::default(),
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

#[derive(Default)]
struct State {
    /// Every event, in read order.
    log: Vec<StoredEvent>,
    /// The slice of each event of `log`, computed once at append.
    slices: Vec<u16>,
    /// Indexes into `log`, each in read order. `public` holds what the log shows:
    /// every event outside the reserved categories.
    public: Vec<usize>,
    categories: HashMap<Category, Vec<usize>>,
    streams: HashMap<(Category, StreamName), Vec<usize>>,
    keys: HashMap<(Category, IdempotencyKey), usize>,
    last_tx_id: u64,
    last_sequence: u64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The same store, refusing events larger than `max_event_bytes`.
    #[must_use]
    pub fn with_max_event_bytes(mut self, max_event_bytes: usize) -> Self {
        self.max_event_bytes = max_event_bytes;
        self
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-written: appends
        // validate everything before their first mutation.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn stream_indexes(&self, category: &Category, stream: &StreamName) -> &[usize] {
        self.streams
            .get(&(category.clone(), stream.clone()))
            .map_or(&[], Vec::as_slice)
    }

    fn last_position(&self, category: &Category, stream: &StreamName) -> Option<u64> {
        self.stream_indexes(category, stream)
            .last()
            .map(|&i| self.log[i].position)
    }

    /// Fails if the condition of an append that would write a new event does not
    /// hold.
    fn check_conditions(&self, category: &Category, appends: &[StreamAppend]) -> Result<()> {
        for append in appends {
            let fresh = append.events.iter().any(|event| {
                event
                    .idempotency_key
                    .as_ref()
                    .is_none_or(|key| !self.keys.contains_key(&(category.clone(), key.clone())))
            });
            let last_position = self.last_position(category, &append.stream);
            if fresh && !append.condition.holds(last_position) {
                return Err(Error::WriteConditionFailed {
                    category: category.clone(),
                    stream: append.stream.clone(),
                    condition: append.condition.clone(),
                    last_position,
                });
            }
        }
        Ok(())
    }

    /// The indexes into `log` that make up `source`, in read order.
    fn indexes(&self, source: &Source) -> Cow<'_, [usize]> {
        let category = |c: &Category| self.categories.get(c).map_or(&[][..], Vec::as_slice);
        let in_partition = |p: Partition| move |&&i: &&usize| p.holds(self.slices[i]);
        match source {
            Source::Log => Cow::Borrowed(&self.public),
            Source::Category(c) => Cow::Borrowed(category(c)),
            Source::Stream(c, s) => Cow::Borrowed(self.stream_indexes(c, s)),
            Source::LogPartition(p) => Cow::Owned(
                self.public
                    .iter()
                    .filter(in_partition(*p))
                    .copied()
                    .collect(),
            ),
            Source::CategoryPartition(c, p) => Cow::Owned(
                category(c)
                    .iter()
                    .filter(in_partition(*p))
                    .copied()
                    .collect(),
            ),
            Source::Ingest(_) => Cow::Borrowed(&[]),
        }
    }

    /// Where in read order `source`'s events after `after` start, and the
    /// indexes of all of its events.
    fn after(&self, source: &Source, after: Cursor) -> (usize, Cow<'_, [usize]>) {
        let indexes = self.indexes(source);
        let start = indexes.partition_point(|&i| self.log[i].cursor <= after);
        (start, indexes)
    }

    fn read_after(&self, source: &Source, after: Cursor, limit: usize) -> Vec<StoredEvent> {
        let (start, indexes) = self.after(source, after);
        indexes[start..]
            .iter()
            .take(limit)
            .map(|&i| self.log[i].clone())
            .collect()
    }

    /// Events after `after` in `source`, up to `limit`, and the first of them.
    fn backlog(&self, source: &Source, after: Cursor, limit: u64) -> (u64, Option<&StoredEvent>) {
        let (start, indexes) = self.after(source, after);
        let count = indexes.len() - start;
        let first = indexes.get(start).map(|&i| &self.log[i]);
        ((count as u64).min(limit), first)
    }

    fn last(&self, source: &Source) -> Option<&StoredEvent> {
        self.indexes(source).last().map(|&i| &self.log[i])
    }

    /// Files the event at `index` of `log` (already pushed) under its category,
    /// stream, idempotency key and slice.
    fn index(&mut self, index: usize) {
        let event = &self.log[index];
        let (category, stream) = (event.category.clone(), event.stream.clone());
        if let Some(key) = &event.idempotency_key {
            self.keys.insert((category.clone(), key.clone()), index);
        }
        if !category.is_reserved() {
            self.public.push(index);
        }
        self.slices.push(slice_of(stream.as_str()));
        self.categories
            .entry(category.clone())
            .or_default()
            .push(index);
        self.streams
            .entry((category, stream))
            .or_default()
            .push(index);
    }

    /// Deletes `category`'s events stored before `before`, but each stream's
    /// last, and files what is left again.
    fn prune(&mut self, category: &Category, before: DateTime<Utc>, up_to: Option<Cursor>) -> u64 {
        let heads: HashSet<usize> = self
            .streams
            .iter()
            .filter(|((c, _), _)| c == category)
            .filter_map(|(_, indexes)| indexes.last().copied())
            .collect();
        let doomed = |(i, event): &(usize, &StoredEvent)| {
            event.category == *category
                && event.observed_at < before
                && up_to.is_none_or(|up_to| event.cursor <= up_to)
                && !heads.contains(i)
        };
        let pruned = self.log.iter().enumerate().filter(doomed).count();
        if pruned == 0 {
            return 0;
        }
        let log = std::mem::take(&mut self.log);
        *self = State {
            last_tx_id: self.last_tx_id,
            last_sequence: self.last_sequence,
            ..State::default()
        };
        for (i, event) in log.into_iter().enumerate() {
            if !doomed(&(i, &event)) {
                self.log.push(event);
                self.index(self.log.len() - 1);
            }
        }
        pruned as u64
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append_batch(
        &self,
        category: &Category,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<StoredEvent>> {
        check_category(category)?;
        validate_batch(&appends)?;
        check_sizes(category, &appends, self.max_event_bytes)?;
        let mut state = self.write_state();
        // Check every condition before the first write, so a failure writes nothing.
        state.check_conditions(category, &appends)?;

        state.last_tx_id += 1;
        let tx_id = state.last_tx_id;
        let observed_at = store_precision(crate::ambient::now());
        let mut stored = Vec::new();
        for append in appends {
            let mut next_position = state
                .last_position(category, &append.stream)
                .map_or(0, |p| p + 1);
            for event in append.events {
                let existing = event
                    .idempotency_key
                    .as_ref()
                    .and_then(|key| state.keys.get(&(category.clone(), key.clone())));
                if let Some(&index) = existing {
                    stored.push(state.log[index].clone());
                    continue;
                }
                state.last_sequence += 1;
                let sequence = state.last_sequence;
                let index = state.log.len();
                let event = StoredEvent {
                    id: event.id.unwrap_or_else(crate::ambient::event_id),
                    name: event.name,
                    category: category.clone(),
                    stream: append.stream.clone(),
                    position: next_position,
                    sequence,
                    payload: event.payload,
                    metadata: event.metadata,
                    occurred_at: store_precision(event.occurred_at),
                    observed_at,
                    idempotency_key: event.idempotency_key,
                    cursor: Cursor::new(tx_id, sequence),
                };
                next_position += 1;
                state.log.push(event.clone());
                state.index(index);
                stored.push(event);
            }
        }
        drop(state);
        self.notifier
            .notify(AppendNotice::Category(category.clone()));
        Ok(stored)
    }

    async fn read(&self, source: &Source, after: Cursor, limit: usize) -> Result<Vec<StoredEvent>> {
        Ok(self.read_state().read_after(source, after, limit))
    }

    async fn latest(
        &self,
        category: &Category,
        stream: &StreamName,
    ) -> Result<Option<StoredEvent>> {
        let source = Source::Stream(category.clone(), stream.clone());
        Ok(self.read_state().last(&source).cloned())
    }

    async fn head(&self, source: &Source) -> Result<Option<StoredEvent>> {
        Ok(self.read_state().last(source).cloned())
    }

    async fn watch(&self) -> Result<AppendWatcher> {
        Ok(self.notifier.watch())
    }

    async fn events_by_id(&self, ids: &[Uuid]) -> Result<Vec<StoredEvent>> {
        let wanted: HashSet<&Uuid> = ids.iter().collect();
        Ok(self
            .read_state()
            .log
            .iter()
            .filter(|event| wanted.contains(&event.id))
            .cloned()
            .collect())
    }

    async fn prune(
        &self,
        category: &Category,
        before: DateTime<Utc>,
        read_up_to: Option<Cursor>,
    ) -> Result<u64> {
        check_reserved(category)?;
        Ok(self.write_state().prune(category, before, read_up_to))
    }

    async fn backlog(&self, source: &Source, after: Cursor, limit: u64) -> Result<Backlog> {
        let state = self.read_state();
        let (events, first) = state.backlog(source, after, limit);
        Ok(Backlog {
            events,
            // Appends commit whole and in order, so the first is the oldest.
            oldest: first.filter(|_| events > 0).map(|event| event.observed_at),
        })
    }
}
