//! Independent readers: plain NATS JetStream and Kafka clients, sharing no code
//! with weir, that read what weir's sinks forwarded to a broker, plus the checks
//! made on what they read.
//!
//! Each reader records every message it gets as a [`Delivery`] (event id, stream,
//! position, arrival time) in a shared [`Deliveries`] log, repeats included:
//!
//! - [`nats`] counts every publish to the sink's subjects: a plain subscription
//!   receives each one, repeats within JetStream's duplicate window included
//!   (weir's sink sets `Nats-Msg-Id`, so JetStream drops a repeat published
//!   within the window, 100 ms at the least). A plain subscription misses what is
//!   published while it reconnects, so the reader also creates the sink's
//!   JetStream stream before weir does (weir leaves an existing stream as it is)
//!   and reads it from the start with an ordered consumer, which recreates
//!   itself after a server restart without losing or reordering a message. An
//!   event has arrived as many times as the larger of the two counts says
//!   ([`Via`]); a repeat goes uncounted only if the subscription missed it while
//!   reconnecting *and* JetStream dropped it as a duplicate. When its consumer
//!   cannot recreate itself, the reader makes a new one from where it got to.
//! - [`nats_existing`] reads a stream weir created (with its settings: a
//!   replicated one, for instance) the same way, without the plain
//!   subscription; there the stream's duplicate window hides what weir
//!   published again within it.
//! - [`kafka`] creates the sink's topics (one partition each) and reads them from
//!   the beginning, assigning partitions itself rather than joining a group.
//!
//! Events are told apart by id and stream, never by global sequence: a test may
//! reset the store, after which sequences and positions start again. A writer
//! that does so marks each event's payload with `store_generation`, and a stream
//! is keyed by generation, category and stream name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One message as a reader received it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    /// `GENERATION:CATEGORY/STREAM`.
    pub stream: String,
    pub category: String,
    pub position: u64,
    pub at: Instant,
}

impl Delivery {
    /// Reads a forwarded event: the stored event as JSON. `None` for anything
    /// else, which the reader reports.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let event: Value = serde_json::from_slice(body).ok()?;
        let category = event["category"].as_str()?.to_owned();
        let generation = event["payload"]["store_generation"].as_u64().unwrap_or(0);
        Some(Self {
            id: event["id"].as_str()?.to_owned(),
            stream: format!("{generation}:{category}/{}", event["stream"].as_str()?),
            category,
            position: event["position"].as_u64()?,
            at: Instant::now(),
        })
    }
}

/// How a reader received a message: each path counts an event's copies on its
/// own, and the event arrived as often as the larger count says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Stored by the broker and read back (a Kafka topic, a JetStream stream).
    Stored,
    /// Received by a plain NATS subscription as it was published.
    Published,
}

/// Everything a reader received, in arrival order, and what it could not read.
#[derive(Clone, Default)]
pub struct Deliveries {
    log: Arc<Mutex<Vec<Delivery>>>,
    /// Per event id: copies received stored, and as published.
    copies: Arc<Mutex<HashMap<String, (usize, usize)>>>,
    unreadable: Arc<Mutex<Vec<String>>>,
}

