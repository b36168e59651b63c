//! The reader of one ingest source, on a bus of its own in memory: batching,
//! bad messages under each policy, a store that cannot be reached, fencing.

use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use super::*;
use crate::broker::Subscriber;
use crate::consumer::MemoryDeadLetterStore;
use crate::consumer::policy::ErrorPolicy;
use crate::event::{Category, Cursor, EventName};
use crate::ingest::{IngestConfig, IngestStore, IngestSubscriber, MemoryIngestStore};
use crate::store::{EventStore, MemoryStore};

#[test]
fn a_batch_is_one_append_per_stream_in_order_without_repeated_keys() {
    let event = |n: u64, key: Option<&str>| {
        let event = NewEvent::new(EventName::new("E").unwrap(), json!(n));
        match key {
            Some(key) => event.with_idempotency_key(key.parse().unwrap()),
            None => event,
        }
    };
    let stream = |name: &str| StreamName::new(name).unwrap();
    let appends = by_stream(vec![
        (stream("a"), event(0, Some("k-0"))),
        (stream("b"), event(1, None)),
        (stream("a"), event(2, None)),
        (stream("a"), event(3, Some("k-0"))),
        (stream("b"), event(4, Some("k-4"))),
    ]);
    let shape: Vec<(String, Vec<serde_json::Value>)> = appends
        .iter()
        .map(|a| {
            let payloads = a.events.iter().map(|e| e.payload.clone()).collect();
            (a.stream.to_string(), payloads)
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("a".to_owned(), vec![json!(0), json!(2)]),
            ("b".to_owned(), vec![json!(1), json!(4)]),
        ]
    );
}

/// A bus in memory: what is published to it, read in order from any position.
#[derive(Clone, Default)]
struct FakeBus {
    messages: Arc<Mutex<Vec<Message>>>,
}

impl FakeBus {
    /// Publishes `payload` keyed `key` at the next position (from 0).
    fn publish(&self, key: &str, payload: &[u8]) {
        let mut messages = self.messages.lock().unwrap();
        let position = messages.len() as u64;
        messages.push(Message {
            position,
            key: Some(key.as_bytes().to_vec()),
            topic: Some("t".into()),
            partition: Some(0),
            headers: vec![("Weir-Event-Name".into(), "E".into())],
            payload: payload.to_vec(),
            ..Message::default()
        });
    }
}

struct FakeReader {
    bus: FakeBus,
    next: u64,
}

