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
//! - [`dead_letters`]: dead letters retried or purged.
//! - [`fleet`]: the nodes' reports and the fleet's status.
//! - [`http`]: the routes under `/admin/`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::broker::control::{ControlError, ControlHandle, FleetStore, HoldWork};
use crate::broker::membership::MembershipStore;
use crate::consumer::{CheckpointError, EventProcessor};
use crate::event::Source;
use crate::lifecycle::{Journal, LifecycleEvent};
use crate::runtime::ConsumerStores;

pub mod auth;
pub mod dead_letters;
pub mod fleet;
pub mod http;
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
            ControlError::Work(message) => AdminError::Failed(message),
        }
    }
}

/// A pause or resume as the admin API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRequest {
    pub group: String,
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
    pub(crate) auth: AdminAuth,
    /// How long a node's report counts: the member timeout.
    pub(crate) report_max_age: Duration,
    /// How long a reset may wait for the leader: the handover timeout and then some.
    pub(crate) write_timeout: Duration,
    /// Held while dead letters are retried or purged.
    pub(crate) dead_letter_lock: tokio::sync::Mutex<()>,
    /// Where admin writes and pauses are recorded.
    pub(crate) journal: Journal,
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
            auth: parts.auth,
            report_max_age: parts.member_timeout,
            write_timeout: parts.handover_timeout + WRITE_MARGIN,
            dead_letter_lock: tokio::sync::Mutex::new(()),
            journal: parts.journal,
        }
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

    /// Resets checkpoints (see [`reset`]); a dry run only plans.
    pub async fn reset(&self, request: ResetRequest) -> Result<ResetReport, AdminError> {
        let stores = reset::ResetStores {
            events: Arc::clone(&self.stores.events),
            checkpoints: Arc::clone(&self.stores.checkpoints),
        };
        let requested = self.requested(&request.group).await?;
        // Checked before the sources are held; counting is left to the plan,
        // made once the owners have let go.
        let filter = request.source.as_ref();
        if (stores.matching(&request.group, filter, &requested).await?).is_empty() {
            return Err(AdminError::NotFound(format!(
                "group {} has no checkpoints and no live subscribers matching the request: check the group and source names (`weir checkpoints list`)",
                request.group
            )));
        }
        if request.dry_run {
            let lines = stores
                .plan(&request.group, filter, request.target, &requested)
                .await?;
            return Ok(ResetReport {
                group: request.group,
                dry_run: true,
                lines,
                grant: None,
            });
        }
        let group = request.group.clone();
        let filter = request.source.clone();
        // Planned again once the sources are held: their owners stored their
        // cursors on the way out.
        let work: HoldWork = Box::new(move |held| {
            Box::pin(async move {
                let requested: BTreeSet<Source> = requested.union(&held.sources).cloned().collect();
                let lines = stores
                    .plan(
                        &held.group,
                        request.source.as_ref(),
                        request.target,
                        &requested,
                    )
                    .await
                    .map_err(|error| error.to_string())?;
                stores
                    .write(&held.group, &lines, held.grant)
                    .await
                    .map_err(|error| error.to_string())?;
                serde_json::to_value(ResetReport {
                    group: held.group,
                    dry_run: false,
                    lines,
                    grant: Some(held.grant.to_string()),
                })
                .map_err(|error| error.to_string())
            })
        });
        let outcome = tokio::time::timeout(self.write_timeout, self.control.hold(&group, filter, work))
            .await
            .map_err(|_| {
                AdminError::Unavailable(format!(
                    "the reset of group {group} did not finish within {}s; check `weir checkpoints list --group {group}` and send it again",
                    self.write_timeout.as_secs()
                ))
            })??;
        serde_json::from_value(outcome).map_err(|error| AdminError::Failed(error.to_string()))
    }

    /// Records an admin write as a lifecycle event.
    pub(crate) fn record_write(&self, asked: &http::Asked, token: &str, error: Option<&str>) {
        self.journal.record(LifecycleEvent::AdminWrite {
            what: asked.what.clone(),
            group: Some(asked.group.clone()),
            token: Some(token.to_owned()),
            dry_run: asked.dry_run,
            outcome: error.map_or_else(|| "done".to_owned(), str::to_owned),
        });
    }

    /// Pauses (`true`) or resumes a group, through the leader's coordinator, at
    /// the request of the token named `by`.
    pub async fn set_paused(
        &self,
        group: &str,
        paused: bool,
        by: String,
    ) -> Result<GroupReport, AdminError> {
        crate::event::validate_name(crate::event::NameKind::Group, group)
            .map_err(|error| AdminError::BadRequest(error.to_string()))?;
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
