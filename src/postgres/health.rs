//! Whether the store can open new connections. A node whose Postgres refuses
//! them (too many clients, a TLS or password problem, the server down) reports
//! it once, as a warning naming the cause, stays not ready (`/readyz` gives the
//! reason) while it lasts, and says when connections work again, instead of a
//! warning from every caller's every attempt.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, PoolError};

use super::PostgresStore;
use super::errors::connect_failed;
use crate::store::{Error, Result};

/// How long a check's own new connection may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The state of new connections: failing since when, why, and how often.
#[derive(Default)]
pub(super) struct ConnectHealth {
    failing: Mutex<Option<Failing>>,
}

struct Failing {
    since: Instant,
    reason: String,
    attempts: u64,
}

impl ConnectHealth {
    /// Records a failed attempt to open a connection; the first of a run is
    /// logged as a warning, later ones at debug.
    fn failed(&self, error: &Error) {
        let reason = error.to_string();
        let mut failing = self.failing.lock().expect("not poisoned");
        match failing.as_mut() {
            Some(state) => {
                state.attempts += 1;
                tracing::debug!(error = %reason, attempts = state.attempts, "still cannot open a connection to the event store");
                state.reason = reason;
            }
            None => {
                tracing::warn!(
                    error = %reason,
                    "cannot open a connection to the event store; the node reports not ready until one opens, and logs this again only when it changes"
                );
                *failing = Some(Failing {
                    since: Instant::now(),
                    reason,
                    attempts: 1,
                });
            }
        }
    }

    /// Records a connection opened; ends a run of failures.
    fn opened(&self) {
        let mut failing = self.failing.lock().expect("not poisoned");
        if let Some(state) = failing.take() {
            tracing::info!(
                after = ?state.since.elapsed(),
                failed_attempts = state.attempts,
                "connections to the event store open again"
            );
        }
    }

    /// Why new connections fail, while they do.
    fn failing(&self) -> Option<String> {
        let failing = self.failing.lock().expect("not poisoned");
        failing.as_ref().map(|state| {
            format!(
                "cannot open a new connection to the event store for {}s ({} attempts): {}",
                state.since.elapsed().as_secs(),
                state.attempts,
                state.reason
            )
        })
    }
}

impl PostgresStore {
    /// One attempt at a pooled connection. A new connection's failure or success
    /// is recorded (see the module docs); reusing an idle one says nothing about
    /// whether new ones open.
    pub(super) async fn connection(&self) -> Result<Object> {
        match self.pool.get().await {
            Ok(client) => {
                if Object::metrics(&client).recycle_count == 0 {
                    self.health.opened();
                }
                Ok(client)
            }
            Err(PoolError::Backend(e)) => {
                let error = connect_failed(e, &self.tls_context);
                self.health.failed(&error);
                Err(error)
            }
            Err(other) => Err(Error::Unavailable(other.to_string())),
        }
    }

    /// Fails while new connections fail: then it opens one of its own, outside
    /// the pool, to learn whether they work again. For readiness.
    pub(super) async fn check_new_connections(&self) -> Result<()> {
        if self.health.failing().is_none() {
            return Ok(());
        }
        let attempt = tokio::time::timeout(CHECK_TIMEOUT, self.pg_config.connect(self.tls.clone()));
        match attempt.await {
            Ok(Ok((client, connection))) => {
                drop(client);
                // Closes the connection: with its client gone, it ends at once.
                let _ = tokio::time::timeout(CHECK_TIMEOUT, connection).await;
                self.health.opened();
                Ok(())
            }
            Ok(Err(e)) => {
                self.health.failed(&connect_failed(e, &self.tls_context));
                Err(Error::Unavailable(
                    self.health.failing().unwrap_or_default(),
                ))
            }
            Err(_) => Err(Error::Unavailable(
                self.health.failing().unwrap_or_default(),
            )),
        }
    }
}
