//! What a node reports about itself: [`NodeStatus`] (served as JSON on `/status`,
//! printed by `weir status`) and [`Readiness`] (served on `/readyz`), gathered by
//! a [`NodeProbe`] from the runtime, the store, the bus and the lease store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::broker::distributed::COORDINATOR_LEASE;
use crate::broker::lease::LeaseStore;
use crate::broker::{BrokerRole, BrokerStatus};
use crate::bus::AllocationBus;
use crate::consumer::source::ConsumerState;
use crate::event::Cursor;
use crate::runtime::EventRuntime;
use crate::store::EventStore;

/// How long a readiness or status check waits for each service.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A node as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub role: BrokerRole,
    pub version: String,
    /// The broker's state: starting, waiting, running, stopping, stopped, errored.
    pub state: String,
    /// Why it is errored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The node id of the coordinator lease's live holder, if anyone holds it.
    pub leader: Option<String>,
    /// The live holder's incarnation (`node-id@token`): which process of that node
    /// leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_incarnation: Option<String>,
    /// Epoch of the coordinator lease as last written (0 if never taken).
    pub epoch: u64,
    /// Why the leader could not be read, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_error: Option<String>,
    pub groups: Vec<GroupStatus>,
}

/// This node's part of one subscriber group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: String,
    pub subscribers: Vec<SubscriberStatus>,
}

/// One subscriber (or the node itself, for consumers of a fixed source).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriberStatus {
    pub id: String,
    /// Sources it consumes now, and consumers that failed or were fenced.
    pub sources: Vec<SourceStatus>,
}

/// One consumer of one source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    pub source: String,
    /// starting, running, retrying, paused, failed or fenced.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub cursor: Option<Cursor>,
    /// Where an ingest source's consumer has got to on its bus (Kafka offset,
    /// JetStream stream sequence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// Readable events after the cursor at the last measurement (for an ingest
    /// source, messages on its bus after its position).
    pub lag_events: Option<u64>,
    /// Age of the oldest of them, in seconds.
    pub lag_seconds: Option<f64>,
    pub lag_measured_at: Option<DateTime<Utc>>,
}

/// Whether the node is ready, and if not, every reason why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub reasons: Vec<String>,
    /// On `/readyz`: how long ago, in milliseconds, the background check found
    /// this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
}

/// Gathers a node's status and readiness.
#[derive(Clone)]
pub struct NodeProbe {
    pub runtime: Arc<EventRuntime>,
    pub events: Arc<dyn EventStore>,
    pub bus: Arc<dyn AllocationBus>,
    /// Where the coordinator lease lives; `None` for a node without one.
    pub leases: Option<Arc<dyn LeaseStore>>,
}

impl NodeProbe {
    /// Ready when the store and the bus answer, the lease store answers (on nodes
    /// that compete for leadership), no consumer has failed or been fenced on a
    /// source it still owns, and the broker does what its role asks: running, or
    /// waiting while another node leads (an errored broker, say one whose task
    /// ended, gives its reason).
    pub async fn readiness(&self) -> Readiness {
        let store = within("the event store", self.events.ping());
        let bus = within("the allocation bus", self.bus.check());
        let leases = async {
            match (&self.leases, self.runtime.role().coordinates()) {
                (Some(leases), true) => {
                    within("the lease store", leases.current(COORDINATOR_LEASE))
                        .await
                        .map(drop)
                }
                _ => Ok(()),
            }
        };
        let (store, bus, leases) = tokio::join!(store, bus, leases);
        let mut reasons: Vec<String> = [store, bus, leases]
            .into_iter()
            .filter_map(Result::err)
            .collect();
        let runtime = self.runtime.status();
        // A source whose consumer failed is consumed by nobody until it is taken
        // up again or withdrawn (then it reports stopped). A fenced consumer is
        // not counted: its source has a new owner, and if a decision still gives
        // it to this node the observer reports that itself (the broker's status).
        for consumer in &runtime.consumers {
            if let ConsumerState::Failed(reason) = &consumer.state {
                reasons.push(format!(
                    "{} of group {} is not consumed by {}: {reason}",
                    consumer.key.source, consumer.key.group, consumer.key.owner
                ));
            }
        }
        match runtime.broker {
            status if status.is_healthy() => {}
            BrokerStatus::Starting => {
                reasons.push("the broker is starting: the node has not joined the fleet yet".into())
            }
            status => reasons.push(format!("the broker is {status}")),
        }
        Readiness {
            ready: reasons.is_empty(),
            reasons,
            age_ms: None,
        }
    }

