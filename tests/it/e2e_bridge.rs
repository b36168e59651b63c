//! The bridge end to end, with real services and `weir` nodes as separate
//! processes: Postgres as the store, NATS or Kafka as both the allocation bus and
//! the sink's destination.
//!
//! Each scenario starts three nodes (one coordinator and two observers, or three
//! full nodes) on one config, appends 10,000 events over 100 streams in 5
//! categories (or 500 streams of one category read as 12 partitions, four per
//! node) while they run, and reads everything the sink delivered back from
//! the broker. In the first half an observer is stopped gracefully (nothing may be
//! lost or delivered twice); in the second half one is killed with SIGKILL
//! (nothing may be lost; redeliveries of what it processed after its last
//! checkpoint are allowed, up to [`repeats_after_a_kill`] per source it consumed,
//! and reported). Every stream must arrive in
//! order. The coordinator scenario kills a coordinator-only node and checks that
//! a restarted one takes over with a higher epoch while events keep flowing.
//!
//! Services come from `WEIR_TEST_POSTGRES_URL`, `WEIR_TEST_NATS_URL` and
//! `WEIR_TEST_KAFKA_BROKERS`; without them the scenarios skip, unless
//! `WEIR_REQUIRE_SERVICES=1`, which makes them fail. Scenarios run one at a time,
//! and not beside the other suites that run fleets of `weir` processes: each
//! already runs three or four nodes on a small machine.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::node::{free_port, http_get, weir_command};
use crate::common::nodes::owned_in;
use crate::common::{TestPostgres, heavy_turn, init_logging, service_missing, unique_name};
use serde_json::Value;
use weir::event::{Category, EventName, NewEvent, StreamName, WriteCondition};
use weir::store::{EventStore, StreamAppend};

/// Where the events go and how the group reads them.
#[derive(Debug, Clone, Copy)]
struct Shape {
    categories: usize,
    streams_per_category: usize,
    /// Streams of one category a batch writes to, in turn.
    streams_per_batch: usize,
    events_per_stream_per_batch: usize,
    /// `partitions` of the subscription.
    partitions: u32,
}

/// Five categories of 20 streams, each category one source.
const SPREAD: Shape = Shape {
    categories: 5,
    streams_per_category: 20,
    streams_per_batch: 20,
    events_per_stream_per_batch: 5,
    partitions: 1,
};

/// One category of 500 streams as 12 partitions: four per node of three.
const PARTITIONED: Shape = Shape {
    categories: 1,
    streams_per_category: 500,
    streams_per_batch: 100,
    events_per_stream_per_batch: 1,
    partitions: 12,
};

/// Events per batch, the same in every shape.
const BATCH: usize = 100;
const BATCHES: usize = 100;
const TOTAL: usize = BATCH * BATCHES;
/// Pause between batches, so the nodes work while events keep coming.
const BATCH_PAUSE: Duration = Duration::from_millis(40);

/// The consumers' settings (in the config below), which bound what a kill
/// repeats.
const BATCH_SIZE: usize = 200;
const CHECKPOINT_EVERY: usize = 1000;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);

/// Guards against hangs; not performance claims.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// The two fleets every broker is tried with: (node id, role).
const COORDINATOR_AND_TWO_OBSERVERS: [(&str, &str); 3] = [
    ("coordinator", "coordinator"),
    ("observer-1", "observer"),
    ("observer-2", "observer"),
];
const THREE_FULL_NODES: [(&str, &str); 3] =
    [("full-1", "full"), ("full-2", "full"), ("full-3", "full")];

// ---------------------------------------------------------------------------------
// Nodes as processes

/// Which broker carries decisions and forwarded events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broker {
    Nats,
    Kafka,
}

/// What the nodes of one scenario share: the store, the broker and one config.
struct Fleet {
    shape: Shape,
    dir: PathBuf,
    config: PathBuf,
    postgres: TestPostgres,
    nodes: BTreeMap<String, Node>,
}

struct Node {
    child: Child,
    log: PathBuf,
    role: String,
    /// Where its `/metrics`, `/livez`, `/readyz` and `/status` are served.
    http: std::net::SocketAddr,
}

