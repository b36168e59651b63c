//! A fleet on a NATS cluster of three with replicated streams, one of whose
//! servers is killed and started again while writers append.
//!
//! Three `nats-server`s (`common::services::PrivateNatsCluster`: free client
//! and cluster ports, private stores) carry the bus and the sink's stream; three
//! `weir run` nodes connect with all three URLs and `nats.replicas = 3`, so weir
//! creates its two bus streams and the sink's stream with three copies each. Two
//! writers append to 24 streams of three categories of a Postgres store (a schema
//! of its own on the shared server); the group bridges the three categories to
//! the NATS sink. An independent reader (a plain JetStream client, not weir's
//! reporting) reads the sink's stream from its start.
//!
//! Once events flow and every copy of every stream is current, the server
//! leading the most of the three streams (the sink's leader on a tie) is killed
//! with SIGKILL; the test waits until events appended after the kill arrive
//! through the other two, then starts it again on the same port and store. It
//! checks:
//!
//! - weir created all three streams with 3 replicas;
//! - the fleet is ready again (`/readyz` 200 on every node) within
//!   `member_timeout + lease_ttl + 1 s` of the server being back;
//! - the restarted server catches up: every replica of every stream is current
//!   again;
//! - **nothing lost**: every event appended arrived;
//! - **each stream in order**: a stream's events first arrive in position order;
//! - **bounded repeats**: at most one checkpoint cadence plus a batch per source.
//!   The sink's stream is weir's, with JetStream's default two-minute duplicate
//!   window, so what weir publishes again within it (an unacknowledged batch
//!   retried) is stored once and cannot show here: the count is of repeats that
//!   got past deduplication, which the bound holds whatever the window.
//!
//! Every wait is for a condition, within a guard against hangs. Under
//! `WEIR_REQUIRE_SERVICES=1` a missing `nats-server` or Postgres fails the test.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;

use crate::common::nodes::WeirNodes;
use crate::common::reader::{self, Analysis, Reader};
use crate::common::services::PrivateNatsCluster;
use crate::common::writers::{Plan, Target, Writers, category};
use crate::common::{TestPostgres, heavy_turn, init_logging, unique_name};

const SERVERS: usize = 3;
const REPLICAS: usize = 3;
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
const GROUP: &str = "bridge";
const PLAN: Plan = Plan {
    writers: 2,
    categories: 3,
    streams_per_category: 8,
    events_per_append: 2,
    every: Duration::from_millis(50),
};

/// The consumers' settings, which bound how much a broker fault may repeat.
const BATCH_SIZE: usize = 20;
const CHECKPOINT_EVERY: usize = 50;

/// The broker timings of the config, as in the fault suite.
const MEMBER_TIMEOUT: Duration = Duration::from_millis(1500);
const LEASE_TTL: Duration = Duration::from_secs(2);

/// Events appended after a moment that must arrive to show that delivery goes on.
const PROOF: usize = 20;

/// The longest wait for any one condition: a guard against hangs, longer than
/// the sink's 10 s acknowledgement timeout plus a retry, and than the reader's
/// consumer took to recover when its server was killed (up to 22 s seen).
const GUARD: Duration = Duration::from_secs(45);

/// The services, the nodes, the writers and the reader of the test, dropped in
/// field order: writers and nodes before the services.
struct ClusterFleet {
    writers: Writers,
    nodes: WeirNodes,
    reader: Reader,
    cluster: PrivateNatsCluster,
    /// A plain client of the cluster, for stream infos.
    jetstream: jetstream::Context,
    _db: TestPostgres,
    namespace: String,
    /// The sink's stream.
    stream: String,
    _dir: tempfile::TempDir,
}

