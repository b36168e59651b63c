//! `weir bench`: measure weir against raw baselines of the same database in the same
//! run, since absolute figures on shared machines mean little. Prints one JSON line per
//! result; timing targets live here and in BENCHMARKS.md, never in tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::CliError;

mod allocate;
mod baseline_encoding;
mod bridge;
mod latency;
mod nodes;
mod partitions;
use crate::config::{Config, StoreKind};
use crate::event::{Category, Cursor, EventName, NewEvent, Source, StreamName, WriteCondition};
use crate::store::{EventStore, MemoryStore};

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Append N events in batches of B from W concurrent writers; on Postgres, beside
    /// a raw `INSERT … SELECT generate_series` of the same rows, batches and writers.
    /// On Postgres both run in a scratch schema created and dropped by the bench.
    Append(AppendArgs),
    /// Read one category of N events page by page; on Postgres, beside a raw `COPY`
    /// of the same rows.
    Read(ReadArgs),
    /// Compute allocation decisions for S subscribers x N sources: from scratch, and
    /// when one more subscriber joins the balanced group. No store needed.
    Allocate(AllocateArgs),
    /// Consume N events of one category with a no-op processor through the
    /// runtime, beside a raw COPY of the same rows; then time single appends from
    /// the append call to the processor (woken by notification).
    Consume(ConsumeArgs),
    /// Forward N events of one category from the store through a consumer and
    /// its NATS or Kafka sink, beside a plain client publishing the same messages.
    Bridge(bridge::BridgeArgs),
    /// Consume one category of N events over many streams as 1, 2, 4, 8 and 16
    /// partitions spread over three in-process nodes, through a processor that
    /// waits a fixed time per batch; then the cost of reading one partition of 16
    /// beside a sixteenth of the category.
    Partitions(partitions::PartitionsArgs),
    /// End-to-end latency: two `weir run` nodes forward a category to NATS or
    /// Kafka while the bench appends at steady rates and a plain client
    /// subscribed to the destination times each event from its append.
    Latency(latency::LatencyArgs),
}

#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per batch handed to the processor.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Store the checkpoint after this many events.
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: u64,
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Each side runs this many times; the best run counts.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Single events appended one after another for the latency measurement.
    #[arg(long, default_value_t = 500)]
    latency_events: usize,
    /// Pause between those appends.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    latency_interval: Duration,
}

#[derive(Debug, clap::Args)]
pub struct AllocateArgs {
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 100_000)]
    sources: usize,
    /// Groups of the partitioned-fleet case, each of `--subscribers` subscribers.
    #[arg(long, default_value_t = 100)]
    groups: usize,
    /// Partitions of each group's category in the partitioned-fleet case.
    #[arg(long, default_value_t = 64)]
    partitions: u32,
    /// Each case runs this many times; the best run counts.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Debug, clap::Args)]
