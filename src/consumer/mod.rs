//! Consumers: what turns a source's events into work done.
//!
//! - [`processor`]: the [`EventProcessor`] a user (or a sink) implements, and its
//!   typed [`ProcessError`].
//! - [`checkpoint`]: where each group's consumer of a source has got to, stored
//!   under a claim that fences out any earlier owner.
//! - [`dead_letter`]: events skipped under the `Continue` policy, kept with their error.
//! - [`policy`]: what a consumer does when processing fails.
//! - [`source`]: the consumer of one source: read after the cursor, process,
//!   checkpoint, wait for appends.
//! - [`subscription`]: a [`crate::broker::Subscriber`] that runs one source consumer
//!   per source the broker gives it.

pub mod checkpoint;
pub mod dead_letter;

pub use checkpoint::{Checkpoint, CheckpointError, CheckpointStore, Claim, MemoryCheckpointStore};
pub use dead_letter::{DeadLetter, DeadLetterStore, MemoryDeadLetterStore, NewDeadLetter};

#[cfg(feature = "postgres")]
pub use checkpoint::PostgresCheckpointStore;
#[cfg(feature = "postgres")]
pub use dead_letter::PostgresDeadLetterStore;
