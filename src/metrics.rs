//! Metric names, declared once so that dashboards, alerts and code agree. Counters
//! end in `_total`, durations in `_seconds`; labels stay low-cardinality (a group,
//! a role, an error kind; a source only for `log` and `category:` sources, stream
//! sources being summed per group under `source="streams"`).
//!
//! [`CATALOG`] lists every metric with its kind, help text and labels; the table in
//! docs/metrics.md and the tests read from it. [`describe`] hands the descriptions to the
//! installed recorder and [`register_node`] gives every metric a first value, so a
//! node exports all of them from its first scrape.
//!
//! This module is the lowest layer: it imports nothing of the crate and takes
//! plain labels, so that every other layer can record through it.

use std::sync::atomic::{AtomicU64, Ordering};

/// This node's role: 1 for the role it runs, 0 for the others. Labels: `role`.
pub const NODE_ROLE: &str = "weir_node_role";
/// 1 while this node holds the coordinator lease, else 0.
pub const COORDINATOR_LEADER: &str = "weir_coordinator_leader";
/// The newest coordinator epoch this node knows of: its own lease's while it leads,
/// else the newest seen on a decision. 0 until it has seen one.
pub const COORDINATOR_EPOCH: &str = "weir_coordinator_epoch";
/// Revision of the newest allocation decision this node applied or made. Labels:
/// `group`.
pub const ALLOCATION_REVISION: &str = "weir_allocation_revision";
/// Decisions that took at least one source from its owner. Counted by the leading
/// coordinator. Labels: `group`.
pub const REBALANCES: &str = "weir_rebalances_total";
/// From the decision that withdraws a source to the decision that gives it to its
/// new owner, measured by the coordinator that made both. Labels: `group`.
pub const HANDOVER_DURATION: &str = "weir_handover_duration_seconds";
/// Live subscribers of a group as the leading coordinator counts them; 0 on
/// nodes that do not lead. Labels: `group`.
pub const GROUP_SUBSCRIBERS: &str = "weir_group_subscribers";
/// Sources this node's subscribers of a group own now. Labels: `group`.
pub const SOURCES_OWNED: &str = "weir_sources_owned";
/// 1 while the group is paused by an operator (`weir groups pause`), as this
/// node's subscribers of it see it; else 0. Labels: `group`.
pub const GROUP_PAUSED: &str = "weir_group_paused";
/// Readable events after a consumer's cursor, counted up to [`LAG_COUNT_LIMIT`].
/// Labels: `group`, `source`.
pub const CONSUMER_LAG_EVENTS: &str = "weir_consumer_lag_events";
/// Age of the oldest readable event a consumer has not processed yet; 0 when it has
/// caught up. Labels: `group`, `source`.
pub const CONSUMER_LAG_SECONDS: &str = "weir_consumer_lag_seconds";
/// Events a consumer handed to its processor successfully. Labels: `group`.
pub const EVENTS_PROCESSED: &str = "weir_consumer_events_total";
/// Processing failures, before the error policy decides. Labels: `group`, `kind`.
pub const PROCESSING_ERRORS: &str = "weir_consumer_errors_total";
/// Events skipped under the `Continue` policy and kept as dead letters. Labels: `group`.
pub const DEAD_LETTERS: &str = "weir_dead_letters_total";
/// Events the group's filter kept from its processor (the checkpoint passes them).
pub const EVENTS_FILTERED: &str = "weir_events_filtered_total";
/// Events no route of the group's sink matched, left unsent (`unmatched = "skip"`).
pub const EVENTS_UNROUTED: &str = "weir_events_unrouted_total";
/// Checkpoints stored. Labels: `group`.
pub const CHECKPOINT_WRITES: &str = "weir_checkpoint_writes_total";
/// Checkpoint writes refused because another subscriber claimed the source; each
/// stops a consumer. Labels: `group`.
pub const FENCED_CONSUMERS: &str = "weir_consumer_fenced_total";
/// Consumers stopped by their error policy (`stop`). Labels: `group`.
pub const STOPPED_CONSUMERS: &str = "weir_consumer_stopped_total";
/// Source consumers of a group now waiting to try a batch again after a
/// transient failure (destination or service unavailable). Labels: `group`.
pub const CONSUMERS_RETRYING: &str = "weir_consumers_retrying";

