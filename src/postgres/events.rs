//! [`PostgresStore`]: the event store's Postgres backend and the connection pool
//! every other table of this folder shares.
//!
//! Reads are gap-free without a global write lock: every row records its writing
//! transaction's id (`xid8`); readers order by `(tx_id, sequence)` and read only rows
//! whose `tx_id` is below the oldest transaction still in progress.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use futures::StreamExt;
use postgres_openssl::MakeTlsConnector;
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio_postgres::Row;
use uuid::Uuid;

use super::announcer;
use super::errors::classify;
use super::health::{ConnectHealth, build_pool, retry};
use super::listener;
use super::partitions::{PartitionCache, PartitionQuery, Statement};
use super::replica::Replica;
use super::tls::{self, PostgresTls, Prepared, TlsContext};
use super::xid8::Xid8;
use crate::event::{
    AcceptedHeads, Category, Cursor, EventName, IdempotencyKey, Source, StoredEvent, StreamName,
};
use crate::store::{
    AppendWatcher, Backlog, Error, EventStore, Notifier, Result, StreamAppend, store_precision,
    validate_batch,
};

/// How to reach the store.
#[derive(Debug, Clone)]
pub struct PostgresStoreOptions {
    /// A `postgres://` URL or a libpq `key=value` string.
    pub url: String,
    /// Where the `weir_*` tables live.
    pub schema: String,
    pub pool_size: usize,
    /// How long to wait for a connection, new or pooled, before failing.
    pub connect_timeout: Duration,
    /// The largest event accepted, in bytes (see [`crate::store::event_size`]).
    pub max_event_bytes: usize,
    /// `[store.tls]`: files for TLS; `sslmode` comes from `url`.
    pub tls: PostgresTls,
    /// A hot standby to read events from (`[store] read_url`), and the replay
    /// lag past which reads go to the primary instead.
    pub read_url: Option<String>,
    pub read_max_lag: Duration,
}

impl PostgresStoreOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "weir".into(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            max_event_bytes: crate::store::DEFAULT_MAX_EVENT_BYTES,
            tls: PostgresTls::default(),
            read_url: None,
            read_max_lag: Duration::from_secs(5),
        }
    }

    pub fn tls(mut self, tls: PostgresTls) -> Self {
        self.tls = tls;
        self
    }

    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    pub fn pool_size(mut self, pool_size: usize) -> Self {
        self.pool_size = pool_size;
        self
    }
}

/// An event store in Postgres.
pub struct PostgresStore {
    pub(super) pool: Pool,
    pub(super) pg_config: tokio_postgres::Config,
    /// The TLS connector every connection of this store uses, and what explains
    /// its failures.
    pub(super) tls: MakeTlsConnector,
    pub(super) tls_context: TlsContext,
    /// Whether new connections open, for readiness and for logging once.
    pub(super) health: ConnectHealth,
    /// The standby that reads of events go to, if any (`replica.rs`).
    pub(super) replica: Option<Replica>,
    pub(super) schema: String,
    pub(super) sql: Sql,
    pub(super) notifier: Notifier,
    pub(super) listener: OnceCell<listener::Listener>,
    pub(super) announcer: announcer::Announcer,
    /// Partition statements, built on first use.
    pub(super) partition_sql: PartitionCache,
    /// The largest event accepted, in bytes.
    pub(super) max_event_bytes: usize,
}

/// The statements, with the schema written in.
pub(super) struct Sql {
    pub(super) append: String,
    pub(super) read_log: String,
    pub(super) read_category: String,
    pub(super) read_stream: String,
    pub(super) latest: String,
    pub(super) head_log: String,
    pub(super) head_category: String,
    pub(super) backlog_log: String,
    pub(super) backlog_category: String,
    pub(super) backlog_stream: String,
    pub(super) events_table: String,
    pub(super) channel: String,
}

pub(super) const COLUMNS: &str = "tx_id, sequence, id, category, stream, position, name, payload, metadata, occurred_at, observed_at, idempotency_key";
pub(super) const BELOW_HORIZON: &str = "tx_id < pg_snapshot_xmin(pg_current_snapshot())";
/// What the log shows: everything but weir's reserved categories (`$weir`). A
/// filter on the read-order scan, which meets few reserved rows.
pub(super) const NOT_RESERVED: &str = "category NOT LIKE '$%'";

