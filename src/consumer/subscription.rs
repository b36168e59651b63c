//! [`SubscriptionConsumer`]: a [`Subscriber`] that consumes what the broker gives
//! it, one [`RunningConsumer`] per accepted source, so that a slow or failing
//! source never holds up the others. Withdrawing a source stops its consumer after
//! the batch in hand and stores its checkpoint before returning, which is what lets
//! the broker report the source released.
//!
//! A source consumer that ends on its own because another claim took its
//! checkpoint is reported to the broker as lost ([`Subscriber::take_lost`]); the
//! broker accepts the source again while its newest decision still gives it, and
//! the accept starts a fresh consumer, which claims under that decision's grant.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use super::source::{ConsumerContext, RunningConsumer};
use crate::broker::{Grant, Subscriber, SubscriberError};
use crate::event::{Cursor, Source};

pub struct SubscriptionConsumer {
    context: Arc<ConsumerContext>,
    /// How long a withdraw waits for the batch in hand before aborting it.
    grace: Duration,
    running: Mutex<BTreeMap<Source, RunningConsumer>>,
    /// Set once stopped or aborted: a late accept must not start a consumer that
    /// nobody would stop.
    closed: AtomicBool,
}

impl SubscriptionConsumer {
    pub fn new(context: Arc<ConsumerContext>, grace: Duration) -> Self {
        Self {
            context,
            grace,
            running: Mutex::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
        }
    }

    fn running(&self) -> MutexGuard<'_, BTreeMap<Source, RunningConsumer>> {
        // Only ever inserted into and removed from, so a poisoned map is whole.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a consumer of `source` unless one runs: one that ended fenced is
    /// replaced, since the broker accepts a source again only when a decision
    /// still gives it.
    fn start(&self, source: &Source, grant: Option<Grant>) -> Result<(), SubscriberError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(SubscriberError::new(
                "the subscription consumer has stopped",
            ));
        }
        let mut running = self.running();
        if running.get(source).is_some_and(RunningConsumer::is_fenced) {
            if let Some(fenced) = running.remove(source) {
                fenced.retire();
            }
        }
        if !running.contains_key(source) {
            let context = Arc::clone(&self.context);
            let consumer = RunningConsumer::spawn_granted(context, source.clone(), grant);
            running.insert(source.clone(), consumer);
        }
        Ok(())
    }

    /// Stops every source consumer at once, storing nothing: what a crash does.
    pub async fn abort(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let running: Vec<RunningConsumer> =
            std::mem::take(&mut *self.running()).into_values().collect();
        for consumer in running {
            consumer.abort().await;
        }
    }

    /// Stops every source consumer gracefully, as withdrawing each would.
    pub async fn stop(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let running: Vec<RunningConsumer> =
            std::mem::take(&mut *self.running()).into_values().collect();
        futures::future::join_all(running.into_iter().map(|c| c.stop(self.grace))).await;
    }
}

#[async_trait]
impl Subscriber for SubscriptionConsumer {
    async fn accept(&self, source: &Source) -> Result<(), SubscriberError> {
        self.start(source, None)
    }

    async fn accept_granted(&self, source: &Source, grant: Grant) -> Result<(), SubscriberError> {
        self.start(source, Some(grant))
    }

    async fn withdraw(&self, source: &Source) -> Result<Option<Cursor>, SubscriberError> {
        let consumer = self.running().remove(source);
        match consumer {
            // Ended on its own: nothing to wait for, and nothing of this node's
            // left on the source.
            Some(consumer) if consumer.is_finished() => {
                consumer.retire();
                Ok(None)
            }
            Some(consumer) => Ok(consumer.stop(self.grace).await),
            None => Ok(None),
        }
    }

    fn pause(&self, paused: bool) {
        self.context.pause.set(paused);
    }

