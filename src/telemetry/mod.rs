//! Telemetry: the names and descriptions of every metric weir records, in one
//! place. The Prometheus exporter and the HTTP endpoints arrive with their release;
//! until a recorder is installed, recording a metric costs next to nothing.

pub mod metrics;
