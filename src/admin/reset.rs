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

/// A reset as the admin API takes it. As JSON: `{"group": G, "source": S,
/// "to": "start" | "end" | "time" | "cursor", "time": T, "cursor": C,
/// "dry_run": false, "request_id": ID}`, any other field refused by name
/// ([`ResetBody`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ResetBody", into = "ResetBody")]
pub struct ResetRequest {
    pub group: String,
    /// One source, or a category or the log with all of its partitions; every
    /// source of the group if absent.
    pub source: Option<Source>,
    pub target: ResetTarget,
    pub dry_run: bool,
    /// The sender's id for this reset: a resend of the same id answers with the
    /// first run's outcome (or "in progress") instead of running again. One is
    /// made up for a request without.
    pub request_id: Option<String>,
}

/// Where a reset body says to move: `to` names the kind, `time` or `cursor` the
/// place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum TargetKind {
    Start,
    End,
    Time,
    Cursor,
}

/// A reset request's JSON body, field by field: serde cannot refuse unknown
/// fields beside a flattened enum, and a misspelt `dryRun` must never run a
/// real reset.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<Source>,
    to: TargetKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cursor: Option<Cursor>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
}

impl TryFrom<ResetBody> for ResetRequest {
    type Error = String;

    fn try_from(body: ResetBody) -> Result<Self, String> {
        let target = match (body.to, body.time, body.cursor) {
            (TargetKind::Start, None, None) => ResetTarget::Start,
            (TargetKind::End, None, None) => ResetTarget::End,
            (TargetKind::Time, Some(time), None) => ResetTarget::Time { time },
            (TargetKind::Cursor, None, Some(cursor)) => ResetTarget::Cursor { cursor },
            (TargetKind::Time, None, _) => {
                return Err("`to` is \"time\": give `time` (RFC 3339) and no `cursor`".into());
            }
            (TargetKind::Cursor, _, None) => {
                return Err("`to` is \"cursor\": give `cursor` (TX:SEQUENCE) and no `time`".into());
            }
            _ => {
                return Err(
                    "`time` goes only with `to` \"time\", and `cursor` only with `to` \"cursor\""
                        .into(),
                );
            }
        };
        if let Some(id) = &body.request_id {
            validate_request_id(id)?;
        }
        Ok(Self {
            group: body.group,
            source: body.source,
            target,
            dry_run: body.dry_run,
            request_id: body.request_id,
        })
    }
}

impl From<ResetRequest> for ResetBody {
    fn from(request: ResetRequest) -> Self {
        let (to, time, cursor) = match request.target {
            ResetTarget::Start => (TargetKind::Start, None, None),
            ResetTarget::End => (TargetKind::End, None, None),
            ResetTarget::Time { time } => (TargetKind::Time, Some(time), None),
            ResetTarget::Cursor { cursor } => (TargetKind::Cursor, None, Some(cursor)),
        };
        Self {
            group: request.group,
            source: request.source,
            to,
            time,
            cursor,
            dry_run: request.dry_run,
            request_id: request.request_id,
        }
    }
}

/// The audit record of `request`, asked by the token named `token`.
pub(crate) fn audit_of(request: &ResetRequest, token: &str) -> super::audit::Audit {
    let target = match request.target {
        ResetTarget::Start => "start".to_owned(),
        ResetTarget::End => "end".to_owned(),
        ResetTarget::Time { time } => format!("time {}", time.to_rfc3339()),
        ResetTarget::Cursor { cursor } => format!("cursor {cursor}"),
    };
    let mut audit =
        super::audit::Audit::new("reset checkpoints", &request.group, token, request.dry_run)
            .target(target);
    audit.request_id = request.request_id.clone();
    audit.sources = request.source.iter().map(ToString::to_string).collect();
    audit
}

/// The longest request id taken.
const MAX_REQUEST_ID: usize = 128;

/// A request id is 1 to 128 letters, digits, `-`, `_`, `.` or `:` (a UUID, say).
fn validate_request_id(id: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.:".contains(c);
    if id.is_empty() || id.len() > MAX_REQUEST_ID || !id.chars().all(allowed) {
        return Err(format!(
            "`request_id` {id:?} is not an id: give 1 to {MAX_REQUEST_ID} letters, digits, `-`, `_`, `.` or `:` (a UUID, say)"
        ));
    }
    Ok(())
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
    /// The request's id: resending it answers this report again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
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

    /// Refuses, before anything is held, a target that no source of `sources`
    /// can take: a cursor beyond a source's last event.
    pub async fn check_target(
        &self,
        sources: impl Iterator<Item = &Source>,
        target: ResetTarget,
    ) -> Result<(), AdminError> {
        if let ResetTarget::Cursor { .. } = target {
            let wholes: BTreeSet<Source> = sources.map(Source::unpartitioned).collect();
            for whole in &wholes {
                self.target_cursor(whole, target).await?;
            }
        }
        Ok(())
    }

    async fn target_cursor(
        &self,
        source: &Source,
        target: ResetTarget,
    ) -> Result<Cursor, AdminError> {
        Ok(match target {
            ResetTarget::Start => Cursor::START,
            ResetTarget::Cursor { cursor } => {
                // Beyond the head, a consumer would skip events not yet written
                // (or never readable there): a typo, not a place to move to.
                let head = self
                    .events
                    .head(source)
                    .await?
                    .map_or(Cursor::START, |event| event.cursor);
                if cursor > head {
                    return Err(AdminError::BadRequest(format!(
                        "cursor {cursor} is beyond the last event of {source} ({head}): give a cursor `weir checkpoints list` or `weir read` showed, or use --to-end; nothing was changed"
                    )));
                }
                cursor
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: serde_json::Value) -> Result<ResetRequest, String> {
        serde_json::from_value(body).map_err(|error| error.to_string())
    }

    #[test]
    fn a_reset_body_round_trips_and_refuses_fields_it_does_not_know() {
        let request = parse(serde_json::json!({
            "group": "g", "to": "cursor", "cursor": "5:7", "dry_run": true
        }))
        .unwrap();
        assert_eq!(
            request.target,
            ResetTarget::Cursor {
                cursor: Cursor::new(5, 7)
            }
        );
        assert!(request.dry_run);
        assert_eq!(
            parse(serde_json::to_value(&request).unwrap()).unwrap(),
            request
        );

        let misspelt = parse(serde_json::json!({ "group": "g", "to": "start", "dryRun": true }));
        assert!(misspelt.unwrap_err().contains("unknown field `dryRun`"));
        for (body, says) in [
            (
                serde_json::json!({ "group": "g", "to": "time" }),
                "give `time`",
            ),
            (
                serde_json::json!({ "group": "g", "to": "start", "cursor": "5:7" }),
                "`cursor` only with",
            ),
        ] {
            let error = parse(body).unwrap_err();
            assert!(error.contains(says), "{error}");
        }
    }
}
