//! Observability end to end: a node's `/metrics`, `/livez`, `/readyz` and
//! `/status`, `weir status`, and the store measurements behind the lag and
//! visibility-horizon gauges.
//!
//! One node runs in process on the memory store and bus, in a process of its own
//! (the metrics recorder is global to a process, and other modules run
//! in-process nodes); the Postgres tests run the `weir` binary, and measure the
//! store directly. Postgres tests read
//! `WEIR_TEST_POSTGRES_URL` and skip with a note when it is unreachable, unless
//! `WEIR_REQUIRE_SERVICES=1`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use weir::broker::distributed::FleetServices;
use weir::broker::lease::MemoryLeaseStore;
use weir::broker::membership::MemoryMembershipStore;
use weir::broker::{BrokerRole, BrokerSettings, DistributedBroker, SubscriberSpec};
use weir::bus::MemoryBus;
use weir::consumer::{ConsumerSettings, EventProcessor, ProcessError};
use weir::event::{
    Category, Cursor, EventName, NewEvent, Source, StoredEvent, StreamName, WriteCondition,
};
use weir::metrics::{CATALOG, NodeMetrics, register_node};
use weir::runtime::{ConsumerStores, EventRuntime};
use weir::store::{EventStore, MemoryStore};
use weir::telemetry::http::HttpServer;
use weir::telemetry::status::NodeProbe;

use crate::common;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// How long anything awaited may take: a guard against hangs, not a performance
/// assertion.
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------
// Plain HTTP and the exposition format

/// One GET; the status code and body.
fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    common::node::http_get(address, path)
        .unwrap_or_else(|error| panic!("GET {path} from the node: {error}"))
}

/// Every sample of a scrape, by name and then by its label text (`{a="b"}`, or
/// empty for none).
fn samples(text: &str) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut samples: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let (name, labels) = match series.find('{') {
            Some(brace) => (&series[..brace], &series[brace..]),
            None => (series, ""),
        };
        samples
            .entry(name.to_owned())
            .or_default()
            .insert(labels.to_owned(), value.parse().expect("a number"));
    }
    samples
}

fn value(
    scrape: &BTreeMap<String, BTreeMap<String, f64>>,
    name: &str,
    labels: &str,
) -> Option<f64> {
    scrape.get(name)?.get(labels).copied()
}