impl Fleet {
    /// A fleet whose bus namespace is `namespace`; its sink forwards under
    /// [`sink_prefix`]`(namespace)`.
    async fn start(
        broker: Broker,
        broker_address: &str,
        namespace: &str,
        shape: Shape,
    ) -> Option<Self> {
        let postgres = TestPostgres::start().await?;
        let prefix = sink_prefix(namespace);
        let dir = std::env::temp_dir().join(namespace);
        std::fs::create_dir_all(&dir).expect("create the scenario's directory");
        let sources: Vec<String> = (0..shape.categories)
            .map(|c| format!("\"category:{}\"", category(c)))
            .collect();
        let (bus, sink) = match broker {
            Broker::Nats => (
                format!(
                    "kind = \"nats\"\nnamespace = \"{namespace}\"\n\n[nats]\nurl = \"{broker_address}\""
                ),
                format!(
                    "{{ kind = \"nats\", subject = \"{prefix}.{{category}}.{{stream}}\", stream = \"{}\" }}",
                    prefix.to_uppercase()
                ),
            ),
            Broker::Kafka => (
                format!(
                    "kind = \"kafka\"\nnamespace = \"{namespace}\"\n\n[kafka]\nbrokers = \"{broker_address}\""
                ),
                format!("{{ kind = \"kafka\", topic = \"{prefix}.{{category}}\" }}"),
            ),
        };
        let config = format!(
            r#"
[node]
shutdown_grace = "3s"

[store]
kind = "postgres"
url = "{url}"
schema = "{schema}"
pool_size = 4

[bus]
{bus}

[broker]
heartbeat_interval = "250ms"
member_timeout = "1500ms"
refresh_interval = "1s"
lease_ttl = "2s"
handover_timeout = "3s"

[[subscriptions]]
group = "bridge"
sources = [{sources}]
instances = 2
partitions = {partitions}
sink = {sink}

[subscriptions.consumer]
batch_size = {BATCH_SIZE}
poll_interval = "250ms"
checkpoint_every = {CHECKPOINT_EVERY}
checkpoint_interval = "{checkpoint_interval}ms"
"#,
            url = postgres.url,
            schema = postgres.schema,
            sources = sources.join(", "),
            partitions = shape.partitions,
            checkpoint_interval = CHECKPOINT_INTERVAL.as_millis(),
        );
        let path = dir.join("weir.toml");
        std::fs::write(&path, config).expect("write the scenario's config");
        Some(Self {
            shape,
            dir,
            config: path,
            postgres,
            nodes: BTreeMap::new(),
        })
    }

    /// Starts node `id` in `role` and waits until it says it started.
    fn spawn(&mut self, id: &str, role: &str) {
        let log = self.dir.join(format!("{id}.log"));
        let file = std::fs::File::create(&log).expect("create the node's log");
        let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("a local address");
        let child = weir_command()
            .args(["run", "--config"])
            .arg(&self.config)
            .env("WEIR_NODE__ID", id)
            .env("WEIR_NODE__ROLE", role)
            .env("WEIR_HTTP__LISTEN", http.to_string())
            .env("WEIR_LOG", "info,weir=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start weir");
        self.nodes.insert(
            id.to_owned(),
            Node {
                child,
                log,
                role: role.to_owned(),
                http,
            },
        );
        self.wait_for_log(id, "weir node started", START_TIMEOUT);
    }

