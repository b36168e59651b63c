//! Unit and property tests of [`allocate`](super::allocate): balance,
//! stickiness, determinism, eligibility and no double ownership.

use super::index::Cursor;
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

fn run(members: &[Member<Src>], current: &Allocation<Src>, released: &[Src]) -> Allocation<Src> {
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
    let live: BTreeMap<&str, &Member<Src>> = members.iter().map(|m| (m.id.as_str(), m)).collect();
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
    let mut members = uniform_group(1_001, 100_000);
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

/// A group of `members` subscribers that all request the same `sources`, for
/// tests. Ids are `member-00000`, `member-00001`, … and sources
/// `source-0000000`, …, so ids sort in creation order; all members share one
/// source set and carry no tags. To simulate a newcomer, build one member more
/// than needed and hold the last back.
pub(crate) fn uniform_group(members: usize, sources: usize) -> Vec<Member<String>> {
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
