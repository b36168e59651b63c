//! The allocation bus wire format: what a coordinator publishes and observers read.
//!
//! Every payload is one JSON object carrying `"v": 1` (the format version) and a
//! `"kind"`. Readers check `v` before anything else, so a payload from a newer weir
//! is reported as [`DecodeError::UnknownVersion`] rather than as garbage, and within
//! version 1 unknown fields are ignored, so fields can be added without a new version.
//! Sources are written in their canonical text form and cursors as `TX:SEQUENCE`.
//!
//! A decision (`kind` `"decision"`); `part` counts from 1 up to `parts`:
//!
//! ```json
//! {"v":1,"kind":"decision","group":"billing","epoch":3,"revision":17,
//!  "coordinator":"node-a","issued_at":"2026-11-22T10:00:00Z","part":1,"parts":1,
//!  "owners":{"billing-1":["category:invoices","stream:orders/order-42"],
//!            "billing-2":["category:payments"]},
//!  "handovers":{"category:refunds":{"from":"billing-1","to":"billing-2"}}}
//! ```
//!
//! A paused group's decision also carries `"paused":true`; its owners keep their
//! sources and read nothing until a decision without it.
//!
//! A decision that changes little travels as a delta (`kind` `"delta"`): what
//! changed since the decision `base`, and the digest of the decision it makes.
//! Per subscriber, the sources it gains and loses (a subscriber not listed before
//! gets an entry); `owners_removed` lists subscribers no longer listed at all;
//! `handovers` the handovers that start or change, `handovers_removed` the sources
//! no longer in handover. Empty fields are left out:
//!
//! ```json
//! {"v":1,"kind":"delta","group":"billing","epoch":3,"revision":18,"base":[3,17],
//!  "coordinator":"node-a","issued_at":"2026-11-22T10:00:05Z","digest":"5f0e9c1b2a3d4e6f",
//!  "owners":{"billing-2":{"add":["stream:orders/order-7"],"remove":["category:payments"]}},
//!  "owners_removed":["billing-3"],
//!  "handovers":{"category:payments":{"from":"billing-2","to":"billing-1"}},
//!  "handovers_removed":["category:refunds"]}
//! ```
//!
//! A reader applies a delta only to the decision `base` names; one that lacks it
//! fetches the decision the bus retains. The coordinator names its current
//! decision every refresh interval with a digest (`kind` `"digest"`), 16 hex
//! digits of FNV-1a over the group, `paused`, owners and handovers
//! ([`Decision::digest`]); an observer holding an older decision, or another one
//! of the same version, fetches the retained one:
//!
//! ```json
//! {"v":1,"kind":"digest","group":"billing","epoch":3,"revision":18,"coordinator":"node-a","digest":"5f0e9c1b2a3d4e6f"}
//! ```
//!
//! weir before these two kinds skips them as unreadable (and counts them), so a
//! fleet must run this version on every node before a coordinator of it leads.
//!
//! Signals (`kind` `"signal"`), told apart by `"signal"`:
//!
//! ```json
//! {"v":1,"kind":"signal","signal":"joined","group":"billing","subscriber":"billing-3","node":"node-c"}
//! {"v":1,"kind":"signal","signal":"leaving","group":"billing","subscriber":"billing-3","node":"node-c"}
//! {"v":1,"kind":"signal","signal":"released","group":"billing","subscriber":"billing-1","source":"category:refunds","cursor":"981:3"}
//! {"v":1,"kind":"signal","signal":"lacking","group":"billing","node":"node-c","epoch":3,"revision":18}
//! ```
//!
//! `cursor` is omitted (or `null`) when the subscriber released a source it had not
//! read from yet.
//!
//! A decision for a large group does not fit a broker's payload limit (1,000
//! subscribers over 100,000 sources is about 1.7 MB; NATS accepts 1 MiB by default).
//! [`encode_decision_parts`] splits it into several decision payloads that share
//! `group`, `epoch`, `revision`, `coordinator` and `issued_at` and each carry some of
//! the owners and handovers; a subscriber's sources may be spread over several parts.
//! [`DecisionAssembler`] puts them back together, and [`DecisionReader`] applies
//! deltas on top. Decisions that fit are one payload with `"parts": 1`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::allocation::{Allocation, Handover};
use crate::event::{Cursor, Source};

mod delta;
mod reader;
mod writer;

pub use delta::{ContentDigest, Delta, Digest, OwnerChange};
pub use reader::DecisionReader;

/// The wire format version this weir writes and the only one it reads.
pub const WIRE_VERSION: u64 = 1;

