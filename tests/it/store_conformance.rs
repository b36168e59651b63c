//! The event store contract, as one generic test body per clause, run against every
//! backend: the in-memory store and Postgres (each test in its own schema).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::json;
use uuid::Uuid;
use weir::event::{
    Category, Cursor, EventName, IdempotencyKey, NewEvent, Source, StoredEvent, StreamName,
    WriteCondition,
};
use weir::store::{Error, EventStore, StreamAppend};

pub(crate) type Store = Arc<dyn EventStore>;

fn category(name: &str) -> Category {
    Category::new(name).unwrap()
}
fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}
fn event(n: u64) -> NewEvent {
    NewEvent::new(EventName::new("Happened").unwrap(), json!({ "n": n }))
}
fn keyed(n: u64, key: &str) -> NewEvent {
    event(n).with_idempotency_key(IdempotencyKey::new(key).unwrap())
}
fn events(range: std::ops::Range<u64>) -> Vec<NewEvent> {
    range.map(event).collect()
}

async fn read_all(store: &Store, source: &Source) -> Vec<StoredEvent> {
    store.read(source, Cursor::START, 1_000_000).await.unwrap()
}

/// Waits until everything up to `through` is readable from the log and categories.
async fn settle(store: &Store, through: Cursor) {
    crate::common::wait_until_readable(store.as_ref(), &Source::Log, through).await;
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(std::sync::Arc::new(weir::store::MemoryStore::new())).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(db) = crate::common::TestPostgres::start().await {
                        super::$name(db.store.clone()).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    appends_number_positions_and_sequences,
    unmet_conditions_write_nothing,
    conditions_combine,
    multi_stream_append_is_all_or_nothing,
    idempotency_keys_return_the_stored_event,
    invalid_batches_are_rejected,
    reads_page_after_a_cursor,
    latest_and_head,
    watchers_wake_on_appends_to_their_source,
    concurrent_writers_never_make_readers_skip,
    racing_conditional_appends_let_exactly_one_win,
    racing_appends_of_one_idempotency_key_store_it_once,
    partitions_split_a_category_exactly,
    events_larger_than_the_limit_are_refused_with_nothing_written,
    reserved_categories_are_weirs_own_and_stay_out_of_the_log,
    pruning_keeps_each_streams_last_event_so_positions_go_on,
);

/// An event whose payload is a string padded so that the event counts exactly
/// `size` bytes against the limit.
fn sized(size: usize) -> NewEvent {
    let bare = NewEvent::new(EventName::new("Big").unwrap(), json!(""));
    let padding = size - weir::store::event_size(&bare);
    let event = NewEvent::new(EventName::new("Big").unwrap(), json!("x".repeat(padding)));
    assert_eq!(weir::store::event_size(&event), size);
    event
}

async fn events_larger_than_the_limit_are_refused_with_nothing_written(store: Store) {
    let limit = weir::store::DEFAULT_MAX_EVENT_BYTES;
    let c = category("sizes");
    let err = store
        .append(
            &c,
            &stream("s"),
            WriteCondition::Any,
            vec![event(0), sized(limit + 1)],
        )
        .await
        .unwrap_err();
    let Error::EventTooLarge {
        index,
        size,
        limit: named,
        ..
    } = &err
    else {
        panic!("not EventTooLarge: {err}");
    };
    assert_eq!((*index, *size, *named), (1, limit + 1, limit));
    assert!(
        err.to_string().contains("store.max_event_bytes = 1048576"),
        "{err}"
    );
    assert!(read_all(&store, &Source::Log).await.is_empty());
    assert!(store.head(&Source::Log).await.unwrap().is_none());
    // At the limit is fine; metadata counts too.
    let stored = store
        .append(&c, &stream("s"), WriteCondition::Any, vec![sized(limit)])
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    let with_metadata = sized(limit).with_metadata(json!({"trace": "t"}));
    let err = store
        .append(&c, &stream("s"), WriteCondition::Any, vec![with_metadata])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EventTooLarge { .. }), "{err}");
}