/// Scrapes until `done` holds; the last scrape.
async fn scrape_until(
    address: SocketAddr,
    what: &str,
    done: impl Fn(&BTreeMap<String, BTreeMap<String, f64>>) -> bool,
) -> BTreeMap<String, BTreeMap<String, f64>> {
    let started = Instant::now();
    loop {
        let (code, text) = tokio::task::spawn_blocking(move || http_get(address, "/metrics"))
            .await
            .unwrap();
        assert_eq!(code, 200, "{text}");
        let scrape = samples(&text);
        if done(&scrape) {
            return scrape;
        }
        assert!(
            started.elapsed() < WAIT,
            "waited too long for {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get(address: SocketAddr, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(address, path))
        .await
        .unwrap()
}

async fn append(store: &dyn EventStore, category: &str, payloads: Vec<Value>) -> Vec<StoredEvent> {
    let events = payloads
        .into_iter()
        .map(|payload| NewEvent::new(EventName::new("Happened").unwrap(), payload))
        .collect();
    store
        .append(
            &Category::new(category).unwrap(),
            &StreamName::new("one").unwrap(),
            WriteCondition::Any,
            events,
        )
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------
// A node in process, on the memory store and bus

/// Waits for a permit per batch (so a test can hold processing back), and fails
/// events whose payload has `"poison": true` with kind `poison`.
struct Gate {
    permits: Arc<Semaphore>,
}

#[async_trait]
impl EventProcessor for Gate {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        let permit = self.permits.acquire().await.expect("the gate stays open");
        permit.forget();
        match events
            .iter()
            .position(|e| e.payload["poison"] == json!(true))
        {
            Some(index) => Err(ProcessError::new("poison", "a poisoned event").at(index)),
            None => Ok(()),
        }
    }
}

fn fast_broker() -> BrokerSettings {
    BrokerSettings {
        heartbeat_interval: Duration::from_millis(100),
        member_timeout: Duration::from_millis(400),
        refresh_interval: Duration::from_millis(500),
        lease_ttl: Duration::from_millis(600),
        handover_timeout: Duration::from_secs(1),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_exports_every_metric_and_reports_its_status() {
    if !common::alone("observability::a_node_exports_every_metric_and_reports_its_status").await {
        return;
    }
    common::init_logging();
    let metrics = weir::telemetry::install().expect("the recorder installs");
    let node = common::unique_name("node");
    let group = common::unique_name("billing");
    let category = common::unique_name("orders");
    let source: Source = format!("category:{category}").parse().unwrap();
    let source_labels = format!(r#"{{group="{group}",source="{source}"}}"#);
    let group_labels = format!(r#"{{group="{group}"}}"#);

    let events: Arc<MemoryStore> = Arc::new(MemoryStore::new());
    let bus = Arc::new(MemoryBus::new());
    let leases = Arc::new(MemoryLeaseStore::new());
    let services = FleetServices {
        membership: Arc::new(MemoryMembershipStore::new()),
        leases: leases.clone(),
        bus: bus.clone(),
    };
    let broker = DistributedBroker::new(&node, BrokerRole::Full, fast_broker(), services);
    let runtime = Arc::new(
        EventRuntime::new(
            &node,
            Arc::new(broker),
            ConsumerStores::in_memory(events.clone()),
            ConsumerSettings::default(),
        )
        .with_sample_interval(Duration::from_millis(100)),
    );
    let permits = Arc::new(Semaphore::new(0));
    let subscriber = format!("{node}/1");
    runtime
        .register_subscription_consumer(
            SubscriberSpec::new(&group, &subscriber, [source.clone()]),
            Arc::new(Gate {
                permits: permits.clone(),
            }),
            None,
        )
        .unwrap();
    register_node(&NodeMetrics {
        role: BrokerRole::Full.as_str(),
        groups: vec![(group.clone(), vec![source.metric_label()])],
        coordinated_groups: vec![group.clone()],
        sinks: vec!["stdout"],
    });
    let listener = weir::telemetry::http::bind("127.0.0.1:0").await.unwrap();
    let probe = NodeProbe {
        runtime: runtime.clone(),
        events: events.clone(),
        bus: bus.clone(),
        leases: Some(leases.clone()),
    };
    let server = HttpServer::start(listener, probe, metrics).unwrap();
    let address = server.address();

    // Before the node starts: alive, not ready, and every metric already there.
    let (code, body) = get(address, "/livez").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(address, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    let readiness: Value = serde_json::from_str(&body).unwrap();
    assert!(
        readiness["reasons"][0]
            .as_str()
            .unwrap()
            .contains("starting"),
        "{body}"
    );
    let fresh = scrape_until(address, "the first scrape", |_| true).await;
    assert_eq!(
        value(&fresh, "weir_consumer_events_total", &group_labels),
        Some(0.0)
    );
    assert_eq!(
        value(&fresh, "weir_consumer_lag_events", &source_labels),
        Some(0.0)
    );

    runtime.start().await.unwrap();
    let (code, body) = get(address, "/readyz").await;
    assert!(code == 200 || body.contains("starting"), "{code} {body}");

    // Events appended while processing is held back: the whole backlog is lag.
    let mut payloads: Vec<Value> = (0..9).map(|n| json!({"n": n})).collect();
    payloads.push(json!({"n": 9, "poison": true}));
    let appended = append(events.as_ref(), &category, payloads).await;
    let lagging = scrape_until(address, "the lag to show the backlog", |s| {
        value(s, "weir_consumer_lag_events", &source_labels) == Some(10.0)
    })
    .await;
    assert!(value(&lagging, "weir_consumer_lag_seconds", &source_labels).unwrap() >= 0.0);

    // Let it through: nine processed, the poisoned one a dead letter, no lag.
    permits.add_permits(1000);
    let caught_up = scrape_until(address, "processing to catch up", |s| {
        value(s, "weir_consumer_events_total", &group_labels) == Some(9.0)
            && value(s, "weir_consumer_lag_events", &source_labels) == Some(0.0)
            && value(s, "weir_coordinator_leader", "") == Some(1.0)
    })
    .await;
    for info in CATALOG {
        assert!(
            caught_up.contains_key(info.name)
                || caught_up.contains_key(&format!("{}_count", info.name)),
            "{} is not exported",
            info.name
        );
    }
    let at = |name: &str, labels: &str| value(&caught_up, name, labels);
    assert_eq!(at("weir_node_role", r#"{role="full"}"#), Some(1.0));
    assert_eq!(at("weir_node_role", r#"{role="observer"}"#), Some(0.0));
    assert_eq!(at("weir_node_role", r#"{role="coordinator"}"#), Some(0.0));
    assert!(at("weir_coordinator_epoch", "").unwrap() >= 1.0);
    assert!(at("weir_allocation_revision", &group_labels).unwrap() >= 1.0);
    assert_eq!(at("weir_group_subscribers", &group_labels), Some(1.0));
    assert_eq!(at("weir_sources_owned", &group_labels), Some(1.0));
    assert_eq!(at("weir_consumer_lag_seconds", &source_labels), Some(0.0));
    assert_eq!(
        at(
            "weir_consumer_errors_total",
            &format!(r#"{{group="{group}",kind="poison"}}"#)
        ),
        Some(1.0)
    );
    assert_eq!(at("weir_dead_letters_total", &group_labels), Some(1.0));
    assert!(
        at(
            "weir_bus_messages_total",
            r#"{kind="decision",direction="sent"}"#
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(at("weir_store_visibility_horizon_seconds", ""), Some(0.0));
    assert_eq!(
        at(
            "weir_build_info",
            &format!(r#"{{version="{}"}}"#, env!("CARGO_PKG_VERSION"))
        ),
        Some(1.0)
    );

    let (code, body) = get(address, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(address, "/status").await;
    assert_eq!(code, 200, "{body}");
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["node"], node.as_str());
    assert_eq!(status["role"], "full");
    assert_eq!(status["state"], "running");
    assert_eq!(status["leader"], node.as_str());
    assert!(status["epoch"].as_u64().unwrap() >= 1, "{body}");
    let groups = status["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{body}");
    assert_eq!(groups[0]["group"], group.as_str());
    let owned = &groups[0]["subscribers"][0];
    assert_eq!(owned["id"], subscriber.as_str());
    assert_eq!(owned["sources"][0]["source"], source.to_string());
    assert_eq!(owned["sources"][0]["state"], "running");
    let last = appended.last().unwrap().cursor.to_string();
    assert_eq!(owned["sources"][0]["cursor"], last.as_str(), "{body}");
    assert_eq!(owned["sources"][0]["lag_events"], 0, "{body}");

    // A stopped node is alive but not ready, and says why.
    runtime.stop().await;
    let (code, body) = get(address, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("the broker is stopped"), "{body}");
    let (code, _) = get(address, "/livez").await;
    assert_eq!(code, 200);
    server.stop().await;
}

#[tokio::test]
async fn the_memory_store_counts_a_bounded_backlog() {
    let store = MemoryStore::new();
    let category = "orders";
    let events = append(&store, category, (0..5).map(|n| json!({"n": n})).collect()).await;
    let source: Source = "category:orders".parse().unwrap();
    let all = store
        .backlog(&source, Cursor::default(), 100)
        .await
        .unwrap();
    assert_eq!(all.events, 5);
    assert_eq!(all.oldest, Some(events[0].observed_at));
    assert_eq!(
        store
            .backlog(&source, Cursor::default(), 2)
            .await
            .unwrap()
            .events,
        2
    );
    let rest = store
        .backlog(&Source::Log, events[2].cursor, 100)
        .await
        .unwrap();
    assert_eq!(rest.events, 2);
    let none = store.backlog(&source, events[4].cursor, 100).await.unwrap();
    assert_eq!((none.events, none.oldest), (0, None));
    assert_eq!(store.visibility_horizon().await.unwrap(), Duration::ZERO);
    store.ping().await.unwrap();
}

// ---------------------------------------------------------------------------------
// Postgres

/// On a private server: the open transaction would hold back every other test's
/// readers on the shared one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_holds_the_horizon_and_hides_the_backlog() {
    let Some(db) = common::TestPostgres::private().await else {
        return;
    };
    let store = db.store.clone();
    store.ping().await.unwrap();
    let category = common::unique_name("orders");
    let source: Source = format!("category:{category}").parse().unwrap();
    let first = append(
        store.as_ref(),
        &category,
        vec![json!({"n": 0}), json!({"n": 1})],
    )
    .await;
    let counted = store
        .backlog(&source, Cursor::default(), 100)
        .await
        .unwrap();
    assert_eq!(counted.events, 2);
    assert_eq!(counted.oldest, Some(first[0].observed_at));
    assert_eq!(
        store
            .backlog(&source, Cursor::default(), 1)
            .await
            .unwrap()
            .events,
        1
    );
    let stream: Source = format!("stream:{category}/one").parse().unwrap();
    assert_eq!(
        store
            .backlog(&stream, first[0].cursor, 100)
            .await
            .unwrap()
            .events,
        1
    );

    // A transaction that holds an id and stays open: what it started before
    // holds back every event appended after it.
    let holder = db.raw_client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .query_one("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();
    append(store.as_ref(), &category, vec![json!({"n": 2})]).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let horizon = store.visibility_horizon().await.unwrap();
    // At least as old as this transaction.
    assert!(horizon >= Duration::from_secs(1), "horizon {horizon:?}");
    let hidden = store.backlog(&source, first[1].cursor, 100).await.unwrap();
    assert_eq!(hidden.events, 0, "an event behind the horizon was counted");

    holder.batch_execute("COMMIT").await.unwrap();
    let visible = store.backlog(&source, first[1].cursor, 100).await.unwrap();
    assert_eq!(visible.events, 1);
}

/// A `weir run` process and what it logged.
struct Node {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Node {
    fn start(config: &std::path::Path) -> Node {
        let mut command = Command::new(WEIR);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("WEIR_") || name == "RUST_LOG" {
                command.env_remove(name);
            }
        }
        let mut child = command
            .args(["--config", config.to_str().unwrap(), "run"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start weir run");
        let stderr = child.stderr.take().unwrap();
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Node {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first JSON log record `wanted` accepts.
    fn record(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    let record: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
                    if wanted(&record) {
                        return record;
                    }
                }
                Err(_) => panic!(
                    "no such log record; the node logged:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + WAIT;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("weir run did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn weir(args: &[&str]) -> std::process::Output {
    let mut command = Command::new(WEIR);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WEIR_") {
            command.env_remove(name);
        }
    }
    command.args(args).stdin(Stdio::null()).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_run_serves_metrics_status_and_readiness_on_postgres() {
    let Some(db) = common::TestPostgres::start().await else {
        return;
    };
    let group = "bridge";
    let category = common::unique_name("orders");
    let dir = std::env::temp_dir().join(common::unique_name("weir_obs"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("weir.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [node]
            id = "obs-node"
            shutdown_grace = "2s"
            [store]
            kind = "postgres"
            url = "{url}"
            schema = "{schema}"
            pool_size = 4
            connect_timeout = "2s"
            [http]
            listen = "127.0.0.1:0"
            [log]
            format = "json"
            [[subscriptions]]
            group = "{group}"
            sources = ["category:{category}"]
            [subscriptions.consumer]
            poll_interval = "100ms"
            "#,
            url = db.url,
            schema = db.schema,
        ),
    )
    .unwrap();
    let mut node = Node::start(&config);
    let serving = node.record(|r| {
        r["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("serving /metrics"))
    });
    let address: SocketAddr = serving["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(serving["level"], "INFO");

    let appended = append(
        db.store.as_ref(),
        &category,
        (0..25).map(|n| json!({"n": n})).collect(),
    )
    .await;
    let source_labels = format!(r#"{{group="{group}",source="category:{category}"}}"#);
    let group_labels = format!(r#"{{group="{group}"}}"#);
    let scrape = scrape_until(address, "every event processed and no lag", |s| {
        value(s, "weir_consumer_events_total", &group_labels) == Some(25.0)
            && value(s, "weir_consumer_lag_events", &source_labels) == Some(0.0)
    })
    .await;
    for info in CATALOG {
        assert!(
            scrape.contains_key(info.name) || scrape.contains_key(&format!("{}_count", info.name)),
            "{} is not exported",
            info.name
        );
    }
    assert_eq!(
        value(&scrape, "weir_node_role", r#"{role="full"}"#),
        Some(1.0)
    );
    assert_eq!(value(&scrape, "weir_coordinator_leader", ""), Some(1.0));
    assert!(value(&scrape, "weir_coordinator_epoch", "").unwrap() >= 1.0);
    assert_eq!(
        value(&scrape, "weir_sink_published_total", r#"{sink="stdout"}"#),
        Some(25.0)
    );
    let (code, body) = get(address, "/readyz").await;
    assert_eq!(code, 200, "{body}");

    // The lag gauge starts at 0, so wait until /status shows a measurement made
    // after the last event was processed.
    let last = appended.last().unwrap().cursor.to_string();
    let started = Instant::now();
    let mut caught_up_at = None;
    loop {
        let (code, body) = get(address, "/status").await;
        assert_eq!(code, 200, "{body}");
        let status: Value = serde_json::from_str(&body).unwrap();
        let consumer = &status["groups"][0]["subscribers"][0]["sources"][0];
        let measured_at = consumer["lag_measured_at"]
            .as_str()
            .and_then(|at| at.parse::<chrono::DateTime<chrono::Utc>>().ok());
        match caught_up_at {
            None if consumer["cursor"] == last.as_str() => caught_up_at = Some(chrono::Utc::now()),
            Some(caught_up) if measured_at.is_some_and(|at| at > caught_up) => {
                assert_eq!(consumer["lag_events"], 0, "{body}");
                assert_eq!(consumer["lag_seconds"], 0.0, "{body}");
                break;
            }
            _ => {}
        }
        assert!(
            started.elapsed() < WAIT,
            "no lag measured after catching up: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // weir status prints it.
    let url = format!("http://{address}");
    let output = tokio::task::spawn_blocking(move || weir(&["status", "--url", &url]))
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(table.contains("node     obs-node"), "{table}");
    assert!(table.contains("leader   obs-node"), "{table}");
    let row = table
        .lines()
        .find(|line| line.starts_with(group))
        .unwrap_or_else(|| panic!("no row for the group:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            group,
            "obs-node/1",
            &format!("category:{category}"),
            "running",
            &last,
            "0",
            "0.0s"
        ],
        "{table}"
    );

    // The schema gone from under it: alive, not ready, and the reason says so.
    let admin = db.raw_client().await;
    admin
        .batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", db.schema))
        .await
        .unwrap();
    let (code, body) = get(address, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    let readiness: Value = serde_json::from_str(&body).unwrap();
    let reasons = readiness["reasons"].to_string();
    assert!(
        reasons.contains("the event store") && reasons.contains("weir migrate"),
        "{body}"
    );
    let (code, _) = get(address, "/livez").await;
    assert_eq!(code, 200);
    node.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_metrics_doc_documents_every_metric_as_the_catalogue_declares_it() {
    let doc = include_str!("../../docs/metrics.md");
    for info in CATALOG {
        let row = doc
            .lines()
            .find(|line| line.starts_with(&format!("| `{}` |", info.name)))
            .unwrap_or_else(|| panic!("docs/metrics.md has no row for {}", info.name));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[2], info.kind.as_str(), "{row}");
        let labels: Vec<String> = info.labels.iter().map(|l| format!("`{l}`")).collect();
        assert_eq!(cells[3], labels.join(", "), "{row}");
    }
}

#[test]
fn weir_status_explains_when_nothing_listens() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = free.local_addr().unwrap();
    drop(free);
    let output = weir(&["status", "--url", &format!("http://{address}")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("cannot reach a weir node") && stderr.contains("weir run"),
        "{stderr}"
    );
}

#[test]
fn weir_run_reports_a_taken_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let output = weir(&["--listen", &address, "run"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("in use") && stderr.contains("http.listen"),
        "{stderr}"
    );
}

/// A memory store whose `ping` hangs while `hanging` is set: a frozen database.
#[derive(Default)]
struct Hanging {
    inner: MemoryStore,
    hanging: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl EventStore for Hanging {
    async fn append_batch(
        &self,
        category: &weir::event::Category,
        appends: Vec<weir::store::StreamAppend>,
    ) -> weir::store::Result<Vec<StoredEvent>> {
        self.inner.append_batch(category, appends).await
    }
    async fn read(
        &self,
        source: &weir::event::Source,
        after: weir::event::Cursor,
        limit: usize,
    ) -> weir::store::Result<Vec<StoredEvent>> {
        self.inner.read(source, after, limit).await
    }
    async fn latest(
        &self,
        category: &weir::event::Category,
        stream: &weir::event::StreamName,
    ) -> weir::store::Result<Option<StoredEvent>> {
        self.inner.latest(category, stream).await
    }
    async fn head(&self, source: &weir::event::Source) -> weir::store::Result<Option<StoredEvent>> {
        self.inner.head(source).await
    }
    async fn watch(&self) -> weir::store::Result<weir::store::AppendWatcher> {
        self.inner.watch().await
    }
    async fn ping(&self) -> weir::store::Result<()> {
        while self.hanging.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

/// With the store frozen, `/readyz` answers at once from what the background
/// check found (saying how old that is), well within a probe's timeout, and
/// turns 503 once the check has found the store silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_at_once_from_the_background_check_while_the_store_hangs() {
    let store = Arc::new(Hanging::default());
    let runtime = Arc::new(EventRuntime::new(
        "node-r",
        Arc::new(weir::broker::SingletonBroker::new()),
        ConsumerStores::in_memory(store.clone()),
        ConsumerSettings::default(),
    ));
    runtime.start().await.unwrap();
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .build_recorder()
        .handle();
    let listener = weir::telemetry::http::bind("127.0.0.1:0").await.unwrap();
    let probe = NodeProbe {
        runtime: runtime.clone(),
        events: store.clone(),
        bus: Arc::new(MemoryBus::new()),
        leases: None,
    };
    let server = HttpServer::start(listener, probe, metrics).unwrap();
    let address = server.address();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(address, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "the node never got ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    store
        .hanging
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // The store's check takes the whole check timeout (2 s) from now on; a
    // probe must never wait for it.
    let mut answers = Vec::new();
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let asked = Instant::now();
        let (code, body) = get(address, "/readyz").await;
        let took = asked.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "/readyz took {took:?} with the store frozen: {body}"
        );
        let readiness: Value = serde_json::from_str(&body).unwrap();
        assert!(readiness["age_ms"].is_u64(), "{body}");
        answers.push((code, body));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = answers.last().unwrap();
    assert_eq!(*code, 503, "the frozen store never showed: {answers:?}");
    assert!(body.contains("the event store"), "{body}");
    store
        .hanging
        .store(false, std::sync::atomic::Ordering::SeqCst);
    server.stop().await;
    runtime.stop().await;
}