    pub async fn status(&self) -> NodeStatus {
        let runtime = self.runtime.status();
        let (state, reason) = match &runtime.broker {
            BrokerStatus::Errored(reason) => ("errored".to_owned(), Some(reason.clone())),
            other => (other.to_string(), None),
        };
        let (holder, epoch, leader_error) = match &self.leases {
            None => (None, 0, None),
            Some(leases) => {
                match within("the lease store", leases.current(COORDINATOR_LEASE)).await {
                    Ok(None) => (None, 0, None),
                    Ok(Some(lease)) => {
                        let live = lease.is_live();
                        let epoch = lease.epoch;
                        (live.then_some(lease), epoch, None)
                    }
                    Err(error) => (None, 0, Some(error)),
                }
            }
        };
        let leader = holder.as_ref().map(|lease| lease.holder_node().to_owned());
        let leader_incarnation = holder.map(|lease| lease.holder);
        let mut groups: BTreeMap<String, BTreeMap<String, Vec<SourceStatus>>> = BTreeMap::new();
        for (group, id) in self.runtime.subscribers() {
            groups.entry(group).or_default().entry(id).or_default();
        }
        for report in runtime.consumers {
            // A stopped consumer gave its source up; the new owner reports it.
            let (state, reason) = match report.state {
                ConsumerState::Stopped => continue,
                ConsumerState::Starting => ("starting", None),
                ConsumerState::Running => ("running", None),
                ConsumerState::Retrying(reason) => ("retrying", Some(reason)),
                ConsumerState::Paused => ("paused", None),
                ConsumerState::Failed(reason) => ("failed", Some(reason)),
                ConsumerState::Fenced(reason) => ("fenced", Some(reason)),
            };
            groups
                .entry(report.key.group)
                .or_default()
                .entry(report.key.owner)
                .or_default()
                .push(SourceStatus {
                    source: report.key.source.to_string(),
                    state: state.to_owned(),
                    reason,
                    cursor: report.cursor,
                    position: report.position,
                    lag_events: report.lag.map(|lag| lag.events),
                    lag_seconds: report.lag.map(|lag| lag.seconds),
                    lag_measured_at: report.lag.map(|lag| lag.measured_at),
                });
        }
        NodeStatus {
            node: self.runtime.node().to_owned(),
            role: self.runtime.role(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            state,
            reason,
            leader,
            leader_incarnation,
            epoch,
            leader_error,
            groups: groups
                .into_iter()
                .map(|(group, subscribers)| GroupStatus {
                    group,
                    subscribers: subscribers
                        .into_iter()
                        .map(|(id, sources)| SubscriberStatus { id, sources })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Runs `check`, turning its error or a timeout into a reason naming `what`.
async fn within<T, E: std::fmt::Display>(
    what: &str,
    check: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(format!("{what}: {error}")),
        Err(_) => Err(format!(
            "{what} did not answer within {}s",
            CHECK_TIMEOUT.as_secs()
        )),
    }
}

/// `weir status`'s table: the node, then one line per source (or per subscriber
/// that owns none).
pub fn render_table(status: &NodeStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let state = match &status.reason {
        Some(reason) => format!("{}: {reason}", status.state),
        None => status.state.clone(),
    };
    let leader = match (&status.leader, &status.leader_error) {
        (Some(leader), _) => leader.clone(),
        (None, Some(error)) => format!("unknown ({error})"),
        (None, None) => "none".to_owned(),
    };
    let _ = writeln!(out, "node     {}", status.node);
    let _ = writeln!(out, "role     {}", status.role);
    let _ = writeln!(out, "state    {state}");
    let _ = writeln!(out, "leader   {leader}");
    let _ = writeln!(out, "epoch    {}", status.epoch);
    let _ = writeln!(out, "version  {}", status.version);
    if status.groups.is_empty() {
        let _ = writeln!(out, "\nno subscribers on this node");
        return out;
    }
    out.push('\n');
    out.push_str(&aligned(&source_rows(status)));
    out
}

/// One row per source of every subscriber, and one for a subscriber that owns
/// none, under a header row.
fn source_rows(status: &NodeStatus) -> Vec<[String; 7]> {
    let mut rows = vec![[
        "GROUP".to_owned(),
        "SUBSCRIBER".to_owned(),
        "SOURCE".to_owned(),
        "STATE".to_owned(),
        "CURSOR".to_owned(),
        "LAG".to_owned(),
        "LAG AGE".to_owned(),
    ]];
    let dash = || "-".to_owned();
    for group in &status.groups {
        for subscriber in &group.subscribers {
            if subscriber.sources.is_empty() {
                rows.push([
                    group.group.clone(),
                    subscriber.id.clone(),
                    "(none)".to_owned(),
                    dash(),
                    dash(),
                    dash(),
                    dash(),
                ]);
            }
            for source in &subscriber.sources {
                let state = match &source.reason {
                    Some(reason) => format!("{} ({reason})", source.state),
                    None => source.state.clone(),
                };
                rows.push([
                    group.group.clone(),
                    subscriber.id.clone(),
                    source.source.clone(),
                    state,
                    match (source.cursor, source.position) {
                        (Some(cursor), _) => cursor.to_string(),
                        (None, Some(position)) => format!("@{position}"),
                        (None, None) => dash(),
                    },
                    source.lag_events.map_or_else(dash, |n| n.to_string()),
                    source.lag_seconds.map_or_else(dash, |s| format!("{s:.1}s")),
                ]);
            }
        }
    }
    rows
}

/// `rows` as lines of left-aligned columns two spaces apart.
fn aligned(rows: &[[String; 7]]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let widths: Vec<usize> = (0..7)
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_every_source_and_idle_subscriber() {
        let status = NodeStatus {
            node: "node-1".into(),
            role: BrokerRole::Full,
            version: "0.1.0".into(),
            state: "running".into(),
            reason: None,
            leader: Some("node-1".into()),
            leader_incarnation: None,
            epoch: 3,
            leader_error: None,
            groups: vec![GroupStatus {
                group: "billing".into(),
                subscribers: vec![
                    SubscriberStatus {
                        id: "node-1/1".into(),
                        sources: vec![SourceStatus {
                            source: "category:orders".into(),
                            state: "running".into(),
                            reason: None,
                            cursor: Some(Cursor::new(7, 12)),
                            position: None,
                            lag_events: Some(4),
                            lag_seconds: Some(1.5),
                            lag_measured_at: None,
                        }],
                    },
                    SubscriberStatus {
                        id: "node-1/2".into(),
                        sources: vec![],
                    },
                ],
            }],
        };
        let table = render_table(&status);
        assert!(table.contains("leader   node-1"), "{table}");
        assert!(table.contains("epoch    3"), "{table}");
        let lines: Vec<&str> = table.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("GROUP")).unwrap();
        let words = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            words(lines[header + 1]),
            [
                "billing",
                "node-1/1",
                "category:orders",
                "running",
                &Cursor::new(7, 12).to_string(),
                "4",
                "1.5s"
            ]
        );
        assert_eq!(
            words(lines[header + 2]),
            ["billing", "node-1/2", "(none)", "-", "-", "-", "-"]
        );
        // Round trip through JSON, as `weir status` reads it.
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<NodeStatus>(&json).unwrap(), status);
    }
}
