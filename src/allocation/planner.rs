//! The working state of one [`allocate`](super::allocate) call: members and
//! sources as indices, and the steps that take over, place and rebalance.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::index::{Cursor, index_sources, live_members};
use super::{Allocation, Handover, Member};

/// How a member came to own a source. The order is the order of preference
/// when balance has to take a source away from a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Hold {
    /// Given in this decision from the free pool: no consumer runs on it yet,
    /// so it can still move directly.
    Fresh,
    /// Owned in the previous decision: a consumer runs on it, so it can only
    /// leave through a handover.
    Kept,
    /// A released handover given to its planned target. It moves directly too,
    /// but only as a last resort, since the handover was planned for it.
    Granted,
}

/// What this decision says about one source.
#[derive(Clone, Copy, Debug)]
enum Slot {
    /// Nobody holds it: to be placed, or dropped when nobody may own it.
    Open,
    /// `by` (an eligible index) owns it.
    Owned { by: usize, hold: Hold },
    /// Being handed over from `from` (a live index) to `to` (an eligible index).
    Moving { from: usize, to: usize },
    /// `from` (a live index) must give it up and a new owner is still to be chosen.
    Leaving { from: usize },
}

/// Per eligible member: its owned sources bucketed by how it holds them and by
/// their signature, so balance checks whether a taker may own them a bucket at
/// a time rather than a source at a time.
type Held = BTreeMap<(Hold, usize), BTreeSet<usize>>;

/// One balancing step: `donor` gives `source` to `taker`.
struct Move {
    donor: usize,
    taker: usize,
    hold: Hold,
    signature: usize,
    source: usize,
}

/// Working state of one [`allocate`] call.
///
/// Members and sources are turned into indices once, so the rest works on
/// vectors. Members requesting equal source sets form a *class*; the set of
/// classes requesting a source is its *signature*. Sources with the same
/// signature are interchangeable for eligibility, which keeps the work for a
/// group whose members all request the same sources close to linear.
pub(super) struct Planner<'a, S> {
    /// Live members sorted by id, duplicates removed.
    live: Vec<&'a Member<S>>,
    /// Eligible index to live index.
    eligible: Vec<usize>,
    /// Live index to eligible index.
    eligible_of: Vec<Option<usize>>,
    /// Eligible index to class.
    class_of: Vec<usize>,
    /// Class to its eligible members, ascending.
    class_members: Vec<Vec<usize>>,
    /// Every source some eligible member requests, ascending.
    sources: Vec<&'a S>,
    /// Source index to signature.
    signature_of: Vec<usize>,
    /// Signature to its classes, ascending.
    signature_classes: Vec<Vec<usize>>,
    slots: Vec<Slot>,
    /// Eligible index to owned sources plus incoming handovers.
    load: Vec<usize>,
}

impl<'a, S: Ord + Clone> Planner<'a, S> {
    pub(super) fn new(members: &'a [Member<S>], required_tags: &BTreeSet<String>) -> Self {
        let live = live_members(members);
        let mut eligible = Vec::new();
        let mut eligible_of = Vec::with_capacity(live.len());
        let mut class_of = Vec::new();
        let mut class_sets: Vec<&'a BTreeSet<S>> = Vec::new();
        let mut class_members: Vec<Vec<usize>> = Vec::new();
        let mut class_by_ptr: HashMap<*const BTreeSet<S>, usize> = HashMap::new();
        let mut classes_by_len: HashMap<usize, Vec<usize>> = HashMap::new();
        for (l, &member) in live.iter().enumerate() {
            if !required_tags.is_subset(&member.tags) {
                eligible_of.push(None);
                continue;
            }
            let e = eligible.len();
            eligible.push(l);
            eligible_of.push(Some(e));
            let set: &'a BTreeSet<S> = &member.sources;
            // A shared set is recognised by its address; an unshared one is
            // compared only with sets of the same size.
            let class = match class_by_ptr.entry(Arc::as_ptr(&member.sources)) {
                Entry::Occupied(known) => *known.get(),
                Entry::Vacant(unknown) => {
                    let same_len = classes_by_len.entry(set.len()).or_default();
                    let class = match same_len.iter().copied().find(|&c| class_sets[c] == set) {
                        Some(class) => class,
                        None => {
                            class_sets.push(set);
                            class_members.push(Vec::new());
                            same_len.push(class_sets.len() - 1);
                            class_sets.len() - 1
                        }
                    };
                    *unknown.insert(class)
                }
            };
            class_members[class].push(e);
            class_of.push(class);
        }

        let (sources, signature_of, signature_classes) = index_sources(&class_sets);

        let slots = vec![Slot::Open; sources.len()];
        let load = vec![0; eligible.len()];
        Self {
            live,
            eligible,
            eligible_of,
            class_of,
            class_members,
            sources,
            signature_of,
            signature_classes,
            slots,
            load,
        }
    }

