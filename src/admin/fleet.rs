//! The fleet as any node can show it: every node's own report (kept in the fleet
//! store by [`report_periodically`]), the leader, and every group's checkpoints
//! with their owner, state and lag.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Admin, AdminError};
use crate::event::{Cursor, Source};
use crate::telemetry::status::{NodeProbe, NodeStatus};

/// Events counted at most for the lag of a checkpoint no consumer reports
/// (reads need no token, so each must cost little); beyond, the lag is shown
/// as "at least".
pub const LAG_LIMIT: u64 = 10_000;

/// Checkpoints whose lag one read counts in the store at most; the others'
/// lag is left unknown.
pub const COUNTED_PER_READ: usize = 200;

/// Fleet and checkpoint reads carried out at once at most; more wait.
pub const CONCURRENT_READS: usize = 4;

/// What a node says of itself, every report interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub status: NodeStatus,
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// Where its admin API is reached (`http.advertise`).
    pub admin_url: Option<String>,
    /// The epoch it leads under, if it leads.
    pub leading: Option<u64>,
}

/// One node in the fleet's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetNode {
    #[serde(flatten)]
    pub report: NodeReport,
    pub reported_at: DateTime<Utc>,
}

/// One (group, source) checkpoint, with who consumes it and how far behind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointLine {
    pub group: String,
    pub source: Source,
    /// The subscriber holding the checkpoint row (the last to claim it).
    pub owner: Option<String>,
    /// The node whose consumer reports the source.
    pub node: Option<String>,
    pub cursor: Option<Cursor>,
    pub lag_events: Option<u64>,
    /// `lag_events` reached the count's limit: the lag is at least that.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lag_at_least: bool,
    pub lag_seconds: Option<f64>,
    /// running, retrying, paused, fenced, errored, starting, or unowned when no
    /// node reports a consumer of it.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The whole fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub leader: Option<String>,
    pub epoch: u64,
    pub nodes: Vec<FleetNode>,
    pub paused_groups: BTreeSet<String>,
    pub checkpoints: Vec<CheckpointLine>,
}

/// Stores this node's report every `interval` until `cancel`.
pub async fn report_periodically(
    admin: std::sync::Arc<Admin>,
    probe: NodeProbe,
    admin_url: Option<String>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut timer = tokio::time::interval(interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = timer.tick() => {}
        }
        let (status, readiness) = tokio::join!(probe.status(), probe.readiness());
        let report = NodeReport {
            status,
            ready: readiness.ready,
            reasons: readiness.reasons,
            admin_url: admin_url.clone(),
            leading: admin.control.leading(),
        };
        let Ok(report) = serde_json::to_value(&report) else {
            continue;
        };
        if let Err(error) = admin.fleet.report(&admin.node, &report).await {
            tracing::debug!(%error, "cannot store this node's report for the fleet status");
        }
    }
}

/// A consumer as some node reports it.
struct Reported {
    node: String,
    owner: String,
    state: String,
    reason: Option<String>,
    cursor: Option<Cursor>,
    lag_events: Option<u64>,
    lag_seconds: Option<f64>,
}

impl Admin {
    /// The nodes heard from within the member timeout, their reports read.
    pub async fn nodes(&self) -> Result<Vec<FleetNode>, AdminError> {
        Ok(self
            .fleet
            .reports(self.report_max_age)
            .await?
            .into_iter()
            .filter_map(|entry| {
                let report = serde_json::from_value(entry.report).ok()?;
                Some(FleetNode {
                    report,
                    reported_at: entry.reported_at,
                })
            })
            .collect())
    }

    /// The admin address node `node` reported, if it did lately.
    pub async fn admin_url_of(&self, node: &str) -> Option<String> {
        let nodes = self.nodes().await.ok()?;
        nodes
            .into_iter()
            .find(|n| n.report.status.node == node)
            .and_then(|n| n.report.admin_url)
    }

    /// Every checkpoint of `group` (or of all groups), with owner, state and lag.
    pub async fn checkpoints(
        &self,
        group: Option<&str>,
    ) -> Result<Vec<CheckpointLine>, AdminError> {
        let nodes = self.nodes().await?;
        self.checkpoint_lines(group, &nodes).await
    }

