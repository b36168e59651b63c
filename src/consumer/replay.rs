//! Dead-letter retry and purge: what an operator does with a group's dead letters
//! once their cause is fixed ([`retry_dead_letters`]) or accepted as lost
//! ([`purge_dead_letters`]). Everything they need is passed in, so the admin API can
//! run them on whichever node carries out writes.
//!
//! A retry hands each chosen letter's event to the group's processor again, oldest
//! first and each stream in order (by the event's global sequence, which within a
//! stream follows its positions), one event at a time. A letter whose event goes
//! through is removed; one that fails again stays, its attempts raised and its error
//! the newest. Once a letter of a stream fails again, the later chosen letters of
//! that stream are held back for this run, so that no event overtakes an earlier
//! one of its stream; other streams go on. Transient failures are tried again a few
//! times with a short backoff; one that outlasts them means the destination is down,
//! so the letters after it are not tried in this run either.
//!
//! `all` of a group's letters are taken a page at a time, in that order, up to
//! the newest letter when the operation starts, and a report lists the first
//! [`LISTED`] letters one by one and counts the rest: what a retry or purge of
//! a group with millions of letters holds stays bounded.
//!
//! Delivery is at least once: the letters of events that went through are removed
//! [`REMOVE_BATCH`] at a time (one commit each rather than one per letter), so if
//! the store fails or the caller gives up waiting, the events processed since the
//! last removal are delivered again by the next retry. Only the chosen letters are ordered: with ids, an unchosen
//! earlier letter of the same stream is not waited for. Two retries of one group at
//! once could each deliver the same event; callers run one at a time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::dead_letter::{DeadLetter, DeadLetterStore};
use super::processor::{EventProcessor, ProcessError};
use super::settings::Executor;
use crate::event::{Category, Source, StoredEvent, StreamName};
use crate::store::{self, EventStore};

/// Tries of an event that fails transiently before it counts as failed again,
/// the first wait between them, doubled after each: 0.7 s in all.
const TRANSIENT_TRIES: u32 = 4;
const TRANSIENT_FIRST_WAIT: Duration = Duration::from_millis(100);

/// Letters of events that went through, removed at once.
pub const REMOVE_BATCH: usize = 100;

/// Dead letters listed, removed or looked up at a time, which bounds what a retry
/// of a large group holds in memory.
const PAGE: usize = 500;

/// Letters a report lists one by one, at most; the rest are only counted
/// (`letters_omitted`), so that an answer about every letter of a large group
/// stays small.
pub const LISTED: usize = 1_000;

/// Which of a group's dead letters an operation takes. As JSON: `"all"` or
/// `{"ids": [3, 4]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Every dead letter the group has when the operation starts.
    All,
    /// These dead letters; each must exist and belong to the group.
    Ids(Vec<u64>),
}

/// A retry or purge of one group's dead letters, as the admin API receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterRequest {
    pub group: String,
    pub selection: Selection,
    /// Report what would happen and change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Why a retry or purge did not run, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "no dead letters chosen for group {group}: name them by id or take them all; nothing was changed"
    )]
    NothingChosen { group: String },
    #[error(
        "{}; nothing was changed: list the group's dead letters with `weir dead-letters list --group {group}` and choose among them",
        describe_strays(.group, .unknown, .elsewhere)
    )]
    NotInGroup {
        group: String,
        /// Ids that name no dead letter (never recorded, or retried or purged since).
        unknown: Vec<u64>,
        /// Ids of dead letters of other groups, with their group.
        elsewhere: Vec<(u64, String)>,
    },
    #[error(
        "the dead-letter or event store failed: {0}; the operation stopped there: letters already failed or removed keep that outcome and the others are as they were (for a retry, also those whose events went through since the last removal, which the next retry delivers once more); run it again once the store answers"
    )]
    Store(#[from] store::Error),
}

fn describe_strays(group: &str, unknown: &[u64], elsewhere: &[(u64, String)]) -> String {
    let mut parts = Vec::new();
    if !unknown.is_empty() {
        let ids: Vec<String> = unknown.iter().map(u64::to_string).collect();
        parts.push(format!(
            "no dead letter has id {} (already retried or purged, or never recorded)",
            ids.join(", ")
        ));
    }
    for (id, other) in elsewhere {
        parts.push(format!(
            "dead letter {id} belongs to group {other}, not {group} (ask for it with group {other})"
        ));
    }
    parts.join("; ")
}

