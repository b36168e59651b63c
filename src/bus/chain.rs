//! What a bus writes for a decision so that the cost on the wire follows what
//! changed: the decision it retains for a group is a snapshot (the whole
//! decision, in parts) followed by deltas, each against the decision before it.
//!
//! A new decision is written as a delta while the deltas since the snapshot stay
//! smaller than the snapshot itself; past that, or when the bus does not know what
//! it retains (a new coordinator, a failed publish), it writes a new snapshot and
//! the deltas before it can go. A chain belongs to one leadership term: a change
//! is written only against a decision of the same epoch, so the first decision of
//! every term is whole. A bus handle that published in an earlier term cannot know
//! what other coordinators wrote since (the stall this rule prevents: a leader
//! back for a second term wrote its first decision as a change to its own
//! decision of two terms before, which no reader held, and every observer waited
//! for a base that would never come). A change therefore costs its delta plus at most
//! as much again, spread over the changes, towards the next snapshot; and a reader
//! that starts late reads at most twice a snapshot's bytes.

use std::sync::Arc;

use super::message::{Decision, Delta, encode_decision_parts, encode_delta};

/// What to write for one decision.
#[derive(Debug)]
pub enum Publication {
    /// The whole decision, in parts; it replaces everything retained before.
    Snapshot(Vec<Vec<u8>>),
    /// One payload changing the retained decision into the new one.
    Delta(Vec<u8>),
}

impl Publication {
    pub fn payloads(&self) -> &[Vec<u8>] {
        match self {
            Publication::Snapshot(parts) => parts,
            Publication::Delta(payload) => std::slice::from_ref(payload),
        }
    }

    /// The metric kind of its payloads.
    pub fn kind(&self) -> &'static str {
        match self {
            Publication::Snapshot(_) => "decision",
            Publication::Delta(_) => "delta",
        }
    }
}

/// The decision a bus retains for one group, and what it cost to write.
#[derive(Debug, Clone)]
pub struct Chain {
    pub decision: Arc<Decision>,
    snapshot_bytes: usize,
    delta_bytes: usize,
    /// Versions of the deltas written since the snapshot, oldest first.
    pub deltas: Vec<(u64, u64)>,
}

impl Chain {
    /// What to write for `next`, given what is retained (`None`: unknown).
    /// Only a chain of `next`'s own term (its epoch) can be its base.
    pub fn plan(retained: Option<&Chain>, next: &Decision, max_payload: usize) -> Publication {
        if let Some(chain) = retained
            && chain.decision.epoch == next.epoch
            && let Some(delta) = Delta::between(&chain.decision, next)
        {
            let payload = encode_delta(&delta);
            if payload.len() <= max_payload
                && chain.delta_bytes + payload.len() <= chain.snapshot_bytes
            {
                return Publication::Delta(payload);
            }
        }
        Publication::Snapshot(encode_decision_parts(next, max_payload))
    }

    /// What is retained once `publication` of `next` is written.
    pub fn after(retained: Option<Chain>, next: &Decision, publication: &Publication) -> Chain {
        let decision = Arc::new(next.clone());
        match (retained, publication) {
            (Some(mut chain), Publication::Delta(payload)) => {
                chain.decision = decision;
                chain.delta_bytes += payload.len();
                chain.deltas.push(next.version());
                chain
            }
            (_, publication) => Chain {
                decision,
                snapshot_bytes: publication.payloads().iter().map(Vec::len).sum(),
                delta_bytes: 0,
                deltas: Vec::new(),
            },
        }
    }
}
