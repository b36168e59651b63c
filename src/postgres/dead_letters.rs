//! `PostgresDeadLetterStore`: dead letters in the `weir_dead_letters` table of a
//! Postgres store's schema. Consumers insert rows; a retry that fails again
//! updates its row, and a retry that succeeds or a purge deletes it.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{PostgresStore, classify, quote_identifier};
use crate::consumer::dead_letter::{DeadLetter, DeadLetterStore, NewDeadLetter};
use crate::store::{Error, Result};

const COLUMNS: &str =
    "id, group_name, source, event_id, sequence, kind, error, attempts, recorded_at";

/// Dead letters in the `weir_dead_letters` table of a Postgres store's schema, each
/// stamped with the database's `clock_timestamp()` and numbered by its id sequence.
pub struct PostgresDeadLetterStore {
    store: Arc<PostgresStore>,
    sql: Sql,
}

struct Sql {
    record: String,
    list_all: String,
    list_group: String,
    list_in_order: String,
    last_id: String,
    get: String,
    remove: String,
    record_failure: String,
}

impl PostgresDeadLetterStore {
    pub fn new(store: Arc<PostgresStore>) -> Self {
        let table = format!("{}.weir_dead_letters", quote_identifier(store.schema()));
        let sql = Sql {
            record: format!(
                "INSERT INTO {table} \
                   (group_name, source, event_id, sequence, kind, error, attempts, recorded_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp()) \
                 RETURNING {COLUMNS}"
            ),
            // Two statements rather than `$1 IS NULL OR group_name = $1`, which a
            // generic plan could not answer from the (group_name, id) index.
            list_all: format!("SELECT {COLUMNS} FROM {table} WHERE id > $1 ORDER BY id LIMIT $2"),
            list_group: format!(
                "SELECT {COLUMNS} FROM {table} WHERE group_name = $3 AND id > $1 ORDER BY id LIMIT $2"
            ),
            // Read in order from the (group_name, sequence, id) index.
            list_in_order: format!(
                "SELECT {COLUMNS} FROM {table} \
                 WHERE group_name = $1 AND id <= $2 AND (sequence, id) > ($3, $4) \
                 ORDER BY sequence, id LIMIT $5"
            ),
            last_id: format!("SELECT max(id) FROM {table} WHERE group_name = $1"),
            get: format!("SELECT {COLUMNS} FROM {table} WHERE id = ANY($1) ORDER BY id"),
            remove: format!("DELETE FROM {table} WHERE id = ANY($1)"),
            // Saturates rather than failing on a letter retried 2^31 - 1 times.
            record_failure: format!(
                "UPDATE {table} SET attempts = least(attempts::bigint + 1, 2147483647)::integer, \
                   kind = $2, error = $3 \
                 WHERE id = $1 RETURNING {COLUMNS}"
            ),
        };
        Self { store, sql }
    }

    /// An insert whose outcome is unknown could be recorded twice if sent again, so
    /// a statement is sent once.
    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.store.query_once(sql, params).await
    }
}

/// Ids as the table holds them; none is above `i64::MAX`, so a larger id names
/// no letter and is left out.
fn table_ids(ids: &[u64]) -> Vec<i64> {
    ids.iter()
        .filter_map(|&id| i64::try_from(id).ok())
        .collect()
}

/// A column value read back as unsigned: weir never writes a negative one.
fn non_negative<T: TryFrom<i64>>(column: &str, value: i64) -> Result<T> {
    T::try_from(value).map_err(|_| {
        Error::Backend(format!(
            "weir_dead_letters holds {column} {value}, which weir never writes: \
             correct or delete the row by hand"
        ))
    })
}

fn dead_letter(row: &Row) -> Result<DeadLetter> {
    let source: String = row.try_get(2).map_err(classify)?;
    let attempts: i32 = row.try_get(7).map_err(classify)?;
    Ok(DeadLetter {
        id: non_negative("id", row.try_get(0).map_err(classify)?)?,
        group: row.try_get(1).map_err(classify)?,
        source: source.parse()?,
        event_id: row.try_get(3).map_err(classify)?,
        sequence: non_negative("sequence", row.try_get(4).map_err(classify)?)?,
        kind: row.try_get(5).map_err(classify)?,
        error: row.try_get(6).map_err(classify)?,
        attempts: non_negative("attempts", i64::from(attempts))?,
        recorded_at: row.try_get::<_, DateTime<Utc>>(8).map_err(classify)?,
    })
}

#[async_trait]
impl DeadLetterStore for PostgresDeadLetterStore {
    async fn record(&self, letter: &NewDeadLetter) -> Result<DeadLetter> {
        let sequence = i64::try_from(letter.sequence).map_err(|_| {
            Error::Backend(format!(
                "dead letter of event {} cannot be stored: its sequence {} is above {}",
                letter.event_id,
                letter.sequence,
                i64::MAX
            ))
        })?;
        let attempts = i32::try_from(letter.attempts).map_err(|_| {
            Error::Backend(format!(
                "dead letter of event {} cannot be stored: its attempt count {} is above {}",
                letter.event_id,
                letter.attempts,
                i32::MAX
            ))
        })?;
        let rows = self
            .query(
                &self.sql.record,
                &[
                    &letter.group,
                    &letter.source.to_string(),
                    &letter.event_id,
                    &sequence,
                    &letter.kind,
                    &letter.error,
                    &attempts,
                ],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| Error::Backend("recording a dead letter returned no row".to_owned()))?;
        dead_letter(row)
    }

    async fn list(&self, group: Option<&str>, after: u64, limit: usize) -> Result<Vec<DeadLetter>> {
        // No id is above i64::MAX, so a larger `after` rightly lists nothing.
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match group {
            Some(group) => {
                self.query(&self.sql.list_group, &[&after, &limit, &group])
                    .await?
            }
            None => self.query(&self.sql.list_all, &[&after, &limit]).await?,
        };
        rows.iter().map(dead_letter).collect()
    }

    async fn list_in_order(
        &self,
        group: &str,
        up_to: u64,
        after: (u64, u64),
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let up_to = i64::try_from(up_to).unwrap_or(i64::MAX);
        let (Ok(sequence), Ok(id)) = (i64::try_from(after.0), i64::try_from(after.1)) else {
            return Ok(Vec::new());
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                &self.sql.list_in_order,
                &[&group, &up_to, &sequence, &id, &limit],
            )
            .await?;
        rows.iter().map(dead_letter).collect()
    }

    async fn last_id(&self, group: &str) -> Result<Option<u64>> {
        let rows = self.query(&self.sql.last_id, &[&group]).await?;
        let last: Option<i64> = match rows.first() {
            Some(row) => row.try_get(0).map_err(super::classify)?,
            None => None,
        };
        Ok(last.and_then(|id| u64::try_from(id).ok()))
    }

    async fn get(&self, ids: &[u64]) -> Result<Vec<DeadLetter>> {
        let rows = self.query(&self.sql.get, &[&table_ids(ids)]).await?;
        rows.iter().map(dead_letter).collect()
    }

    async fn remove(&self, ids: &[u64]) -> Result<u64> {
        self.store
            .execute_once(&self.sql.remove, &[&table_ids(ids)])
            .await
    }

    async fn record_failure(&self, id: u64, kind: &str, error: &str) -> Result<Option<DeadLetter>> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        let rows = self
            .query(&self.sql.record_failure, &[&id, &kind, &error])
            .await?;
        rows.first().map(dead_letter).transpose()
    }
}