/// What happened, or in a dry run would happen, to one dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Dry run: its event would be handed to the processor.
    WouldRetry,
    /// Its event went through; the letter is removed.
    Retried,
    /// Its event failed again; the letter stays with this newest error and its
    /// attempts raised to `attempts`.
    Failed {
        kind: String,
        error: String,
        transient: bool,
        attempts: u32,
    },
    /// Not tried: dead letter `behind`, earlier in the same stream, failed again
    /// in this run. The letter is unchanged.
    HeldBack { behind: u64 },
    /// Not tried: dead letter `behind` failed transiently after all its tries, so
    /// the destination looks unavailable. The letter is unchanged.
    NotTried { behind: u64 },
    /// Its event is no longer in the store (pruned): nothing to retry. The letter
    /// is unchanged; purge it once it is understood.
    EventMissing,
}

/// One dead letter of a retry and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LetterReport {
    pub id: u64,
    pub event_id: Uuid,
    pub source: Source,
    /// The event's stream as `category/stream`; `None` when the event is missing.
    pub stream: Option<String>,
    pub sequence: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What a retry did (or, in a dry run, would do): counts of every outcome, and
/// the first [`LISTED`] letters one by one, in the order they were taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryReport {
    pub group: String,
    pub dry_run: bool,
    /// How many dead letters were chosen.
    pub chosen: usize,
    pub would_retry: usize,
    pub retried: usize,
    pub failed: usize,
    pub held_back: usize,
    pub not_tried: usize,
    pub events_missing: usize,
    pub letters: Vec<LetterReport>,
    /// Letters taken but not listed in `letters` (beyond [`LISTED`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub letters_omitted: usize,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

impl RetryReport {
    fn new(request: &DeadLetterRequest) -> Self {
        Self {
            group: request.group.clone(),
            dry_run: request.dry_run,
            chosen: 0,
            would_retry: 0,
            retried: 0,
            failed: 0,
            held_back: 0,
            not_tried: 0,
            events_missing: 0,
            letters: Vec::new(),
            letters_omitted: 0,
        }
    }

    /// Counts `letter`, and lists it while fewer than [`LISTED`] are.
    fn add(&mut self, letter: LetterReport) {
        self.chosen += 1;
        *match letter.outcome {
            Outcome::WouldRetry => &mut self.would_retry,
            Outcome::Retried => &mut self.retried,
            Outcome::Failed { .. } => &mut self.failed,
            Outcome::HeldBack { .. } => &mut self.held_back,
            Outcome::NotTried { .. } => &mut self.not_tried,
            Outcome::EventMissing => &mut self.events_missing,
        } += 1;
        if self.letters.len() < LISTED {
            self.letters.push(letter);
        } else {
            self.letters_omitted += 1;
        }
    }
}

/// What a purge removed (or, in a dry run, would remove): counts, and the
/// first [`LISTED`] letters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    pub group: String,
    pub dry_run: bool,
    /// How many dead letters were chosen.
    pub chosen: usize,
    /// How many were removed: fewer than chosen if some went meanwhile, 0 in a
    /// dry run.
    pub removed: u64,
    pub letters: Vec<DeadLetter>,
    /// Letters chosen but not listed in `letters` (beyond [`LISTED`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub letters_omitted: usize,
}

