//! The admin API: how an operator steers the fleet without SQL.
//!
//! Every node answers reads (checkpoints with their lag and state, the whole
//! fleet's status). Writes (checkpoint resets, pausing and resuming groups,
//! retrying and purging dead letters) are carried out by the leader only: another
//! node answers 503 naming the leader and its admin address, which the CLI
//! follows. Writes need a bearer token (`[http] admin_token`); without one
//! configured they are refused unless the listener is loopback only.
//!
//! - [`auth`]: who may write.
//! - [`reset`]: checkpoint resets and their dry runs.
//! - [`requests`]: resets run apart from their request, once per request id.
//! - [`dead_letters`]: dead letters retried or purged.
//! - [`fleet`]: the nodes' reports and the fleet's status.
//! - [`http`]: the routes under `/admin/`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::broker::control::{ControlError, ControlHandle, FleetStore};
use crate::broker::membership::MembershipStore;
use crate::consumer::settings::Executor;
use crate::consumer::{CheckpointError, EventProcessor};
use crate::event::Source;
use crate::lifecycle::{Journal, LifecycleEvent};
use crate::runtime::ConsumerStores;

mod audit;
pub mod auth;
pub mod dead_letters;
pub mod fleet;
pub mod http;
pub mod requests;
pub mod reset;

pub use auth::AdminAuth;
pub use reset::{ResetReport, ResetRequest, ResetTarget};

/// Why an admin request was not carried out. Each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("this node does not lead the fleet; send writes to the leader{}", describe_leader(.leader, .url))]
    NotLeader {
        leader: Option<String>,
        url: Option<String>,
    },
    #[error(
        "this write needs the admin token: send it as `Authorization: Bearer TOKEN` (`weir ... --token`, or WEIR_ADMIN_TOKEN)"
    )]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// Another write to the same thing is in progress (a second reset of a
    /// group): wait for it, then try again.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

fn describe_leader(leader: &Option<String>, url: &Option<String>) -> String {
    match (leader, url) {
        (Some(leader), Some(url)) => format!(": node {leader} at {url}"),
        (Some(leader), None) => {
            format!(": node {leader}, whose admin address is unknown (it has not reported one yet)")
        }
        _ => ", but nobody leads right now; try again in a few seconds".to_owned(),
    }
}

impl From<crate::store::Error> for AdminError {
    fn from(error: crate::store::Error) -> Self {
        if error.is_retryable() {
            AdminError::Unavailable(error.to_string())
        } else {
            AdminError::Failed(error.to_string())
        }
    }
}

impl From<crate::broker::lease::LeaseError> for AdminError {
    fn from(error: crate::broker::lease::LeaseError) -> Self {
        match error {
            crate::broker::lease::LeaseError::Store(error) => error.into(),
            other => AdminError::Failed(other.to_string()),
        }
    }
}

impl From<CheckpointError> for AdminError {
    fn from(error: CheckpointError) -> Self {
        match error {
            CheckpointError::Store(error) => error.into(),
            other => AdminError::Failed(other.to_string()),
        }
    }
}

impl From<ControlError> for AdminError {
    fn from(error: ControlError) -> Self {
        match error {
            ControlError::NotLeader => AdminError::NotLeader {
                leader: None,
                url: None,
            },
            ControlError::Interrupted | ControlError::Store(_) => {
                AdminError::Unavailable(error.to_string())
            }
            ControlError::Busy(_) => AdminError::Conflict(error.to_string()),
            ControlError::Work(message) => AdminError::Failed(message),
        }
    }
}

/// A pause or resume as the admin API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRequest {
    pub group: String,
    /// Take a group no node knows yet (not configured on the leader, no live
    /// subscribers, no checkpoints): to pause it before it is deployed. Without
    /// it such a group is refused (404), so that a misspelt name is not paused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub create: bool,
}

/// The answer to a pause or resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReport {
    pub group: String,
    pub paused: bool,
    /// Whether the request changed anything (pausing a paused group does not).
    pub changed: bool,
}

