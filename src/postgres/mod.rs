//! The Postgres adapter: every table weir keeps in Postgres, with all of its SQL,
//! in this one folder beside the migrations that create the tables. Each file
//! implements one trait of a layer below:
//!
//! | file | trait | table |
//! |---|---|---|
//! | `events.rs` | [`EventStore`](crate::store::EventStore) | `weir_events`, `weir_streams` |
//! | `leases.rs` | [`LeaseStore`](crate::broker::lease::LeaseStore) | `weir_leases` |
//! | `members.rs` | [`MembershipStore`](crate::broker::membership::MembershipStore) | `weir_members` |
//! | `checkpoints.rs` | [`CheckpointStore`](crate::consumer::checkpoint::CheckpointStore) | `weir_checkpoints` |
//! | `dead_letters.rs` | [`DeadLetterStore`](crate::consumer::dead_letter::DeadLetterStore) | `weir_dead_letters` |
//! | `fleet.rs` | [`FleetStore`](crate::broker::control::FleetStore) | `weir_groups`, `weir_nodes` |
//! | `ingest.rs` | [`IngestStore`](crate::ingest::IngestStore) | `weir_ingest_positions` (and `weir_events`, `weir_checkpoints`) |
//!
//! `migrations/*.sql` create and upgrade them (`weir migrate`); `announcer.rs` and
//! `listener.rs` send and receive the `NOTIFY` that wakes readers after an append;
//! `tls.rs` reads `sslmode` and `[store.tls]` and builds the TLS connector every
//! connection uses, `errors.rs` maps driver errors onto the store's;
//! `prune.rs` deletes old events of weir's reserved categories (`$weir`).
//! All of them share one connection pool, the [`PostgresStore`]'s.

mod announcer;
mod checkpoints;
mod dead_letters;
mod errors;
mod events;
mod fleet;
mod health;
mod ingest;
mod leases;
mod listener;
mod members;
mod migrations;
mod partitions;
mod prune;
mod replica;
pub mod tls;
mod xid8;

pub use checkpoints::PostgresCheckpointStore;
pub use dead_letters::PostgresDeadLetterStore;
pub(crate) use errors::classify;
pub(crate) use events::quote_identifier;
pub use events::{PostgresStore, PostgresStoreOptions};
pub use fleet::PostgresFleetStore;
pub use ingest::PostgresIngestStore;
pub use leases::PostgresLeaseStore;
pub use members::PostgresMembershipStore;
pub use migrations::{CURRENT_VERSION, MigrationReport};
pub use tls::{PostgresTls, SslMode};
