//! Decisions that cost what changed: a [`Delta`] carries only the owners and
//! handovers that differ from the decision before it, and a [`Digest`] names a
//! decision by version and content in a few dozen bytes.
//!
//! A delta applies to exactly one base, `(epoch, revision)` of the decision it was
//! computed against; a reader holding another base cannot apply it and fetches
//! the decision the bus retains instead. A digest covers the group, whether it is
//! paused, every owner and every handover (not the coordinator or the time of
//! issue), so two readers holding decisions with equal digests hold the same
//! allocation.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Decision;
use super::writer::SourceWriter;
use crate::allocation::Handover;
use crate::event::Source;

/// A decision's content in 64 bits: FNV-1a over its canonical text, so every
/// weir computes the same value for the same decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentDigest(pub u64);

impl std::fmt::Display for ContentDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for ContentDigest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ContentDigest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        u64::from_str_radix(&text, 16)
            .map(ContentDigest)
            .map_err(|_| serde::de::Error::custom(format!("digest {text:?} is not 16 hex digits")))
    }
}

/// FNV-1a, fed field by field; a 0xff byte ends each field, which no UTF-8
/// text contains, so fields cannot run into each other.
struct Fnv(u64);

impl Fnv {
    fn field(&mut self, bytes: &[u8]) {
        for &byte in bytes.iter().chain(&[0xff]) {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

impl Decision {
    /// The digest of this decision's content: group, paused, owners, handovers.
    pub fn digest(&self) -> ContentDigest {
        let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
        let mut text = SourceWriter::default();
        hash.field(self.group.as_bytes());
        hash.field(&[u8::from(self.paused)]);
        for (subscriber, sources) in &self.owners {
            hash.field(subscriber.as_bytes());
            for source in sources {
                hash.field(text.text(source).as_bytes());
            }
            hash.field(b"");
        }
        hash.field(b"handovers");
        for (source, handover) in &self.handovers {
            hash.field(text.text(source).as_bytes());
            hash.field(handover.from.as_bytes());
            hash.field(handover.to.as_bytes());
        }
        ContentDigest(hash.0)
    }
}

/// Names the decision a coordinator holds for a group, so that observers can
/// tell whether they hold it too without receiving it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub group: String,
    pub epoch: u64,
    pub revision: u64,
    /// Node id of the coordinator that holds the decision.
    pub coordinator: String,
    pub digest: ContentDigest,
}

impl Digest {
    /// The digest of `decision`.
    pub fn of(decision: &Decision) -> Self {
        Self {
            group: decision.group.clone(),
            epoch: decision.epoch,
            revision: decision.revision,
            coordinator: decision.coordinator.clone(),
            digest: decision.digest(),
        }
    }

    pub fn version(&self) -> (u64, u64) {
        (self.epoch, self.revision)
    }

    /// Whether a reader holding `held` (with its digest) lacks the decision this
    /// digest names: it holds none, an older one, or another of the same version.
    pub fn is_lacked_by(&self, held: Option<((u64, u64), ContentDigest)>) -> bool {
        match held {
            None => true,
            Some((version, digest)) => {
                version < self.version() || (version == self.version() && digest != self.digest)
            }
        }
    }
}

/// How one subscriber's sources change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerChange {
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub add: BTreeSet<Source>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub remove: BTreeSet<Source>,
}

/// A decision written as what changed since the decision `base`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub group: String,
    pub epoch: u64,
    pub revision: u64,
    /// `(epoch, revision)` of the decision this one changes.
    pub base: (u64, u64),
    pub coordinator: String,
    pub issued_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Digest of the decision the delta makes.
    pub digest: ContentDigest,
    /// Subscribers whose sources change; an entry is made for one not listed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub owners: BTreeMap<String, OwnerChange>,
    /// Subscribers no longer listed among the owners at all.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub owners_removed: BTreeSet<String>,
    /// Handovers that start or change.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub handovers: BTreeMap<Source, Handover>,
    /// Sources no longer in handover.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub handovers_removed: BTreeSet<Source>,
}

impl Delta {
    /// What turns `base` into `next`, or `None` if `next` is not a newer decision
    /// of the same group.
    pub fn between(base: &Decision, next: &Decision) -> Option<Delta> {
        if base.group != next.group || !next.is_newer_than(base) {
            return None;
        }
        let mut owners = BTreeMap::new();
        for (id, sources) in &next.owners {
            let change = match base.owners.get(id) {
                Some(before) if before == sources => continue,
                Some(before) => OwnerChange {
                    add: sources.difference(before).cloned().collect(),
                    remove: before.difference(sources).cloned().collect(),
                },
                None => OwnerChange {
                    add: sources.clone(),
                    remove: BTreeSet::new(),
                },
            };
            owners.insert(id.clone(), change);
        }
        let changed_handovers = next
            .handovers
            .iter()
            .filter(|(source, handover)| base.handovers.get(*source) != Some(*handover));
        Some(Delta {
            group: next.group.clone(),
            epoch: next.epoch,
            revision: next.revision,
            base: base.version(),
            coordinator: next.coordinator.clone(),
            issued_at: next.issued_at,
            paused: next.paused,
            digest: next.digest(),
            owners,
            owners_removed: keys_only_in(&base.owners, &next.owners),
            handovers: changed_handovers
                .map(|(source, handover)| (source.clone(), handover.clone()))
                .collect(),
            handovers_removed: keys_only_in(&base.handovers, &next.handovers),
        })
    }

    pub fn version(&self) -> (u64, u64) {
        (self.epoch, self.revision)
    }

    /// The digest of the decision this delta makes, for a reader that cannot
    /// apply it and must fetch that decision.
    pub fn summary(&self) -> Digest {
        Digest {
            group: self.group.clone(),
            epoch: self.epoch,
            revision: self.revision,
            coordinator: self.coordinator.clone(),
            digest: self.digest,
        }
    }

    /// Turns `decision`, which must be this delta's base, into the decision the
    /// delta makes; `false`, leaving it unchanged, if it is not the base.
    pub fn apply(&self, decision: &mut Decision) -> bool {
        if decision.group != self.group || decision.version() != self.base {
            return false;
        }
        for id in &self.owners_removed {
            decision.owners.remove(id);
        }
        for (id, change) in &self.owners {
            let sources = decision.owners.entry(id.clone()).or_default();
            for source in &change.remove {
                sources.remove(source);
            }
            sources.extend(change.add.iter().cloned());
        }
        for source in &self.handovers_removed {
            decision.handovers.remove(source);
        }
        decision.handovers.extend(
            self.handovers
                .iter()
                .map(|(source, handover)| (source.clone(), handover.clone())),
        );
        decision.epoch = self.epoch;
        decision.revision = self.revision;
        decision.coordinator.clone_from(&self.coordinator);
        decision.issued_at = self.issued_at;
        decision.paused = self.paused;
        true
    }
}

fn keys_only_in<K: Ord + Clone, V>(before: &BTreeMap<K, V>, after: &BTreeMap<K, V>) -> BTreeSet<K> {
    before
        .keys()
        .filter(|key| !after.contains_key(*key))
        .cloned()
        .collect()
}