    fn take_lost(&self) -> Vec<Source> {
        let mut running = self.running();
        let lost: Vec<Source> = running
            .iter()
            .filter(|(_, consumer)| consumer.is_fenced())
            .map(|(source, _)| source.clone())
            .collect();
        for source in &lost {
            if let Some(consumer) = running.remove(source) {
                consumer.retire();
            }
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::consumer::processor::from_fn;
    use crate::consumer::settings::{ConsumerSettings, Executor};
    use crate::consumer::source::Board;
    use crate::consumer::testing::append_order as append;
    use crate::consumer::{MemoryCheckpointStore, MemoryDeadLetterStore};
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn once_aborted_it_accepts_nothing_and_consumes_nothing() {
        let events = Arc::new(MemoryStore::new());
        let processed = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&processed);
        let context = Arc::new(ConsumerContext {
            group: "g".into(),
            owner: "g-1".into(),
            events: events.clone(),
            checkpoints: Arc::new(MemoryCheckpointStore::new()),
            dead_letters: Arc::new(MemoryDeadLetterStore::new()),
            processor: Arc::new(from_fn(move |_| {
                let counter = Arc::clone(&counter);
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })),
            settings: ConsumerSettings {
                poll_interval: Duration::from_millis(10),
                ..ConsumerSettings::default()
            },
            executor: Executor::Main,
            board: Board::default(),
            pause: Default::default(),
        });
        let consumer = SubscriptionConsumer::new(context, Duration::from_secs(1));
        let orders: Source = "category:orders".parse().unwrap();
        let append = || append(&events);
        consumer.accept(&orders).await.unwrap();
        append().await;
        while processed.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        consumer.abort().await;
        assert!(consumer.accept(&orders).await.is_err(), "a late accept");
        append().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            processed.load(Ordering::SeqCst),
            1,
            "an aborted consumer went on"
        );
    }

    /// Two subscribers of one group on one store, counting what each processed.
    struct Pair {
        events: Arc<MemoryStore>,
        checkpoints: Arc<MemoryCheckpointStore>,
        consumers: [(SubscriptionConsumer, Arc<AtomicUsize>); 2],
    }

    fn pair() -> Pair {
        let events = Arc::new(MemoryStore::new());
        let checkpoints = Arc::new(MemoryCheckpointStore::new());
        let consumer = |owner: &str| {
            let processed = Arc::new(AtomicUsize::new(0));
            let counter = Arc::clone(&processed);
            let context = Arc::new(ConsumerContext {
                group: "g".into(),
                owner: owner.into(),
                events: events.clone(),
                checkpoints: checkpoints.clone(),
                dead_letters: Arc::new(MemoryDeadLetterStore::new()),
                processor: Arc::new(from_fn(move |_| {
                    let counter = Arc::clone(&counter);
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                })),
                settings: ConsumerSettings {
                    poll_interval: Duration::from_millis(10),
                    checkpoint_every: 1,
                    ..ConsumerSettings::default()
                },
                executor: Executor::Main,
                board: Board::default(),
                pause: Default::default(),
            });
            (
                SubscriptionConsumer::new(context, Duration::from_secs(1)),
                processed,
            )
        };
        Pair {
            consumers: [consumer("a"), consumer("b")],
            events,
            checkpoints,
        }
    }

    /// Waits (with a hang guard) until `counter` reaches `count`.
    async fn processed(counter: &AtomicUsize, count: usize) {
        tokio::time::timeout(Duration::from_secs(60), async {
            while counter.load(Ordering::SeqCst) < count {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the events were not processed");
    }

    #[tokio::test]
    async fn a_stale_decision_cannot_take_the_source_from_its_owner() {
        let Pair {
            events, consumers, ..
        } = pair();
        let [(stale, stale_count), (owner, owner_count)] = &consumers;
        let orders: Source = "category:orders".parse().unwrap();
        owner
            .accept_granted(&orders, Grant::new(1, 6))
            .await
            .unwrap();
        append(&events).await;
        processed(owner_count, 1).await;

        // A node back from a partition applies the decision it cached.
        stale
            .accept_granted(&orders, Grant::new(1, 5))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(60), async {
            while stale.take_lost().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the stale claim was not refused");
        // The owner goes on: its claim still holds.
        append(&events).await;
        processed(owner_count, 2).await;
        assert_eq!(stale_count.load(Ordering::SeqCst), 0);
        owner.stop().await;
        stale.stop().await;
    }

    #[tokio::test]
    async fn a_fenced_source_is_reported_lost_and_consumed_again_on_the_next_accept() {
        let Pair {
            events,
            checkpoints,
            consumers,
        } = pair();
        let [(owner, count), _] = &consumers;
        let orders: Source = "category:orders".parse().unwrap();
        owner
            .accept_granted(&orders, Grant::new(1, 1))
            .await
            .unwrap();
        append(&events).await;
        processed(count, 1).await;
        // Someone claims the row outside any decision: the owner's next save is
        // refused and its consumer stops.
        use crate::consumer::CheckpointStore;
        checkpoints.claim("g", &orders, "intruder").await.unwrap();
        append(&events).await;
        let lost = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let lost = owner.take_lost();
                if !lost.is_empty() {
                    break lost;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the fenced source was never reported lost");
        assert_eq!(lost, std::slice::from_ref(&orders));

        // The broker's decision still gives it: accepted again, it is consumed again.
        owner
            .accept_granted(&orders, Grant::new(1, 1))
            .await
            .unwrap();
        append(&events).await;
        processed(count, 3).await;
        owner.stop().await;
    }
}