/// One allocation decision of a group's coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub group: String,
    /// The coordinator's leadership term; a new leader starts a higher one.
    pub epoch: u64,
    /// Counts decisions within an epoch.
    pub revision: u64,
    /// Node id of the coordinator that issued the decision.
    pub coordinator: String,
    pub issued_at: DateTime<Utc>,
    /// Subscriber id to the sources it owns.
    pub owners: BTreeMap<String, BTreeSet<Source>>,
    /// Sources owned by nobody until their old owner releases them.
    pub handovers: BTreeMap<Source, Handover>,
    /// The group is paused: its owners keep their sources but read nothing.
    /// Absent on the wire when false, and read as false when absent.
    pub paused: bool,
}

impl Decision {
    /// A decision carrying `allocation`, issued now.
    pub fn from_allocation(
        group: impl Into<String>,
        epoch: u64,
        revision: u64,
        coordinator: impl Into<String>,
        allocation: &Allocation<Source>,
    ) -> Self {
        Self {
            group: group.into(),
            epoch,
            revision,
            coordinator: coordinator.into(),
            issued_at: crate::ambient::now(),
            owners: allocation.owners.clone(),
            handovers: allocation.handovers.clone(),
            paused: false,
        }
    }

    /// The same decision, for a group that is paused or not.
    #[must_use]
    pub fn with_paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }

    /// The allocation this decision carries, e.g. to feed the next `allocate`.
    pub fn allocation(&self) -> Allocation<Source> {
        Allocation {
            owners: self.owners.clone(),
            handovers: self.handovers.clone(),
        }
    }

    /// `(epoch, revision)`: decisions of one group are ordered by it.
    pub fn version(&self) -> (u64, u64) {
        (self.epoch, self.revision)
    }

    /// Whether this decision supersedes `other`: a higher epoch wins whatever the
    /// revisions, so a deposed coordinator's late decisions lose to the new leader's.
    pub fn is_newer_than(&self, other: &Decision) -> bool {
        self.version() > other.version()
    }

    /// The subscriber owning `source` under this decision, if any.
    pub fn owner_of(&self, source: &Source) -> Option<&str> {
        self.owners
            .iter()
            .find(|(_, sources)| sources.contains(source))
            .map(|(id, _)| id.as_str())
    }
}

/// Membership and handover news from subscribers to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "signal", rename_all = "snake_case")]
pub enum Signal {
    /// A subscriber has started on `node` and wants its share.
    Joined {
        group: String,
        subscriber: String,
        node: String,
    },
    /// A subscriber is shutting down cleanly; its sources can move at once.
    Leaving {
        group: String,
        subscriber: String,
        node: String,
    },
    /// A subscriber has stopped consuming `source` (a handover's first step);
    /// `cursor` is where it stopped, `None` if it never read from it.
    Released {
        group: String,
        subscriber: String,
        source: Source,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<Cursor>,
    },
    /// `node` cannot rebuild the decision `(epoch, revision)` of `group` from
    /// what the bus retains (a change whose base the bus lost); the coordinator
    /// that published it writes it again whole.
    Lacking {
        group: String,
        node: String,
        epoch: u64,
        revision: u64,
    },
}

impl Signal {
    pub fn group(&self) -> &str {
        match self {
            Signal::Joined { group, .. }
            | Signal::Leaving { group, .. }
            | Signal::Released { group, .. }
            | Signal::Lacking { group, .. } => group,
        }
    }
}

/// A complete message on the allocation bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusMessage {
    Decision(Decision),
    Signal(Signal),
    /// Names the decision the coordinator holds; see [`Digest`].
    Digest(Digest),
}

impl From<Decision> for BusMessage {
    fn from(decision: Decision) -> Self {
        BusMessage::Decision(decision)
    }
}

impl From<Signal> for BusMessage {
    fn from(signal: Signal) -> Self {
        BusMessage::Signal(signal)
    }
}

/// One payload's worth of a decision: part `part` of `parts` (counted from 1).
/// `decision` holds only this part's owners and handovers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionPart {
    pub part: u32,
    pub parts: u32,
    pub decision: Decision,
}

/// What one payload carries: a signal, or a whole decision or part of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Decision(DecisionPart),
    Signal(Signal),
    Delta(Delta),
    Digest(Digest),
}

/// Why a payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "bus message has format version {found}, this weir reads only version {WIRE_VERSION}: upgrade this node to the version the coordinator runs"
    )]
    UnknownVersion { found: u64 },
    #[error("bus message is not a valid version-{WIRE_VERSION} message: {0}")]
    Malformed(String),
    #[error(
        "bus message is part {part} of {parts} of decision {epoch}.{revision} for group {group:?}: read it with decode_frame and a DecisionAssembler"
    )]
    Partial {
        group: String,
        epoch: u64,
        revision: u64,
        part: u32,
        parts: u32,
    },
    #[error(
        "bus message is decision {epoch}.{revision} for group {group:?} written as a change to an earlier one: read it with decode_frame and a DecisionReader"
    )]
    Delta {
        group: String,
        epoch: u64,
        revision: u64,
    },
}

