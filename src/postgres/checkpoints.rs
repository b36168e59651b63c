//! `PostgresCheckpointStore`: checkpoints in the `weir_checkpoints` table of a Postgres
//! store's schema, claimed and saved with one statement each.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{PostgresStore, classify, quote_identifier};
use crate::broker::Grant;
use crate::consumer::checkpoint::{
    Checkpoint, CheckpointError, CheckpointStore, Claim, Superseded,
};
use crate::event::{Cursor, Source};
use crate::store::Error;

const COLUMNS: &str = "group_name, source, owner, tx_id, sequence, updated_at";

/// Checkpoints in the `weir_checkpoints` table of a Postgres store's schema.
///
/// Claims and saves are one statement each and lock the row they change, so a save
/// racing a claim either commits first (and the claim returns its cursor) or sees the
/// claim's token and is fenced. `updated_at` is the database's `clock_timestamp()`.
pub struct PostgresCheckpointStore {
    store: Arc<PostgresStore>,
    sql: Sql,
}

struct Sql {
    claim: String,
    holder: String,
    save: String,
    owner: String,
    verify: String,
    load: String,
    list_all: String,
    list_group: String,
}

impl PostgresCheckpointStore {
    pub fn new(store: Arc<PostgresStore>) -> Self {
        let table = format!("{}.weir_checkpoints", quote_identifier(store.schema()));
        let sql = Sql {
            // On conflict the row is locked and re-read, so of racing claims the last
            // to commit holds the row, and the cursor returned is the last one saved.
            // A claim under a grant ($7) changes the row only if the row's grant
            // is not newer; the row lock taken on conflict makes the comparison
            // and the write one step. Without a grant, the row's goes back to 0.0.
            claim: format!(
                "INSERT INTO {table} AS c (group_name, source, owner, claim, tx_id, sequence, updated_at, \
                   claim_epoch, claim_revision) \
                 VALUES ($1, $2, $3, $4, 0, 0, clock_timestamp(), $5, $6) \
                 ON CONFLICT (group_name, source) DO UPDATE SET \
                   owner = EXCLUDED.owner, claim = EXCLUDED.claim, updated_at = clock_timestamp(), \
                   claim_epoch = EXCLUDED.claim_epoch, claim_revision = EXCLUDED.claim_revision \
                 WHERE NOT $7 OR (c.claim_epoch, c.claim_revision) <= (EXCLUDED.claim_epoch, EXCLUDED.claim_revision) \
                 RETURNING tx_id, sequence"
            ),
            holder: format!(
                "SELECT owner, claim_epoch, claim_revision FROM {table} WHERE group_name = $1 AND source = $2"
            ),
            // A save that waited on a concurrent claim's row lock re-checks the token
            // on the claimed row, so it cannot overwrite the new owner's cursor.
            save: format!(
                "UPDATE {table} SET tx_id = $4, sequence = $5, updated_at = clock_timestamp() \
                 WHERE group_name = $1 AND source = $2 AND claim = $3"
            ),
            owner: format!("SELECT owner FROM {table} WHERE group_name = $1 AND source = $2"),
            verify: format!(
                "SELECT owner, claim = $3 FROM {table} WHERE group_name = $1 AND source = $2"
            ),
            load: format!("SELECT {COLUMNS} FROM {table} WHERE group_name = $1 AND source = $2"),
            // "C" collation: bytewise order, as the memory store's map keeps it,
            // whatever the database's default collation.
            list_all: format!(
                "SELECT {COLUMNS} FROM {table} ORDER BY group_name COLLATE \"C\", source COLLATE \"C\""
            ),
            list_group: format!(
                "SELECT {COLUMNS} FROM {table} WHERE group_name = $1 ORDER BY source COLLATE \"C\""
            ),
        };
        Self { store, sql }
    }

    /// A consumer treats a retryable error as a reason to try the claim or save
    /// again itself, so a statement is sent once.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, CheckpointError> {
        Ok(self.store.query_once(sql, params).await?)
    }

    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, CheckpointError> {
        Ok(self.store.execute_once(sql, params).await?)
    }
}

impl PostgresCheckpointStore {
    /// Claims the row under `grant` (`None`: under no decision, unconditionally).
    async fn claim_row(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
        grant: Option<Grant>,
    ) -> Result<(Claim, Cursor), CheckpointError> {
        let claim = Claim::new(group, source, owner);
        let (epoch, revision) = grant_columns(grant.unwrap_or_default());
        let source_text = source.to_string();
        let rows = self
            .query(
                &self.sql.claim,
                &[
                    &group,
                    &source_text,
                    &owner,
                    &claim.token,
                    &epoch,
                    &revision,
                    &grant.is_some(),
                ],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(self.superseded(group, source, owner, grant).await);
        };
        let cursor = cursor_from(row, 0)?;
        Ok((claim, cursor))
    }