impl Sql {
    fn new(schema: &str) -> Self {
        let s = quote_identifier(schema);
        let events = format!("{s}.weir_events");
        Self {
            append: format!(
                "SELECT existing, {COLUMNS} FROM {s}.weir_append($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ),
            read_log: format!(
                "SELECT {COLUMNS} FROM {events} WHERE (tx_id, sequence) > ($1, $2) AND {BELOW_HORIZON} \
                 AND {NOT_RESERVED} ORDER BY tx_id, sequence LIMIT $3"
            ),
            read_category: format!(
                "SELECT {COLUMNS} FROM {events} WHERE category = $4 AND (tx_id, sequence) > ($1, $2) \
                 AND {BELOW_HORIZON} ORDER BY tx_id, sequence LIMIT $3"
            ),
            // Appends to one stream are serialised, so its positions agree with read
            // order and nothing can commit behind a reader: no horizon needed, and a
            // writer reads its own appends at once.
            read_stream: format!(
                "SELECT {COLUMNS} FROM {events} WHERE category = $4 AND stream = $5 \
                 AND (tx_id, sequence) > ($1, $2) ORDER BY position LIMIT $3"
            ),
            latest: format!(
                "SELECT {COLUMNS} FROM {events} WHERE category = $1 AND stream = $2 \
                 ORDER BY position DESC LIMIT 1"
            ),
            head_log: format!(
                "SELECT {COLUMNS} FROM {events} WHERE {BELOW_HORIZON} AND {NOT_RESERVED} \
                 ORDER BY tx_id DESC, sequence DESC LIMIT 1"
            ),
            head_category: format!(
                "SELECT {COLUMNS} FROM {events} WHERE category = $1 AND {BELOW_HORIZON} \
                 ORDER BY tx_id DESC, sequence DESC LIMIT 1"
            ),
            // Counted over the first `limit` rows in read order, so a sample costs
            // at most `limit` index entries however far the reader is behind.
            backlog_log: format!(
                "SELECT count(*), min(observed_at) FROM (SELECT observed_at FROM {events} \
                 WHERE (tx_id, sequence) > ($1, $2) AND {BELOW_HORIZON} AND {NOT_RESERVED} \
                 ORDER BY tx_id, sequence LIMIT $3) AS backlog"
            ),
            backlog_category: format!(
                "SELECT count(*), min(observed_at) FROM (SELECT observed_at FROM {events} \
                 WHERE category = $4 AND (tx_id, sequence) > ($1, $2) AND {BELOW_HORIZON} \
                 ORDER BY tx_id, sequence LIMIT $3) AS backlog"
            ),
            backlog_stream: format!(
                "SELECT count(*), min(observed_at) FROM (SELECT observed_at FROM {events} \
                 WHERE category = $4 AND stream = $5 AND (tx_id, sequence) > ($1, $2) \
                 ORDER BY position LIMIT $3) AS backlog"
            ),
            events_table: events.clone(),
            channel: format!("{schema}.appended"),
        }
    }
}

/// Quotes a schema name for SQL text. Config validation keeps schema names simple;
/// quoting makes the SQL right whatever gets here.
pub(crate) fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PostgresStore {
    /// Builds the pool. Connections are made on first use; call [`Self::check_schema`]
    /// (or [`Self::migrate`]) to find out at once whether the database is reachable.
    pub fn connect(options: &PostgresStoreOptions) -> Result<Self> {
        let Prepared {
            config: mut pg_config,
            connector,
            context,
        } = tls::prepare(&options.url, &options.tls)
            .map_err(|e| Error::Backend(format!("invalid [store] url or [store.tls]: {e}")))?;
        pg_config.connect_timeout(options.connect_timeout);
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("weir");
        }
        let pool = build_pool(&pg_config, &connector, options)?;
        let replica = match &options.read_url {
            None => None,
            Some(url) => {
                let prepared = tls::prepare(url, &options.tls).map_err(|e| {
                    Error::Backend(format!("invalid [store] read_url or [store.tls]: {e}"))
                })?;
                let mut config = prepared.config;
                config.connect_timeout(options.connect_timeout);
                if config.get_application_name().is_none() {
                    config.application_name("weir");
                }
                let pool = build_pool(&config, &prepared.connector, options)?;
                Some(Replica::new(pool, prepared.context, options.read_max_lag))
            }
        };
        let sql = Sql::new(&options.schema);
        Ok(Self {
            announcer: announcer::Announcer::new(pool.clone(), sql.channel.clone()),
            pool,
            pg_config,
            tls: connector,
            tls_context: context,
            health: ConnectHealth::default(),
            replica,
            schema: options.schema.clone(),
            sql,
            notifier: Notifier::default(),
            listener: OnceCell::new(),
            partition_sql: PartitionCache::default(),
            max_event_bytes: options.max_event_bytes,
        })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// A pooled connection, retried with backoff while the database is unreachable.
    /// For tools (migrations, benchmarks).
    pub async fn client(&self) -> Result<Object> {
        retry(|| self.connection()).await
    }

    /// A connection with `sql` prepared on it, retried with backoff: nothing has run yet.
    async fn prepared(&self, sql: &str) -> Result<(Object, tokio_postgres::Statement)> {
        retry(|| async {
            let client = self.connection().await?;
            let statement = client.prepare_cached(sql).await.map_err(classify)?;
            Ok((client, statement))
        })
        .await
    }

    /// Runs one statement on a pooled connection. Only getting the connection and
    /// preparing are retried: once sent, a statement's outcome is unknown, so its
    /// caller decides whether sending it again is safe (a lease renewal is tried
    /// again anyway; an insert is not).
    pub(crate) async fn query_once(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let (client, statement) = self.prepared(sql).await?;
        client.query(&statement, params).await.map_err(classify)
    }

    /// As [`PostgresStore::query_once`], returning how many rows it changed.
    pub(crate) async fn execute_once(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        let (client, statement) = self.prepared(sql).await?;
        client.execute(&statement, params).await.map_err(classify)
    }

    /// Runs a read-only query, retried with backoff when the connection fails.
    pub(super) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        retry(|| async {
            let client = self.connection().await?;
            let statement = client.prepare_cached(sql).await.map_err(classify)?;
            client.query(&statement, params).await.map_err(classify)
        })
        .await
    }

