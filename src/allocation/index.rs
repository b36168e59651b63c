//! Lookups the planner is built from: members sorted and deduplicated, sources
//! indexed by the classes that request them, and a cursor for sorted searches.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

use super::Member;

/// Lists every source some class requests, ascending, and gives each the list
/// of classes requesting it, numbering the distinct lists. Returns the sources,
/// each source's signature and each signature's classes, ascending.
pub(super) fn index_sources<'a, S: Ord>(
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
pub(super) fn live_members<S: Ord>(members: &[Member<S>]) -> Vec<&Member<S>> {
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
pub(super) struct Cursor {
    /// Where the next search starts.
    next: usize,
    /// Distance between the last two hits.
    gap: usize,
}

impl Cursor {
    pub(super) fn seek<S: Ord>(&mut self, sorted: &[&S], target: &S) -> Option<usize> {
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
pub(super) fn gallop<S: Ord>(sorted: &[&S], target: &S) -> usize {
    let mut bound = 1;
    while bound <= sorted.len() && *sorted[bound - 1] < *target {
        bound *= 2;
    }
    let low = bound / 2;
    let high = bound.min(sorted.len());
    low + sorted[low..high].partition_point(|&item| item < target)
}