    /// The error for a claim under `grant` that the row's newer grant refused.
    async fn superseded(
        &self,
        group: &str,
        source: &Source,
        claimant: &str,
        grant: Option<Grant>,
    ) -> CheckpointError {
        let holder = self
            .query(&self.sql.holder, &[&group, &source.to_string()])
            .await;
        let (owner, held) = match holder.as_deref().map(|rows| rows.first()) {
            Ok(Some(row)) => {
                let epoch: i64 = row.try_get(1).unwrap_or_default();
                let revision: i64 = row.try_get(2).unwrap_or_default();
                (
                    row.try_get::<_, String>(0).unwrap_or_default(),
                    Grant::new(
                        u64::try_from(epoch).unwrap_or_default(),
                        u64::try_from(revision).unwrap_or_default(),
                    ),
                )
            }
            _ => (String::new(), Grant::default()),
        };
        CheckpointError::Superseded(Box::new(Superseded {
            group: group.to_owned(),
            consumed: source.clone(),
            owner,
            held,
            claimant: claimant.to_owned(),
            grant: grant.unwrap_or_default(),
        }))
    }
}

/// A grant as the two bigint columns hold it; beyond i64::MAX (never issued)
/// counts as the largest.
fn grant_columns(grant: Grant) -> (i64, i64) {
    (
        i64::try_from(grant.epoch).unwrap_or(i64::MAX),
        i64::try_from(grant.revision).unwrap_or(i64::MAX),
    )
}

/// The cursor as the two bigint columns hold it.
fn cursor_columns(cursor: Cursor) -> Result<(i64, i64), Error> {
    match (i64::try_from(cursor.tx_id), i64::try_from(cursor.sequence)) {
        (Ok(tx_id), Ok(sequence)) => Ok((tx_id, sequence)),
        _ => Err(Error::Backend(format!(
            "cursor {cursor} cannot be stored in weir_checkpoints: its tx_id and sequence must each be at most {}",
            i64::MAX
        ))),
    }
}

/// The cursor in columns `first` (tx_id) and `first + 1` (sequence) of `row`.
fn cursor_from(row: &Row, first: usize) -> Result<Cursor, Error> {
    let tx_id: i64 = row.try_get(first).map_err(classify)?;
    let sequence: i64 = row.try_get(first + 1).map_err(classify)?;
    match (u64::try_from(tx_id), u64::try_from(sequence)) {
        (Ok(tx_id), Ok(sequence)) => Ok(Cursor::new(tx_id, sequence)),
        _ => Err(Error::Backend(format!(
            "weir_checkpoints holds a negative cursor {tx_id}:{sequence}, which weir never writes: \
             correct or delete the row by hand"
        ))),
    }
}

fn checkpoint(row: &Row) -> Result<Checkpoint, Error> {
    let source: String = row.try_get(1).map_err(classify)?;
    Ok(Checkpoint {
        group: row.try_get(0).map_err(classify)?,
        source: source.parse()?,
        owner: row.try_get(2).map_err(classify)?,
        cursor: cursor_from(row, 3)?,
        updated_at: row.try_get::<_, DateTime<Utc>>(5).map_err(classify)?,
    })
}

#[async_trait]
impl CheckpointStore for PostgresCheckpointStore {
    async fn claim(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
    ) -> Result<(Claim, Cursor), CheckpointError> {
        self.claim_row(group, source, owner, None).await
    }

    async fn claim_granted(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
        grant: Grant,
    ) -> Result<(Claim, Cursor), CheckpointError> {
        self.claim_row(group, source, owner, Some(grant)).await
    }

    async fn save(&self, claim: &Claim, cursor: Cursor) -> Result<(), CheckpointError> {
        let (tx_id, sequence) = cursor_columns(cursor)?;
        let source = claim.source.to_string();
        let saved = self
            .execute(
                &self.sql.save,
                &[&claim.group, &source, &claim.token, &tx_id, &sequence],
            )
            .await?;
        if saved > 0 {
            return Ok(());
        }
        // Fenced, which is rare: only now ask who holds the row, to name them.
        let owner = self
            .query(&self.sql.owner, &[&claim.group, &source])
            .await?
            .first()
            .map(|row| row.try_get::<_, String>(0).map_err(classify))
            .transpose()?
            .unwrap_or_default();
        Err(claim.fenced_by(owner))
    }

    async fn verify(&self, claim: &Claim) -> Result<(), CheckpointError> {
        let source = claim.source.to_string();
        let rows = self
            .query(&self.sql.verify, &[&claim.group, &source, &claim.token])
            .await?;
        let Some(row) = rows.first() else {
            return Err(claim.fenced_by(String::new()));
        };
        if row.try_get::<_, bool>(1).map_err(classify)? {
            return Ok(());
        }
        Err(claim.fenced_by(row.try_get(0).map_err(classify)?))
    }

    async fn load(
        &self,
        group: &str,
        source: &Source,
    ) -> Result<Option<Checkpoint>, CheckpointError> {
        let rows = self
            .query(&self.sql.load, &[&group, &source.to_string()])
            .await?;
        Ok(rows.first().map(checkpoint).transpose()?)
    }

    async fn list(&self, group: Option<&str>) -> Result<Vec<Checkpoint>, CheckpointError> {
        let rows = match group {
            Some(group) => self.query(&self.sql.list_group, &[&group]).await?,
            None => self.query(&self.sql.list_all, &[]).await?,
        };
        Ok(rows.iter().map(checkpoint).collect::<Result<_, _>>()?)
    }
}
