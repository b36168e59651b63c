//! The consumer of one source: claims the source's checkpoint, reads batches after
//! its cursor, hands them to the processor under the error policy, stores the
//! checkpoint every `checkpoint_every` events or `checkpoint_interval`, and between
//! batches waits for an append notification or the poll interval. While the
//! processor works on a full batch, the next one is read ahead (see
//! [`super::read_ahead`]).
//!
//! Asked to stop, it finishes the batch in hand, stores its checkpoint and returns
//! the cursor it stopped at: that is what lets a handover process no event twice. A
//! consumer whose checkpoint write is refused because another subscriber claimed the
//! source stops at once, without touching the checkpoint again.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::background_save::BackgroundSave;
pub use super::board::{Board, ConsumerEntry, ConsumerKey, ConsumerState, Halt, Lag};
use super::checkpoint::{CheckpointError, CheckpointStore, Claim};
use super::dead_letter::{DeadLetterStore, NewDeadLetter};
use super::pause::PauseSwitch;
use super::policy::Action;
use super::processor::{EventProcessor, ProcessError};
use super::read_ahead::ReadAhead;
use super::resume::Resume;
use super::retrying::{Retrying, transient_backoff};
use super::settings::{ConsumerSettings, Executor};
use crate::broker::Grant;
use crate::event::{Cursor, Source, StoredEvent};
use crate::metrics as names;
use crate::store::{AppendWatcher, EventStore};

/// How long to wait before trying an unreachable store again.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// What every source consumer of one registered consumer shares.
pub struct ConsumerContext {
    pub group: String,
    /// Who claims checkpoints: the subscriber id, or the node id for a consumer of
    /// a fixed source.
    pub owner: String,
    pub events: Arc<dyn EventStore>,
    pub checkpoints: Arc<dyn CheckpointStore>,
    pub dead_letters: Arc<dyn DeadLetterStore>,
    pub processor: Arc<dyn EventProcessor>,
    pub settings: ConsumerSettings,
    pub executor: Executor,
    pub board: Board,
    /// On while an operator has paused the group: nothing is read meanwhile.
    pub pause: PauseSwitch,
}

/// A source consumer running as a task. Stop it with [`RunningConsumer::stop`] or
/// [`RunningConsumer::abort`]; dropping it aborts the task, so that no consumer
/// goes on unowned.
pub struct RunningConsumer {
    stop: CancellationToken,
    /// Taken by `stop` and `abort`; still here when dropped otherwise.
    task: Option<JoinHandle<Option<Cursor>>>,
    key: ConsumerKey,
    board: Board,
}

impl Drop for RunningConsumer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl RunningConsumer {
    /// Consumes `source`, claiming its checkpoint under no allocation decision.
    pub fn spawn(context: Arc<ConsumerContext>, source: Source) -> Self {
        Self::spawn_granted(context, source, None)
    }

    /// Consumes `source`, claiming its checkpoint under `grant` if given: a claim
    /// refused because the row was claimed under a newer decision ends the
    /// consumer as fenced.
    pub fn spawn_granted(
        context: Arc<ConsumerContext>,
        source: Source,
        grant: Option<Grant>,
    ) -> Self {
        let key = ConsumerKey {
            group: context.group.clone(),
            owner: context.owner.clone(),
            source: source.clone(),
        };
        let stop = CancellationToken::new();
        let board = context.board.clone();
        let consumer = SourceConsumer {
            context,
            source,
            grant,
            key: key.clone(),
            stop: stop.clone(),
        };
        let supervised = supervised(consumer.run(), key.clone(), board.clone());
        Self {
            stop,
            task: Some(crate::ambient::spawn(supervised)),
            key,
            board,
        }
    }

    /// Asks the consumer to stop after the batch in hand and store its checkpoint;
    /// waits up to `grace` for that. Returns the cursor it stopped and checkpointed
    /// at, or `None` if it never got going, was fenced, or had to be aborted after
    /// `grace` (then the events since its last checkpoint will be processed again).
    pub async fn stop(mut self, grace: Duration) -> Option<Cursor> {
        self.stop.cancel();
        let mut task = self.task.take()?;
        match tokio::time::timeout(grace, &mut task).await {
            Ok(Ok(cursor)) => {
                // It may have been fenced a moment before it was asked to stop: the
                // source is no longer its own, and a fenced state left behind would
                // count as a source this node owns, with a lag that never moves. (A
                // failure stays: it says why the consumer or the runtime stopped.)
                if self.fenced_on_board() {
                    self.board.set(&self.key, ConsumerState::Stopped);
                }
                cursor
            }
            Ok(Err(error)) => {
                tracing::error!(group = %self.key.group, source = %self.key.source, %error, "source consumer task failed");
                None
            }
            Err(_) => {
                tracing::warn!(
                    group = %self.key.group, source = %self.key.source, ?grace,
                    "source consumer did not finish its batch within the grace period; aborted it, so events after its last checkpoint will be processed again"
                );
                task.abort();
                let _ = task.await;
                self.board.set(&self.key, ConsumerState::Stopped);
                None
            }
        }
    }

