//! Read-ahead: a source's next batch, read from the store while the consumer's
//! processor works on the current one, so that reading and processing overlap
//! instead of following each other.
//!
//! It keeps the consumer's promises by being only a guess at what the consumer
//! reads next:
//! - at most one read is outstanding and at most one batch held, so a consumer
//!   holds at most one batch beyond the one its processor has;
//! - a batch read ahead is keyed by the cursor it was read after, and the
//!   consumer takes it only if that is still where it stands (a skipped or
//!   resumed event moves the cursor elsewhere: the guess is dropped, read again);
//! - a batch taken goes through the same claim check as a batch read in the
//!   ordinary way before its processor sees it, and the checkpoint moves only
//!   when the processor acknowledges it;
//! - dropping a [`ReadAhead`] (the consumer stopped, was withdrawn or fenced)
//!   aborts its read and discards its batch, so nothing of it is processed.

use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::event::{Cursor, Source, StoredEvent};
use crate::store::{self, EventStore};

/// The next batch of one source, being read or read; see the module docs.
#[derive(Default)]
pub(super) struct ReadAhead {
    pending: Option<Pending>,
}

/// A read started after `after`.
struct Pending {
    after: Cursor,
    read: JoinHandle<store::Result<Vec<StoredEvent>>>,
}

impl ReadAhead {
    /// Starts reading up to `limit` events of `source` after `after`, dropping
    /// whatever was read ahead before.
    pub(super) fn start(
        &mut self,
        events: &Arc<dyn EventStore>,
        source: &Source,
        after: Cursor,
        limit: usize,
    ) {
        self.discard();
        let (events, source) = (Arc::clone(events), source.clone());
        // A task of its own, so that the store's rows are decoded on another
        // worker while the processor's task publishes.
        let read = crate::ambient::spawn(async move { events.read(&source, after, limit).await });
        self.pending = Some(Pending { after, read });
    }

    /// The batch read after `cursor`, waiting for the read if it is still under
    /// way; `None` if nothing was read ahead from there (what was read ahead
    /// from elsewhere is dropped).
    pub(super) async fn take(&mut self, cursor: Cursor) -> Option<store::Result<Vec<StoredEvent>>> {
        let pending = self.pending.take()?;
        if pending.after != cursor {
            pending.read.abort();
            return None;
        }
        // Aborted or panicked: the consumer reads the batch itself.
        pending.read.await.ok()
    }

    /// The batch after `cursor`: the one read ahead from there if there is
    /// one, else read now.
    pub(super) async fn take_or_read(
        &mut self,
        events: &Arc<dyn EventStore>,
        source: &Source,
        cursor: Cursor,
        limit: usize,
    ) -> store::Result<Vec<StoredEvent>> {
        match self.take(cursor).await {
            Some(read) => read,
            None => events.read(source, cursor, limit).await,
        }
    }

    /// Whether a read is under way or a batch waits to be taken.
    #[cfg(test)]
    pub(super) fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    fn discard(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.read.abort();
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.discard();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::testing;

    /// A store of five events, the source holding them, and their cursors.
    async fn five() -> (Arc<dyn EventStore>, Source, Vec<Cursor>) {
        let (store, events) = testing::store_with(5).await;
        let cursors = events.iter().map(|e| e.cursor).collect();
        (Arc::new(store), "category:things".parse().unwrap(), cursors)
    }

    async fn positions(ahead: &mut ReadAhead, cursor: Cursor) -> Option<Vec<u64>> {
        let batch = ahead.take(cursor).await?.unwrap();
        Some(batch.iter().map(|e| e.position).collect())
    }

    #[tokio::test]
    async fn a_batch_read_ahead_is_taken_from_the_cursor_it_was_read_after() {
        let (store, source, cursors) = five().await;
        let mut ahead = ReadAhead::default();
        ahead.start(&store, &source, cursors[1], 2);
        assert_eq!(positions(&mut ahead, cursors[1]).await, Some(vec![2, 3]));
        assert!(!ahead.is_pending(), "a batch is taken only once");
        assert_eq!(positions(&mut ahead, cursors[1]).await, None);
    }

    #[tokio::test]
    async fn a_batch_read_ahead_from_elsewhere_is_dropped() {
        let (store, source, cursors) = five().await;
        let mut ahead = ReadAhead::default();
        ahead.start(&store, &source, cursors[1], 2);
        // The consumer moved elsewhere (say, it skipped an event): the guess is
        // of no use and must not be handed out later either.
        assert_eq!(positions(&mut ahead, cursors[0]).await, None);
        assert!(!ahead.is_pending());
        assert_eq!(positions(&mut ahead, cursors[1]).await, None);
    }

    #[tokio::test]
    async fn starting_again_keeps_one_read_only() {
        let (store, source, cursors) = five().await;
        let mut ahead = ReadAhead::default();
        ahead.start(&store, &source, cursors[0], 2);
        ahead.start(&store, &source, cursors[2], 2);
        assert_eq!(positions(&mut ahead, cursors[0]).await, None);
        ahead.start(&store, &source, cursors[2], 2);
        assert_eq!(positions(&mut ahead, cursors[2]).await, Some(vec![3, 4]));
    }
}
