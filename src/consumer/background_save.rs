//! A checkpoint write under way while the consumer goes on: on a store that
//! commits durably a write costs about as much as reading a batch, and nothing
//! requires the next batch to wait for it.
//!
//! It keeps the checkpoint's promises: a write stores only a cursor the
//! processor had acknowledged when it started; there is at most one write
//! under way, and the consumer waits for it before starting the next, so
//! checkpoints are stored in order; a write refused because another claim holds
//! the row is reported when the consumer next waits for it, and the claim check
//! before every batch catches the same fence meanwhile. Dropping a
//! [`BackgroundSave`] (the consumer was aborted, as by a crash) aborts its write.

use std::sync::Arc;

use tokio::task::JoinHandle;

use super::checkpoint::{CheckpointError, CheckpointStore, Claim};
use crate::event::Cursor;
use crate::store;

/// The checkpoint write under way, if any; see the module docs.
#[derive(Default)]
pub(super) struct BackgroundSave {
    pending: Option<(Cursor, JoinHandle<Result<(), CheckpointError>>)>,
}

impl BackgroundSave {
    /// Starts storing `cursor` under `claim`. Call [`BackgroundSave::finish`]
    /// first: a write still under way would be forgotten (and aborted).
    pub(super) fn start(
        &mut self,
        checkpoints: &Arc<dyn CheckpointStore>,
        claim: &Claim,
        cursor: Cursor,
    ) {
        let (checkpoints, claim) = (Arc::clone(checkpoints), claim.clone());
        let write = crate::ambient::spawn(async move { checkpoints.save(&claim, cursor).await });
        if let Some((_, forgotten)) = self.pending.replace((cursor, write)) {
            forgotten.abort();
        }
    }

    /// Waits for the write under way: the cursor it stored, or why it did not;
    /// `None` if there was none.
    pub(super) async fn finish(&mut self) -> Option<Result<Cursor, CheckpointError>> {
        let (cursor, write) = self.pending.take()?;
        Some(match write.await {
            Ok(stored) => stored.map(|()| cursor),
            Err(error) => Err(CheckpointError::Store(store::Error::Backend(format!(
                "the checkpoint write did not finish: {error}"
            )))),
        })
    }
}

impl Drop for BackgroundSave {
    fn drop(&mut self) {
        if let Some((_, write)) = self.pending.take() {
            write.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::MemoryCheckpointStore;

    #[tokio::test]
    async fn a_write_stores_its_cursor_and_a_fenced_one_says_so() {
        let checkpoints: Arc<dyn CheckpointStore> = Arc::new(MemoryCheckpointStore::default());
        let source = "category:things".parse().unwrap();
        let (claim, _) = checkpoints.claim("g", &source, "a").await.unwrap();
        let cursor = Cursor::new(1, 7);
        let mut save = BackgroundSave::default();
        assert!(save.finish().await.is_none());
        save.start(&checkpoints, &claim, cursor);
        assert_eq!(save.finish().await.unwrap().unwrap(), cursor);
        let row = checkpoints.load("g", &source).await.unwrap().unwrap();
        assert_eq!(row.cursor, cursor);

        checkpoints.claim("g", &source, "b").await.unwrap();
        save.start(&checkpoints, &claim, Cursor::new(1, 9));
        let refused = save.finish().await.unwrap();
        assert!(matches!(refused, Err(CheckpointError::Fenced { .. })));
        let row = checkpoints.load("g", &source).await.unwrap().unwrap();
        assert_eq!((row.owner.as_str(), row.cursor), ("b", cursor));
    }
}
