//! What operators steer through the leader: which groups are paused, the nodes'
//! own reports for fleet status ([`FleetStore`]), and the commands the admin API
//! hands to this node's coordinator ([`ControlHandle`]).
//!
//! Pausing and holding are the coordinator's to carry out, because only its
//! decisions move sources. A paused group's decisions say so, and its owners keep
//! their sources but read nothing. A *hold* takes some of a group's sources away
//! from their owners (the first step of a handover, to nobody), waits until each
//! old owner has released its source (or died, or the handover timeout passed),
//! runs the caller's work under the grant of the decision that took them, then
//! gives the sources back: how checkpoints are reset while the fleet runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::lease::{Lease, LeaseError, LeaseStore, MemoryClock};
use super::subscriber::Grant;
use crate::event::Source;
use crate::store::Result;

/// One node's own report of itself, as the registry holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEntry {
    pub node: String,
    /// What the node said of itself (role, address, readiness, consumers); the
    /// admin layer gives it its shape.
    pub report: Value,
    /// On the store's clock.
    pub reported_at: DateTime<Utc>,
}

/// An admin request the fleet remembers by its id, so that a resend of the same
/// id gets the first outcome instead of running twice.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// The request as first sent: a resend of the id must be the same request.
    pub request: Value,
    /// The coordinator term that took it, and the node that leads under it.
    pub epoch: u64,
    pub node: String,
    /// `None` while it runs; then its answer, as an HTTP status and body.
    pub outcome: Option<(u16, Value)>,
}

/// How long the fleet remembers an admin request's id and outcome.
pub const REQUEST_MEMORY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where the fleet keeps what operators set (paused groups) and what nodes report
/// of themselves. Object safe; backends: [`MemoryFleetStore`] and
/// `PostgresFleetStore` (feature `postgres`, tables `weir_groups`, `weir_nodes`).
#[async_trait]
pub trait FleetStore: Send + Sync + 'static {
    /// Every group that is paused now.
    async fn paused_groups(&self) -> Result<BTreeSet<String>>;

    /// Pauses or resumes `group` for the coordinator term `epoch`; returns
    /// whether that changed anything, or `None` without writing if a later term
    /// has set the group since: an older term's word never undoes a newer's.
    async fn set_paused(&self, group: &str, paused: bool, epoch: u64) -> Result<Option<bool>>;

    /// Stores `report` as node `node`'s newest, on the store's clock.
    async fn report(&self, node: &str, report: &Value) -> Result<()>;

    /// The reports of nodes heard from within `max_age`, by node id.
    async fn reports(&self, max_age: Duration) -> Result<Vec<NodeEntry>>;

    /// Remembers admin request `id` as `request`, running under `epoch` on
    /// `node`, and returns `None`; or, if the id is known, changes nothing and
    /// returns what is remembered. Forgets requests older than
    /// [`REQUEST_MEMORY`].
    async fn begin_request(
        &self,
        id: &str,
        request: &Value,
        epoch: u64,
        node: &str,
    ) -> Result<Option<RequestRecord>>;

    /// Remembers how request `id` ended: the HTTP status and body it answered.
    async fn finish_request(&self, id: &str, status: u16, answer: &Value) -> Result<()>;
}

/// Paused groups and node reports in this process's memory, on the tokio clock.
pub struct MemoryFleetStore {
    clock: MemoryClock,
    state: Mutex<MemoryFleet>,
}

#[derive(Default)]
struct MemoryFleet {
    paused: BTreeSet<String>,
    /// The term that last set each group.
    epochs: BTreeMap<String, u64>,
    reports: BTreeMap<String, (Value, Instant)>,
    requests: BTreeMap<String, (RequestRecord, Instant)>,
}