/// The fields every payload's envelope has, read before the rest so that the
/// version is checked first whatever else the payload holds.
#[derive(Deserialize)]
struct Probe {
    v: Option<u64>,
    kind: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct DecisionIn {
    group: String,
    epoch: u64,
    revision: u64,
    coordinator: String,
    issued_at: DateTime<Utc>,
    part: u32,
    parts: u32,
    #[serde(default)]
    paused: bool,
    owners: BTreeMap<String, BTreeSet<Source>>,
    handovers: BTreeMap<Source, Handover>,
}

/// A payload's envelope around a body whose fields sit beside `v` and `kind`.
#[derive(Serialize)]
struct Tagged<'a, T> {
    v: u64,
    kind: &'static str,
    #[serde(flatten)]
    body: &'a T,
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Every type written here is made of strings, integers, timestamps and maps
    // with string keys, which serde_json always serialises.
    serde_json::to_vec(value).expect("bus messages always serialise to JSON")
}

/// The payload for `message`. A decision becomes one payload with `"parts": 1`
/// however large it is; use [`encode_decision_parts`] to respect a size limit.
pub fn encode(message: &BusMessage) -> Vec<u8> {
    match message {
        BusMessage::Decision(decision) => writer::encode_parts(decision, usize::MAX)
            .pop()
            .expect("a decision is at least one part"),
        BusMessage::Signal(signal) => to_json(&Tagged {
            v: WIRE_VERSION,
            kind: "signal",
            body: signal,
        }),
        BusMessage::Digest(digest) => to_json(&Tagged {
            v: WIRE_VERSION,
            kind: "digest",
            body: digest,
        }),
    }
}

/// Reads one payload that is a whole message. A part of a split decision is
/// [`DecodeError::Partial`]: subscribers read payloads with [`decode_frame`].
pub fn decode(bytes: &[u8]) -> Result<BusMessage, DecodeError> {
    match decode_frame(bytes)? {
        Frame::Signal(signal) => Ok(BusMessage::Signal(signal)),
        Frame::Digest(digest) => Ok(BusMessage::Digest(digest)),
        Frame::Delta(delta) => Err(DecodeError::Delta {
            group: delta.group,
            epoch: delta.epoch,
            revision: delta.revision,
        }),
        Frame::Decision(DecisionPart {
            part: 1,
            parts: 1,
            decision,
        }) => Ok(BusMessage::Decision(decision)),
        Frame::Decision(DecisionPart {
            part,
            parts,
            decision,
        }) => Err(DecodeError::Partial {
            group: decision.group,
            epoch: decision.epoch,
            revision: decision.revision,
            part,
            parts,
        }),
    }
}

/// Reads one payload: a signal or a decision part (a whole decision is part 1 of 1).
pub fn decode_frame(bytes: &[u8]) -> Result<Frame, DecodeError> {
    let malformed = |e: serde_json::Error| DecodeError::Malformed(e.to_string());
    let probe: Probe = serde_json::from_slice(bytes).map_err(malformed)?;
    match probe.v {
        None => {
            return Err(DecodeError::Malformed(
                "no format version field \"v\"".into(),
            ));
        }
        Some(WIRE_VERSION) => {}
        Some(found) => return Err(DecodeError::UnknownVersion { found }),
    }
    match probe.kind.as_ref().and_then(serde_json::Value::as_str) {
        Some("decision") => {
            let d: DecisionIn = serde_json::from_slice(bytes).map_err(malformed)?;
            if d.parts == 0 || d.part == 0 || d.part > d.parts {
                return Err(DecodeError::Malformed(format!(
                    "decision part {} of {} is out of range",
                    d.part, d.parts
                )));
            }
            Ok(Frame::Decision(DecisionPart {
                part: d.part,
                parts: d.parts,
                decision: Decision {
                    group: d.group,
                    epoch: d.epoch,
                    revision: d.revision,
                    coordinator: d.coordinator,
                    issued_at: d.issued_at,
                    owners: d.owners,
                    handovers: d.handovers,
                    paused: d.paused,
                },
            }))
        }
        Some("signal") => Ok(Frame::Signal(
            serde_json::from_slice(bytes).map_err(malformed)?,
        )),
        Some("delta") => Ok(Frame::Delta(
            serde_json::from_slice(bytes).map_err(malformed)?,
        )),
        Some("digest") => Ok(Frame::Digest(
            serde_json::from_slice(bytes).map_err(malformed)?,
        )),
        Some(other) => Err(DecodeError::Malformed(format!(
            "unknown message kind {other:?}"
        ))),
        None => Err(DecodeError::Malformed(
            "no message kind: \"kind\" must be \"decision\", \"delta\", \"digest\" or \"signal\""
                .into(),
        )),
    }
}

