//! The admin API on in-process fleets, each scenario on memory stores and on
//! Postgres: writes only on the leader (503 naming it elsewhere) and only with
//! the token; a pause that survives a change of leader; a checkpoint reset to the
//! start under load that delivers every event once more, in stream order; and
//! the checkpoints list with states and lag.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use weir::admin::{Admin, AdminAuth, AdminParts};
use weir::broker::control::{FleetStore, MemoryFleetStore};
use weir::broker::distributed::FleetServices;
use weir::broker::lease::MemoryLeaseStore;
use weir::broker::membership::MemoryMembershipStore;
use weir::broker::{Broker, BrokerRole, DistributedBroker, SubscriberSpec};
use weir::bus::MemoryBus;
use weir::consumer::{ConsumerSettings, ConsumerState, EventProcessor, ProcessError, from_fn};
use weir::event::{Category, EventName, NewEvent, Source, StoredEvent, StreamName, WriteCondition};
use weir::lifecycle::{Journal, JournalTask, LifecycleSettings};
use weir::postgres::{PostgresFleetStore, PostgresLeaseStore, PostgresMembershipStore};
use weir::runtime::{ConsumerStores, EventRuntime};

use crate::common::fleet::settings;
use crate::common::{self, TestPostgres, wait_until};

const TOKEN: &str = "s3cret-admin-token";
const GROUP: &str = "bridge";
const WAIT: Duration = Duration::from_secs(30);
/// How long a reset's request waits for its outcome: shorter than the
/// handover timeout, so that a reset whose old owner is stuck answers 202.
const REPLY_WAIT: Duration = Duration::from_secs(1);

/// What every node of one fleet shares.
struct Backend {
    fleet_services: FleetServices,
    stores: ConsumerStores,
    fleet: Arc<dyn FleetStore>,
    _db: Option<TestPostgres>,
}

fn memory() -> Backend {
    let events = Arc::new(weir::store::MemoryStore::new());
    Backend {
        fleet_services: FleetServices {
            membership: Arc::new(MemoryMembershipStore::new()),
            leases: Arc::new(MemoryLeaseStore::new()),
            bus: Arc::new(MemoryBus::new()),
        },
        stores: ConsumerStores::in_memory(events),
        fleet: Arc::new(MemoryFleetStore::new()),
        _db: None,
    }
}

async fn postgres() -> Option<Backend> {
    let db = TestPostgres::start().await?;
    Some(Backend {
        fleet_services: FleetServices {
            membership: Arc::new(PostgresMembershipStore::new(db.store.clone())),
            leases: Arc::new(PostgresLeaseStore::new(db.store.clone())),
            bus: Arc::new(MemoryBus::new()),
        },
        stores: ConsumerStores::postgres(db.store.clone()),
        fleet: Arc::new(PostgresFleetStore::new(db.store.clone())),
        _db: Some(db),
    })
}

/// Every event any node's processor handled, in the order handled.
type Handled = Arc<Mutex<Vec<StoredEvent>>>;

/// How a node's processor behaves, switched by the test.
#[derive(Clone, Default)]
struct Switches {
    /// Every event fails permanently while set.
    failing: Arc<AtomicBool>,
    /// Each event is held (its batch in flight) while set.
    stalled: Arc<AtomicBool>,
    /// Where the group's processor runs.
    isolation: weir::consumer::settings::Isolation,
    /// The name of the thread each call of the processor started on.
    threads: Arc<Mutex<Vec<String>>>,
}

impl Switches {
    fn stalled(stalled: bool) -> Self {
        let switches = Self::default();
        switches.stalled.store(stalled, Ordering::SeqCst);
        switches
    }
}