    fn admits(&self, signature: usize, e: usize) -> bool {
        self.signature_classes[signature]
            .binary_search(&self.class_of[e])
            .is_ok()
    }

    fn may_own(&self, e: usize, i: usize) -> bool {
        self.admits(self.signature_of[i], e)
    }

    fn live_index(&self, id: &str) -> Option<usize> {
        self.live
            .binary_search_by(|member| member.id.as_str().cmp(id))
            .ok()
    }

    /// Eligible members a source of `signature` may go to, ascending.
    fn candidates(&self, signature: usize) -> Vec<usize> {
        let mut members: Vec<usize> = self.signature_classes[signature]
            .iter()
            .flat_map(|&class| self.class_members[class].iter().copied())
            .collect();
        members.sort_unstable();
        members
    }

    /// Carries the previous decision over: what stays, what must leave its
    /// owner, which handovers go on and which are complete.
    pub(super) fn take_over(&mut self, current: &Allocation<S>, released: &BTreeSet<S>) {
        for (id, owned) in &current.owners {
            // A dead owner runs no consumer: its sources stay open and are
            // placed directly.
            let Some(l) = self.live_index(id) else {
                continue;
            };
            let e = self.eligible_of[l];
            let mut cursor = Cursor::default();
            for source in owned {
                // Sources nobody eligible requests any more are dropped.
                let Some(i) = cursor.seek(&self.sources, source) else {
                    continue;
                };
                // Only a malformed decision claims a source twice; the first
                // claim wins.
                if !matches!(self.slots[i], Slot::Open) {
                    continue;
                }
                let slot = match e {
                    Some(e) if self.may_own(e, i) => {
                        self.load[e] += 1;
                        Slot::Owned {
                            by: e,
                            hold: Hold::Kept,
                        }
                    }
                    _ => Slot::Leaving { from: l },
                };
                self.slots[i] = slot;
            }
        }

        let mut cursor = Cursor::default();
        for (source, handover) in &current.handovers {
            let Some(i) = cursor.seek(&self.sources, source) else {
                continue;
            };
            if !matches!(self.slots[i], Slot::Open) {
                continue;
            }
            let to = self
                .live_index(&handover.to)
                .and_then(|l| self.eligible_of[l])
                .filter(|&e| self.may_own(e, i));
            let slot = match self.live_index(&handover.from) {
                Some(from) if !released.contains(source) => match to {
                    Some(to) if self.eligible[to] != from => {
                        self.load[to] += 1;
                        Slot::Moving { from, to }
                    }
                    _ => Slot::Leaving { from },
                },
                // Released, or the old owner died: nobody consumes it any more.
                _ => match to {
                    Some(to) => {
                        self.load[to] += 1;
                        Slot::Owned {
                            by: to,
                            hold: Hold::Granted,
                        }
                    }
                    None => Slot::Open,
                },
            };
            self.slots[i] = slot;
        }
    }