    /// Whether the consumer ended on its own (fenced, or stopped by its error
    /// policy) rather than being asked to.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_some_and(JoinHandle::is_finished)
    }

    /// Whether the consumer ended because another claim holds its checkpoint.
    pub fn is_fenced(&self) -> bool {
        self.is_finished() && self.fenced_on_board()
    }

    fn fenced_on_board(&self) -> bool {
        self.board
            .entries()
            .get(&self.key)
            .is_some_and(|entry| matches!(entry.state, ConsumerState::Fenced(_)))
    }

    /// Forgets a consumer that ended on its own once its source is no longer this
    /// subscriber's: it reports stopped, so that neither status nor readiness
    /// counts it as a source this node owns and does not consume.
    pub fn retire(mut self) {
        if self.task.take().is_some() {
            self.board.set(&self.key, ConsumerState::Stopped);
        }
    }

    /// Stops the consumer at once, storing nothing: what a crash does.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Runs a consumer; should it panic, reports it failed and halts the runtime: a
/// consumer that stopped without saying so would leave its source unconsumed
/// while the node looks healthy.
async fn supervised(
    run: impl Future<Output = Option<Cursor>>,
    key: ConsumerKey,
    board: Board,
) -> Option<Cursor> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(run).catch_unwind().await {
        Ok(cursor) => cursor,
        Err(panic) => {
            let reason = format!(
                "the consumer of {} for {} in group {} panicked: {}",
                key.source,
                key.owner,
                key.group,
                crate::broker::panic_message(panic.as_ref())
            );
            tracing::error!("{reason}");
            board.set(&key, ConsumerState::Failed(reason.clone()));
            board.halt(Halt::Panicked(reason));
            None
        }
    }
}

/// Why consuming ended.
enum End {
    /// Asked to stop.
    Stopped,
    /// The error policy said stop.
    Failed(ProcessError, StoredEvent),
    /// The error policy halted the runtime.
    Halted(ProcessError, StoredEvent),
    /// Another claim holds the checkpoint now.
    Fenced(CheckpointError),
}

/// Where a consumer stands.
struct Progress {
    claim: Claim,
    cursor: Cursor,
    /// The cursor last stored.
    saved: Cursor,
    /// Events consumed since the last store.
    unsaved: u64,
    saved_at: Instant,
    /// What older sources of the group already handled (see [`Resume`]).
    resume: Option<Resume>,
    /// The checkpoint write under way while consuming goes on.
    saving: BackgroundSave,
}

struct SourceConsumer {
    context: Arc<ConsumerContext>,
    source: Source,
    /// The allocation decision its checkpoint is claimed under, if any.
    grant: Option<Grant>,
    key: ConsumerKey,
    stop: CancellationToken,
}