    /// Runs a read of events and decodes each row as it arrives, while the server
    /// is still sending the rest: decoding is most of a read's client time, and
    /// collecting every row first left the server idle meanwhile. Retried as
    /// [`PostgresStore::query`].
    async fn read_events(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<StoredEvent>> {
        retry(|| async {
            let client = self.reads_connection().await?;
            let statement = client.prepare_cached(sql).await.map_err(classify)?;
            let rows = client
                .query_raw(&statement, params.iter().copied())
                .await
                .map_err(classify)?;
            futures::pin_mut!(rows);
            let mut events = Vec::new();
            while let Some(row) = rows.next().await {
                events.push(event_from_row(&row.map_err(classify)?, 0)?);
            }
            Ok(events)
        })
        .await
    }

    async fn append_once(
        &self,
        category: &Category,
        appends: &[StreamAppend],
        ids: &[Uuid],
    ) -> Result<AppendAttempt> {
        // Only getting a connection and preparing are retried: once the append is
        // sent, a lost connection leaves its outcome unknown, and a retry could write
        // twice (idempotency keys make such retries safe for callers).
        let (client, statement) = self.prepared(&self.sql.append).await?;
        append_on(&**client, &statement, category, appends, ids).await
    }

    async fn one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<StoredEvent>> {
        let rows = self.query(sql, params).await?;
        rows.first().map(|row| event_from_row(row, 0)).transpose()
    }

    /// As `one`, on a connection for reading events (the standby's, if in use).
    async fn one_reads(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<StoredEvent>> {
        let rows = self.query_reads(sql, params).await?;
        rows.first().map(|row| event_from_row(row, 0)).transpose()
    }
}

/// Runs `weir_append` (prepared as `statement`) for `appends` with `ids` on
/// `client`, a connection or a transaction.
pub(super) async fn append_on(
    client: &(impl tokio_postgres::GenericClient + Sync),
    statement: &tokio_postgres::Statement,
    category: &Category,
    appends: &[StreamAppend],
    ids: &[Uuid],
) -> Result<AppendAttempt> {
    let events = appends
        .iter()
        .flat_map(|a| a.events.iter().map(move |e| (&a.stream, e)));
    let count = appends.iter().map(|a| a.events.len()).sum();
    let mut streams = Vec::with_capacity(count);
    let mut names = Vec::with_capacity(count);
    let mut payloads = Vec::with_capacity(count);
    let mut metadata = Vec::with_capacity(count);
    let mut occurred_at = Vec::with_capacity(count);
    let mut keys = Vec::with_capacity(count);
    for (stream, event) in events {
        streams.push(stream.as_str());
        names.push(event.name.as_str());
        payloads.push(&event.payload);
        metadata.push(&event.metadata);
        occurred_at.push(event.occurred_at);
        keys.push(event.idempotency_key.as_ref().map(IdempotencyKey::as_str));
    }
    let conditions: serde_json::Map<String, Value> = appends
        .iter()
        .filter_map(|a| match a.condition.accepted_heads() {
            AcceptedHeads::All => None,
            AcceptedHeads::Only(heads) => Some((
                a.stream.to_string(),
                heads.into_iter().map(|h| h.map_or(-1, to_i64)).collect(),
            )),
        })
        .collect();
    let conditions = Value::Object(conditions);

    client
        .query(
            statement,
            &[
                &category.as_str(),
                &streams,
                &ids,
                &names,
                &payloads,
                &metadata,
                &occurred_at,
                &keys,
                &conditions,
            ],
        )
        .await
        .map(AppendAttempt::Written)
        .or_else(|error| append_failure(error, category, appends))
}

/// The age of the transaction holding the oldest transaction id still in progress
/// anywhere on the server: transaction ids are server-wide, and so is the horizon
/// readers stop at. `pg_stat_activity` shows other roles' transactions only to
/// superusers and members of `pg_read_all_stats`.
const HORIZON_SQL: &str = "SELECT coalesce(extract(epoch FROM clock_timestamp() - xact_start)::float8, 0) \
     FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
     ORDER BY age(backend_xid) DESC LIMIT 1";

#[async_trait]
impl EventStore for PostgresStore {
    async fn append_batch(
        &self,
        category: &Category,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<StoredEvent>> {
        crate::store::check_category(category)?;
        validate_batch(&appends)?;
        crate::store::check_sizes(category, &appends, self.max_event_bytes)?;
        let ids: Vec<Uuid> = appends
            .iter()
            .flat_map(|a| a.events.iter().map(|e| e.id.unwrap_or_else(Uuid::now_v7)))
            .collect();
        // Two writers racing to store one idempotency key: the loser's insert hits the
        // unique index and writes nothing; its retry finds the winner's event.
        let mut attempts = 0;
        let rows = loop {
            attempts += 1;
            match self.append_once(category, &appends, &ids).await? {
                AppendAttempt::Written(rows) => break rows,
                AppendAttempt::IdempotencyRace if attempts < 3 => continue,
                AppendAttempt::IdempotencyRace => {
                    return Err(Error::Backend(
                        "an idempotency key kept colliding with concurrent appends".into(),
                    ));
                }
            }
        };
        let stored = assemble(category, appends, &ids, &rows)?;
        if rows.iter().any(|row| !row.get::<_, bool>(0)) {
            self.announcer.announce(category).await;
        }
        Ok(stored)
    }

    async fn read(&self, source: &Source, after: Cursor, limit: usize) -> Result<Vec<StoredEvent>> {
        let tx = Xid8(after.tx_id);
        let sequence = to_i64(after.sequence);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match source {
            Source::Log => {
                return self
                    .read_events(&self.sql.read_log, &[&tx, &sequence, &limit])
                    .await;
            }
            Source::Category(category) => {
                return self
                    .read_events(
                        &self.sql.read_category,
                        &[&tx, &sequence, &limit, &category.as_str()],
                    )
                    .await;
            }
            Source::Stream(category, stream) => {
                return self
                    .read_events(
                        &self.sql.read_stream,
                        &[&tx, &sequence, &limit, &category.as_str(), &stream.as_str()],
                    )
                    .await;
            }
            Source::LogPartition(p) => {
                let query = PartitionQuery::log(*p);
                self.partition_rows(Statement::Read, query, after, limit)
                    .await?
            }
            Source::CategoryPartition(c, p) => {
                let query = PartitionQuery::category(c, *p);
                self.partition_rows(Statement::Read, query, after, limit)
                    .await?
            } // What ingest reads lives on its bus: no event of the store is in it.
            Source::Ingest(_) => return Ok(Vec::new()),
        };
        rows.iter().map(|row| event_from_row(row, 0)).collect()
    }

    async fn latest(
        &self,
        category: &Category,
        stream: &StreamName,
    ) -> Result<Option<StoredEvent>> {
        self.one(&self.sql.latest, &[&category.as_str(), &stream.as_str()])
            .await
    }

    async fn head(&self, source: &Source) -> Result<Option<StoredEvent>> {
        match source {
            Source::Log => self.one_reads(&self.sql.head_log, &[]).await,
            Source::Category(category) => {
                self.one_reads(&self.sql.head_category, &[&category.as_str()])
                    .await
            }
            Source::Stream(category, stream) => self.latest(category, stream).await,
            Source::LogPartition(p) => self.partition_head(PartitionQuery::log(*p)).await,
            Source::CategoryPartition(c, p) => {
                self.partition_head(PartitionQuery::category(c, *p)).await
            }
            Source::Ingest(_) => Ok(None),
        }
    }

    async fn backlog(&self, source: &Source, after: Cursor, limit: u64) -> Result<Backlog> {
        let tx = Xid8(after.tx_id);
        let sequence = to_i64(after.sequence);
        let limit = to_i64(limit);
        let rows = match source {
            Source::Log => {
                self.query_reads(&self.sql.backlog_log, &[&tx, &sequence, &limit])
                    .await?
            }
            Source::Category(category) => {
                self.query_reads(
                    &self.sql.backlog_category,
                    &[&tx, &sequence, &limit, &category.as_str()],
                )
                .await?
            }
            Source::Stream(category, stream) => {
                self.query_reads(
                    &self.sql.backlog_stream,
                    &[&tx, &sequence, &limit, &category.as_str(), &stream.as_str()],
                )
                .await?
            }
            Source::LogPartition(p) => {
                let query = PartitionQuery::log(*p);
                self.partition_rows(Statement::Backlog, query, after, limit)
                    .await?
            }
            Source::CategoryPartition(c, p) => {
                let query = PartitionQuery::category(c, *p);
                self.partition_rows(Statement::Backlog, query, after, limit)
                    .await?
            }
            Source::Ingest(_) => return Ok(Backlog::default()),
        };
        let row = rows
            .first()
            .ok_or_else(|| Error::Backend("a count returned no row".into()))?;
        Ok(Backlog {
            events: non_negative(row.try_get(0).map_err(classify)?)?,
            oldest: row.try_get(1).map_err(classify)?,
        })
    }

    async fn events_by_id(&self, ids: &[Uuid]) -> Result<Vec<StoredEvent>> {
        // One lookup in the unique index on id (constraint weir_events_id).
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE id = ANY($1) ORDER BY tx_id, sequence",
            self.sql.events_table
        );
        let rows = self.query(&sql, &[&ids]).await?;
        rows.iter().map(|row| event_from_row(row, 0)).collect()
    }

    async fn ping(&self) -> Result<()> {
        self.check_new_connections().await?;
        let client = self.connection().await?;
        let exists: bool = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&self.sql.events_table],
            )
            .await
            .map_err(classify)?
            .get(0);
        if exists {
            Ok(())
        } else {
            Err(Error::Backend(format!(
                "the store schema {:?} has no weir_events table: run `weir migrate`, or check store.schema",
                self.schema
            )))
        }
    }

