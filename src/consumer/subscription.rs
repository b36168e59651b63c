//! [`SubscriptionConsumer`]: a [`Subscriber`] that consumes what the broker gives
//! it, one [`RunningConsumer`] per accepted source, so that a slow or failing
//! source never holds up the others. Withdrawing a source stops its consumer after
//! the batch in hand and stores its checkpoint before returning, which is what lets
//! the broker report the source released.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use super::source::{ConsumerContext, RunningConsumer};
use crate::broker::{Subscriber, SubscriberError};
use crate::event::{Cursor, Source};

pub struct SubscriptionConsumer {
    context: Arc<ConsumerContext>,
    /// How long a withdraw waits for the batch in hand before aborting it.
    grace: Duration,
    running: Mutex<HashMap<Source, RunningConsumer>>,
    /// Set once stopped or aborted: a late accept must not start a consumer that
    /// nobody would stop.
    closed: AtomicBool,
}

impl SubscriptionConsumer {
    pub fn new(context: Arc<ConsumerContext>, grace: Duration) -> Self {
        Self {
            context,
            grace,
            running: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        }
    }

    fn running(&self) -> MutexGuard<'_, HashMap<Source, RunningConsumer>> {
        // Only ever inserted into and removed from, so a poisoned map is whole.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops every source consumer at once, storing nothing: what a crash does.
    pub async fn abort(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let running: Vec<RunningConsumer> = self.running().drain().map(|(_, c)| c).collect();
        for consumer in running {
            consumer.abort().await;
        }
    }

    /// Stops every source consumer gracefully, as withdrawing each would.
    pub async fn stop(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let running: Vec<RunningConsumer> = self.running().drain().map(|(_, c)| c).collect();
        futures::future::join_all(running.into_iter().map(|c| c.stop(self.grace))).await;
    }
}

#[async_trait]
impl Subscriber for SubscriptionConsumer {
    async fn accept(&self, source: &Source) -> Result<(), SubscriberError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(SubscriberError::new(
                "the subscription consumer has stopped",
            ));
        }
        let mut running = self.running();
        if !running.contains_key(source) {
            let consumer = RunningConsumer::spawn(Arc::clone(&self.context), source.clone());
            running.insert(source.clone(), consumer);
        }
        Ok(())
    }

    async fn withdraw(&self, source: &Source) -> Result<Option<Cursor>, SubscriberError> {
        let consumer = self.running().remove(source);
        match consumer {
            Some(consumer) => Ok(consumer.stop(self.grace).await),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::consumer::processor::from_fn;
    use crate::consumer::settings::{ConsumerSettings, Executor};
    use crate::consumer::source::Board;
    use crate::consumer::{MemoryCheckpointStore, MemoryDeadLetterStore};
    use crate::event::{Category, EventName, NewEvent, StreamName, WriteCondition};
    use crate::store::{EventStore, MemoryStore};

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
        });
        let consumer = SubscriptionConsumer::new(context, Duration::from_secs(1));
        let orders: Source = "category:orders".parse().unwrap();
        let append = || async {
            let event = NewEvent::new(EventName::new("E").unwrap(), serde_json::json!({}));
            events
                .append(
                    &Category::new("orders").unwrap(),
                    &StreamName::new("o-1").unwrap(),
                    WriteCondition::Any,
                    vec![event],
                )
                .await
                .unwrap();
        };
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
}
