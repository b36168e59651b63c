//! The decision encoding weir used before decisions were written straight into
//! byte buffers, kept only as the benchmark's same-run baseline: serde over the
//! decision, with every source serialised once more to measure the parts.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::allocation::Handover;
use crate::bus::Decision;
use crate::bus::message::WIRE_VERSION;
use crate::event::Source;

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

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("decisions always serialise to JSON")
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

/// The old `encode_decision_parts`, long because it is kept as it was.
pub(super) fn encode_decision_parts(decision: &Decision, max_bytes: usize) -> Vec<Vec<u8>> {
    let whole = to_json(&DecisionOut::new(
        decision,
        1,
        1,
        &decision.owners,
        &decision.handovers,
    ));
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
