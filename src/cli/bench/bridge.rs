//! `weir bench bridge --sink nats|kafka`: events per second from the store to the
//! broker through a running consumer and its sink, beside a plain client
//! publishing the same messages (same subjects or topics, headers and bodies,
//! serialised beforehand) with the same pipelining, in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;

use super::consume::{Counter, start};
use super::{CliError, Target, check_sizes, emit, fill, rate};
use crate::config::{Config, SinkConfig};
use crate::consumer::{ConsumerSettings, EventProcessor, ProcessError};
use crate::event::{Cursor, Source, StoredEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    Nats,
    Kafka,
}

impl SinkKind {
    /// Its name in the bench's JSON lines, as on the command line.
    pub(super) fn name(self) -> &'static str {
        match self {
            SinkKind::Nats => "nats",
            SinkKind::Kafka => "kafka",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct BridgeArgs {
    /// Where the events go; connection settings come from `[nats]` / `[kafka]`.
    #[arg(long, value_enum)]
    sink: SinkKind,
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Events per batch handed to the sink.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Publishes awaiting acknowledgement at once, for the sink and the raw client.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// Each side runs this many times, alternating; the best run counts.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Read each batch only once the sink has acknowledged the one before, as
    /// consumers did before read-ahead: to see what read-ahead gains.
    #[arg(long)]
    no_read_ahead: bool,
}

/// The sink under test, counting what it delivered.
struct Counted {
    sink: Arc<dyn EventProcessor>,
    counter: Arc<Counter>,
}

#[async_trait]
impl EventProcessor for Counted {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        self.sink.process(events).await?;
        self.counter.process(events).await
    }
}

/// Destination names unique to one round, so that neither side's messages are
/// deduplicated against the other's.
pub(super) fn prefix(round: usize, side: &str) -> String {
    format!(
        "bench_{}_{side}{round}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

pub(super) fn sink_config(kind: SinkKind, prefix: &str, max_in_flight: usize) -> SinkConfig {
    match kind {
        SinkKind::Nats => SinkConfig::Nats {
            subject: format!("{prefix}.{{category}}.{{stream}}"),
            stream: Some(prefix.to_uppercase()),
            max_in_flight,
            format: crate::sink::Format::Weir,
            cloudevents_source: None,
        },
        SinkKind::Kafka => SinkConfig::kafka(format!("{prefix}.{{category}}")),
    }
}

pub(super) async fn run(
    config: &Config,
    target: &Target,
    args: &BridgeArgs,
) -> Result<(), CliError> {
    check_sizes(args.events, args.batch, 1)?;
    if args.max_in_flight == 0 {
        return Err(CliError::Usage("--max-in-flight must be at least 1".into()));
    }
    let category = fill(target, args.events, args.payload_bytes).await?;
    let source = Source::Category(category.clone());
    let events = target
        .store
        .read(&source, Cursor::START, args.events)
        .await?;
    let bytes = events
        .iter()
        .map(|e| serde_json::to_vec(e).map(|b| b.len()).unwrap_or(0))
        .sum::<usize>()
        / events.len().max(1);
    let settings = ConsumerSettings {
        batch_size: args.batch,
        checkpoint_every: args.batch as u64,
        read_ahead: !args.no_read_ahead,
        ..ConsumerSettings::default()
    };
    let sink_name = args.sink.name();

    let mut weir_best = Duration::MAX;
    let mut raw_best = Duration::MAX;
    for round in 0..args.rounds.max(1) {
        let elapsed = weir_round(config, target, args, round, &source, &settings).await?;
        weir_best = weir_best.min(elapsed);
        let prefix_raw = prefix(round, "raw");
        let elapsed = match args.sink {
            #[cfg(feature = "nats")]
            SinkKind::Nats => raw::nats(config, &prefix_raw, &events, args.max_in_flight).await?,
            #[cfg(feature = "kafka")]
            SinkKind::Kafka => raw::kafka(config, &prefix_raw, &events).await?,
            #[allow(unreachable_patterns)]
            _ => {
                return Err(CliError::Usage(format!(
                    "this weir was built without the `{sink_name}` feature"
                )));
            }
        };
        raw_best = raw_best.min(elapsed);
    }
    let weir_rate = rate(args.events, weir_best);
    let raw_rate = rate(args.events, raw_best);
    emit(json!({
        "bench": "bridge", "sink": sink_name, "backend": target.backend, "events": args.events,
        "batch": args.batch, "read_ahead": settings.read_ahead,
        "max_in_flight": args.max_in_flight, "message_bytes": bytes, "seconds": weir_best.as_secs_f64(), "events_per_sec": weir_rate,
    }));
    emit(json!({
        "bench": "bridge_raw_publish", "sink": sink_name, "events": args.events,
        "max_in_flight": args.max_in_flight, "message_bytes": bytes,
        "seconds": raw_best.as_secs_f64(), "events_per_sec": raw_rate,
    }));
    emit(json!({
        "bench": "bridge_vs_raw", "sink": sink_name,
        "ratio": (weir_rate / raw_rate * 1000.0).round() / 1000.0,
    }));
    Ok(())
}

/// One timed run of weir: a consumer of `source` forwarding through a fresh
/// sink until every event is acknowledged.
async fn weir_round(
    config: &Config,
    target: &Target,
    args: &BridgeArgs,
    round: usize,
    source: &Source,
    settings: &ConsumerSettings,
) -> Result<Duration, CliError> {
    let prefix_weir = prefix(round, "weir");
    let routing = crate::sink::Routing::default();
    let sink = crate::sink::build(
        &sink_config(args.sink, &prefix_weir, args.max_in_flight),
        &config.nats,
        &config.kafka,
        crate::sink::SinkContext {
            group: "bench",
            partitions: 1,
            routing: &routing,
        },
    )
    .await?;
    // Built (connected, stream or topics ready) before the clock starts.
    let counter = Arc::new(Counter::default());
    let processor = Arc::new(Counted {
        sink,
        counter: Arc::clone(&counter),
    });
    let started = Instant::now();
    let runtime = start(
        target,
        &format!("bridge-{round}"),
        source.clone(),
        processor,
        settings.clone(),
    )
    .await?;
    counter.wait_for(args.events).await;
    let elapsed = started.elapsed();
    runtime.stop().await;
    #[cfg(feature = "nats")]
    if args.sink == SinkKind::Nats {
        raw::delete_nats_stream(config, &prefix_weir.to_uppercase()).await;
    }
    Ok(elapsed)
}

/// The plain clients: messages built first, then only the publishing is timed.
pub(super) mod raw {
    #[allow(unused_imports)]
    use super::*;

    fn unavailable(error: impl std::fmt::Display) -> CliError {
        CliError::Bus(crate::bus::Error::Unavailable(error.to_string()))
    }

    /// The same bodies and headers the NATS sink sends, published by a plain
    /// JetStream client with the same window, into a stream of their own.
    #[cfg(feature = "nats")]
    pub(super) async fn nats(
        config: &Config,
        prefix: &str,
        events: &[StoredEvent],
        max_in_flight: usize,
    ) -> Result<Duration, CliError> {
        use crate::sink::nats::{NatsSink, raw_publish_baseline};

        let client = crate::connect::nats_client::connect(&config.nats, "weir bench raw")
            .await
            .map_err(crate::sink::SinkError::from)?;
        let stream = prefix.to_uppercase();
        // Made only to create the stream and to give the headers it would send.
        let sink = NatsSink::from_client_replicated(
            client.clone(),
            &format!("{prefix}.{{category}}.{{stream}}"),
            Some(&stream),
            max_in_flight,
            config.nats.replicas,
        )
        .await?;
        let messages = events
            .iter()
            .map(|event| {
                let body = serde_json::to_vec(event).unwrap_or_default();
                (Some(sink.headers(event)), body)
            })
            .collect();
        let elapsed = raw_publish_baseline(
            client.clone(),
            &format!("{prefix}.raw.all"),
            messages,
            max_in_flight,
        )
        .await
        .map_err(unavailable)?;
        delete_nats_stream(config, &stream).await;
        Ok(elapsed)
    }

    /// Removes a stream the bench made, so runs leave nothing behind.
    #[cfg(feature = "nats")]
    pub(in crate::cli::bench) async fn delete_nats_stream(config: &Config, stream: &str) {
        if let Ok(client) =
            crate::connect::nats_client::connect(&config.nats, "weir bench cleanup").await
        {
            let _ = async_nats::jetstream::new(client)
                .delete_stream(stream)
                .await;
        }
    }

    /// Counts failed deliveries: a plain producer's only bookkeeping.
    #[cfg(feature = "kafka")]
    #[derive(Default)]
    struct Failures(std::sync::atomic::AtomicUsize);

    #[cfg(feature = "kafka")]
    impl rdkafka::ClientContext for Failures {}

    #[cfg(feature = "kafka")]
    impl rdkafka::producer::ProducerContext for Failures {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
            if result.is_err() {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Sends every event's record (key, JSON value, headers) with a plain
    /// idempotent producer as fast as librdkafka takes them, and waits until all
    /// are stored.
    #[cfg(feature = "kafka")]
    pub(super) async fn kafka(
        config: &Config,
        prefix: &str,
        events: &[StoredEvent],
    ) -> Result<Duration, CliError> {
        use crate::connect::kafka_client::{TopicSpec, client_config, ensure_topics, set_default};

        let records = kafka_records(prefix, events);
        let topics: std::collections::BTreeSet<&str> =
            records.iter().map(|(topic, ..)| topic.as_str()).collect();
        let specs: Vec<TopicSpec> = topics.into_iter().map(TopicSpec::new).collect();
        ensure_topics(&config.kafka, &specs)
            .await
            .map_err(unavailable)?;

        let mut settings = client_config(&config.kafka);
        set_default(&mut settings, "enable.idempotence", "true");
        tokio::task::spawn_blocking(move || produce_all(settings, &records))
            .await
            .map_err(|e| CliError::Io(std::io::Error::other(e)))?
    }

    /// (topic, key, headers, value) of every event, as the Kafka sink sends them.
    #[cfg(feature = "kafka")]
    type KafkaRecord = (String, String, rdkafka::message::OwnedHeaders, Vec<u8>);

    #[cfg(feature = "kafka")]
    fn kafka_records(prefix: &str, events: &[StoredEvent]) -> Vec<KafkaRecord> {
        use rdkafka::message::{Header, OwnedHeaders};

        events
            .iter()
            .map(|event| {
                let (id, position, sequence) = (
                    event.id.to_string(),
                    event.position.to_string(),
                    event.sequence.to_string(),
                );
                let headers = [
                    ("Weir-Event-Id", id.as_str()),
                    ("Weir-Event-Name", event.name.as_str()),
                    ("Weir-Category", event.category.as_str()),
                    ("Weir-Stream", event.stream.as_str()),
                    ("Weir-Position", position.as_str()),
                    ("Weir-Sequence", sequence.as_str()),
                    ("Content-Type", "application/json"),
                ]
                .into_iter()
                .fold(
                    OwnedHeaders::new_with_capacity(7),
                    |headers, (key, value)| {
                        headers.insert(Header {
                            key,
                            value: Some(value),
                        })
                    },
                );
                (
                    format!("{prefix}.{}", event.category.as_str()),
                    format!("{}/{}", event.category, event.stream),
                    headers,
                    serde_json::to_vec(event).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Produces `records` with a plain idempotent producer as fast as librdkafka
    /// takes them, and waits until all are stored. Blocking.
    #[cfg(feature = "kafka")]
    fn produce_all(
        settings: rdkafka::ClientConfig,
        records: &[KafkaRecord],
    ) -> Result<Duration, CliError> {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

        let producer: BaseProducer<Failures> = settings
            .create_with_context(Failures::default())
            .map_err(unavailable)?;
        let started = Instant::now();
        for (topic, key, headers, body) in records {
            let mut record = BaseRecord::to(topic)
                .key(key)
                .payload(body)
                .headers(headers.clone());
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        // Queue full: serve delivery reports to make room.
                        producer.poll(Duration::from_millis(10));
                        record = back;
                    }
                }
            }
            producer.poll(Duration::ZERO);
        }
        producer
            .flush(Duration::from_secs(120))
            .map_err(unavailable)?;
        let elapsed = started.elapsed();
        let failed = producer
            .context()
            .0
            .load(std::sync::atomic::Ordering::Relaxed);
        if failed > 0 {
            return Err(unavailable(format!(
                "the plain producer failed to deliver {failed} records"
            )));
        }
        Ok(elapsed)
    }
}
