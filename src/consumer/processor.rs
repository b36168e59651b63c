//! What consumers hand events to: an [`EventProcessor`] takes a batch; an
//! [`EventHandler`] (wrapped in [`PerEvent`]) or a closure ([`from_fn`]) takes one
//! event at a time. Failures are [`ProcessError`]s whose `kind` error policies map.
//!
//! Every failure is [transient](ProcessError::transient) or
//! [permanent](ProcessError::permanent). A transient one (connection lost, timeout,
//! broker or store unavailable, broken pipe) says nothing about the event: the
//! consumer tries the same events again with a capped exponential backoff until
//! they go through or it is stopped, so the event is never skipped and lag grows
//! instead. A permanent one (cannot encode, too large, rejected for this message)
//! is about the event and goes through the consumer's error policy.
//! [`ProcessError::new`] makes a permanent error: an error a processor does not
//! classify is treated as the event's, as before classification existed.

use std::fmt;
use std::future::Future;

use async_trait::async_trait;

use crate::event::StoredEvent;

/// Whether trying the same events again may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The destination or a service is unavailable, not the event at fault: try
    /// again, with backoff, until it works or the consumer is stopped.
    Transient,
    /// The event cannot be processed as it is: the error policy decides.
    Permanent,
}

/// The `kind` of a permanent error for an event larger than the destination
/// accepts.
pub const KIND_TOO_LARGE: &str = "too_large";

/// Why processing failed. The `kind` is a short, stable string (`timeout`,
/// `invalid-payload`, …) that an error policy can map; the message is for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ProcessError {
    kind: String,
    message: String,
    index: Option<usize>,
    retry: Retry,
    /// Keep the event as a dead letter whatever the error policy says.
    dead_letter: bool,
}

impl ProcessError {
    /// A permanent error: see [`ProcessError::permanent`].
    pub fn new(kind: impl Into<String>, message: impl fmt::Display) -> Self {
        Self::permanent(kind, message)
    }

    /// A failure of the event itself (cannot encode, too large, rejected): the
    /// consumer's error policy decides what happens to it.
    pub fn permanent(kind: impl Into<String>, message: impl fmt::Display) -> Self {
        Self {
            kind: kind.into(),
            message: message.to_string(),
            index: None,
            retry: Retry::Permanent,
            dead_letter: false,
        }
    }

    /// A permanent failure that the consumer keeps as a dead letter and goes on,
    /// whatever its error policy says: for an event the processor was told to
    /// set aside (a sink's `unmatched = "dead_letter"`), not one that failed.
    pub fn dead_letter(kind: impl Into<String>, message: impl fmt::Display) -> Self {
        Self {
            dead_letter: true,
            ..Self::permanent(kind, message)
        }
    }

    /// Whether the consumer keeps the event as a dead letter without asking its
    /// error policy.
    pub fn is_dead_letter(&self) -> bool {
        self.dead_letter
    }

    /// A failure of something the event needs (connection lost, timeout, broker
    /// unavailable, broken pipe): the consumer tries again with backoff and never
    /// skips the event for it.
    pub fn transient(kind: impl Into<String>, message: impl fmt::Display) -> Self {
        Self {
            retry: Retry::Transient,
            ..Self::permanent(kind, message)
        }
    }

    pub fn retry(&self) -> Retry {
        self.retry
    }

    pub fn is_transient(&self) -> bool {
        self.retry == Retry::Transient
    }

    /// The same error, saying that the batch's event at `index` failed and those
    /// before it were processed.
    #[must_use]
    pub fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// Which event of the batch failed, if the processor said.
    pub fn index(&self) -> Option<usize> {
        self.index
    }
}

/// Processes events, a batch at a time, in read order (per stream, in stream order).
///
/// On failure, the events before [`ProcessError::index`] count as processed and the
/// error is about the event at that index. An error without an index leaves the
/// consumer to find the failing event: it tries the batch's events one at a time,
/// so events before it may be processed a second time.
#[async_trait]
pub trait EventProcessor: Send + Sync + 'static {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError>;
}

/// Processes one event at a time; wrap it in [`PerEvent`] to make it an
/// [`EventProcessor`].
#[async_trait]
pub trait EventHandler: Send + Sync + 'static {
    async fn handle(&self, event: &StoredEvent) -> Result<(), ProcessError>;
}

/// An [`EventHandler`] as an [`EventProcessor`]: handles a batch's events in order
/// and stops at the first failure, naming it.
pub struct PerEvent<H>(pub H);

#[async_trait]
impl<H: EventHandler> EventProcessor for PerEvent<H> {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        for (index, event) in events.iter().enumerate() {
            self.0
                .handle(event)
                .await
                .map_err(|error| error.at(index))?;
        }
        Ok(())
    }
}

/// An [`EventProcessor`] calling `handle` with each event in turn.
///
/// ```
/// use weir::consumer::processor::{ProcessError, from_fn};
///
/// let processor = from_fn(|event| async move {
///     if event.payload.is_null() {
///         return Err(ProcessError::new("empty-payload", "the event has no payload"));
///     }
///     println!("{} {}", event.name, event.payload);
///     Ok(())
/// });
/// # let _ = processor;
/// ```
pub fn from_fn<F, Fut>(handle: F) -> FnProcessor<F>
where
    F: Fn(StoredEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), ProcessError>> + Send,
{
    FnProcessor(handle)
}

/// See [`from_fn`].
pub struct FnProcessor<F>(F);

#[async_trait]
impl<F, Fut> EventProcessor for FnProcessor<F>
where
    F: Fn(StoredEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), ProcessError>> + Send,
{
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        for (index, event) in events.iter().enumerate() {
            (self.0)(event.clone())
                .await
                .map_err(|error| error.at(index))?;
        }
        Ok(())
    }
}
