//! Sinks: processors that forward events elsewhere. [`stdout`] prints them; the
//! NATS and Kafka sinks arrive with their release.

pub mod stdout;

pub use stdout::StdoutSink;
