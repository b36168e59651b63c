//! Lifecycle events: what happens to the fleet (leaders elected and deposed,
//! members joining, leaving and dying, sources moving, consumers fenced or
//! failing, dead letters, pauses, admin writes), recorded as ordinary events in
//! the reserved category [`CATEGORY`] (`$weir`): one stream per group
//! (`group-NAME`) and one for the fleet ([`FLEET_STREAM`]).
//!
//! They are read like any category (`weir read --source 'category:$weir'`) and consumed by
//! subscriptions to `category:$weir`; the `log` leaves reserved categories out,
//! so that a `log` subscription never forwards weir's records of its own work back
//! into it. [`Journal`] records them without ever holding up or failing the work
//! they describe, and prunes them past `[lifecycle] retention`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::event::{Category, EventName, Source, StoredEvent, StreamName};

mod journal;

pub use journal::{Journal, JournalTask, LifecycleReaders, QUEUE_CAPACITY, prune};

/// The reserved category lifecycle events are recorded in.
pub const CATEGORY: &str = "$weir";

/// The stream of events that concern no one group: leadership, and admin writes
/// to the fleet as a whole.
pub const FLEET_STREAM: &str = "fleet";

/// The stream of one group's events: `group-NAME`, so that no group name can
/// meet [`FLEET_STREAM`].
pub fn group_stream(group: &str) -> String {
    format!("group-{group}")
}

/// One thing that happened to the fleet. The variant's name is the event's name,
/// its fields the event's payload (JSON object), e.g. `LeaderElected`
/// `{"node": "node-1@3f2a", "epoch": 7}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LifecycleEvent {
    /// `node` (an incarnation, `node-id@token`) became coordinator under `epoch`.
    LeaderElected {
        node: String,
        epoch: u64,
    },
    /// `node` stopped coordinating under `epoch`: `reason` is `lease lost` or
    /// `stopped`.
    LeaderDeposed {
        node: String,
        epoch: u64,
        reason: String,
    },
    /// A subscriber of `group` on `node` counts as live (registered, heartbeating).
    MemberJoined {
        group: String,
        subscriber: String,
        node: String,
    },
    /// A subscriber left the group on purpose (its node stopped cleanly).
    MemberLeft {
        group: String,
        subscriber: String,
        node: String,
    },
    /// A subscriber missed its heartbeats for the member timeout.
    MemberDeclaredDead {
        group: String,
        subscriber: String,
        node: String,
    },
    /// `source` was given to `subscriber`, which did not take it from anyone.
    SourceAssigned {
        group: String,
        source: Source,
        subscriber: String,
    },
    /// `source` was taken from `subscriber`; `to` is who gets it once released
    /// (the first step of a handover), or nobody yet.
    SourceReleased {
        group: String,
        source: Source,
        subscriber: String,
        to: Option<String>,
    },
    /// `source` reached `to`, coming from `from` (the last step of a handover, or
    /// straight from a dead owner).
    SourceReassigned {
        group: String,
        source: Source,
        from: String,
        to: String,
    },
    /// A consumer stopped because another subscriber claimed its source.
    ConsumerFenced {
        group: String,
        source: Source,
        subscriber: String,
        reason: String,
    },
    /// A consumer was stopped by its error policy.
    ConsumerErrored {
        group: String,
        source: Source,
        subscriber: String,
        reason: String,
    },
    /// An event was skipped and kept as dead letter `dead_letter` (its id in
    /// `weir dead-letters list`), for an error of `kind`.
    DeadLetterRecorded {
        group: String,
        source: Source,
        event_id: Uuid,
        dead_letter: u64,
        kind: String,
    },
    /// A group was paused (`by`: the admin token's name, if an admin did it).
    GroupPaused {
        group: String,
        by: Option<String>,
    },
    GroupResumed {
        group: String,
        by: Option<String>,
    },
    /// An admin write: `what` was asked (e.g. `checkpoints reset --group g
    /// --to-start`), by the token named `token`, as a dry run or not, and how it
    /// ended (`outcome`: `done`, or what went wrong). `group` if it concerns one.
    /// A reset is recorded twice: `started` before its work, then its outcome.
    AdminWrite {
        what: String,
        group: Option<String>,
        token: Option<String>,
        dry_run: bool,
        outcome: String,
        /// The request's id (resets): its `started` record and its outcome's
        /// share it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        /// What the write aimed at: where a reset moves checkpoints (`start`,
        /// `end`, `time T`, `cursor C`), which dead letters (`all`, `ids ...`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
        /// The sources it concerns (a reset's checkpoints).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        sources: Vec<String>,
        /// What it did, counted: checkpoints, replayed and skipped events of a
        /// reset; chosen, retried, failed, removed ... dead letters.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        counts: BTreeMap<String, u64>,
    },
}