impl ClusterFleet {
    /// Starts the cluster, the nodes, the reader and the writers; `None` when a
    /// service is missing and services are not required.
    async fn start() -> Option<Self> {
        let cluster = tokio::task::block_in_place(|| PrivateNatsCluster::start(SERVERS))?;
        let db = TestPostgres::start().await?;
        let jetstream = wait_for_jetstream(&cluster).await;
        let namespace = unique_name("natsc");
        let stream = format!("{namespace}_EVENTS").to_uppercase();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = dir.path().join("weir.toml");
        std::fs::write(&config, config_text(&cluster, &db, &namespace, &stream))
            .expect("write the config");
        let mut nodes = WeirNodes::new(dir.path(), config);
        if let Err(error) = nodes.start(&NODES, "full").await {
            panic!("the nodes did not start: {error}");
        }
        let reader = reader::nats_existing(&cluster.urls(), &stream, GUARD)
            .await
            .unwrap_or_else(|error| panic!("{error}\n{}", nodes.logs(30)));
        let target = Target {
            store: db.store.clone(),
            generation: 0,
        };
        Some(Self {
            writers: Writers::start(target, PLAN),
            nodes,
            reader,
            cluster,
            jetstream,
            _db: db,
            namespace,
            stream,
            _dir: dir,
        })
    }

    /// Fails the test with `problem` and the nodes' logs.
    fn fail(&self, problem: impl std::fmt::Display) -> ! {
        panic!("{problem}\n{}", self.nodes.logs(40))
    }

    /// The bus's streams and the sink's, by name.
    fn streams(&self) -> [String; 3] {
        let upper = self.namespace.to_uppercase();
        [
            self.stream.clone(),
            format!("{upper}_DECISIONS"),
            format!("{upper}_SIGNALS"),
        ]
    }

    /// Every stream's info, asked of any server.
    async fn infos(&self) -> Result<Vec<jetstream::stream::Info>, String> {
        let mut infos = Vec::new();
        for name in self.streams() {
            let mut stream = self
                .jetstream
                .get_stream(&name)
                .await
                .map_err(|error| format!("cannot look up stream {name}: {error}"))?;
            let info = stream
                .info()
                .await
                .map_err(|error| format!("cannot read stream {name}: {error}"))?;
            infos.push(info.clone());
        }
        Ok(infos)
    }

    /// The server leading the most of the streams (the sink's leader on a tie)
    /// and what it leads.
    async fn busiest_leader(&self) -> (usize, Vec<String>) {
        let infos = self.infos().await.unwrap_or_else(|e| self.fail(e));
        let mut leads: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for info in &infos {
            let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
            let leader =
                leader.unwrap_or_else(|| self.fail(format!("{} has no leader", info.config.name)));
            leads
                .entry(leader)
                .or_default()
                .push(info.config.name.clone());
        }
        // The sink's stream comes first, so on a tie the sink's leader wins.
        let (name, led) = leads
            .into_iter()
            .max_by_key(|(_, led)| (led.len(), led.contains(&self.stream)))
            .expect("three streams have leaders");
        let index = (0..SERVERS)
            .find(|index| PrivateNatsCluster::server_name(*index) == name)
            .unwrap_or_else(|| self.fail(format!("{name} is none of the cluster's servers")));
        (index, led)
    }

