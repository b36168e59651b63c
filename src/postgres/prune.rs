//! Pruning weir's reserved categories (`$weir`) by age, for `[lifecycle] retention`.
//!
//! Each stream keeps its last event: `weir_append` numbers a stream's next event
//! after the highest position stored, so a stream pruned to nothing would start
//! again at 0 and its readers would see positions repeat. Rows go in bounded
//! batches, so that no prune holds locks on many rows for long.

use chrono::{DateTime, Utc};

use super::PostgresStore;
use crate::event::Category;
use crate::store::Result;

/// Rows deleted per statement.
const PRUNE_BATCH: i64 = 5_000;

impl PostgresStore {
    /// Deletes the events of the reserved `category` stored before `before`, but
    /// each stream's last; returns how many. The caller checked that `category`
    /// is reserved.
    pub(super) async fn prune_reserved(
        &self,
        category: &Category,
        before: DateTime<Utc>,
    ) -> Result<u64> {
        let events = &self.sql.events_table;
        // `category LIKE '$%'` is written out so the planner can use the partial
        // index of migration 7. A stream's last event is never deleted, even when
        // an append races the prune: the append only adds a later one.
        let sql = format!(
            "DELETE FROM {events} AS doomed USING ( \
                 SELECT e.tx_id, e.sequence FROM {events} AS e \
                  WHERE e.category = $1 AND e.category LIKE '$%' AND e.observed_at < $2 \
                    AND e.position < (SELECT max(h.position) FROM {events} AS h \
                                       WHERE h.category = e.category AND h.stream = e.stream) \
                  LIMIT $3) AS old \
             WHERE doomed.tx_id = old.tx_id AND doomed.sequence = old.sequence"
        );
        let mut pruned = 0;
        loop {
            let deleted = self
                .execute_once(&sql, &[&category.as_str(), &before, &PRUNE_BATCH])
                .await?;
            pruned += deleted;
            if deleted < PRUNE_BATCH as u64 {
                return Ok(pruned);
            }
        }
    }
}
