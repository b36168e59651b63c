//! The consumer of one ingest source: claims the source, opens its bus after
//! the position stored in the store (never the broker's committed offset or
//! ack floor), and appends what it reads in batches, each batch with its last
//! position in one fenced transaction.
//!
//! A message that cannot become an event goes through the error policy
//! (`continue` keeps a dead letter with its position, headers and first bytes;
//! its position is stored with the next append). A bus or store that cannot be
//! reached is a transient failure: the same batch is tried again with backoff,
//! for as long as it takes, and nothing is skipped. A fenced append stops the
//! consumer at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::message::{EVENT_ID_HEADER, Message, Shape};
use super::store::IngestStore;
use crate::broker::Grant;
use crate::consumer::board::{Board, ConsumerKey, ConsumerState, Halt, Lag};
use crate::consumer::pause::PauseSwitch;
use crate::consumer::policy::Action;
use crate::consumer::retrying::{Retrying, transient_backoff};
use crate::consumer::{
    CheckpointError, Claim, ConsumerSettings, DeadLetterStore, NewDeadLetter, ProcessError,
};
use crate::event::{IngestSource, NewEvent, Source, StreamName, WriteCondition};
use crate::metrics as names;
use crate::store::StreamAppend;

/// A reader of one ingest source's messages, in transport order.
#[async_trait]
pub trait Transport: Send {
    /// The next messages, at least one and at most `max`; waits for the first.
    /// An error is transient: the bus cannot be reached now.
    async fn next(&mut self, max: usize) -> Result<Vec<Message>, String>;

    /// How many messages the bus holds after `position` (after none when
    /// `None`), if it can tell.
    async fn lag(&mut self, position: Option<u64>) -> Option<u64>;
}

/// Where an ingest's messages come from: Kafka or NATS.
#[async_trait]
pub trait IngestBus: Send + Sync + 'static {
    /// A reader of `source` from the message after `after` (from the first
    /// when `None`). An error is transient.
    async fn open(
        &self,
        source: &IngestSource,
        after: Option<u64>,
    ) -> Result<Box<dyn Transport>, String>;
}

/// What every reader of one ingest subscriber shares.
pub struct IngestContext {
    pub group: String,
    /// Who claims sources: the subscriber id.
    pub owner: String,
    pub shape: Shape,
    pub store: Arc<dyn IngestStore>,
    pub dead_letters: Arc<dyn DeadLetterStore>,
    pub bus: Arc<dyn IngestBus>,
    pub settings: ConsumerSettings,
    pub board: Board,
    /// On while an operator has paused the group: nothing is read meanwhile.
    pub pause: PauseSwitch,
}

/// How a reader ended.
enum End {
    Stopped,
    Fenced,
    Failed,
}

/// The reader of one source, run as a task.
pub(super) struct Reader {
    pub(super) context: Arc<IngestContext>,
    pub(super) source: IngestSource,
    pub(super) grant: Option<Grant>,
    pub(super) key: ConsumerKey,
    pub(super) stop: CancellationToken,
    /// Set when the reader ended because another claim holds its source.
    pub(super) fenced: Arc<AtomicBool>,
}

impl Reader {
    pub(super) async fn run(self) {
        let board = &self.context.board;
        board.set(&self.key, ConsumerState::Starting);
        let end = self.consume().await;
        set_lag(&self.key, 0);
        match end {
            End::Stopped => board.set(&self.key, ConsumerState::Stopped),
            End::Fenced => self.fenced.store(true, Ordering::SeqCst),
            End::Failed => {}
        }
    }

    async fn consume(&self) -> End {
        let (claim, mut position) = match self.claim().await {
            Ok(claimed) => claimed,
            Err(end) => return end,
        };
        self.context.board.set_position(&self.key, position);
        let mut transport = match self.open(position).await {
            Some(transport) => transport,
            None => return End::Stopped,
        };
        let mut retrying = Retrying::new(&self.context.group);
        loop {
            if self.context.pause.is_paused() {
                self.context.board.set(&self.key, ConsumerState::Paused);
                tokio::select! {
                    biased;
                    () = self.stop.cancelled() => return End::Stopped,
                    () = self.context.pause.resumed() => {}
                }
                self.context.board.set(&self.key, ConsumerState::Running);
            }
            let batch = tokio::select! {
                biased;
                () = self.stop.cancelled() => return End::Stopped,
                batch = transport.next(self.context.settings.batch_size) => batch,
            };
            let messages = match batch {
                Ok(messages) => messages,
                // Read again from the stored position, on a reader made anew:
                // one whose connection failed may have ended for good.
                Err(error) => {
                    if !self
                        .wait_out(&mut retrying, format!("reading the bus failed: {error}"))
                        .await
                    {
                        return End::Stopped;
                    }
                    match self.open(position).await {
                        Some(reopened) => transport = reopened,
                        None => return End::Stopped,
                    }
                    continue;
                }
            };
            if retrying.recovered() {
                self.context.board.set(&self.key, ConsumerState::Running);
            }
            match self.ingest(&claim, messages).await {
                Ok(Some(last)) => {
                    position = Some(last);
                    self.context.board.set_position(&self.key, position);
                }
                Ok(None) => {}
                Err(end) => return end,
            }
            if let Some(lag) = transport.lag(position).await {
                self.context.board.set_lag(
                    &self.key,
                    Lag {
                        events: lag,
                        seconds: 0.0,
                        measured_at: crate::ambient::now(),
                    },
                );
                set_lag(&self.key, lag);
            }
        }
    }

