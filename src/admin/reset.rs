//! Checkpoint resets: where each of a group's checkpoints goes, and how many
//! events that replays or skips. The plan is the dry run; the real run writes it
//! while the leader holds the sources away from their owners.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::AdminError;
use crate::broker::Grant;
use crate::broker::control::source_matches;
use crate::consumer::CheckpointStore;
use crate::event::{Cursor, Source};
use crate::store::EventStore;

/// Who a reset's checkpoint rows belong to until a consumer claims them.
pub const RESET_OWNER: &str = "weir-admin";

/// Events counted at most per source for a plan's numbers; beyond it a count is
/// shown as "at least".
const COUNT_LIMIT: u64 = 10_000_000;

/// Events read per page while looking for the first event at a time.
const SCAN_PAGE: usize = 1_000;

/// Where a reset moves checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "to", rename_all = "snake_case")]
pub enum ResetTarget {
    /// Before the first event: everything is processed again.
    Start,
    /// After the last readable event: the backlog is skipped.
    End,
    /// Before the first event (in read order) stored at or after `time`.
    Time { time: DateTime<Utc> },
    /// At `cursor` (`TX:SEQUENCE`, as `weir checkpoints list` shows them).
    Cursor { cursor: Cursor },
}

/// A reset as the admin API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetRequest {
    pub group: String,
    /// One source, or a category or the log with all of its partitions; every
    /// source of the group if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(flatten)]
    pub target: ResetTarget,
    #[serde(default)]
    pub dry_run: bool,
}

/// What a reset does, or did, to one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetLine {
    pub source: Source,
    pub old: Cursor,
    pub new: Cursor,
    /// Events processed again (the cursor moves back).
    pub replayed: u64,
    /// Events never processed (the cursor moves forward).
    pub skipped: u64,
    /// A count reached its limit: the true number is at least this.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub at_least: bool,
}

/// The answer to a reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetReport {
    pub group: String,
    pub dry_run: bool,
    pub lines: Vec<ResetLine>,
    /// The allocation decision under which the checkpoints were written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
}

/// The stores a reset reads and writes.
#[derive(Clone)]
pub(crate) struct ResetStores {
    pub events: Arc<dyn EventStore>,
    pub checkpoints: Arc<dyn CheckpointStore>,
}

impl ResetStores {
    /// Every checkpoint of `group` that `filter` matches, with those of
    /// `requested` sources that have none yet (at the start), and their cursors.
    pub async fn matching(
        &self,
        group: &str,
        filter: Option<&Source>,
        requested: &BTreeSet<Source>,
    ) -> Result<BTreeMap<Source, Cursor>, AdminError> {
        let matches = |source: &Source| filter.is_none_or(|f| source_matches(f, source));
        let mut old: BTreeMap<Source, Cursor> = requested
            .iter()
            .filter(|source| matches(source))
            .map(|source| (source.clone(), Cursor::START))
            .collect();
        for checkpoint in self.checkpoints.list(Some(group)).await? {
            if matches(&checkpoint.source) {
                old.insert(checkpoint.source, checkpoint.cursor);
            }
        }
        Ok(old)
    }

    /// The [`matching`](Self::matching) checkpoints, where `target` puts each,
    /// and how many events that replays or skips.
    pub async fn plan(
        &self,
        group: &str,
        filter: Option<&Source>,
        target: ResetTarget,
        requested: &BTreeSet<Source>,
    ) -> Result<Vec<ResetLine>, AdminError> {
        let old = self.matching(group, filter, requested).await?;
        // Cursors are positions in read order, valid in every partition of a
        // category; one target per whole source keeps all partitions agreeing.
        let mut targets: BTreeMap<Source, Cursor> = BTreeMap::new();
        let mut lines = Vec::with_capacity(old.len());
        for (source, old) in old {
            let whole = source.unpartitioned();
            let new = match targets.get(&whole) {
                Some(new) => *new,
                None => {
                    let new = self.target_cursor(&whole, target).await?;
                    targets.insert(whole, new);
                    new
                }
            };
            lines.push(self.line(source, old, new).await?);
        }
        Ok(lines)
    }

    async fn target_cursor(
        &self,
        source: &Source,
        target: ResetTarget,
    ) -> Result<Cursor, AdminError> {
        Ok(match target {
            ResetTarget::Start => Cursor::START,
            ResetTarget::Cursor { cursor } => cursor,
            ResetTarget::End => self
                .events
                .head(source)
                .await?
                .map_or(Cursor::START, |event| event.cursor),
            ResetTarget::Time { time } => self.cursor_before(source, time).await?,
        })
    }

    /// The cursor just before the first event of `source`, in read order, stored
    /// at or after `time`: the end if there is none.
    async fn cursor_before(
        &self,
        source: &Source,
        time: DateTime<Utc>,
    ) -> Result<Cursor, AdminError> {
        let mut before = Cursor::START;
        loop {
            let page = self.events.read(source, before, SCAN_PAGE).await?;
            for event in &page {
                if event.observed_at >= time {
                    return Ok(before);
                }
                before = event.cursor;
            }
            if page.len() < SCAN_PAGE {
                return Ok(before);
            }
        }
    }

    async fn line(
        &self,
        source: Source,
        old: Cursor,
        new: Cursor,
    ) -> Result<ResetLine, AdminError> {
        let (from, to) = (old.min(new), old.max(new));
        let after_from = self
            .events
            .backlog(&source, from, COUNT_LIMIT)
            .await?
            .events;
        let after_to = if from == to {
            after_from
        } else {
            self.events.backlog(&source, to, COUNT_LIMIT).await?.events
        };
        let between = after_from.saturating_sub(after_to);
        let (replayed, skipped) = if new < old {
            (between, 0)
        } else {
            (0, between)
        };
        Ok(ResetLine {
            source,
            old,
            new,
            replayed,
            skipped,
            at_least: after_from >= COUNT_LIMIT,
        })
    }

    /// Writes the plan's cursors, each row claimed under `grant` so that any
    /// consumer still holding one is fenced and the next owner starts there.
    pub async fn write(
        &self,
        group: &str,
        lines: &[ResetLine],
        grant: Grant,
    ) -> Result<(), AdminError> {
        for line in lines {
            let (claim, _) = self
                .checkpoints
                .claim_granted(group, &line.source, RESET_OWNER, grant)
                .await?;
            self.checkpoints.save(&claim, line.new).await?;
        }
        Ok(())
    }
}