/// Everything the admin API works with on one node.
pub struct Admin {
    pub(crate) node: String,
    pub(crate) stores: ConsumerStores,
    pub(crate) membership: Arc<dyn MembershipStore>,
    pub(crate) fleet: Arc<dyn FleetStore>,
    pub(crate) control: ControlHandle,
    /// Each group's processor, for retrying its dead letters.
    pub(crate) processors: BTreeMap<String, Arc<dyn EventProcessor>>,
    /// Where each group's processor runs (its isolation); the main executor
    /// for a group not named.
    pub(crate) executors: BTreeMap<String, Executor>,
    pub(crate) auth: AdminAuth,
    /// How long a node's report counts: the member timeout.
    pub(crate) report_max_age: Duration,
    /// How long a reset's request waits for its outcome before answering "in
    /// progress": the handover timeout and then some.
    pub(crate) write_timeout: Duration,
    /// Held while dead letters are retried or purged.
    pub(crate) dead_letter_lock: tokio::sync::Mutex<()>,
    /// Where admin writes and pauses are recorded.
    pub(crate) journal: Journal,
    /// Resets under way on this node.
    pub(crate) running: requests::Running,
    /// Bounds the fleet and checkpoint reads carried out at once.
    pub(crate) reads: tokio::sync::Semaphore,
}

/// What an [`Admin`] needs from the node.
pub struct AdminParts {
    pub node: String,
    pub stores: ConsumerStores,
    pub membership: Arc<dyn MembershipStore>,
    pub fleet: Arc<dyn FleetStore>,
    pub control: ControlHandle,
    pub processors: BTreeMap<String, Arc<dyn EventProcessor>>,
    pub auth: AdminAuth,
    pub member_timeout: Duration,
    pub handover_timeout: Duration,
    /// Where admin writes are recorded (`Journal::disabled()` for nowhere).
    pub journal: Journal,
}

/// How much longer than the handover timeout a write may take: the holding
/// decision, the writes and the decision that gives the sources back.
const WRITE_MARGIN: Duration = Duration::from_secs(30);

impl Admin {
    pub fn new(parts: AdminParts) -> Self {
        Self {
            node: parts.node,
            stores: parts.stores,
            membership: parts.membership,
            fleet: parts.fleet,
            control: parts.control,
            processors: parts.processors,
            executors: BTreeMap::new(),
            auth: parts.auth,
            report_max_age: parts.member_timeout,
            write_timeout: parts.handover_timeout + WRITE_MARGIN,
            dead_letter_lock: tokio::sync::Mutex::new(()),
            journal: parts.journal,
            running: requests::Running::default(),
            reads: tokio::sync::Semaphore::new(fleet::CONCURRENT_READS),
        }
    }

    /// Dead letters of each group are retried on its executor here (see
    /// [`EventRuntime::group_executor`](crate::runtime::EventRuntime::group_executor)),
    /// keeping the group's isolation.
    pub fn with_executors(mut self, executors: BTreeMap<String, Executor>) -> Self {
        self.executors = executors;
        self
    }

    /// How long a reset's request waits for its outcome before it answers 202
    /// "in progress" (default: the handover timeout and then some).
    pub fn with_reply_wait(mut self, wait: Duration) -> Self {
        self.write_timeout = wait;
        self
    }

    /// Waits a few seconds for the resets under way to record how they ended:
    /// call it once the node's coordinator has stopped.
    pub async fn stop(&self) {
        self.running.stop().await;
    }

    /// The epoch this node leads under, if it leads now.
    pub fn leading(&self) -> Option<u64> {
        self.control.leading()
    }

    /// `Ok` if this node leads now; otherwise who does, and where.
    pub async fn ensure_leader(&self) -> Result<u64, AdminError> {
        if let Some(epoch) = self.control.leading() {
            return Ok(epoch);
        }
        let leader = match self.control.leader().await {
            Ok(Some(lease)) if lease.is_live() => Some(lease.holder_node().to_owned()),
            Ok(_) => None,
            Err(error) => return Err(error.into()),
        };
        let url = match &leader {
            Some(leader) => self.admin_url_of(leader).await,
            None => None,
        };
        Err(AdminError::NotLeader { leader, url })
    }

    /// The sources the live subscribers of `group` ask for.
    async fn requested(&self, group: &str) -> Result<BTreeSet<Source>, AdminError> {
        Ok(self
            .membership
            .live(group, self.report_max_age)
            .await?
            .into_iter()
            .flat_map(|record| record.sources)
            .collect())
    }