    /// Claims the source, trying again while the store cannot be reached.
    async fn claim(&self) -> Result<(Claim, Option<u64>), End> {
        let context = &self.context;
        let mut retrying = Retrying::new(&context.group);
        loop {
            let claimed = context
                .store
                .claim(
                    &context.group,
                    &Source::Ingest(self.source.clone()),
                    &context.owner,
                    self.grant,
                )
                .await;
            match claimed {
                Ok(claimed) => {
                    context.board.set(&self.key, ConsumerState::Running);
                    return Ok(claimed);
                }
                Err(error) if error.is_retryable() => {
                    if !self.wait_out(&mut retrying, error.to_string()).await {
                        return Err(End::Stopped);
                    }
                }
                Err(error) => return Err(self.fenced(&error)),
            }
        }
    }

    /// Opens the bus after `position`, trying again while it cannot be reached.
    async fn open(&self, position: Option<u64>) -> Option<Box<dyn Transport>> {
        let mut retrying = Retrying::new(&self.context.group);
        loop {
            match self.context.bus.open(&self.source, position).await {
                Ok(transport) => {
                    if retrying.recovered() {
                        self.context.board.set(&self.key, ConsumerState::Running);
                    }
                    return Some(transport);
                }
                Err(error) => {
                    if !self
                        .wait_out(&mut retrying, format!("cannot read the bus: {error}"))
                        .await
                    {
                        return None;
                    }
                }
            }
        }
    }

    /// Reports a transient failure and waits before the next try; `false` if
    /// asked to stop meanwhile.
    async fn wait_out(&self, retrying: &mut Retrying, reason: String) -> bool {
        if retrying.failed() {
            tracing::warn!(group = %self.key.group, source = %self.key.source, %reason, "ingest failed; trying again");
        }
        self.context
            .board
            .set(&self.key, ConsumerState::Retrying(reason));
        tokio::select! {
            biased;
            () = self.stop.cancelled() => false,
            () = tokio::time::sleep(transient_backoff(retrying.failures)) => true,
        }
    }

    fn fenced(&self, error: &CheckpointError) -> End {
        tracing::warn!(group = %self.key.group, source = %self.key.source, %error, "ingest source fenced; stopping its reader");
        metrics::counter!(names::FENCED_CONSUMERS, "group" => self.key.group.clone()).increment(1);
        self.context
            .board
            .set(&self.key, ConsumerState::Fenced(error.to_string()));
        End::Fenced
    }

