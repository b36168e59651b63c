//! Dead letters: events a consumer skipped under the `Continue` policy, kept with
//! the error that made it give up, so an operator can see them (`weir dead-letters
//! list`), retry them once the cause is fixed, or purge them (see [`super::replay`]).
//!
//! Backends: [`MemoryDeadLetterStore`] and `PostgresDeadLetterStore` (feature
//! `postgres`, table `weir_dead_letters`).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::event::Source;
use crate::store::Result;

/// A skipped event, as a consumer reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeadLetter {
    pub group: String,
    pub source: Source,
    pub event_id: Uuid,
    /// The event's global sequence.
    pub sequence: u64,
    /// The processor's error kind (a short string such as `timeout`).
    pub kind: String,
    /// The error's text.
    pub error: String,
    /// How many times processing was tried.
    pub attempts: u32,
}

/// A dead letter as the store holds it. A retry that fails again raises
/// `attempts` and replaces `kind` and `error` with the newest failure's;
/// `recorded_at` stays when it was first recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Assigned by the store, increasing.
    pub id: u64,
    pub group: String,
    pub source: Source,
    pub event_id: Uuid,
    pub sequence: u64,
    pub kind: String,
    pub error: String,
    pub attempts: u32,
    /// On the store's clock.
    pub recorded_at: DateTime<Utc>,
}

/// Where dead letters live. Object safe.
#[async_trait]
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Stores a dead letter and returns it as stored.
    async fn record(&self, letter: &NewDeadLetter) -> Result<DeadLetter>;

    /// Up to `limit` dead letters with an id above `after` (0 for all), oldest first,
    /// of one group or of every group.
    async fn list(&self, group: Option<&str>, after: u64, limit: usize) -> Result<Vec<DeadLetter>>;

    /// Up to `limit` dead letters of `group` with an id of at most `up_to`, in
    /// the order a retry takes them (by their event's sequence, then by id),
    /// after the one at `after` (its sequence and id; `(0, 0)` for the first):
    /// how a retry of them all pages through them.
    async fn list_in_order(
        &self,
        group: &str,
        up_to: u64,
        after: (u64, u64),
        limit: usize,
    ) -> Result<Vec<DeadLetter>>;

    /// The newest id of `group`'s dead letters, if it has any.
    async fn last_id(&self, group: &str) -> Result<Option<u64>>;

    /// The dead letters with these ids, of whatever group, oldest first; ids that
    /// name none are left out.
    async fn get(&self, ids: &[u64]) -> Result<Vec<DeadLetter>>;

    /// Removes the dead letters with these ids; returns how many there were.
    async fn remove(&self, ids: &[u64]) -> Result<u64>;

    /// Notes that processing dead letter `id` failed once more: raises its
    /// `attempts` by one and keeps `kind` and `error` as its newest failure.
    /// Returns the letter as now stored, `None` if there is none with that id.
    async fn record_failure(&self, id: u64, kind: &str, error: &str) -> Result<Option<DeadLetter>>;
}

/// Dead letters in this process's memory.
#[derive(Debug, Default)]
pub struct MemoryDeadLetterStore {
    letters: Mutex<Letters>,
}

#[derive(Debug, Default)]
struct Letters {
    by_id: BTreeMap<u64, DeadLetter>,
    /// Ids are never reused, also after a removal.
    last_id: u64,
}

impl MemoryDeadLetterStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn letters(&self) -> MutexGuard<'_, Letters> {
        // No change can panic halfway, so a poisoned list is whole.
        self.letters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl DeadLetterStore for MemoryDeadLetterStore {
    async fn record(&self, letter: &NewDeadLetter) -> Result<DeadLetter> {
        let mut letters = self.letters();
        letters.last_id += 1;
        let stored = DeadLetter {
            id: letters.last_id,
            group: letter.group.clone(),
            source: letter.source.clone(),
            event_id: letter.event_id,
            sequence: letter.sequence,
            kind: letter.kind.clone(),
            error: letter.error.clone(),
            attempts: letter.attempts,
            recorded_at: crate::store::store_precision(crate::ambient::now()),
        };
        letters.by_id.insert(stored.id, stored.clone());
        Ok(stored)
    }

    async fn list(&self, group: Option<&str>, after: u64, limit: usize) -> Result<Vec<DeadLetter>> {
        let letters = self.letters();
        Ok(letters
            .by_id
            .range((Bound::Excluded(after), Bound::Unbounded))
            .map(|(_, letter)| letter)
            .filter(|letter| group.is_none_or(|wanted| letter.group == wanted))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn list_in_order(
        &self,
        group: &str,
        up_to: u64,
        after: (u64, u64),
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let letters = self.letters();
        let mut found: Vec<&DeadLetter> = letters
            .by_id
            .range(..=up_to)
            .map(|(_, letter)| letter)
            .filter(|letter| letter.group == group && (letter.sequence, letter.id) > after)
            .collect();
        found.sort_by_key(|letter| (letter.sequence, letter.id));
        Ok(found.into_iter().take(limit).cloned().collect())
    }

    async fn last_id(&self, group: &str) -> Result<Option<u64>> {
        let letters = self.letters();
        Ok(letters
            .by_id
            .values()
            .rev()
            .find(|letter| letter.group == group)
            .map(|letter| letter.id))
    }

    async fn get(&self, ids: &[u64]) -> Result<Vec<DeadLetter>> {
        let letters = self.letters();
        let mut found: Vec<DeadLetter> = ids
            .iter()
            .filter_map(|id| letters.by_id.get(id).cloned())
            .collect();
        found.sort_by_key(|letter| letter.id);
        found.dedup_by_key(|letter| letter.id);
        Ok(found)
    }

    async fn remove(&self, ids: &[u64]) -> Result<u64> {
        let mut letters = self.letters();
        Ok(ids
            .iter()
            .filter(|id| letters.by_id.remove(id).is_some())
            .count() as u64)
    }

    async fn record_failure(&self, id: u64, kind: &str, error: &str) -> Result<Option<DeadLetter>> {
        let mut letters = self.letters();
        Ok(letters.by_id.get_mut(&id).map(|letter| {
            letter.attempts = letter.attempts.saturating_add(1);
            kind.clone_into(&mut letter.kind);
            error.clone_into(&mut letter.error);
            letter.clone()
        }))
    }
}