impl SourceConsumer {
    async fn run(self) -> Option<Cursor> {
        self.report(ConsumerState::Starting);
        let mut progress = match self.claim().await {
            Ok(Some(progress)) => progress,
            Ok(None) => {
                self.report(ConsumerState::Stopped);
                return None;
            }
            Err(error) => {
                let group = self.key.group.clone();
                metrics::counter!(names::FENCED_CONSUMERS, "group" => group).increment(1);
                tracing::error!(group = %self.key.group, source = %self.source, %error, "not consuming");
                self.report(ConsumerState::Fenced(error.to_string()));
                return None;
            }
        };
        self.report(ConsumerState::Running);
        self.context.board.set_cursor(&self.key, progress.cursor);
        tracing::info!(group = %self.key.group, owner = %self.key.owner, source = %self.source, cursor = %progress.cursor, "consuming");
        let end = self.consume(&mut progress).await;
        let end = match end {
            End::Fenced(error) => End::Fenced(error),
            // Whatever else ended it, what was processed is stored: this is what
            // lets the next owner start right after it. A store that cannot be
            // reached is tried again until whoever stops this consumer stops
            // waiting (the grace period).
            other => loop {
                match self.save(&mut progress).await {
                    Ok(()) => break other,
                    Err(error @ CheckpointError::Fenced { .. }) => break End::Fenced(error),
                    Err(error) if error.is_retryable() => {
                        tracing::warn!(group = %self.key.group, source = %self.source, %error, "cannot store the final checkpoint; trying again");
                        tokio::time::sleep(RETRY_DELAY).await;
                    }
                    Err(error) => {
                        tracing::warn!(group = %self.key.group, source = %self.source, %error, "could not store the final checkpoint; events after the last one will be processed again");
                        break other;
                    }
                }
            },
        };
        let group = self.key.group.clone();
        match end {
            End::Stopped => {
                tracing::info!(group = %self.key.group, owner = %self.key.owner, source = %self.source, cursor = %progress.cursor, "stopped consuming");
                self.report(ConsumerState::Stopped);
                Some(progress.cursor)
            }
            End::Failed(error, event) => {
                metrics::counter!(names::STOPPED_CONSUMERS, "group" => group).increment(1);
                let reason = format!(
                    "stopped by its error policy at event {} (sequence {}): {error}",
                    event.id, event.sequence
                );
                tracing::error!(group = %self.key.group, source = %self.source, "{reason}");
                self.report(ConsumerState::Failed(reason));
                Some(progress.cursor)
            }
            End::Halted(error, event) => {
                let reason = format!(
                    "halted the runtime at event {} (sequence {}): {error}",
                    event.id, event.sequence
                );
                tracing::error!(group = %self.key.group, source = %self.source, "{reason}");
                self.report(ConsumerState::Failed(reason));
                Some(progress.cursor)
            }
            End::Fenced(error) => {
                metrics::counter!(names::FENCED_CONSUMERS, "group" => group).increment(1);
                tracing::error!(group = %self.key.group, source = %self.source, %error, "stopped consuming");
                self.report(ConsumerState::Fenced(error.to_string()));
                None
            }
        }
    }

    fn report(&self, state: ConsumerState) {
        self.context.board.set(&self.key, state);
    }

    /// Claims the checkpoint, trying again while the store is unreachable; `None`
    /// if asked to stop first, the error if a newer decision's claim holds it.
    async fn claim(&self) -> Result<Option<Progress>, CheckpointError> {
        let (group, owner) = (&self.context.group, &self.context.owner);
        let checkpoints = &self.context.checkpoints;
        loop {
            let claimed = match self.grant {
                Some(grant) => {
                    checkpoints
                        .claim_granted(group, &self.source, owner, grant)
                        .await
                }
                None => checkpoints.claim(group, &self.source, owner).await,
            };
            match claimed {
                Err(error @ CheckpointError::Superseded(_)) => return Err(error),
                Ok((claim, cursor)) => match self.resume_plan(cursor).await {
                    Ok((start, resume)) => {
                        return Ok(Some(Progress {
                            claim,
                            cursor: start,
                            saved: cursor,
                            // A later start is stored at the first save.
                            unsaved: u64::from(start != cursor),
                            saved_at: Instant::now(),
                            resume,
                            saving: BackgroundSave::default(),
                        }));
                    }
                    Err(error) => {
                        tracing::warn!(group = %self.key.group, source = %self.source, %error, "cannot read the group's other checkpoints; trying again");
                    }
                },
                Err(error) => {
                    tracing::warn!(group = %self.key.group, source = %self.source, %error, "cannot claim the checkpoint; trying again");
                }
            }
            if self.pause(RETRY_DELAY).await {
                return Ok(None);
            }
        }
    }

    /// Where to start, given the group's checkpoints of overlapping sources.
    async fn resume_plan(
        &self,
        cursor: Cursor,
    ) -> Result<(Cursor, Option<Resume>), CheckpointError> {
        let context = &self.context;
        Resume::plan(&*context.checkpoints, &context.group, &self.source, cursor).await
    }

