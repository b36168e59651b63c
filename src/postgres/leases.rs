//! `PostgresLeaseStore`: leadership leases in the `weir_leases` table, every
//! expiry compared on the database clock.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{PostgresStore, classify, quote_identifier};
use crate::broker::lease::{Lease, LeaseStore, Result, check_ttl};
use crate::store::Error;

/// Leases in the `weir_leases` table of a Postgres store's schema.
///
/// Every operation is one statement, and every expiry is compared on the database
/// clock with `clock_timestamp()`: `now()` is the transaction's start, which for a
/// statement that waited on a row lock is earlier than the moment it decides, and
/// would let a renewal extend a lease that had already expired while it waited.
pub struct PostgresLeaseStore {
    store: Arc<PostgresStore>,
    sql: Sql,
}

struct Sql {
    acquire: String,
    renew: String,
    release: String,
    current: String,
    raise: String,
}

impl PostgresLeaseStore {
    pub fn new(store: Arc<PostgresStore>) -> Self {
        let table = format!("{}.weir_leases", quote_identifier(store.schema()));
        let sql = Sql {
            // On conflict, the row is locked and re-read before the WHERE is
            // evaluated, so of racing acquirers exactly one sees the lease free.
            acquire: format!(
                "INSERT INTO {table} AS l (name, holder, epoch, expires_at) \
                 VALUES ($1, $2, 1, clock_timestamp() + $3::bigint * interval '1 microsecond') \
                 ON CONFLICT (name) DO UPDATE SET \
                   holder = EXCLUDED.holder, \
                   epoch = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > clock_timestamp() \
                                THEN l.epoch ELSE l.epoch + 1 END, \
                   expires_at = clock_timestamp() + $3::bigint * interval '1 microsecond' \
                 WHERE l.holder = EXCLUDED.holder OR l.expires_at <= clock_timestamp() \
                 RETURNING name, holder, epoch, expires_at"
            ),
            renew: format!(
                "UPDATE {table} SET expires_at = clock_timestamp() + $4::bigint * interval '1 microsecond' \
                 WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp() \
                 RETURNING name, holder, epoch, expires_at"
            ),
            release: format!(
                "UPDATE {table} SET expires_at = clock_timestamp() \
                 WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp()"
            ),
            current: format!("SELECT name, holder, epoch, expires_at FROM {table} WHERE name = $1"),
            raise: format!(
                "UPDATE {table} SET epoch = GREATEST(epoch, $4::bigint), \
                   expires_at = clock_timestamp() + $5::bigint * interval '1 microsecond' \
                 WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp() \
                 RETURNING name, holder, epoch, expires_at"
            ),
        };
        Self { store, sql }
    }

    /// The lease's caller tries again anyway (the next acquire or renew), so a
    /// statement is sent once.
    async fn query_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        Ok(self.store.query_once(sql, params).await?.into_iter().next())
    }
}

fn micros(ttl: Duration) -> i64 {
    // check_ttl bounds ttl far below i64::MAX microseconds.
    i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)
}

fn epoch_param(epoch: u64) -> i64 {
    // An epoch beyond i64::MAX was never stored, so it matches no row.
    i64::try_from(epoch).unwrap_or(-1)
}

fn lease(row: &Row) -> Result<Lease> {
    let epoch: i64 = row.try_get(2).map_err(classify)?;
    Ok(Lease {
        name: row.try_get(0).map_err(classify)?,
        holder: row.try_get(1).map_err(classify)?,
        epoch: u64::try_from(epoch)
            .map_err(|_| Error::Backend(format!("weir_leases holds a negative epoch {epoch}")))?,
        expires_at: row.try_get::<_, DateTime<Utc>>(3).map_err(classify)?,
    })
}

#[async_trait]
impl LeaseStore for PostgresLeaseStore {
    async fn try_acquire(&self, name: &str, node: &str, ttl: Duration) -> Result<Option<Lease>> {
        check_ttl(ttl)?;
        self.query_opt(&self.sql.acquire, &[&name, &node, &micros(ttl)])
            .await?
            .as_ref()
            .map(lease)
            .transpose()
    }

    async fn renew(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        check_ttl(ttl)?;
        self.query_opt(
            &self.sql.renew,
            &[&name, &node, &epoch_param(epoch), &micros(ttl)],
        )
        .await?
        .as_ref()
        .map(lease)
        .transpose()
    }

    async fn release(&self, name: &str, node: &str, epoch: u64) -> Result<()> {
        self.query_opt(&self.sql.release, &[&name, &node, &epoch_param(epoch)])
            .await?;
        Ok(())
    }

    async fn current(&self, name: &str) -> Result<Option<Lease>> {
        self.query_opt(&self.sql.current, &[&name])
            .await?
            .as_ref()
            .map(lease)
            .transpose()
    }

    async fn raise_epoch(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        at_least: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        check_ttl(ttl)?;
        // The column is a bigint: an epoch beyond it cannot be stored, so the
        // highest one that can is asked for instead.
        let at_least = i64::try_from(at_least).unwrap_or(i64::MAX);
        self.query_opt(
            &self.sql.raise,
            &[&name, &node, &epoch_param(epoch), &at_least, &micros(ttl)],
        )
        .await?
        .as_ref()
        .map(lease)
        .transpose()
    }
}
