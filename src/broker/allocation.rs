//! Source allocation for one subscriber group.
//!
//! A *source* is something a subscriber consumes (say `category:orders`), a
//! *subscriber* is one instance of a group running on some node, and the
//! *allocation* says which subscriber owns which source. [`allocate`] computes
//! the group's next allocation from the live members, the previous decision and
//! the handovers that have completed. It is a pure function: no I/O, no clock,
//! no randomness, and it never panics, so every node that sees the same input
//! reaches the same decision.
//!
//! The rules it keeps:
//!
//! - **Eligibility**: a subscriber may own a source only if it is a live member,
//!   requests the source and carries every required tag.
//! - **No double ownership**: a source has at most one owner, and a source that
//!   is being handed over has none.
//! - **Coverage**: every source that some eligible member requests is owned by
//!   an eligible member or is being handed over to one.
//! - **Two-step handover**: a source owned by a live subscriber is never given
//!   straight to another one, because the old owner still runs a consumer on it.
//!   It is first taken away and listed as a [`Handover`]; the decision after the
//!   old owner has released it gives it to the new owner (or, should that one
//!   be gone, to whoever would get a free source). An unreleased handover keeps
//!   its target unless the target is gone. A dead owner runs no consumer, so
//!   its sources are reassigned at once; a live owner that may no longer own a
//!   source hands it over like any other.
//! - **Balance**: counting owned sources plus incoming handovers, a member that
//!   has two or more sources more than another owns nothing the other could
//!   take. When every member requests the same sources, counts differ by at
//!   most one.
//! - **Stickiness**: only what eligibility or balance requires moves; feeding a
//!   decision back in unchanged returns it unchanged.
//! - **Determinism**: the order of the members does not matter; ties go to the
//!   lower subscriber id, then the lower source.
//! - **Newcomers get their share**: a member joining a balanced group receives
//!   handovers in the very next decision.

use std::cmp::Ordering;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One live subscriber of the group, as the allocator sees it.
///
/// `sources` sits behind an [`Arc`] because most members of a group request
/// the same sources: sharing one set keeps a group of a thousand members over a
/// hundred thousand sources cheap to build, and lets [`allocate`] recognise the
/// shared set without comparing it element by element. Members whose sets are
/// equal but not shared are still treated alike, only a little more slowly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member<S> {
    /// Subscriber id, unique within the group.
    pub id: String,
    /// Node the subscriber runs on. Carried for callers; placement does not use it.
    pub node: String,
    /// Sources this subscriber requests.
    pub sources: Arc<BTreeSet<S>>,
    /// Tags this subscriber carries, matched against the group's required tags.
    pub tags: BTreeSet<String>,
}

impl<S> Member<S> {
    /// A member without tags.
    pub fn new(
        id: impl Into<String>,
        node: impl Into<String>,
        sources: impl Into<Arc<BTreeSet<S>>>,
    ) -> Self {
        Self {
            id: id.into(),
            node: node.into(),
            sources: sources.into(),
            tags: BTreeSet::new(),
        }
    }

    /// The same member with `tags` added.
    #[must_use]
    pub fn with_tags<T: Into<String>>(mut self, tags: impl IntoIterator<Item = T>) -> Self {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }
}

/// Everything [`allocate`] decides from.
#[derive(Debug)]
pub struct AllocationInput<'a, S> {
    /// Live subscribers of the group, in any order. Should two share an id, only
    /// one of them counts (the lowest by node, then tags, then sources).
    pub members: &'a [Member<S>],
    /// Tags a member must carry to own anything.
    pub required_tags: &'a BTreeSet<String>,
    /// The previous decision (empty at first).
    pub current: &'a Allocation<S>,
    /// Sources in handover that may now go to their new owner: the old owner
    /// released them, died, or the handover timed out. Other entries are ignored.
    pub released: &'a BTreeSet<S>,
}

/// One decision: who owns what, and what is on its way to a new owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(serialize = "S: Serialize", deserialize = "S: Ord + Deserialize<'de>"))]
pub struct Allocation<S> {
    /// Subscriber id to the sources it owns now. Subscribers owning nothing are
    /// left out.
    pub owners: BTreeMap<String, BTreeSet<S>>,
    /// Sources moving between subscribers. They are owned by nobody until their
    /// old owner has released them.
    pub handovers: BTreeMap<S, Handover>,
}

impl<S> Default for Allocation<S> {
    // Written out because the derive would demand `S: Default`.
    fn default() -> Self {
        Self {
            owners: BTreeMap::new(),
            handovers: BTreeMap::new(),
        }
    }
}

impl<S: Ord> Allocation<S> {
    /// The subscriber owning `source` now, if any.
    pub fn owner_of(&self, source: &S) -> Option<&str> {
        self.owners
            .iter()
            .find(|(_, sources)| sources.contains(source))
            .map(|(id, _)| id.as_str())
    }

    /// How many sources `id` owns plus how many are being handed over to it:
    /// the count that balance is judged on.
    pub fn load(&self, id: &str) -> usize {
        let owned = self.owners.get(id).map_or(0, BTreeSet::len);
        owned + self.handovers.values().filter(|h| h.to == id).count()
    }
}

