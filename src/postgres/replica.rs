//! Reads of events from a hot standby (`[store] read_url`).
//!
//! Reads of a source's events (log, category, partition and stream batches, their
//! heads and backlogs) go to the standby while its replay lag is at most
//! `read_max_lag`; everything else (appends, a stream's latest event for write
//! conditions, checkpoints, claims, leases, membership, admin writes) stays on the
//! primary. Past the lag, or while the standby cannot be reached, reads go to the
//! primary, with a log line each way.
//!
//! Why the gap-free rule holds there: readers read only rows whose `tx_id` is
//! below `pg_snapshot_xmin(pg_current_snapshot())`. On a standby the snapshot is
//! built from the transactions the primary had in progress as of the WAL replayed
//! so far, so its `xmin` is the oldest of those: every transaction below it has
//! committed or aborted in the replayed WAL, and nothing can commit below it
//! later. A standby lags, so it shows a prefix of what the primary shows; a cursor
//! (`tx_id`, `sequence`) means the same on both, since a physical standby keeps
//! the primary's transaction ids. `tests/it/postgres_standby.rs` checks this on
//! the PostgreSQL the tests run.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool};

use super::PostgresStore;
use super::errors::{classify, connect_failed};
use super::tls::TlsContext;
use crate::store::{Error, Result};

/// How often the standby's lag is measured while it is used.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often a standby that could not be reached is tried again.
const RETRY_UNREACHABLE: Duration = Duration::from_secs(5);
/// How long a measurement may take before the standby counts as unreachable.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The standby's replay lag: 0 when it has replayed everything it received (or
/// is not in recovery at all), else the age of the last transaction it replayed.
const LAG_SQL: &str = "SELECT CASE WHEN NOT pg_is_in_recovery() THEN 0::float8 \
     WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0::float8 \
     ELSE coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8, 0) END";

/// A standby that reads may go to.
pub(super) struct Replica {
    pub(super) pool: Pool,
    pub(super) context: TlsContext,
    pub(super) max_lag: Duration,
    state: Mutex<State>,
    /// Held by the one task measuring the lag; others use the last answer.
    checking: tokio::sync::Mutex<()>,
}

struct State {
    /// When to measure again (`None`: now).
    next_check: Option<Instant>,
    /// Whether reads go to the standby.
    in_use: bool,
}

impl Replica {
    pub(super) fn new(pool: Pool, context: TlsContext, max_lag: Duration) -> Self {
        Self {
            pool,
            context,
            max_lag,
            state: Mutex::new(State {
                next_check: None,
                in_use: true,
            }),
            checking: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether reads go to the standby now, measuring its lag when due.
    async fn in_use(&self) -> bool {
        let (due, in_use) = {
            let state = self.state.lock().expect("not poisoned");
            (
                state.next_check.is_none_or(|at| Instant::now() >= at),
                state.in_use,
            )
        };
        if !due {
            return in_use;
        }
        let Ok(_checking) = self.checking.try_lock() else {
            return in_use;
        };
        match tokio::time::timeout(CHECK_TIMEOUT, self.lag()).await {
            Ok(Ok(lag)) => {
                crate::metrics::store_replica_lag(lag);
                if lag > self.max_lag {
                    self.switch(
                        false,
                        CHECK_EVERY,
                        &format!(
                            "the standby's replay lag is {:.1}s, more than store.read_max_lag ({:.1}s)",
                            lag.as_secs_f64(),
                            self.max_lag.as_secs_f64()
                        ),
                    )
                } else {
                    self.switch(
                        true,
                        CHECK_EVERY,
                        &format!("the standby's replay lag is {:.1}s", lag.as_secs_f64()),
                    )
                }
            }
            Ok(Err(error)) => self.unreachable(&error),
            Err(_) => self.unreachable(&Error::Unavailable(format!(
                "the standby did not answer within {CHECK_TIMEOUT:?}"
            ))),
        }
    }

    async fn lag(&self) -> Result<Duration> {
        let client = self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => connect_failed(e, &self.context),
            other => Error::Unavailable(other.to_string()),
        })?;
        let seconds: f64 = client
            .query_one(LAG_SQL, &[])
            .await
            .map_err(classify)?
            .get(0);
        Ok(Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or_default())
    }

    /// Reads go to the primary until the standby answers again.
    fn unreachable(&self, error: &Error) -> bool {
        self.switch(
            false,
            RETRY_UNREACHABLE,
            &format!("the standby cannot be reached: {error}"),
        )
    }

    /// Sets where reads go, logging a change; returns whether they go to the standby.
    fn switch(&self, in_use: bool, check_again: Duration, why: &str) -> bool {
        let mut state = self.state.lock().expect("not poisoned");
        state.next_check = Some(Instant::now() + check_again);
        if state.in_use != in_use {
            if in_use {
                tracing::info!(
                    reason = why,
                    "reading events from the standby (store.read_url) again"
                );
            } else {
                tracing::warn!(
                    reason = why,
                    "reading events from the primary (store.url) instead of the standby until it is back within store.read_max_lag"
                );
            }
        }
        state.in_use = in_use;
        in_use
    }
}

impl PostgresStore {
    /// A connection for reading events: the standby's while it is in use, else
    /// the primary's. A standby that fails to give one sends reads to the primary.
    pub(super) async fn reads_connection(&self) -> Result<Object> {
        if let Some(replica) = &self.replica {
            if replica.in_use().await {
                match replica.pool.get().await {
                    Ok(client) => return Ok(client),
                    Err(deadpool_postgres::PoolError::Backend(e)) => {
                        replica.unreachable(&connect_failed(e, &replica.context));
                    }
                    Err(other) => {
                        replica.unreachable(&Error::Unavailable(other.to_string()));
                    }
                }
            }
        }
        self.connection().await
    }

    /// As `query`, on a connection for reading events.
    pub(super) async fn query_reads(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        super::health::retry(|| async {
            let client = self.reads_connection().await?;
            let statement = client.prepare_cached(sql).await.map_err(classify)?;
            client.query(&statement, params).await.map_err(classify)
        })
        .await
    }
}