/// Events a sink forwarded and the destination acknowledged. Labels: `sink`
/// (`nats`, `kafka`, `stdout`).
pub const SINK_PUBLISHED: &str = "weir_sink_published_total";
/// Time from handing a batch to a sink until every event in it is acknowledged.
/// Labels: `sink`.
pub const SINK_PUBLISH_DURATION: &str = "weir_sink_publish_duration_seconds";
/// Time a consumer spends on each stage of a batch: `read`, `claim_check`,
/// `process`, `checkpoint`.
pub const CONSUMER_STAGE_DURATION: &str = "weir_consumer_stage_duration_seconds";
/// From an event's append to the moment its consumer has read it.
pub const CONSUMER_PICKUP_DELAY: &str = "weir_consumer_pickup_delay_seconds";
/// Allocation bus payloads. Labels: `kind` (`decision`, `signal`), `direction`
/// (`sent`, `received`).
pub const BUS_MESSAGES: &str = "weir_bus_messages_total";
/// Bus payloads dropped because they could not be read.
pub const BUS_INVALID_MESSAGES: &str = "weir_bus_invalid_messages_total";
/// Times this node went without the coordinator's newest decision of a group
/// for longer than a refresh interval (each time makes the node not ready
/// until it holds the decision).
pub const DECISIONS_LACKED: &str = "weir_observer_decision_lacked_total";
/// How long the oldest transaction still in progress holds log and category
/// readers back (0 on the memory store).
pub const STORE_VISIBILITY_HORIZON: &str = "weir_store_visibility_horizon_seconds";
/// The replay lag of the standby that reads of events go to (`[store]
/// read_url`), as last measured; 0 without one.
pub const STORE_REPLICA_LAG: &str = "weir_store_replica_lag_seconds";
/// Lifecycle events (`$weir`) dropped unrecorded: the queue was full while the
/// store was slow or down, or the store refused them.
pub const LIFECYCLE_DROPPED: &str = "weir_lifecycle_dropped_total";
/// Always 1; the `version` label says which weir runs.
pub const BUILD_INFO: &str = "weir_build_info";
/// 1 while the node is ready (what `/readyz` answers), 0 otherwise; re-evaluated
/// every few seconds, so alerts need no probe of their own.
pub const READY: &str = "weir_ready";

/// Lag counts stop at this many events: counting further would cost a scan of
/// the backlog on every sample, and an alert needs to know only that it is large.
pub const LAG_COUNT_LIMIT: u64 = 100_000;

/// The `source` label of stream sources, which are summed per group.
pub const STREAMS_LABEL: &str = "streams";

/// Kinds of permanent failure that weir's sinks report: an event that cannot be
/// encoded, one larger than the destination accepts, one it rejects. Counted from
/// 0, so that rates and alerts on them work before the first failure.
pub const PERMANENT_ERROR_KINDS: [&str; 3] = ["encode", "too_large", "publish"];

/// The values of the `role` label of [`NODE_ROLE`].
pub const ROLES: [&str; 3] = ["coordinator", "observer", "full"];

/// What kind of value a metric holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// One metric as exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricInfo {
    pub name: &'static str,
    pub kind: MetricKind,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    /// Whether the value is a duration in seconds.
    pub seconds: bool,
}