pub struct AppendArgs {
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    #[arg(long, default_value_t = 100)]
    batch: usize,
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Distinct streams the batches are spread over.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Rounds of each side, alternating; the median counts.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per read query.
    #[arg(long, default_value_t = 1000)]
    page: usize,
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Each side runs this many times; the best run counts.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

pub async fn run(config: &Config, bench: Bench) -> Result<(), CliError> {
    let (target, outcome) = match bench {
        Bench::Allocate(args) => return allocate::run(&args),
        Bench::Append(args) => {
            let target = Target::open(config).await?;
            let outcome = append(&target, &args).await;
            (target, outcome)
        }
        Bench::Read(args) => {
            let target = Target::open(config).await?;
            let outcome = read(&target, &args).await;
            (target, outcome)
        }
        Bench::Consume(args) => {
            let target = Target::open(config).await?;
            let outcome = consume::run(&target, &args).await;
            (target, outcome)
        }
        Bench::Partitions(args) => {
            let target = Target::open(config).await?;
            let outcome = partitions::run(&target, &args).await;
            (target, outcome)
        }
        Bench::Bridge(args) => {
            let target = Target::open(config).await?;
            let outcome = bridge::run(config, &target, &args).await;
            (target, outcome)
        }
        Bench::Latency(args) => {
            let target = Target::open(config).await?;
            let outcome = latency::run(config, &target, &args).await;
            (target, outcome)
        }
    };
    target.close().await?;
    outcome
}

/// The store under test, and on Postgres the raw access the baselines need.
struct Target {
    store: Arc<dyn EventStore>,
    backend: &'static str,
    #[cfg(feature = "postgres")]
    postgres: Option<Arc<crate::postgres::PostgresStore>>,
}

impl Target {
    async fn open(config: &Config) -> Result<Self, CliError> {
        match config.store.kind {
            StoreKind::Memory => Ok(Self {
                store: Arc::new(MemoryStore::new()),
                backend: "memory",
                #[cfg(feature = "postgres")]
                postgres: None,
            }),
            #[cfg(feature = "postgres")]
            StoreKind::Postgres => {
                // A scratch schema of its own, so weir and the raw baseline both start
                // from empty tables, whatever earlier runs left in the configured one.
                let mut scratch = config.clone();
                scratch.store.schema = format!(
                    "weir_bench_{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..12]
                );
                let store = Arc::new(super::open_postgres(&scratch)?);
                store.migrate().await?;
                Ok(Self {
                    store: store.clone(),
                    backend: "postgres",
                    postgres: Some(store),
                })
            }
            #[cfg(not(feature = "postgres"))]
            StoreKind::Postgres => Err(CliError::Usage(
                "this weir was built without the `postgres` feature".into(),
            )),
        }
    }
}

impl Target {
    /// Drops the scratch schema, if any.
    async fn close(&self) -> Result<(), CliError> {
        #[cfg(feature = "postgres")]
        if let Some(postgres) = &self.postgres {
            let schema = crate::postgres::quote_identifier(postgres.schema());
            postgres
                .client()
                .await?
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await
                .map_err(|e| CliError::Store(crate::store::Error::Backend(e.to_string())))?;
        }
        Ok(())
    }
}

fn emit(line: Value) {
    println!("{line}");
}

fn rate(events: usize, elapsed: Duration) -> f64 {
    (events as f64 / elapsed.as_secs_f64()).round()
}

fn payload(bytes: usize) -> Value {
    json!({ "amount": 42, "currency": "EUR", "note": "x".repeat(bytes) })
}

fn bench_category() -> Category {
    Category::new(format!(
        "bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ))
    .expect("a valid generated name")
}

fn check_sizes(events: usize, batch: usize, writers: usize) -> Result<(), CliError> {
    if events == 0 || batch == 0 || writers == 0 {
        return Err(CliError::Usage(
            "--events, --batch and --writers must be at least 1".into(),
        ));
    }
    Ok(())
}

async fn append(target: &Target, args: &AppendArgs) -> Result<(), CliError> {
    check_sizes(args.events, args.batch, args.writers)?;
    let batches = args.events.div_ceil(args.batch);
    let appended = batches * args.batch;
    let payload = payload(args.payload_bytes);
    #[cfg(feature = "postgres")]
    if let Some(postgres) = &target.postgres {
        raw::create_table(postgres).await?;
    }

    // Rounds alternate weir and raw, so both meet tables grown alike and the same
    // moods of a shared machine; the median of each side counts.
    let mut weir_rates = Vec::new();
    let mut raw_rates = Vec::new();
    for round in 0..args.rounds.max(1) {
        let elapsed = append_round(target, args, batches, &payload).await?;
        weir_rates.push(rate(appended, elapsed));
        #[cfg(feature = "postgres")]
        if let Some(postgres) = &target.postgres {
            let elapsed = raw::insert(postgres, args, batches, &payload, round).await?;
            raw_rates.push(rate(appended, elapsed));
        }
        #[cfg(not(feature = "postgres"))]
        let _ = round;
    }
    let weir_rate = median(&weir_rates);
    emit(json!({
        "bench": "append", "backend": target.backend, "events": appended,
        "batch": args.batch, "writers": args.writers, "events_per_sec": weir_rate,
        "rounds": weir_rates,
    }));
    if !raw_rates.is_empty() {
        let raw_rate = median(&raw_rates);
        emit(json!({
            "bench": "append_raw_insert", "backend": "postgres", "events": appended,
            "batch": args.batch, "writers": args.writers, "events_per_sec": raw_rate,
            "rounds": raw_rates,
        }));
        emit(json!({
            "bench": "append_vs_raw", "ratio": (weir_rate / raw_rate * 1000.0).round() / 1000.0,
        }));
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// One round of appends, into a category of its own.
async fn append_round(
    target: &Target,
    args: &AppendArgs,
    batches: usize,
    payload: &Value,
) -> Result<Duration, CliError> {
    let category = bench_category();
    let name = EventName::new("BenchEvent").expect("a valid literal name");
    let started = Instant::now();
    let mut writers = JoinSet::new();
    for writer in 0..args.writers {
        let store = target.store.clone();
        let (category, name, payload) = (category.clone(), name.clone(), payload.clone());
        let (count, batch, streams) = (args.writers, args.batch, args.streams.max(1));
        writers.spawn(async move {
            for index in (writer..batches).step_by(count) {
                let stream = StreamName::new(format!("s-{}", index % streams))
                    .expect("a valid generated name");
                let events = (0..batch)
                    .map(|_| NewEvent::new(name.clone(), payload.clone()))
                    .collect();
                store
                    .append(&category, &stream, WriteCondition::Any, events)
                    .await?;
            }
            Ok::<_, crate::store::Error>(())
        });
    }
    while let Some(joined) = writers.join_next().await {
        joined.map_err(|e| CliError::Io(std::io::Error::other(e)))??;
    }
    Ok(started.elapsed())
}

/// A new category holding `events` events, appended 1,000 to a stream.
async fn fill(target: &Target, events: usize, payload_bytes: usize) -> Result<Category, CliError> {
    let category = bench_category();
    let name = EventName::new("BenchEvent").expect("a valid literal name");
    let payload = payload(payload_bytes);
    let mut left = events;
    let mut stream_index = 0;
    while left > 0 {
        let batch = left.min(1000);
        let stream = StreamName::new(format!("s-{stream_index}")).expect("a valid generated name");
        let events = (0..batch)
            .map(|_| NewEvent::new(name.clone(), payload.clone()))
            .collect();
        target
            .store
            .append(&category, &stream, WriteCondition::Any, events)
            .await?;
        left -= batch;
        stream_index += 1;
    }
    Ok(category)
}

async fn read(target: &Target, args: &ReadArgs) -> Result<(), CliError> {
    check_sizes(args.events, args.page, 1)?;
    let category = fill(target, args.events, args.payload_bytes).await?;

    let source = Source::Category(category.clone());
    let mut best = Duration::MAX;
    for _ in 0..args.rounds.max(1) {
        let started = Instant::now();
        let mut cursor = Cursor::START;
        let mut count = 0;
        loop {
            let page = target.store.read(&source, cursor, args.page).await?;
            let Some(last) = page.last() else { break };
            cursor = last.cursor;
            count += page.len();
        }
        best = best.min(started.elapsed());
        if count != args.events {
            return Err(CliError::Io(std::io::Error::other(format!(
                "read {count} events of the {} appended",
                args.events
            ))));
        }
    }
    let weir_rate = rate(args.events, best);
    emit(json!({
        "bench": "read", "backend": target.backend, "events": args.events,
        "page": args.page, "seconds": best.as_secs_f64(), "events_per_sec": weir_rate,
    }));

    #[cfg(feature = "postgres")]
    if let Some(postgres) = &target.postgres {
        let raw = raw::copy(postgres, &category, args.rounds.max(1)).await?;
        let raw_rate = rate(args.events, raw);
        emit(json!({
            "bench": "read_raw_copy", "backend": "postgres", "events": args.events,
            "seconds": raw.as_secs_f64(), "events_per_sec": raw_rate,
        }));
        emit(json!({
            "bench": "read_vs_raw", "ratio": (weir_rate / raw_rate * 1000.0).round() / 1000.0,
        }));
    }
    Ok(())
}

/// `weir bench consume`: the runtime end to end, with a processor that only counts.
pub(super) mod consume {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use tokio::sync::Notify;

    use super::*;
    use crate::broker::{SingletonBroker, SubscriberSpec};
    use crate::consumer::{ConsumerSettings, EventProcessor, ProcessError};
    use crate::event::StoredEvent;
    use crate::runtime::{ConsumerStores, EventRuntime};

    /// Counts events and notes when each was first seen.
    #[derive(Default)]
    pub(super) struct Counter {
        seen: AtomicUsize,
        wanted: AtomicUsize,
        done: Notify,
        first_seen: Mutex<HashMap<uuid::Uuid, Instant>>,
        timing: bool,
    }

    #[async_trait]
    impl EventProcessor for Counter {
        async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
            if self.timing {
                let now = Instant::now();
                let mut first_seen = self.first_seen.lock().unwrap_or_else(|e| e.into_inner());
                for event in events {
                    first_seen.entry(event.id).or_insert(now);
                }
            }
            let seen = self.seen.fetch_add(events.len(), Ordering::SeqCst) + events.len();
            if seen >= self.wanted.load(Ordering::SeqCst) {
                self.done.notify_one();
            }
            Ok(())
        }
    }

    impl Counter {
        pub(super) async fn wait_for(&self, count: usize) {
            self.wanted.store(count, Ordering::SeqCst);
            while self.seen.load(Ordering::SeqCst) < count {
                // Notified, or a poll, should the notification come between the
                // check and the wait.
                let _ = tokio::time::timeout(Duration::from_millis(50), self.done.notified()).await;
            }
        }
    }

    pub(super) fn stores(target: &Target) -> ConsumerStores {
        #[cfg(feature = "postgres")]
        if let Some(postgres) = &target.postgres {
            return ConsumerStores::postgres(Arc::clone(postgres));
        }
        ConsumerStores::in_memory(Arc::clone(&target.store))
    }

    /// A runtime consuming `source` as group `group` with `processor`.
    pub(super) async fn start(
        target: &Target,
        group: &str,
        source: Source,
        processor: Arc<dyn EventProcessor>,
        settings: ConsumerSettings,
    ) -> Result<EventRuntime, CliError> {
        let runtime = EventRuntime::new(
            "bench",
            Arc::new(SingletonBroker::new()),
            stores(target),
            settings,
        );
        let spec = SubscriberSpec::new(group, "bench-1", [source]);
        runtime
            .register_subscription_consumer(spec, processor, None)
            .map_err(|e| CliError::Usage(e.to_string()))?;
        runtime
            .start()
            .await
            .map_err(|e| CliError::Usage(e.to_string()))?;
        Ok(runtime)
    }

    pub(super) async fn run(target: &Target, args: &ConsumeArgs) -> Result<(), CliError> {
        check_sizes(args.events, args.batch, 1)?;
        let settings = ConsumerSettings {
            batch_size: args.batch,
            checkpoint_every: args.checkpoint_every.max(1),
            ..ConsumerSettings::default()
        };
        let category = fill(target, args.events, args.payload_bytes).await?;
        let source = Source::Category(category.clone());

        let mut best = Duration::MAX;
        for round in 0..args.rounds.max(1) {
            // A group of its own per round: it starts from the first event.
            let counter = Arc::new(Counter::default());
            let started = Instant::now();
            let runtime = start(
                target,
                &format!("bench-{round}"),
                source.clone(),
                Arc::clone(&counter) as Arc<dyn EventProcessor>,
                settings.clone(),
            )
            .await?;
            counter.wait_for(args.events).await;
            best = best.min(started.elapsed());
            runtime.stop().await;
        }
        let weir_rate = rate(args.events, best);
        emit(json!({
            "bench": "consume", "backend": target.backend, "events": args.events,
            "batch": args.batch, "checkpoint_every": args.checkpoint_every,
            "seconds": best.as_secs_f64(), "events_per_sec": weir_rate,
        }));
        #[cfg(feature = "postgres")]
        if let Some(postgres) = &target.postgres {
            let raw = raw::copy(postgres, &category, args.rounds.max(1)).await?;
            let raw_rate = rate(args.events, raw);
            emit(json!({
                "bench": "consume_raw_copy", "backend": "postgres", "events": args.events,
                "seconds": raw.as_secs_f64(), "events_per_sec": raw_rate,
            }));
            emit(json!({
                "bench": "consume_vs_raw", "ratio": (weir_rate / raw_rate * 1000.0).round() / 1000.0,
            }));
        }
        if args.latency_events > 0 {
            latency(target, args, settings).await?;
        }
        Ok(())
    }

    /// Appends single events one after another to a consumed category and times
    /// each from the start of its append to its arrival at the processor.
    async fn latency(
        target: &Target,
        args: &ConsumeArgs,
        settings: ConsumerSettings,
    ) -> Result<(), CliError> {
        let category = bench_category();
        let counter = Arc::new(Counter {
            timing: true,
            ..Counter::default()
        });
        let runtime = start(
            target,
            "bench-latency",
            Source::Category(category.clone()),
            Arc::clone(&counter) as Arc<dyn EventProcessor>,
            settings,
        )
        .await?;
        // Let the consumer claim its checkpoint and settle into waiting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let name = EventName::new("BenchEvent").expect("a valid literal name");
        let stream = StreamName::new("latency").expect("a valid literal name");
        let mut sent = Vec::with_capacity(args.latency_events);
        for _ in 0..args.latency_events {
            let started = Instant::now();
            let stored = target
                .store
                .append(
                    &category,
                    &stream,
                    WriteCondition::Any,
                    vec![NewEvent::new(name.clone(), json!({}))],
                )
                .await?;
            sent.extend(stored.iter().map(|event| (event.id, started)));
            tokio::time::sleep(args.latency_interval).await;
        }
        counter.wait_for(args.latency_events).await;
        runtime.stop().await;
        let first_seen = counter.first_seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut millis: Vec<f64> = sent
            .iter()
            .filter_map(|(id, started)| {
                first_seen
                    .get(id)
                    .map(|seen| seen.duration_since(*started).as_secs_f64() * 1000.0)
            })
            .collect();
        millis.sort_by(f64::total_cmp);
        let at =
            |q: f64| millis[((millis.len() as f64 * q).ceil() as usize).clamp(1, millis.len()) - 1];
        emit(json!({
            "bench": "consume_latency", "backend": target.backend, "events": millis.len(),
            "interval_ms": args.latency_interval.as_secs_f64() * 1000.0,
            "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": at(1.0),
        }));
        Ok(())
    }
}

/// The raw baselines: plain SQL against the same table shape, no weir in between.
#[cfg(feature = "postgres")]
mod raw {
    use super::*;
    use crate::postgres::PostgresStore;
    use futures::StreamExt;

    fn backend(e: impl std::fmt::Display) -> CliError {
        CliError::Store(crate::store::Error::Backend(e.to_string()))
    }

    fn raw_table(store: &PostgresStore) -> String {
        let schema = crate::postgres::quote_identifier(store.schema());
        format!("{schema}.weir_bench_raw")
    }

    /// A copy of the event table (same columns, defaults and indexes) for the raw side.
    pub(super) async fn create_table(store: &PostgresStore) -> Result<(), CliError> {
        let schema = crate::postgres::quote_identifier(store.schema());
        store
            .client()
            .await?
            .batch_execute(&format!(
                "CREATE TABLE {} (LIKE {schema}.weir_events INCLUDING ALL)",
                raw_table(store)
            ))
            .await
            .map_err(backend)
    }

    /// The same rows, batches and writers as a weir round, inserted by
    /// `INSERT … SELECT generate_series` into the copy of the event table.
    pub(super) async fn insert(
        store: &Arc<PostgresStore>,
        args: &AppendArgs,
        batches: usize,
        payload: &Value,
        round: usize,
    ) -> Result<Duration, CliError> {
        let sql = format!(
            "INSERT INTO {} (id, category, stream, position, name, payload, metadata, occurred_at) \
             SELECT gen_random_uuid(), $5::text, $1::text, $2::bigint + g, 'BenchEvent', $3::json, '{{}}', now() \
             FROM generate_series(0, $4::bigint - 1) AS g",
            raw_table(store)
        );
        let category = format!("raw-{round}");
        let started = Instant::now();
        let mut writers = JoinSet::new();
        for writer in 0..args.writers {
            let (store, sql, payload) = (store.clone(), sql.clone(), payload.clone());
            let category = category.clone();
            let (count, batch, streams) = (args.writers, args.batch as i64, args.streams.max(1));
            writers.spawn(async move {
                let client = store.client().await?;
                let statement = client.prepare(&sql).await.map_err(backend)?;
                for index in (writer..batches).step_by(count) {
                    let stream = format!("s-{}", index % streams);
                    let first = (index / streams) as i64 * batch;
                    client
                        .execute(&statement, &[&stream, &first, &payload, &batch, &category])
                        .await
                        .map_err(backend)?;
                }
                Ok::<_, CliError>(())
            });
        }
        while let Some(joined) = writers.join_next().await {
            joined.map_err(backend)??;
        }
        Ok(started.elapsed())
    }

    /// The category's rows, in read order, through `COPY … TO STDOUT`; best of `rounds`.
    pub(super) async fn copy(
        store: &PostgresStore,
        category: &Category,
        rounds: usize,
    ) -> Result<Duration, CliError> {
        let schema = crate::postgres::quote_identifier(store.schema());
        let sql = format!(
            "COPY (SELECT tx_id, sequence, id, category, stream, position, name, payload, metadata, \
             occurred_at, observed_at, idempotency_key FROM {schema}.weir_events \
             WHERE category = '{}' ORDER BY tx_id, sequence) TO STDOUT",
            category.as_str().replace('\'', "''")
        );
        let client = store.client().await?;
        let mut best = Duration::MAX;
        for _ in 0..rounds {
            let started = Instant::now();
            let stream = client.copy_out(&sql).await.map_err(backend)?;
            futures::pin_mut!(stream);
            let mut bytes = 0;
            while let Some(chunk) = stream.next().await {
                bytes += chunk.map_err(backend)?.len();
            }
            best = best.min(started.elapsed());
            if bytes == 0 {
                return Err(backend("COPY returned nothing"));
            }
        }
        Ok(best)
    }
}
