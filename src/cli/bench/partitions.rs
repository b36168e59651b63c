//! `weir bench partitions`: how partitioning one category spreads its work over a
//! fleet. One category of N events over many streams is consumed as 1, 2, 4, 8
//! and 16 partitions by consumers on three in-process nodes (a fleet over the
//! memory bus; events, checkpoints and dead letters in the configured store),
//! through a processor that waits a fixed time per batch, the stand-in for a sink
//! with network round trips. Then the cost of reading one partition of 16 beside
//! a sixteenth of reading the whole category, both from the start (a consumer far
//! behind).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::Notify;

use super::{CliError, Target, bench_category, consume::stores, emit, payload, rate};
use crate::broker::distributed::FleetServices;
use crate::broker::lease::MemoryLeaseStore;
use crate::broker::membership::MemoryMembershipStore;
use crate::broker::{BrokerRole, BrokerSettings, DistributedBroker, SubscriberSpec};
use crate::bus::MemoryBus;
use crate::consumer::{ConsumerSettings, EventProcessor, ProcessError};
use crate::event::{Category, Cursor, EventName, NewEvent, Source, StoredEvent, StreamName};
use crate::runtime::EventRuntime;
use crate::store::StreamAppend;

#[derive(Debug, clap::Args)]
pub struct PartitionsArgs {
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Streams the events are spread over, evenly.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// Events per batch handed to the processor.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// How long the processor waits per batch.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    batch_delay: Duration,
    /// Partition counts to measure, the first being the baseline.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    counts: Vec<u32>,
    /// In-process nodes sharing the partitions.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
}

pub(super) async fn run(target: &Target, args: &PartitionsArgs) -> Result<(), CliError> {
    if args.events == 0 || args.streams == 0 || args.batch == 0 || args.nodes == 0 {
        return Err(CliError::Usage(
            "--events, --streams, --batch and --nodes must be at least 1".into(),
        ));
    }
    let category = fill(target, args.events, args.streams).await?;
    let mut baseline = None;
    for &count in &args.counts {
        let sources = Source::Category(category.clone())
            .split(count)
            .map_err(|error| CliError::Usage(format!("--counts: {error}")))?;
        let elapsed = consume(target, args, sources).await?;
        let events_per_sec = rate(args.events, elapsed);
        let base = *baseline.get_or_insert(events_per_sec);
        emit(json!({
            "bench": "partitions", "backend": target.backend, "partitions": count,
            "nodes": args.nodes, "events": args.events, "streams": args.streams,
            "batch": args.batch, "batch_delay_ms": args.batch_delay.as_secs_f64() * 1000.0,
            "seconds": elapsed.as_secs_f64(), "events_per_sec": events_per_sec,
            "speedup": (events_per_sec / base * 100.0).round() / 100.0,
        }));
    }
    read_cost(target, &category).await
}

/// `events` events, one per stream in turn, appended 1,000 at a time.
async fn fill(target: &Target, events: usize, streams: usize) -> Result<Category, CliError> {
    let category = bench_category();
    let name = EventName::new("BenchEvent").expect("a valid literal name");
    let payload = payload(100);
    let mut written = 0;
    while written < events {
        let batch = (events - written).min(1000);
        let appends = (written..written + batch)
            .map(|n| {
                let stream =
                    StreamName::new(format!("s-{}", n % streams)).expect("a valid generated name");
                let event = NewEvent::new(name.clone(), payload.clone());
                StreamAppend::new(stream, crate::event::WriteCondition::Any, vec![event])
            })
            .collect();
        target.store.append_batch(&category, appends).await?;
        written += batch;
    }
    Ok(category)
}