    async fn visibility_horizon(&self) -> Result<Duration> {
        let rows = self.query(HORIZON_SQL, &[]).await?;
        let seconds: f64 = match rows.first() {
            Some(row) => row.try_get(0).map_err(classify)?,
            None => 0.0,
        };
        // A transaction that began a moment before clock_timestamp() was read on
        // another backend can come out a hair below zero.
        Ok(Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or_default())
    }

    async fn prune(
        &self,
        category: &Category,
        before: DateTime<Utc>,
        read_up_to: Option<Cursor>,
    ) -> Result<u64> {
        crate::store::check_reserved(category)?;
        self.prune_reserved(category, before, read_up_to).await
    }

    async fn watch(&self) -> Result<AppendWatcher> {
        // Subscribe before LISTEN is confirmed, so no notice after it is missed.
        let watcher = self.notifier.watch();
        self.listener
            .get_or_try_init(|| {
                listener::Listener::start(
                    Prepared {
                        config: self.pg_config.clone(),
                        connector: self.tls.clone(),
                        context: self.tls_context.clone(),
                    },
                    self.sql.channel.clone(),
                    self.notifier.clone(),
                )
            })
            .await?;
        Ok(watcher)
    }
}

/// The stored events, in the order given: written ones from what the caller gave and
/// what the store assigned, idempotent repeats as they were stored.
fn assemble(
    category: &Category,
    appends: Vec<StreamAppend>,
    ids: &[Uuid],
    rows: &[Row],
) -> Result<Vec<StoredEvent>> {
    let mut written = HashMap::new();
    let mut repeated = HashMap::new();
    for row in rows {
        if row.try_get::<_, bool>(0).map_err(classify)? {
            let event = event_from_row(row, 1)?;
            if let Some(key) = event.idempotency_key.clone() {
                repeated.insert(key, event);
            }
        } else {
            let id: Uuid = row.try_get(3).map_err(classify)?;
            written.insert(id, row);
        }
    }
    let mut ids = ids.iter();
    let mut stored = Vec::with_capacity(ids.len());
    for append in appends {
        for event in append.events {
            let id = *ids
                .next()
                .ok_or_else(|| Error::Backend("an event without an id".into()))?;
            if let Some(repeat) = event.idempotency_key.as_ref().and_then(|k| repeated.get(k)) {
                stored.push(repeat.clone());
                continue;
            }
            let row = written.get(&id).ok_or_else(|| {
                Error::Backend(format!("weir_append returned nothing for event {id}"))
            })?;
            let tx: Xid8 = row.try_get(1).map_err(classify)?;
            let sequence = non_negative(row.try_get(2).map_err(classify)?)?;
            stored.push(StoredEvent {
                id,
                name: event.name,
                category: category.clone(),
                stream: append.stream.clone(),
                position: non_negative(row.try_get(6).map_err(classify)?)?,
                sequence,
                payload: event.payload,
                metadata: event.metadata,
                occurred_at: store_precision(event.occurred_at),
                observed_at: row.try_get(11).map_err(classify)?,
                idempotency_key: event.idempotency_key,
                cursor: Cursor::new(tx.0, sequence),
            });
        }
    }
    Ok(stored)
}

