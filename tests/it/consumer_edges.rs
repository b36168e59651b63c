//! A consumer at the edges of its contract, on the memory backends and on Postgres:
//!
//! - a transient failure (the destination is unavailable) is tried again until it
//!   passes: no event becomes a dead letter, the consumer reports itself retrying
//!   meanwhile, and every event is processed once it is back;
//! - a permanent failure an event's destination reports as `too_large` becomes a
//!   dead letter and the consumer goes on;
//! - a consumer whose claim was taken while it was paused mid-batch hands no
//!   further batch to its processor (no zombie publishes).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::Semaphore;
use weir::broker::SingletonBroker;
use weir::consumer::{ConsumerSettings, ConsumerState, EventProcessor, ProcessError};
use weir::event::{Cursor, Source, StoredEvent};
use weir::runtime::EventRuntime;
use weir::store::EventStore;

use crate::common;
use crate::common::ConsumerBackend as Backend;
use crate::common::wait_until;

const GROUP: &str = "g";

on_every_backend!(
    Backend:
    transient_failures_are_retried_and_never_dead_lettered,
    too_large_events_become_dead_letters_and_the_source_goes_on,
    a_consumer_fenced_mid_batch_hands_over_no_further_batch,
);

fn source() -> Source {
    "category:orders".parse().unwrap()
}

async fn append(store: &dyn EventStore, count: usize, big: &[usize]) -> Vec<StoredEvent> {
    let payloads = (0..count).map(|n| {
        if big.contains(&n) {
            json!({"n": n, "big": true})
        } else {
            json!({"n": n})
        }
    });
    common::append_orders(store, payloads).await
}

/// Checkpoints only when stopping, so that only the claim check can catch a
/// fenced consumer mid-run.
fn settings(batch_size: usize) -> ConsumerSettings {
    ConsumerSettings {
        poll_interval: Duration::from_millis(50),
        batch_size,
        checkpoint_every: 1_000,
        checkpoint_interval: Duration::from_secs(3600),
        ..ConsumerSettings::default()
    }
}

fn runtime(backend: &Backend, batch_size: usize) -> EventRuntime {
    EventRuntime::new(
        "node-a",
        Arc::new(SingletonBroker::new()),
        backend.stores.clone(),
        settings(batch_size),
    )
    .with_shutdown_grace(Duration::from_secs(5))
}

fn state(runtime: &EventRuntime) -> Option<ConsumerState> {
    runtime
        .status()
        .consumers
        .into_iter()
        .find(|c| c.key.group == GROUP && c.key.source == source())
        .map(|c| c.state)
}

/// A destination that can be down (every batch fails transiently) and refuses
/// events marked `big` as too large; records what it accepted.
#[derive(Default)]
struct Destination {
    down: AtomicBool,
    accepted: Mutex<Vec<StoredEvent>>,
}

impl Destination {
    fn accepted(&self) -> Vec<u64> {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.position)
            .collect()
    }
}

#[async_trait]
impl EventProcessor for Destination {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(ProcessError::transient(
                "unavailable",
                "the destination cannot be reached",
            ));
        }
        for (index, event) in events.iter().enumerate() {
            if event.payload.get("big").is_some() {
                self.accepted
                    .lock()
                    .unwrap()
                    .extend_from_slice(&events[..index]);
                return Err(ProcessError::permanent("too_large", "larger than accepted").at(index));
            }
        }
        self.accepted.lock().unwrap().extend_from_slice(events);
        Ok(())
    }
}

async fn dead_letters(backend: &Backend) -> Vec<(u64, String)> {
    backend
        .stores
        .dead_letters
        .list(Some(GROUP), 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|letter| (letter.sequence, letter.kind))
        .collect()
}

