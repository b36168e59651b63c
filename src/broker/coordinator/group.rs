//! What a coordinator keeps per group during a term: the newest decision, its
//! revision, and the handovers in flight with their releases.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::allocation::Allocation;
use crate::bus::Decision;
use crate::event::Source;
use crate::metrics;

#[derive(Default)]
pub(super) struct GroupState {
    /// The newest decision: this term's, or the one inherited from the bus.
    pub(super) decision: Option<Decision>,
    /// Revision of this term's newest decision; 0 before its first.
    pub(super) revision: u64,
    /// The newest decision has yet to reach the bus.
    pub(super) unpublished: bool,
    /// When each source in handover started moving, and from whom.
    pub(super) handovers_since: HashMap<Source, (String, Instant)>,
    /// Sources a subscriber said it released: (source, subscriber).
    pub(super) released: HashSet<(Source, String)>,
    /// The version last written whole for an observer that lacked it, and when.
    pub(super) whole_at: Option<((u64, u64), Instant)>,
}

impl GroupState {
    /// The decision to write again whole for a node that cannot rebuild
    /// `version` from the bus: this term's current one, if that is `version`
    /// and it was not written whole for it within `interval` (however many
    /// nodes ask, one write serves them all).
    pub(super) fn wanted_whole(
        &mut self,
        version: (u64, u64),
        now: Instant,
        interval: Duration,
    ) -> Option<Decision> {
        let decision = self.decision.as_ref().filter(|decision| {
            decision.version() == version && self.revision > 0 && !self.unpublished
        })?;
        let recent = self
            .whole_at
            .is_some_and(|(at, when)| at == version && now.duration_since(when) < interval);
        if recent {
            return None;
        }
        self.whole_at = Some((version, now));
        Some(decision.clone())
    }

    /// Sources in handover that may go to their new owner: released by their old
    /// owner, or waiting longer than `timeout`. (A dead old owner is seen to by
    /// `allocate`, which knows who is live.)
    pub(super) fn ready_handovers(
        &self,
        current: &Allocation<Source>,
        now: Instant,
        timeout: Duration,
    ) -> BTreeSet<Source> {
        current
            .handovers
            .iter()
            .filter(|(source, handover)| {
                let released = self
                    .released
                    .contains(&((*source).clone(), handover.from.clone()));
                let timed_out = self
                    .handovers_since
                    .get(*source)
                    .is_some_and(|(_, since)| now.duration_since(*since) >= timeout);
                if timed_out && !released {
                    tracing::warn!(
                        source = %source, from = %handover.from, to = %handover.to,
                        "handover timed out without a release; giving the source to its new owner"
                    );
                }
                released || timed_out
            })
            .map(|(source, _)| source.clone())
            .collect()
    }

    /// Counts a decision that takes sources from their owners as a rebalance, and
    /// records how long each source that `next` hands to its new owner was in
    /// handover. Measured here, where both decisions are made, with one clock.
    pub(super) fn measure(
        &self,
        group: &str,
        current: &Allocation<Source>,
        next: &Allocation<Source>,
        now: Instant,
    ) {
        let moved = current.owners.iter().any(|(owner, sources)| {
            sources
                .iter()
                .any(|source| next.owner_of(source) != Some(owner.as_str()))
        });
        if moved {
            ::metrics::counter!(metrics::REBALANCES, "group" => group.to_owned()).increment(1);
        }
        for (source, handover) in &current.handovers {
            if next.handovers.contains_key(source) {
                continue;
            }
            if let Some((_, since)) = self.handovers_since.get(source) {
                let elapsed = now.duration_since(*since);
                ::metrics::histogram!(metrics::HANDOVER_DURATION, "group" => group.to_owned())
                    .record(elapsed.as_secs_f64());
                tracing::debug!(group, %source, from = %handover.from, to = %handover.to, ?elapsed, "handover complete");
            }
        }
    }

    /// Starts the clock on handovers that `next` begins, keeps it on those that go
    /// on from the same owner, and forgets the rest and their releases.
    pub(super) fn track_handovers(&mut self, next: &Allocation<Source>, now: Instant) {
        self.handovers_since.retain(|source, (from, _)| {
            next.handovers
                .get(source)
                .is_some_and(|handover| &handover.from == from)
        });
        for (source, handover) in &next.handovers {
            self.handovers_since
                .entry(source.clone())
                .or_insert_with(|| (handover.from.clone(), now));
        }
        self.released.retain(|(source, from)| {
            next.handovers
                .get(source)
                .is_some_and(|handover| &handover.from == from)
        });
    }
}