    async fn consume(&self, progress: &mut Progress) -> End {
        // Watching starts before the first read, so no append goes unannounced.
        let mut watcher = loop {
            match self.context.events.watch().await {
                Ok(watcher) => break watcher,
                Err(error) => {
                    tracing::warn!(group = %self.key.group, %error, "cannot watch for appends; trying again");
                    if self.pause(RETRY_DELAY).await {
                        return End::Stopped;
                    }
                }
            }
        };
        let settings = &self.context.settings;
        let mut read_ahead = ReadAhead::default();
        loop {
            if self.stop.is_cancelled() {
                return End::Stopped;
            }
            if self.context.pause.is_paused() {
                if let Err(end) = self.wait_out_pause(progress).await {
                    return end;
                }
                continue;
            }
            let batch = match self.read_batch(&mut read_ahead, progress.cursor).await {
                Ok(Some(batch)) => batch,
                Ok(None) => continue,
                Err(end) => return end,
            };
            if batch.is_empty() {
                if let Err(end) = self.save_if_due(progress).await {
                    return end;
                }
                if self.wait_for_appends(&mut watcher).await {
                    return End::Stopped;
                }
                continue;
            }
            let group = &self.key.group;
            // The claim is checked before the batch goes out, not only when the
            // checkpoint is next saved: a consumer paused past the member timeout
            // must not publish what its source's new owner publishes too.
            let checking = Instant::now();
            match self.verify(progress).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(end) => return end,
            }
            names::consumer_stage(group, "claim_check", checking.elapsed());
            // A short batch reached the end of the source: what comes next is
            // for the watcher to announce.
            let (events, limit) = (&self.context.events, settings.batch_size);
            let full = settings.read_ahead && batch.len() >= limit;
            if let (true, Some(last)) = (full, batch.last()) {
                read_ahead.start(events, &self.source, last.cursor, limit);
            }
            let batch = self.not_yet_handled(batch, progress);
            let Some(end_of_batch) = batch.last().map(|event| event.cursor) else {
                continue;
            };
            let (batch, filtered) = self.filtered(batch);
            if let Err(end) = self.process_kept(batch, progress).await {
                return end;
            }
            // Only now: the checkpoint never passes an event before it is done.
            self.pass_over(progress, end_of_batch, filtered);
            let saving = Instant::now();
            if let Err(end) = self.save_if_due(progress).await {
                return end;
            }
            names::consumer_stage(group, "checkpoint", saving.elapsed());
        }
    }

    /// The batch after `cursor` (read ahead, or read now), timed; `Ok(None)`
    /// after a failed read and a pause.
    async fn read_batch(
        &self,
        read_ahead: &mut ReadAhead,
        cursor: Cursor,
    ) -> Result<Option<Vec<StoredEvent>>, End> {
        let (events, limit) = (&self.context.events, self.context.settings.batch_size);
        let reading = Instant::now();
        match read_ahead
            .take_or_read(events, &self.source, cursor, limit)
            .await
        {
            Ok(batch) => {
                if let Some(first) = batch.first() {
                    names::consumer_stage(&self.key.group, "read", reading.elapsed());
                    names::consumer_pickup(&self.key.group, first.observed_at);
                }
                Ok(Some(batch))
            }
            Err(error) => {
                tracing::warn!(group = %self.key.group, source = %self.source, %error, "cannot read events; trying again");
                if self.pause(RETRY_DELAY).await {
                    return Err(End::Stopped);
                }
                Ok(None)
            }
        }
    }

    /// Stores the checkpoint, then waits, reading nothing, until the group is
    /// resumed or the consumer is asked to stop.
    async fn wait_out_pause(&self, progress: &mut Progress) -> Result<(), End> {
        if let Err(error) = self.save(progress).await {
            if let CheckpointError::Fenced { .. } = error {
                return Err(End::Fenced(error));
            }
            tracing::warn!(group = %self.key.group, source = %self.source, %error, "cannot store the checkpoint before pausing; it is stored later");
        }
        self.report(ConsumerState::Paused);
        tracing::info!(group = %self.key.group, source = %self.source, "paused");
        tokio::select! {
            biased;
            () = self.stop.cancelled() => return Err(End::Stopped),
            () = self.context.pause.resumed() => {}
        }
        tracing::info!(group = %self.key.group, source = %self.source, "resumed");
        self.report(ConsumerState::Running);
        Ok(())
    }

    /// Checks that this consumer's claim still holds the checkpoint: `Ok(true)` if
    /// it does, `Ok(false)` after a pause if the store could not say (read again,
    /// then), `Err` if fenced or asked to stop.
    async fn verify(&self, progress: &Progress) -> Result<bool, End> {
        match self.context.checkpoints.verify(&progress.claim).await {
            Ok(()) => Ok(true),
            Err(error @ CheckpointError::Fenced { .. }) => Err(End::Fenced(error)),
            Err(error) => {
                tracing::warn!(group = %self.key.group, source = %self.source, %error, "cannot check the claim on the checkpoint; trying again");
                if self.pause(RETRY_DELAY).await {
                    return Err(End::Stopped);
                }
                Ok(false)
            }
        }
    }

    /// Waits for an append to the source, the poll interval, or a stop; `true` if
    /// asked to stop.
    async fn wait_for_appends(&self, watcher: &mut AppendWatcher) -> bool {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => true,
            () = watcher.wait(&self.source, self.context.settings.poll_interval) => false,
        }
    }

    /// Processes a batch under the error policy, moving the cursor past every event
    /// processed or skipped. Transient failures are tried again until they pass
    /// (see [`SourceConsumer::wait_transient`]); only permanent ones reach the policy.
    async fn process(&self, batch: Arc<[StoredEvent]>, progress: &mut Progress) -> Result<(), End> {
        let context = &self.context;
        let mut start = 0;
        // Once a batch fails without saying where, its events go one at a time.
        let mut one_at_a_time = false;
        let mut attempts = 0;
        let mut retrying = Retrying::new(&context.group);
        while start < batch.len() {
            let end = if one_at_a_time {
                start + 1
            } else {
                batch.len()
            };
            let error = match context
                .executor
                .process(&context.processor, &batch, start..end)
                .await
            {
                Ok(()) => {
                    self.advance(progress, &batch[start..end]);
                    start = end;
                    attempts = 0;
                    if retrying.recovered() {
                        self.report(ConsumerState::Running);
                    }
                    continue;
                }
                Err(error) => error,
            };
            metrics::counter!(names::PROCESSING_ERRORS, "group" => context.group.clone(), "kind" => error.kind().to_owned()).increment(1);
            let failed = match error.index() {
                Some(index) if start + index < end => start + index,
                // A transient failure says nothing about which event is at fault:
                // the same events are tried again as they are.
                _ if error.is_transient() => start,
                _ if end - start > 1 => {
                    one_at_a_time = true;
                    continue;
                }
                _ => start,
            };
            self.advance(progress, &batch[start..failed]);
            start = failed;
            if error.is_transient() {
                if self.wait_transient(&error, &mut retrying).await {
                    return Err(End::Stopped);
                }
                // A wait may be long: whoever took the source over meanwhile
                // publishes these events, so this consumer must not.
                while !self.verify(progress).await? {}
                continue;
            }
            attempts += 1;
            if self
                .apply_policy(&batch[start], &error, attempts, progress)
                .await?
            {
                start += 1;
                attempts = 0;
            }
        }
        Ok(())
    }

    /// Applies the error policy to a permanent failure of `event`, its
    /// `attempts`th; `Ok(true)` if the event was skipped (kept as a dead letter),
    /// `Ok(false)` to try it again.
    async fn apply_policy(
        &self,
        event: &StoredEvent,
        error: &ProcessError,
        attempts: u32,
        progress: &mut Progress,
    ) -> Result<bool, End> {
        let context = &self.context;
        let action = if error.is_dead_letter() {
            Action::Skip
        } else {
            context.settings.error_policy.decide(error, attempts)
        };
        match action {
            Action::RetryAfter(wait) => {
                tracing::warn!(group = %context.group, source = %self.source, event = %event.id, attempts, ?wait, %error, "processing failed; retrying");
                if self.pause(wait).await {
                    return Err(End::Stopped);
                }
                Ok(false)
            }
            Action::Skip => {
                self.dead_letter(event, error, attempts).await?;
                progress.cursor = event.cursor;
                context.board.set_cursor(&self.key, event.cursor);
                progress.unsaved += 1;
                Ok(true)
            }
            Action::Stop => Err(End::Failed(error.clone(), event.clone())),
            Action::Exit(code) => {
                context.board.halt(Halt::Exit {
                    code,
                    error: error.clone(),
                });
                Err(End::Halted(error.clone(), event.clone()))
            }
            Action::Raise => {
                context.board.halt(Halt::Raise(error.clone()));
                Err(End::Halted(error.clone(), event.clone()))
            }
        }
    }

    /// Waits before trying again after a transient failure, reporting the consumer
    /// as retrying; `true` if asked to stop meanwhile.
    async fn wait_transient(&self, error: &ProcessError, retrying: &mut Retrying) -> bool {
        if retrying.failed() {
            self.report(ConsumerState::Retrying(format!(
                "transient failure, trying again with backoff: {error}"
            )));
        }
        let wait = transient_backoff(retrying.failures);
        tracing::warn!(group = %self.context.group, source = %self.source, failures = retrying.failures, ?wait, %error, "transient processing failure; trying again");
        self.pause(wait).await
    }

    fn advance(&self, progress: &mut Progress, processed: &[StoredEvent]) {
        if let Some(last) = processed.last() {
            progress.cursor = last.cursor;
            self.context.board.set_cursor(&self.key, last.cursor);
            progress.unsaved += processed.len() as u64;
            metrics::counter!(names::EVENTS_PROCESSED, "group" => self.context.group.clone())
                .increment(processed.len() as u64);
        }
    }

    /// Records `event` as a dead letter, trying again while the store is
    /// unreachable: the event is skipped only once it is recorded.
    async fn dead_letter(
        &self,
        event: &StoredEvent,
        error: &ProcessError,
        attempts: u32,
    ) -> Result<(), End> {
        let letter = NewDeadLetter {
            group: self.context.group.clone(),
            source: self.source.clone(),
            event_id: event.id,
            sequence: event.sequence,
            kind: error.kind().to_owned(),
            error: error.message().to_owned(),
            attempts,
        };
        loop {
            match self.context.dead_letters.record(&letter).await {
                Ok(stored) => {
                    self.context.board.dead_lettered(&self.key, &stored);
                    metrics::counter!(names::DEAD_LETTERS, "group" => self.context.group.clone())
                        .increment(1);
                    tracing::warn!(group = %self.context.group, source = %self.source, event = %event.id, attempts, %error, "skipped an event; kept as a dead letter");
                    return Ok(());
                }
                Err(store_error) => {
                    tracing::warn!(group = %self.context.group, %store_error, "cannot record a dead letter; trying again");
                    if self.pause(RETRY_DELAY).await {
                        return Err(End::Stopped);
                    }
                }
            }
        }
    }

    /// Starts storing the checkpoint if `checkpoint_every` events or
    /// `checkpoint_interval` have passed since the last store, once the write
    /// before it has finished. Only a fenced claim ends consuming; a store that
    /// cannot be reached is tried again next time.
    async fn save_if_due(&self, progress: &mut Progress) -> Result<(), End> {
        let settings = &self.context.settings;
        let due = progress.unsaved >= settings.checkpoint_every
            || progress.saved_at.elapsed() >= settings.checkpoint_interval;
        if !due {
            return Ok(());
        }
        match self.finish_saving(progress).await {
            Err(error @ CheckpointError::Fenced { .. }) => return Err(End::Fenced(error)),
            Err(error) => {
                tracing::warn!(group = %self.key.group, source = %self.source, %error, "cannot store the checkpoint; trying again");
            }
            Ok(()) => {}
        }
        self.start_saving(progress);
        progress.unsaved = 0;
        progress.saved_at = Instant::now();
        Ok(())
    }

    /// Starts writing the cursor reached, unless it is stored already.
    fn start_saving(&self, progress: &mut Progress) {
        if progress.cursor != progress.saved {
            let (claim, cursor) = (&progress.claim, progress.cursor);
            progress
                .saving
                .start(&self.context.checkpoints, claim, cursor);
        }
    }

    /// Waits for the checkpoint write under way, if any.
    async fn finish_saving(&self, progress: &mut Progress) -> Result<(), CheckpointError> {
        if let Some(cursor) = progress.saving.finish().await.transpose()? {
            progress.saved = cursor;
            metrics::counter!(names::CHECKPOINT_WRITES, "group" => self.context.group.clone())
                .increment(1);
        }
        Ok(())
    }

    /// Stores the checkpoint now, after the write under way.
    async fn save(&self, progress: &mut Progress) -> Result<(), CheckpointError> {
        // Any other failure of the earlier write is made good by this one.
        if let Err(error @ CheckpointError::Fenced { .. }) = self.finish_saving(progress).await {
            return Err(error);
        }
        self.start_saving(progress);
        self.finish_saving(progress).await?;
        progress.unsaved = 0;
        progress.saved_at = Instant::now();
        Ok(())
    }

    /// Waits `wait`; `true` if asked to stop meanwhile.
    async fn pause(&self, wait: Duration) -> bool {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => true,
            () = tokio::time::sleep(wait) => false,
        }
    }
}

mod passing;
#[cfg(test)]
mod tests;