async fn appends_number_positions_and_sequences(store: Store) {
    let orders = category("orders");
    let first = store
        .append(&orders, &stream("o-1"), WriteCondition::Any, events(0..3))
        .await
        .unwrap();
    let second = store
        .append(&orders, &stream("o-1"), WriteCondition::Any, events(3..5))
        .await
        .unwrap();
    let other = store
        .append(&orders, &stream("o-2"), WriteCondition::Any, events(0..1))
        .await
        .unwrap();

    let positions: Vec<u64> = first.iter().chain(&second).map(|e| e.position).collect();
    assert_eq!(positions, [0, 1, 2, 3, 4]);
    assert_eq!(other[0].position, 0);
    let all: Vec<&StoredEvent> = first.iter().chain(&second).chain(&other).collect();
    assert!(all.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert!(all.windows(2).all(|w| w[0].cursor < w[1].cursor));
    assert_eq!(all.iter().map(|e| e.id).collect::<HashSet<_>>().len(), 6);
    assert_eq!(first[2].payload, json!({ "n": 2 }));
    assert_eq!(first[0].stream, stream("o-1"));
    assert_eq!(first[0].category, orders);
    assert_eq!(first[0].metadata, json!({}));
    // One append is one transaction: its events share a transaction id.
    assert_eq!(first[0].cursor.tx_id, first[2].cursor.tx_id);

    let read = read_all(&store, &Source::Stream(orders, stream("o-1"))).await;
    assert_eq!(read, first.into_iter().chain(second).collect::<Vec<_>>());
}

async fn unmet_conditions_write_nothing(store: Store) {
    let c = category("accounts");
    let s = stream("a-1");
    let written = store
        .append(&c, &s, WriteCondition::StreamIsEmpty, events(0..2))
        .await
        .unwrap();

    let err = store
        .append(&c, &s, WriteCondition::StreamIsEmpty, events(2..3))
        .await
        .unwrap_err();
    match &err {
        Error::WriteConditionFailed {
            category,
            stream,
            condition,
            last_position,
        } => {
            assert_eq!(category, &c);
            assert_eq!(stream, &s);
            assert_eq!(condition, &WriteCondition::StreamIsEmpty);
            assert_eq!(*last_position, Some(1));
        }
        other => panic!("expected WriteConditionFailed, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("accounts/a-1") && message.contains("last position is 1"),
        "{message}"
    );

    let err = store
        .append(&c, &s, WriteCondition::PositionIs(0), events(2..3))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        Error::WriteConditionFailed {
            last_position: Some(1),
            ..
        }
    ));
    let err = store
        .append(
            &c,
            &stream("a-new"),
            WriteCondition::PositionIs(0),
            events(0..1),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        Error::WriteConditionFailed {
            last_position: None,
            ..
        }
    ));
    assert!(err.to_string().contains("the stream is empty"), "{err}");

    settle(&store, written[1].cursor).await;
    assert_eq!(
        read_all(&store, &Source::Category(c.clone())).await.len(),
        2
    );
    let stored = store
        .append(&c, &s, WriteCondition::PositionIs(1), events(2..3))
        .await
        .unwrap();
    assert_eq!(stored[0].position, 2);
}

async fn conditions_combine(store: Store) {
    let c = category("combos");
    let s = stream("x");
    let empty_or_one = WriteCondition::StreamIsEmpty.or(WriteCondition::PositionIs(1));
    store
        .append(&c, &s, empty_or_one.clone(), events(0..2))
        .await
        .unwrap();
    store
        .append(&c, &s, empty_or_one.clone(), events(2..3))
        .await
        .unwrap();
    assert!(
        store
            .append(&c, &s, empty_or_one, events(3..4))
            .await
            .is_err()
    );
    let contradiction = WriteCondition::PositionIs(2).and(WriteCondition::StreamIsEmpty);
    assert!(
        store
            .append(&c, &s, contradiction, events(3..4))
            .await
            .is_err()
    );
    let both = WriteCondition::PositionIs(2).and(WriteCondition::Any);
    store.append(&c, &s, both, events(3..4)).await.unwrap();
    assert_eq!(store.latest(&c, &s).await.unwrap().unwrap().position, 3);
}

