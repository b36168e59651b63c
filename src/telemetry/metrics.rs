//! Metric names, declared once so that dashboards, alerts and code agree. Counters
//! end in `_total`, durations in `_seconds`; labels stay low-cardinality (a group or
//! an error kind, never a stream).

/// Events a consumer handed to its processor successfully. Labels: `group`.
pub const EVENTS_PROCESSED: &str = "weir_consumer_events_total";
/// Processing failures, before the error policy decides. Labels: `group`, `kind`.
pub const PROCESSING_ERRORS: &str = "weir_consumer_errors_total";
/// Events skipped under the `Continue` policy and kept as dead letters. Labels: `group`.
pub const DEAD_LETTERS: &str = "weir_dead_letters_total";
/// Checkpoint writes refused because another subscriber claimed the source; each
/// stops a consumer. Labels: `group`.
pub const FENCED_CONSUMERS: &str = "weir_consumer_fenced_total";
/// Consumers stopped by their error policy (`stop`). Labels: `group`.
pub const STOPPED_CONSUMERS: &str = "weir_consumer_stopped_total";

/// Events a sink forwarded and the destination acknowledged. Labels: `sink`
/// (`nats`, `kafka`, `stdout`).
pub const SINK_PUBLISHED: &str = "weir_sink_published_total";
/// Time from handing a batch to a sink until every event in it is acknowledged.
/// Labels: `sink`.
pub const SINK_PUBLISH_DURATION: &str = "weir_sink_publish_duration_seconds";
/// Allocation bus payloads. Labels: `kind` (`decision`, `signal`), `direction`
/// (`sent`, `received`).
pub const BUS_MESSAGES: &str = "weir_bus_messages_total";
/// Bus payloads dropped because they could not be read.
pub const BUS_INVALID_MESSAGES: &str = "weir_bus_invalid_messages_total";

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

/// Registers every metric's description with the installed recorder.
pub fn describe() {
    use ::metrics::describe_counter;
    describe_counter!(EVENTS_PROCESSED, "Events processed successfully");
    describe_counter!(PROCESSING_ERRORS, "Processing failures, by error kind");
    describe_counter!(DEAD_LETTERS, "Events skipped and kept as dead letters");
    describe_counter!(
        FENCED_CONSUMERS,
        "Consumers stopped because another subscriber claimed their source"
    );
    describe_counter!(STOPPED_CONSUMERS, "Consumers stopped by their error policy");
    describe_counter!(
        SINK_PUBLISHED,
        "Events forwarded and acknowledged by the destination"
    );
    ::metrics::describe_histogram!(
        SINK_PUBLISH_DURATION,
        ::metrics::Unit::Seconds,
        "Time until every event of a batch is acknowledged"
    );
    describe_counter!(BUS_MESSAGES, "Allocation bus payloads sent and received");
    describe_counter!(
        BUS_INVALID_MESSAGES,
        "Allocation bus payloads that could not be read"
    );
}
