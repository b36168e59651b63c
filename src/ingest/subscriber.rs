//! [`IngestSubscriber`]: a [`Subscriber`] of an ingest's group that runs one
//! reader per ingest source the broker gives it. Withdrawing a source stops
//! its reader after the batch in hand (whose append stores its position), so a
//! planned move repeats nothing; a reader fenced by another claim is reported
//! lost, as source consumers are.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::reader::{IngestContext, Reader};
use crate::broker::{Grant, Subscriber, SubscriberError};
use crate::consumer::board::{ConsumerKey, ConsumerState};
use crate::event::{Cursor, Source};

/// One instance of an ingest's group on this node.
pub struct IngestSubscriber {
    context: Arc<IngestContext>,
    grace: Duration,
    running: Mutex<BTreeMap<Source, Running>>,
    closed: AtomicBool,
}

struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
    fenced: Arc<AtomicBool>,
    key: ConsumerKey,
}

impl Running {
    fn is_fenced(&self) -> bool {
        self.task.is_finished() && self.fenced.load(Ordering::SeqCst)
    }
}

impl IngestSubscriber {
    pub fn new(context: Arc<IngestContext>, grace: Duration) -> Self {
        Self {
            context,
            grace,
            running: Mutex::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
        }
    }

    fn running(&self) -> MutexGuard<'_, BTreeMap<Source, Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn start(&self, source: &Source, grant: Option<Grant>) -> Result<(), SubscriberError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(SubscriberError::new("the ingest subscriber has stopped"));
        }
        let Source::Ingest(ingest) = source else {
            return Err(SubscriberError::new(format!(
                "{source} is not an ingest source"
            )));
        };
        let mut running = self.running();
        if running.get(source).is_some_and(|r| r.task.is_finished()) {
            running.remove(source);
        }
        if running.contains_key(source) {
            return Ok(());
        }
        let key = ConsumerKey {
            group: self.context.group.clone(),
            owner: self.context.owner.clone(),
            source: source.clone(),
        };
        let stop = CancellationToken::new();
        let fenced = Arc::new(AtomicBool::new(false));
        let reader = Reader {
            context: Arc::clone(&self.context),
            source: ingest.clone(),
            grant,
            key: key.clone(),
            stop: stop.clone(),
            fenced: Arc::clone(&fenced),
        };
        let task = crate::ambient::spawn(reader.run());
        running.insert(
            source.clone(),
            Running {
                stop,
                task,
                fenced,
                key,
            },
        );
        Ok(())
    }

    /// Stops a reader after its batch in hand, waiting up to the grace period.
    async fn stop_one(&self, running: Running) {
        running.stop.cancel();
        let Running { mut task, key, .. } = running;
        if tokio::time::timeout(self.grace, &mut task).await.is_err() {
            tracing::warn!(group = %key.group, source = %key.source, "ingest reader did not finish its batch within the grace period; aborted it (its batch is read again by the next owner)");
            task.abort();
            let _ = task.await;
            self.context.board.set(&key, ConsumerState::Stopped);
        }
    }

    /// Stops every reader at once, storing nothing: what a crash does.
    pub async fn abort(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let running: Vec<Running> = std::mem::take(&mut *self.running()).into_values().collect();
        for running in running {
            running.task.abort();
            let _ = running.task.await;
        }
    }

    /// Stops every reader gracefully, as withdrawing each would.
    pub async fn stop(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let running: Vec<Running> = std::mem::take(&mut *self.running()).into_values().collect();
        futures::future::join_all(running.into_iter().map(|r| self.stop_one(r))).await;
    }
}

#[async_trait]
impl Subscriber for IngestSubscriber {
    async fn accept(&self, source: &Source) -> Result<(), SubscriberError> {
        self.start(source, None)
    }

    async fn accept_granted(&self, source: &Source, grant: Grant) -> Result<(), SubscriberError> {
        self.start(source, Some(grant))
    }

    /// Ingest positions are not cursors of the store: `None`.
    async fn withdraw(&self, source: &Source) -> Result<Option<Cursor>, SubscriberError> {
        let running = self.running().remove(source);
        if let Some(running) = running {
            if running.task.is_finished() {
                self.context.board.set(&running.key, ConsumerState::Stopped);
            } else {
                self.stop_one(running).await;
            }
        }
        Ok(None)
    }

    fn pause(&self, paused: bool) {
        self.context.pause.set(paused);
    }

    fn take_lost(&self) -> Vec<Source> {
        let mut running = self.running();
        let lost: Vec<Source> = running
            .iter()
            .filter(|(_, r)| r.is_fenced())
            .map(|(source, _)| source.clone())
            .collect();
        for source in &lost {
            if let Some(r) = running.remove(source) {
                self.context.board.set(&r.key, ConsumerState::Stopped);
            }
        }
        lost
    }
}
