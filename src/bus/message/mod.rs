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
//! Signals (`kind` `"signal"`), told apart by `"signal"`:
//!
//! ```json
//! {"v":1,"kind":"signal","signal":"joined","group":"billing","subscriber":"billing-3","node":"node-c"}
//! {"v":1,"kind":"signal","signal":"leaving","group":"billing","subscriber":"billing-3","node":"node-c"}
//! {"v":1,"kind":"signal","signal":"released","group":"billing","subscriber":"billing-1","source":"category:refunds","cursor":"981:3"}
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
//! [`DecisionAssembler`] puts them back together. Decisions that fit are one payload
//! with `"parts": 1`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::allocation::{Allocation, Handover};
use crate::event::{Cursor, Source};

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
            issued_at: Utc::now(),
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
}

impl Signal {
    pub fn group(&self) -> &str {
        match self {
            Signal::Joined { group, .. }
            | Signal::Leaving { group, .. }
            | Signal::Released { group, .. } => group,
        }
    }
}

/// A complete message on the allocation bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusMessage {
    Decision(Decision),
    Signal(Signal),
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
}

/// The fields every payload's envelope has, read before the rest so that the
/// version is checked first whatever else the payload holds.
#[derive(Deserialize)]
struct Probe {
    v: Option<u64>,
    kind: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct DecisionOut<'a, O, H> {
    v: u64,
    kind: &'static str,
    group: &'a str,
    epoch: u64,
    revision: u64,
    coordinator: &'a str,
    issued_at: &'a DateTime<Utc>,
    part: u32,
    parts: u32,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    paused: bool,
    owners: O,
    handovers: H,
}

impl<'a, O: Serialize, H: Serialize> DecisionOut<'a, O, H> {
    fn new(decision: &'a Decision, part: u32, parts: u32, owners: O, handovers: H) -> Self {
        Self {
            v: WIRE_VERSION,
            kind: "decision",
            group: &decision.group,
            epoch: decision.epoch,
            revision: decision.revision,
            coordinator: &decision.coordinator,
            issued_at: &decision.issued_at,
            part,
            parts,
            paused: decision.paused,
            owners,
            handovers,
        }
    }
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

#[derive(Serialize)]
struct SignalOut<'a> {
    v: u64,
    kind: &'static str,
    #[serde(flatten)]
    signal: &'a Signal,
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
        BusMessage::Decision(decision) => to_json(&DecisionOut::new(
            decision,
            1,
            1,
            &decision.owners,
            &decision.handovers,
        )),
        BusMessage::Signal(signal) => to_json(&SignalOut {
            v: WIRE_VERSION,
            kind: "signal",
            signal,
        }),
    }
}

/// Reads one payload that is a whole message. A part of a split decision is
/// [`DecodeError::Partial`]: subscribers read payloads with [`decode_frame`].
pub fn decode(bytes: &[u8]) -> Result<BusMessage, DecodeError> {
    match decode_frame(bytes)? {
        Frame::Signal(signal) => Ok(BusMessage::Signal(signal)),
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
        Some(other) => Err(DecodeError::Malformed(format!(
            "unknown message kind {other:?}"
        ))),
        None => Err(DecodeError::Malformed(
            "no message kind: \"kind\" must be \"decision\" or \"signal\"".into(),
        )),
    }
}

/// What one part will carry, borrowed from the decision being split.
#[derive(Default)]
struct PartPlan<'a> {
    owners: BTreeMap<&'a str, Vec<&'a Source>>,
    handovers: BTreeMap<&'a Source, &'a Handover>,
    /// Encoded size of `owners` and `handovers` as JSON objects.
    owners_bytes: usize,
    handovers_bytes: usize,
}

impl PartPlan<'_> {
    fn new() -> Self {
        Self {
            owners_bytes: 2,
            handovers_bytes: 2,
            ..Self::default()
        }
    }

    fn is_empty(&self) -> bool {
        self.owners.is_empty() && self.handovers.is_empty()
    }

    fn bytes(&self) -> usize {
        self.owners_bytes + self.handovers_bytes
    }
}

