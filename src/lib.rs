//! weir: a distributed event-processing runtime and streaming bridge.
//!
//! Postgres is the event store (streams, categories, one global log). A fleet of weir
//! nodes shares the work of reading it; an elected coordinator decides which subscriber
//! owns which source and publishes those decisions on a message bus; consumers read
//! events after their checkpoints and hand them to processors.
//!
//! # Layout
//!
//! The modules form layers, listed here lowest first as in `layers.txt` at the
//! crate root. A module names only modules above it in this list, so data flows
//! one way and no two modules depend on each other;
//! `tests/it/house_rules.rs` holds the code to it.
//!
//! - [`ambient`]: the wall clock, random tokens and ids, and backoff jitter,
//!   which a deterministic simulation replaces for its thread.
//! - [`metrics`]: every metric's name, kind, help and labels, and the helpers that
//!   record them; it imports nothing of the crate, so every layer can record.
//! - [`event`]: events, names, sources, cursors and write conditions; pure data.
//! - [`connect`]: how to reach NATS and Kafka (`[nats]`, `[kafka]`) and the client
//!   setup that the bus and the sinks share.
//! - [`store`]: the [`store::EventStore`] trait and the in-memory store.
//! - [`lifecycle`]: lifecycle events (leaders, members, sources, consumers,
//!   dead letters, pauses, admin writes) recorded as ordinary events in the
//!   reserved category `$weir` by the [`lifecycle::Journal`], which never holds up
//!   the work it records, and pruned past their retention.
//! - [`allocation`]: the pure allocation function (balanced, sticky,
//!   deterministic, two-step handover) and the decision types the bus carries.
//! - [`bus`]: the allocation bus: the versioned wire format of decisions and
//!   signals, the [`bus::AllocationBus`] trait, the in-process [`bus::MemoryBus`],
//!   the NATS JetStream bus (feature `nats`) and the Kafka bus (feature `kafka`).
//! - [`broker`]: who owns which source: the leadership lease with epochs,
//!   membership, the coordinator that decides while its node leads, the observer
//!   that applies decisions to local subscribers, node roles, and the two brokers:
//!   distributed (a fleet over a bus) and singleton (one process).
//! - [`consumer`]: processors, fenced checkpoints, error policies and dead letters.
//! - [`ingest`]: `[[ingest]]`, messages of Kafka topics and NATS subjects
//!   appended into the store exactly once, each Kafka partition and NATS subject
//!   filter a source allocated over the fleet.
//! - `postgres` (feature `postgres`): the Postgres adapter; every table weir keeps
//!   and all of its SQL in one folder, one file per trait of the layers above.
//! - [`sink`]: processors that forward: stdout, NATS JetStream, Kafka.
//! - [`runtime`]: the `EventRuntime` that runs one node's consumers for a broker,
//!   and the lag sampler.
//! - [`telemetry`]: the Prometheus recorder, the HTTP endpoints (`/metrics`,
//!   `/livez`, `/readyz`, `/status`), node status and logging.
//! - [`admin`]: the admin API under `/admin/`: checkpoints listed and reset,
//!   groups paused and resumed, dead letters retried and purged, the fleet's
//!   status; writes only on the leader, with a token.
//! - [`config`]: figment layering (defaults < file < `WEIR_*` env < CLI flags) and
//!   pure validation that reports every problem at once. Each section's type lives
//!   with the layer that uses it; config gathers and checks them.
//! - [`cli`]: one module per `weir` subcommand, and the wiring of a node from its
//!   configuration; `main.rs` only parses and calls it.

#![forbid(unsafe_code)]

pub mod admin;
pub mod allocation;
pub mod ambient;
pub mod broker;
pub mod bus;
pub mod cli;
pub mod config;
pub mod connect;
pub mod consumer;
pub mod event;
pub mod ingest;
pub mod lifecycle;
pub mod metrics;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod runtime;
pub mod sink;
pub mod store;
pub mod telemetry;
