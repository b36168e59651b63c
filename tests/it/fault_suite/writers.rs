//! The fault suite's writers: four tasks appending a steady trickle of events,
//! each with an idempotency key, and a ledger of what each append stored and
//! when, which the checks compare with what arrived.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::RwLock;
use weir::event::{Category, EventName, IdempotencyKey, NewEvent, StreamName, WriteCondition};
use weir::postgres::PostgresStore;
use weir::store::EventStore;

use super::{APPEND_GUARD, CATEGORIES, EVENTS_PER_APPEND, STREAMS_PER_CATEGORY, WRITERS, category};

/// Where writers append: one store, and its generation (incremented by a reset,
/// and written into each payload so the reader tells the store's lives apart).
pub(super) struct Target {
    pub(super) store: Arc<PostgresStore>,
    pub(super) generation: u64,
}

/// One appended event, as its writer saw it stored.
struct Appended {
    id: String,
    /// When its append was first sent: it was committed after this.
    sent: Instant,
    /// When the append returned: it was committed before this.
    at: Instant,
}

/// Four writers appending until dropped; they can be paused (between appends)
/// and pointed at a new store.
pub(super) struct Writers {
    target: Arc<RwLock<Option<Target>>>,
    ledger: Arc<Mutex<Vec<Appended>>>,
    errors: Arc<Mutex<Vec<(Instant, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    pub(super) fn start(target: Target, every: Duration) -> Self {
        let target = Arc::new(RwLock::new(Some(target)));
        let ledger: Arc<Mutex<Vec<Appended>>> = Arc::default();
        let errors: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let tasks = (0..WRITERS)
            .map(|writer| {
                tokio::spawn(write(
                    writer,
                    every,
                    Arc::clone(&target),
                    Arc::clone(&ledger),
                    Arc::clone(&errors),
                ))
            })
            .collect();
        Self {
            target,
            ledger,
            errors,
            tasks,
        }
    }

    /// Stops appending once the appends in hand are done.
    pub(super) async fn pause(&self) {
        *self.target.write().await = None;
    }

    pub(super) async fn resume(&self, target: Target) {
        *self.target.write().await = Some(target);
    }

    /// Ids of the events appended in `[from, to)`.
    pub(super) fn appended_between(&self, from: Instant, to: Instant) -> Vec<String> {
        self.ledger
            .lock()
            .expect("ledger lock")
            .iter()
            .filter(|a| a.at >= from && a.at < to)
            .map(|a| a.id.clone())
            .collect()
    }

    pub(super) fn appended(&self) -> usize {
        self.ledger.lock().expect("ledger lock").len()
    }

    /// Ids of the events whose append was first sent after `instant`: no reader
    /// could have read them before it.
    pub(super) fn sent_after(&self, instant: Instant) -> HashSet<String> {
        self.ledger
            .lock()
            .expect("ledger lock")
            .iter()
            .filter(|a| a.sent > instant)
            .map(|a| a.id.clone())
            .collect()
    }

    /// Ids of every event appended.
    pub(super) fn all_ids(&self) -> Vec<String> {
        self.ledger
            .lock()
            .expect("ledger lock")
            .iter()
            .map(|a| a.id.clone())
            .collect()
    }

    pub(super) fn errors_between(&self, from: Instant, to: Instant) -> Vec<String> {
        self.errors
            .lock()
            .expect("errors lock")
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, error)| error.clone())
            .collect()
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One writer: every `every`, two events to the next of its streams, round the
/// categories. Each event carries an idempotency key, so an append whose outcome
/// an outage hid is retried without writing it twice.
async fn write(
    writer: usize,
    every: Duration,
    target: Arc<RwLock<Option<Target>>>,
    ledger: Arc<Mutex<Vec<Appended>>>,
    errors: Arc<Mutex<Vec<(Instant, String)>>>,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let name = EventName::new("Happened").expect("a valid name");
    for n in 0usize.. {
        ticker.tick().await;
        let held = target.read().await;
        let Some(target) = held.as_ref() else {
            continue;
        };
        let category = Category::new(category((n + writer) % CATEGORIES)).expect("a category");
        let stream_index = writer + WRITERS * ((n / CATEGORIES) % (STREAMS_PER_CATEGORY / WRITERS));
        let stream = StreamName::new(format!("s{stream_index:02}")).expect("a stream");
        let events: Vec<NewEvent> = (0..EVENTS_PER_APPEND)
            .map(|k| {
                let key = format!("g{}-w{writer}-n{n}-k{k}", target.generation);
                NewEvent::new(
                    name.clone(),
                    json!({ "writer": writer, "n": n, "k": k, "store_generation": target.generation }),
                )
                .with_idempotency_key(IdempotencyKey::new(key).expect("a valid key"))
            })
            .collect();
        let sent = Instant::now();
        let deadline = sent + APPEND_GUARD;
        loop {
            match target
                .store
                .append(&category, &stream, WriteCondition::Any, events.clone())
                .await
            {
                Ok(stored) => {
                    let at = Instant::now();
                    ledger
                        .lock()
                        .expect("ledger lock")
                        .extend(stored.iter().map(|event| Appended {
                            id: event.id.hyphenated().to_string(),
                            sent,
                            at,
                        }));
                    break;
                }
                Err(error) if Instant::now() > deadline => {
                    errors.lock().expect("errors lock").push((
                        Instant::now(),
                        format!(
                            "writer {writer} gave up an append to {category}/{stream} after {APPEND_GUARD:?}: {error}"
                        ),
                    ));
                    break;
                }
                // An outage: the store retries connections itself for a while;
                // this retries the append beyond that.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}