    /// Gives every open or leaving source to the least loaded member that may
    /// own it.
    pub(super) fn place_waiting(&mut self) {
        let mut waiting: Vec<Vec<usize>> = vec![Vec::new(); self.signature_classes.len()];
        for (i, slot) in self.slots.iter().enumerate() {
            if matches!(slot, Slot::Open | Slot::Leaving { .. }) {
                waiting[self.signature_of[i]].push(i);
            }
        }
        let mut groups: Vec<(Vec<usize>, Vec<usize>)> = waiting
            .into_iter()
            .enumerate()
            .filter(|(_, sources)| !sources.is_empty())
            .map(|(signature, sources)| (self.candidates(signature), sources))
            .collect();
        // The most constrained sources go first, while the members that alone
        // may take them still have room; balance mends the rest.
        groups.sort_by_key(|(candidates, _)| candidates.len());

        for (candidates, sources) in groups {
            if sources.len() <= 4 {
                // Too few to pay for keeping the candidates ordered by load.
                for i in sources {
                    let leaving = self.leaving_eligible(i);
                    let pick = candidates
                        .iter()
                        .copied()
                        .filter(|&e| Some(e) != leaving)
                        .min_by_key(|&e| (self.load[e], e));
                    self.settle(i, pick, &candidates);
                }
                continue;
            }
            let mut by_load: BTreeSet<(usize, usize)> =
                candidates.iter().map(|&e| (self.load[e], e)).collect();
            for i in sources {
                let leaving = self.leaving_eligible(i);
                let pick = by_load
                    .iter()
                    .find(|&&(_, e)| Some(e) != leaving)
                    .map(|&(_, e)| e);
                if let Some(e) = self.settle(i, pick, &candidates) {
                    by_load.remove(&(self.load[e] - 1, e));
                    by_load.insert((self.load[e], e));
                }
            }
        }
    }

    /// The eligible index of the member that source `i` is leaving, if any.
    fn leaving_eligible(&self, i: usize) -> Option<usize> {
        match self.slots[i] {
            Slot::Leaving { from } => self.eligible_of[from],
            _ => None,
        }
    }

    /// Settles waiting source `i` given `pick`, the least loaded of
    /// `candidates` other than the member it is leaving. Returns the member
    /// whose load grew.
    fn settle(&mut self, i: usize, pick: Option<usize>, candidates: &[usize]) -> Option<usize> {
        let (e, slot) = match (pick, self.slots[i]) {
            (Some(to), Slot::Leaving { from }) => (to, Slot::Moving { from, to }),
            (Some(by), _) => (
                by,
                Slot::Owned {
                    by,
                    hold: Hold::Fresh,
                },
            ),
            // A handover lost its target and the old owner is the only member
            // left that may own the source. It never stopped consuming, so it
            // simply keeps it.
            (None, Slot::Leaving { from }) => match self.eligible_of[from] {
                Some(by) if candidates.binary_search(&by).is_ok() => (
                    by,
                    Slot::Owned {
                        by,
                        hold: Hold::Kept,
                    },
                ),
                _ => {
                    self.slots[i] = Slot::Open;
                    return None;
                }
            },
            // Every waiting source has a candidate, so this does not happen;
            // nobody may own it, so it is dropped.
            (None, _) => {
                self.slots[i] = Slot::Open;
                return None;
            }
        };
        self.load[e] += 1;
        self.slots[i] = slot;
        Some(e)
    }

