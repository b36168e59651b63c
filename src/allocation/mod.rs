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

//!
//! This file holds the types and [`allocate`]; `planner` the working state of
//! one call; `index` the lookups it is built from.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

mod index;
mod planner;
#[cfg(test)]
pub(crate) mod tests;

use planner::Planner;

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