    pub(crate) fn reset_stores(&self) -> reset::ResetStores {
        reset::ResetStores {
            events: Arc::clone(&self.stores.events),
            checkpoints: Arc::clone(&self.stores.checkpoints),
        }
    }

    /// Resets checkpoints at the request of the token named `by` (see
    /// [`reset`] and [`requests`]); the answer's HTTP status and body.
    pub async fn reset_for(&self, request: ResetRequest, by: &str) -> requests::Answer {
        let mut audit = reset::audit_of(&request, by);
        match self.reset(request, &mut audit).await {
            Ok(answer) => answer,
            Err(error) => {
                tracing::info!(what = %audit.what, token = %by, %error, "refused a reset");
                self.journal.record(audit.event(&error.to_string(), None));
                requests::error_answer(&error)
            }
        }
    }

    /// Resets checkpoints: a dry run only plans; a real one runs apart from
    /// the request (see [`requests`]), once per request id.
    async fn reset(
        &self,
        mut request: ResetRequest,
        audit: &mut audit::Audit,
    ) -> Result<requests::Answer, AdminError> {
        let epoch = self.ensure_leader().await?;
        let stores = self.reset_stores();
        let requested = self.requested(&request.group).await?;
        // Checked before the sources are held; counting is left to the plan,
        // made once the owners have let go.
        let filter = request.source.as_ref();
        let matching = stores.matching(&request.group, filter, &requested).await?;
        if matching.is_empty() {
            return Err(AdminError::NotFound(format!(
                "group {} has no checkpoints and no live subscribers matching the request: check the group and source names (`weir checkpoints list`)",
                request.group
            )));
        }
        audit.sources = matching.keys().map(ToString::to_string).collect();
        stores.check_target(matching.keys(), request.target).await?;
        if request.dry_run {
            let lines = stores
                .plan(&request.group, filter, request.target, &requested)
                .await?;
            let answer = requests::answer_of(Ok(ResetReport {
                group: request.group,
                dry_run: true,
                lines,
                grant: None,
                request_id: request.request_id,
            }));
            self.journal.record(audit.event("done", Some(&answer.1)));
            return Ok(answer);
        }
        let id = request
            .request_id
            .get_or_insert_with(|| crate::ambient::token().to_string())
            .clone();
        audit.request_id = Some(id.clone());
        let body = serde_json::to_value(&request).map_err(|e| AdminError::Failed(e.to_string()))?;
        if let Some(known) = self
            .fleet
            .begin_request(&id, &body, epoch, &self.node)
            .await?
        {
            return self.known_request(&id, &body, known, epoch).await;
        }
        self.start_reset(id, request, requested, audit.clone())
            .await
    }

    /// Whether `group` is one the fleet knows: configured on this node, with
    /// live subscribers, with checkpoints, or paused.
    async fn knows_group(&self, group: &str) -> Result<bool, AdminError> {
        if self.processors.contains_key(group)
            || !self
                .membership
                .live(group, self.report_max_age)
                .await?
                .is_empty()
            || self.fleet.paused_groups().await?.contains(group)
        {
            return Ok(true);
        }
        Ok(!self.stores.checkpoints.list(Some(group)).await?.is_empty())
    }

    /// Pauses (`true`) or resumes a group, through the leader's coordinator, at
    /// the request of the token named `by`.
    pub async fn set_paused(
        &self,
        request: &GroupRequest,
        paused: bool,
        by: String,
    ) -> Result<GroupReport, AdminError> {
        let group = request.group.as_str();
        crate::event::validate_name(crate::event::NameKind::Group, group)
            .map_err(|error| AdminError::BadRequest(error.to_string()))?;
        if !request.create && !self.knows_group(group).await? {
            return Err(AdminError::NotFound(format!(
                "no group {group}: the leader ({}) does not run it, no node subscribes to it and it has no checkpoints; check the name (`weir status --fleet`), or add --create to {} a group before it is deployed",
                self.node,
                if paused { "pause" } else { "resume" }
            )));
        }
        let changed = self.control.set_paused(group, paused).await?;
        if changed {
            let (group, by) = (group.to_owned(), Some(by));
            self.journal.record(if paused {
                LifecycleEvent::GroupPaused { group, by }
            } else {
                LifecycleEvent::GroupResumed { group, by }
            });
        }
        Ok(GroupReport {
            group: group.to_owned(),
            paused,
            changed,
        })
    }
}