async fn multi_stream_append_is_all_or_nothing(store: Store) {
    let c = category("carts");
    let written = store
        .append(&c, &stream("b"), WriteCondition::Any, events(0..1))
        .await
        .unwrap();
    let failing = vec![
        StreamAppend::new(stream("a"), WriteCondition::Any, events(0..3)),
        StreamAppend::new(stream("b"), WriteCondition::StreamIsEmpty, events(0..1)),
    ];
    let err = store.append_batch(&c, failing).await.unwrap_err();
    assert!(matches!(&err, Error::WriteConditionFailed { stream, .. } if stream.as_str() == "b"));
    assert!(store.latest(&c, &stream("a")).await.unwrap().is_none());
    settle(&store, written[0].cursor).await;
    assert_eq!(
        read_all(&store, &Source::Category(c.clone())).await.len(),
        1
    );

    let stored = store
        .append_batch(
            &c,
            vec![
                StreamAppend::new(stream("a"), WriteCondition::StreamIsEmpty, events(0..2)),
                StreamAppend::new(stream("b"), WriteCondition::PositionIs(0), events(10..11)),
            ],
        )
        .await
        .unwrap();
    let summary: Vec<(&str, u64)> = stored
        .iter()
        .map(|e| (e.stream.as_str(), e.position))
        .collect();
    assert_eq!(summary, [("a", 0), ("a", 1), ("b", 1)]);
    assert!(
        stored
            .iter()
            .all(|e| e.cursor.tx_id == stored[0].cursor.tx_id)
    );
}

async fn idempotency_keys_return_the_stored_event(store: Store) {
    let c = category("payments");
    let s = stream("p-1");
    let first = store
        .append(&c, &s, WriteCondition::StreamIsEmpty, vec![keyed(1, "k1")])
        .await
        .unwrap();
    // A retry of the same append (even under a condition that no longer holds)
    // returns the stored event and writes nothing.
    let retry = store
        .append(&c, &s, WriteCondition::StreamIsEmpty, vec![keyed(99, "k1")])
        .await
        .unwrap();
    assert_eq!(retry, first);
    assert_eq!(retry[0].payload, json!({ "n": 1 }));
    // The key is found whatever stream the retry names: keys belong to the category.
    let elsewhere = store
        .append(
            &c,
            &stream("p-2"),
            WriteCondition::Any,
            vec![keyed(5, "k1")],
        )
        .await
        .unwrap();
    assert_eq!(elsewhere, first);
    settle(&store, first[0].cursor).await;
    assert_eq!(
        read_all(&store, &Source::Category(c.clone())).await.len(),
        1
    );

    // Mixed: the known key is returned, the new event is written after it.
    let mixed = store
        .append(
            &c,
            &s,
            WriteCondition::PositionIs(0),
            vec![keyed(1, "k1"), keyed(2, "k2")],
        )
        .await
        .unwrap();
    assert_eq!(mixed[0], first[0]);
    assert_eq!(mixed[1].position, 1);
    assert_eq!(mixed[1].idempotency_key.as_ref().unwrap().as_str(), "k2");

    // Keys are scoped to their category.
    let other = store
        .append(
            &category("refunds"),
            &s,
            WriteCondition::Any,
            vec![keyed(1, "k1")],
        )
        .await
        .unwrap();
    assert_ne!(other[0].id, first[0].id);
    settle(&store, other[0].cursor).await;
    assert_eq!(read_all(&store, &Source::Log).await.len(), 3);
}

