//! `PostgresMembershipStore`: subscribers and their heartbeats in the
//! `weir_members` table, on the database clock.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{PostgresStore, classify, quote_identifier};
use crate::broker::lease::MAX_TTL;
use crate::broker::membership::{
    MemberRecord, MembershipStore, Registration, SubscriberKey, taken,
};
use crate::event::Source;
use crate::store::{Error, Result};

const COLUMNS: &str = "group_name, subscriber, node, sources, tags, heartbeat_at";

/// Membership in the `weir_members` table of a Postgres store's schema. Heartbeat
/// times are the database's `clock_timestamp()`, so nodes' clocks need not agree.
pub struct PostgresMembershipStore {
    store: Arc<PostgresStore>,
    sql: Sql,
}

struct Sql {
    register: String,
    heartbeat: String,
    leave: String,
    live: String,
    live_all: String,
    groups: String,
    purge: String,
}

impl PostgresMembershipStore {
    pub fn new(store: Arc<PostgresStore>) -> Self {
        let table = format!("{}.weir_members", quote_identifier(store.schema()));
        let sql = Sql {
            register: format!(
                "INSERT INTO {table} ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, clock_timestamp()) \
                 ON CONFLICT (group_name, subscriber) DO UPDATE SET \
                   node = EXCLUDED.node, sources = EXCLUDED.sources, tags = EXCLUDED.tags, \
                   heartbeat_at = EXCLUDED.heartbeat_at \
                 RETURNING {COLUMNS}"
            ),
            // The outer SELECT sees the table as the statement began, so a record
            // purged concurrently may be reported missing only at the next heartbeat.
            // It returns the keys without a record (node NULL) and those another
            // process holds.
            heartbeat: format!(
                "WITH wanted AS ( \
                   SELECT * FROM unnest($2::text[], $3::text[]) AS w(group_name, subscriber) \
                 ), touched AS ( \
                   UPDATE {table} m SET heartbeat_at = clock_timestamp() FROM wanted w \
                   WHERE m.group_name = w.group_name AND m.subscriber = w.subscriber AND m.node = $1 \
                   RETURNING 1 \
                 ) \
                 SELECT w.group_name, w.subscriber, m.node FROM wanted w \
                 LEFT JOIN {table} m ON m.group_name = w.group_name AND m.subscriber = w.subscriber \
                 WHERE m.node IS DISTINCT FROM $1"
            ),
            leave: format!("DELETE FROM {table} WHERE group_name = $1 AND subscriber = $2"),
            live: format!(
                "SELECT {COLUMNS} FROM {table} WHERE group_name = $1 \
                 AND heartbeat_at > clock_timestamp() - $2::bigint * interval '1 microsecond' \
                 ORDER BY subscriber COLLATE \"C\""
            ),
            live_all: format!(
                "SELECT {COLUMNS} FROM {table} \
                 WHERE heartbeat_at > clock_timestamp() - $1::bigint * interval '1 microsecond' \
                 ORDER BY group_name COLLATE \"C\", subscriber COLLATE \"C\""
            ),
            groups: format!("SELECT DISTINCT group_name FROM {table} ORDER BY group_name"),
            purge: format!(
                "DELETE FROM {table} WHERE heartbeat_at < clock_timestamp() - $1::bigint * interval '1 microsecond'"
            ),
        };
        Self { store, sql }
    }

    /// Heartbeats and registrations are repeated by their callers anyway, so a
    /// statement is sent once.
    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.store.query_once(sql, params).await
    }

    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.store.execute_once(sql, params).await
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.min(MAX_TTL).as_micros()).unwrap_or(i64::MAX)
}

fn record(row: &Row) -> Result<MemberRecord> {
    let sources: Vec<String> = row.try_get(3).map_err(classify)?;
    let tags: Vec<String> = row.try_get(4).map_err(classify)?;
    Ok(MemberRecord {
        group: row.try_get(0).map_err(classify)?,
        subscriber: row.try_get(1).map_err(classify)?,
        node: row.try_get(2).map_err(classify)?,
        sources: sources
            .iter()
            .map(|s| s.parse::<Source>().map_err(Error::from))
            .collect::<Result<BTreeSet<_>>>()?,
        tags: tags.into_iter().collect(),
        heartbeat_at: row.try_get::<_, DateTime<Utc>>(5).map_err(classify)?,
    })
}

#[async_trait]
impl MembershipStore for PostgresMembershipStore {
    async fn register(&self, registration: &Registration) -> Result<MemberRecord> {
        let sources: Vec<String> = registration.sources.iter().map(Source::to_string).collect();
        let tags: Vec<&str> = registration.tags.iter().map(String::as_str).collect();
        let rows = self
            .query(
                &self.sql.register,
                &[
                    &registration.group,
                    &registration.subscriber,
                    &registration.node,
                    &sources,
                    &tags,
                ],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| Error::Backend("registering a member returned no row".to_owned()))?;
        record(row)
    }

    async fn heartbeat(
        &self,
        node: &str,
        subscribers: &[SubscriberKey],
    ) -> Result<Vec<SubscriberKey>> {
        if subscribers.is_empty() {
            return Ok(Vec::new());
        }
        let groups: Vec<&str> = subscribers.iter().map(|k| k.group.as_str()).collect();
        let names: Vec<&str> = subscribers.iter().map(|k| k.subscriber.as_str()).collect();
        let rows = self
            .query(&self.sql.heartbeat, &[&node, &groups, &names])
            .await?;
        let mut missing = Vec::with_capacity(rows.len());
        for row in &rows {
            let key = SubscriberKey {
                group: row.try_get(0).map_err(classify)?,
                subscriber: row.try_get(1).map_err(classify)?,
            };
            match row.try_get::<_, Option<String>>(2).map_err(classify)? {
                Some(holder) => return Err(taken(&key, &holder)),
                None => missing.push(key),
            }
        }
        Ok(missing)
    }

    async fn leave(&self, group: &str, subscriber: &str) -> Result<bool> {
        Ok(self
            .execute(&self.sql.leave, &[&group, &subscriber])
            .await?
            > 0)
    }

    async fn live(&self, group: &str, member_timeout: Duration) -> Result<Vec<MemberRecord>> {
        self.query(&self.sql.live, &[&group, &micros(member_timeout)])
            .await?
            .iter()
            .map(record)
            .collect()
    }

    async fn live_all(&self, member_timeout: Duration) -> Result<Vec<MemberRecord>> {
        self.query(&self.sql.live_all, &[&micros(member_timeout)])
            .await?
            .iter()
            .map(record)
            .collect()
    }

    async fn groups(&self) -> Result<Vec<String>> {
        self.query(&self.sql.groups, &[])
            .await?
            .iter()
            .map(|row| row.try_get(0).map_err(classify))
            .collect()
    }

    async fn purge(&self, older_than: Duration) -> Result<u64> {
        self.execute(&self.sql.purge, &[&micros(older_than)]).await
    }
}