/// The last part planned, or a fresh one if adding what `cost` says it would cost
/// would take the last over `budget`. A part is never left empty.
fn part_with_room<'p, 'a>(
    plans: &'p mut Vec<PartPlan<'a>>,
    cost: impl Fn(&PartPlan<'a>) -> usize,
    budget: usize,
) -> &'p mut PartPlan<'a> {
    let last = plans.last().expect("plans is non-empty");
    if last.bytes() + cost(last) > budget && !last.is_empty() {
        plans.push(PartPlan::new());
    }
    plans.last_mut().expect("plans is non-empty")
}

fn json_len<T: Serialize + ?Sized>(value: &T) -> usize {
    to_json(&value).len()
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
    let whole = encode(&BusMessage::Decision(decision.clone()));
    if whole.len() <= max_bytes {
        return vec![whole];
    }
    // The header with the widest part numbers possible, so a part's size is never
    // underestimated however many parts there turn out to be.
    let empty: BTreeMap<&str, ()> = BTreeMap::new();
    let header = json_len(&DecisionOut::new(
        decision,
        u32::MAX,
        u32::MAX,
        &empty,
        &empty,
    )) - 4;
    let budget = max_bytes.saturating_sub(header);

    let mut plans = vec![PartPlan::new()];
    for (subscriber, sources) in &decision.owners {
        let key = json_len(subscriber.as_str()) + 1; // `"id":`
        let whole_entry = key + json_len(sources);
        let current = plans.last_mut().expect("plans starts non-empty");
        let comma = usize::from(!current.owners.is_empty());
        let fits_here = current.bytes() + comma + whole_entry <= budget;
        if !fits_here && !current.is_empty() && PartPlan::new().bytes() + whole_entry <= budget {
            // Whole in a fresh part rather than split: fewer subscribers straddle parts.
            plans.push(PartPlan::new());
        }
        if sources.is_empty() {
            let cost = |plan: &PartPlan| usize::from(!plan.owners.is_empty()) + key + 2;
            let current = part_with_room(&mut plans, cost, budget);
            current.owners_bytes += usize::from(!current.owners.is_empty()) + key + 2;
            current.owners.insert(subscriber, Vec::new());
            continue;
        }
        for source in sources {
            let size = json_len(source);
            let cost = |plan: &PartPlan| match plan.owners.get(subscriber.as_str()) {
                Some(_) => 1 + size,
                None => usize::from(!plan.owners.is_empty()) + key + 2 + size,
            };
            let current = part_with_room(&mut plans, cost, budget);
            match current.owners.get_mut(subscriber.as_str()) {
                Some(list) => {
                    current.owners_bytes += 1 + size;
                    list.push(source);
                }
                None => {
                    current.owners_bytes +=
                        usize::from(!current.owners.is_empty()) + key + 2 + size;
                    current.owners.insert(subscriber, vec![source]);
                }
            }
        }
    }
    for (source, handover) in &decision.handovers {
        let entry = json_len(source) + 1 + json_len(handover);
        let cost = |plan: &PartPlan| usize::from(!plan.handovers.is_empty()) + entry;
        let current = part_with_room(&mut plans, cost, budget);
        current.handovers_bytes += usize::from(!current.handovers.is_empty()) + entry;
        current.handovers.insert(source, handover);
    }

    let parts = u32::try_from(plans.len()).unwrap_or(u32::MAX);
    plans
        .iter()
        .zip(1..=parts)
        .map(|(plan, part)| {
            to_json(&DecisionOut::new(
                decision,
                part,
                parts,
                &plan.owners,
                &plan.handovers,
            ))
        })
        .collect()
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

    /// How many decisions are waiting for parts, over all groups.
    pub fn pending(&self) -> usize {
        self.groups.values().map(|g| g.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests;