    /// Waits until at least `count` of the events whose append was sent after
    /// `after` have arrived, or for `None` every one of those sent so far.
    async fn wait_for_arrivals(&self, what: &str, after: Instant, count: Option<usize>) {
        let deadline = Instant::now() + GUARD;
        // Writers keep appending: "every one" is of those appended by now.
        let fixed = count.is_none().then(|| self.writers.sent_after(after));
        loop {
            let fresh;
            let appended = match &fixed {
                Some(fixed) => fixed,
                None => {
                    fresh = self.writers.sent_after(after);
                    &fresh
                }
            };
            let received = self.reader.deliveries.ids();
            let arrived = appended.iter().filter(|id| received.contains(*id)).count();
            let enough = match count {
                Some(count) => arrived >= count,
                None => arrived == appended.len(),
            };
            if enough {
                return;
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "{what}: {arrived} of the {} events appended since arrived within {GUARD:?}",
                    appended.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How long it took every node to answer `/readyz` with 200.
    async fn wait_until_ready(&self) -> Duration {
        let started = Instant::now();
        loop {
            let mut problems = Vec::new();
            for id in NODES {
                match self.nodes.get(id, "/readyz").await {
                    Ok((200, _)) => {}
                    Ok((code, body)) => problems.push(format!("{id} /readyz {code}: {body}")),
                    Err(error) => problems.push(error),
                }
            }
            if problems.is_empty() {
                return started.elapsed();
            }
            if started.elapsed() > GUARD {
                self.fail(format!("the fleet is not ready: {}", problems.join("; ")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every replica of every stream is current: all three servers
    /// hold the streams and have caught up.
    async fn wait_for_current_replicas(&self, what: &str) {
        let deadline = Instant::now() + GUARD;
        loop {
            let behind: Vec<String> = match self.infos().await {
                Ok(infos) => infos
                    .iter()
                    .filter_map(|info| {
                        let cluster = info.cluster.clone().unwrap_or_default();
                        let current = cluster.replicas.iter().filter(|r| r.current).count();
                        let leads = cluster.leader.is_some();
                        (!leads || current + 1 < REPLICAS)
                            .then(|| format!("{}: {cluster:?}", info.config.name))
                    })
                    .collect(),
                Err(error) => vec![error],
            };
            if behind.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                self.fail(format!("{what}: not every replica is current: {behind:?}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Waits until JetStream serves on the cluster, all servers in: a stream of
/// [`REPLICAS`] copies can be created. Returns a plain client of the cluster.
async fn wait_for_jetstream(cluster: &PrivateNatsCluster) -> jetstream::Context {
    let servers: Vec<String> = cluster.servers.iter().map(|s| s.url()).collect();
    let client = async_nats::connect(servers)
        .await
        .expect("a client of the private cluster");
    let jetstream = jetstream::new(client);
    let probe = jetstream::stream::Config {
        name: unique_name("PROBE"),
        subjects: vec![unique_name("probe")],
        num_replicas: REPLICAS,
        ..Default::default()
    };
    let deadline = Instant::now() + GUARD;
    loop {
        match jetstream.create_stream(probe.clone()).await {
            Ok(_) => break,
            Err(error) if Instant::now() > deadline => {
                let logs: Vec<String> = cluster
                    .servers
                    .iter()
                    .map(|s| s.server.log_tail(20))
                    .collect();
                panic!(
                    "the cluster's JetStream did not serve within {GUARD:?}: {error}\n{}",
                    logs.join("\n---\n")
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let _ = jetstream.delete_stream(&probe.name).await;
    jetstream
}

fn config_text(
    cluster: &PrivateNatsCluster,
    db: &TestPostgres,
    namespace: &str,
    stream: &str,
) -> String {
    let sources: Vec<String> = (0..PLAN.categories)
        .map(|index| format!("\"category:{}\"", category(index)))
        .collect();
    format!(
        r#"
[node]
shutdown_grace = "3s"

[store]
kind = "postgres"
url = "{store_url}"
schema = "{schema}"
pool_size = 4

[bus]
kind = "nats"
namespace = "{namespace}"

[nats]
url = "{urls}"
replicas = {REPLICAS}
connect_timeout = "2s"

[broker]
heartbeat_interval = "250ms"
member_timeout = "{member_timeout}ms"
refresh_interval = "1s"
lease_ttl = "{lease_ttl}ms"
handover_timeout = "3s"

[[subscriptions]]
group = "{GROUP}"
sources = [{sources}]
sink = {{ kind = "nats", subject = "{namespace}_events.{{category}}.{{stream}}", stream = "{stream}" }}

[subscriptions.consumer]
batch_size = {BATCH_SIZE}
poll_interval = "250ms"
checkpoint_every = {CHECKPOINT_EVERY}
checkpoint_interval = "1s"
error_policy = {{ policy = "retry", initial = "100ms", max = "1s", max_attempts = 1000, then = {{ policy = "stop" }} }}
"#,
        store_url = db.url,
        schema = db.schema,
        urls = cluster.urls(),
        member_timeout = MEMBER_TIMEOUT.as_millis(),
        lease_ttl = LEASE_TTL.as_millis(),
        sources = sources.join(", "),
    )
}

/// The checks on everything the reader received, once every appended event
/// arrived: order, repeats, nothing unreadable, no append given up.
fn judge(fleet: &ClusterFleet, began: Instant) -> String {
    let log = fleet.reader.deliveries.snapshot();
    let analysis = Analysis::of(&log);
    let appended = fleet.writers.all_ids();
    let distinct: HashSet<&str> = log.iter().map(|d| d.id.as_str()).collect();
    let lost = appended
        .iter()
        .filter(|id| !distinct.contains(id.as_str()))
        .count();
    assert_eq!(
        lost,
        0,
        "nothing lost: {lost} of {} appended never arrived",
        appended.len()
    );
    assert!(
        analysis.reorders.is_empty(),
        "each stream in order: {:?}",
        analysis
            .reorders
            .iter()
            .take(3)
            .map(|(_, line)| line)
            .collect::<Vec<_>>()
    );
    let bound = PLAN.categories * (CHECKPOINT_EVERY + BATCH_SIZE);
    assert!(
        analysis.repeats.len() <= bound,
        "{} repeats, more than {bound}: {} sources x (checkpoint_every {CHECKPOINT_EVERY} + a batch of {BATCH_SIZE})",
        analysis.repeats.len(),
        PLAN.categories
    );
    let unreadable = fleet.reader.deliveries.unreadable();
    assert!(
        unreadable.is_empty(),
        "not forwarded events: {unreadable:?}"
    );
    let errors = fleet.writers.errors_between(began, Instant::now());
    assert!(errors.is_empty(), "appends given up: {errors:?}");
    format!(
        "{} appended, all arrived in stream order, {} repeats (allowed {bound})",
        appended.len(),
        analysis.repeats.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_fleet_loses_nothing_when_a_cluster_server_restarts() {
    let _turn = heavy_turn().await;
    init_logging();
    let began = Instant::now();
    let Some(mut fleet) = ClusterFleet::start().await else {
        return;
    };
    for info in fleet.infos().await.unwrap_or_else(|e| fleet.fail(e)) {
        assert_eq!(
            info.config.num_replicas, REPLICAS,
            "{} as weir created it",
            info.config.name
        );
    }
    // A settled cluster: delivery under way, every copy of every stream current.
    fleet
        .wait_for_arrivals("before the fault", began, Some(PROOF))
        .await;
    fleet.wait_for_current_replicas("before the fault").await;
    let (victim, led) = fleet.busiest_leader().await;
    let killed_at = Instant::now();
    fleet.cluster.servers[victim].server.kill();
    fleet
        .wait_for_arrivals("with a server down", killed_at, Some(PROOF))
        .await;
    let down = killed_at.elapsed();
    let server = &mut fleet.cluster.servers[victim].server;
    if let Err(error) = tokio::task::block_in_place(|| server.start()) {
        fleet.fail(format!("the killed server did not start again: {error}"));
    }
    let back_at = Instant::now();
    let ready_after = fleet.wait_until_ready().await;
    let bound = MEMBER_TIMEOUT + LEASE_TTL + Duration::from_secs(1);
    assert!(
        ready_after <= bound,
        "ready {ready_after:?} after the server was back, more than {bound:?}"
    );
    fleet
        .wait_for_arrivals("after the restart", back_at, Some(PROOF))
        .await;
    fleet.wait_for_current_replicas("after the restart").await;
    fleet.writers.pause().await;
    fleet.wait_for_arrivals("in the end", began, None).await;
    let verdict = judge(&fleet, began);
    eprintln!(
        "nats cluster: killed {} (leader of {led:?}) for {down:.1?}; every node ready {ready_after:.1?} after it was back (allowed {bound:?}); {verdict}; {:.1?} in all",
        PrivateNatsCluster::server_name(victim),
        began.elapsed()
    );
}