/// Encodes `decision` as payloads of at most `max_bytes` each: one payload if it
/// fits, otherwise as many parts as needed, every one carrying the header and a
/// share of the owners and handovers. A subscriber whose sources do not fit one
/// part is spread over several.
///
/// Parts are filled greedily in order, so their number is close to the least
/// possible. Only if `max_bytes` is too small for the header plus a single source
/// or handover (a few hundred bytes for sensible names) are parts larger than
/// `max_bytes`: each then carries one source or handover, and the transport
/// reports them as too large.
pub fn encode_decision_parts(decision: &Decision, max_bytes: usize) -> Vec<Vec<u8>> {
    writer::encode_parts(decision, max_bytes)
}

/// The payload for `delta`.
pub fn encode_delta(delta: &Delta) -> Vec<u8> {
    to_json(&Tagged {
        v: WIRE_VERSION,
        kind: "delta",
        body: delta,
    })
}

/// How many incomplete decisions per group an assembler keeps. Parts of one
/// decision normally arrive together; more than a few incomplete ones means parts
/// were lost, and only the newest can still matter.
const MAX_PENDING_PER_GROUP: usize = 4;

/// Puts split decisions back together.
///
/// Takes decision parts in any order, mixed with parts of other groups and other
/// revisions, and yields each decision once all its parts are in. Decisions are
/// state, so it only ever yields a decision newer (by `(epoch, revision)`) than
/// the last one it yielded for that group: duplicates and stale decisions are
/// dropped, and so are incomplete older ones once a newer one completes.
#[derive(Debug, Default)]
pub struct DecisionAssembler {
    groups: HashMap<String, GroupAssembly>,
}

#[derive(Debug, Default)]
struct GroupAssembly {
    /// `(epoch, revision)` of the last decision yielded.
    yielded: Option<(u64, u64)>,
    pending: BTreeMap<(u64, u64), Pending>,
}

#[derive(Debug)]
struct Pending {
    parts: u32,
    received: BTreeSet<u32>,
    decision: Decision,
}

impl DecisionAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one part; returns the decision it completes, if any.
    pub fn push(&mut self, part: DecisionPart) -> Option<Decision> {
        let DecisionPart {
            part,
            parts,
            decision,
        } = part;
        let version = decision.version();
        let group = self.groups.entry(decision.group.clone()).or_default();
        if group.yielded.is_some_and(|yielded| version <= yielded) {
            tracing::debug!(
                group = %decision.group, epoch = decision.epoch, revision = decision.revision,
                "dropped a decision part not newer than the decision already delivered"
            );
            return None;
        }
        let complete = if parts <= 1 {
            decision
        } else {
            let pending = group.pending.entry(version).or_insert_with(|| Pending {
                parts,
                received: BTreeSet::new(),
                decision: Decision {
                    group: decision.group.clone(),
                    epoch: decision.epoch,
                    revision: decision.revision,
                    coordinator: decision.coordinator.clone(),
                    issued_at: decision.issued_at,
                    owners: BTreeMap::new(),
                    handovers: BTreeMap::new(),
                    paused: decision.paused,
                },
            });
            if pending.parts != parts || part == 0 || part > parts {
                tracing::warn!(
                    group = %decision.group, epoch = decision.epoch, revision = decision.revision,
                    part, parts, expected_parts = pending.parts,
                    "dropped a decision part that disagrees with its siblings on the number of parts"
                );
                return None;
            }
            if !pending.received.insert(part) {
                return None;
            }
            for (subscriber, sources) in decision.owners {
                pending
                    .decision
                    .owners
                    .entry(subscriber)
                    .or_default()
                    .extend(sources);
            }
            pending.decision.handovers.extend(decision.handovers);
            if pending.received.len() < pending.parts as usize {
                while group.pending.len() > MAX_PENDING_PER_GROUP {
                    group.pending.pop_first();
                }
                return None;
            }
            group.pending.remove(&version)?.decision
        };
        // Anything pending for this group is older or newer; older can never be
        // delivered any more, newer may still complete.
        group.pending = group.pending.split_off(&version);
        group.yielded = Some(version);
        Some(complete)
    }

    /// Notes that the decision `version` of `group` reached the reader another
    /// way (a delta, a fetch): parts of it or of older ones are dropped from now.
    pub fn note_yielded(&mut self, group: &str, version: (u64, u64)) {
        let assembly = self.groups.entry(group.to_owned()).or_default();
        if assembly.yielded.is_none_or(|yielded| yielded < version) {
            assembly.yielded = Some(version);
            assembly.pending = assembly
                .pending
                .split_off(&(version.0, version.1.saturating_add(1)));
        }
    }

    /// How many decisions are waiting for parts, over all groups.
    pub fn pending(&self) -> usize {
        self.groups.values().map(|g| g.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests;
