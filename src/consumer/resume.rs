//! Changing how a category is partitioned without losing or repeating an event.
//!
//! When a group's `partitions` changes (say from 1 to 4, or 4 to 16), its new
//! sources have no checkpoints of their own yet, while the old ones hold where the
//! group got to. A consumer that claims a source looks at the group's checkpoints
//! of *other* sources over the same category (or log) that share slices with it:
//!
//! - it starts at the lowest of their cursors (if that is past its own), since
//!   every event up to there was handled by whichever old source held it;
//! - after that, it skips each event that the old source holding its slice had
//!   already handled (the event's cursor is at or below that source's cursor),
//!   until it has passed the highest of them.
//!
//! So a change made with the fleet stopped, or with old and new nodes never
//! consuming at once, processes every event exactly once. Old checkpoints are
//! left in place; they are only read. Nothing depends on how the layout changed,
//! so splitting, merging and changing twice all work the same way.

use crate::consumer::checkpoint::{CheckpointError, CheckpointStore};
use crate::event::{Cursor, Source, StoredEvent};

/// Old sources that overlap a claimed one, with how far each got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    done: Vec<(Source, Cursor)>,
    until: Cursor,
}

impl Resume {
    /// Where a consumer of `source` in `group`, whose own checkpoint is at
    /// `cursor`, starts, and what it must skip after that (`None`: nothing).
    pub async fn plan(
        checkpoints: &dyn CheckpointStore,
        group: &str,
        source: &Source,
        cursor: Cursor,
    ) -> Result<(Cursor, Option<Resume>), CheckpointError> {
        if matches!(source, Source::Stream(..)) {
            return Ok((cursor, None));
        }
        let whole = source.unpartitioned();
        let done: Vec<(Source, Cursor)> = checkpoints
            .list(Some(group))
            .await?
            .into_iter()
            .filter(|c| c.source != *source && c.source.unpartitioned() == whole)
            .filter(|c| overlap(&c.source, source))
            .map(|c| (c.source, c.cursor))
            .collect();
        let (Some(lowest), Some(until)) = (
            done.iter().map(|(_, c)| *c).min(),
            done.iter().map(|(_, c)| *c).max(),
        ) else {
            return Ok((cursor, None));
        };
        let start = cursor.max(lowest);
        let resume = (until > start).then_some(Resume { done, until });
        Ok((start, resume))
    }

    /// Whether an old source already handled `event`.
    pub fn handled(&self, event: &StoredEvent) -> bool {
        event.cursor <= self.until
            && self
                .done
                .iter()
                .any(|(old, cursor)| event.cursor <= *cursor && old.holds(event))
    }

    /// Whether no event after `cursor` can have been handled by an old source.
    pub fn passed(&self, cursor: Cursor) -> bool {
        cursor >= self.until
    }
}

/// Whether two sources over the same category (or the log) share a slice.
fn overlap(a: &Source, b: &Source) -> bool {
    match (a.partition(), b.partition()) {
        (Some(a), Some(b)) => a.overlaps(b),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::checkpoint::MemoryCheckpointStore;

    fn source(text: &str) -> Source {
        text.parse().unwrap()
    }

    async fn store_with(rows: &[(&str, Cursor)]) -> MemoryCheckpointStore {
        let store = MemoryCheckpointStore::default();
        for (text, cursor) in rows {
            let (claim, _) = store.claim("g", &source(text), "old").await.unwrap();
            store.save(&claim, *cursor).await.unwrap();
        }
        store
    }

    #[tokio::test]
    async fn a_new_partition_starts_at_the_lowest_overlapping_cursor() {
        let store = store_with(&[
            ("category:orders@0/2", Cursor::new(10, 100)),
            ("category:orders@1/2", Cursor::new(20, 200)),
            ("category:other", Cursor::new(90, 900)),
        ])
        .await;
        // 0/4 overlaps only 0/2: start there, nothing left to skip.
        let (start, resume) =
            Resume::plan(&store, "g", &source("category:orders@0/4"), Cursor::START)
                .await
                .unwrap();
        assert_eq!((start, resume), (Cursor::new(10, 100), None));
        // The whole category overlaps both: start at the lower, skip up to the higher.
        let (start, resume) = Resume::plan(&store, "g", &source("category:orders"), Cursor::START)
            .await
            .unwrap();
        assert_eq!(start, Cursor::new(10, 100));
        assert!(resume.unwrap().until == Cursor::new(20, 200));
    }

    #[tokio::test]
    async fn nothing_to_resume_for_a_new_group_or_a_stream() {
        let store = store_with(&[]).await;
        let (start, resume) =
            Resume::plan(&store, "g", &source("category:orders@1/4"), Cursor::START)
                .await
                .unwrap();
        assert_eq!((start, resume), (Cursor::START, None));
        let (_, resume) = Resume::plan(&store, "g", &source("stream:orders/o-1"), Cursor::START)
            .await
            .unwrap();
        assert!(resume.is_none());
    }
}