struct Node {
    id: String,
    runtime: Arc<EventRuntime>,
    journal: JournalTask,
    admin: Arc<Admin>,
    url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Node {
    async fn start(backend: &Backend, id: &str, sources: &[Source], handled: &Handled) -> Self {
        Self::start_failing(backend, id, sources, handled, &Arc::default()).await
    }

    /// A node whose processor fails permanently on every event while `failing`.
    async fn start_failing(
        backend: &Backend,
        id: &str,
        sources: &[Source],
        handled: &Handled,
        failing: &Arc<AtomicBool>,
    ) -> Self {
        let switches = Switches {
            failing: Arc::clone(failing),
            ..Switches::default()
        };
        Self::start_with(backend, id, sources, handled, &switches).await
    }

    /// A node whose processor behaves as `switches` say.
    async fn start_with(
        backend: &Backend,
        id: &str,
        sources: &[Source],
        handled: &Handled,
        switches: &Switches,
    ) -> Self {
        let broker = DistributedBroker::new(
            id,
            BrokerRole::Full,
            settings(),
            backend.fleet_services.clone(),
        )
        .with_fleet_store(Arc::clone(&backend.fleet));
        let control = broker
            .control()
            .expect("a distributed broker takes commands");
        let consumer = ConsumerSettings {
            poll_interval: Duration::from_millis(20),
            checkpoint_every: 1,
            batch_size: 10,
            isolation: switches.isolation,
            ..ConsumerSettings::default()
        };
        let runtime = Arc::new(EventRuntime::new(
            id,
            Arc::new(broker),
            backend.stores.clone(),
            consumer,
        ));
        let (log, switches) = (Arc::clone(handled), switches.clone());
        let (journal, journal_task) = Journal::start(
            Arc::clone(&backend.stores.events),
            id,
            &LifecycleSettings::default(),
        );
        let processor: Arc<dyn EventProcessor> = Arc::new(from_fn(move |event: StoredEvent| {
            let (log, switches) = (Arc::clone(&log), switches.clone());
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            async move {
                switches.threads.lock().unwrap().push(thread);
                while switches.stalled.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if switches.failing.load(Ordering::SeqCst) {
                    return Err(ProcessError::permanent(
                        "rejected",
                        "the downstream refused it",
                    ));
                }
                log.lock().unwrap().push(event);
                Ok(())
            }
        }));
        runtime
            .register_subscription_consumer(
                SubscriberSpec::new(GROUP, format!("{id}/1"), sources.iter().cloned()),
                Arc::clone(&processor),
                None,
            )
            .unwrap();
        runtime.start().await.unwrap();
        let executors = BTreeMap::from([(
            GROUP.to_owned(),
            runtime.group_executor(GROUP, None).unwrap(),
        )]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: SocketAddr = listener.local_addr().unwrap();
        let admin = Arc::new(
            Admin::new(AdminParts {
                node: id.to_owned(),
                stores: backend.stores.clone(),
                membership: Arc::clone(&backend.fleet_services.membership),
                fleet: Arc::clone(&backend.fleet),
                control,
                processors: BTreeMap::from([(GROUP.to_owned(), processor)]),
                auth: AdminAuth::new(vec![("ops".into(), TOKEN.into())], address),
                member_timeout: settings().member_timeout,
                handover_timeout: settings().handover_timeout,
                journal,
            })
            .with_reply_wait(REPLY_WAIT)
            .with_executors(executors),
        );
        let router = weir::admin::http::router(Arc::clone(&admin));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let url = format!("http://{address}");
        // The node's report carries its admin address, for 503 answers elsewhere.
        let report = json!({
            "status": {"node": id, "role": "full", "version": "test", "state": "running",
                       "leader": null, "epoch": 0, "groups": []},
            "ready": true, "admin_url": url, "leading": null
        });
        backend.fleet.report(id, &report).await.unwrap();
        Self {
            id: id.to_owned(),
            runtime,
            journal: journal_task,
            admin,
            url,
            server,
        }
    }

    async fn stop(self) {
        self.runtime.stop().await;
        self.server.abort();
        self.journal.stop().await;
    }

    fn consumer_states(&self) -> Vec<ConsumerState> {
        self.runtime
            .status()
            .consumers
            .into_iter()
            .map(|c| c.state)
            .filter(|state| *state != ConsumerState::Stopped)
            .collect()
    }
}

/// POSTs `body` to the node at `url` with `token`; the status and the JSON answer.
async fn post(url: &str, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let address: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let (path, token) = (path.to_owned(), token.map(str::to_owned));
    let (status, answer) = tokio::task::spawn_blocking(move || {
        common::node::http_post(address, &path, token.as_deref(), &body.to_string())
    })
    .await
    .unwrap()
    .unwrap();
    (status, serde_json::from_str(&answer).unwrap_or(Value::Null))
}

async fn append(backend: &Backend, stream: &str, count: usize) -> Vec<StoredEvent> {
    let events = (0..count)
        .map(|n| NewEvent::new(EventName::new("Happened").unwrap(), json!({ "n": n })))
        .collect();
    backend
        .stores
        .events
        .append(
            &Category::new("orders").unwrap(),
            &StreamName::new(stream).unwrap(),
            WriteCondition::Any,
            events,
        )
        .await
        .unwrap()
}

/// The node that leads, once one does.
async fn leader<'a>(nodes: &'a [&'a Node]) -> &'a Node {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(node) = nodes.iter().find(|n| n.admin.leading().is_some()) {
            return node;
        }
        assert!(Instant::now() < deadline, "nobody leads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count_by_id(handled: &Handled) -> BTreeMap<uuid::Uuid, usize> {
    let mut counts = BTreeMap::new();
    for event in handled.lock().unwrap().iter() {
        *counts.entry(event.id).or_insert(0) += 1;
    }
    counts
}

fn orders() -> Vec<Source> {
    vec!["category:orders".parse().unwrap()]
}

async fn writes_go_to_the_leader_with_a_token_and_a_pause_survives_a_leader_change(
    backend: Backend,
) {
    let handled: Handled = Arc::default();
    let a = Node::start(&backend, "node-a", &orders(), &handled).await;
    let b = Node::start(&backend, "node-b", &orders(), &handled).await;
    let mut appended = Vec::new();
    for stream in ["o-1", "o-2", "o-3"] {
        appended.extend(append(&backend, stream, 5).await);
    }
    wait_until("the first events are handled", || {
        handled.lock().unwrap().len() == 15
    })
    .await;
    let leading = leader(&[&a, &b]).await.id.clone();
    let (leader_node, other) = if leading == a.id { (a, b) } else { (b, a) };
    let pause = json!({ "group": GROUP });

    let (status, answer) = post(
        &other.url,
        "/admin/groups/pause",
        Some(TOKEN),
        pause.clone(),
    )
    .await;
    assert_eq!(status, 503, "a non-leader carried out a write: {answer}");
    assert_eq!(answer["leader"], leader_node.id.as_str(), "{answer}");
    assert_eq!(answer["leader_url"], leader_node.url.as_str(), "{answer}");

    let (status, answer) = post(&leader_node.url, "/admin/groups/pause", None, pause.clone()).await;
    assert_eq!(status, 401, "a write without the token: {answer}");
    let (status, answer) = post(
        &leader_node.url,
        "/admin/groups/pause",
        Some("wrong"),
        pause.clone(),
    )
    .await;
    assert_eq!(status, 401, "a write with a wrong token: {answer}");
    assert!(backend.fleet.paused_groups().await.unwrap().is_empty());

    let (status, answer) = post(&leader_node.url, "/admin/groups/pause", Some(TOKEN), pause).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["paused"], true);
    wait_until("every consumer is paused", || {
        [&leader_node, &other]
            .iter()
            .flat_map(|n| n.consumer_states())
            .all(|state| state == ConsumerState::Paused)
    })
    .await;
    appended.extend(append(&backend, "o-1", 5).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(handled.lock().unwrap().len(), 15, "a paused group read on");

    // The leader goes; the survivor leads, takes its sources, and stays paused.
    leader_node.stop().await;
    leader(&[&other]).await;
    wait_until("the survivor consumes every source, paused", || {
        let states = other.consumer_states();
        !states.is_empty() && states.iter().all(|state| *state == ConsumerState::Paused)
    })
    .await;
    appended.extend(append(&backend, "o-2", 5).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        handled.lock().unwrap().len(),
        15,
        "the pause did not survive the change of leader"
    );

    let (status, answer) = post(
        &other.url,
        "/admin/groups/resume",
        Some(TOKEN),
        json!({ "group": GROUP }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    wait_until("everything is handled after the resume", || {
        handled.lock().unwrap().len() >= appended.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counts = count_by_id(&handled);
    for event in &appended {
        assert_eq!(
            counts.get(&event.id),
            Some(&1),
            "event {} handled {:?} times",
            event.id,
            counts.get(&event.id)
        );
    }
    other.stop().await;
    // Each write and each change of the pause is on the group's record, named
    // by the token that made it.
    let record: Vec<(String, Value)> = backend
        .stores
        .events
        .read(&"category:$weir".parse().unwrap(), Default::default(), 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|event| event.stream.as_str() == "group-bridge")
        .map(|event| (event.name.as_str().to_owned(), event.payload))
        .collect();
    let operator: Vec<(&str, &Value)> = record
        .iter()
        .filter(|(name, _)| ["GroupPaused", "GroupResumed", "AdminWrite"].contains(&name.as_str()))
        .map(|(name, payload)| (name.as_str(), payload))
        .collect();
    let names: Vec<&str> = operator.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        ["GroupPaused", "AdminWrite", "GroupResumed", "AdminWrite"],
        "{record:#?}"
    );
    assert_eq!(operator[0].1["by"], "ops");
    assert_eq!(operator[1].1["token"], "ops");
    assert_eq!(operator[1].1["what"], "pause of group bridge");
    assert_eq!(operator[1].1["outcome"], "done");
    assert_eq!(operator[3].1["what"], "resume of group bridge");
}

async fn a_reset_to_the_start_under_load_delivers_every_event_once_more_in_order(backend: Backend) {
    let handled: Handled = Arc::default();
    let partitions: Vec<Source> = "category:orders"
        .parse::<Source>()
        .unwrap()
        .split(4)
        .unwrap();
    let a = Node::start(&backend, "node-a", &partitions, &handled).await;
    let b = Node::start(&backend, "node-b", &partitions, &handled).await;
    let streams: Vec<String> = (0..8).map(|n| format!("o-{n}")).collect();
    let mut before = Vec::new();
    for stream in &streams {
        before.extend(append(&backend, stream, 5).await);
    }
    wait_until("the first events are handled", || {
        handled.lock().unwrap().len() == before.len()
    })
    .await;
    let nodes = [&a, &b];
    let leading = leader(&nodes).await;
    // Checkpoints are stored after their batch is handled: wait until they are.
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = leading.admin.checkpoints(Some(GROUP)).await.unwrap();
        if lines.len() == 4 && lines.iter().all(|line| line.lag_events == Some(0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the checkpoints did not catch up: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let dry = json!({ "group": GROUP, "to": "start", "dry_run": true });
    let (status, plan) = post(&leading.url, "/admin/checkpoints/reset", Some(TOKEN), dry).await;
    assert_eq!(status, 200, "{plan}");
    let lines = plan["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 4, "one line per partition: {plan}");
    let replayed: u64 = lines.iter().map(|l| l["replayed"].as_u64().unwrap()).sum();
    assert_eq!(replayed, before.len() as u64, "{plan}");
    assert_eq!(
        handled.lock().unwrap().len(),
        before.len(),
        "the dry run changed something"
    );

    // Under load: a writer appends all along.
    let writer = {
        let events = Arc::clone(&backend.stores.events);
        let streams = streams.clone();
        tokio::spawn(async move {
            let mut written = Vec::new();
            for round in 0..60 {
                let stream = &streams[round % streams.len()];
                let event =
                    NewEvent::new(EventName::new("Later").unwrap(), json!({ "round": round }));
                let stored = events
                    .append(
                        &Category::new("orders").unwrap(),
                        &StreamName::new(stream).unwrap(),
                        WriteCondition::Any,
                        vec![event],
                    )
                    .await
                    .unwrap();
                written.extend(stored);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            written
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reset = json!({ "group": GROUP, "to": "start" });
    let (status, report) = post(&leading.url, "/admin/checkpoints/reset", Some(TOKEN), reset).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["lines"].as_array().unwrap().len(), 4, "{report}");
    let later = writer.await.unwrap();
    let all: Vec<&StoredEvent> = before.iter().chain(&later).collect();
    wait_until("every event before the reset is handled twice", || {
        let counts = count_by_id(&handled);
        before.iter().all(|e| counts.get(&e.id) == Some(&2))
            && later.iter().all(|e| counts.contains_key(&e.id))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = count_by_id(&handled);
    for event in &all {
        let count = counts.get(&event.id).copied().unwrap_or(0);
        assert!(
            (1..=2).contains(&count),
            "event {} handled {count} times",
            event.id
        );
    }
    // Per stream: one pass in order, then (from the reset) one more, in order.
    let log = handled.lock().unwrap().clone();
    for stream in &streams {
        let positions: Vec<u64> = log
            .iter()
            .filter(|e| e.stream.as_str() == stream)
            .map(|e| e.position)
            .collect();
        let restarts = positions.windows(2).filter(|w| w[1] <= w[0]).count();
        assert_eq!(
            restarts, 1,
            "stream {stream} was not replayed once, in order: {positions:?}"
        );
        let at = positions.windows(2).position(|w| w[1] <= w[0]).unwrap() + 1;
        assert_eq!(
            positions[at], 0,
            "stream {stream}'s replay did not start at its first event: {positions:?}"
        );
        let last = *positions.iter().max().unwrap();
        let second: BTreeSet<u64> = positions[at..].iter().copied().collect();
        assert_eq!(
            second.len() as u64,
            last + 1,
            "stream {stream}'s replay missed events: {positions:?}"
        );
    }
    let checkpoints = leading.admin.checkpoints(Some(GROUP)).await.unwrap();
    assert_eq!(checkpoints.len(), 4);
    for line in &checkpoints {
        assert_ne!(
            line.owner.as_deref(),
            Some("weir-admin"),
            "a reset source was not given back: {line:?}"
        );
        assert_eq!(line.lag_events, Some(0), "{line:?}");
    }
    a.stop().await;
    b.stop().await;
}

async fn dead_letters_that_are_fixed_come_back_once_in_order(backend: Backend) {
    let handled: Handled = Arc::default();
    let failing = Arc::new(AtomicBool::new(true));
    let node = Node::start_failing(&backend, "node-a", &orders(), &handled, &failing).await;
    let mut appended = Vec::new();
    for round in 0..20 {
        for stream in ["o-1", "o-2", "o-3", "o-4", "o-5"] {
            appended.extend(append(&backend, stream, 1).await);
        }
        let _ = round;
    }
    assert_eq!(appended.len(), 100);
    let dead_letters = Arc::clone(&backend.stores.dead_letters);
    let deadline = Instant::now() + WAIT;
    while dead_letters.list(Some(GROUP), 0, 1000).await.unwrap().len() < 100 {
        assert!(
            Instant::now() < deadline,
            "the failures did not become dead letters"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    leader(&[&node]).await;
    failing.store(false, Ordering::SeqCst);

    let all = |dry_run: bool| json!({ "group": GROUP, "selection": "all", "dry_run": dry_run });
    let (status, answer) = post(&node.url, "/admin/dead-letters/retry", None, all(true)).await;
    assert_eq!(status, 401, "a retry without the token: {answer}");
    let (status, answer) = post(
        &node.url,
        "/admin/dead-letters/retry",
        Some(TOKEN),
        all(true),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["would_retry"], 100, "{answer}");
    assert!(
        handled.lock().unwrap().is_empty(),
        "the dry run processed something"
    );
    assert_eq!(
        dead_letters.list(Some(GROUP), 0, 1000).await.unwrap().len(),
        100
    );

    let (status, answer) = post(
        &node.url,
        "/admin/dead-letters/retry",
        Some(TOKEN),
        all(false),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["retried"], 100, "{answer}");
    let log = handled.lock().unwrap().clone();
    let ids: Vec<uuid::Uuid> = log.iter().map(|e| e.id).collect();
    let expected: Vec<uuid::Uuid> = appended.iter().map(|e| e.id).collect();
    assert_eq!(
        ids, expected,
        "the fixed events did not come back once each, in order"
    );
    assert!(
        dead_letters
            .list(Some(GROUP), 0, 1000)
            .await
            .unwrap()
            .is_empty()
    );
    let (status, answer) = post(
        &node.url,
        "/admin/dead-letters/retry",
        Some(TOKEN),
        all(false),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        handled.lock().unwrap().len(),
        100,
        "a second retry delivered again"
    );
    node.stop().await;
}

async fn a_reset_to_a_time_or_a_cursor_moves_to_the_first_event_after_it(backend: Backend) {
    let handled: Handled = Arc::default();
    let node = Node::start(&backend, "node-a", &orders(), &handled).await;
    let before = append(&backend, "o-1", 5).await;
    wait_until("the first events are handled", || {
        handled.lock().unwrap().len() == 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let time = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let later = append(&backend, "o-1", 3).await;
    wait_until("the later events are handled", || {
        handled.lock().unwrap().len() == 8
    })
    .await;
    leader(&[&node]).await;
    let deadline = Instant::now() + WAIT;
    while node.admin.checkpoints(Some(GROUP)).await.unwrap()[0].lag_events != Some(0) {
        assert!(Instant::now() < deadline, "the checkpoint did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let to_time = json!({ "group": GROUP, "to": "time", "time": time, "dry_run": true });
    let (status, plan) = post(&node.url, "/admin/checkpoints/reset", Some(TOKEN), to_time).await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["lines"][0]["replayed"], 3, "{plan}");
    assert_eq!(
        plan["lines"][0]["new"],
        before[4].cursor.to_string(),
        "{plan}"
    );

    let to_cursor = json!({ "group": GROUP, "to": "cursor", "cursor": before[4].cursor });
    let (status, report) = post(
        &node.url,
        "/admin/checkpoints/reset",
        Some(TOKEN),
        to_cursor,
    )
    .await;
    assert_eq!(status, 200, "{report}");
    wait_until("the events after the cursor are handled again", || {
        handled.lock().unwrap().len() == 11
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = handled.lock().unwrap().clone();
    let again: Vec<uuid::Uuid> = log[8..].iter().map(|e| e.id).collect();
    let expected: Vec<uuid::Uuid> = later.iter().map(|e| e.id).collect();
    assert_eq!(
        again, expected,
        "not exactly the events after the cursor, in order"
    );
    node.stop().await;
}

/// The paused state of a group is written under the coordinator term that
/// carries out the operator's request, and a term never undoes a later one's:
/// a leader that resumes from a pause with a request still in its queue finds
/// it refused.
async fn an_older_term_cannot_undo_what_a_newer_term_set(backend: Backend) {
    let fleet = &backend.fleet;
    assert_eq!(
        fleet.set_paused(GROUP, false, 1).await.unwrap(),
        Some(false),
        "never paused"
    );
    assert_eq!(fleet.set_paused(GROUP, true, 1).await.unwrap(), Some(true));
    assert_eq!(
        fleet.set_paused(GROUP, true, 1).await.unwrap(),
        Some(false),
        "idempotent"
    );
    assert_eq!(fleet.set_paused(GROUP, false, 3).await.unwrap(), Some(true));
    assert_eq!(
        fleet.set_paused(GROUP, true, 2).await.unwrap(),
        None,
        "an older term's pause was carried out after a newer term's resume"
    );
    assert!(fleet.paused_groups().await.unwrap().is_empty());
    assert_eq!(
        fleet.set_paused(GROUP, false, 3).await.unwrap(),
        Some(false)
    );
    assert_eq!(fleet.set_paused(GROUP, true, 4).await.unwrap(), Some(true));
    assert_eq!(
        fleet.paused_groups().await.unwrap(),
        [GROUP.to_owned()].into()
    );
}

/// Records a dead letter of the group for each of `events`, as a consumer
/// that skipped them would; the dead-letter store.
async fn record_dead_letters(
    backend: &Backend,
    events: &[StoredEvent],
) -> Arc<dyn weir::consumer::DeadLetterStore> {
    let dead_letters = Arc::clone(&backend.stores.dead_letters);
    for event in events {
        let letter = weir::consumer::NewDeadLetter {
            group: GROUP.into(),
            source: orders()[0].clone(),
            event_id: event.id,
            sequence: event.sequence,
            kind: "rejected".into(),
            error: "no".into(),
            attempts: 1,
        };
        dead_letters.record(&letter).await.unwrap();
    }
    dead_letters
}

/// Every admin request body refuses a field it does not know, by name, and
/// changes nothing: a misspelt `dryRun` never runs a real purge or reset.
async fn a_misspelt_field_is_refused_by_name_and_changes_nothing(backend: Backend) {
    let handled: Handled = Arc::default();
    let node = Node::start(&backend, "node-a", &orders(), &handled).await;
    let stored = append(&backend, "o-1", 3).await;
    wait_until("the events are handled", || {
        handled.lock().unwrap().len() == 3
    })
    .await;
    leader(&[&node]).await;
    let dead_letters = record_dead_letters(&backend, &stored).await;
    let before = node.admin.checkpoints(Some(GROUP)).await.unwrap();

    let refused = [
        (
            "/admin/dead-letters/purge",
            json!({ "group": GROUP, "selection": "all", "dryRun": true }),
            "dryRun",
        ),
        (
            "/admin/dead-letters/retry",
            json!({ "group": GROUP, "selection": "all", "dry-run": true }),
            "dry-run",
        ),
        (
            "/admin/checkpoints/reset",
            json!({ "group": GROUP, "to": "start", "dryRun": true }),
            "dryRun",
        ),
        (
            "/admin/groups/pause",
            json!({ "group": GROUP, "paused": true }),
            "paused",
        ),
    ];
    for (path, body, field) in refused {
        let (status, answer) = post(&node.url, path, Some(TOKEN), body.clone()).await;
        assert_eq!(status, 400, "{path} took {body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&format!("`{field}`")),
            "{path}: the answer does not name {field}: {answer}"
        );
    }
    assert_eq!(
        dead_letters.list(Some(GROUP), 0, 100).await.unwrap().len(),
        3,
        "a refused purge removed letters"
    );
    let after = node.admin.checkpoints(Some(GROUP)).await.unwrap();
    assert_eq!(
        before.iter().map(|l| l.cursor).collect::<Vec<_>>(),
        after.iter().map(|l| l.cursor).collect::<Vec<_>>(),
        "a refused reset moved a checkpoint"
    );
    assert!(backend.fleet.paused_groups().await.unwrap().is_empty());
    node.stop().await;
}

/// The lifecycle records of the group's admin writes, their payloads.
async fn admin_writes(backend: &Backend) -> Vec<Value> {
    backend
        .stores
        .events
        .read(
            &"category:$weir".parse().unwrap(),
            Default::default(),
            10_000,
        )
        .await
        .unwrap()
        .into_iter()
        .filter(|event| event.name.as_str() == "AdminWrite")
        .filter(|event| event.payload["group"] == GROUP)
        .map(|event| event.payload)
        .collect()
}

/// A reset that outlasts its request answers 202 "in progress" and runs on;
/// a resend of its request id waits for it or answers its first outcome, and
/// never runs it twice; its audit record is stored before the work, its
/// outcome after.
async fn a_reset_runs_once_per_request_id_and_says_when_it_is_in_progress(backend: Backend) {
    let handled: Handled = Arc::default();
    let switches = Switches::stalled(false);
    let stalled = Arc::clone(&switches.stalled);
    let node = Node::start_with(&backend, "node-a", &orders(), &handled, &switches).await;
    let before = append(&backend, "o-1", 5).await;
    wait_until("the first events are handled", || {
        handled.lock().unwrap().len() == 5
    })
    .await;
    leader(&[&node]).await;
    // The owner's next batch stays in flight: it cannot let go of its source
    // before the handover timeout, so the reset outlasts its request.
    stalled.store(true, Ordering::SeqCst);
    append(&backend, "o-1", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let id = "reset-0001";
    let reset = json!({ "group": GROUP, "to": "start", "request_id": id });
    let (status, first) = post(
        &node.url,
        "/admin/checkpoints/reset",
        Some(TOKEN),
        reset.clone(),
    )
    .await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["state"], "in_progress", "{first}");
    assert_eq!(first["request_id"], id, "{first}");
    let first = admin_writes(&backend).await;
    assert_eq!(
        (&first[0]["outcome"], &first[0]["request_id"]),
        (&json!("started"), &json!(id)),
        "the audit record was not stored before the work: {first:?}"
    );
    let other = json!({ "group": GROUP, "to": "end", "request_id": id });
    let (status, answer) = post(&node.url, "/admin/checkpoints/reset", Some(TOKEN), other).await;
    assert_eq!(status, 400, "an id reused for another reset: {answer}");
    let second = json!({ "group": GROUP, "to": "start" });
    let (status, answer) = post(&node.url, "/admin/checkpoints/reset", Some(TOKEN), second).await;
    assert_eq!(
        status, 409,
        "a second reset of the group while one runs: {answer}"
    );

    // The resend waits for the outcome (the work fences the stuck owner once
    // the handover timeout passes).
    let deadline = Instant::now() + WAIT;
    let report = loop {
        let (status, answer) = post(
            &node.url,
            "/admin/checkpoints/reset",
            Some(TOKEN),
            reset.clone(),
        )
        .await;
        if status == 200 {
            break answer;
        }
        assert_eq!(status, 202, "{answer}");
        assert!(
            Instant::now() < deadline,
            "the reset never finished: {answer}"
        );
    };
    assert_eq!(report["request_id"], id, "{report}");
    stalled.store(false, Ordering::SeqCst);
    wait_until("every event is handled once more", || {
        let counts = count_by_id(&handled);
        before.iter().all(|e| counts.get(&e.id) == Some(&2))
    })
    .await;
    let (status, again) = post(&node.url, "/admin/checkpoints/reset", Some(TOKEN), reset).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, report, "a resend did not answer the first outcome");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = count_by_id(&handled);
    assert!(
        before.iter().all(|e| counts.get(&e.id) == Some(&2)),
        "a resend of the request id reset again: {counts:?}"
    );
    node.stop().await;
    let ours: Vec<Value> = admin_writes(&backend)
        .await
        .into_iter()
        .filter(|record| record["request_id"] == id)
        .collect();
    // One run, recorded before and after (beside the refusal of the id resent
    // with another body).
    let runs: Vec<&Value> = ours
        .iter()
        .map(|record| &record["outcome"])
        .filter(|outcome| *outcome == "started" || *outcome == "done")
        .collect();
    assert_eq!(runs, ["started", "done"], "{ours:#?}");
    // The record says what the reset aimed at, where, and what it did.
    let done = ours
        .iter()
        .find(|record| record["outcome"] == "done")
        .unwrap();
    assert_eq!(done["what"], "reset checkpoints of group bridge", "{done}");
    assert_eq!(done["target"], "start", "{done}");
    assert_eq!(done["dry_run"], false, "{done}");
    assert_eq!(done["sources"], json!(["category:orders"]), "{done}");
    assert_eq!(done["counts"]["checkpoints"], 1, "{done}");
    assert!(done["counts"]["replayed"].as_u64().unwrap() >= 5, "{done}");
}

/// Pausing a group the fleet does not know (a misspelt name) is refused,
/// unless the operator says `create`.
async fn an_unknown_group_is_refused_unless_created(backend: Backend) {
    let handled: Handled = Arc::default();
    let node = Node::start(&backend, "node-a", &orders(), &handled).await;
    leader(&[&node]).await;
    let (status, answer) = post(
        &node.url,
        "/admin/groups/pause",
        Some(TOKEN),
        json!({ "group": "brigde" }),
    )
    .await;
    assert_eq!(status, 404, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("--create"),
        "{answer}"
    );
    assert!(backend.fleet.paused_groups().await.unwrap().is_empty());

    let (status, answer) = post(
        &node.url,
        "/admin/groups/pause",
        Some(TOKEN),
        json!({ "group": "later", "create": true }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = post(
        &node.url,
        "/admin/groups/pause",
        Some(TOKEN),
        json!({ "group": GROUP }),
    )
    .await;
    assert_eq!(status, 200, "a known group: {answer}");
    assert_eq!(
        backend.fleet.paused_groups().await.unwrap(),
        ["later".to_owned(), GROUP.to_owned()].into()
    );
    // A paused group is known: it can be resumed without --create.
    let (status, answer) = post(
        &node.url,
        "/admin/groups/resume",
        Some(TOKEN),
        json!({ "group": "later" }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    node.stop().await;
}

/// A reset to a cursor beyond the source's last event is refused; a dry run
/// to a cursor ahead says how many events the move skips.
async fn a_cursor_beyond_the_head_is_refused_and_a_dry_run_counts_the_skipped(backend: Backend) {
    let handled: Handled = Arc::default();
    let switches = Switches::stalled(true);
    let stalled = Arc::clone(&switches.stalled);
    let node = Node::start_with(&backend, "node-a", &orders(), &handled, &switches).await;
    leader(&[&node]).await;
    let stored = append(&backend, "o-1", 5).await;
    // A cursor an operator saw is readable: the head a reset checks against.
    let events = backend.stores.events.as_ref();
    common::wait_until_readable(events, &orders()[0], stored[4].cursor).await;
    let ahead =
        json!({ "group": GROUP, "to": "cursor", "cursor": stored[2].cursor, "dry_run": true });
    let (status, plan) = post(&node.url, "/admin/checkpoints/reset", Some(TOKEN), ahead).await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["lines"][0]["skipped"], 3, "{plan}");
    assert_eq!(plan["lines"][0]["replayed"], 0, "{plan}");

    let last = stored[4].cursor;
    let beyond = weir::event::Cursor::new(last.tx_id + 1000, last.sequence + 1000);
    for dry_run in [true, false] {
        let body = json!({ "group": GROUP, "to": "cursor", "cursor": beyond, "dry_run": dry_run });
        let (status, answer) = post(&node.url, "/admin/checkpoints/reset", Some(TOKEN), body).await;
        assert_eq!(status, 400, "a cursor beyond the head was taken: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("beyond"),
            "{answer}"
        );
    }
    stalled.store(false, Ordering::SeqCst);
    wait_until("the events are handled", || {
        handled.lock().unwrap().len() == 5
    })
    .await;
    node.stop().await;
}

/// Reads need no token, so what one costs is bounded: a checkpoint far behind
/// is counted up to a limit and shown as "at least" that.
async fn the_lag_a_read_counts_is_bounded(backend: Backend) {
    let handled: Handled = Arc::default();
    let switches = Switches::stalled(true);
    let stalled = Arc::clone(&switches.stalled);
    let node = Node::start_with(&backend, "node-a", &orders(), &handled, &switches).await;
    leader(&[&node]).await;
    let limit = weir::admin::fleet::LAG_LIMIT as usize;
    append(&backend, "o-1", limit + 50).await;
    let deadline = Instant::now() + WAIT;
    let line = loop {
        let lines = node.admin.checkpoints(Some(GROUP)).await.unwrap();
        if let Some(line) = lines.into_iter().next() {
            break line;
        }
        assert!(Instant::now() < deadline, "no checkpoint row");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(line.lag_events, Some(limit as u64), "{line:?}");
    assert!(line.lag_at_least, "{line:?}");
    let (code, body) = {
        let address: SocketAddr = node.url.trim_start_matches("http://").parse().unwrap();
        tokio::task::spawn_blocking(move || common::node::http_get(address, "/admin/fleet"))
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"lag_at_least\":true"), "{body}");
    stalled.store(false, Ordering::SeqCst);
    node.stop().await;
}

/// A dead-letter retry runs the group's processor where its consumers run it
/// (its isolation), and stops when the node's term as leader ends, so that it
/// never runs beside the next leader's.
async fn a_retry_keeps_the_groups_isolation_and_ends_with_the_term(backend: Backend) {
    let handled: Handled = Arc::default();
    let switches = Switches {
        isolation: weir::consumer::settings::Isolation::DedicatedThread,
        ..Switches::default()
    };
    let node = Node::start_with(&backend, "node-a", &orders(), &handled, &switches).await;
    let stored = append(&backend, "o-1", 3).await;
    wait_until("the events are handled", || {
        handled.lock().unwrap().len() == 3
    })
    .await;
    leader(&[&node]).await;
    let dead_letters = record_dead_letters(&backend, &stored).await;
    let before = switches.threads.lock().unwrap().len();
    switches.stalled.store(true, Ordering::SeqCst);
    let retry = {
        let admin = Arc::clone(&node.admin);
        tokio::spawn(async move {
            let request = weir::consumer::DeadLetterRequest {
                group: GROUP.into(),
                selection: weir::consumer::Selection::All,
                dry_run: false,
            };
            admin.retry_dead_letters(&request).await
        })
    };
    wait_until("the retry reaches the processor", || {
        switches.threads.lock().unwrap().len() > before
    })
    .await;
    let thread = switches.threads.lock().unwrap()[before].clone();
    assert_eq!(
        thread,
        format!("weir-{GROUP}"),
        "the retry ran off the group's thread"
    );

    // The term ends (the node stops leading) while the retry's first event is
    // in flight: the retry stops instead of going on beside a new leader's.
    node.runtime.stop().await;
    let outcome = tokio::time::timeout(WAIT, retry)
        .await
        .expect("the retry went on after the term ended")
        .unwrap();
    assert!(
        matches!(outcome, Err(weir::admin::AdminError::Unavailable(_))),
        "{outcome:?}"
    );
    switches.stalled.store(false, Ordering::SeqCst);
    assert_eq!(
        dead_letters.list(Some(GROUP), 0, 10).await.unwrap().len(),
        3,
        "a retry cut off by the end of the term removed letters"
    );
    node.server.abort();
    node.journal.stop().await;
}

/// Runs `$scenario` as two tests: on memory stores, and on Postgres.
macro_rules! on_both_stores {
    ($scenario:ident: $memory:ident, $postgres:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $memory() {
            $scenario(memory()).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $postgres() {
            let Some(backend) = postgres().await else {
                return;
            };
            $scenario(backend).await;
        }
    };
}

on_both_stores!(
    a_reset_to_a_time_or_a_cursor_moves_to_the_first_event_after_it:
    memory_a_reset_to_a_time_or_a_cursor_moves_after_it,
    postgres_a_reset_to_a_time_or_a_cursor_moves_after_it
);
on_both_stores!(
    dead_letters_that_are_fixed_come_back_once_in_order:
    memory_dead_letters_that_are_fixed_come_back_once_in_order,
    postgres_dead_letters_that_are_fixed_come_back_once_in_order
);
on_both_stores!(
    writes_go_to_the_leader_with_a_token_and_a_pause_survives_a_leader_change:
    memory_writes_go_to_the_leader_and_a_pause_survives_a_leader_change,
    postgres_writes_go_to_the_leader_and_a_pause_survives_a_leader_change
);
on_both_stores!(
    a_reset_to_the_start_under_load_delivers_every_event_once_more_in_order:
    memory_a_reset_to_the_start_under_load_replays_once_in_order,
    postgres_a_reset_to_the_start_under_load_replays_once_in_order
);
on_both_stores!(
    an_older_term_cannot_undo_what_a_newer_term_set:
    memory_an_older_term_cannot_undo_what_a_newer_term_set,
    postgres_an_older_term_cannot_undo_what_a_newer_term_set
);
on_both_stores!(
    a_misspelt_field_is_refused_by_name_and_changes_nothing:
    memory_a_misspelt_field_is_refused_by_name_and_changes_nothing,
    postgres_a_misspelt_field_is_refused_by_name_and_changes_nothing
);
on_both_stores!(
    a_reset_runs_once_per_request_id_and_says_when_it_is_in_progress:
    memory_a_reset_runs_once_per_request_id_and_says_when_it_is_in_progress,
    postgres_a_reset_runs_once_per_request_id_and_says_when_it_is_in_progress
);
on_both_stores!(
    an_unknown_group_is_refused_unless_created:
    memory_an_unknown_group_is_refused_unless_created,
    postgres_an_unknown_group_is_refused_unless_created
);
on_both_stores!(
    a_cursor_beyond_the_head_is_refused_and_a_dry_run_counts_the_skipped:
    memory_a_cursor_beyond_the_head_is_refused_and_a_dry_run_counts_the_skipped,
    postgres_a_cursor_beyond_the_head_is_refused_and_a_dry_run_counts_the_skipped
);
on_both_stores!(
    the_lag_a_read_counts_is_bounded:
    memory_the_lag_a_read_counts_is_bounded,
    postgres_the_lag_a_read_counts_is_bounded
);
on_both_stores!(
    a_retry_keeps_the_groups_isolation_and_ends_with_the_term:
    memory_a_retry_keeps_the_groups_isolation_and_ends_with_the_term,
    postgres_a_retry_keeps_the_groups_isolation_and_ends_with_the_term
);
