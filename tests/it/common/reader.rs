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
//!   reconnecting *and* JetStream dropped it as a duplicate.
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
/// capturing them and reads it from the start: see the module docs.
pub async fn nats(url: &str, stream: &str, subjects: &str) -> Result<Reader, String> {
    use async_nats::jetstream::{self, consumer, stream as js};
    use futures::StreamExt;

    let client = async_nats::ConnectOptions::new()
        .name("fault suite reader")
        .max_reconnects(None)
        // Back soon after a server restart, so the plain subscription misses
        // little (the stream has the rest).
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .connect(url)
        .await
        .map_err(|error| format!("cannot connect to NATS at {url}: {error}"))?;
    let mut published = client
        .subscribe(subjects.to_owned())
        .await
        .map_err(|error| format!("cannot subscribe to {subjects}: {error}"))?;
    client
        .flush()
        .await
        .map_err(|error| format!("cannot subscribe to {subjects}: {error}"))?;
    let jetstream = jetstream::new(client.clone());
    let created = jetstream
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
        loop {
            tokio::select! {
                message = published.next() => match message {
                    Some(message) => sink.record(&message.payload, Via::Published),
                    None => break,
                },
                message = messages.next() => match message {
                    Some(Ok(message)) => sink.record(&message.payload, Via::Stored),
                    // The ordered consumer recreates itself; a report is enough.
                    Some(Err(error)) => eprintln!("reader: reading stream {stream}: {error}"),
                    None => break,
                },
            }
        }
        eprintln!("reader: a subscription to the sink's subjects or stream {stream} ended");
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
