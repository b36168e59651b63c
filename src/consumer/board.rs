//! The board: what every source consumer of a runtime reports about itself (its
//! state, cursor and lag) and the first failure that halts the runtime. Status
//! pages, readiness and the lag sampler read it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::dead_letter::DeadLetter;
use super::processor::ProcessError;
use crate::event::{Cursor, Source};
use crate::lifecycle::{Journal, LifecycleEvent};

/// How one source consumer is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "lowercase")]
pub enum ConsumerState {
    Starting,
    Running,
    /// Waiting to try a batch again after a transient failure (its destination or
    /// a service it needs is unavailable); the reason names the failure. Nothing
    /// is skipped meanwhile, so lag grows.
    Retrying(String),
    /// Holding its source but reading nothing: an operator paused the group.
    Paused,
    /// Stopped when asked to (a withdraw, or the node stopping).
    Stopped,
    /// Stopped by its error policy, or because the runtime was halted by another
    /// consumer's; the reason says which event and why.
    Failed(String),
    /// Another subscriber claimed the source; this one stopped at once.
    Fenced(String),
}

impl ConsumerState {
    /// Running, starting or stopped on request.
    pub fn is_healthy(&self) -> bool {
        !matches!(self, ConsumerState::Failed(_) | ConsumerState::Fenced(_))
    }
}

/// A failure that stops the whole runtime, by an error policy's `Exit` or `Raise`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    Exit {
        code: i32,
        error: ProcessError,
    },
    Raise(ProcessError),
    /// A consumer task panicked (in a store it calls, say; a processor's panic is
    /// an error its policy handles): the reason says which consumer and why.
    Panicked(String),
}

/// Identifies one source consumer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ConsumerKey {
    pub group: String,
    pub owner: String,
    pub source: Source,
}

/// How far a consumer lagged when last measured (see `runtime::sampler`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Lag {
    /// Readable events after its cursor, counted up to a limit.
    pub events: u64,
    /// Age of the oldest of them; 0 when there are none.
    pub seconds: f64,
    pub measured_at: DateTime<Utc>,
}

/// What the board knows of one source consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerEntry {
    pub state: ConsumerState,
    /// Where it has got to, once it has claimed its checkpoint.
    pub cursor: Option<Cursor>,
    /// Where an ingest source's consumer has got to on its bus (Kafka offset,
    /// JetStream stream sequence); `None` for the store's sources.
    pub position: Option<u64>,
    pub lag: Option<Lag>,
}

/// Where source consumers report how they are doing and where they have got to,
/// and where the first halting failure is kept for the runtime. Clones share the
/// board.
#[derive(Clone)]
pub struct Board {
    entries: Arc<Mutex<BTreeMap<ConsumerKey, ConsumerEntry>>>,
    halt: Arc<watch::Sender<Option<Halt>>>,
    /// Where fenced and failed consumers and dead letters are recorded.
    journal: Journal,
}

impl Default for Board {
    fn default() -> Self {
        Self {
            entries: Arc::default(),
            halt: Arc::new(watch::channel(None).0),
            journal: Journal::disabled(),
        }
    }
}

impl Board {
    /// The same board, recording consumers that end fenced or failed, and dead
    /// letters, in `journal`.
    #[must_use]
    pub fn with_journal(mut self, journal: Journal) -> Self {
        self.journal = journal;
        self
    }

    /// Records a dead letter a consumer kept, unless the consumer reads weir's
    /// own records (a reserved category): a group subscribed to `category:$weir`
    /// that fails on `DeadLetterRecorded` would otherwise record one for each,
    /// and feed on its own records forever.
    pub(crate) fn dead_lettered(&self, key: &ConsumerKey, letter: &DeadLetter) {
        if key.source.is_reserved() {
            return;
        }
        self.journal.record(LifecycleEvent::DeadLetterRecorded {
            group: key.group.clone(),
            source: key.source.clone(),
            event_id: letter.event_id,
            dead_letter: letter.id,
            kind: letter.kind.clone(),
        });
    }

    /// Records a consumer that ended fenced or failed.
    fn journal_state(&self, key: &ConsumerKey, state: &ConsumerState) {
        let (group, source, subscriber) =
            (key.group.clone(), key.source.clone(), key.owner.clone());
        self.journal.record(match state {
            ConsumerState::Fenced(reason) => LifecycleEvent::ConsumerFenced {
                group,
                source,
                subscriber,
                reason: reason.clone(),
            },
            ConsumerState::Failed(reason) => LifecycleEvent::ConsumerErrored {
                group,
                source,
                subscriber,
                reason: reason.clone(),
            },
            _ => return,
        });
    }

    pub(super) fn entries(&self) -> MutexGuard<'_, BTreeMap<ConsumerKey, ConsumerEntry>> {
        // Every update is one insert or one field, so a poisoned map is whole.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set(&self, key: &ConsumerKey, state: ConsumerState) {
        self.journal_state(key, &state);
        let mut entries = self.entries();
        match entries.get_mut(key) {
            Some(entry) => {
                // A consumer that starts again on a source starts from its
                // checkpoint, which it reports once claimed.
                if state == ConsumerState::Starting {
                    entry.cursor = None;
                    entry.position = None;
                    entry.lag = None;
                }
                entry.state = state;
            }
            None => {
                entries.insert(
                    key.clone(),
                    ConsumerEntry {
                        state,
                        cursor: None,
                        position: None,
                        lag: None,
                    },
                );
            }
        }
    }

    pub(super) fn set_cursor(&self, key: &ConsumerKey, cursor: Cursor) {
        if let Some(entry) = self.entries().get_mut(key) {
            entry.cursor = Some(cursor);
        }
    }

    /// Keeps where an ingest source's consumer has got to on its bus.
    pub(crate) fn set_position(&self, key: &ConsumerKey, position: Option<u64>) {
        if let Some(entry) = self.entries().get_mut(key) {
            entry.position = position;
        }
    }

    /// Keeps a lag measured for the consumer at `key`.
    pub fn set_lag(&self, key: &ConsumerKey, lag: Lag) {
        if let Some(entry) = self.entries().get_mut(key) {
            entry.lag = Some(lag);
        }
    }

    /// Every source consumer's state.
    pub fn states_now(&self) -> Vec<(ConsumerKey, ConsumerState)> {
        self.entries()
            .iter()
            .map(|(key, entry)| (key.clone(), entry.state.clone()))
            .collect()
    }

    /// Everything known of every source consumer.
    pub fn entries_now(&self) -> Vec<(ConsumerKey, ConsumerEntry)> {
        self.entries()
            .iter()
            .map(|(key, entry)| (key.clone(), entry.clone()))
            .collect()
    }

    /// Keeps `halt` unless an earlier one is kept already.
    pub(crate) fn halt(&self, halt: Halt) {
        self.halt.send_if_modified(|kept| {
            let first = kept.is_none();
            if first {
                *kept = Some(halt);
            }
            first
        });
    }

    /// Watches for the first halting failure.
    pub fn halted(&self) -> watch::Receiver<Option<Halt>> {
        self.halt.subscribe()
    }
}
