//! The fault suite's bounds, each derived from the config that governs it, and
//! the measurements they are held to: repeats after a crash or an outage, how
//! soon a stricken node's sources are consumed again, how long an outage holds
//! arrivals up, and what the nodes' `/readyz` answers while a service is away.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use futures::future::join_all;

use super::{
    BATCH_SIZE, CATEGORIES, CHECKPOINT_EVERY, CHECKPOINT_INTERVAL, EVENTS_PER_APPEND, LEASE_TTL,
    MEMBER_TIMEOUT, REFRESH_INTERVAL, Timings, WRITERS,
};
use crate::common::nodes::WeirNodes;
use crate::common::reader::Delivery;

/// How long an outage may hold a category's arrivals up beyond the outage
/// itself: clients reconnecting, consumers retrying.
pub(super) const OUTAGE_RECOVERY: Duration = Duration::from_secs(2);

/// How soon the running nodes must consume again the sources of a node that
/// was killed or paused: its membership runs out, a leader (perhaps a new one,
/// once the old one's lease ran out) gives its sources to the others, and they
/// start; a second for deciding and starting.
pub(super) fn takeover_bound() -> Duration {
    MEMBER_TIMEOUT + LEASE_TTL + Duration::from_secs(1)
}

/// How soon every node must be ready again after a fault heals (the design's
/// liveness rule: member timeout + lease + two refresh intervals).
pub(super) fn ready_again_bound() -> Duration {
    MEMBER_TIMEOUT + LEASE_TTL + 2 * REFRESH_INTERVAL
}

/// Events the writers append to one source (category) per second.
fn per_source_rate(timings: &Timings) -> f64 {
    (WRITERS * EVENTS_PER_APPEND) as f64 / timings.append_every.as_secs_f64() / CATEGORIES as f64
}

/// Events a consumer that keeps up may have published past its stored
/// checkpoint when it dies: a checkpoint is stored once `checkpoint_every`
/// events or `checkpoint_interval` have passed since the last one (checked after
/// every batch and every empty read), so at most what the writers append to its
/// source in an interval, or `checkpoint_every` if fewer, plus the batch that
/// crosses the line.
pub(super) fn uncheckpointed(timings: &Timings) -> usize {
    let in_interval = (per_source_rate(timings) * CHECKPOINT_INTERVAL.as_secs_f64()).ceil();
    CHECKPOINT_EVERY.min(in_interval as usize) + BATCH_SIZE
}

/// [`uncheckpointed`] spelled out, for a report.
pub(super) fn uncheckpointed_why(timings: &Timings) -> String {
    format!(
        "min(checkpoint_every {CHECKPOINT_EVERY}, {:.1} events/s appended to a source x checkpoint_interval {CHECKPOINT_INTERVAL:?}) + a batch of {BATCH_SIZE} = {}",
        per_source_rate(timings),
        uncheckpointed(timings)
    )
}

/// For each of `categories`: how long after `from` the first event whose append
/// was sent after `from` (`sent`: their ids) arrived, `None` if none did. No
/// node that consumed a category before `from` can have read such an event by
/// then, so its arrival shows the category consumed again.
pub(super) fn consumed_again(
    log: &[Delivery],
    sent: &HashSet<String>,
    categories: &BTreeSet<String>,
    from: Instant,
) -> BTreeMap<String, Option<Duration>> {
    let mut first: BTreeMap<String, Option<Duration>> =
        categories.iter().map(|c| (c.clone(), None)).collect();
    for delivery in log.iter().filter(|d| d.at >= from && sent.contains(&d.id)) {
        if let Some(slot @ None) = first.get_mut(&delivery.category) {
            *slot = Some(delivery.at - from);
        }
    }
    first
}

/// Polls every running node's `/readyz` (all at once, every 100 ms) until each
/// has answered `code`, or `deadline` passes. For each node: how long after
/// `since` it first answered `code`, `None` if it did not by the deadline.
pub(super) async fn first_answers(
    nodes: &WeirNodes,
    code: u16,
    since: Instant,
    deadline: Instant,
) -> BTreeMap<String, Option<Duration>> {
    let mut answered: BTreeMap<String, Option<Duration>> =
        nodes.running().into_iter().map(|id| (id, None)).collect();
    loop {
        let waiting: Vec<String> = answered
            .iter()
            .filter(|(_, at)| at.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        if waiting.is_empty() {
            break;
        }
        let round = join_all(waiting.iter().map(|id| nodes.get(id, "/readyz")));
        let Ok(answers) = tokio::time::timeout_at(deadline.into(), round).await else {
            break;
        };
        for (id, answer) in waiting.iter().zip(answers) {
            if matches!(answer, Ok((got, _)) if got == code) {
                answered.insert(id.clone(), Some(since.elapsed()));
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    answered
}

/// A report line for [`first_answers`]' result, and the failure if a node did
/// not answer `code` by the deadline.
pub(super) fn judge_answers(
    answers: &BTreeMap<String, Option<Duration>>,
    code: u16,
    when: &str,
) -> (String, Option<String>) {
    let never: Vec<&str> = answers
        .iter()
        .filter(|(_, at)| at.is_none())
        .map(|(id, _)| id.as_str())
        .collect();
    let slowest = answers.values().flatten().max().copied();
    let fact = match slowest {
        Some(slowest) if never.is_empty() => {
            format!("every node answered /readyz {code} {when}, the last {slowest:.1?} in")
        }
        _ => format!("/readyz {code} {when}: {answers:?}"),
    };
    let failure = (!never.is_empty())
        .then(|| format!("{} did not answer /readyz {code} {when}", never.join(", ")));
    (fact, failure)
}