async fn invalid_batches_are_rejected(store: Store) {
    let c = category("invalid");
    let err = store.append_batch(&c, vec![]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidAppend(_)), "{err}");
    let err = store
        .append(&c, &stream("s"), WriteCondition::Any, vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidAppend(_)), "{err}");
    let twice = vec![
        StreamAppend::new(stream("s"), WriteCondition::Any, events(0..1)),
        StreamAppend::new(stream("s"), WriteCondition::Any, events(1..2)),
    ];
    let err = store.append_batch(&c, twice).await.unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");
    let err = store
        .append(
            &c,
            &stream("s"),
            WriteCondition::Any,
            vec![keyed(0, "k"), keyed(1, "k")],
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("idempotency key"), "{err}");
    assert!(read_all(&store, &Source::Log).await.is_empty());
}

async fn reads_page_after_a_cursor(store: Store) {
    let (a, b) = (category("alpha"), category("beta"));
    let mut appended = Vec::new();
    for i in 0..25u64 {
        let c = if i % 3 == 0 { &b } else { &a };
        let s = stream(&format!("s-{}", i % 4));
        appended.extend(
            store
                .append(c, &s, WriteCondition::Any, events(i..i + 1))
                .await
                .unwrap(),
        );
    }

    settle(&store, appended.last().unwrap().cursor).await;
    for source in [
        Source::Log,
        Source::Category(a.clone()),
        Source::Category(b.clone()),
        Source::Stream(a.clone(), stream("s-1")),
    ] {
        let expected: Vec<&StoredEvent> = appended.iter().filter(|e| source.holds(e)).collect();
        let mut paged = Vec::new();
        let mut cursor = Cursor::START;
        loop {
            let page = store.read(&source, cursor, 7).await.unwrap();
            assert!(page.len() <= 7);
            let Some(last) = page.last() else { break };
            cursor = last.cursor;
            paged.extend(page);
        }
        assert_eq!(paged.iter().collect::<Vec<_>>(), expected, "{source}");
        assert!(store.read(&source, cursor, 7).await.unwrap().is_empty());
    }

    let after_tenth = store
        .read(&Source::Log, appended[9].cursor, 100)
        .await
        .unwrap();
    assert_eq!(after_tenth, appended[10..]);
    assert!(
        store
            .read(&Source::Category(category("none")), Cursor::START, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn latest_and_head(store: Store) {
    let c = category("heads");
    let s = stream("h-1");
    assert!(store.latest(&c, &s).await.unwrap().is_none());
    assert!(
        store
            .head(&Source::Category(c.clone()))
            .await
            .unwrap()
            .is_none()
    );
    store
        .append(&c, &s, WriteCondition::Any, events(0..3))
        .await
        .unwrap();
    let last = store
        .append(&c, &stream("h-2"), WriteCondition::Any, events(0..2))
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(store.latest(&c, &s).await.unwrap().unwrap().position, 2);
    settle(&store, last.cursor).await;
    assert_eq!(
        store
            .head(&Source::Category(c.clone()))
            .await
            .unwrap()
            .unwrap(),
        last
    );
    assert_eq!(store.head(&Source::Log).await.unwrap().unwrap(), last);
    assert_eq!(
        store
            .head(&Source::Stream(c, s))
            .await
            .unwrap()
            .unwrap()
            .position,
        2
    );
}

async fn watchers_wake_on_appends_to_their_source(store: Store) {
    let watched = Source::Category(category("watched"));
    let mut watcher = store.watch().await.unwrap();
    store
        .append(
            &category("ignored"),
            &stream("s"),
            WriteCondition::Any,
            events(0..1),
        )
        .await
        .unwrap();
    let woke = tokio::time::timeout(Duration::from_millis(300), watcher.appended(&watched)).await;
    assert!(woke.is_err(), "woke for an append to another category");

    let mut log_watcher = store.watch().await.unwrap();
    store
        .append(
            &category("watched"),
            &stream("s"),
            WriteCondition::Any,
            events(0..1),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), watcher.appended(&watched))
        .await
        .expect("a category watcher wakes on an append to its category");
    tokio::time::timeout(Duration::from_secs(5), log_watcher.appended(&Source::Log))
        .await
        .expect("a log watcher wakes on any append");
}

/// The gap-free guarantee: 8 writers append to 64 streams of two categories (some
/// batches spanning two streams) while readers tail the log and one category. Every
/// reader must see every event exactly once, and each stream's positions in order.
pub(crate) async fn concurrent_writers_never_make_readers_skip(store: Store) {
    const WRITERS: usize = 8;
    const APPENDS_PER_WRITER: usize = 60;
    const STREAMS: usize = 64;
    let categories = [category("race-a"), category("race-b")];

    // Once the writers are done, the newest cursor they wrote; readers then read until
    // the horizon has passed it and nothing is left.
    let (writers_done, done) = tokio::sync::watch::channel(None::<Cursor>);
    let mut readers = tokio::task::JoinSet::new();
    // Partitions are read under the same horizon rule: merged per-slice scans
    // (16 of a category), a filtered category scan (4) and a filtered log scan.
    for source in [
        Source::Log,
        Source::Category(categories[0].clone()),
        format!("category:{}@1/4", categories[0]).parse().unwrap(),
        format!("category:{}@5/16", categories[0]).parse().unwrap(),
        "log@2/4".parse().unwrap(),
    ] {
        let (store, done) = (store.clone(), done.clone());
        readers.spawn(async move {
            let mut seen = Vec::new();
            let mut cursor = Cursor::START;
            loop {
                // Checked before the read: if everything written was readable then,
                // an empty read means this reader has seen it all.
                let last_written = *done.borrow();
                let settled = match last_written {
                    Some(last) => store
                        .head(&Source::Log)
                        .await
                        .unwrap()
                        .is_some_and(|head| head.cursor >= last),
                    None => false,
                };
                let page = store.read(&source, cursor, 50).await.unwrap();
                if let Some(last) = page.last() {
                    cursor = last.cursor;
                }
                let empty = page.is_empty();
                seen.extend(page);
                if settled && empty {
                    return (source, seen);
                }
                if empty {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        });
    }

    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let (store, categories) = (store.clone(), categories.clone());
        writers.spawn(async move {
            let mut written = Vec::new();
            for _ in 0..APPENDS_PER_WRITER {
                let (c, first, second, size) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..2usize),
                        rng.random_range(0..STREAMS),
                        rng.random_range(0..STREAMS),
                        rng.random_range(1..=4u64),
                    )
                };
                let mut appends = vec![StreamAppend::new(
                    stream(&format!("s-{first}")),
                    WriteCondition::Any,
                    events(0..size),
                )];
                if writer % 2 == 0 && second != first {
                    appends.push(StreamAppend::new(
                        stream(&format!("s-{second}")),
                        WriteCondition::Any,
                        events(0..1),
                    ));
                }
                written.extend(store.append_batch(&categories[c], appends).await.unwrap());
            }
            written
        });
    }
    let mut written = Vec::new();
    while let Some(batch) = writers.join_next().await {
        written.extend(batch.unwrap());
    }
    writers_done
        .send(written.iter().map(|e| e.cursor).max())
        .unwrap();

    let written_ids: HashSet<Uuid> = written.iter().map(|e| e.id).collect();
    assert_eq!(written_ids.len(), written.len());
    let timeout = Duration::from_secs(60);
    while let Some(result) = tokio::time::timeout(timeout, readers.join_next())
        .await
        .expect("readers caught up")
    {
        let (source, seen) = result.unwrap();
        let expected: HashSet<Uuid> = written
            .iter()
            .filter(|e| source.holds(e))
            .map(|e| e.id)
            .collect();
        let mut counts: HashMap<Uuid, usize> = HashMap::new();
        for event in &seen {
            *counts.entry(event.id).or_default() += 1;
        }
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "{source}: events seen twice: {twice:?}");
        let seen_ids: HashSet<Uuid> = counts.into_keys().collect();
        let missed = expected.difference(&seen_ids).count();
        assert_eq!(
            missed,
            0,
            "{source}: {missed} of {} events skipped",
            expected.len()
        );
        assert_eq!(seen_ids, expected, "{source}: saw events it should not");

        // Per stream, the reader saw positions 0, 1, 2, ... in that order.
        let mut next: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for event in &seen {
            let expected_position = next
                .entry((event.category.as_str(), event.stream.as_str()))
                .or_default();
            assert_eq!(
                event.position, *expected_position,
                "{source}: stream {}/{} out of order",
                event.category, event.stream
            );
            *expected_position += 1;
        }
        assert!(seen.windows(2).all(|w| w[0].cursor < w[1].cursor));
    }
}