/// Consumes every event of `sources` (one group) with `args.nodes` nodes; the time
/// from the first event processed to the last.
async fn consume(
    target: &Target,
    args: &PartitionsArgs,
    sources: Vec<Source>,
) -> Result<Duration, CliError> {
    let fleet = FleetServices {
        membership: Arc::new(MemoryMembershipStore::new()),
        leases: Arc::new(MemoryLeaseStore::new()),
        bus: Arc::new(MemoryBus::new()),
    };
    let settings = ConsumerSettings {
        batch_size: args.batch,
        checkpoint_every: args.batch as u64 * 10,
        ..ConsumerSettings::default()
    };
    let processor = Arc::new(Slow::new(args.batch_delay));
    let group = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut runtimes = Vec::new();
    for node in 1..=args.nodes {
        let node = format!("node-{node}");
        let broker = DistributedBroker::new(&node, BrokerRole::Full, quick(), fleet.clone());
        let runtime = EventRuntime::new(&node, Arc::new(broker), stores(target), settings.clone());
        let spec = SubscriberSpec::new(&group, format!("{node}/1"), sources.iter().cloned());
        runtime
            .register_subscription_consumer(spec, processor.clone(), None)
            .map_err(|error| CliError::Usage(error.to_string()))?;
        runtime
            .start()
            .await
            .map_err(|error| CliError::Usage(error.to_string()))?;
        runtimes.push(runtime);
    }
    let elapsed = processor.wait_for(args.events).await;
    for runtime in runtimes {
        runtime.stop().await;
    }
    Ok(elapsed)
}

/// A fleet that settles within a second, so the runs measure consuming.
fn quick() -> BrokerSettings {
    BrokerSettings {
        heartbeat_interval: Duration::from_millis(100),
        member_timeout: Duration::from_secs(2),
        refresh_interval: Duration::from_secs(1),
        lease_ttl: Duration::from_secs(2),
        handover_timeout: Duration::from_secs(2),
    }
}

/// Waits a fixed time per batch and counts distinct events.
struct Slow {
    delay: Duration,
    seen: std::sync::Mutex<(BTreeSet<uuid::Uuid>, Option<Instant>)>,
    count: AtomicUsize,
    done: Notify,
}

impl Slow {
    fn new(delay: Duration) -> Self {
        Self {
            delay,
            seen: std::sync::Mutex::new((BTreeSet::new(), None)),
            count: AtomicUsize::new(0),
            done: Notify::new(),
        }
    }

    /// The time from the first event to the `wanted`th distinct one.
    async fn wait_for(&self, wanted: usize) -> Duration {
        while self.count.load(Ordering::SeqCst) < wanted {
            let _ = tokio::time::timeout(Duration::from_millis(50), self.done.notified()).await;
        }
        let first = self.seen.lock().unwrap_or_else(|e| e.into_inner()).1;
        first.map_or(Duration::ZERO, |first| first.elapsed())
    }
}

#[async_trait]
impl EventProcessor for Slow {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        tokio::time::sleep(self.delay).await;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.1.get_or_insert_with(Instant::now);
        for event in events {
            if seen.0.insert(event.id) {
                self.count.fetch_add(1, Ordering::SeqCst);
            }
        }
        drop(seen);
        self.done.notify_one();
        Ok(())
    }
}

/// Reading one partition of 16 from the start beside a sixteenth of reading the
/// whole category, in pages of 1,000; best of three each.
async fn read_cost(target: &Target, category: &Category) -> Result<(), CliError> {
    let whole = Source::Category(category.clone());
    let part: Source = format!("category:{category}@0/16")
        .parse()
        .map_err(|error| CliError::Usage(format!("{error}")))?;
    let (whole_time, whole_events) = read_best(target, &whole).await?;
    let (part_time, part_events) = read_best(target, &part).await?;
    let sixteenth = whole_time.as_secs_f64() / 16.0;
    emit(json!({
        "bench": "partition_read_cost", "backend": target.backend,
        "category_events": whole_events, "category_seconds": whole_time.as_secs_f64(),
        "partition_events": part_events, "partition_seconds": part_time.as_secs_f64(),
        "ratio_to_a_sixteenth": (part_time.as_secs_f64() / sixteenth * 100.0).round() / 100.0,
    }));
    Ok(())
}

async fn read_best(target: &Target, source: &Source) -> Result<(Duration, usize), CliError> {
    let mut best = Duration::MAX;
    let mut total = 0;
    for _ in 0..3 {
        let started = Instant::now();
        let (mut cursor, mut count) = (Cursor::START, 0);
        loop {
            let page = target.store.read(source, cursor, 1000).await?;
            let Some(last) = page.last() else { break };
            cursor = last.cursor;
            count += page.len();
        }
        best = best.min(started.elapsed());
        total = count;
    }
    Ok((best, total))
}
