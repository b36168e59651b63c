//! Consumers: what turns a source's events into work done.
//!
//! - [`processor`]: the [`EventProcessor`] a user (or a sink) implements, and its
//!   typed [`ProcessError`].
//! - [`checkpoint`]: where each group's consumer of a source has got to, stored
//!   under a claim that fences out any earlier owner.
//! - [`dead_letter`]: events skipped under the `Continue` policy, kept with their error.
//! - [`filter`]: which events a group's processor is given.
//! - [`policy`]: what a consumer does when processing fails.
//! - [`pause`]: an operator's pause of a group, which its consumers wait out.
//! - [`replay`]: an operator's retry and purge of a group's dead letters.
//! - [`source`]: the consumer of one source: read after the cursor, process,
//!   checkpoint, wait for appends; `read_ahead` reads its next batch meanwhile.
//! - [`subscription`]: a [`crate::broker::Subscriber`] that runs one source consumer
//!   per source the broker gives it.

mod background_save;
pub mod board;
pub mod checkpoint;
pub mod dead_letter;
pub mod filter;
pub mod pause;
pub mod policy;
pub mod processor;
mod read_ahead;
pub mod replay;
pub mod resume;
pub(crate) mod retrying;
pub mod settings;
pub mod source;
pub mod subscription;

pub use checkpoint::{
    Checkpoint, CheckpointError, CheckpointStore, Claim, LifecycleCheckpoints,
    MemoryCheckpointStore,
};
pub use dead_letter::{DeadLetter, DeadLetterStore, MemoryDeadLetterStore, NewDeadLetter};
pub use filter::{EventFilter, Glob};
pub use policy::ErrorPolicy;
pub use processor::{EventHandler, EventProcessor, PerEvent, ProcessError, from_fn};
pub use replay::{
    DeadLetterRequest, PurgeReport, ReplayError, RetryReport, Selection, purge_dead_letters,
    retry_dead_letters,
};
pub use settings::{ConsumerSettings, Isolation};
pub use source::{ConsumerState, Halt};
pub use subscription::SubscriptionConsumer;

#[cfg(test)]
pub(crate) mod testing {
    use crate::event::{Category, EventName, NewEvent, StoredEvent, StreamName, WriteCondition};
    use crate::store::{EventStore, MemoryStore};

    /// Appends one event to stream `o-1` of category `orders`.
    pub(crate) async fn append_order(store: &MemoryStore) {
        let event = NewEvent::new(EventName::new("E").unwrap(), serde_json::json!({}));
        store
            .append(
                &Category::new("orders").unwrap(),
                &StreamName::new("o-1").unwrap(),
                WriteCondition::Any,
                vec![event],
            )
            .await
            .unwrap();
    }

    /// `count` events of one stream, as a store returns them.
    pub(crate) async fn events(count: u64) -> Vec<StoredEvent> {
        store_with(count).await.1
    }

    /// A store holding `count` events of one stream of category `things`, and
    /// those events.
    pub(crate) async fn store_with(count: u64) -> (MemoryStore, Vec<StoredEvent>) {
        let events = (0..count)
            .map(|n| NewEvent::new(EventName::new("Happened").unwrap(), serde_json::json!(n)))
            .collect();
        let store = MemoryStore::new();
        let stored = store
            .append(
                &Category::new("things").unwrap(),
                &StreamName::new("thing-1").unwrap(),
                WriteCondition::Any,
                events,
            )
            .await
            .unwrap();
        (store, stored)
    }
}
