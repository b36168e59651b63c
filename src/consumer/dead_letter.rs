//! Dead letters: events a consumer skipped under the `Continue` policy, kept with
//! the error that made it give up, so an operator can see them (`weir dead-letters
//! list`) and replay them by hand.
//!
//! Backends: [`MemoryDeadLetterStore`] and `PostgresDeadLetterStore` (feature
//! `postgres`, table `weir_dead_letters`).

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

/// A dead letter as the store holds it.
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
}

/// Dead letters in this process's memory.
#[derive(Debug, Default)]
pub struct MemoryDeadLetterStore {
    letters: Mutex<Vec<DeadLetter>>,
}

impl MemoryDeadLetterStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn letters(&self) -> MutexGuard<'_, Vec<DeadLetter>> {
        // Only ever pushed to, so a poisoned list is whole.
        self.letters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl DeadLetterStore for MemoryDeadLetterStore {
    async fn record(&self, letter: &NewDeadLetter) -> Result<DeadLetter> {
        let mut letters = self.letters();
        let stored = DeadLetter {
            id: letters.len() as u64 + 1,
            group: letter.group.clone(),
            source: letter.source.clone(),
            event_id: letter.event_id,
            sequence: letter.sequence,
            kind: letter.kind.clone(),
            error: letter.error.clone(),
            attempts: letter.attempts,
            recorded_at: crate::store::store_precision(Utc::now()),
        };
        letters.push(stored.clone());
        Ok(stored)
    }

    async fn list(&self, group: Option<&str>, after: u64, limit: usize) -> Result<Vec<DeadLetter>> {
        Ok(self
            .letters()
            .iter()
            .filter(|letter| letter.id > after)
            .filter(|letter| group.is_none_or(|wanted| letter.group == wanted))
            .take(limit)
            .cloned()
            .collect())
    }
}
