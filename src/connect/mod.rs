//! How weir reaches NATS and Kafka: the `[nats]` and `[kafka]` connection
//! options and the client setup that the allocation bus and the sinks share. It
//! sits below both, the way `PostgresStoreOptions` sits below everything that
//! uses the Postgres store; configuration deserialises straight into these types.

use std::time::Duration;

pub mod kafka;
#[cfg(feature = "kafka")]
pub mod kafka_client;
pub mod nats;
#[cfg(feature = "nats")]
pub mod nats_client;

pub use kafka::{KafkaOptions, is_secret_property};
pub use nats::{NatsOptions, NatsTls};

/// Why a client could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// No server answered; retrying may succeed once one does.
    #[error("{0}")]
    Unavailable(String),
    /// The settings are wrong; retrying will fail the same way.
    #[error("{0}")]
    Invalid(String),
}

impl ConnectError {
    /// Retrying may succeed (no server answered); wrong settings fail again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConnectError::Unavailable(_))
    }
}

/// How long connecting to a server may take unless the settings say otherwise.
pub(crate) fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
