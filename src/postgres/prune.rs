//! Pruning weir's reserved categories (`$weir`) by age, for `[lifecycle] retention`.
//!
//! Each stream keeps its last event: `weir_append` numbers a stream's next event
//! after the highest position stored, so a stream pruned to nothing would start
//! again at 0 and its readers would see positions repeat. Rows go in bounded
//! batches, so that no prune holds locks on many rows for long.

use chrono::{DateTime, Utc};

use super::PostgresStore;
use super::xid8::Xid8;
use crate::event::{Category, Cursor};
use crate::store::Result;

/// Rows deleted per statement.
const PRUNE_BATCH: i64 = 5_000;

impl PostgresStore {
    /// Deletes the events of the reserved `category` stored before `before` (and
    /// at or before `read_up_to`, if given), but each stream's last; returns how
    /// many. The caller checked that `category`
    /// is reserved.
    pub(super) async fn prune_reserved(
        &self,
        category: &Category,
        before: DateTime<Utc>,
        read_up_to: Option<Cursor>,
    ) -> Result<u64> {
        let events = &self.sql.events_table;
        // `category LIKE '$%'` is written out so the planner can use the partial
        // index of migration 7. A stream's last event is never deleted, even when
        // an append races the prune: the append only adds a later one.
        let sql = format!(
            "DELETE FROM {events} AS doomed USING ( \
                 SELECT e.tx_id, e.sequence FROM {events} AS e \
                  WHERE e.category = $1 AND e.category LIKE '$%' AND e.observed_at < $2 \
                    AND (e.tx_id, e.sequence) <= ($4, $5) \
                    AND e.position < (SELECT max(h.position) FROM {events} AS h \
                                       WHERE h.category = e.category AND h.stream = e.stream) \
                  LIMIT $3) AS old \
             WHERE doomed.tx_id = old.tx_id AND doomed.sequence = old.sequence"
        );
        // Without readers to wait for, up to the highest cursor there is.
        let up_to = read_up_to.unwrap_or(Cursor::new(i64::MAX as u64, i64::MAX as u64));
        let tx_id = Xid8(up_to.tx_id);
        let sequence = i64::try_from(up_to.sequence).unwrap_or(i64::MAX);
        let mut pruned = 0;
        loop {
            let deleted = self
                .execute_once(
                    &sql,
                    &[&category.as_str(), &before, &PRUNE_BATCH, &tx_id, &sequence],
                )
                .await?;
            pruned += deleted;
            if deleted < PRUNE_BATCH as u64 {
                return Ok(pruned);
            }
        }
    }
}
