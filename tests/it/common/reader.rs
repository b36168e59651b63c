//! Independent readers: plain NATS JetStream and Kafka clients, sharing no code
//! with weir, that read what weir's sinks forwarded to a broker, plus the checks
//! made on what they read.
//!
//! Each reader records every message it gets as a [`Delivery`] (event id, stream,
//! position, arrival time) in a shared [`Deliveries`] log, repeats included:
//!
//! - [`nats`] creates the sink's JetStream stream itself before weir does, with
//!   the shortest duplicate window JetStream accepts (100 ms), so that it stores
//!   every publish but those repeated within 100 ms (weir leaves an existing
//!   stream as it is; the default two-minute window would hide repeats). It reads
//!   the stream from its start with an ordered consumer, which recreates itself
//!   after a server restart without losing or reordering a message.
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

/// Everything a reader received, in arrival order, and what it could not read.
#[derive(Clone, Default)]
pub struct Deliveries {
    log: Arc<Mutex<Vec<Delivery>>>,
    unreadable: Arc<Mutex<Vec<String>>>,
}

impl Deliveries {
    fn record(&self, body: &[u8]) {
        match Delivery::parse(body) {
            Some(delivery) => self.log.lock().expect("deliveries lock").push(delivery),
            None => self
                .unreadable
                .lock()
                .expect("deliveries lock")
                .push(String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()),
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

/// Creates JetStream stream `stream` capturing `subjects` (keeping every publish:
/// see the module docs) and reads it from the start.
pub async fn nats(url: &str, stream: &str, subjects: &str) -> Result<Reader, String> {
    use async_nats::jetstream::{self, consumer, stream as js};
    use futures::StreamExt;

    let client = async_nats::ConnectOptions::new()
        .name("fault suite reader")
        .max_reconnects(None)
        .connect(url)
        .await
        .map_err(|error| format!("cannot connect to NATS at {url}: {error}"))?;
    let jetstream = jetstream::new(client.clone());
    let created = jetstream
        .create_stream(js::Config {
            name: stream.to_owned(),
            description: Some("events forwarded by weir, read by the fault suite".into()),
            subjects: vec![subjects.to_owned()],
            storage: js::StorageType::File,
            // The server's minimum: a republished event is stored again, so the
            // suite can count repeats, which the default window would hide.
            duplicate_window: Duration::from_millis(100),
            ..Default::default()
        })
        .await
        .map_err(|error| format!("cannot create stream {stream}: {error}"))?;
    let consumer: consumer::Consumer<consumer::push::OrderedConfig> = created
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            description: Some("fault suite reader".into()),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|error| format!("cannot create a consumer on {stream}: {error}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|error| format!("cannot read {stream}: {error}"))?;
    let deliveries = Deliveries::default();
    let sink = deliveries.clone();
    let stream = stream.to_owned();
    let task = tokio::spawn(async move {
        // Keeps the connection (and its reconnecting) alive with the task.
        let _client = client;
        while let Some(message) = messages.next().await {
            match message {
                Ok(message) => sink.record(&message.payload),
                // The ordered consumer recreates itself; a report is enough.
                Err(error) => eprintln!("reader: reading stream {stream}: {error}"),
            }
        }
        eprintln!("reader: the consumer of stream {stream} ended");
    });
    Ok(Reader { task, deliveries })
}

/// Creates `topics` (one partition each) and reads them from the beginning.
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
        .set("enable.auto.commit", "false");
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
                        sink.record(payload);
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