    fn wait_for_log(&mut self, id: &str, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let node = self.nodes.get_mut(id).expect("a started node");
            let log = std::fs::read_to_string(&node.log).unwrap_or_default();
            if log.contains(needle) {
                return;
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                panic!("node {id} exited ({status}) before logging {needle:?}:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not log {needle:?} within {timeout:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(&mut self, id: &str) {
        let mut node = self.nodes.remove(id).expect("a running node");
        let pid = node.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(
            sent.is_ok_and(|s| s.success()),
            "could not signal node {id}"
        );
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            if let Some(status) = node.child.try_wait().expect("wait for the node") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not stop within {EXIT_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = std::fs::read_to_string(&node.log).unwrap_or_default();
        assert!(status.success(), "node {id} stopped with {status}:\n{log}");
    }

    /// SIGKILL: no goodbye, no final checkpoint.
    fn kill(&mut self, id: &str) {
        let mut node = self.nodes.remove(id).expect("a running node");
        node.child.kill().expect("kill the node");
        let _ = node.child.wait();
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                all.push_str(&format!(
                    "--- {} (last lines)\n{}\n",
                    entry.path().display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        all
    }

    /// The sources node `id` consumes now, by its `/status`.
    fn owned_sources(&self, id: &str) -> Vec<String> {
        let node = self.nodes.get(id).expect("a running node");
        match http_get(node.http, "/status") {
            Ok((200, body)) => owned_in(&serde_json::from_str(&body).expect("/status is JSON")),
            other => panic!("GET /status of {id}: {other:?}"),
        }
    }

    /// The coordinator lease's holder (its node id, less the incarnation's token)
    /// and epoch, from the store.
    async fn leader(&self) -> Option<(String, i64)> {
        let client = self.postgres.raw_client().await;
        let rows = client
            .query(
                &format!(
                    "SELECT regexp_replace(holder, '@[^@]*$', ''), epoch FROM {}.weir_leases WHERE name = 'coordinator' AND expires_at > now()",
                    self.postgres.schema
                ),
                &[],
            )
            .await
            .expect("read the coordinator lease");
        rows.first().map(|row| (row.get(0), row.get(1)))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("node logs kept in {}", self.dir.display());
        }
    }
}

/// Where the sink forwards to: apart from the bus's own subjects and topics.
fn sink_prefix(namespace: &str) -> String {
    format!("{namespace}_events")
}

fn category(index: usize) -> String {
    format!("cat{index}")
}

// ---------------------------------------------------------------------------------
// Events in, deliveries out

/// Appends batches `batches` (each: some streams of one category, a few events
/// each), pausing between them.
async fn append(store: &dyn EventStore, shape: Shape, batches: std::ops::Range<usize>) {
    assert_eq!(
        shape.streams_per_batch * shape.events_per_stream_per_batch,
        BATCH
    );
    for batch in batches {
        let category = Category::new(category(batch % shape.categories)).expect("valid category");
        let appends = (0..shape.streams_per_batch)
            .map(|i| {
                let s = (batch * shape.streams_per_batch + i) % shape.streams_per_category;
                let events = (0..shape.events_per_stream_per_batch)
                    .map(|k| {
                        NewEvent::new(
                            EventName::new("Happened").expect("valid name"),
                            serde_json::json!({ "batch": batch, "k": k }),
                        )
                    })
                    .collect();
                StreamAppend::new(
                    StreamName::new(format!("s{s:03}")).expect("valid stream"),
                    WriteCondition::Any,
                    events,
                )
            })
            .collect();
        store
            .append_batch(&category, appends)
            .await
            .expect("append a batch");
        tokio::time::sleep(BATCH_PAUSE).await;
    }
}

/// One event as the destination received it.
#[derive(Debug, Clone)]
struct Delivery {
    id: String,
    stream: String,
    position: u64,
    at: Instant,
}

impl Delivery {
    /// Reads the forwarded event (the stored event as JSON).
    fn parse(body: &[u8]) -> Self {
        let event: Value = serde_json::from_slice(body).expect("a forwarded event is JSON");
        Self {
            id: event["id"].as_str().expect("an id").to_owned(),
            stream: format!(
                "{}/{}",
                event["category"].as_str().expect("a category"),
                event["stream"].as_str().expect("a stream")
            ),
            position: event["position"].as_u64().expect("a position"),
            at: Instant::now(),
        }
    }
}

type Deliveries = Arc<Mutex<Vec<Delivery>>>;

/// Waits until `expected` distinct events have arrived.
async fn wait_for_distinct(deliveries: &Deliveries, expected: usize, fleet: &Fleet) {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let distinct = distinct_ids(deliveries);
        if distinct >= expected {
            assert_eq!(distinct, expected, "more distinct events than appended");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {distinct} of {expected} events arrived within {DELIVERY_TIMEOUT:?}\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn distinct_ids(deliveries: &Deliveries) -> usize {
    let deliveries = deliveries.lock().expect("deliveries lock");
    deliveries
        .iter()
        .map(|d| d.id.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Checks that each stream's events first arrived in position order without a
/// gap, and returns how many deliveries were repeats.
fn check_order_and_count_repeats(deliveries: &[Delivery], shape: Shape) -> usize {
    let mut next_position: HashMap<&str, u64> = HashMap::new();
    let mut repeats = 0;
    for delivery in deliveries {
        let next = next_position.entry(delivery.stream.as_str()).or_default();
        if delivery.position < *next {
            repeats += 1;
        } else {
            assert_eq!(
                delivery.position, *next,
                "stream {} skipped from position {} to {}",
                delivery.stream, next, delivery.position
            );
            *next += 1;
        }
    }
    assert_eq!(
        next_position.len(),
        shape.categories * shape.streams_per_category
    );
    repeats
}

/// Events one source's consumer may have published past its stored checkpoint
/// when it is killed, by the config: a checkpoint is stored once
/// `checkpoint_every` events or `checkpoint_interval` have passed (checked after
/// every batch), so at most what is appended to a source in an interval, or
/// `checkpoint_every` if fewer, plus the batch that crosses the line. A source
/// gets at most a category's appends: a batch of [`BATCH`] events every
/// [`BATCH_PAUSE`] or more, the categories in turn.
fn repeats_after_a_kill(shape: Shape) -> usize {
    let per_second = BATCH as f64 / BATCH_PAUSE.as_secs_f64() / shape.categories as f64;
    let in_interval = (per_second * CHECKPOINT_INTERVAL.as_secs_f64()).ceil() as usize;
    CHECKPOINT_EVERY.min(in_interval) + BATCH_SIZE
}

/// The longest time any category went without a delivery in `window` after
/// `from`, while events kept being appended: how long processing of moved
/// sources paused.
fn longest_pause(deliveries: &[Delivery], from: Instant, window: Duration) -> Duration {
    let mut by_category: BTreeMap<&str, Vec<Instant>> = BTreeMap::new();
    for delivery in deliveries
        .iter()
        .filter(|d| d.at >= from && d.at <= from + window)
    {
        let category = delivery.stream.split('/').next().unwrap_or_default();
        by_category.entry(category).or_default().push(delivery.at);
    }
    by_category
        .values()
        .flat_map(|times| {
            std::iter::once(from)
                .chain(times.iter().copied())
                .collect::<Vec<_>>()
                .windows(2)
                .map(|pair| pair[1] - pair[0])
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or_default()
}

/// The value of every sample of `name` in a `/metrics` body, summed.
fn metric_sum(body: &str, name: &str, labels: &str) -> f64 {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            series.strip_prefix(name).is_some_and(|rest| {
                (rest.is_empty() || rest.starts_with('{')) && rest.contains(labels)
            })
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

impl Fleet {
    /// Waits until every node's `/metrics` shows `wanted` as the sum of the
    /// samples of `name` whose labels contain `labels`.
    async fn until_every_node_shows(&self, name: &str, labels: &str, wanted: f64) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let shown: Vec<(String, f64)> = self
                .nodes
                .iter()
                .map(|(id, node)| {
                    let body = http_get(node.http, "/metrics")
                        .map(|(_, b)| b)
                        .unwrap_or_default();
                    (id.clone(), metric_sum(&body, name, labels))
                })
                .collect();
            if shown.iter().all(|(_, value)| *value == wanted) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not every node shows {name} {labels} = {wanted}: {shown:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What the running nodes export while they work: each its role, one leader
    /// among them, events processed and published by the nodes that consume, bus
    /// traffic, and readiness.
    fn check_metrics(&self, sink: &str) {
        let mut leaders = 0.0;
        let mut processed = 0.0;
        for (id, node) in &self.nodes {
            let body = match http_get(node.http, "/metrics") {
                Ok((200, body)) => body,
                other => panic!("GET /metrics of {id}: {other:?}"),
            };
            let role = format!("role=\"{}\"", node.role);
            assert_eq!(
                metric_sum(&body, "weir_node_role", &role),
                1.0,
                "{id}:\n{body}"
            );
            assert_eq!(
                metric_sum(&body, "weir_ready", ""),
                1.0,
                "{id} is ready:\n{body}"
            );
            assert!(
                metric_sum(&body, "weir_bus_messages_total", "") > 0.0,
                "{id}:\n{body}"
            );
            leaders += metric_sum(&body, "weir_coordinator_leader", "");
            if node.role != "coordinator" {
                let events = metric_sum(&body, "weir_consumer_events_total", "group=\"bridge\"");
                let published = metric_sum(
                    &body,
                    "weir_sink_published_total",
                    &format!("sink=\"{sink}\""),
                );
                assert!(
                    published >= events,
                    "{id}: {published} published < {events} processed"
                );
                processed += events;
            }
        }
        assert_eq!(leaders, 1.0, "exactly one node leads");
        assert!(processed > 0.0, "the running nodes processed events");
    }
}

// ---------------------------------------------------------------------------------
// The scenarios

/// Three nodes of `roles`; the observer `graceful` is stopped during the first
/// half and a new one started, `killed` is killed during the second half.
#[allow(clippy::too_many_arguments)]
async fn bridge_scenario(
    broker: Broker,
    address: &str,
    namespace: &str,
    shape: Shape,
    deliveries: Deliveries,
    roles: [(&str, &str); 3],
    graceful: &str,
    killed: &str,
) -> Option<Fleet> {
    let mut fleet = Fleet::start(broker, address, namespace, shape).await?;
    for (id, role) in roles {
        fleet.spawn(id, role);
    }
    let store: Arc<dyn EventStore> = fleet.postgres.store.clone();
    if shape.partitions > 1 {
        let each = f64::from(shape.partitions) / roles.len() as f64;
        fleet
            .until_every_node_shows("weir_sources_owned", "group=\"bridge\"", each)
            .await;
    }

    // First half: a graceful stop in the middle. Nothing lost, nothing twice.
    append(&*store, shape, 0..20).await;
    let stopped_at = Instant::now();
    let appending = tokio::spawn({
        let store = Arc::clone(&store);
        async move { append(&*store, shape, 20..BATCHES / 2).await }
    });
    fleet.stop(graceful);
    fleet.spawn(
        "replacement",
        if graceful.starts_with("full") {
            "full"
        } else {
            "observer"
        },
    );
    appending.await.expect("appender");
    wait_for_distinct(&deliveries, TOTAL / 2, &fleet).await;
    let first_half = deliveries.lock().expect("lock").clone();
    let repeats = check_order_and_count_repeats(&first_half, shape);
    assert_eq!(
        repeats,
        0,
        "a graceful stop delivered {repeats} events twice\n{}",
        fleet.logs()
    );
    let pause = longest_pause(&first_half, stopped_at, Duration::from_secs(10));
    eprintln!("{broker:?}: after a graceful stop, the longest pause of a category was {pause:?}");

    // Second half: SIGKILL in the middle. Nothing lost; repeats bounded by
    // what the killed node's consumers may not have checkpointed.
    append(&*store, shape, BATCHES / 2..70).await;
    let owned = fleet.owned_sources(killed).len();
    let killed_at = Instant::now();
    fleet.kill(killed);
    append(&*store, shape, 70..BATCHES).await;
    // Every source's new owner repeats before it publishes what is new to it,
    // and every source had new events: once all arrived, so did every repeat.
    wait_for_distinct(&deliveries, TOTAL, &fleet).await;
    let all = deliveries.lock().expect("lock").clone();
    let repeats = check_order_and_count_repeats(&all, shape);
    let pause = longest_pause(&all, killed_at, Duration::from_secs(15));
    let bound = owned * repeats_after_a_kill(shape);
    eprintln!(
        "{broker:?}: {TOTAL} events appended, {} distinct delivered; after SIGKILL {repeats} redeliveries (allowed {bound}: {owned} sources x {}) and a longest pause of {pause:?}",
        distinct_ids(&deliveries),
        repeats_after_a_kill(shape)
    );
    assert!(
        repeats <= bound,
        "{broker:?}: a SIGKILL repeated {repeats} events, more than the {bound} allowed ({owned} sources of {killed} x (min(checkpoint_every {CHECKPOINT_EVERY}, a source's appends in checkpoint_interval {CHECKPOINT_INTERVAL:?}) + batch_size {BATCH_SIZE}))\n{}",
        fleet.logs()
    );
    // weir_ready is re-evaluated every few seconds: wait for every node's.
    fleet.until_every_node_shows("weir_ready", "", 1.0).await;
    fleet.check_metrics(match broker {
        Broker::Nats => "nats",
        Broker::Kafka => "kafka",
    });
    Some(fleet)
}

/// Kills the current leader with SIGKILL. With `restart_as`, starts it again in
/// that role and expects it to lead again; without, expects another running node
/// to take over. Either way the new term has a higher epoch, and events appended
/// meanwhile still arrive.
async fn leader_failover(fleet: &mut Fleet, deliveries: &Deliveries, restart_as: Option<&str>) {
    let (leader, epoch) = fleet.leader().await.expect("a leader");
    fleet.kill(&leader);
    let extra = BATCHES..BATCHES + 10;
    append(&*fleet.postgres.store, fleet.shape, extra.clone()).await;
    if let Some(role) = restart_as {
        fleet.spawn(&leader, role);
    }
    let deadline = Instant::now() + START_TIMEOUT;
    let (new_leader, new_epoch) = loop {
        if let Some((holder, new_epoch)) = fleet.leader().await {
            if new_epoch > epoch && fleet.nodes.contains_key(&holder) {
                break (holder, new_epoch);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new leader after {leader} was killed\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if restart_as.is_some() {
        assert_eq!(
            new_leader, leader,
            "the restarted coordinator is the only candidate"
        );
    }
    eprintln!(
        "{new_leader} leads with epoch {new_epoch} after {leader} (epoch {epoch}) was killed"
    );
    wait_for_distinct(deliveries, TOTAL + extra.len() * BATCH, fleet).await;
}

mod nats {
    use super::*;
    use crate::common::nats_url as url;
    use futures::StreamExt;

    /// Collects every message published under `prefix.>`, duplicates included: a
    /// plain subscription sees each publish, even those JetStream deduplicates.
    async fn collect(prefix: &str) -> Option<(Deliveries, async_nats::Client)> {
        let client = match async_nats::connect(url()).await {
            Ok(client) => client,
            Err(error) => {
                service_missing("NATS", error);
                return None;
            }
        };
        let mut subscription = client
            .subscribe(format!("{prefix}.>"))
            .await
            .expect("subscribe to the sink's subjects");
        client.flush().await.expect("flush the subscription");
        let deliveries: Deliveries = Arc::default();
        let sink = Arc::clone(&deliveries);
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                sink.lock()
                    .expect("lock")
                    .push(Delivery::parse(&message.payload));
            }
        });
        Some((deliveries, client))
    }

    async fn scenario(
        shape: Shape,
        roles: [(&str, &str); 3],
        graceful: &str,
        killed: &str,
    ) -> Option<(Fleet, Deliveries)> {
        init_logging();
        let namespace = unique_name("e2e");
        let (deliveries, client) = collect(&sink_prefix(&namespace)).await?;
        let fleet = bridge_scenario(
            Broker::Nats,
            &url(),
            &namespace,
            shape,
            Arc::clone(&deliveries),
            roles,
            graceful,
            killed,
        )
        .await?;
        // Stored once each: JetStream deduplicated the redeliveries by event id.
        let jetstream = async_nats::jetstream::new(client);
        let mut stream = jetstream
            .get_stream(sink_prefix(&namespace).to_uppercase())
            .await
            .expect("the sink created its stream");
        let stored = stream.info().await.expect("stream info").state.messages;
        assert_eq!(stored, TOTAL as u64, "events stored in the sink's stream");
        Some((fleet, deliveries))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_coordinator_two_observers_survive_a_stop_a_kill_and_a_new_leader() {
        let _turn = heavy_turn().await;
        let scenario = scenario(
            SPREAD,
            COORDINATOR_AND_TWO_OBSERVERS,
            "observer-1",
            "observer-2",
        );
        if let Some((mut fleet, deliveries)) = scenario.await {
            let (leader, _) = fleet.leader().await.expect("a leader");
            assert_eq!(leader, "coordinator", "only the coordinator node competes");
            leader_failover(&mut fleet, &deliveries, Some("coordinator")).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_full_nodes_survive_a_stop_and_a_kill() {
        let _turn = heavy_turn().await;
        scenario(SPREAD, THREE_FULL_NODES, "full-2", "full-3").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn twelve_partitions_of_one_category_spread_over_three_nodes() {
        let _turn = heavy_turn().await;
        scenario(PARTITIONED, THREE_FULL_NODES, "full-2", "full-3").await;
    }
}

mod kafka {
    use super::*;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

    /// Creates the sink's topics and reads them from the beginning, duplicates
    /// included.
    async fn collect(brokers: &str, prefix: &str, shape: Shape) -> Option<Deliveries> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", prefix)
            .set("enable.auto.commit", "false");
        let admin: AdminClient<DefaultClientContext> = config.create().expect("admin client");
        let names: Vec<String> = (0..shape.categories)
            .map(|c| format!("{prefix}.{}", category(c)))
            .collect();
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|name| NewTopic::new(name, 1, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        match admin.create_topics(&topics, &options).await {
            Ok(results) => {
                for result in results {
                    if let Err((topic, code)) = result {
                        panic!("cannot create topic {topic}: {code}");
                    }
                }
            }
            Err(error) => {
                service_missing("Kafka", error);
                return None;
            }
        }
        let consumer: StreamConsumer = config.create().expect("consumer");
        let mut assignment = TopicPartitionList::new();
        for name in &names {
            assignment
                .add_partition_offset(name, 0, Offset::Beginning)
                .expect("assign");
        }
        consumer
            .assign(&assignment)
            .expect("assign the sink's topics");
        let deliveries: Deliveries = Arc::default();
        let sink = Arc::clone(&deliveries);
        tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(message) => {
                        if let Some(payload) = message.payload() {
                            sink.lock().expect("lock").push(Delivery::parse(payload));
                        }
                    }
                    Err(error) => eprintln!("reading the sink's topics: {error}"),
                }
            }
        });
        Some(deliveries)
    }

    async fn scenario(
        shape: Shape,
        roles: [(&str, &str); 3],
        graceful: &str,
        killed: &str,
    ) -> Option<(Fleet, Deliveries)> {
        init_logging();
        let brokers = crate::common::kafka_brokers()?;
        let namespace = unique_name("e2e");
        let deliveries = collect(&brokers, &sink_prefix(&namespace), shape).await?;
        let fleet = bridge_scenario(
            Broker::Kafka,
            &brokers,
            &namespace,
            shape,
            Arc::clone(&deliveries),
            roles,
            graceful,
            killed,
        )
        .await?;
        Some((fleet, deliveries))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_coordinator_two_observers_survive_a_stop_and_a_kill() {
        let _turn = heavy_turn().await;
        scenario(
            SPREAD,
            COORDINATOR_AND_TWO_OBSERVERS,
            "observer-1",
            "observer-2",
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn twelve_partitions_of_one_category_spread_over_three_nodes() {
        let _turn = heavy_turn().await;
        scenario(PARTITIONED, THREE_FULL_NODES, "full-2", "full-3").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_full_nodes_survive_a_stop_a_kill_and_a_new_leader() {
        let _turn = heavy_turn().await;
        if let Some((mut fleet, deliveries)) =
            scenario(SPREAD, THREE_FULL_NODES, "full-2", "full-3").await
        {
            leader_failover(&mut fleet, &deliveries, None).await;
        }
    }
}
