//! Every integration test of weir, in one test binary: each module was a test
//! binary of its own, and each of those linked all of weir and librdkafka, which
//! made a cold test build spend minutes linking. A test keeps its module path, so
//! `cargo test --test it fault_suite` runs the fault suite and `cargo test --test
//! it nats::bus::` the NATS bus tests.
//!
//! The tests share one process: a test that sets up what is global to a
//! process (the metrics recorder) runs in a process of its own
//! ([`common::alone`]), and the suites that run fleets of `weir` processes take
//! turns ([`common::heavy_turn`]).

// First, so that its macros (`on_every_backend!`, `bus_suite!`) are in scope below.
#[macro_use]
mod common;

mod admin;
mod broker_roles;
mod broker_scenarios;
mod broker_stores;
mod bus;
mod cli;
mod consumer_edges;
mod consumer_scenarios;
mod consumer_stores;
mod dead_letter_retry;
mod deploy_files;
mod docs;
mod e2e_bridge;
#[cfg(all(feature = "postgres", feature = "nats", feature = "kafka"))]
mod fault_suite;
mod house_rules;
#[cfg(all(feature = "postgres", feature = "nats"))]
mod ingest;
#[cfg(feature = "kafka")]
mod kafka;
mod lifecycle;
mod nats;
mod observability;
mod operate;
#[cfg(feature = "postgres")]
mod postgres_connections;
#[cfg(feature = "postgres")]
mod postgres_standby;
mod postgres_store;
#[cfg(feature = "postgres")]
mod postgres_tls;
mod prometheus;
mod read_ahead;
#[cfg(any(feature = "nats", feature = "kafka"))]
mod routes;
mod runtime;
mod shutdown;
mod simulation;
mod store_conformance;