/// Retries the chosen dead letters of `request.group` through `processor`, run
/// where `executor` says (the group's isolation, or [`Executor::Main`]); see the
/// module documentation for the order and what happens to each letter. All of
/// a group's letters are taken [`PAGE`] at a time, in order, up to the newest
/// when the retry starts, so what it holds stays bounded however many there are.
pub async fn retry_dead_letters(
    events: &dyn EventStore,
    dead_letters: &dyn DeadLetterStore,
    processor: &Arc<dyn EventProcessor>,
    executor: &Executor,
    request: &DeadLetterRequest,
) -> Result<RetryReport, ReplayError> {
    let mut retry = Retry {
        dead_letters,
        processor,
        executor,
        dry_run: request.dry_run,
        blocked: HashMap::new(),
        unavailable: None,
        report: RetryReport::new(request),
        done: Vec::new(),
    };
    if let Selection::Ids(_) = request.selection {
        let mut letters = chosen(dead_letters, request).await?;
        letters.sort_by_key(|letter| (letter.sequence, letter.id));
        retry.take_all(events, &letters).await?;
    } else if let Some(up_to) = dead_letters.last_id(&request.group).await? {
        let mut after = (0, 0);
        loop {
            let mut page = dead_letters
                .list_in_order(&request.group, up_to, after, PAGE)
                .await?;
            let full = page.len() == PAGE;
            if full {
                // The letters of the page's last event may go on in the next
                // page: they are taken there, together.
                let last = page[page.len() - 1].event_id;
                if let Some(run) = page.iter().rposition(|letter| letter.event_id != last) {
                    page.truncate(run + 1);
                }
            }
            let Some(last) = page.last() else { break };
            after = (last.sequence, last.id);
            retry.take_all(events, &page).await?;
            if !full {
                break;
            }
        }
    }
    retry.remove_done().await?;
    let report = retry.report;
    tracing::info!(
        group = %report.group, dry_run = report.dry_run, chosen = report.chosen,
        retried = report.retried, failed = report.failed, held_back = report.held_back,
        not_tried = report.not_tried, events_missing = report.events_missing,
        "retried dead letters"
    );
    Ok(report)
}

/// Removes the chosen dead letters of `request.group` without processing them,
/// all of a group's [`PAGE`] at a time, up to the newest when the purge starts.
pub async fn purge_dead_letters(
    dead_letters: &dyn DeadLetterStore,
    request: &DeadLetterRequest,
) -> Result<PurgeReport, ReplayError> {
    let mut report = PurgeReport {
        group: request.group.clone(),
        dry_run: request.dry_run,
        chosen: 0,
        removed: 0,
        letters: Vec::new(),
        letters_omitted: 0,
    };
    if let Selection::Ids(_) = request.selection {
        let letters = chosen(dead_letters, request).await?;
        for page in letters.chunks(PAGE) {
            report.take(dead_letters, page.to_vec()).await?;
        }
    } else if let Some(up_to) = dead_letters.last_id(&request.group).await? {
        let mut after = 0;
        loop {
            let mut page = dead_letters.list(Some(&request.group), after, PAGE).await?;
            let full = page.len() == PAGE;
            page.retain(|letter| letter.id <= up_to);
            let Some(last) = page.last() else { break };
            after = last.id;
            let reached = after >= up_to;
            report.take(dead_letters, page).await?;
            if !full || reached {
                break;
            }
        }
    }
    if !request.dry_run {
        tracing::info!(group = %request.group, removed = report.removed, "purged dead letters");
    }
    Ok(report)
}

impl PurgeReport {
    /// Removes `page` (unless a dry run), counting its letters and listing them
    /// while fewer than [`LISTED`] are.
    async fn take(
        &mut self,
        dead_letters: &dyn DeadLetterStore,
        page: Vec<DeadLetter>,
    ) -> Result<(), ReplayError> {
        self.chosen += page.len();
        if !self.dry_run {
            let ids: Vec<u64> = page.iter().map(|letter| letter.id).collect();
            self.removed += dead_letters.remove(&ids).await?;
        }
        for letter in page {
            if self.letters.len() < LISTED {
                self.letters.push(letter);
            } else {
                self.letters_omitted += 1;
            }
        }
        Ok(())
    }
}

/// The dead letters `request` chooses, checked to be the group's.
async fn chosen(
    dead_letters: &dyn DeadLetterStore,
    request: &DeadLetterRequest,
) -> Result<Vec<DeadLetter>, ReplayError> {
    let group = &request.group;
    let ids = match &request.selection {
        Selection::All => return Ok(Vec::new()),
        Selection::Ids(ids) if ids.is_empty() => {
            return Err(ReplayError::NothingChosen {
                group: group.clone(),
            });
        }
        Selection::Ids(ids) => ids,
    };
    let mut found = Vec::with_capacity(ids.len());
    for page in ids.chunks(PAGE) {
        found.extend(dead_letters.get(page).await?);
    }
    found.sort_by_key(|letter| letter.id);
    found.dedup_by_key(|letter| letter.id);
    let known: HashSet<u64> = found.iter().map(|letter| letter.id).collect();
    let mut unknown: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|id| !known.contains(id))
        .collect();
    unknown.sort_unstable();
    unknown.dedup();
    let elsewhere: Vec<(u64, String)> = found
        .iter()
        .filter(|letter| letter.group != *group)
        .map(|letter| (letter.id, letter.group.clone()))
        .collect();
    if unknown.is_empty() && elsewhere.is_empty() {
        return Ok(found);
    }
    Err(ReplayError::NotInGroup {
        group: group.clone(),
        unknown,
        elsewhere,
    })
}

