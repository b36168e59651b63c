//! [`DecisionReader`]: turns the frames of one reader (a subscription, a read of
//! what the bus retains) into whole decisions, putting split decisions together
//! and applying deltas to the decision they change.

use std::collections::HashMap;

use super::{BusMessage, Decision, DecisionAssembler, Frame};

/// Reads frames in the order a bus delivers them and yields messages.
///
/// Like [`DecisionAssembler`], it yields a decision only if it is newer than the
/// last one it yielded for its group. A delta whose base it does not hold (it
/// missed a message, or started after the base was published) cannot be
/// applied; it is yielded as the [`super::Digest`] of the decision it makes,
/// so that the holder fetches that decision from what the bus retains and hands
/// it back with [`DecisionReader::adopt`].
#[derive(Debug, Default)]
pub struct DecisionReader {
    assembler: DecisionAssembler,
    /// The newest decision yielded per group: the base of the next delta.
    current: HashMap<String, Decision>,
}

impl DecisionReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads one frame; returns what it yields, if anything.
    pub fn push(&mut self, frame: Frame) -> Option<BusMessage> {
        match frame {
            Frame::Signal(signal) => Some(BusMessage::Signal(signal)),
            Frame::Digest(digest) => Some(BusMessage::Digest(digest)),
            Frame::Decision(part) => {
                let decision = self.assembler.push(part)?;
                self.current
                    .insert(decision.group.clone(), decision.clone());
                Some(BusMessage::Decision(decision))
            }
            Frame::Delta(delta) => {
                let current = self.current.get_mut(&delta.group);
                if current
                    .as_ref()
                    .is_some_and(|current| current.version() >= delta.version())
                {
                    return None;
                }
                match current {
                    Some(current) if current.version() == delta.base => {
                        delta.apply(current);
                        self.assembler.note_yielded(&delta.group, delta.version());
                        Some(BusMessage::Decision(current.clone()))
                    }
                    _ => {
                        tracing::debug!(
                            group = %delta.group, epoch = delta.epoch, revision = delta.revision,
                            base = ?delta.base, "a decision change whose base this reader lacks"
                        );
                        Some(BusMessage::Digest(delta.summary()))
                    }
                }
            }
        }
    }

    /// Takes `decision`, fetched from what the bus retains, as the base of the
    /// deltas that follow, if it is newer than the newest one read.
    pub fn adopt(&mut self, decision: &Decision) {
        let newer = self
            .current
            .get(&decision.group)
            .is_none_or(|current| decision.is_newer_than(current));
        if newer {
            self.assembler
                .note_yielded(&decision.group, decision.version());
            self.current
                .insert(decision.group.clone(), decision.clone());
        }
    }

    /// How many decisions are waiting for parts, over all groups.
    pub fn pending(&self) -> usize {
        self.assembler.pending()
    }

    /// The newest decision read of every group.
    pub fn into_decisions(self) -> Vec<Decision> {
        let mut decisions: Vec<Decision> = self.current.into_values().collect();
        decisions.sort_by(|a, b| a.group.cmp(&b.group));
        decisions
    }
}