async fn transient_failures_are_retried_and_never_dead_lettered(backend: Backend) {
    let store = Arc::clone(&backend.stores.events);
    let destination = Arc::new(Destination::default());
    destination.down.store(true, Ordering::SeqCst);
    let runtime = runtime(&backend, 3);
    // The default policy, `continue`, is what used to turn an outage into dead
    // letters.
    runtime
        .register_consumer(GROUP, source(), destination.clone(), None)
        .unwrap();
    runtime.start().await.unwrap();
    append(store.as_ref(), 7, &[]).await;
    wait_until("the consumer reports it is retrying", || {
        matches!(state(&runtime), Some(ConsumerState::Retrying(_)))
    })
    .await;
    let Some(ConsumerState::Retrying(reason)) = state(&runtime) else {
        unreachable!()
    };
    assert!(reason.contains("cannot be reached"), "{reason}");
    assert!(runtime.status().is_healthy());
    // Several failed tries later, still nothing skipped.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(dead_letters(&backend).await, []);

    destination.down.store(false, Ordering::SeqCst);
    wait_until("every event is accepted", || {
        destination.accepted().len() == 7
    })
    .await;
    assert_eq!(destination.accepted(), [0, 1, 2, 3, 4, 5, 6]);
    wait_until("the consumer runs again", || {
        state(&runtime) == Some(ConsumerState::Running)
    })
    .await;
    runtime.stop().await;
    assert_eq!(dead_letters(&backend).await, []);
}

async fn too_large_events_become_dead_letters_and_the_source_goes_on(backend: Backend) {
    let store = Arc::clone(&backend.stores.events);
    let events = append(store.as_ref(), 6, &[2]).await;
    let destination = Arc::new(Destination::default());
    let runtime = runtime(&backend, 10);
    runtime
        .register_consumer(GROUP, source(), destination.clone(), None)
        .unwrap();
    runtime.start().await.unwrap();
    wait_until("the events after the big one are accepted", || {
        destination.accepted().len() == 5
    })
    .await;
    runtime.stop().await;
    assert_eq!(destination.accepted(), [0, 1, 3, 4, 5]);
    assert_eq!(
        dead_letters(&backend).await,
        [(events[2].sequence, "too_large".to_owned())]
    );
}

/// Holds its first batch until the test lets it go; records every batch.
struct Gated {
    gate: Semaphore,
    batches: Mutex<Vec<Vec<u64>>>,
}

#[async_trait]
impl EventProcessor for Gated {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        self.batches
            .lock()
            .unwrap()
            .push(events.iter().map(|e| e.position).collect());
        self.gate.acquire().await.unwrap().forget();
        Ok(())
    }
}

async fn a_consumer_fenced_mid_batch_hands_over_no_further_batch(backend: Backend) {
    let store = Arc::clone(&backend.stores.events);
    append(store.as_ref(), 9, &[]).await;
    let processor = Arc::new(Gated {
        gate: Semaphore::new(0),
        batches: Mutex::default(),
    });
    let runtime = runtime(&backend, 3);
    runtime
        .register_consumer(GROUP, source(), processor.clone(), None)
        .unwrap();
    runtime.start().await.unwrap();
    wait_until("the first batch is in the processor", || {
        !processor.batches.lock().unwrap().is_empty()
    })
    .await;

    // While the consumer is stuck in its batch (a GC pause, a stalled VM),
    // another owner takes the source over.
    let (_, cursor) = backend
        .stores
        .checkpoints
        .claim(GROUP, &source(), "new-owner")
        .await
        .unwrap();
    assert_eq!(cursor, Cursor::START);
    // Let every batch through that the consumer would still hand over.
    processor.gate.add_permits(100);
    wait_until("the consumer finds itself fenced", || {
        matches!(state(&runtime), Some(ConsumerState::Fenced(_)))
    })
    .await;
    runtime.stop().await;
    // The batch in flight went out; the next one did not.
    assert_eq!(*processor.batches.lock().unwrap(), [vec![0, 1, 2]]);
    let row = backend
        .stores
        .checkpoints
        .load(GROUP, &source())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.owner.as_str(), row.cursor),
        ("new-owner", Cursor::START)
    );
}