impl Deliveries {
    /// Records a message received `via` one path: an arrival when it makes that
    /// path's count of its event's copies the larger than before (see [`Via`]).
    pub fn record(&self, body: &[u8], via: Via) {
        let Some(delivery) = Delivery::parse(body) else {
            self.unreadable
                .lock()
                .expect("deliveries lock")
                .push(String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
            return;
        };
        let mut copies = self.copies.lock().expect("deliveries lock");
        let (stored, published) = copies.entry(delivery.id.clone()).or_default();
        let before = (*stored).max(*published);
        match via {
            Via::Stored => *stored += 1,
            Via::Published => *published += 1,
        }
        if (*stored).max(*published) > before {
            self.log.lock().expect("deliveries lock").push(delivery);
        }
    }

    /// Every delivery so far, in arrival order.
    pub fn snapshot(&self) -> Vec<Delivery> {
        self.log.lock().expect("deliveries lock").clone()
    }

    pub fn len(&self) -> usize {
        self.log.lock().expect("deliveries lock").len()
    }

    /// The ids received so far.
    pub fn ids(&self) -> HashSet<String> {
        self.log
            .lock()
            .expect("deliveries lock")
            .iter()
            .map(|delivery| delivery.id.clone())
            .collect()
    }

    /// Messages that were not a forwarded event (a prefix of each).
    pub fn unreadable(&self) -> Vec<String> {
        self.unreadable.lock().expect("deliveries lock").clone()
    }
}

/// A reader's task, stopped when dropped.
pub struct Reader {
    task: tokio::task::JoinHandle<()>,
    pub deliveries: Deliveries,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads every publish to `subjects`, and creates JetStream stream `stream`
/// capturing them and reads it from the start: see the module docs. `url` is
/// one server's URL or several, comma-separated.
#[cfg(feature = "nats")]
pub async fn nats(url: &str, stream: &str, subjects: &str) -> Result<Reader, String> {
    use async_nats::jetstream::stream as js;

    let client = nats_client(url).await?;
    let published = client
        .subscribe(subjects.to_owned())
        .await
        .map_err(|error| format!("cannot subscribe to {subjects}: {error}"))?;
    client
        .flush()
        .await
        .map_err(|error| format!("cannot subscribe to {subjects}: {error}"))?;
    let created = async_nats::jetstream::new(client.clone())
        .create_stream(js::Config {
            name: stream.to_owned(),
            description: Some("events forwarded by weir, read by the fault suite".into()),
            subjects: vec![subjects.to_owned()],
            storage: js::StorageType::File,
            // The server's minimum, though the plain subscription counts repeats
            // within it.
            duplicate_window: Duration::from_millis(100),
            ..Default::default()
        })
        .await
        .map_err(|error| format!("cannot create stream {stream}: {error}"))?;
    read_nats(client, created, Some(published)).await
}

/// Reads JetStream stream `stream`, which someone else creates (weir's sink,
/// as it sees fit), from the start, once it exists: `Err` if it does not within
/// `within`. Repeats within the stream's duplicate window are stored once, so
/// they do not show here.
#[cfg(feature = "nats")]
pub async fn nats_existing(url: &str, stream: &str, within: Duration) -> Result<Reader, String> {
    let client = nats_client(url).await?;
    let jetstream = async_nats::jetstream::new(client.clone());
    let deadline = Instant::now() + within;
    let found = loop {
        match jetstream.get_stream(stream).await {
            Ok(found) => break found,
            Err(error) if Instant::now() > deadline => {
                return Err(format!(
                    "stream {stream} did not appear within {within:?}: {error}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    read_nats(client, found, None).await
}

/// A plain client of the servers of `url` (comma-separated), reconnecting for
/// as long as it lives.
#[cfg(feature = "nats")]
async fn nats_client(url: &str) -> Result<async_nats::Client, String> {
    let servers: Vec<&str> = url.split(',').map(str::trim).collect();
    async_nats::ConnectOptions::new()
        .name("independent reader")
        .max_reconnects(None)
        // Back soon after a server restart, so the plain subscription misses
        // little (the stream has the rest).
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .connect(servers)
        .await
        .map_err(|error| format!("cannot connect to NATS at {url}: {error}"))
}

/// Reads `stream` from its start with an ordered consumer, in a task. The
/// consumer recreates itself after a server restart; when it reports an error
/// instead, or falls silent while the stream holds more (its server was killed
/// in a cluster while a new leader was elected), the reader makes a new one
/// from the sequence after the last message it received, so nothing is skipped
/// or read twice.
#[cfg(feature = "nats")]
async fn read_nats(
    client: async_nats::Client,
    stream: async_nats::jetstream::stream::Stream,
    mut published: Option<async_nats::Subscriber>,
) -> Result<Reader, String> {
    use futures::StreamExt;

    let name = stream.cached_info().config.name.clone();
    let jetstream = async_nats::jetstream::new(client.clone());
    let mut opened = Some(ordered_from(&stream, &client, 1).await?);
    let deliveries = Deliveries::default();
    let sink = deliveries.clone();
    let task = tokio::spawn(async move {
        let mut next = 1;
        loop {
            let mut messages = match opened.take() {
                Some(messages) => messages,
                None => match ordered_from(&stream, &client, next).await {
                    Ok(messages) => messages,
                    Err(error) => {
                        eprintln!("reader: {error}; trying again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            };
            loop {
                let stored = tokio::select! {
                    Some(message) = next_published(&mut published) => {
                        sink.record(&message.payload, Via::Published);
                        continue;
                    }
                    stored = tokio::time::timeout(QUIET, messages.next()) => stored,
                };
                match stored {
                    Ok(Some(Ok(message))) => {
                        if let Ok(info) = message.info() {
                            next = info.stream_sequence + 1;
                        }
                        sink.record(&message.payload, Via::Stored);
                    }
                    Ok(Some(Err(error))) => {
                        eprintln!(
                            "reader: reading stream {name}: {error}; reading again from {next}"
                        );
                        break;
                    }
                    Ok(None) => break,
                    // Quiet: fine, unless the stream holds what it did not deliver.
                    Err(_) => match jetstream.get_stream(&name).await {
                        Ok(found) if found.cached_info().state.last_sequence >= next => {
                            eprintln!(
                                "reader: stream {name} holds more than was delivered; reading again from {next}"
                            );
                            break;
                        }
                        _ => {}
                    },
                }
            }
        }
    });
    Ok(Reader { task, deliveries })
}

/// The next message of the plain subscription, if there is one; never, if not.
#[cfg(feature = "nats")]
async fn next_published(
    published: &mut Option<async_nats::Subscriber>,
) -> Option<async_nats::Message> {
    use futures::StreamExt;

    match published {
        Some(published) => published.next().await,
        None => std::future::pending().await,
    }
}

/// How long the reader's consumer may deliver nothing before the reader asks
/// whether the stream holds more.
#[cfg(feature = "nats")]
const QUIET: Duration = Duration::from_secs(2);

/// An ordered consumer of `stream` from sequence `start`, and its messages.
#[cfg(feature = "nats")]
async fn ordered_from(
    stream: &async_nats::jetstream::stream::Stream,
    client: &async_nats::Client,
    start: u64,
) -> Result<async_nats::jetstream::consumer::push::Ordered, String> {
    use async_nats::jetstream::consumer;

    let name = &stream.cached_info().config.name;
    let consumer: consumer::Consumer<consumer::push::OrderedConfig> = stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            description: Some("independent reader".into()),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|error| format!("cannot create a consumer on {name}: {error}"))?;
    consumer
        .messages()
        .await
        .map_err(|error| format!("cannot read {name}: {error}"))
}

/// Creates `topics` (one partition each) and reads them from the beginning.
#[cfg(feature = "kafka")]
pub async fn kafka(brokers: &str, topics: &[String]) -> Result<Reader, String> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        // Required by librdkafka, never joined: partitions are assigned below.
        .set("group.id", "fault-suite-reader")
        .set("enable.auto.commit", "false")
        // Arrival times are what the checks measure: the reader must be back
        // soon after a broker restart (librdkafka waits up to 10 s by default),
        // and not hold records back waiting to fill a fetch.
        .set("reconnect.backoff.max.ms", "100")
        .set("fetch.wait.max.ms", "50");
    let admin: AdminClient<DefaultClientContext> = config
        .create()
        .map_err(|error| format!("cannot create a Kafka admin client: {error}"))?;
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .map(|name| NewTopic::new(name, 1, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|error| format!("cannot create topics at {brokers}: {error}"))?;
    for result in results {
        if let Err((topic, code)) = result {
            return Err(format!("cannot create topic {topic}: {code}"));
        }
    }
    let consumer: StreamConsumer = config
        .create()
        .map_err(|error| format!("cannot create a Kafka consumer: {error}"))?;
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        assignment
            .add_partition_offset(topic, 0, Offset::Beginning)
            .map_err(|error| error.to_string())?;
    }
    consumer
        .assign(&assignment)
        .map_err(|error| format!("cannot assign the sink's topics: {error}"))?;
    let deliveries = Deliveries::default();
    let sink = deliveries.clone();
    let task = tokio::spawn(async move {
        let mut last_error: Option<Instant> = None;
        loop {
            match consumer.recv().await {
                Ok(message) => {
                    if let Some(payload) = message.payload() {
                        sink.record(payload, Via::Stored);
                    }
                }
                Err(error) => {
                    // librdkafka reconnects by itself; say so once a second at most.
                    if last_error.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                        eprintln!("reader: reading the sink's topics: {error}");
                        last_error = Some(Instant::now());
                    }
                }
            }
        }
    });
    Ok(Reader { task, deliveries })
}

// ---------------------------------------------------------------------------------
// Checks

/// What the deliveries show, over the whole log or a window of it.
#[derive(Debug, Default)]
pub struct Analysis {
    /// Arrivals of an id already received: id, stream, position, arrival.
    pub repeats: Vec<Delivery>,
    /// First arrivals of a stream's event at a position not after an earlier
    /// first arrival of that stream: one line each.
    pub reorders: Vec<(Instant, String)>,
}

impl Analysis {
    /// Classifies every delivery of `log` (in arrival order).
    pub fn of(log: &[Delivery]) -> Self {
        let mut seen: HashSet<&str> = HashSet::new();
        let mut last_position: HashMap<&str, u64> = HashMap::new();
        let mut analysis = Analysis::default();
        for delivery in log {
            if !seen.insert(delivery.id.as_str()) {
                analysis.repeats.push(delivery.clone());
                continue;
            }
            if let Some(last) = last_position.get(delivery.stream.as_str()) {
                if delivery.position <= *last {
                    analysis.reorders.push((
                        delivery.at,
                        format!(
                            "stream {}: position {} first arrived after position {last}",
                            delivery.stream, delivery.position
                        ),
                    ));
                }
            }
            let last = last_position.entry(delivery.stream.as_str()).or_default();
            *last = (*last).max(delivery.position);
        }
        analysis
    }

    /// Repeats that arrived in `[from, to)`.
    pub fn repeats_between(&self, from: Instant, to: Instant) -> Vec<&Delivery> {
        self.repeats
            .iter()
            .filter(|d| d.at >= from && d.at < to)
            .collect()
    }

    /// Reorders whose late first arrival was in `[from, to)`.
    pub fn reorders_between(&self, from: Instant, to: Instant) -> Vec<&str> {
        self.reorders
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, line)| line.as_str())
            .collect()
    }
}

/// The longest time any of `categories` went without an arrival between `from`
/// and `to` (counting the edges of the window), and which category: how long the
/// fault in that window held events up. Only meaningful while events keep being
/// appended to every category.
pub fn longest_gap(
    log: &[Delivery],
    categories: &[String],
    from: Instant,
    to: Instant,
) -> (Duration, String) {
    let mut arrivals: BTreeMap<&str, Vec<Instant>> = categories
        .iter()
        .map(|category| (category.as_str(), vec![from]))
        .collect();
    for delivery in log.iter().filter(|d| d.at > from && d.at < to) {
        if let Some(times) = arrivals.get_mut(delivery.category.as_str()) {
            times.push(delivery.at);
        }
    }
    arrivals
        .into_iter()
        .map(|(category, mut times)| {
            times.push(to);
            let gap = times
                .windows(2)
                .map(|pair| pair[1].saturating_duration_since(pair[0]))
                .max()
                .unwrap_or_default();
            (gap, category.to_owned())
        })
        .max()
        .unwrap_or_default()
}
