//! `PostgresFleetStore`: paused groups in `weir_groups` and the nodes' own
//! reports in `weir_nodes`, on the database clock.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{PostgresStore, classify, quote_identifier};
use crate::broker::control::{FleetStore, NodeEntry};
use crate::broker::lease::MAX_TTL;
use crate::store::Result;

/// The fleet store in a Postgres store's schema.
pub struct PostgresFleetStore {
    store: Arc<PostgresStore>,
    sql: Sql,
}

struct Sql {
    paused: String,
    set_paused: String,
    report: String,
    reports: String,
}

impl PostgresFleetStore {
    pub fn new(store: Arc<PostgresStore>) -> Self {
        let schema = quote_identifier(store.schema());
        let groups = format!("{schema}.weir_groups");
        let nodes = format!("{schema}.weir_nodes");
        let sql = Sql {
            paused: format!("SELECT group_name FROM {groups} WHERE paused ORDER BY group_name"),
            // Returns a row unless a later term has written (then nothing
            // changes), with the state before (NULL for a new row). The join
            // reads the row before the insert does: a CTE read only in
            // RETURNING would be read after it, and miss the row it updated.
            set_paused: format!(
                "WITH before AS (SELECT paused FROM {groups} WHERE group_name = $1 FOR UPDATE) \
                 INSERT INTO {groups} (group_name, paused, changed_at, epoch) \
                 SELECT $1::text, $2::boolean, clock_timestamp(), $3::bigint \
                 FROM (VALUES (1)) AS one LEFT JOIN before ON true \
                 ON CONFLICT (group_name) DO UPDATE \
                   SET paused = EXCLUDED.paused, epoch = EXCLUDED.epoch, \
                       changed_at = CASE WHEN {groups}.paused IS DISTINCT FROM EXCLUDED.paused \
                                         THEN EXCLUDED.changed_at ELSE {groups}.changed_at END \
                   WHERE {groups}.epoch <= EXCLUDED.epoch \
                 RETURNING (SELECT paused FROM before)"
            ),
            report: format!(
                "INSERT INTO {nodes} (node, report, reported_at) VALUES ($1, $2, clock_timestamp()) \
                 ON CONFLICT (node) DO UPDATE \
                   SET report = EXCLUDED.report, reported_at = EXCLUDED.reported_at"
            ),
            reports: format!(
                "SELECT node, report, reported_at FROM {nodes} \
                 WHERE reported_at > clock_timestamp() - $1::bigint * interval '1 microsecond' \
                 ORDER BY node COLLATE \"C\""
            ),
        };
        Self { store, sql }
    }
}

#[async_trait]
impl FleetStore for PostgresFleetStore {
    async fn paused_groups(&self) -> Result<BTreeSet<String>> {
        self.store
            .query_once(&self.sql.paused, &[])
            .await?
            .iter()
            .map(|row| row.try_get(0).map_err(classify))
            .collect()
    }

    async fn set_paused(&self, group: &str, paused: bool, epoch: u64) -> Result<Option<bool>> {
        let epoch = i64::try_from(epoch).unwrap_or(i64::MAX);
        let rows = self
            .store
            .query_once(&self.sql.set_paused, &[&group, &paused, &epoch])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        // A first row for a group resumed that was never paused changes nothing.
        let before: Option<bool> = row.try_get(0).map_err(classify)?;
        Ok(Some(before.unwrap_or(false) != paused))
    }

    async fn report(&self, node: &str, report: &Value) -> Result<()> {
        self.store
            .execute_once(&self.sql.report, &[&node, report])
            .await?;
        Ok(())
    }

    async fn reports(&self, max_age: Duration) -> Result<Vec<NodeEntry>> {
        let micros = i64::try_from(max_age.min(MAX_TTL).as_micros()).unwrap_or(i64::MAX);
        self.store
            .query_once(&self.sql.reports, &[&micros])
            .await?
            .iter()
            .map(|row| {
                Ok(NodeEntry {
                    node: row.try_get(0).map_err(classify)?,
                    report: row.try_get(1).map_err(classify)?,
                    reported_at: row.try_get::<_, DateTime<Utc>>(2).map_err(classify)?,
                })
            })
            .collect()
    }
}
