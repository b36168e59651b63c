//! What the coordinator records in the lifecycle journal as it decides: members
//! that joined, left or were declared dead (from the live records it decides on,
//! and the `leaving` signals), and sources assigned, released and reassigned (from
//! the difference between a group's previous and next allocation).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::allocation::Allocation;
use crate::broker::membership::MemberRecord;
use crate::bus::Signal;
use crate::event::Source;
use crate::lifecycle::{Journal, LifecycleEvent};

/// What one term has seen of each group's members, and where it records them.
pub(super) struct Members {
    journal: Journal,
    groups: BTreeMap<String, GroupMembers>,
}

#[derive(Default)]
struct GroupMembers {
    /// Live subscribers at the last decision (subscriber to node); `None` before
    /// the first of this term.
    live: Option<BTreeMap<String, String>>,
    /// Subscribers that said they are leaving.
    leaving: BTreeSet<String>,
    /// Subscribers gone from the live records without saying so, and since when:
    /// declared dead unless their `leaving` signal turns up within a grace (it is
    /// sent just after the record is removed).
    vanished: BTreeMap<String, (String, Instant)>,
}

impl Members {
    pub(super) fn new(journal: Journal) -> Self {
        Self {
            journal,
            groups: BTreeMap::new(),
        }
    }

    /// Notes a `leaving` signal: the subscriber's departure counts as a leave.
    pub(super) fn note(&mut self, signal: &Signal) {
        let journal = &self.journal;
        let Signal::Leaving {
            group, subscriber, ..
        } = signal
        else {
            return;
        };
        let Some(members) = self.groups.get_mut(group) else {
            return;
        };
        if let Some((node, _)) = members.vanished.remove(subscriber) {
            journal.record(left(group, subscriber, node));
        } else if members
            .live
            .as_ref()
            .is_some_and(|live| live.contains_key(subscriber))
        {
            members.leaving.insert(subscriber.clone());
        }
    }

    /// Records who joined, left or died in `group`, given its live `records` now.
    /// The first look of a term at a group that already had a decision only
    /// takes note: its members joined under an earlier leader.
    pub(super) fn decided(
        &mut self,
        group: &str,
        records: &[MemberRecord],
        had_decision: bool,
        grace: Duration,
    ) {
        let journal = &self.journal;
        if !journal.is_enabled() {
            return;
        }
        let now = Instant::now();
        let members = self.groups.entry(group.to_owned()).or_default();
        let live: BTreeMap<String, String> = records
            .iter()
            .map(|r| (r.subscriber.clone(), r.node.clone()))
            .collect();
        let before = match members.live.take() {
            Some(before) => before,
            None if had_decision => live.clone(),
            None => BTreeMap::new(),
        };
        for (subscriber, node) in &live {
            let back = members.vanished.remove(subscriber).is_some();
            if !before.contains_key(subscriber) && !back {
                members.leaving.remove(subscriber);
                journal.record(LifecycleEvent::MemberJoined {
                    group: group.to_owned(),
                    subscriber: subscriber.clone(),
                    node: node.clone(),
                });
            }
        }
        for (subscriber, node) in before {
            if live.contains_key(&subscriber) {
                continue;
            }
            if members.leaving.remove(&subscriber) {
                journal.record(left(group, &subscriber, node));
            } else {
                members.vanished.insert(subscriber, (node, now));
            }
        }
        members.vanished.retain(|subscriber, (node, since)| {
            let dead = now.duration_since(*since) >= grace;
            if dead {
                journal.record(LifecycleEvent::MemberDeclaredDead {
                    group: group.to_owned(),
                    subscriber: subscriber.clone(),
                    node: node.clone(),
                });
            }
            !dead
        });
        members.live = Some(live);
    }
}

fn left(group: &str, subscriber: &str, node: String) -> LifecycleEvent {
    LifecycleEvent::MemberLeft {
        group: group.to_owned(),
        subscriber: subscriber.to_owned(),
        node,
    }
}

/// Records every source whose owner differs between `current` and `next`: given
/// to a subscriber (assigned, or reassigned when it comes from another), or taken
/// from one (released, to whoever the handover names).
pub(super) fn record_moves(
    journal: &Journal,
    group: &str,
    current: &Allocation<Source>,
    next: &Allocation<Source>,
) {
    if !journal.is_enabled() {
        return;
    }
    let sources: BTreeSet<&Source> = [current, next]
        .into_iter()
        .flat_map(|allocation| {
            allocation
                .owners
                .values()
                .flatten()
                .chain(allocation.handovers.keys())
        })
        .collect();
    for source in sources {
        let (before, after) = (current.owner_of(source), next.owner_of(source));
        if before == after {
            continue;
        }
        let (group, source) = (group.to_owned(), source.clone());
        let handed_from = current.handovers.get(&source).map(|h| h.from.as_str());
        let event = match (before.or(handed_from), after) {
            (Some(from), Some(to)) if from != to => LifecycleEvent::SourceReassigned {
                group,
                source,
                from: from.to_owned(),
                to: to.to_owned(),
            },
            (_, Some(to)) => LifecycleEvent::SourceAssigned {
                group,
                source,
                subscriber: to.to_owned(),
            },
            (_, None) => match before {
                Some(from) => LifecycleEvent::SourceReleased {
                    to: next.handovers.get(&source).map(|h| h.to.clone()),
                    group,
                    source,
                    subscriber: from.to_owned(),
                },
                // A handover that changed its destination: nobody owns it yet.
                None => continue,
            },
        };
        journal.record(event);
    }
}

