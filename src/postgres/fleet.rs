//! `PostgresFleetStore`: paused groups in `weir_groups`, the nodes' own
//! reports in `weir_nodes` and admin requests by id in `weir_admin_requests`,
//! on the database clock.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{PostgresStore, classify, quote_identifier};
use crate::broker::control::{FleetStore, NodeEntry, REQUEST_MEMORY, RequestRecord};
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
    forget_requests: String,
    begin_request: String,
    request: String,
    finish_request: String,
}

impl PostgresFleetStore {
    pub fn new(store: Arc<PostgresStore>) -> Self {
        let schema = quote_identifier(store.schema());
        let groups = format!("{schema}.weir_groups");
        let nodes = format!("{schema}.weir_nodes");
        let requests = format!("{schema}.weir_admin_requests");
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
            forget_requests: format!(
                "DELETE FROM {requests} \
                 WHERE started_at < clock_timestamp() - $1::bigint * interval '1 second'"
            ),
            begin_request: format!(
                "INSERT INTO {requests} (id, request, epoch, node) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO NOTHING RETURNING id"
            ),
            request: format!(
                "SELECT request, epoch, node, status, answer FROM {requests} WHERE id = $1"
            ),
            finish_request: format!(
                "UPDATE {requests} SET status = $2, answer = $3, finished_at = clock_timestamp() \
                 WHERE id = $1"
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

    async fn begin_request(
        &self,
        id: &str,
        request: &Value,
        epoch: u64,
        node: &str,
    ) -> Result<Option<RequestRecord>> {
        let memory = i64::try_from(REQUEST_MEMORY.as_secs()).unwrap_or(i64::MAX);
        self.store
            .execute_once(&self.sql.forget_requests, &[&memory])
            .await?;
        let epoch = i64::try_from(epoch).unwrap_or(i64::MAX);
        let inserted = self
            .store
            .query_once(&self.sql.begin_request, &[&id, request, &epoch, &node])
            .await?;
        if !inserted.is_empty() {
            return Ok(None);
        }
        // A statement of its own, so that it sees a row another caller
        // committed while the insert above waited for it.
        let rows = self.store.query_once(&self.sql.request, &[&id]).await?;
        let Some(row) = rows.first() else {
            return Err(crate::store::Error::Backend(format!(
                "admin request {id} was neither stored nor found"
            )));
        };
        let epoch: i64 = row.try_get(1).map_err(classify)?;
        let status: Option<i32> = row.try_get(3).map_err(classify)?;
        let answer: Option<Value> = row.try_get(4).map_err(classify)?;
        Ok(Some(RequestRecord {
            request: row.try_get(0).map_err(classify)?,
            epoch: u64::try_from(epoch).unwrap_or(0),
            node: row.try_get(2).map_err(classify)?,
            outcome: status
                .zip(answer)
                .map(|(status, answer)| (u16::try_from(status).unwrap_or(500), answer)),
        }))
    }

    async fn finish_request(&self, id: &str, status: u16, answer: &Value) -> Result<()> {
        self.store
            .execute_once(&self.sql.finish_request, &[&id, &i32::from(status), answer])
            .await?;
        Ok(())
    }
}
