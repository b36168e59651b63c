//! Which decision each local group's applier works towards: the newest one
//! known, from the subscription, from what the bus retains, or repaired from a
//! fetch when the node holds another decision of the same version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tokio::sync::watch;

use super::lacking::Lacking;
use crate::broker::subscriber::Grant;
use crate::bus::{BusSubscription, ContentDigest, Decision, Digest};
use crate::event::Source;
use crate::metrics;

/// What one group's applier is told: the newest decision, and whether the node has
/// fenced itself off (then it holds nothing, whatever the decision says).
#[derive(Clone, Default)]
pub(super) struct Target {
    pub(super) decision: Option<Arc<Decision>>,
    pub(super) fenced: bool,
}

impl Target {
    pub(super) fn sources_of(&self, subscriber: &str) -> BTreeSet<Source> {
        match &self.decision {
            Some(decision) if !self.fenced => {
                decision.owners.get(subscriber).cloned().unwrap_or_default()
            }
            _ => BTreeSet::new(),
        }
    }

    pub(super) fn grant(&self) -> Grant {
        self.decision
            .as_ref()
            .map(|decision| Grant::new(decision.epoch, decision.revision))
            .unwrap_or_default()
    }
}

/// The targets of every local group: the one place that decides which decision
/// each group's applier sees.
pub(super) struct Targets {
    senders: BTreeMap<String, watch::Sender<Target>>,
    /// Per group, the digest of the target's decision, by its version: computed
    /// when a coordinator's digest is first compared with it.
    digests: HashMap<String, ((u64, u64), ContentDigest)>,
}

impl Targets {
    /// A target per group, starting from the newest `retained` decision of each.
    pub(super) fn new<'a>(
        groups: impl IntoIterator<Item = &'a String>,
        retained: Vec<Decision>,
    ) -> Self {
        let senders: BTreeMap<String, watch::Sender<Target>> = groups
            .into_iter()
            .map(|group| (group.clone(), watch::channel(Target::default()).0))
            .collect();
        let targets = Self {
            senders,
            digests: HashMap::new(),
        };
        for decision in retained {
            targets.offer(decision);
        }
        targets
    }

    pub(super) fn receiver(&self, group: &str) -> Option<watch::Receiver<Target>> {
        self.senders.get(group).map(watch::Sender::subscribe)
    }

    /// The decision the group's applier works towards, if any.
    pub(super) fn current(&self, group: &str) -> Option<Arc<Decision>> {
        self.senders.get(group)?.borrow().decision.clone()
    }

    /// Takes `decision` if its group is local and it is newer than the newest
    /// known; returns whether it was taken.
    pub(super) fn offer(&self, decision: Decision) -> bool {
        let Some(target) = self.senders.get(decision.group.as_str()) else {
            return false;
        };
        target.send_if_modified(|target| {
            let newer = target
                .decision
                .as_ref()
                .is_none_or(|seen| decision.is_newer_than(seen));
            if newer {
                metrics::decision_seen(&decision.group, decision.epoch, decision.revision);
                target.decision = Some(Arc::new(decision));
            }
            newer
        })
    }

    /// Whether the coordinator's `digest` names a decision this node does not
    /// hold for a local group: then it fetches what the bus retains.
    pub(super) fn lacks(&mut self, digest: &Digest) -> bool {
        let Some(target) = self.senders.get(digest.group.as_str()) else {
            return false;
        };
        let Some(decision) = target.borrow().decision.clone() else {
            return true;
        };
        let version = decision.version();
        let held = match self.digests.get(&digest.group) {
            Some(&(at, held)) if at == version => held,
            _ => {
                let held = decision.digest();
                self.digests.insert(digest.group.clone(), (version, held));
                held
            }
        };
        digest.is_lacked_by(Some((version, held)))
    }

    /// Takes a decision fetched from what the bus retains: if it is newer, or of
    /// the same version as the target's but with other content (which only a
    /// fault makes), it replaces the target's.
    pub(super) fn repair(&self, decision: Decision) {
        let Some(target) = self.senders.get(decision.group.as_str()) else {
            return;
        };
        let differs = target.borrow().decision.as_ref().is_some_and(|held| {
            held.version() == decision.version() && held.digest() != decision.digest()
        });
        if differs {
            tracing::warn!(group = %decision.group, epoch = decision.epoch, revision = decision.revision, "the decision held differs from the one the bus retains; taking the retained one");
            target.send_modify(|target| target.decision = Some(Arc::new(decision)));
        } else {
            self.offer(decision);
        }
    }

    pub(super) fn fence(&self, fenced: bool) {
        for target in self.senders.values() {
            target.send_if_modified(|target| {
                let changed = target.fenced != fenced;
                target.fenced = fenced;
                changed
            });
        }
    }
}

/// Applies a fetch of the retained decisions: each becomes the base of the
/// changes the subscription reads next, and the target of its group if newer.
/// Returns whether the fetch was read and left a decision lacked.
pub(super) fn take_fetched(
    fetched: Result<crate::bus::Result<Vec<Decision>>, tokio::task::JoinError>,
    subscription: &mut BusSubscription,
    targets: &Targets,
    lacking: &mut Lacking,
) -> bool {
    match fetched {
        Ok(Ok(decisions)) => {
            for decision in decisions {
                subscription.adopt(&decision);
                let group = decision.group.clone();
                targets.repair(decision);
                if let Some(current) = targets.current(&group) {
                    lacking.held(&current);
                }
            }
            !lacking.requests().is_empty()
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot fetch the retained decisions; trying again at the next digest");
            false
        }
        Err(error) => {
            tracing::warn!(%error, "fetching the retained decisions failed");
            false
        }
    }
}
