//! The decisions an observer knows it lacks: the coordinator's digest (or a
//! change whose base the node does not hold) named a decision it cannot apply.
//!
//! The observer first fetches what the bus retains. If that still does not give
//! the decision (the bus lost the base of a change, or never had it whole), it
//! asks the coordinator with a [`Signal::Lacking`] to write the decision whole.
//! A node that lacks a group's newest decision for longer than a refresh interval
//! reports it as a standing problem, which makes it not ready and says why, and
//! counts it once (`weir_observer_decision_lacked_total`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::super::role::Reporter;
use crate::bus::{Decision, Digest, Signal};
use crate::metrics;

/// One group's lack: the newest decision named that this node cannot apply.
struct Lack {
    digest: Digest,
    /// When this node first lacked a decision of the group, this time round.
    since: Instant,
    /// Whether it has been reported as a problem.
    reported: bool,
}

/// The lacks of one observer's groups.
pub(super) struct Lacking {
    node: String,
    patience: Duration,
    status: Arc<Reporter>,
    groups: BTreeMap<String, Lack>,
}

impl Lacking {
    /// Lacks are reported after `patience` (the refresh interval) on `status`.
    pub(super) fn new(node: &str, patience: Duration, status: Arc<Reporter>) -> Self {
        Self {
            node: node.to_owned(),
            patience,
            status,
            groups: BTreeMap::new(),
        }
    }

    /// Notes that this node lacks the decision `digest` names.
    pub(super) fn note(&mut self, digest: &Digest, now: Instant) {
        let lack = self.groups.entry(digest.group.clone()).or_insert(Lack {
            digest: digest.clone(),
            since: now,
            reported: false,
        });
        if digest.version() > lack.digest.version() {
            lack.digest = digest.clone();
        }
    }

    /// Notes that this node holds `decision` for its group: a lack it answers
    /// is over.
    pub(super) fn held(&mut self, decision: &Decision) {
        let Some(lack) = self.groups.get(&decision.group) else {
            return;
        };
        if lack
            .digest
            .is_lacked_by(Some((decision.version(), decision.digest())))
        {
            return;
        }
        if lack.reported {
            tracing::info!(group = %decision.group, epoch = decision.epoch, revision = decision.revision, "this node holds the coordinator's newest decision again");
            self.status.problem(&problem_key(&decision.group), None);
        }
        self.groups.remove(&decision.group);
    }

    /// The signals asking the coordinator to write each lacked decision whole.
    pub(super) fn requests(&self) -> Vec<Signal> {
        self.groups
            .values()
            .map(|lack| Signal::Lacking {
                group: lack.digest.group.clone(),
                node: self.node.clone(),
                epoch: lack.digest.epoch,
                revision: lack.digest.revision,
            })
            .collect()
    }

    /// When the next lack runs out of patience, if any is waiting to.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.groups
            .values()
            .filter(|lack| !lack.reported)
            .map(|lack| lack.since + self.patience)
            .min()
    }

    /// Reports every lack that has run out of patience by `now`.
    pub(super) fn report_overdue(&mut self, now: Instant) {
        for (group, lack) in &mut self.groups {
            if lack.reported || now < lack.since + self.patience {
                continue;
            }
            lack.reported = true;
            metrics::decision_lacked(group);
            let (epoch, revision) = lack.digest.version();
            self.status.problem(
                &problem_key(group),
                Some(format!(
                    "this node has lacked the coordinator's newest decision of group {group} (epoch {epoch}, revision {revision}) for longer than a refresh interval: it cannot rebuild it from what the allocation bus retains and has asked the coordinator to publish it whole; check the bus and the coordinator's log"
                )),
            );
        }
    }
}

fn problem_key(group: &str) -> String {
    format!("lacks-decision:{group}")
}