/// Records that `node` leads under `epoch`, or (with `end`) no longer does.
pub(super) fn leadership(journal: &Journal, node: &str, epoch: u64, end: Option<&super::TermEnd>) {
    let node = node.to_owned();
    journal.record(match end {
        None => LifecycleEvent::LeaderElected { node, epoch },
        Some(end) => LifecycleEvent::LeaderDeposed {
            node,
            epoch,
            reason: match end {
                super::TermEnd::Cancelled => "stopped",
                super::TermEnd::Deposed => "lease lost",
            }
            .to_owned(),
        },
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::allocation::Handover;
    use crate::event::Cursor;
    use crate::lifecycle::{CATEGORY, LifecycleSettings};
    use crate::store::{EventStore, MemoryStore};

    fn source() -> Source {
        "category:orders".parse().unwrap()
    }

    fn record(subscriber: &str) -> MemberRecord {
        MemberRecord {
            group: "g".into(),
            subscriber: subscriber.into(),
            node: format!("node-{subscriber}"),
            sources: [source()].into(),
            tags: BTreeSet::new(),
            heartbeat_at: crate::ambient::now(),
        }
    }

    fn owned_by(subscriber: &str) -> Allocation<Source> {
        Allocation {
            owners: [(subscriber.to_owned(), [source()].into())].into(),
            handovers: BTreeMap::new(),
        }
    }

    /// Runs `script` against a journal on a memory store; returns the event
    /// names and payloads it recorded.
    async fn recorded(script: impl FnOnce(&Journal)) -> Vec<(String, serde_json::Value)> {
        let store = Arc::new(MemoryStore::new());
        let (journal, task) = Journal::start(store.clone(), "n", &LifecycleSettings::default());
        script(&journal);
        task.stop().await;
        let all: Source = format!("category:{CATEGORY}").parse().unwrap();
        let events = store.read(&all, Cursor::START, 100).await.unwrap();
        events
            .into_iter()
            .map(|e| (e.name.to_string(), e.payload))
            .collect()
    }

    #[tokio::test]
    async fn a_handover_is_a_release_then_a_reassignment() {
        let handing_over = Allocation {
            owners: BTreeMap::new(),
            handovers: [(
                source(),
                Handover {
                    from: "a".into(),
                    to: "b".into(),
                },
            )]
            .into(),
        };
        let events = recorded(|journal| {
            record_moves(journal, "g", &Allocation::default(), &owned_by("a"));
            record_moves(journal, "g", &owned_by("a"), &handing_over);
            record_moves(journal, "g", &handing_over, &owned_by("b"));
            record_moves(journal, "g", &owned_by("b"), &owned_by("b"));
        })
        .await;
        let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            ["SourceAssigned", "SourceReleased", "SourceReassigned"]
        );
        assert_eq!(events[1].1["to"], "b");
        assert_eq!(
            (&events[2].1["from"], &events[2].1["to"]),
            (&"a".into(), &"b".into())
        );
    }

    #[tokio::test]
    async fn members_that_vanish_silently_are_declared_dead_and_those_that_said_so_left() {
        let events = recorded(|journal| {
            let mut members = Members::new(journal.clone());
            let grace = Duration::ZERO;
            members.decided("g", &[record("a"), record("b")], false, grace);
            members.note(&Signal::Leaving {
                group: "g".into(),
                subscriber: "a".into(),
                node: "node-a".into(),
            });
            members.decided("g", &[], false, grace);
            // A new term looking at a group that has a decision only takes note.
            let mut next_term = Members::new(journal.clone());
            next_term.decided("g", &[record("c")], true, grace);
        })
        .await;
        let seen: Vec<(String, String)> = events
            .iter()
            .map(|(name, payload)| (name.clone(), payload["subscriber"].to_string()))
            .collect();
        let expected = [
            ("MemberJoined", "\"a\""),
            ("MemberJoined", "\"b\""),
            ("MemberLeft", "\"a\""),
            ("MemberDeclaredDead", "\"b\""),
        ]
        .map(|(name, subscriber)| (name.to_owned(), subscriber.to_owned()));
        assert_eq!(seen, expected);
    }
}
