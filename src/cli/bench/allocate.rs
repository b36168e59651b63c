//! `weir bench allocate`: how long the allocation function takes for a large
//! group, and what its decision costs on the bus.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{AllocateArgs, CliError, emit};
use crate::allocation::{Allocation, AllocationInput, Member, allocate};

pub(super) fn run(args: &AllocateArgs) -> Result<(), CliError> {
    if args.subscribers == 0 || args.sources == 0 {
        return Err(CliError::Usage(
            "--subscribers and --sources must be at least 1".into(),
        ));
    }
    // One member more than the group, held back to join it later.
    let members = synthetic_input(args.subscribers + 1, args.sources);
    let group = &members[..args.subscribers];
    let no_tags = BTreeSet::new();
    let nothing = BTreeSet::new();
    let best_of = |input: &AllocationInput<'_, String>| {
        let mut best = Duration::MAX;
        let mut decision = Allocation::default();
        for _ in 0..args.rounds.max(1) {
            let started = Instant::now();
            decision = allocate(input);
            best = best.min(started.elapsed());
        }
        (best, decision)
    };

    let empty = Allocation::default();
    let (initial_time, initial) = best_of(&AllocationInput {
        members: group,
        required_tags: &no_tags,
        current: &empty,
        released: &nothing,
    });
    let wire = wire_costs(args, group, &initial)?;
    emit(json!({
        "bench": "allocate", "case": "initial", "subscribers": args.subscribers,
        "sources": args.sources, "millis": initial_time.as_secs_f64() * 1000.0,
        "encode_millis": wire["encode_millis"], "wire_bytes": wire["full_bytes"],
        "wire_parts": wire["full_parts"], "largest_part_bytes": wire["largest_part_bytes"],
    }));
    emit(wire);

    let (join_time, joined) = best_of(&AllocationInput {
        members: &members,
        required_tags: &no_tags,
        current: &initial,
        released: &nothing,
    });
    emit(json!({
        "bench": "allocate", "case": "join", "subscribers": args.subscribers + 1,
        "sources": args.sources, "millis": join_time.as_secs_f64() * 1000.0,
        "handovers": joined.handovers.len(),
    }));
    partitioned_fleet(args)
}

/// A refresh of a partitioned fleet: `--groups` groups, each of `--subscribers`
/// subscribers requesting one category split into `--partitions`; every group's
/// decision computed and encoded as the bus carries it.
fn partitioned_fleet(args: &AllocateArgs) -> Result<(), CliError> {
    use crate::bus::memory::DEFAULT_MAX_PAYLOAD;
    use crate::bus::{Decision, encode_decision_parts};
    use crate::event::{Category, Source};

    let (mut slowest, mut total, mut bytes) = (Duration::ZERO, Duration::ZERO, 0);
    let (no_tags, nothing, empty) = (BTreeSet::new(), BTreeSet::new(), Allocation::default());
    for group in 0..args.groups {
        let category = Category::new(format!("category-{group}"))
            .map_err(|e| CliError::Input(e.to_string()))?;
        let sources: Arc<BTreeSet<Source>> = Arc::new(
            Source::Category(category)
                .split(args.partitions)
                .map_err(|e| CliError::Usage(format!("--partitions: {e}")))?
                .into_iter()
                .collect(),
        );
        let members: Vec<Member<Source>> = (0..args.subscribers)
            .map(|i| {
                Member::new(
                    format!("node-{i:04}/{group}"),
                    format!("node-{i:04}"),
                    Arc::clone(&sources),
                )
            })
            .collect();
        let started = Instant::now();
        let allocation = allocate(&AllocationInput {
            members: &members,
            required_tags: &no_tags,
            current: &empty,
            released: &nothing,
        });
        let name = format!("group-{group}");
        let decision = Decision::from_allocation(&name, 1, 1, "bench-node", &allocation);
        let parts = encode_decision_parts(&decision, DEFAULT_MAX_PAYLOAD);
        let elapsed = started.elapsed();
        slowest = slowest.max(elapsed);
        total += elapsed;
        bytes += parts.iter().map(Vec::len).sum::<usize>();
    }
    emit(json!({
        "bench": "allocate", "case": "partitioned_fleet", "groups": args.groups,
        "subscribers": args.subscribers, "partitions": args.partitions,
        "slowest_decision_millis": slowest.as_secs_f64() * 1000.0,
        "all_decisions_millis": total.as_secs_f64() * 1000.0, "wire_bytes": bytes,
    }));
    Ok(())
}