    async fn checkpoint_lines(
        &self,
        group: Option<&str>,
        nodes: &[FleetNode],
    ) -> Result<Vec<CheckpointLine>, AdminError> {
        let _one_of_few = self
            .reads
            .acquire()
            .await
            .map_err(|_| AdminError::Unavailable("the node is stopping".into()))?;
        let mut reported = reported_consumers(nodes, group);
        let mut lines = Vec::new();
        let mut counted = 0;
        for checkpoint in self.stores.checkpoints.list(group).await? {
            let key = (checkpoint.group.clone(), checkpoint.source.clone());
            let consumer = reported.remove(&key);
            // A running consumer's own cursor and lag are newer than its stored
            // checkpoint (stored every so many events); otherwise the store
            // says, counting a bounded number of events for a bounded number of
            // checkpoints.
            let (lag_events, lag_seconds, lag_at_least) = match &consumer {
                Some(c) if c.cursor.is_some() && c.lag_events.is_some() => {
                    (c.lag_events, c.lag_seconds, false)
                }
                _ if counted >= COUNTED_PER_READ => (None, None, false),
                _ => {
                    counted += 1;
                    let backlog = self
                        .stores
                        .events
                        .backlog(&checkpoint.source, checkpoint.cursor, LAG_LIMIT)
                        .await?;
                    let seconds = backlog.oldest.map_or(0.0, |oldest| {
                        (Utc::now() - oldest).num_milliseconds().max(0) as f64 / 1000.0
                    });
                    let at_least = backlog.events >= LAG_LIMIT;
                    (Some(backlog.events), Some(seconds), at_least)
                }
            };
            let cursor = match &consumer {
                Some(c) if c.cursor.is_some() && c.lag_events.is_some() => c.cursor,
                _ => Some(checkpoint.cursor),
            };
            lines.push(CheckpointLine {
                group: checkpoint.group,
                source: checkpoint.source,
                owner: Some(checkpoint.owner),
                node: consumer.as_ref().map(|c| c.node.clone()),
                cursor,
                lag_events,
                lag_at_least,
                lag_seconds,
                state: consumer
                    .as_ref()
                    .map_or_else(|| "unowned".to_owned(), |c| c.state.clone()),
                reason: consumer.and_then(|c| c.reason),
            });
        }
        // Consumers whose checkpoint row is not there yet (just started).
        for ((group, source), consumer) in reported {
            lines.push(CheckpointLine {
                group,
                source,
                owner: Some(consumer.owner),
                node: Some(consumer.node),
                cursor: consumer.cursor,
                lag_events: consumer.lag_events,
                lag_at_least: false,
                lag_seconds: consumer.lag_seconds,
                state: consumer.state,
                reason: consumer.reason,
            });
        }
        lines.sort_by(|a, b| {
            (&a.group, a.source.to_string()).cmp(&(&b.group, b.source.to_string()))
        });
        Ok(lines)
    }

    /// The whole fleet: nodes, leader, paused groups and every checkpoint.
    pub async fn fleet_status(&self) -> Result<FleetStatus, AdminError> {
        let nodes = self.nodes().await?;
        let (leader, epoch) = match self.control.leader().await? {
            Some(lease) if lease.is_live() => (Some(lease.holder_node().to_owned()), lease.epoch),
            Some(lease) => (None, lease.epoch),
            None => (None, 0),
        };
        Ok(FleetStatus {
            leader,
            epoch,
            paused_groups: self.fleet.paused_groups().await?,
            checkpoints: self.checkpoint_lines(None, &nodes).await?,
            nodes,
        })
    }
}

/// Every consumer the nodes report, by (group, source); a live consumer wins
/// over a stopped or fenced one of another node.
fn reported_consumers(
    nodes: &[FleetNode],
    group: Option<&str>,
) -> BTreeMap<(String, Source), Reported> {
    let mut reported: BTreeMap<(String, Source), Reported> = BTreeMap::new();
    for node in nodes {
        let status = &node.report.status;
        for group_status in &status.groups {
            if group.is_some_and(|wanted| wanted != group_status.group) {
                continue;
            }
            for subscriber in &group_status.subscribers {
                for source in &subscriber.sources {
                    let Ok(parsed) = source.source.parse::<Source>() else {
                        continue;
                    };
                    let state = match source.state.as_str() {
                        "failed" => "errored".to_owned(),
                        other => other.to_owned(),
                    };
                    let live = !matches!(state.as_str(), "fenced" | "errored");
                    let key = (group_status.group.clone(), parsed);
                    if reported.get(&key).is_some_and(|_| !live) {
                        continue;
                    }
                    reported.insert(
                        key,
                        Reported {
                            node: status.node.clone(),
                            owner: subscriber.id.clone(),
                            state,
                            reason: source.reason.clone(),
                            cursor: source.cursor,
                            lag_events: source.lag_events,
                            lag_seconds: source.lag_seconds,
                        },
                    );
                }
            }
        }
    }
    reported
}

/// `weir checkpoints list`'s table.
pub fn render_checkpoints(lines: &[CheckpointLine]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<28} {:<10} {:<20} {:<16} {:>10} {:>9}  owner",
        "group", "source", "state", "cursor", "node", "lag", "lag (s)"
    );
    for line in lines {
        let _ = writeln!(
            out,
            "{:<16} {:<28} {:<10} {:<20} {:<16} {:>10} {:>9}  {}",
            line.group,
            line.source.to_string(),
            line.state,
            line.cursor
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            line.node.as_deref().unwrap_or("-"),
            line.lag_events.map_or_else(
                || "-".to_owned(),
                |n| format!("{n}{}", if line.lag_at_least { "+" } else { "" })
            ),
            line.lag_seconds
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.1}")),
            line.owner.as_deref().unwrap_or("-"),
        );
    }
    out
}

/// `weir status --fleet`'s table.
pub fn render_fleet(status: &FleetStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "leader   {}\nepoch    {}\npaused   {}\n",
        status.leader.as_deref().unwrap_or("none"),
        status.epoch,
        if status.paused_groups.is_empty() {
            "-".to_owned()
        } else {
            status
                .paused_groups
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let _ = writeln!(
        out,
        "{:<20} {:<12} {:<10} {:<6} admin",
        "node", "role", "state", "ready"
    );
    for node in &status.nodes {
        let report = &node.report;
        let _ = writeln!(
            out,
            "{:<20} {:<12} {:<10} {:<6} {}",
            report.status.node,
            report.status.role.to_string(),
            report.status.state,
            if report.ready { "yes" } else { "no" },
            report.admin_url.as_deref().unwrap_or("-"),
        );
    }
    let _ = writeln!(out);
    out.push_str(&render_checkpoints(&status.checkpoints));
    out
}