const fn metric(
    name: &'static str,
    kind: MetricKind,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricInfo {
    MetricInfo {
        name,
        kind,
        help,
        labels,
        seconds: false,
    }
}

const fn seconds(
    name: &'static str,
    kind: MetricKind,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricInfo {
    MetricInfo {
        seconds: true,
        ..metric(name, kind, labels, help)
    }
}

use MetricKind::{Counter, Gauge, Histogram};

/// Every metric weir exports.
pub const CATALOG: &[MetricInfo] = &[
    metric(
        NODE_ROLE,
        Gauge,
        &["role"],
        "1 for the role this node runs (coordinator, observer, full), 0 for the others",
    ),
    metric(
        COORDINATOR_LEADER,
        Gauge,
        &[],
        "1 while this node holds the coordinator lease",
    ),
    metric(
        COORDINATOR_EPOCH,
        Gauge,
        &[],
        "Newest coordinator epoch this node knows of",
    ),
    metric(
        ALLOCATION_REVISION,
        Gauge,
        &["group"],
        "Revision of the newest allocation decision this node applied or made",
    ),
    metric(
        REBALANCES,
        Counter,
        &["group"],
        "Allocation decisions that took a source from its owner (counted by the leader)",
    ),
    seconds(
        HANDOVER_DURATION,
        Histogram,
        &["group"],
        "Time from withdrawing a source to giving it to its new owner (measured by the leader)",
    ),
    metric(
        GROUP_SUBSCRIBERS,
        Gauge,
        &["group"],
        "Live subscribers of the group as the leading coordinator counts them (0 elsewhere)",
    ),
    metric(
        SOURCES_OWNED,
        Gauge,
        &["group"],
        "Sources this node's subscribers of the group own",
    ),
    metric(
        GROUP_PAUSED,
        Gauge,
        &["group"],
        "1 while an operator has paused the group, else 0",
    ),
    metric(
        CONSUMER_LAG_EVENTS,
        Gauge,
        &["group", "source"],
        "Readable events after the consumer's cursor (counted up to 100000)",
    ),
    seconds(
        CONSUMER_LAG_SECONDS,
        Gauge,
        &["group", "source"],
        "Age of the oldest readable event the consumer has not processed",
    ),
    metric(
        EVENTS_PROCESSED,
        Counter,
        &["group"],
        "Events processed successfully",
    ),
    metric(
        PROCESSING_ERRORS,
        Counter,
        &["group", "kind"],
        "Processing failures, by error kind, before the error policy decides",
    ),
    metric(
        DEAD_LETTERS,
        Counter,
        &["group"],
        "Events skipped and kept as dead letters",
    ),
    metric(
        EVENTS_FILTERED,
        Counter,
        &["group"],
        "Events the group's filter kept from its processor; the checkpoint moves past them",
    ),
    metric(
        EVENTS_UNROUTED,
        Counter,
        &["group"],
        "Events no route of the group's sink matched, left unsent (unmatched = \"skip\")",
    ),
    metric(CHECKPOINT_WRITES, Counter, &["group"], "Checkpoints stored"),
    metric(
        FENCED_CONSUMERS,
        Counter,
        &["group"],
        "Consumers stopped because another subscriber claimed their source",
    ),
    metric(
        STOPPED_CONSUMERS,
        Counter,
        &["group"],
        "Consumers stopped by their error policy",
    ),
    metric(
        CONSUMERS_RETRYING,
        Gauge,
        &["group"],
        "Source consumers waiting to retry a batch after a transient failure (lag grows meanwhile)",
    ),
    metric(
        SINK_PUBLISHED,
        Counter,
        &["sink"],
        "Events forwarded and acknowledged by the destination",
    ),
    seconds(
        SINK_PUBLISH_DURATION,
        Histogram,
        &["sink"],
        "Time until every event of a batch is acknowledged",
    ),
    seconds(
        CONSUMER_STAGE_DURATION,
        Histogram,
        &["group", "stage"],
        "Time a consumer spends per batch on each stage: read, claim_check, process, checkpoint",
    ),
    seconds(
        CONSUMER_PICKUP_DELAY,
        Histogram,
        &["group"],
        "From the append of a batch's first event (its observed_at) to its consumer having read it",
    ),
    metric(
        BUS_MESSAGES,
        Counter,
        &["kind", "direction"],
        "Allocation bus payloads sent and received",
    ),
    metric(
        BUS_INVALID_MESSAGES,
        Counter,
        &[],
        "Allocation bus payloads that could not be read",
    ),
    metric(
        DECISIONS_LACKED,
        Counter,
        &["group"],
        "Times this node lacked the coordinator's newest decision of the group for longer than a refresh interval",
    ),
    seconds(
        STORE_VISIBILITY_HORIZON,
        Gauge,
        &[],
        "How long the oldest transaction in progress holds log and category readers back",
    ),
    seconds(
        STORE_REPLICA_LAG,
        Gauge,
        &[],
        "Replay lag of the standby that reads of events go to (store.read_url), as last measured",
    ),
    metric(
        LIFECYCLE_DROPPED,
        Counter,
        &[],
        "Lifecycle events dropped unrecorded (queue full while the store was slow or down)",
    ),
    metric(
        BUILD_INFO,
        Gauge,
        &["version"],
        "Always 1; the version label says which weir runs",
    ),
    metric(
        READY,
        Gauge,
        &[],
        "1 while the node is ready (/readyz answers 200), 0 otherwise",
    ),
];

/// The upper bounds of the duration histograms' buckets, in seconds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Counts one bus payload of `kind` (`decision` or `signal`) in `direction`
/// (`sent` or `received`).
pub fn bus_message(kind: &'static str, direction: &'static str) {
    ::metrics::counter!(BUS_MESSAGES, "kind" => kind, "direction" => direction).increment(1);
}

/// Records a batch of `events` that `sink` delivered in `elapsed`.
pub fn sink_batch(sink: &'static str, events: usize, elapsed: std::time::Duration) {
    ::metrics::counter!(SINK_PUBLISHED, "sink" => sink).increment(events as u64);
    ::metrics::histogram!(SINK_PUBLISH_DURATION, "sink" => sink).record(elapsed.as_secs_f64());
}

/// The stages of a consumer's batch that [`CONSUMER_STAGE_DURATION`] times.
pub const CONSUMER_STAGES: [&str; 4] = ["read", "claim_check", "process", "checkpoint"];

/// Records how long `group`'s consumer spent on `stage` (one of
/// [`CONSUMER_STAGES`]) of a batch.
pub fn consumer_stage(group: &str, stage: &'static str, elapsed: std::time::Duration) {
    ::metrics::histogram!(CONSUMER_STAGE_DURATION, "group" => group.to_owned(), "stage" => stage)
        .record(elapsed.as_secs_f64());
}

/// Records how long after its append the first event of a batch was read.
pub fn consumer_pickup(group: &str, appended: chrono::DateTime<chrono::Utc>) {
    let delay = (chrono::Utc::now() - appended).to_std().unwrap_or_default();
    ::metrics::histogram!(CONSUMER_PICKUP_DELAY, "group" => group.to_owned())
        .record(delay.as_secs_f64());
}

/// Counts one bus payload that could not be read.
pub fn bus_invalid_message() {
    ::metrics::counter!(BUS_INVALID_MESSAGES).increment(1);
}

/// Counts one time this node lacked a group's newest decision for too long.
/// Records the standby's replay lag, as just measured.
pub fn store_replica_lag(lag: std::time::Duration) {
    ::metrics::gauge!(STORE_REPLICA_LAG).set(lag.as_secs_f64());
}

pub fn decision_lacked(group: &str) {
    ::metrics::counter!(DECISIONS_LACKED, "group" => group.to_owned()).increment(1);
}

/// Notes whether this node leads, and under which epoch.
pub fn leadership(leading: bool, epoch: Option<u64>) {
    ::metrics::gauge!(COORDINATOR_LEADER).set(if leading { 1.0 } else { 0.0 });
    if let Some(epoch) = epoch {
        epoch_seen(epoch);
    }
}

/// The newest epoch seen in this process; the gauge only ever moves up.
static NEWEST_EPOCH: AtomicU64 = AtomicU64::new(0);

/// Notes a coordinator epoch seen on a lease or a decision.
pub fn epoch_seen(epoch: u64) {
    let previous = NEWEST_EPOCH.fetch_max(epoch, Ordering::Relaxed);
    if epoch > previous {
        ::metrics::gauge!(COORDINATOR_EPOCH).set(epoch as f64);
    }
}

/// Notes the newest decision of `group` this node applied or made.
pub fn decision_seen(group: &str, epoch: u64, revision: u64) {
    epoch_seen(epoch);
    ::metrics::gauge!(ALLOCATION_REVISION, "group" => group.to_owned()).set(revision as f64);
}

/// What a node knows at start about the metrics it will export.
#[derive(Debug, Clone, Default)]
pub struct NodeMetrics {
    /// The role this node runs: one of [`ROLES`].
    pub role: &'static str,
    /// Groups this node runs subscribers of, with the `source` labels of their
    /// configured sources.
    pub groups: Vec<(String, Vec<String>)>,
    /// Groups the fleet allocates (for the coordinator's metrics), usually every
    /// configured group.
    pub coordinated_groups: Vec<String>,
    /// Sink kinds this node forwards to (`stdout`, `nats`, `kafka`).
    pub sinks: Vec<&'static str>,
}

/// Gives every metric a first value, so that a fresh node exports all of them:
/// counters at 0 for the known groups, sinks and bus directions, gauges at their
/// resting value. Consumer error counters start at 0 for the permanent kinds
/// weir's own sinks report ([`PERMANENT_ERROR_KINDS`]); other kinds, a user
/// processor's, appear with their first error.
pub fn register_node(node: &NodeMetrics) {
    use ::metrics::{counter, gauge, histogram};
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!(READY).set(0.0);
    for role in ROLES {
        let value = if role == node.role { 1.0 } else { 0.0 };
        gauge!(NODE_ROLE, "role" => role).set(value);
    }
    gauge!(COORDINATOR_LEADER).set(0.0);
    gauge!(COORDINATOR_EPOCH).set(NEWEST_EPOCH.load(Ordering::Relaxed) as f64);
    for kind in ["decision", "signal"] {
        for direction in ["sent", "received"] {
            counter!(BUS_MESSAGES, "kind" => kind, "direction" => direction).increment(0);
        }
    }
    counter!(BUS_INVALID_MESSAGES).increment(0);
    counter!(LIFECYCLE_DROPPED).increment(0);
    gauge!(STORE_VISIBILITY_HORIZON).set(0.0);
    gauge!(STORE_REPLICA_LAG).set(0.0);
    for sink in &node.sinks {
        counter!(SINK_PUBLISHED, "sink" => *sink).increment(0);
        // Registering is what exports it: an empty histogram renders its buckets.
        let _registered = histogram!(SINK_PUBLISH_DURATION, "sink" => *sink);
    }
    for group in node
        .coordinated_groups
        .iter()
        .chain(node.groups.iter().map(|(group, _)| group))
    {
        let group = group.clone();
        gauge!(ALLOCATION_REVISION, "group" => group.clone()).increment(0.0);
        counter!(REBALANCES, "group" => group.clone()).increment(0);
        let _registered = histogram!(HANDOVER_DURATION, "group" => group.clone());
        gauge!(GROUP_SUBSCRIBERS, "group" => group).increment(0.0);
    }
    for (group, sources) in &node.groups {
        gauge!(SOURCES_OWNED, "group" => group.clone()).increment(0.0);
        gauge!(GROUP_PAUSED, "group" => group.clone()).increment(0.0);
        gauge!(CONSUMERS_RETRYING, "group" => group.clone()).increment(0.0);
        for name in [
            EVENTS_PROCESSED,
            EVENTS_FILTERED,
            EVENTS_UNROUTED,
            DEAD_LETTERS,
            CHECKPOINT_WRITES,
            FENCED_CONSUMERS,
            STOPPED_CONSUMERS,
            DECISIONS_LACKED,
        ] {
            counter!(name, "group" => group.clone()).increment(0);
        }
        for stage in CONSUMER_STAGES {
            let _registered =
                histogram!(CONSUMER_STAGE_DURATION, "group" => group.clone(), "stage" => stage);
        }
        let _registered = histogram!(CONSUMER_PICKUP_DELAY, "group" => group.clone());
        for kind in PERMANENT_ERROR_KINDS {
            counter!(PROCESSING_ERRORS, "group" => group.clone(), "kind" => kind).increment(0);
        }
        for source in sources {
            let labels = [("group", group.clone()), ("source", source.clone())];
            gauge!(CONSUMER_LAG_EVENTS, &labels).increment(0.0);
            gauge!(CONSUMER_LAG_SECONDS, &labels).increment(0.0);
        }
    }
}

/// Registers every metric's description with the installed recorder.
pub fn describe() {
    for info in CATALOG {
        let unit = info.seconds.then_some(::metrics::Unit::Seconds);
        match (info.kind, unit) {
            (Counter, _) => ::metrics::describe_counter!(info.name, info.help),
            (Gauge, Some(unit)) => ::metrics::describe_gauge!(info.name, unit, info.help),
            (Gauge, None) => ::metrics::describe_gauge!(info.name, info.help),
            (Histogram, Some(unit)) => ::metrics::describe_histogram!(info.name, unit, info.help),
            (Histogram, None) => ::metrics::describe_histogram!(info.name, info.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;

    #[test]
    fn names_follow_the_prometheus_conventions() {
        let mut seen = HashSet::new();
        for info in CATALOG {
            let name = info.name;
            assert!(seen.insert(name), "{name} is listed twice");
            assert!(name.starts_with("weir_"), "{name} lacks the weir_ prefix");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name} is not snake case"
            );
            assert_eq!(
                info.kind == Counter,
                name.ends_with("_total"),
                "{name}: counters, and only counters, end in _total"
            );
            assert_eq!(
                info.seconds,
                name.ends_with("_seconds"),
                "{name}: durations, and only durations, end in _seconds"
            );
            assert!(!info.help.is_empty(), "{name} has no help text");
        }
    }

    #[test]
    fn labels_stay_low_cardinality() {
        let bounded = [
            "role",
            "group",
            "source",
            "kind",
            "direction",
            "sink",
            "version",
            // One of CONSUMER_STAGES.
            "stage",
        ];
        for info in CATALOG {
            for label in info.labels {
                assert!(bounded.contains(label), "{}: label {label}", info.name);
            }
        }
    }

    #[test]
    fn a_registered_node_exports_every_metric_with_its_help() {
        let recorder = PrometheusBuilder::new()
            .set_buckets(DURATION_BUCKETS)
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            describe();
            register_node(&NodeMetrics {
                role: "observer",
                groups: vec![("billing".into(), vec!["log".into(), STREAMS_LABEL.into()])],
                coordinated_groups: vec!["billing".into()],
                sinks: vec!["stdout"],
            });
            // The one metric whose labels only a failure names.
            ::metrics::counter!(PROCESSING_ERRORS, "group" => "billing", "kind" => "timeout")
                .increment(1);
        });
        let text = handle.render();
        for info in CATALOG {
            assert!(
                text.contains(&format!("# TYPE {} {}", info.name, info.kind.as_str())),
                "{} is missing or of the wrong type:\n{text}",
                info.name
            );
            assert!(
                text.contains(&format!("# HELP {} {}", info.name, info.help)),
                "{} has no help:\n{text}",
                info.name
            );
        }
        assert!(
            text.contains(r#"weir_node_role{role="observer"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"weir_node_role{role="full"} 0"#), "{text}");
        assert!(
            text.contains(r#"weir_consumer_lag_events{group="billing",source="streams"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"weir_consumer_events_total{group="billing"} 0"#),
            "{text}"
        );
    }
}