#[async_trait]
impl Transport for FakeReader {
    async fn next(&mut self, max: usize) -> Result<Vec<Message>, String> {
        loop {
            let batch: Vec<Message> = self.bus.messages.lock().unwrap()[self.next as usize..]
                .iter()
                .take(max)
                .cloned()
                .collect();
            if let Some(last) = batch.last() {
                self.next = last.position + 1;
                return Ok(batch);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn lag(&mut self, _position: Option<u64>) -> Option<u64> {
        Some(self.bus.messages.lock().unwrap().len() as u64 - self.next)
    }
}

#[async_trait]
impl IngestBus for FakeBus {
    async fn open(
        &self,
        _source: &IngestSource,
        after: Option<u64>,
    ) -> Result<Box<dyn Transport>, String> {
        Ok(Box::new(FakeReader {
            bus: self.clone(),
            next: after.map_or(0, |p| p + 1),
        }))
    }
}

/// A memory ingest store whose next `failing` appends fail as an unreachable
/// store's would.
struct Flaky {
    inner: MemoryIngestStore,
    failing: AtomicUsize,
}

#[async_trait]
impl IngestStore for Flaky {
    async fn claim(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
        grant: Option<Grant>,
    ) -> Result<(Claim, Option<u64>), CheckpointError> {
        self.inner.claim(group, source, owner, grant).await
    }

    async fn append(
        &self,
        claim: &Claim,
        category: &crate::event::Category,
        appends: &[StreamAppend],
        position: u64,
    ) -> Result<(), CheckpointError> {
        let failing = self.failing.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing.store(failing - 1, Ordering::SeqCst);
            return Err(crate::store::Error::Unavailable("the test's outage".into()).into());
        }
        self.inner.append(claim, category, appends, position).await
    }

    async fn positions(
        &self,
        group: Option<&str>,
    ) -> Result<Vec<super::super::IngestPosition>, CheckpointError> {
        self.inner.positions(group).await
    }
}

struct Setup {
    bus: FakeBus,
    events: Arc<MemoryStore>,
    store: Arc<Flaky>,
    dead_letters: Arc<MemoryDeadLetterStore>,
    board: Board,
    subscriber: IngestSubscriber,
    source: Source,
}

fn setup(policy: ErrorPolicy, failing: usize) -> Setup {
    let config: IngestConfig = toml::from_str(
        r#"
        name = "in"
        from = { kind = "kafka", topics = ["t"] }
        into = { category = "c", stream = "{key}" }
        "#,
    )
    .unwrap();
    let bus = FakeBus::default();
    let events = Arc::new(MemoryStore::new());
    let store = Arc::new(Flaky {
        inner: MemoryIngestStore::new(events.clone()),
        failing: AtomicUsize::new(failing),
    });
    let dead_letters = Arc::new(MemoryDeadLetterStore::new());
    let board = Board::default();
    let context = Arc::new(IngestContext {
        group: "in".into(),
        owner: "node/ingest".into(),
        shape: Shape::new(&config, 1024).unwrap(),
        store: store.clone(),
        dead_letters: dead_letters.clone(),
        bus: Arc::new(bus.clone()),
        settings: ConsumerSettings {
            batch_size: 3,
            error_policy: policy,
            ..ConsumerSettings::default()
        },
        board: board.clone(),
        pause: Default::default(),
    });
    Setup {
        bus,
        events,
        store,
        dead_letters,
        board,
        subscriber: IngestSubscriber::new(context, Duration::from_secs(5)),
        source: "ingest:in/t@0".parse().unwrap(),
    }
}

impl Setup {
    async fn stored(&self) -> Vec<serde_json::Value> {
        let category = Source::Category(Category::new("c").unwrap());
        let events = self
            .events
            .read(&category, Cursor::START, 100)
            .await
            .unwrap();
        events.into_iter().map(|e| e.payload).collect()
    }

    async fn wait_for(&self, count: usize) -> Vec<serde_json::Value> {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let stored = self.stored().await;
                if stored.len() >= count {
                    return stored;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("the messages were not appended")
    }

    async fn position(&self) -> Option<u64> {
        let positions = self.store.positions(None).await.unwrap();
        positions.first().map(|p| p.position)
    }

    fn state(&self) -> Option<ConsumerState> {
        self.board
            .states_now()
            .into_iter()
            .find(|(key, _)| key.source == self.source)
            .map(|(_, state)| state)
    }
}

#[tokio::test]
async fn an_unreachable_store_is_retried_and_nothing_is_skipped_or_repeated() {
    let setup = setup(ErrorPolicy::Continue, 3);
    for n in 0..10 {
        setup.bus.publish("s", json!(n).to_string().as_bytes());
    }
    setup.subscriber.accept(&setup.source).await.unwrap();
    let stored = setup.wait_for(10).await;
    assert_eq!(stored, (0..10).map(|n| json!(n)).collect::<Vec<_>>());
    assert_eq!(setup.position().await, Some(9));
    assert_eq!(setup.state(), Some(ConsumerState::Running));
    setup.subscriber.withdraw(&setup.source).await.unwrap();
    assert_eq!(setup.state(), Some(ConsumerState::Stopped));
}

#[tokio::test]
async fn continue_keeps_a_bad_message_as_a_dead_letter_and_moves_past_it() {
    let setup = setup(ErrorPolicy::Continue, 0);
    setup.bus.publish("s", b"1");
    setup.bus.publish("s", b"not json");
    setup.bus.publish("s", b"3");
    setup.subscriber.accept(&setup.source).await.unwrap();
    assert_eq!(setup.wait_for(2).await, [json!(1), json!(3)]);
    let letters = setup.dead_letters.list(None, 0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (letters[0].kind.as_str(), letters[0].sequence),
        ("not_json", 1)
    );
    assert!(
        letters[0].error.contains("\"first_bytes\":\"not json\""),
        "{}",
        letters[0].error
    );
    assert_eq!(setup.position().await, Some(2));
    setup.subscriber.stop().await;
}

#[tokio::test]
async fn stop_appends_what_came_before_a_bad_message_and_stops_there() {
    let setup = setup(ErrorPolicy::Stop, 0);
    setup.bus.publish("s", b"1");
    setup.bus.publish("s", b"not json");
    setup.bus.publish("s", b"3");
    setup.subscriber.accept(&setup.source).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !matches!(setup.state(), Some(ConsumerState::Failed(_))) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the reader did not stop");
    assert_eq!(setup.stored().await, [json!(1)]);
    assert_eq!(
        setup.position().await,
        Some(0),
        "the bad message stays unread"
    );
    setup.subscriber.stop().await;
}

#[tokio::test]
async fn a_fenced_reader_appends_nothing_more_and_is_reported_lost() {
    let setup = setup(ErrorPolicy::Continue, 0);
    setup.bus.publish("s", b"1");
    setup.subscriber.accept(&setup.source).await.unwrap();
    setup.wait_for(1).await;
    // Another owner claims the source outside this node's knowledge.
    let (_, position) = setup
        .store
        .claim("in", &setup.source, "intruder", None)
        .await
        .unwrap();
    assert_eq!(position, Some(0));
    setup.bus.publish("s", b"2");
    let lost = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let lost = setup.subscriber.take_lost();
            if !lost.is_empty() {
                return lost;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the fenced reader was not reported lost");
    assert_eq!(lost, std::slice::from_ref(&setup.source));
    assert_eq!(
        setup.stored().await,
        [json!(1)],
        "the fenced append wrote nothing"
    );
    assert_eq!(setup.position().await, Some(0));
}
