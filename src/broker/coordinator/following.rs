//! What a coordinator keeps track of while another node leads: the newest
//! epoch it has seen, and the handovers in flight with their releases, so that
//! it completes them at once when it is promoted.

use std::collections::{BTreeMap, HashMap};

use crate::allocation::Handover;
use crate::bus::{BusMessage, Signal};
use crate::event::Source;
use crate::metrics;

/// What a coordinator keeps track of while another node leads.
#[derive(Default)]
pub(super) struct Following {
    /// The newest epoch seen on another node's decision: a lease of this epoch or
    /// an older one is already lost, whatever this node last heard.
    pub(super) newest_epoch: u64,
    /// Per group, the handovers of the newest decision seen.
    handovers: HashMap<String, BTreeMap<Source, Handover>>,
    /// `released` signals for those handovers, so that a newly promoted
    /// coordinator completes them at once instead of waiting for them to time out.
    pub(super) releases: Vec<Signal>,
}

impl Following {
    pub(super) fn note(&mut self, node: &str, message: BusMessage) {
        match message {
            BusMessage::Decision(decision) => {
                metrics::decision_seen(&decision.group, decision.epoch, decision.revision);
                if decision.coordinator != node {
                    self.newest_epoch = self.newest_epoch.max(decision.epoch);
                }
                self.handovers
                    .insert(decision.group.clone(), decision.handovers);
                let handovers = &self.handovers;
                self.releases
                    .retain(|signal| Self::is_pending(handovers, signal));
            }
            BusMessage::Digest(digest) => {
                if digest.coordinator != node {
                    self.newest_epoch = self.newest_epoch.max(digest.epoch);
                }
            }
            BusMessage::Signal(signal) => {
                if Self::is_pending(&self.handovers, &signal) {
                    self.releases.push(signal);
                }
            }
        }
    }

    /// Whether `signal` releases a source that is in handover from its sender.
    fn is_pending(
        handovers: &HashMap<String, BTreeMap<Source, Handover>>,
        signal: &Signal,
    ) -> bool {
        let Signal::Released {
            group,
            subscriber,
            source,
            ..
        } = signal
        else {
            return false;
        };
        handovers
            .get(group)
            .and_then(|handovers| handovers.get(source))
            .is_some_and(|handover| handover.from == *subscriber)
    }
}
