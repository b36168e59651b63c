//! Operating a fleet of three `weir run` processes (Postgres store, NATS bus, a
//! NATS sink) through the `weir` command line, checked by an independent reader:
//! a plain NATS subscription to the sink's subjects, which sees every publish.
//!
//! - a write sent to a node that does not lead is answered 503 naming the leader,
//!   and the CLI follows it there; a write without the token is refused;
//! - `weir checkpoints reset --to-start` under load (a writer appending all along)
//!   makes the fleet deliver every event once more, each stream in order, and no
//!   event a third time;
//! - `weir groups pause` stops delivery, survives the leader's exit, and `resume`
//!   delivers what was appended meanwhile, once each.
//!
//! It takes turns with the other suites that run fleets of `weir` processes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use weir::event::{Category, EventName, NewEvent, StreamName, WriteCondition};
use weir::postgres::{PostgresStore, PostgresStoreOptions};
use weir::store::EventStore;

use crate::common::node::weir_command;
use crate::common::nodes::WeirNodes;
use crate::common::reader::Delivery;
use crate::common::{self, TestPostgres, nats_url, service_missing, unique_name};

const TOKEN: &str = "operate-test-token";
const GROUP: &str = "bridge";
const STREAMS: usize = 12;
/// The group's sources: its category in `partitions` slices.
const SOURCES: usize = 4;
const WAIT: Duration = Duration::from_secs(60);

/// Every message published under the sink's subjects, repeats included.
type Log = Arc<Mutex<Vec<Delivery>>>;

struct Fleet {
    nodes: WeirNodes,
    store: Arc<PostgresStore>,
    category: String,
    log: Log,
    _nats: async_nats::Client,
    _db: TestPostgres,
}

async fn fleet() -> Option<Fleet> {
    let db = TestPostgres::start().await?;
    let namespace = unique_name("operate");
    let category = format!("orders{}", &namespace[namespace.len() - 6..]);
    let prefix = namespace.replace('_', "-");
    let nats = match async_nats::connect(nats_url()).await {
        Ok(client) => client,
        Err(error) => {
            service_missing("NATS", error);
            return None;
        }
    };
    let mut subscription = nats.subscribe(format!("{prefix}.>")).await.unwrap();
    nats.flush().await.unwrap();
    let log: Log = Arc::default();
    let sink = Arc::clone(&log);
    tokio::spawn(async move {
        while let Some(message) = subscription.next().await {
            if let Some(delivery) = Delivery::parse(&message.payload) {
                sink.lock().unwrap().push(delivery);
            }
        }
    });
    let dir = std::env::temp_dir().join(&namespace);
    std::fs::create_dir_all(&dir).unwrap();
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
kind = "nats"
namespace = "{namespace}"

[nats]
url = "{nats}"

[broker]
heartbeat_interval = "250ms"
member_timeout = "2s"
refresh_interval = "1s"
lease_ttl = "2s"
handover_timeout = "3s"

[http]
admin_token = "{TOKEN}"

[[subscriptions]]
group = "{GROUP}"
sources = ["category:{category}"]
partitions = {SOURCES}
sink = {{ kind = "nats", subject = "{prefix}.{{category}}.{{stream}}", stream = "{stream}" }}

[subscriptions.consumer]
batch_size = 20
poll_interval = "250ms"
checkpoint_every = 1
"#,
        url = db.url,
        schema = db.schema,
        nats = nats_url(),
        stream = prefix.to_uppercase(),
    );
    let path = dir.join("weir.toml");
    std::fs::write(&path, config).unwrap();
    let store = Arc::new(
        PostgresStore::connect(&PostgresStoreOptions::new(db.url.clone()).schema(&db.schema))
            .unwrap(),
    );
    Some(Fleet {
        nodes: WeirNodes::new(&dir, path),
        store,
        category,
        log,
        _nats: nats,
        _db: db,
    })
}

impl Fleet {
    async fn append(&self, stream: usize, count: usize) -> Vec<String> {
        append(&self.store, &self.category, stream, count).await
    }

    fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for delivery in self.log.lock().unwrap().iter() {
            *counts.entry(delivery.id.clone()).or_insert(0) += 1;
        }
        counts
    }

    async fn wait_for(&self, what: &str, done: impl Fn(&BTreeMap<String, usize>) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(&self.counts()) {
            if Instant::now() > deadline {
                panic!("timed out waiting until {what}\n{}", self.nodes.logs(40));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node's `/status` shows its consumers paused,
    /// and the group's every source held by one of them.
    async fn wait_until_paused(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut states = Vec::new();
            for id in self.nodes.running() {
                if let Ok(found) = self.nodes.source_states(&id).await {
                    states.extend(found);
                }
            }
            if states.len() == SOURCES && states.iter().all(|(_, state)| state == "paused") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the consumers never all reported paused: {states:?}\n{}",
                self.nodes.logs(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node that leads, by the first running node's `/status`.
    async fn leader(&self) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            for id in self.nodes.running() {
                if let Ok((Some(leader), _)) = self.nodes.leader(&id).await {
                    if self.nodes.running().contains(&leader) {
                        return leader;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "nobody leads\n{}",
                self.nodes.logs(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, id: &str) -> String {
        format!("http://{}", self.nodes.nodes[id].http)
    }

    /// `weir ARGS --url URL` with the fleet's config; exit code, stdout, stderr.
    async fn weir(&self, args: &[&str], url: &str, token: Option<&str>) -> (i32, String, String) {
        let mut command = tokio::process::Command::from(weir_command());
        command.args(args).arg("--url").arg(url);
        if let Some(token) = token {
            command.arg("--token").arg(token);
        }
        let output = command.output().await.expect("run weir");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

async fn append(store: &PostgresStore, category: &str, stream: usize, count: usize) -> Vec<String> {
    let events = (0..count)
        .map(|n| NewEvent::new(EventName::new("Placed").unwrap(), json!({ "n": n })))
        .collect();
    store
        .append(
            &Category::new(category).unwrap(),
            &StreamName::new(format!("order-{stream}")).unwrap(),
            WriteCondition::Any,
            events,
        )
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.id.to_string())
        .collect()
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_reset_and_pause_a_running_fleet_through_the_leader() {
    let _turn = common::heavy_turn().await;
    let Some(mut fleet) = fleet().await else {
        return;
    };
    fleet.nodes.migrate().await.unwrap();
    fleet
        .nodes
        .start(&["node-a", "node-b", "node-c"], "full")
        .await
        .unwrap();
    let mut before = Vec::new();
    for stream in 0..STREAMS {
        before.extend(fleet.append(stream, 5).await);
    }
    fleet
        .wait_for("the first events arrive", |counts| {
            before.iter().all(|id| counts.contains_key(id))
        })
        .await;
    let leader = fleet.leader().await;
    let follower = fleet
        .nodes
        .running()
        .into_iter()
        .find(|id| *id != leader)
        .unwrap();

    // A write to a follower: 503 naming the leader over HTTP; the CLI follows it.
    let pause = json!({ "group": GROUP }).to_string();
    let (code, body) = common::node::http_post(
        fleet.nodes.nodes[&follower].http,
        "/admin/groups/pause",
        Some(TOKEN),
        &pause,
    )
    .unwrap();
    assert_eq!(code, 503, "{body}");
    let answer = json_of(&body);
    assert_eq!(answer["leader"], leader.as_str(), "{body}");
    assert_eq!(answer["leader_url"], fleet.url(&leader).as_str(), "{body}");
    let (code, _, stderr) = fleet
        .weir(
            &["groups", "pause", "--group", GROUP],
            &fleet.url(&follower),
            None,
        )
        .await;
    assert_eq!(
        code, 77,
        "a write without the token was not refused: {stderr}"
    );
    assert!(stderr.contains("401"), "{stderr}");

    // A reset to the start, under load, sent to a follower.
    let (code, stdout, stderr) = fleet
        .weir(
            &[
                "checkpoints",
                "reset",
                "--group",
                GROUP,
                "--to-start",
                "--dry-run",
                "--json",
            ],
            &fleet.url(&follower),
            Some(TOKEN),
        )
        .await;
    assert_eq!(code, 0, "{stderr}");
    let plan = json_of(&stdout);
    assert_eq!(plan["lines"].as_array().unwrap().len(), SOURCES, "{stdout}");
    let writer = {
        let store = Arc::clone(&fleet.store);
        let category = fleet.category.clone();
        tokio::spawn(async move {
            let mut written = Vec::new();
            for round in 0..100 {
                written.extend(append(&store, &category, round % STREAMS, 1).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            written
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // With a request id of its own, as after an interrupted command it is sent
    // again below.
    let reset = [
        "checkpoints",
        "reset",
        "--group",
        GROUP,
        "--to-start",
        "--request-id",
        "operate-reset-1",
        "--json",
    ];
    let (code, stdout, stderr) = fleet.weir(&reset, &fleet.url(&follower), Some(TOKEN)).await;
    assert_eq!(code, 0, "{stderr}\n{}", fleet.nodes.logs(40));
    assert!(stderr.contains("sending to the leader"), "{stderr}");
    let report = json_of(&stdout);
    assert_eq!(report["dry_run"], false);
    // Sent again with its request id (as after an interrupted command): the
    // first outcome, and no second reset (checked below: no event arrives a
    // third time).
    let (code, again, stderr) = fleet.weir(&reset, &fleet.url(&follower), Some(TOKEN)).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        json_of(&again),
        report,
        "a resend did not answer the first outcome"
    );
    let later = writer.await.unwrap();
    fleet
        .wait_for(
            "every earlier event arrives twice, every later one at least once",
            |counts| {
                before.iter().all(|id| counts.get(id) == Some(&2))
                    && later.iter().all(|id| counts.contains_key(id))
            },
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = fleet.counts();
    for id in before.iter().chain(&later) {
        let count = counts.get(id).copied().unwrap_or(0);
        assert!((1..=2).contains(&count), "event {id} arrived {count} times");
    }
    let log = fleet.log.lock().unwrap().clone();
    for stream in 0..STREAMS {
        let name = format!("/order-{stream}");
        let positions: Vec<u64> = log
            .iter()
            .filter(|d| d.stream.ends_with(&name))
            .map(|d| d.position)
            .collect();
        let restarts: Vec<usize> = (1..positions.len())
            .filter(|&i| positions[i] <= positions[i - 1])
            .collect();
        assert_eq!(
            restarts.len(),
            1,
            "stream {name} was not replayed once, in order: {positions:?}"
        );
        assert_eq!(positions[restarts[0]], 0, "{name}: {positions:?}");
        let replayed: BTreeSet<u64> = positions[restarts[0]..].iter().copied().collect();
        let last = positions.iter().max().copied().unwrap();
        assert_eq!(
            replayed.len() as u64,
            last + 1,
            "{name}'s replay missed events: {positions:?}"
        );
    }

    // A pause outlives the leader; a resume delivers what waited, once.
    let (code, stdout, stderr) = fleet
        .weir(
            &["groups", "pause", "--group", GROUP],
            &fleet.url(&follower),
            Some(TOKEN),
        )
        .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("paused"), "{stdout}");
    fleet.wait_until_paused().await;
    let delivered = fleet.log.lock().unwrap().len();
    let mut waiting = fleet.append(0, 3).await;
    fleet.nodes.stop(&[leader.as_str()]).await.unwrap();
    let new_leader = fleet.leader().await;
    waiting.extend(fleet.append(1, 3).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fleet.log.lock().unwrap().len(),
        delivered,
        "a paused group delivered"
    );
    let (code, stdout, stderr) = fleet
        .weir(
            &["status", "--fleet", "--json"],
            &fleet.url(&new_leader),
            None,
        )
        .await;
    assert_eq!(code, 0, "{stderr}");
    let status = json_of(&stdout);
    assert_eq!(status["leader"], new_leader.as_str(), "{stdout}");
    assert_eq!(status["paused_groups"], json!([GROUP]), "{stdout}");
    let lines = status["checkpoints"].as_array().unwrap();
    assert_eq!(lines.len(), SOURCES, "{stdout}");
    for line in lines {
        assert_eq!(line["state"], "paused", "{stdout}");
    }
    let (code, _, stderr) = fleet
        .weir(
            &["groups", "resume", "--group", GROUP],
            &fleet.url(&new_leader),
            Some(TOKEN),
        )
        .await;
    assert_eq!(code, 0, "{stderr}");
    fleet
        .wait_for("what waited during the pause arrives", |counts| {
            waiting.iter().all(|id| counts.contains_key(id))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = fleet.counts();
    for id in &waiting {
        assert_eq!(counts.get(id), Some(&1), "event {id} after the resume");
    }
    let running: Vec<String> = fleet.nodes.running();
    let ids: Vec<&str> = running.iter().map(String::as_str).collect();
    fleet.nodes.stop(&ids).await.unwrap();
}