impl LifecycleEvent {
    /// The group this event concerns, if one: its stream is that group's.
    pub fn group(&self) -> Option<&str> {
        use LifecycleEvent as E;
        match self {
            E::LeaderElected { .. } | E::LeaderDeposed { .. } => None,
            E::AdminWrite { group, .. } => group.as_deref(),
            E::MemberJoined { group, .. }
            | E::MemberLeft { group, .. }
            | E::MemberDeclaredDead { group, .. }
            | E::SourceAssigned { group, .. }
            | E::SourceReleased { group, .. }
            | E::SourceReassigned { group, .. }
            | E::ConsumerFenced { group, .. }
            | E::ConsumerErrored { group, .. }
            | E::DeadLetterRecorded { group, .. }
            | E::GroupPaused { group, .. }
            | E::GroupResumed { group, .. } => Some(group),
        }
    }

    /// The stream it is recorded in: its group's, or [`FLEET_STREAM`].
    pub fn stream(&self) -> String {
        self.group()
            .map_or_else(|| FLEET_STREAM.to_owned(), group_stream)
    }

    /// The event's name and payload.
    pub fn to_parts(&self) -> (String, Value) {
        // Serialized externally tagged: `{"Name": {fields}}`.
        match serde_json::to_value(self) {
            Ok(Value::Object(tagged)) => tagged
                .into_iter()
                .next()
                .unwrap_or_else(|| ("Unknown".to_owned(), Value::Null)),
            // Unit variants and failures cannot happen with these plain fields.
            _ => ("Unknown".to_owned(), Value::Null),
        }
    }

    /// The lifecycle event a stored event of [`CATEGORY`] holds, if it is one.
    pub fn from_stored(event: &StoredEvent) -> Option<Self> {
        if event.category.as_str() != CATEGORY {
            return None;
        }
        let mut tagged = serde_json::Map::new();
        tagged.insert(event.name.as_str().to_owned(), event.payload.clone());
        serde_json::from_value(Value::Object(tagged)).ok()
    }
}

/// The reserved category, as a [`Category`].
pub fn category() -> Category {
    // A constant that validation accepts: non-empty, short, no '/' or control.
    Category::new(CATEGORY).unwrap_or_else(|_| unreachable!("{CATEGORY} is a valid category"))
}

pub(crate) fn event_name(name: &str) -> Option<EventName> {
    EventName::new(name).ok()
}

pub(crate) fn stream_name(name: &str) -> Option<StreamName> {
    StreamName::new(name).ok()
}

/// `[lifecycle]`: whether lifecycle events are recorded, and how long they are
/// kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleSettings {
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Events older than this are deleted (each stream keeps its last one).
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
}

fn default_enabled() -> bool {
    true
}

/// A week: long enough to look into last weekend's incident.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

fn default_retention() -> Duration {
    DEFAULT_RETENTION
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            retention: default_retention(),
        }
    }
}

/// Retention shorter than this would prune events before anyone could read them.
pub const MIN_RETENTION: Duration = Duration::from_secs(60);

impl LifecycleSettings {
    /// Every problem, as (key, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.retention < MIN_RETENTION {
            problems.push((
                "retention".to_owned(),
                format!(
                    "{} is too short: keep lifecycle events at least 1m (the default is 7d)",
                    humantime::format_duration(self.retention)
                ),
            ));
        }
        problems
    }

    /// How often each node prunes: a tenth of the retention, between a minute and
    /// an hour. Every node prunes; a prune that finds nothing costs one index probe.
    pub fn prune_interval(&self) -> Duration {
        (self.retention / 10).clamp(MIN_RETENTION, Duration::from_secs(3600))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_name_their_stream_and_round_trip_through_the_store_form() {
        let elected = LifecycleEvent::LeaderElected {
            node: "n1@a".into(),
            epoch: 3,
        };
        assert_eq!(elected.stream(), "fleet");
        let (name, payload) = elected.to_parts();
        assert_eq!(name, "LeaderElected");
        assert_eq!(payload, serde_json::json!({"node": "n1@a", "epoch": 3}));

        let assigned = LifecycleEvent::SourceAssigned {
            group: "fleet".into(),
            source: "category:orders".parse().unwrap(),
            subscriber: "n1/1".into(),
        };
        // A group may be called `fleet` without sharing the fleet's stream.
        assert_eq!(assigned.stream(), "group-fleet");
        let (name, payload) = assigned.to_parts();
        assert_eq!(payload["source"], "category:orders");
        let stored = StoredEvent {
            id: crate::ambient::event_id(),
            name: EventName::new(name).unwrap(),
            category: category(),
            stream: StreamName::new(assigned.stream()).unwrap(),
            position: 0,
            sequence: 1,
            payload,
            metadata: Value::Null,
            occurred_at: crate::ambient::now(),
            observed_at: crate::ambient::now(),
            idempotency_key: None,
            cursor: crate::event::Cursor::new(1, 1),
        };
        assert_eq!(LifecycleEvent::from_stored(&stored), Some(assigned));
    }

    #[test]
    fn retention_below_a_minute_is_refused() {
        let settings = LifecycleSettings {
            retention: Duration::from_secs(5),
            ..LifecycleSettings::default()
        };
        let problems = settings.validate();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "retention");
        assert!(LifecycleSettings::default().validate().is_empty());
        assert_eq!(
            LifecycleSettings::default().prune_interval(),
            Duration::from_secs(3600)
        );
    }
}