/// Letters sorted by sequence, in runs of one event each: an event can have been
/// recorded twice (processed again after a crash), and is delivered once for all.
fn by_event(letters: &[DeadLetter]) -> Vec<&[DeadLetter]> {
    letters.chunk_by(|a, b| a.event_id == b.event_id).collect()
}

/// One retry under way.
struct Retry<'a> {
    dead_letters: &'a dyn DeadLetterStore,
    processor: &'a Arc<dyn EventProcessor>,
    executor: &'a Executor,
    dry_run: bool,
    /// Streams a letter of which failed again in this run, with its id.
    blocked: HashMap<(Category, StreamName), u64>,
    /// The letter that failed transiently after all its tries, if one did.
    unavailable: Option<u64>,
    report: RetryReport,
    /// Letters whose events went through, not yet removed.
    done: Vec<u64>,
}

impl Retry<'_> {
    /// Retries `letters` (sorted by sequence, then id), looking their events
    /// up [`PAGE`] at a time.
    async fn take_all(
        &mut self,
        events: &dyn EventStore,
        letters: &[DeadLetter],
    ) -> Result<(), ReplayError> {
        for page in by_event(letters).chunks(PAGE) {
            let ids: Vec<Uuid> = page.iter().map(|same| same[0].event_id).collect();
            let found: HashMap<Uuid, StoredEvent> = events
                .events_by_id(&ids)
                .await?
                .into_iter()
                .map(|event| (event.id, event))
                .collect();
            for same in page {
                self.take(same, found.get(&same[0].event_id)).await?;
            }
        }
        Ok(())
    }

    async fn remove_done(&mut self) -> store::Result<()> {
        if !self.done.is_empty() {
            self.dead_letters.remove(&self.done).await?;
            self.done.clear();
        }
        Ok(())
    }

    /// Retries the letters of one event (`None`: it is gone), recording the outcome.
    async fn take(
        &mut self,
        letters: &[DeadLetter],
        event: Option<&StoredEvent>,
    ) -> Result<(), ReplayError> {
        let Some(event) = event else {
            self.report(letters, None, |_| Outcome::EventMissing);
            return Ok(());
        };
        let stream = (event.category.clone(), event.stream.clone());
        let waiting = match (self.unavailable, self.blocked.get(&stream)) {
            _ if self.dry_run => Some(Outcome::WouldRetry),
            (Some(behind), _) => Some(Outcome::NotTried { behind }),
            (None, Some(&behind)) => Some(Outcome::HeldBack { behind }),
            (None, None) => None,
        };
        if let Some(outcome) = waiting {
            self.report(letters, Some(event), |_| outcome.clone());
            return Ok(());
        }
        let ids: Vec<u64> = letters.iter().map(|letter| letter.id).collect();
        let error = match self.deliver(event).await {
            Ok(()) => {
                self.done.extend(ids);
                if self.done.len() >= REMOVE_BATCH {
                    self.remove_done().await?;
                }
                self.report(letters, Some(event), |_| Outcome::Retried);
                return Ok(());
            }
            Err(error) => error,
        };
        tracing::warn!(event = %event.id, dead_letters = ?ids, %error, "a retried dead letter failed again; it stays");
        self.blocked.insert(stream, ids[0]);
        if error.is_transient() {
            self.unavailable = Some(ids[0]);
        }
        let mut attempts = HashMap::new();
        for letter in letters {
            let stored = self
                .dead_letters
                .record_failure(letter.id, error.kind(), error.message())
                .await?;
            // Gone meanwhile (purged): its count had gone up all the same.
            let raised = stored.map_or(letter.attempts.saturating_add(1), |s| s.attempts);
            attempts.insert(letter.id, raised);
        }
        self.report(letters, Some(event), |letter| Outcome::Failed {
            kind: error.kind().to_owned(),
            error: error.message().to_owned(),
            transient: error.is_transient(),
            attempts: attempts[&letter.id],
        });
        Ok(())
    }

    /// Hands `event` to the processor, trying again after a transient failure
    /// until [`TRANSIENT_TRIES`] tries have failed.
    async fn deliver(&self, event: &StoredEvent) -> Result<(), ProcessError> {
        let batch: Arc<[StoredEvent]> = Arc::from([event.clone()]);
        let mut wait = TRANSIENT_FIRST_WAIT;
        let mut tries = 1;
        loop {
            match self.executor.process(self.processor, &batch, 0..1).await {
                Err(error) if error.is_transient() && tries < TRANSIENT_TRIES => {
                    tracing::warn!(event = %event.id, tries, ?wait, %error, "a retried dead letter failed transiently; trying again");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    tries += 1;
                }
                outcome => return outcome,
            }
        }
    }

    fn report(
        &mut self,
        letters: &[DeadLetter],
        event: Option<&StoredEvent>,
        outcome: impl Fn(&DeadLetter) -> Outcome,
    ) {
        let stream = event.map(|event| format!("{}/{}", event.category, event.stream));
        for letter in letters {
            self.report.add(LetterReport {
                id: letter.id,
                event_id: letter.event_id,
                source: letter.source.clone(),
                stream: stream.clone(),
                sequence: letter.sequence,
                outcome: outcome(letter),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::consumer::dead_letter::{MemoryDeadLetterStore, NewDeadLetter};
    use crate::consumer::processor::from_fn;
    use crate::event::{EventName, NewEvent, WriteCondition};
    use crate::store::MemoryStore;

    async fn letter(store: &MemoryDeadLetterStore, event: &StoredEvent) -> DeadLetter {
        let letter = NewDeadLetter {
            group: "g".into(),
            source: "category:things".parse().unwrap(),
            event_id: event.id,
            sequence: event.sequence,
            kind: "rejected".into(),
            error: "no".into(),
            attempts: 1,
        };
        store.record(&letter).await.unwrap()
    }

    fn all(dry_run: bool) -> DeadLetterRequest {
        DeadLetterRequest {
            group: "g".into(),
            selection: Selection::All,
            dry_run,
        }
    }

    #[tokio::test]
    async fn an_event_recorded_twice_is_delivered_once_for_both_letters() {
        let events = MemoryStore::new();
        let stored = events
            .append(
                &Category::new("things").unwrap(),
                &StreamName::new("thing-1").unwrap(),
                WriteCondition::Any,
                vec![NewEvent::new(EventName::new("Happened").unwrap(), 1.into())],
            )
            .await
            .unwrap();
        let dead_letters = MemoryDeadLetterStore::new();
        letter(&dead_letters, &stored[0]).await;
        letter(&dead_letters, &stored[0]).await;

        let failing: Arc<dyn EventProcessor> = Arc::new(from_fn(|_| async {
            Err(ProcessError::new("rejected", "still no"))
        }));
        let report = retry_dead_letters(
            &events,
            &dead_letters,
            &failing,
            &Executor::Main,
            &all(false),
        )
        .await
        .unwrap();
        assert_eq!((report.chosen, report.failed), (2, 2));
        let left = dead_letters.list(None, 0, 10).await.unwrap();
        assert!(
            left.iter()
                .all(|l| l.attempts == 2 && l.error == "still no"),
            "{left:?}"
        );

        let delivered = Arc::new(Mutex::new(Vec::new()));
        let into = Arc::clone(&delivered);
        let working: Arc<dyn EventProcessor> = Arc::new(from_fn(move |event| {
            into.lock().unwrap().push(event.id);
            async { Ok(()) }
        }));
        let report = retry_dead_letters(
            &events,
            &dead_letters,
            &working,
            &Executor::Main,
            &all(false),
        )
        .await
        .unwrap();
        assert_eq!(report.retried, 2);
        assert_eq!(*delivered.lock().unwrap(), [stored[0].id]);
        assert!(dead_letters.list(None, 0, 10).await.unwrap().is_empty());
    }

    #[test]
    fn a_refusal_names_every_stray_id_and_what_to_do() {
        let error = ReplayError::NotInGroup {
            group: "g".into(),
            unknown: vec![7, 9],
            elsewhere: vec![(3, "billing".into())],
        };
        assert_eq!(
            error.to_string(),
            "no dead letter has id 7, 9 (already retried or purged, or never recorded); \
             dead letter 3 belongs to group billing, not g (ask for it with group billing); \
             nothing was changed: list the group's dead letters with \
             `weir dead-letters list --group g` and choose among them"
        );
    }
}
