//! Reads of partitioned sources (`category:orders@3/16`, `log@0/4`): the SQL and
//! the parameters that select one partition's slices.
//!
//! Rows are read in `(tx_id, sequence)` order below the visibility horizon, as for
//! a whole category. A partition of at most [`MERGED_SLICES`] slices is read as
//! one ordered index scan per slice (`weir_events_category_slice_read_order`)
//! merged by the planner, so a batch costs about its own rows plus one row per
//! slice, however far behind the reader is. A coarser partition (fewer than 16 of
//! a category) is read from the category's index, skipping other partitions' rows:
//! the merge would need hundreds of scans, and skipping costs at most its count
//! times its own rows. Log partitions are always read from the log's index, and
//! like the log leave weir's reserved categories out.

use std::sync::{Arc, PoisonError};

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::PostgresStore;
use super::events::{BELOW_HORIZON, COLUMNS, NOT_RESERVED, event_from_row};
use super::xid8::Xid8;
use crate::event::{Category, Cursor, Partition, SLICES, StoredEvent};
use crate::store::Result;

/// Partitions of up to this many slices are read by merging one scan per slice.
pub const MERGED_SLICES: u16 = 64;

/// What a partition read asks for: everything but the cursor and limit, which come
/// first as `$1` (tx_id), `$2` (sequence) and `$3` (limit).
pub(super) struct PartitionQuery<'a> {
    category: Option<&'a Category>,
    partition: Partition,
}

impl<'a> PartitionQuery<'a> {
    pub(super) fn log(partition: Partition) -> Self {
        Self {
            category: None,
            partition,
        }
    }

    pub(super) fn category(category: &'a Category, partition: Partition) -> Self {
        Self {
            category: Some(category),
            partition,
        }
    }

    fn merged(&self) -> bool {
        self.category.is_some() && self.partition.slices().len() <= usize::from(MERGED_SLICES)
    }

    /// `SELECT` of the partition's rows after the cursor, in read order, limited;
    /// with `columns` as the select list.
    fn read_sql(&self, events: &str, columns: &str) -> String {
        if self.merged() {
            let width = self.partition.slices().len();
            let branches: Vec<String> = (0..width)
                .map(|offset| {
                    let after = "(tx_id, sequence) > ($1, $2)";
                    // Each branch ordered and limited on its own: only then does
                    // the planner merge them lazily instead of sorting them all.
                    format!(
                        "(SELECT {COLUMNS} FROM {events} WHERE category = $4 \
                         AND slice = ($5::smallint + {offset})::smallint AND {after} AND {BELOW_HORIZON} \
                         ORDER BY tx_id, sequence LIMIT $3)"
                    )
                })
                .collect();
            return format!(
                "SELECT {columns} FROM ({}) AS partition ORDER BY tx_id, sequence LIMIT $3",
                branches.join(" UNION ALL ")
            );
        }
        // Through a function of migration 4 that plans its query without sorts
        // or full scans: a generic plan cannot know how few rows the slice range
        // keeps, and would otherwise read and sort the whole backlog for every
        // batch. The read-order index yields rows in order, and skipping other
        // partitions' rows costs at most the count times our own.
        let schema = events.strip_suffix(".weir_events").unwrap_or(events);
        if self.category.is_some() {
            format!(
                "SELECT {columns} FROM {schema}.weir_read_category_slices($4, $5::smallint, $6::smallint, $1, $2, $3)"
            )
        } else {
            format!(
                "SELECT {columns} FROM {schema}.weir_read_log_slices($4::smallint, $5::smallint, $1, $2, $3)"
            )
        }
    }

    /// The newest readable row of the partition.
    fn head_sql(&self, events: &str) -> String {
        let (category, low, high) = if self.category.is_some() {
            ("category = $1 AND ".to_owned(), "$2", "$3")
        } else {
            (format!("{NOT_RESERVED} AND "), "$1", "$2")
        };
        format!(
            "SELECT {COLUMNS} FROM {events} WHERE {category}slice + 0 >= {low}::smallint \
             AND slice + 0 < {high}::smallint AND {BELOW_HORIZON} \
             ORDER BY tx_id DESC, sequence DESC LIMIT 1"
        )
    }

    /// The category and the slice bounds, as parameters.
    fn read_params(&self) -> (Option<String>, i16, i16) {
        let slices = self.partition.slices();
        (
            self.category.map(|c| c.as_str().to_owned()),
            slice_param(slices.start),
            slice_param(slices.end),
        )
    }
}

/// Slices fit a smallint: there are [`SLICES`] of them.
fn slice_param(slice: u16) -> i16 {
    i16::try_from(slice.min(SLICES)).unwrap_or(i16::MAX)
}

/// Statement texts by (statement, category given, slices per partition).
pub(super) type PartitionCache =
    std::sync::Mutex<std::collections::HashMap<(Statement, bool, usize), Arc<str>>>;

/// Which statement of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Statement {
    Read,
    Backlog,
    Head,
}

impl PostgresStore {
    /// Rows of `statement` for one partition: events after the cursor (`Read`),
    /// their count and oldest time (`Backlog`), or the newest event (`Head`).
    pub(super) async fn partition_rows(
        &self,
        statement: Statement,
        query: PartitionQuery<'_>,
        after: Cursor,
        limit: i64,
    ) -> Result<Vec<Row>> {
        let sql = self.partition_sql(statement, &query);
        let tx = Xid8(after.tx_id);
        let sequence = i64::try_from(after.sequence).unwrap_or(i64::MAX);
        let (category, low, high) = query.read_params();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(6);
        if statement != Statement::Head {
            params.extend([&tx as &(dyn ToSql + Sync), &sequence, &limit]);
        }
        if let Some(category) = &category {
            params.push(category);
        }
        params.push(&low);
        if statement == Statement::Head || !query.merged() {
            params.push(&high);
        }
        self.query_reads(&sql, &params).await
    }

    /// The newest readable event of a partition.
    pub(super) async fn partition_head(
        &self,
        query: PartitionQuery<'_>,
    ) -> Result<Option<StoredEvent>> {
        let rows = self
            .partition_rows(Statement::Head, query, Cursor::START, 1)
            .await?;
        rows.first().map(|row| event_from_row(row, 0)).transpose()
    }

    /// The statement's text, built once per shape: it depends only on whether a
    /// category is given and on how many slices the partition holds.
    fn partition_sql(&self, statement: Statement, query: &PartitionQuery<'_>) -> Arc<str> {
        let key = (
            statement,
            query.category.is_some(),
            query.partition.slices().len(),
        );
        let mut cache = self
            .partition_sql
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let events = &self.sql.events_table;
        Arc::clone(cache.entry(key).or_insert_with(|| {
            let text = match statement {
                Statement::Read => query.read_sql(events, COLUMNS),
                Statement::Backlog => format!(
                    "SELECT count(*), min(observed_at) FROM ({}) AS backlog",
                    query.read_sql(events, "observed_at")
                ),
                Statement::Head => query.head_sql(events),
            };
            Arc::from(text)
        }))
    }
}