/// What a decision costs on the bus, beside the encoding before it (the
/// `wire` line), for one
/// decision of `group` (whose allocation is `initial`): the whole decision, a
/// refresh and a change of one source (a source added to every member's
/// requests), as the memory and NATS buses write them at their default
/// payload limit. Encoding times are the best of `--rounds`.
fn wire_costs(
    args: &AllocateArgs,
    group: &[Member<String>],
    initial: &Allocation<String>,
) -> Result<serde_json::Value, CliError> {
    use crate::bus::chain::{Chain, Publication};
    use crate::bus::memory::DEFAULT_MAX_PAYLOAD;
    use crate::bus::{BusMessage, Digest, encode, encode_decision_parts};

    let rounds = args.rounds.max(1);
    let best = |mut work: Box<dyn FnMut() -> usize + '_>| {
        let (mut best, mut bytes) = (Duration::MAX, 0);
        for _ in 0..rounds {
            let started = Instant::now();
            bytes = work();
            best = best.min(started.elapsed());
        }
        (best.as_secs_f64() * 1000.0, bytes)
    };
    let total = |parts: Vec<Vec<u8>>| parts.iter().map(Vec::len).sum::<usize>();
    let decision = as_decision(initial, 1)?;
    let parts = encode_decision_parts(&decision, DEFAULT_MAX_PAYLOAD);
    let (encode_millis, full_bytes) = best(Box::new(|| {
        total(encode_decision_parts(&decision, DEFAULT_MAX_PAYLOAD))
    }));
    let (baseline_encode_millis, baseline_bytes) = best(Box::new(|| {
        total(super::baseline_encoding::encode_decision_parts(
            &decision,
            DEFAULT_MAX_PAYLOAD,
        ))
    }));
    let (digest_millis, refresh_bytes) = best(Box::new(|| {
        encode(&BusMessage::Digest(Digest::of(&decision))).len()
    }));

    let changed = with_one_source_more(group, initial)?;
    let chain = Chain::after(None, &decision, &Publication::Snapshot(parts.clone()));
    let (change_millis, change_bytes) = best(Box::new(|| {
        total(
            Chain::plan(Some(&chain), &changed, DEFAULT_MAX_PAYLOAD)
                .payloads()
                .to_vec(),
        )
    }));
    Ok(json!({
        "bench": "allocate", "case": "wire", "subscribers": args.subscribers,
        "sources": args.sources,
        "full_bytes": full_bytes, "full_parts": parts.len(),
        "largest_part_bytes": parts.iter().map(Vec::len).max().unwrap_or(0),
        "encode_millis": encode_millis,
        "refresh_bytes": refresh_bytes, "refresh_millis": digest_millis,
        "one_source_change_bytes": change_bytes, "one_source_change_millis": change_millis,
        // Before: a full encoding, every refresh and every change.
        "baseline_bytes": baseline_bytes, "baseline_encode_millis": baseline_encode_millis,
        "baseline_refresh_bytes": baseline_bytes, "baseline_one_source_change_bytes": baseline_bytes,
    }))
}

/// The next decision of `group` after `initial` once every member also requests
/// one source more.
fn with_one_source_more(
    group: &[Member<String>],
    initial: &Allocation<String>,
) -> Result<crate::bus::Decision, CliError> {
    let mut sources = group
        .first()
        .map(|m| (*m.sources).clone())
        .unwrap_or_default();
    sources.insert("source-added".to_owned());
    let shared = Arc::new(sources);
    let members: Vec<Member<String>> = group
        .iter()
        .map(|member| Member {
            sources: Arc::clone(&shared),
            ..member.clone()
        })
        .collect();
    let next = allocate(&AllocationInput {
        members: &members,
        required_tags: &BTreeSet::new(),
        current: initial,
        released: &BTreeSet::new(),
    });
    as_decision(&next, 2)
}

/// `allocation` as revision `revision` of a decision, its synthetic sources named
/// as streams of one category.
fn as_decision(
    allocation: &Allocation<String>,
    revision: u64,
) -> Result<crate::bus::Decision, CliError> {
    use crate::bus::Decision;
    use crate::event::Source;

    let as_source = |name: &String| -> Result<Source, CliError> {
        format!("stream:bench/{name}")
            .parse()
            .map_err(|e: crate::event::ValidationError| CliError::Input(e.to_string()))
    };
    let mut decision =
        Decision::from_allocation("bench", 1, revision, "bench-node", &Default::default());
    for (owner, sources) in &allocation.owners {
        let sources = sources.iter().map(as_source).collect::<Result<_, _>>()?;
        decision.owners.insert(owner.clone(), sources);
    }
    for (source, handover) in &allocation.handovers {
        decision
            .handovers
            .insert(as_source(source)?, handover.clone());
    }
    Ok(decision)
}

/// A group of `members` subscribers that all request the same `sources`, for
/// the benchmark. Ids are `member-00000`, `member-00001`, … and sources
/// `source-0000000`, …, so ids sort in creation order; all members share one
/// source set and carry no tags. To simulate a newcomer, build one member more
/// than needed and hold the last back.
fn synthetic_input(members: usize, sources: usize) -> Vec<Member<String>> {
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
