//! `weir bench latency --sink nats|kafka`: end-to-end latency of the bridge as an
//! operator runs it. Two `weir run` processes share a generated config (the
//! bench's Postgres schema, a private bus namespace, one subscription group whose
//! sink forwards a category); a long-lived appender in the bench appends at steady
//! rates, each event carrying the wall-clock time its append started; a plain
//! client (async-nats subscription or rdkafka consumer, no weir code in its path)
//! subscribed to the sink's destination records arrival minus that time. One JSON
//! line per rate.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::bridge::{SinkKind, prefix, sink_config};
use super::nodes::Nodes;
use super::{CliError, Target, emit};
use crate::bus::BusKind;
use crate::config::{Config, SubscriptionConfig};
use crate::consumer::ConsumerSettings;
use crate::event::{Category, EventName, NewEvent, Source, StreamName, WriteCondition};
use crate::store::EventStore;

#[derive(Debug, clap::Args)]
pub struct LatencyArgs {
    /// Where the nodes forward; connection settings come from `[nats]` / `[kafka]`.
    #[arg(long, value_enum)]
    sink: SinkKind,
    /// Append rates in events per second, one measurement each, in this order.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,20000")]
    rates: Vec<u64>,
    /// How long each rate is held.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long to wait after a rate for its last events to arrive.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain: Duration,
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Streams the appends are spread over.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Appends the appender keeps in flight at once (each one round trip).
    #[arg(long, default_value_t = 8)]
    appends_in_flight: usize,
    /// `weir run` processes sharing the work.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Partitions of the category (`[[subscriptions]] partitions`): with more
    /// than one, the nodes share the category instead of one consumer reading it.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// The consumers' `batch_size` (the default consumer setting if not given).
    #[arg(long)]
    batch_size: Option<usize>,
}

/// Latencies seen by the plain client, per round (round 0 is the warm-up).
#[derive(Default)]
struct Arrivals {
    rounds: Mutex<HashMap<u64, Round>>,
}

#[derive(Default)]
struct Round {
    seen: HashSet<u64>,
    millis: Vec<f64>,
}

impl Arrivals {
    /// Records one received message body: the event as JSON, its payload carrying
    /// `round`, `n` and `sent_us`.
    fn record(&self, body: &[u8]) {
        let arrived = unix_micros();
        let Ok(event) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        let payload = &event["payload"];
        let (Some(round), Some(n), Some(sent)) = (
            payload["round"].as_u64(),
            payload["n"].as_u64(),
            payload["sent_us"].as_u64(),
        ) else {
            return;
        };
        let mut rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
        let entry = rounds.entry(round).or_default();
        // A republished event (after a failed acknowledgement) counts once.
        if entry.seen.insert(n) {
            entry
                .millis
                .push(arrived.saturating_sub(sent) as f64 / 1000.0);
        }
    }

    fn count(&self, round: u64) -> usize {
        let rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
        rounds.get(&round).map_or(0, |r| r.millis.len())
    }

