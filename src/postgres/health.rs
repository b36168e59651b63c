//! Whether the store can open new connections. A node whose Postgres refuses
//! them (too many clients, a TLS or password problem, the server down) reports
//! it once, as a warning naming the cause, stays not ready (`/readyz` gives the
//! reason) while it lasts, and says when connections work again, instead of a
//! warning from every caller's every attempt. Also the pools' construction and
//! the retries of a failed connection.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use postgres_openssl::MakeTlsConnector;

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

/// Retries of an operation whose connection failed, with doubling backoff: about
/// three seconds in all before the error reaches the caller.
const RETRY_ATTEMPTS: u32 = 6;
const RETRY_FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A pool of connections to the server of `config`, as `options` say.
pub(super) fn build_pool(
    config: &tokio_postgres::Config,
    connector: &MakeTlsConnector,
    options: &super::PostgresStoreOptions,
) -> Result<Pool> {
    let manager = Manager::from_config(
        config.clone(),
        connector.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(options.pool_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(options.connect_timeout))
        .create_timeout(Some(options.connect_timeout))
        .recycle_timeout(Some(options.connect_timeout))
        .build()
        .map_err(|e| Error::Backend(format!("cannot build the connection pool: {e}")))
}

/// Runs `op` until it succeeds, fails with a non-retryable error, or the attempts run out.
pub(super) async fn retry<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = RETRY_FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match op().await {
            Err(error) if error.is_retryable() && attempt < RETRY_ATTEMPTS => {
                // At debug: a connection that cannot be opened is logged once
                // as a warning (health.rs), and the caller gets the last error.
                tracing::debug!(%error, attempt, "event store unavailable, retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}
