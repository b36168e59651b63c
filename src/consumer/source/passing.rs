//! What a source consumer passes over without processing: events an older
//! source of the group handled already, and events the group's filter leaves
//! out. Either way the cursor moves past them once everything before them is
//! processed, so a restart does not read them again.

use std::sync::Arc;

use tokio::time::Instant;

use super::{End, Progress, SourceConsumer};
use crate::event::{Cursor, StoredEvent};
use crate::metrics as names;

impl SourceConsumer {
    /// The events of `batch` to process: those no older source handled. When it
    /// keeps none, the cursor moves past the batch.
    pub(super) fn not_yet_handled(
        &self,
        batch: Vec<StoredEvent>,
        progress: &mut Progress,
    ) -> Vec<StoredEvent> {
        let Some(resume) = &progress.resume else {
            return batch;
        };
        let last = batch.last().map(|e| e.cursor);
        let keep: Vec<StoredEvent> = batch.into_iter().filter(|e| !resume.handled(e)).collect();
        if let (true, Some(last)) = (keep.is_empty(), last) {
            progress.cursor = last;
            self.context.board.set_cursor(&self.key, last);
            progress.unsaved += 1;
        }
        if resume.passed(progress.cursor) {
            progress.resume = None;
        }
        keep
    }

    /// The events of `batch` the group's filter keeps, and how many it dropped.
    pub(super) fn filtered(&self, batch: Vec<StoredEvent>) -> (Vec<StoredEvent>, u64) {
        let Some(filter) = &self.context.settings.filter else {
            return (batch, 0);
        };
        let before = batch.len();
        let kept: Vec<StoredEvent> = batch.into_iter().filter(|e| filter.keeps(e)).collect();
        let dropped = (before - kept.len()) as u64;
        (kept, dropped)
    }

    /// Moves the cursor to `end_of_batch`, past `filtered` events the filter
    /// dropped (all else before it is processed), and counts them.
    pub(super) fn pass_over(&self, progress: &mut Progress, end_of_batch: Cursor, filtered: u64) {
        if filtered == 0 {
            return;
        }
        if end_of_batch > progress.cursor {
            progress.cursor = end_of_batch;
            self.context.board.set_cursor(&self.key, end_of_batch);
        }
        progress.unsaved += filtered;
        metrics::counter!(names::EVENTS_FILTERED, "group" => self.context.group.clone())
            .increment(filtered);
    }

    /// Processes what the filter kept of a batch, if anything, timing it.
    pub(super) async fn process_kept(
        &self,
        batch: Vec<StoredEvent>,
        progress: &mut Progress,
    ) -> Result<(), End> {
        if batch.is_empty() {
            return Ok(());
        }
        let processing = Instant::now();
        self.process(Arc::from(batch), progress).await?;
        names::consumer_stage(&self.key.group, "process", processing.elapsed());
        Ok(())
    }
}