    fn take(&self, round: u64) -> Vec<f64> {
        let mut rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
        rounds.remove(&round).map_or_else(Vec::new, |r| r.millis)
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

pub(super) async fn run(
    config: &Config,
    target: &Target,
    args: &LatencyArgs,
) -> Result<(), CliError> {
    let schema = scratch_schema(target)?;
    if args.rates.is_empty() || args.rates.contains(&0) || args.appends_in_flight == 0 {
        return Err(CliError::Usage(
            "--rates must be positive and --appends-in-flight at least 1".into(),
        ));
    }
    let tag = prefix(0, "latency");
    let category = Category::new(format!("latency-{}", &tag[6..14])).expect("a valid name");
    let node_config = node_config(config, &schema, &tag, &category, args);
    let arrivals = Arc::new(Arrivals::default());
    let subscriber = subscribe(config, &tag, &category, args.sink, arrivals.clone()).await?;
    let mut nodes = Nodes::start(&node_config, &tag, args.nodes.max(1)).await?;
    let measured = async {
        nodes.wait_ready().await?;
        warm_up(target.store.clone(), &category, &arrivals).await?;
        for (index, &rate) in args.rates.iter().enumerate() {
            let round = index as u64 + 1;
            let times_before = nodes.stage_times().await;
            let started = Instant::now();
            let (sent, appends) = drive(target.store.clone(), &category, args, rate, round).await?;
            let elapsed = started.elapsed();
            let deadline = Instant::now() + args.drain;
            while (arrivals.count(round) as u64) < sent && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let stages = nodes.stage_times().await.since(&times_before);
            let arrived = arrivals.take(round);
            report(args, rate, sent, elapsed, arrived, appends, stages);
        }
        Ok::<_, CliError>(())
    }
    .await;
    let stopped = nodes.stop().await;
    subscriber.abort();
    #[cfg(feature = "nats")]
    if args.sink == SinkKind::Nats {
        super::bridge::raw::delete_nats_stream(config, &tag.to_uppercase()).await;
    }
    measured.and(stopped)
}

/// The bench's scratch schema: the nodes' store.
fn scratch_schema(target: &Target) -> Result<String, CliError> {
    #[cfg(feature = "postgres")]
    if let Some(postgres) = &target.postgres {
        return Ok(postgres.schema().to_owned());
    }
    let _ = target;
    Err(CliError::Usage(
        "bench latency runs weir nodes on Postgres: set store.kind = \"postgres\"".into(),
    ))
}

/// The bench's config for the nodes: its store and schema, a shared bus (the
/// sink's broker unless the config names one) in a namespace of this run's own,
/// and one group forwarding `category` to the sink.
fn node_config(
    config: &Config,
    schema: &str,
    tag: &str,
    category: &Category,
    args: &LatencyArgs,
) -> Config {
    let mut nodes = config.clone();
    nodes.store.schema = schema.to_owned();
    nodes.bus.namespace = format!("{tag}_bus");
    // The in-memory bus reaches only its own process: each node would coordinate
    // alone and every node would forward every event. The sink's broker is there.
    if nodes.bus.kind == BusKind::Memory {
        nodes.bus.kind = match args.sink {
            SinkKind::Nats => BusKind::Nats,
            SinkKind::Kafka => BusKind::Kafka,
        };
    }
    nodes.demo = Default::default();
    nodes.subscriptions = vec![SubscriptionConfig {
        group: "latency".into(),
        sources: vec![Source::Category(category.clone())],
        instances: 1,
        required_tags: Default::default(),
        filter: None,
        routes: Vec::new(),
        unmatched: Default::default(),
        sink: sink_config(args.sink, tag, crate::sink::default_max_in_flight()),
        consumer: ConsumerSettings {
            batch_size: args
                .batch_size
                .unwrap_or(ConsumerSettings::default().batch_size),
            ..ConsumerSettings::default()
        },
        partitions: args.partitions,
    }];
    nodes
}

/// Appends one event at a time until the plain client has seen one: the group
/// is allocated, its consumer reading and its sink publishing.
async fn warm_up(
    store: Arc<dyn EventStore>,
    category: &Category,
    arrivals: &Arrivals,
) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while arrivals.count(0) == 0 {
        if Instant::now() > deadline {
            return Err(CliError::Io(std::io::Error::other(
                "no forwarded event reached the plain client within 60s of the nodes being ready",
            )));
        }
        append(&*store, category, "warm-up", events(0, n, 1, 0)).await?;
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `count` events of `round` numbered from `first`, stamped now.
fn events(round: u64, first: u64, count: u64, payload_bytes: usize) -> Vec<NewEvent> {
    let name = EventName::new("LatencyProbe").expect("a valid literal name");
    let sent_us = unix_micros();
    let pad = "x".repeat(payload_bytes);
    (first..first + count)
        .map(|n| {
            NewEvent::new(
                name.clone(),
                json!({ "round": round, "n": n, "sent_us": sent_us, "pad": pad }),
            )
        })
        .collect()
}

async fn append(
    store: &dyn EventStore,
    category: &Category,
    stream: &str,
    events: Vec<NewEvent>,
) -> Result<(), CliError> {
    let stream = StreamName::new(stream).expect("a valid generated name");
    store
        .append(category, &stream, WriteCondition::Any, events)
        .await?;
    Ok(())
}

/// Appends at `rate` events per second for `--duration`: every millisecond or
/// so, what is due by then, as one append, with up to `--appends-in-flight`
/// appends outstanding. Returns how many events were appended.
async fn drive(
    store: Arc<dyn EventStore>,
    category: &Category,
    args: &LatencyArgs,
    rate: u64,
    round: u64,
) -> Result<(u64, Vec<f64>), CliError> {
    let slots = Arc::new(Semaphore::new(args.appends_in_flight));
    let mut appends = JoinSet::new();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut batches = 0usize;
    let mut append_millis = Vec::new();
    while started.elapsed() < args.duration {
        let due = (rate as f64 * started.elapsed().as_secs_f64()) as u64;
        if due > sent {
            let slot = slots.clone().acquire_owned().await.map_err(io_closed)?;
            let count = (due - sent).min(1000);
            let (store, category) = (store.clone(), category.clone());
            let stream = format!("s-{}", batches % args.streams.max(1));
            let payload_bytes = args.payload_bytes;
            appends.spawn(async move {
                let events = events(round, sent, count, payload_bytes);
                let started = Instant::now();
                let outcome = append(&*store, &category, &stream, events).await;
                drop(slot);
                outcome.map(|()| started.elapsed().as_secs_f64() * 1000.0)
            });
            sent += count;
            batches += 1;
        }
        while let Some(done) = appends.try_join_next() {
            append_millis.push(done.map_err(io_closed)??);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while let Some(done) = appends.join_next().await {
        append_millis.push(done.map_err(io_closed)??);
    }
    Ok((sent, append_millis))
}

fn io_closed(error: impl std::fmt::Display) -> CliError {
    CliError::Io(std::io::Error::other(error.to_string()))
}

fn report(
    args: &LatencyArgs,
    rate: u64,
    sent: u64,
    elapsed: Duration,
    arrived: Vec<f64>,
    appends: Vec<f64>,
    stages: Value,
) {
    let sink = args.sink.name();
    let count = arrived.len();
    let [p50, p99, max] = percentiles(arrived);
    // How long the appends themselves took, commit included: the share of the
    // latency that is the database's before weir can see an event.
    let [append_p50, append_p99, append_max] = percentiles(appends);
    emit(json!({
        "bench": "latency", "sink": sink, "backend": "postgres", "nodes": args.nodes,
        "partitions": args.partitions, "batch_size": args.batch_size,
        "rate": rate, "achieved_rate": (sent as f64 / elapsed.as_secs_f64()).round(),
        "seconds": elapsed.as_secs_f64(), "sent": sent, "arrived": count,
        "p50_ms": p50, "p99_ms": p99, "max_ms": max,
        "append_p50_ms": append_p50, "append_p99_ms": append_p99, "append_max_ms": append_max,
        // Mean milliseconds per batch of each consumer stage, over the nodes.
        "stages_mean_ms": stages,
    }));
}

/// p50, p99 and max of `millis`, in hundredths of a millisecond (null if empty).
fn percentiles(mut millis: Vec<f64>) -> [Value; 3] {
    millis.sort_by(f64::total_cmp);
    let at = |q: f64| -> Value {
        if millis.is_empty() {
            return Value::Null;
        }
        let index = ((millis.len() as f64 * q).ceil() as usize).clamp(1, millis.len()) - 1;
        json!((millis[index] * 100.0).round() / 100.0)
    };
    [at(0.50), at(0.99), at(1.0)]
}

/// Starts the plain client on the sink's destination; it records into `arrivals`
/// until aborted.
async fn subscribe(
    config: &Config,
    tag: &str,
    category: &Category,
    sink: SinkKind,
    arrivals: Arc<Arrivals>,
) -> Result<tokio::task::JoinHandle<()>, CliError> {
    match sink {
        #[cfg(feature = "nats")]
        SinkKind::Nats => plain::nats(config, &format!("{tag}.>"), arrivals).await,
        #[cfg(feature = "kafka")]
        SinkKind::Kafka => plain::kafka(config, &format!("{tag}.{category}"), arrivals).await,
        #[allow(unreachable_patterns)]
        _ => Err(CliError::Usage(
            "this weir was built without the sink's feature".into(),
        )),
    }
}

/// The plain clients: a library's own subscriber, nothing of weir but the
/// connection settings.
mod plain {
    #[allow(unused_imports)]
    use super::*;

    /// A core NATS subscription: it receives each message as the server routes
    /// it, the earliest moment any subscriber could.
    #[cfg(feature = "nats")]
    pub(super) async fn nats(
        config: &Config,
        subject: &str,
        arrivals: Arc<Arrivals>,
    ) -> Result<tokio::task::JoinHandle<()>, CliError> {
        use futures::StreamExt;

        let client = crate::connect::nats_client::connect(&config.nats, "weir bench latency")
            .await
            .map_err(crate::sink::SinkError::from)?;
        let mut messages = client
            .subscribe(subject.to_owned())
            .await
            .map_err(|e| CliError::Bus(crate::bus::Error::Unavailable(e.to_string())))?;
        client
            .flush()
            .await
            .map_err(|e| CliError::Bus(crate::bus::Error::Unavailable(e.to_string())))?;
        Ok(tokio::spawn(async move {
            let _client = client;
            while let Some(message) = messages.next().await {
                arrivals.record(&message.payload);
            }
        }))
    }

    /// An rdkafka consumer of the sink's topic from its start, fetching with a
    /// short wait so that the broker answers as soon as records are there.
    #[cfg(feature = "kafka")]
    pub(super) async fn kafka(
        config: &Config,
        topic: &str,
        arrivals: Arc<Arrivals>,
    ) -> Result<tokio::task::JoinHandle<()>, CliError> {
        use crate::connect::kafka_client::{TopicSpec, client_config, ensure_topics};
        use rdkafka::Message;
        use rdkafka::consumer::{Consumer, StreamConsumer};

        let unavailable = |e: &dyn std::fmt::Display| {
            CliError::Bus(crate::bus::Error::Unavailable(e.to_string()))
        };
        ensure_topics(&config.kafka, &[TopicSpec::new(topic)])
            .await
            .map_err(|e| unavailable(&e))?;
        let mut settings = client_config(&config.kafka);
        settings
            .set("group.id", format!("{topic}-plain"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5");
        let consumer: StreamConsumer = settings.create().map_err(|e| unavailable(&e))?;
        consumer.subscribe(&[topic]).map_err(|e| unavailable(&e))?;
        Ok(tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(message) => arrivals.record(message.payload().unwrap_or_default()),
                    Err(error) => tracing::warn!(%error, "the plain Kafka consumer failed"),
                }
            }
        }))
    }
}
