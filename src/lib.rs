//! weir: a distributed event-processing runtime and streaming bridge.
//!
//! Postgres is the event store (streams, categories, one global log). A fleet of weir
//! nodes shares the work of reading it; an elected coordinator decides which subscriber
//! owns which source and publishes those decisions on a message bus; consumers read
//! events after their checkpoints and hand them to processors.
//!
//! # Layout
//!
//! Data flows down this list and never back up:
//!
//! - [`event`]: events, names, sources, cursors and write conditions; pure data.
//! - [`store`]: the [`store::EventStore`] trait, the in-memory store and the Postgres
//!   store (feature `postgres`), with its migrations.
//! - [`bus`]: the allocation bus: the versioned wire format of decisions and signals,
//!   the [`bus::AllocationBus`] trait, the in-process [`bus::MemoryBus`], the
//!   NATS JetStream bus (feature `nats`) and the Kafka bus (feature `kafka`). It
//!   borrows only the plain data types of `broker::allocation`.
//! - [`broker`]: who owns which source. The pure allocation function (balanced,
//!   sticky, deterministic, two-step handover), the leadership lease with epochs,
//!   membership, the coordinator that decides while its node leads, the observer that
//!   applies decisions to local subscribers, node roles, and the two brokers:
//!   distributed (a fleet over a bus) and singleton (one process).
//! - [`consumer`] and [`runtime`]: processors, fenced checkpoints, error policies
//!   and dead letters, and the `EventRuntime` that runs consumers for a broker.
//! - [`sink`]: processors that forward: stdout, NATS JetStream, Kafka.
//! - [`config`]: figment layering (defaults < file < `WEIR_*` env < CLI flags) and pure
//!   validation that reports every problem at once.
//! - [`telemetry`]: metric names in one catalogue, the Prometheus recorder, the
//!   lag sampler, the HTTP endpoints (`/metrics`, `/livez`, `/readyz`, `/status`)
//!   and logging. Every layer records metrics through its names.
//! - [`cli`]: one module per `weir` subcommand; `main.rs` only parses and calls it.

#![forbid(unsafe_code)]

pub mod allocation;
pub mod broker;
pub mod bus;
pub mod cli;
pub mod config;
pub mod connect;
pub mod consumer;
pub mod event;
pub mod metrics;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod runtime;
pub mod sink;
pub mod store;
pub mod telemetry;