    /// Moves one source at a time from the most loaded member to the least
    /// loaded one that may take it, until no member has two more than another
    /// member that could take one of its sources. Each move lowers the sum of
    /// squared loads, so this ends.
    pub(super) fn rebalance(&mut self) {
        let (Some(&least), Some(&most)) = (self.load.iter().min(), self.load.iter().max()) else {
            return;
        };
        if most <= least + 1 {
            return;
        }
        let mut held: Vec<Held> = vec![Held::new(); self.load.len()];
        for (i, slot) in self.slots.iter().enumerate() {
            if let Slot::Owned { by, hold } = *slot {
                held[by]
                    .entry((hold, self.signature_of[i]))
                    .or_default()
                    .insert(i);
            }
        }
        let mut by_load: BTreeSet<(usize, usize)> = self.load.iter().copied().zip(0..).collect();

        while let Some(step) = self.next_move(&held, &by_load) {
            let key = (step.hold, step.signature);
            if let Some(bucket) = held[step.donor].get_mut(&key) {
                bucket.remove(&step.source);
                if bucket.is_empty() {
                    held[step.donor].remove(&key);
                }
            }
            self.slots[step.source] = if step.hold == Hold::Kept {
                Slot::Moving {
                    from: self.eligible[step.donor],
                    to: step.taker,
                }
            } else {
                held[step.taker]
                    .entry((Hold::Fresh, step.signature))
                    .or_default()
                    .insert(step.source);
                Slot::Owned {
                    by: step.taker,
                    hold: Hold::Fresh,
                }
            };
            by_load.remove(&(self.load[step.donor], step.donor));
            self.load[step.donor] -= 1;
            by_load.insert((self.load[step.donor], step.donor));
            by_load.remove(&(self.load[step.taker], step.taker));
            self.load[step.taker] += 1;
            by_load.insert((self.load[step.taker], step.taker));
        }
    }

    /// The most loaded member that has a source for a member loaded two less,
    /// and the least loaded such member. Among equally loaded members the
    /// higher id gives first and the lower id takes first.
    fn next_move(&self, held: &[Held], by_load: &BTreeSet<(usize, usize)>) -> Option<Move> {
        let &(least, _) = by_load.first()?;
        for &(donor_load, donor) in by_load.iter().rev() {
            if donor_load <= least + 1 {
                break;
            }
            for &(taker_load, taker) in by_load {
                if taker_load + 1 >= donor_load {
                    break;
                }
                if let Some((hold, signature, source)) = self.movable(&held[donor], taker) {
                    return Some(Move {
                        donor,
                        taker,
                        hold,
                        signature,
                        source,
                    });
                }
            }
        }
        None
    }

    /// The source `taker` would get from a member holding `held`: one that can
    /// move directly if possible, then the lowest.
    fn movable(&self, held: &Held, taker: usize) -> Option<(Hold, usize, usize)> {
        let mut best: Option<(Hold, usize, usize)> = None;
        for (&(hold, signature), sources) in held {
            if best.is_some_and(|(best_hold, _, _)| best_hold < hold) {
                break;
            }
            if !self.admits(signature, taker) {
                continue;
            }
            let Some(&source) = sources.first() else {
                continue;
            };
            if best.is_none_or(|(_, _, lowest)| source < lowest) {
                best = Some((hold, signature, source));
            }
        }
        best
    }

    pub(super) fn finish(self) -> Allocation<S> {
        let mut owned: Vec<Vec<S>> = (0..self.eligible.len()).map(|_| Vec::new()).collect();
        let mut handovers = Vec::new();
        for (slot, &source) in self.slots.iter().zip(&self.sources) {
            match *slot {
                Slot::Owned { by, .. } => owned[by].push(source.clone()),
                Slot::Moving { from, to } => handovers.push((
                    source.clone(),
                    Handover {
                        from: self.live[from].id.clone(),
                        to: self.live[self.eligible[to]].id.clone(),
                    },
                )),
                Slot::Open | Slot::Leaving { .. } => {}
            }
        }
        // Sources were visited in order, so these collections build from
        // sorted input.
        let owners = owned
            .into_iter()
            .zip(&self.eligible)
            .filter(|(sources, _)| !sources.is_empty())
            .map(|(sources, &l)| (self.live[l].id.clone(), sources.into_iter().collect()))
            .collect();
        Allocation {
            owners,
            handovers: handovers.into_iter().collect(),
        }
    }
}
