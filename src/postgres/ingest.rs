//! `PostgresIngestStore`: ingested events and their transport positions
//! (`weir_ingest_positions`) written in one transaction, fenced by the claim on
//! the source's row in `weir_checkpoints`.

use std::sync::Arc;

use async_trait::async_trait;
use tokio_postgres::Row;
use uuid::Uuid;

use super::checkpoints::PostgresCheckpointStore;
use super::events::{AppendAttempt, append_on};
use super::{PostgresStore, classify, quote_identifier};
use crate::broker::Grant;
use crate::consumer::{CheckpointError, Claim};
use crate::event::{Category, Source};
use crate::ingest::store::claim_row;
use crate::ingest::{IngestPosition, IngestStore};
use crate::store::{Error, StreamAppend, check_category, check_sizes, validate_batch};

/// Ingest positions in a Postgres store's schema; claims in its checkpoints.
pub struct PostgresIngestStore {
    store: Arc<PostgresStore>,
    claims: PostgresCheckpointStore,
    sql: Sql,
}

struct Sql {
    hold: String,
    position: String,
    save: String,
    list_all: String,
    list_group: String,
}

const COLUMNS: &str = "group_name, source, position, updated_at";

impl PostgresIngestStore {
    pub fn new(store: Arc<PostgresStore>) -> Self {
        let schema = quote_identifier(store.schema());
        let table = format!("{schema}.weir_ingest_positions");
        let sql = Sql {
            // Locks the claim's row until the transaction ends: a new claim
            // waits for this append, and then reads the position it stored.
            hold: format!(
                "SELECT owner, claim = $3 FROM {schema}.weir_checkpoints \
                 WHERE group_name = $1 AND source = $2 FOR UPDATE"
            ),
            position: format!("SELECT position FROM {table} WHERE group_name = $1 AND source = $2"),
            save: format!(
                "INSERT INTO {table} (group_name, source, position, updated_at) \
                 VALUES ($1, $2, $3, clock_timestamp()) ON CONFLICT (group_name, source) \
                 DO UPDATE SET position = EXCLUDED.position, updated_at = EXCLUDED.updated_at"
            ),
            list_all: format!(
                "SELECT {COLUMNS} FROM {table} ORDER BY group_name COLLATE \"C\", source COLLATE \"C\""
            ),
            list_group: format!(
                "SELECT {COLUMNS} FROM {table} WHERE group_name = $1 ORDER BY source COLLATE \"C\""
            ),
        };
        Self {
            claims: PostgresCheckpointStore::new(Arc::clone(&store)),
            store,
            sql,
        }
    }

    /// One try at the append's transaction.
    async fn append_once(
        &self,
        claim: &Claim,
        category: &Category,
        appends: &[StreamAppend],
        ids: &[Uuid],
        position: u64,
    ) -> Result<AppendAttempt, CheckpointError> {
        let mut client = self.store.client().await?;
        let tx = client.transaction().await.map_err(classify)?;
        let source = claim.source.to_string();
        let held = tx
            .query_opt(
                self.sql.hold.as_str(),
                &[&claim.group, &source, &claim.token],
            )
            .await
            .map_err(classify)?;
        match held {
            Some(row) if row.get::<_, bool>(1) => {}
            row => return Err(claim.fenced_by(row.map(|r| r.get(0)).unwrap_or_default())),
        }
        let attempt = if appends.is_empty() {
            AppendAttempt::Written(Vec::new())
        } else {
            let statement = tx
                .prepare_cached(&self.store.sql.append)
                .await
                .map_err(classify)?;
            append_on(&*tx, &statement, category, appends, ids).await?
        };
        if let AppendAttempt::Written(_) = &attempt {
            let position = i64::try_from(position)
                .map_err(|_| Error::Backend(format!("position {position} above 2^63 - 1")))?;
            tx.execute(self.sql.save.as_str(), &[&claim.group, &source, &position])
                .await
                .map_err(classify)?;
            tx.commit().await.map_err(classify)?;
        }
        Ok(attempt)
    }
}

fn position_from(row: &Row) -> Result<IngestPosition, CheckpointError> {
    let source: String = row.try_get(1).map_err(classify)?;
    let position: i64 = row.try_get(2).map_err(classify)?;
    Ok(IngestPosition {
        group: row.try_get(0).map_err(classify)?,
        source: source
            .parse()
            .map_err(|e| Error::Backend(format!("a stored ingest source is invalid: {e}")))?,
        position: u64::try_from(position).unwrap_or(0),
        updated_at: row.try_get(3).map_err(classify)?,
    })
}

#[async_trait]
impl IngestStore for PostgresIngestStore {
    async fn claim(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
        grant: Option<Grant>,
    ) -> Result<(Claim, Option<u64>), CheckpointError> {
        let claim = claim_row(&self.claims, group, source, owner, grant).await?;
        let source = source.to_string();
        let rows = self
            .store
            .query(&self.sql.position, &[&group, &source])
            .await?;
        let position = match rows.first() {
            Some(row) => Some(row.try_get::<_, i64>(0).map_err(classify)?),
            None => None,
        };
        Ok((claim, position.map(|p| u64::try_from(p).unwrap_or(0))))
    }

    async fn append(
        &self,
        claim: &Claim,
        category: &Category,
        appends: &[StreamAppend],
        position: u64,
    ) -> Result<(), CheckpointError> {
        check_category(category)?;
        if !appends.is_empty() {
            validate_batch(appends)?;
            check_sizes(category, appends, self.store.max_event_bytes)?;
        }
        let ids: Vec<Uuid> = appends
            .iter()
            .flat_map(|a| a.events.iter().map(|e| e.id.unwrap_or_else(Uuid::now_v7)))
            .collect();
        // A concurrent writer storing one of the batch's idempotency keys first
        // rolls the whole transaction back; the next try finds its event.
        for _ in 0..3 {
            match self
                .append_once(claim, category, appends, &ids, position)
                .await?
            {
                AppendAttempt::Written(rows) => {
                    if rows.iter().any(|row| !row.get::<_, bool>(0)) {
                        self.store.announcer.announce(category).await;
                    }
                    return Ok(());
                }
                AppendAttempt::IdempotencyRace => continue,
            }
        }
        Err(
            Error::Backend("an idempotency key kept colliding with concurrent appends".into())
                .into(),
        )
    }

    async fn positions(&self, group: Option<&str>) -> Result<Vec<IngestPosition>, CheckpointError> {
        let rows = match group {
            Some(group) => self.store.query(&self.sql.list_group, &[&group]).await?,
            None => self.store.query(&self.sql.list_all, &[]).await?,
        };
        rows.iter().map(position_from).collect()
    }
}