/// A source on its way from one subscriber to another.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Handover {
    /// The subscriber that owned the source and must release it.
    pub from: String,
    /// The subscriber that gets it once it is released.
    pub to: String,
}

/// Computes the group's next allocation. See the module documentation for the
/// rules it keeps.
///
/// It never panics, given that `S`'s `Ord` is a total order (which `BTreeSet`
/// needs anyway). The work is close to linear in the number of sources when
/// members share their source sets; members with sets of their own add a sort
/// of all their requests.
pub fn allocate<S: Ord + Clone>(input: &AllocationInput<'_, S>) -> Allocation<S> {
    let mut plan = Planner::new(input.members, input.required_tags);
    plan.take_over(input.current, input.released);
    plan.place_waiting();
    plan.rebalance();
    plan.finish()
}

/// A group of `members` subscribers that all request the same `sources`, for
/// tests and benchmarks. Ids are `member-00000`, `member-00001`, … and sources
/// `source-0000000`, …, so ids sort in creation order; all members share one
/// source set and carry no tags. To simulate a newcomer, build one member more
/// than needed and hold the last back.
pub fn synthetic_input(members: usize, sources: usize) -> Vec<Member<String>> {
    let shared: Arc<BTreeSet<String>> =
        Arc::new((0..sources).map(|i| format!("source-{i:07}")).collect());
    (0..members)
        .map(|i| Member {
            id: format!("member-{i:05}"),
            node: format!("node-{:03}", i % 16),
            sources: Arc::clone(&shared),
            tags: BTreeSet::new(),
        })
        .collect()
}

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
struct Planner<'a, S> {
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
    fn new(members: &'a [Member<S>], required_tags: &BTreeSet<String>) -> Self {
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
    fn take_over(&mut self, current: &Allocation<S>, released: &BTreeSet<S>) {
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
    fn place_waiting(&mut self) {
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
    fn rebalance(&mut self) {
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

    fn finish(self) -> Allocation<S> {
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

/// Lists every source some class requests, ascending, and gives each the list
/// of classes requesting it, numbering the distinct lists. Returns the sources,
/// each source's signature and each signature's classes, ascending.
fn index_sources<'a, S: Ord>(
    class_sets: &[&'a BTreeSet<S>],
) -> (Vec<&'a S>, Vec<usize>, Vec<Vec<usize>>) {
    if let [only] = class_sets {
        // Everybody requests the same sources: the common case, kept cheap.
        let sources: Vec<&'a S> = only.iter().collect();
        let signature_of = vec![0; sources.len()];
        return (sources, signature_of, vec![vec![0]]);
    }
    // Sorting (source, class) pairs yields the sources and their classes in
    // one go, without searching for each class's sources afterwards.
    let mut requests: Vec<(&'a S, usize)> = class_sets
        .iter()
        .enumerate()
        .flat_map(|(class, set)| set.iter().map(move |source| (source, class)))
        .collect();
    requests.sort_unstable();

    let mut sources = Vec::new();
    let mut signature_of = Vec::new();
    let mut signature_classes: Vec<Vec<usize>> = Vec::new();
    let mut known: HashMap<Vec<usize>, usize> = HashMap::new();
    let mut classes: Vec<usize> = Vec::new();
    let mut last: Option<usize> = None;
    let mut rest = requests.as_slice();
    while let Some(&(source, _)) = rest.first() {
        let same = rest
            .iter()
            .take_while(|&&(other, _)| other == source)
            .count();
        classes.clear();
        classes.extend(rest[..same].iter().map(|&(_, class)| class));
        rest = &rest[same..];
        // Neighbouring sources usually share their classes: compare before
        // hashing.
        let signature = match last {
            Some(previous) if signature_classes[previous] == classes => previous,
            _ => match known.get(&classes) {
                Some(&known) => known,
                None => {
                    signature_classes.push(classes.clone());
                    known.insert(classes.clone(), signature_classes.len() - 1);
                    signature_classes.len() - 1
                }
            },
        };
        last = Some(signature);
        sources.push(source);
        signature_of.push(signature);
    }
    (sources, signature_of, signature_classes)
}

/// The members sorted by id, one per id, so that the result does not depend on
/// the order of the input.
fn live_members<S: Ord>(members: &[Member<S>]) -> Vec<&Member<S>> {
    let mut live: Vec<&Member<S>> = members.iter().collect();
    live.sort_by(|a, b| {
        a.id.cmp(&b.id)
            .then_with(|| a.node.cmp(&b.node))
            .then_with(|| a.tags.cmp(&b.tags))
            .then_with(|| a.sources.cmp(&b.sources))
    });
    live.dedup_by(|later, earlier| later.id == earlier.id);
    live
}

/// Finds ascending targets in a sorted slice, one after the other.
///
/// It first looks exactly as far past the last hit as the last hit was past
/// the one before: the sources of one owner in a decision made by [`allocate`]
/// tend to be evenly spread, so this usually hits with a single comparison.
/// Looking each one up from scratch instead touches memory all over the slice,
/// and with a thousand owners that costs more than the rest of [`allocate`].
/// On a miss it gallops, which costs little more than a binary search.
#[derive(Debug, Default)]
struct Cursor {
    /// Where the next search starts.
    next: usize,
    /// Distance between the last two hits.
    gap: usize,
}

impl Cursor {
    fn seek<S: Ord>(&mut self, sorted: &[&S], target: &S) -> Option<usize> {
        let start = self.next.min(sorted.len());
        let rest = &sorted[start..];
        let guess = self.gap.saturating_sub(1);
        let offset = match rest.get(guess) {
            Some(&item) => match item.cmp(target) {
                Ordering::Equal => guess,
                Ordering::Less => guess + 1 + gallop(&rest[guess + 1..], target),
                Ordering::Greater => gallop(&rest[..guess], target),
            },
            None => gallop(rest, target),
        };
        self.next = start + offset;
        if rest.get(offset).is_some_and(|&item| item == target) {
            self.gap = offset + 1;
            self.next += 1;
            Some(start + offset)
        } else {
            None
        }
    }
}

/// Position of the first item of `sorted` not below `target`, searched from
/// the front in doubling steps.
fn gallop<S: Ord>(sorted: &[&S], target: &S) -> usize {
    let mut bound = 1;
    while bound <= sorted.len() && *sorted[bound - 1] < *target {
        bound *= 2;
    }
    let low = bound / 2;
    let high = bound.min(sorted.len());
    low + sorted[low..high].partition_point(|&item| item < target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Src = u16;

    fn member(id: &str, sources: impl IntoIterator<Item = Src>) -> Member<Src> {
        Member::new(id, "node", sources.into_iter().collect::<BTreeSet<_>>())
    }

    fn tagged(id: &str, sources: impl IntoIterator<Item = Src>, tags: &[&str]) -> Member<Src> {
        member(id, sources).with_tags(tags.iter().copied())
    }

    fn run_with(
        members: &[Member<Src>],
        required: &[&str],
        current: &Allocation<Src>,
        released: &[Src],
    ) -> Allocation<Src> {
        let required: BTreeSet<String> = required.iter().map(|t| t.to_string()).collect();
        let released: BTreeSet<Src> = released.iter().copied().collect();
        let out = allocate(&AllocationInput {
            members,
            required_tags: &required,
            current,
            released: &released,
        });
        if let Err(error) = check(members, &required, current, &released, &out) {
            panic!("invariant broken: {error}\nout: {out:?}");
        }
        out
    }

    fn run(
        members: &[Member<Src>],
        current: &Allocation<Src>,
        released: &[Src],
    ) -> Allocation<Src> {
        run_with(members, &[], current, released)
    }

    fn owned(allocation: &Allocation<Src>, id: &str) -> BTreeSet<Src> {
        allocation.owners.get(id).cloned().unwrap_or_default()
    }

    fn handover(from: &str, to: &str) -> Handover {
        Handover {
            from: from.to_string(),
            to: to.to_string(),
        }
    }

    fn allocation(owners: &[(&str, &[Src])], handovers: &[(Src, &str, &str)]) -> Allocation<Src> {
        Allocation {
            owners: owners
                .iter()
                .map(|(id, sources)| (id.to_string(), sources.iter().copied().collect()))
                .collect(),
            handovers: handovers
                .iter()
                .map(|&(source, from, to)| (source, handover(from, to)))
                .collect(),
        }
    }

    /// Checks every rule that can be judged from one call's input and output.
    fn check(
        members: &[Member<Src>],
        required: &BTreeSet<String>,
        current: &Allocation<Src>,
        released: &BTreeSet<Src>,
        out: &Allocation<Src>,
    ) -> Result<(), TestCaseError> {
        check_rules(members, required, current, released, out, true)
    }

    /// Checks the rules; those about how sources move from `current` only when
    /// `current` is a decision `allocate` could have made.
    fn check_rules(
        members: &[Member<Src>],
        required: &BTreeSet<String>,
        current: &Allocation<Src>,
        released: &BTreeSet<Src>,
        out: &Allocation<Src>,
        well_formed: bool,
    ) -> Result<(), TestCaseError> {
        let live: BTreeMap<&str, &Member<Src>> =
            members.iter().map(|m| (m.id.as_str(), m)).collect();
        let eligible = |id: &str| live.get(id).is_some_and(|m| required.is_subset(&m.tags));
        let may_own = |id: &str, source: &Src| {
            eligible(id) && live.get(id).is_some_and(|m| m.sources.contains(source))
        };

        // Eligibility.
        for (id, sources) in &out.owners {
            prop_assert!(!sources.is_empty(), "{} listed with nothing", id);
            for source in sources {
                prop_assert!(may_own(id, source), "{} may not own {}", id, source);
            }
        }
        for (source, h) in &out.handovers {
            prop_assert!(
                may_own(&h.to, source),
                "{} may not receive {}",
                h.to,
                source
            );
            prop_assert!(
                live.contains_key(h.from.as_str()),
                "dead {} hands over",
                h.from
            );
            prop_assert_ne!(&h.from, &h.to);
        }

        // No double ownership.
        let mut owner_of: BTreeMap<Src, &str> = BTreeMap::new();
        for (id, sources) in &out.owners {
            for source in sources {
                prop_assert!(
                    owner_of.insert(*source, id).is_none(),
                    "{} owned twice",
                    source
                );
                prop_assert!(
                    !out.handovers.contains_key(source),
                    "{} owned and moving",
                    source
                );
            }
        }

        // Coverage.
        let wanted: BTreeSet<Src> = members
            .iter()
            .filter(|m| required.is_subset(&m.tags))
            .flat_map(|m| m.sources.iter().copied())
            .collect();
        let covered: BTreeSet<Src> = owner_of
            .keys()
            .chain(out.handovers.keys())
            .copied()
            .collect();
        prop_assert_eq!(&covered, &wanted);
        if current.owners.is_empty() && current.handovers.is_empty() {
            prop_assert!(
                out.handovers.is_empty(),
                "handover without a previous owner"
            );
        }

        // Two-step handover.
        if well_formed {
            for (id, sources) in &current.owners {
                let alive = live.contains_key(id.as_str());
                for source in sources {
                    if alive {
                        if let Some(&owner) = owner_of.get(source) {
                            prop_assert_eq!(owner, id.as_str(), "{} handed over directly", source);
                        }
                        if let Some(h) = out.handovers.get(source) {
                            prop_assert_eq!(&h.from, id);
                        }
                    } else if wanted.contains(source) {
                        prop_assert!(
                            owner_of.contains_key(source),
                            "{} of a dead owner waits",
                            source
                        );
                    }
                }
            }
            for (source, h) in &current.handovers {
                if released.contains(source) || !live.contains_key(h.from.as_str()) {
                    if wanted.contains(source) {
                        prop_assert!(
                            owner_of.contains_key(source),
                            "released {} not assigned",
                            source
                        );
                    }
                } else {
                    if let Some(&owner) = owner_of.get(source) {
                        prop_assert_eq!(owner, h.from.as_str(), "unreleased {} taken", source);
                    }
                    if may_own(&h.to, source) {
                        prop_assert_eq!(out.handovers.get(source), Some(h));
                    } else if let Some(next) = out.handovers.get(source) {
                        prop_assert_eq!(&next.from, &h.from);
                    }
                }
            }
        }

        // Balance.
        let loads: BTreeMap<&str, usize> = live
            .keys()
            .filter(|id| eligible(id))
            .map(|&id| (id, out.load(id)))
            .collect();
        for (&a, &load_a) in &loads {
            for (&b, &load_b) in &loads {
                if load_a > load_b + 1 {
                    for source in out.owners.get(a).into_iter().flatten() {
                        prop_assert!(
                            !may_own(b, source),
                            "{} ({}) keeps {} that {} ({}) could take",
                            a,
                            load_a,
                            source,
                            b,
                            load_b
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn empty_group_allocates_nothing() {
        let empty = Allocation::default();
        assert_eq!(run(&[], &empty, &[]), empty);
        assert_eq!(run(&[member("a", [])], &empty, &[]), empty);
        // Everything the previous owners had is gone with them.
        let before = allocation(&[("a", &[1, 2])], &[(3, "a", "b")]);
        assert_eq!(run(&[], &before, &[]), empty);
    }

    #[test]
    fn single_member_owns_everything() {
        let out = run(&[member("a", [1, 2, 3])], &Allocation::default(), &[]);
        assert_eq!(out, allocation(&[("a", &[1, 2, 3])], &[]));
    }

    #[test]
    fn initial_allocation_is_balanced_and_direct() {
        let members: Vec<_> = ["c", "a", "b"].iter().map(|id| member(id, 0..10)).collect();
        let out = run(&members, &Allocation::default(), &[]);
        assert!(out.handovers.is_empty());
        let loads: Vec<usize> = ["a", "b", "c"].iter().map(|id| out.load(id)).collect();
        // Ties go to the lower id.
        assert_eq!(loads, [4, 3, 3]);
        assert_eq!(owned(&out, "a"), [0, 3, 6, 9].into());
    }

    #[test]
    fn newcomer_receives_share_through_handovers() {
        let mut members: Vec<_> = ["a", "b"].iter().map(|id| member(id, 0..9)).collect();
        let before = run(&members, &Allocation::default(), &[]);
        members.push(member("c", 0..9));
        let after = run(&members, &before, &[]);
        assert_eq!(after.handovers.len(), 3);
        assert!(after.handovers.values().all(|h| h.to == "c"));
        for id in ["a", "b"] {
            assert!(owned(&after, id).is_subset(&owned(&before, id)));
        }
        // The handovers wait for their release, then complete.
        assert_eq!(run(&members, &after, &[]), after);
        let moving: Vec<Src> = after.handovers.keys().copied().collect();
        let done = run(&members, &after, &moving);
        assert!(done.handovers.is_empty());
        assert_eq!(owned(&done, "c"), moving.iter().copied().collect());
        assert_eq!(owned(&done, "a"), owned(&after, "a"));
        assert_eq!(owned(&done, "b"), owned(&after, "b"));
    }

    #[test]
    fn partial_release_completes_only_what_was_released() {
        let members: Vec<_> = ["a", "b", "c"].iter().map(|id| member(id, 1..=4)).collect();
        let before = allocation(&[("a", &[3]), ("c", &[4])], &[(1, "a", "b"), (2, "c", "b")]);
        let out = run(&members, &before, &[1]);
        assert_eq!(
            out,
            allocation(&[("a", &[3]), ("b", &[1]), ("c", &[4])], &[(2, "c", "b")]),
            "the unreleased handover must stay"
        );
    }

    #[test]
    fn released_source_goes_to_best_member_when_target_left() {
        let members = [member("a", [1, 2, 3]), member("b", [1, 2, 3])];
        let before = allocation(&[("a", &[1, 2])], &[(3, "a", "gone")]);
        let out = run(&members, &before, &[3]);
        assert_eq!(out, allocation(&[("a", &[1, 2]), ("b", &[3])], &[]));
    }

    #[test]
    fn released_sources_are_rebalanced_when_their_target_is_overloaded() {
        // b released both sources to a and then asked for them again: a would
        // hold two while b holds none, so one goes straight back to b, which
        // runs no consumer on it any more.
        let members = [member("a", [1, 2]), member("b", [1, 2])];
        let before = allocation(&[], &[(1, "b", "a"), (2, "b", "a")]);
        let out = run(&members, &before, &[1, 2]);
        assert_eq!(out, allocation(&[("a", &[2]), ("b", &[1])], &[]));
    }

    #[test]
    fn allocation_is_serde_ready() {
        fn serde_ready<T: Serialize + for<'de> Deserialize<'de>>() {}
        serde_ready::<Allocation<String>>();
        serde_ready::<Allocation<Src>>();
    }

    #[test]
    fn dead_handover_target_is_replaced() {
        let members = [
            member("a", [1, 2, 3, 4]),
            member("b", [1, 2, 3, 4]),
            member("c", [1, 2, 3, 4]),
        ];
        let before = allocation(&[("a", &[1, 2]), ("b", &[3])], &[(4, "a", "gone")]);
        let out = run(&members, &before, &[]);
        assert_eq!(
            out,
            allocation(&[("a", &[1, 2]), ("b", &[3])], &[(4, "a", "c")])
        );
    }

    #[test]
    fn handover_target_lost_interest_and_old_owner_is_the_only_one_left() {
        let members = [member("a", [1]), member("b", [2])];
        let before = allocation(&[("b", &[2])], &[(1, "a", "b")]);
        // The old owner never stopped consuming it, so it keeps it.
        assert_eq!(
            run(&members, &before, &[]),
            allocation(&[("a", &[1]), ("b", &[2])], &[])
        );
    }

    #[test]
    fn dead_owner_sources_move_directly_and_nothing_else_moves() {
        let members: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| member(id, 0..12))
            .collect();
        let before = run(&members, &Allocation::default(), &[]);
        let survivors: Vec<_> = members.iter().filter(|m| m.id != "b").cloned().collect();
        let after = run(&survivors, &before, &[]);
        assert!(after.handovers.is_empty());
        for id in ["a", "c", "d"] {
            assert!(owned(&after, id).is_superset(&owned(&before, id)));
            assert_eq!(after.load(id), 4);
        }
    }

    #[test]
    fn dead_old_owner_frees_a_pending_handover() {
        let members = [member("b", [1, 2])];
        let before = allocation(&[("b", &[2])], &[(1, "a", "b")]);
        assert_eq!(
            run(&members, &before, &[]),
            allocation(&[("b", &[1, 2])], &[])
        );
    }

    #[test]
    fn owner_that_stops_requesting_hands_over() {
        let before = allocation(&[("a", &[1, 2]), ("b", &[3])], &[]);
        let members = [member("a", [1]), member("b", [1, 2, 3])];
        let out = run(&members, &before, &[]);
        assert_eq!(
            out,
            allocation(&[("a", &[1]), ("b", &[3])], &[(2, "a", "b")])
        );
    }

    #[test]
    fn owner_that_loses_a_required_tag_hands_over() {
        let before = allocation(&[("a", &[1]), ("b", &[2])], &[]);
        let members = [
            tagged("a", [1, 2], &["x"]),
            tagged("b", [1, 2], &["x", "y"]),
        ];
        let out = run_with(&members, &["y"], &before, &[]);
        assert_eq!(out, allocation(&[("b", &[2])], &[(1, "a", "b")]));
    }

    #[test]
    fn ineligible_owner_with_nobody_to_take_over_drops_the_source() {
        let before = allocation(&[("a", &[1, 2])], &[]);
        let members = [member("a", [1]), member("b", [3])];
        assert_eq!(
            run(&members, &before, &[]),
            allocation(&[("a", &[1]), ("b", &[3])], &[])
        );
    }

    #[test]
    fn required_tags_filter_members() {
        let members = [
            tagged("a", [1, 2, 3], &["eu"]),
            tagged("b", [1, 2, 3], &["eu", "gpu"]),
            tagged("c", [1, 2, 3, 4], &["us"]),
        ];
        let out = run_with(&members, &["eu"], &Allocation::default(), &[]);
        assert_eq!(out, allocation(&[("a", &[1, 3]), ("b", &[2])], &[]));
        let out = run_with(&members, &["gpu"], &Allocation::default(), &[]);
        assert_eq!(out, allocation(&[("b", &[1, 2, 3])], &[]));
        let out = run_with(&members, &["none"], &Allocation::default(), &[]);
        assert_eq!(out, Allocation::default());
    }

    #[test]
    fn heterogeneous_requests_are_balanced_where_possible() {
        let members = [member("a", 1..=6), member("b", [1]), member("c", [1, 2])];
        let out = run(&members, &Allocation::default(), &[]);
        // b and c can only ever have what they request.
        assert_eq!(
            out,
            allocation(&[("a", &[3, 4, 5, 6]), ("b", &[1]), ("c", &[2])], &[])
        );
    }

    #[test]
    fn member_order_and_set_sharing_do_not_matter() {
        let shared: Arc<BTreeSet<Src>> = Arc::new((0..20).collect());
        let one: Vec<_> = ["d", "a", "c", "b"]
            .iter()
            .map(|id| Member::new(*id, "n", Arc::clone(&shared)))
            .collect();
        let other: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| member(id, 0..20))
            .collect();
        let empty = Allocation::default();
        assert_eq!(run(&one, &empty, &[]), run(&other, &empty, &[]));
    }

    #[test]
    fn duplicate_ids_count_once_whatever_the_order() {
        let first = [
            member("a", [1, 2]),
            member("a", [2, 3]),
            member("b", [1, 2, 3]),
        ];
        let second = [first[1].clone(), first[2].clone(), first[0].clone()];
        let empty = Allocation::default();
        let required = BTreeSet::new();
        let released = BTreeSet::new();
        let decide = |members: &[Member<Src>]| {
            allocate(&AllocationInput {
                members,
                required_tags: &required,
                current: &empty,
                released: &released,
            })
        };
        assert_eq!(decide(&first), decide(&second));
    }

    #[test]
    fn malformed_previous_decision_is_tolerated() {
        // Source 1 claimed twice and also listed as moving; source 9 unknown.
        let before = allocation(
            &[("a", &[1, 9]), ("b", &[1])],
            &[(1, "a", "a"), (9, "x", "y")],
        );
        let members = [member("a", [1, 2]), member("b", [1, 2])];
        let released: BTreeSet<Src> = [1, 9].into();
        let out = allocate(&AllocationInput {
            members: &members,
            required_tags: &BTreeSet::new(),
            current: &before,
            released: &released,
        });
        assert_eq!(out, allocation(&[("a", &[1]), ("b", &[2])], &[]));
    }

    #[test]
    fn synthetic_group_at_benchmark_size_is_balanced() {
        // The benchmark's size, 1,000 members over 100,000 sources: well under
        // a second even in a debug build. Timing is the benchmark's business.
        let mut members = synthetic_input(1_001, 100_000);
        let newcomer = members.pop().expect("1,001 members were asked for");
        let required = BTreeSet::new();
        let released = BTreeSet::new();
        let decide = |members: &[Member<String>], current: &Allocation<String>| {
            allocate(&AllocationInput {
                members,
                required_tags: &required,
                current,
                released: &released,
            })
        };
        let first = decide(&members, &Allocation::default());
        assert!(first.handovers.is_empty());
        assert_eq!(first.owners.len(), 1_000);
        assert!(first.owners.values().all(|sources| sources.len() == 100));

        members.push(newcomer);
        let second = decide(&members, &first);
        // 100,000 over 1,001 is 99.9: the newcomer needs 99, one from each of
        // 99 members, after which everybody has 99 or 100.
        assert_eq!(second.handovers.len(), 99);
        assert!(second.handovers.values().all(|h| h.to == "member-01000"));
        let froms: BTreeSet<&str> = second.handovers.values().map(|h| h.from.as_str()).collect();
        assert_eq!(froms.len(), 99);
        assert_eq!(decide(&members, &second), second);
    }

    #[test]
    fn cursor_finds_ascending_targets() {
        let values: Vec<Src> = (0..100).map(|v| v * 3).collect();
        let sorted: Vec<&Src> = values.iter().collect();
        let targets = [0, 1, 3, 30, 31, 60, 90, 93, 94, 100, 297, 298];
        let mut cursor = Cursor::default();
        let found: Vec<Option<usize>> = targets.iter().map(|t| cursor.seek(&sorted, t)).collect();
        let expected: Vec<Option<usize>> = targets
            .iter()
            .map(|t| sorted.binary_search(&t).ok())
            .collect();
        assert_eq!(found, expected);
        assert_eq!(Cursor::default().seek(&[], &1u16), None);
    }

    proptest! {
        #[test]
        fn cursor_agrees_with_binary_search(
            values in proptest::collection::btree_set(0u16..500, 0..200),
            targets in proptest::collection::btree_set(0u16..500, 0..200),
        ) {
            let sorted: Vec<&Src> = values.iter().collect();
            let mut cursor = Cursor::default();
            for target in &targets {
                prop_assert_eq!(cursor.seek(&sorted, target), sorted.binary_search(&target).ok());
            }
        }
    }

    // ---- properties ----

    const TAGS: [&str; 3] = ["a", "b", "c"];

    fn tags_from(mask: u8) -> BTreeSet<String> {
        TAGS.iter()
            .enumerate()
            .filter(|(bit, _)| mask & (1 << bit) != 0)
            .map(|(_, tag)| tag.to_string())
            .collect()
    }

    fn sources_from(mask: u64, universe: Src) -> BTreeSet<Src> {
        (0..universe).filter(|s| mask & (1 << s) != 0).collect()
    }

    /// One would-be member: requested sources mask and tags mask.
    type Shape = (u64, u8);

    fn shape() -> impl Strategy<Value = Shape> {
        let sources = prop_oneof![
            2 => Just(u64::MAX),
            3 => any::<u64>(),
            1 => (any::<u64>(), any::<u64>()).prop_map(|(x, y)| x & y),
        ];
        let tags = prop_oneof![2 => Just(0b111u8), 1 => 0u8..8];
        (sources, tags)
    }

    #[derive(Clone, Debug)]
    struct Step {
        alive: Vec<bool>,
        changed: Vec<bool>,
        released: u64,
        order: u64,
    }

    #[derive(Clone, Debug)]
    struct Scenario {
        universe: Src,
        required: BTreeSet<String>,
        shapes: Vec<(Shape, Shape)>,
        steps: Vec<Step>,
    }

    fn scenario() -> impl Strategy<Value = Scenario> {
        let required = prop_oneof![3 => Just(0u8), 1 => 1u8..4];
        (1..=40 as Src, 1usize..=12, required).prop_flat_map(|(universe, pool, required)| {
            let step = (
                proptest::collection::vec(proptest::bool::weighted(0.8), pool),
                proptest::collection::vec(proptest::bool::weighted(0.2), pool),
                any::<u64>(),
                any::<u64>(),
            )
                .prop_map(|(alive, changed, released, order)| Step {
                    alive,
                    changed,
                    released,
                    order,
                });
            (
                proptest::collection::vec((shape(), shape()), pool),
                proptest::collection::vec(step, 1..5),
            )
                .prop_map(move |(shapes, steps)| Scenario {
                    universe,
                    required: tags_from(required),
                    shapes,
                    steps,
                })
        })
    }

    fn members_of(scenario: &Scenario, step: &Step) -> Vec<Member<Src>> {
        scenario
            .shapes
            .iter()
            .enumerate()
            .filter(|&(k, _)| step.alive[k])
            .map(|(k, (base, alt))| {
                let (sources, tags) = if step.changed[k] { alt } else { base };
                Member {
                    id: format!("m{k:02}"),
                    node: format!("n{}", k % 3),
                    sources: Arc::new(sources_from(*sources, scenario.universe)),
                    tags: tags_from(*tags),
                }
            })
            .collect()
    }

    /// A fixed permutation of `items` drawn from `seed`, with sets shared
    /// between members wherever they are equal, so that neither order nor
    /// sharing can leak into the result.
    fn reshuffled(items: &[Member<Src>], mut seed: u64) -> Vec<Member<Src>> {
        let mut out: Vec<Member<Src>> = items.to_vec();
        for i in (1..out.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let j = (seed % (i as u64 + 1)) as usize;
            out.swap(i, j);
        }
        for i in 1..out.len() {
            if let Some(j) = (0..i).find(|&j| out[j].sources == out[i].sources) {
                out[i].sources = Arc::clone(&out[j].sources);
            }
        }
        out
    }

    fn decide(
        members: &[Member<Src>],
        required: &BTreeSet<String>,
        current: &Allocation<Src>,
        released: &BTreeSet<Src>,
    ) -> Allocation<Src> {
        allocate(&AllocationInput {
            members,
            required_tags: required,
            current,
            released,
        })
    }

    /// Any decision at all, well formed or not: ids that may or may not be
    /// members, sources nobody requests, sources claimed twice, handovers from
    /// and to anybody.
    fn arbitrary_decision(universe: Src) -> impl Strategy<Value = Allocation<Src>> {
        let id = (0usize..15).prop_map(|k| format!("m{k:02}"));
        let source = 0..universe + 5;
        let owners = proptest::collection::btree_map(
            id.clone(),
            proptest::collection::btree_set(source.clone(), 0..8),
            0..8,
        );
        let handovers = proptest::collection::btree_map(
            source,
            (id.clone(), id).prop_map(|(from, to)| Handover { from, to }),
            0..8,
        );
        (owners, handovers).prop_map(|(owners, handovers)| Allocation { owners, handovers })
    }

    /// The fewest sources a newcomer must receive so that it and the others
    /// (holding `loads`) end within one of each other.
    fn fewest_moves(loads: &[usize]) -> usize {
        let total: usize = loads.iter().sum();
        (0..=total)
            .find(|&x| {
                [x.saturating_sub(1), x].iter().any(|&floor| {
                    let kept_at_most: usize = loads.iter().map(|&c| c.min(floor + 1)).sum();
                    loads.iter().all(|&c| c >= floor)
                        && total - kept_at_most <= x
                        && x <= total - floor * loads.len()
                })
            })
            .unwrap_or(total)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random chains of decisions under changing membership and partial
        /// releases keep every rule, are fixed points, and do not depend on
        /// member order.
        #[test]
        fn chains_keep_every_rule(scenario in scenario()) {
            let mut current = Allocation::default();
            let no_release = BTreeSet::new();
            for step in &scenario.steps {
                let members = members_of(&scenario, step);
                let released: BTreeSet<Src> = current
                    .handovers
                    .keys()
                    .enumerate()
                    .filter(|(bit, _)| step.released & (1 << bit) != 0)
                    .map(|(_, source)| *source)
                    .chain(sources_from(step.released >> 48, scenario.universe).into_iter().take(1))
                    .collect();
                let out = decide(&members, &scenario.required, &current, &released);
                check(&members, &scenario.required, &current, &released, &out)?;

                let again = decide(&members, &scenario.required, &out, &no_release);
                prop_assert_eq!(&again, &out, "not a fixed point");

                let shuffled = reshuffled(&members, step.order | 1);
                let other = decide(&shuffled, &scenario.required, &current, &released);
                prop_assert_eq!(&other, &out, "depends on member order");
                current = out;
            }
        }

        /// Whatever the previous decision, the result keeps the rules about a
        /// single decision, is a fixed point and does not depend on order.
        #[test]
        fn arbitrary_previous_decisions_are_survived(
            (scenario, current, released) in scenario().prop_flat_map(|scenario| {
                let universe = scenario.universe;
                (
                    Just(scenario),
                    arbitrary_decision(universe),
                    proptest::collection::btree_set(0..universe + 5, 0..10),
                )
            })
        ) {
            let step = &scenario.steps[0];
            let members = members_of(&scenario, step);
            let out = decide(&members, &scenario.required, &current, &released);
            check_rules(&members, &scenario.required, &current, &released, &out, false)?;
            let again = decide(&members, &scenario.required, &out, &BTreeSet::new());
            prop_assert_eq!(&again, &out, "not a fixed point");
            let shuffled = reshuffled(&members, step.order | 1);
            let other = decide(&shuffled, &scenario.required, &current, &released);
            prop_assert_eq!(&other, &out, "depends on member order");
        }

        /// A newcomer in a balanced group gets exactly the handovers it needs,
        /// only from others, and nothing else changes; once released they are
        /// its own.
        #[test]
        fn newcomer_gets_exactly_its_share(n in 1usize..10, k in 0 as Src..60, first in any::<bool>()) {
            let sources: Arc<BTreeSet<Src>> = Arc::new((0..k).collect());
            let old: Vec<Member<Src>> = (0..n)
                .map(|i| Member::new(format!("m{i}"), "n", Arc::clone(&sources)))
                .collect();
            let none: BTreeSet<String> = BTreeSet::new();
            let nothing: BTreeSet<Src> = BTreeSet::new();
            let before = decide(&old, &none, &Allocation::default(), &nothing);
            prop_assert!(before.handovers.is_empty());

            let newcomer = if first { "a" } else { "z" };
            let mut joined = old.clone();
            joined.push(Member::new(newcomer, "n", Arc::clone(&sources)));
            let after = decide(&joined, &none, &before, &nothing);
            check(&joined, &none, &before, &nothing, &after)?;

            let loads: Vec<usize> = old.iter().map(|m| before.load(&m.id)).collect();
            prop_assert_eq!(after.handovers.len(), fewest_moves(&loads));
            prop_assert!(after.handovers.values().all(|h| h.to == newcomer));
            prop_assert!(!after.owners.contains_key(newcomer));
            for m in &old {
                let mut kept = owned(&after, &m.id);
                kept.extend(after.handovers.iter().filter(|(_, h)| h.from == m.id).map(|(s, _)| *s));
                prop_assert_eq!(kept, owned(&before, &m.id));
            }

            let released: BTreeSet<Src> = after.handovers.keys().copied().collect();
            let done = decide(&joined, &none, &after, &released);
            check(&joined, &none, &after, &released, &done)?;
            prop_assert!(done.handovers.is_empty());
            prop_assert_eq!(owned(&done, newcomer), released);
            for m in &old {
                prop_assert_eq!(owned(&done, &m.id), owned(&after, &m.id));
            }
        }

        /// When a member dies only its sources move, directly, and the rest
        /// keep what they had.
        #[test]
        fn death_moves_only_the_dead_members_sources(n in 2usize..10, k in 0 as Src..60, dead in 0usize..10) {
            let dead = dead % n;
            let sources: Arc<BTreeSet<Src>> = Arc::new((0..k).collect());
            let members: Vec<Member<Src>> = (0..n)
                .map(|i| Member::new(format!("m{i}"), "n", Arc::clone(&sources)))
                .collect();
            let none: BTreeSet<String> = BTreeSet::new();
            let nothing: BTreeSet<Src> = BTreeSet::new();
            let before = decide(&members, &none, &Allocation::default(), &nothing);
            let survivors: Vec<Member<Src>> = members
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != dead)
                .map(|(_, m)| m.clone())
                .collect();
            let after = decide(&survivors, &none, &before, &nothing);
            check(&survivors, &none, &before, &nothing, &after)?;
            prop_assert!(after.handovers.is_empty());
            for m in &survivors {
                prop_assert!(owned(&after, &m.id).is_superset(&owned(&before, &m.id)));
            }
        }
    }
}
