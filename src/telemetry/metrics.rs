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
}