impl Default for MemoryFleetStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryFleetStore {
    pub fn new() -> Self {
        Self {
            clock: MemoryClock::new(),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, MemoryFleet> {
        // Every change is a single insert or remove, so a poisoned lock guards a
        // whole value.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl FleetStore for MemoryFleetStore {
    async fn paused_groups(&self) -> Result<BTreeSet<String>> {
        Ok(self.state().paused.clone())
    }

    async fn set_paused(&self, group: &str, paused: bool, epoch: u64) -> Result<Option<bool>> {
        let mut state = self.state();
        let last = state.epochs.entry(group.to_owned()).or_default();
        if *last > epoch {
            return Ok(None);
        }
        *last = epoch;
        Ok(Some(if paused {
            state.paused.insert(group.to_owned())
        } else {
            state.paused.remove(group)
        }))
    }

    async fn report(&self, node: &str, report: &Value) -> Result<()> {
        self.state()
            .reports
            .insert(node.to_owned(), (report.clone(), Instant::now()));
        Ok(())
    }

    async fn reports(&self, max_age: Duration) -> Result<Vec<NodeEntry>> {
        let now = Instant::now();
        Ok(self
            .state()
            .reports
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) <= max_age)
            .map(|(node, (report, at))| NodeEntry {
                node: node.clone(),
                report: report.clone(),
                reported_at: self.clock.to_utc(*at),
            })
            .collect())
    }

    async fn begin_request(
        &self,
        id: &str,
        request: &Value,
        epoch: u64,
        node: &str,
    ) -> Result<Option<RequestRecord>> {
        let mut state = self.state();
        let now = Instant::now();
        state
            .requests
            .retain(|_, (_, at)| now.duration_since(*at) <= REQUEST_MEMORY);
        if let Some((known, _)) = state.requests.get(id) {
            return Ok(Some(known.clone()));
        }
        let record = RequestRecord {
            request: request.clone(),
            epoch,
            node: node.to_owned(),
            outcome: None,
        };
        state.requests.insert(id.to_owned(), (record, now));
        Ok(None)
    }

    async fn finish_request(&self, id: &str, status: u16, answer: &Value) -> Result<()> {
        if let Some((record, _)) = self.state().requests.get_mut(id) {
            record.outcome = Some((status, answer.clone()));
        }
        Ok(())
    }
}

/// Why a command to the coordinator was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("this node does not lead the fleet: send the request to the leader")]
    NotLeader,
    #[error(
        "leadership moved while the request was carried out; check the outcome (`weir checkpoints list`) and send it again"
    )]
    Interrupted,
    #[error("the fleet store failed: {0}; try again once it answers")]
    Store(String),
    #[error(
        "a reset of group {0} is already in progress; wait for it to finish (`weir checkpoints list --group {0}` shows the sources it holds as owned by weir-admin)"
    )]
    Busy(String),
    #[error("{0}")]
    Work(String),
}

/// What a hold's work gets: the sources held and the grant of the decision that
/// took them from their owners. Work that claims checkpoints claims under it, so
/// a consumer that still held one is fenced, and the next owner (given the
/// source by a newer decision) takes over from what the work wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub group: String,
    pub sources: BTreeSet<Source>,
    pub grant: Grant,
}

/// The caller's work while sources are held; its `Ok` is handed back as is.
pub type HoldWork = Box<dyn FnOnce(Held) -> BoxFuture<'static, Result<Value, String>> + Send>;

/// A command for the leading coordinator.
pub(crate) enum Command {
    Pause {
        /// The epoch the sender saw this node lead under (see [`Command::epoch`]).
        epoch: u64,
        group: String,
        paused: bool,
        reply: oneshot::Sender<Result<bool, ControlError>>,
    },
    Hold {
        epoch: u64,
        group: String,
        /// Hold only the sources this matches (see [`source_matches`]); all of
        /// the group's sources if `None`.
        filter: Option<Source>,
        work: HoldWork,
        reply: oneshot::Sender<Result<Value, ControlError>>,
    },
}

impl Command {
    /// The epoch this node led under when the command was sent. Only the term
    /// of that epoch carries it out: a command that waited while its node was
    /// paused, and that its sender has long given up on, must not be carried
    /// out by a later term of the same node, after newer commands (a resume
    /// undone by a pause that timed out minutes before).
    pub(crate) fn epoch(&self) -> u64 {
        match self {
            Command::Pause { epoch, .. } | Command::Hold { epoch, .. } => *epoch,
        }
    }

    /// Answers the command with "not the leader".
    pub(crate) fn refuse(self) {
        match self {
            Command::Pause { reply, .. } => {
                let _ = reply.send(Err(ControlError::NotLeader));
            }
            Command::Hold { reply, .. } => {
                let _ = reply.send(Err(ControlError::NotLeader));
            }
        }
    }
}