    /// Turns `messages` into events and appends them with the last position;
    /// returns that position (`None` for no message).
    async fn ingest(&self, claim: &Claim, messages: Vec<Message>) -> Result<Option<u64>, End> {
        let mut events: Vec<(StreamName, NewEvent)> = Vec::with_capacity(messages.len());
        let mut last = None;
        let source = self.key.source.to_string();
        for message in &messages {
            let mut attempts = 0;
            loop {
                attempts += 1;
                let metadata = json!({"ingest": {"source": source, "position": message.position}});
                let error = match self.context.shape.event(message, metadata) {
                    Ok(event) => {
                        events.push(event);
                        break;
                    }
                    Err(error) => error,
                };
                metrics::counter!(names::PROCESSING_ERRORS, "group" => self.key.group.clone(), "kind" => error.kind().to_owned()).increment(1);
                match self.context.settings.error_policy.decide(&error, attempts) {
                    Action::Skip => {
                        self.dead_letter(message, &error, attempts).await?;
                        break;
                    }
                    Action::RetryAfter(wait) => {
                        // What came before is stored before waiting, once.
                        if !events.is_empty() {
                            self.flush(claim, std::mem::take(&mut events), last).await?;
                        }
                        tokio::select! {
                            biased;
                            () = self.stop.cancelled() => return Err(End::Stopped),
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                    action => {
                        self.flush(claim, std::mem::take(&mut events), last).await?;
                        return Err(self.halt(action, error, message.position));
                    }
                }
            }
            last = Some(message.position);
        }
        self.flush(claim, events, last).await?;
        Ok(last)
    }

    /// Stops the reader (and, for `exit` and `raise`, the runtime) for a bad
    /// message at `position`.
    fn halt(&self, action: Action, error: ProcessError, position: u64) -> End {
        let reason = format!(
            "the message at position {position} of {}: {error}",
            self.key.source
        );
        tracing::error!(group = %self.key.group, source = %self.key.source, %reason, "ingest stopped by its error policy");
        metrics::counter!(names::STOPPED_CONSUMERS, "group" => self.key.group.clone()).increment(1);
        match action {
            Action::Exit(code) => self.context.board.halt(Halt::Exit { code, error }),
            Action::Raise => self.context.board.halt(Halt::Raise(error)),
            _ => {}
        }
        self.context
            .board
            .set(&self.key, ConsumerState::Failed(reason));
        End::Failed
    }

    /// Appends `events` with `position`, trying again for as long as the store
    /// cannot be reached. Nothing to do without a position.
    async fn flush(
        &self,
        claim: &Claim,
        events: Vec<(StreamName, NewEvent)>,
        position: Option<u64>,
    ) -> Result<(), End> {
        let Some(position) = position else {
            return Ok(());
        };
        let appends = by_stream(events);
        let count: usize = appends.iter().map(|a| a.events.len()).sum();
        let mut retrying = Retrying::new(&self.context.group);
        loop {
            let appended = self
                .context
                .store
                .append(claim, &self.context.shape.category, &appends, position)
                .await;
            match appended {
                Ok(_) => {
                    if retrying.recovered() {
                        self.context.board.set(&self.key, ConsumerState::Running);
                    }
                    metrics::counter!(names::EVENTS_PROCESSED, "group" => self.key.group.clone())
                        .increment(count as u64);
                    metrics::counter!(names::CHECKPOINT_WRITES, "group" => self.key.group.clone())
                        .increment(1);
                    return Ok(());
                }
                Err(error @ (CheckpointError::Fenced { .. } | CheckpointError::Superseded(_))) => {
                    return Err(self.fenced(&error));
                }
                // Never skipped: a store that refuses the batch for any other
                // reason is tried again, and lag and status show it.
                Err(error) => {
                    if !self
                        .wait_out(&mut retrying, format!("cannot append: {error}"))
                        .await
                    {
                        return Err(End::Stopped);
                    }
                }
            }
        }
    }

    /// Keeps a dead letter for `message`, trying again while the store cannot
    /// be reached.
    async fn dead_letter(
        &self,
        message: &Message,
        error: &ProcessError,
        attempts: u32,
    ) -> Result<(), End> {
        let letter = NewDeadLetter {
            group: self.key.group.clone(),
            source: self.key.source.clone(),
            event_id: message
                .header(EVENT_ID_HEADER)
                .and_then(|id| Uuid::parse_str(id).ok())
                .unwrap_or_default(),
            sequence: message.position,
            kind: error.kind().to_owned(),
            error: format!("{}; message: {}", error.message(), message.describe()),
            attempts,
        };
        let mut retrying = Retrying::new(&self.context.group);
        loop {
            match self.context.dead_letters.record(&letter).await {
                Ok(stored) => {
                    self.context.board.dead_lettered(&self.key, &stored);
                    metrics::counter!(names::DEAD_LETTERS, "group" => self.key.group.clone())
                        .increment(1);
                    return Ok(());
                }
                Err(error) => {
                    if !self
                        .wait_out(&mut retrying, format!("cannot keep a dead letter: {error}"))
                        .await
                    {
                        return Err(End::Stopped);
                    }
                }
            }
        }
    }
}

/// `events` as one append per stream, each stream's events in the order read.
/// A message whose idempotency key an earlier one of the batch carries is a
/// repeat (a producer's retry) and is left out: the store would keep only the
/// first anyway.
fn by_stream(events: Vec<(StreamName, NewEvent)>) -> Vec<StreamAppend> {
    let mut appends: Vec<StreamAppend> = Vec::new();
    let mut index: HashMap<StreamName, usize> = HashMap::new();
    let mut keys = HashSet::new();
    for (stream, event) in events {
        if let Some(key) = &event.idempotency_key {
            if !keys.insert(key.clone()) {
                continue;
            }
        }
        match index.get(&stream) {
            Some(&at) => appends[at].events.push(event),
            None => {
                index.insert(stream.clone(), appends.len());
                appends.push(StreamAppend::new(stream, WriteCondition::Any, vec![event]));
            }
        }
    }
    appends
}

/// Exports `events` of lag for `key`'s source in the consumers' lag families.
fn set_lag(key: &ConsumerKey, events: u64) {
    let labels = [
        ("group", key.group.clone()),
        ("source", key.source.metric_label()),
    ];
    ::metrics::gauge!(names::CONSUMER_LAG_EVENTS, &labels).set(events as f64);
    ::metrics::gauge!(names::CONSUMER_LAG_SECONDS, &labels).set(0.0);
}

#[cfg(test)]
mod tests;