async fn racing_conditional_appends_let_exactly_one_win(store: Store) {
    let (c, s) = (category("race-cond"), stream("only"));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8u64 {
        let (store, c, s) = (store.clone(), c.clone(), s.clone());
        tasks.spawn(async move {
            store
                .append(&c, &s, WriteCondition::StreamIsEmpty, events(i..i + 2))
                .await
        });
    }
    let (mut won, mut lost) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(stored) => {
                won += 1;
                assert_eq!(
                    stored.iter().map(|e| e.position).collect::<Vec<_>>(),
                    [0, 1]
                );
            }
            Err(Error::WriteConditionFailed { last_position, .. }) => {
                lost += 1;
                assert_eq!(last_position, Some(1));
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!((won, lost), (1, 7));
    assert_eq!(store.latest(&c, &s).await.unwrap().unwrap().position, 1);
}

async fn racing_appends_of_one_idempotency_key_store_it_once(store: Store) {
    let c = category("race-key");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8u64 {
        let (store, c) = (store.clone(), c.clone());
        tasks.spawn(async move {
            // Different streams, so the writers do not serialise on a stream lock.
            let s = stream(&format!("s-{i}"));
            store
                .append(&c, &s, WriteCondition::Any, vec![keyed(i, "once")])
                .await
        });
    }
    let mut ids = HashSet::new();
    while let Some(result) = tasks.join_next().await {
        ids.insert(result.unwrap().unwrap()[0].id);
    }
    assert_eq!(ids.len(), 1, "one key, one event");
}

/// Reads every event of `source` in pages of `page`.
async fn read_paged(store: &Store, source: &Source, page: usize) -> Vec<StoredEvent> {
    let (mut seen, mut cursor) = (Vec::new(), Cursor::START);
    loop {
        let batch = store.read(source, cursor, page).await.unwrap();
        match batch.last() {
            Some(last) => cursor = last.cursor,
            None => return seen,
        }
        seen.extend(batch);
    }
}

async fn partitions_split_a_category_exactly(store: Store) {
    let orders = category("split-orders");
    let other = category("split-other");
    let mut last = Cursor::START;
    for round in 0..4u64 {
        for (c, streams) in [(&orders, 200), (&other, 20)] {
            let appends = (0..streams)
                .map(|s| {
                    StreamAppend::new(
                        stream(&format!("s-{s}")),
                        WriteCondition::Any,
                        events(round..round + 1),
                    )
                })
                .collect();
            let written = store.append_batch(c, appends).await.unwrap();
            last = last.max(written.last().unwrap().cursor);
        }
    }
    settle(&store, last).await;
    let whole = read_all(&store, &Source::Category(orders.clone())).await;
    assert_eq!(whole.len(), 800);

    for count in [1, 2, 4, 12, 16, 17, 64, 1024] {
        let mut seen: HashMap<Uuid, String> = HashMap::new();
        let mut stream_partition: HashMap<String, String> = HashMap::new();
        for source in Source::Category(orders.clone()).split(count).unwrap() {
            let events = read_paged(&store, &source, 7).await;
            assert!(
                events.windows(2).all(|w| w[0].cursor < w[1].cursor),
                "{source} out of read order"
            );
            for event in &events {
                assert!(
                    source.holds(event),
                    "{source} returned {} of slice {}",
                    event.id,
                    event.slice()
                );
                assert_eq!(
                    event.category, orders,
                    "{source} returned another category's event"
                );
                let before = seen.insert(event.id, source.to_string());
                assert!(
                    before.is_none(),
                    "{} read from {source} and {before:?}",
                    event.id
                );
                let owner = stream_partition
                    .entry(event.stream.to_string())
                    .or_insert_with(|| source.to_string());
                assert_eq!(
                    *owner,
                    source.to_string(),
                    "stream {} split over partitions",
                    event.stream
                );
            }
            let head = store.head(&source).await.unwrap();
            assert_eq!(
                head.map(|e| e.id),
                events.last().map(|e| e.id),
                "{source} head"
            );
            let backlog = store
                .backlog(&source, Cursor::START, 1_000_000)
                .await
                .unwrap();
            assert_eq!(backlog.events, events.len() as u64, "{source} backlog");
            if let Some(first) = events.first() {
                let rest = store
                    .backlog(&source, first.cursor, 1_000_000)
                    .await
                    .unwrap();
                assert_eq!(
                    rest.events,
                    events.len() as u64 - 1,
                    "{source} backlog after its first"
                );
            }
        }
        assert_eq!(seen.len(), whole.len(), "{count} partitions lost events");
    }
    // The log splits the same way, over both categories.
    let log_total: usize = {
        let mut total = 0;
        for source in Source::Log.split(8).unwrap() {
            let events = read_paged(&store, &source, 50).await;
            assert!(events.iter().all(|e| source.holds(e)));
            total += events
                .iter()
                .filter(|e| e.category == orders || e.category == other)
                .count();
        }
        total
    };
    assert_eq!(log_total, 880);
}

/// Waits until `source` reads up to `through` (log and category reads stay below
/// the Postgres visibility horizon).
async fn settle_source(store: &Store, source: &Source, through: Cursor) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store
        .head(source)
        .await
        .unwrap()
        .is_none_or(|head| head.cursor < through)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{through} never became readable in {source}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn reserved_categories_are_weirs_own_and_stay_out_of_the_log(store: Store) {
    let reserved = category("$test");
    let user = category("orders");
    let one = |s: &str, n| {
        vec![StreamAppend::new(
            stream(s),
            WriteCondition::Any,
            events(0..n),
        )]
    };

    // Anyone may name the category, but only weir appends to it.
    let err = store
        .append(&reserved, &stream("s"), WriteCondition::Any, events(0..1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReservedCategory { .. }), "{err}");
    assert!(err.to_string().contains("only weir appends"), "{err}");
    let err = store.append_reserved(&user, one("s", 1)).await.unwrap_err();
    assert!(matches!(err, Error::NotReserved { .. }), "{err}");
    assert!(
        read_all(&store, &Source::Category(reserved.clone()))
            .await
            .is_empty()
    );

    let first_user = store.append_batch(&user, one("o-1", 2)).await.unwrap();
    let own = store.append_reserved(&reserved, one("s", 3)).await.unwrap();
    let last_user = store.append_batch(&user, one("o-2", 1)).await.unwrap();
    let own_source = Source::Category(reserved.clone());
    settle_source(&store, &own_source, own[2].cursor).await;
    settle(&store, last_user[0].cursor).await;

    // Read as a category like any other, with positions of its own.
    let read = read_all(&store, &own_source).await;
    assert_eq!(read, own);
    assert_eq!(
        read.iter().map(|e| e.position).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    // The log and its partitions leave it out, whatever the reader asks for.
    let users: Vec<StoredEvent> = first_user.into_iter().chain(last_user).collect();
    assert_eq!(read_all(&store, &Source::Log).await, users);
    assert_eq!(
        store.head(&Source::Log).await.unwrap().as_ref(),
        users.last()
    );
    let backlog = store
        .backlog(&Source::Log, Cursor::START, 100)
        .await
        .unwrap();
    assert_eq!(backlog.events, 3);
    let mut partitioned = Vec::new();
    for partition in Source::Log.split(4).unwrap() {
        partitioned.extend(read_all(&store, &partition).await);
        let head = store.head(&partition).await.unwrap();
        assert!(
            head.is_none_or(|e| !e.category.is_reserved()),
            "{partition}"
        );
    }
    partitioned.sort_by_key(|e| e.cursor);
    assert_eq!(partitioned, users);
}

async fn pruning_keeps_each_streams_last_event_so_positions_go_on(store: Store) {
    let reserved = category("$pruned");
    let appends = vec![
        StreamAppend::new(stream("a"), WriteCondition::Any, events(0..3)),
        StreamAppend::new(stream("b"), WriteCondition::Any, events(0..1)),
    ];
    let appended = store.append_reserved(&reserved, appends).await.unwrap();
    let source = Source::Category(reserved.clone());
    // The log leaves reserved categories out: the category shows when they settle.
    let last = appended.last().unwrap().cursor;
    crate::common::wait_until_readable(store.as_ref(), &source, last).await;
    let past = chrono::Utc::now() - chrono::Duration::hours(1);
    let future = chrono::Utc::now() + chrono::Duration::hours(1);

    // Nothing is older than an hour.
    assert_eq!(store.prune(&reserved, past, None).await.unwrap(), 0);
    // Only what every reader has read: its lowest cursor is the first event's.
    assert_eq!(
        store
            .prune(&reserved, future, Some(appended[0].cursor))
            .await
            .unwrap(),
        1
    );
    // Everything is older than in an hour, but each stream's last event stays.
    assert_eq!(store.prune(&reserved, future, None).await.unwrap(), 1);
    let kept: Vec<(String, u64)> = read_all(&store, &source)
        .await
        .iter()
        .map(|e| (e.stream.to_string(), e.position))
        .collect();
    assert_eq!(kept, [("a".to_owned(), 2), ("b".to_owned(), 0)]);

    // A pruned stream goes on from its last position, and holds it as its head.
    let next = store
        .append_reserved(
            &reserved,
            vec![StreamAppend::new(
                stream("a"),
                WriteCondition::Any,
                events(3..5),
            )],
        )
        .await
        .unwrap();
    assert_eq!(next.iter().map(|e| e.position).collect::<Vec<_>>(), [3, 4]);
    let condition = WriteCondition::PositionIs(4);
    let more = vec![StreamAppend::new(stream("a"), condition, events(5..6))];
    assert_eq!(
        store.append_reserved(&reserved, more).await.unwrap()[0].position,
        5
    );
    assert_eq!(
        store
            .latest(&reserved, &stream("a"))
            .await
            .unwrap()
            .unwrap()
            .position,
        5
    );
    assert_eq!(store.prune(&reserved, future, None).await.unwrap(), 3);

    // Only reserved categories are pruned.
    let user = category("kept");
    store
        .append(&user, &stream("k"), WriteCondition::Any, events(0..2))
        .await
        .unwrap();
    let err = store.prune(&user, future, None).await.unwrap_err();
    assert!(matches!(err, Error::NotReserved { .. }), "{err}");
    assert_eq!(
        read_all(&store, &Source::Stream(user, stream("k")))
            .await
            .len(),
        2
    );
}