/// Whether `filter` names `source`: the source itself, or, for a category or
/// the log, any partition of it.
pub fn source_matches(filter: &Source, source: &Source) -> bool {
    filter == source || (filter.partition().is_none() && source.unpartitioned() == *filter)
}

/// How the admin layer reaches this node's coordinator, and learns who leads.
#[derive(Clone)]
pub struct ControlHandle {
    pub(crate) commands: mpsc::Sender<Command>,
    /// The epoch this node's coordinator decides under, while it leads.
    pub(crate) leading: watch::Receiver<Option<u64>>,
    pub(crate) leases: std::sync::Arc<dyn LeaseStore>,
    pub(crate) lease_name: &'static str,
}

/// How many commands may wait for the coordinator.
pub(crate) const COMMAND_CAPACITY: usize = 16;

impl ControlHandle {
    /// The epoch this node leads under, if it leads now.
    pub fn leading(&self) -> Option<u64> {
        *self.leading.borrow()
    }

    /// The fleet's lease as the store holds it: who leads, under which epoch.
    pub async fn leader(&self) -> Result<Option<Lease>, LeaseError> {
        self.leases.current(self.lease_name).await
    }

    /// Pauses or resumes `group`: stored, then decided and published at once.
    /// Returns whether that changed anything.
    pub async fn set_paused(&self, group: &str, paused: bool) -> Result<bool, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Pause {
            epoch: self.leading().ok_or(ControlError::NotLeader)?,
            group: group.to_owned(),
            paused,
            reply,
        })
        .await?;
        answer.await.map_err(|_| ControlError::Interrupted)?
    }

    /// Takes the sources of `group` that `filter` matches (all if `None`) from
    /// their owners, runs `work` once they are quiet, and gives them back.
    pub async fn hold(
        &self,
        group: &str,
        filter: Option<Source>,
        work: HoldWork,
    ) -> Result<Value, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Hold {
            epoch: self.leading().ok_or(ControlError::NotLeader)?,
            group: group.to_owned(),
            filter,
            work,
            reply,
        })
        .await?;
        answer.await.map_err(|_| ControlError::Interrupted)?
    }

    async fn send(&self, command: Command) -> Result<(), ControlError> {
        if self.leading().is_none() {
            return Err(ControlError::NotLeader);
        }
        self.commands
            .send(command)
            .await
            .map_err(|_| ControlError::NotLeader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> Source {
        text.parse().expect("a valid source")
    }

    #[test]
    fn a_category_filter_matches_its_partitions_but_a_partition_only_itself() {
        let category = source("category:orders");
        assert!(source_matches(&category, &category));
        assert!(source_matches(&category, &source("category:orders@3/16")));
        assert!(!source_matches(
            &category,
            &source("category:payments@3/16")
        ));
        let partition = source("category:orders@3/16");
        assert!(source_matches(&partition, &partition));
        assert!(!source_matches(&partition, &source("category:orders@4/16")));
        assert!(!source_matches(&partition, &category));
    }

    #[tokio::test]
    async fn the_memory_store_keeps_paused_groups_and_fresh_reports() {
        let store = MemoryFleetStore::new();
        assert_eq!(
            store.set_paused("billing", true, 1).await.unwrap(),
            Some(true)
        );
        assert_eq!(
            store.set_paused("billing", true, 1).await.unwrap(),
            Some(false)
        );
        assert_eq!(
            store.paused_groups().await.unwrap(),
            BTreeSet::from(["billing".to_owned()])
        );
        assert_eq!(
            store.set_paused("billing", false, 2).await.unwrap(),
            Some(true)
        );
        assert_eq!(
            store.set_paused("billing", true, 1).await.unwrap(),
            None,
            "an older term cannot undo a newer term's resume"
        );
        assert!(store.paused_groups().await.unwrap().is_empty());
        store
            .report("node-a", &serde_json::json!({"ready": true}))
            .await
            .unwrap();
        let reports = store.reports(Duration::from_secs(5)).await.unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].report["ready"], true);
    }
}