fn non_negative(value: i64) -> Result<u64> {
    u64::try_from(value)
        .map_err(|_| Error::Backend(format!("negative value {value} in the event table")))
}

pub(super) enum AppendAttempt {
    Written(Vec<Row>),
    /// A concurrent append stored one of the batch's idempotency keys first; nothing
    /// was written, and a retry returns that event.
    IdempotencyRace,
}

fn append_failure(
    error: tokio_postgres::Error,
    category: &Category,
    appends: &[StreamAppend],
) -> Result<AppendAttempt> {
    let Some(db) = error.as_db_error() else {
        return Err(classify(error));
    };
    if db.code().code() == "WE001" {
        let failed = appends
            .iter()
            .find(|a| Some(a.stream.as_str()) == db.detail())
            .ok_or_else(|| Error::Backend(db.message().to_owned()))?;
        return Err(Error::WriteConditionFailed {
            category: category.clone(),
            stream: failed.stream.clone(),
            condition: failed.condition.clone(),
            last_position: db
                .hint()
                .and_then(|h| h.parse::<i64>().ok())
                .and_then(|p| u64::try_from(p).ok()),
        });
    }
    if *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
        && db.constraint() == Some("weir_events_idempotency")
    {
        return Ok(AppendAttempt::IdempotencyRace);
    }
    Err(classify(error))
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(super) fn event_from_row(row: &Row, first: usize) -> Result<StoredEvent> {
    let get_u64 = |i: usize| -> Result<u64> {
        let value: i64 = row.try_get(first + i).map_err(classify)?;
        u64::try_from(value)
            .map_err(|_| Error::Backend(format!("negative value {value} in the event table")))
    };
    let tx: Xid8 = row.try_get(first).map_err(classify)?;
    let sequence = get_u64(1)?;
    let text = |i: usize| -> Result<String> { row.try_get(first + i).map_err(classify) };
    let key: Option<String> = row.try_get(first + 11).map_err(classify)?;
    Ok(StoredEvent {
        id: row.try_get(first + 2).map_err(classify)?,
        category: Category::new(text(3)?)?,
        stream: StreamName::new(text(4)?)?,
        position: get_u64(5)?,
        name: EventName::new(text(6)?)?,
        payload: row.try_get(first + 7).map_err(classify)?,
        metadata: row.try_get(first + 8).map_err(classify)?,
        occurred_at: row
            .try_get::<_, DateTime<Utc>>(first + 9)
            .map_err(classify)?,
        observed_at: row
            .try_get::<_, DateTime<Utc>>(first + 10)
            .map_err(classify)?,
        idempotency_key: key.map(IdempotencyKey::new).transpose()?,
        sequence,
        cursor: Cursor::new(tx.0, sequence),
    })
}
