//! What consumers hand events to: an [`EventProcessor`] takes a batch; an
//! [`EventHandler`] (wrapped in [`PerEvent`]) or a closure ([`from_fn`]) takes one
//! event at a time. Failures are [`ProcessError`]s whose `kind` error policies map.

use std::fmt;
use std::future::Future;

use async_trait::async_trait;

use crate::event::StoredEvent;

/// Why processing failed. The `kind` is a short, stable string (`timeout`,
/// `invalid-payload`, …) that an error policy can map; the message is for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ProcessError {
    kind: String,
    message: String,
    index: Option<usize>,
}

impl ProcessError {
    pub fn new(kind: impl Into<String>, message: impl fmt::Display) -> Self {
        Self {
            kind: kind.into(),
            message: message.to_string(),
            index: None,
        }
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
