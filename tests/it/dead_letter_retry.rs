//! Dead-letter retry and purge, on the in-memory stores and on Postgres: events
//! become dead letters the way they do in production (a running consumer under the
//! `continue` policy, its downstream rejecting them), then the downstream is fixed
//! and the letters retried, or they are purged.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::time::Instant;
use uuid::Uuid;
use weir::broker::SingletonBroker;
use weir::consumer::replay::{LetterReport, Outcome};
use weir::consumer::settings::Executor;
use weir::consumer::{
    ConsumerSettings, DeadLetter, DeadLetterRequest, EventProcessor, NewDeadLetter, ProcessError,
    ReplayError, RetryReport, Selection, purge_dead_letters, retry_dead_letters,
};
use weir::event::{Category, EventName, NewEvent, Source, StoredEvent, StreamName, WriteCondition};
use weir::runtime::EventRuntime;

use crate::common::ConsumerBackend as Backend;

const GROUP: &str = "projection";
const WAIT: Duration = Duration::from_secs(60);

on_every_backend!(
    Backend:
    a_hundred_fixed_events_come_back_exactly_once_and_in_order,
    letters_that_fail_again_stay_and_hold_back_their_stream,
    transient_failures_are_tried_again_then_stop_the_run,
    a_dry_run_reports_and_changes_nothing,
    purge_removes_the_chosen_letters,
    ids_outside_the_group_are_refused_and_change_nothing,
    a_letter_whose_event_is_gone_is_reported_and_kept,
    events_are_found_by_id_in_read_order,
    every_letter_is_taken_a_page_at_a_time_in_order_and_listed_in_part,
);

/// A downstream a processor forwards to: broken until fixed, with poison events
/// and outages on demand.
#[derive(Default)]
struct Downstream {
    /// Every event is rejected while set: the bug before its fix.
    broken: AtomicBool,
    /// Rejected whatever `broken` says.
    poison: Mutex<HashSet<Uuid>>,
    /// The next this many deliveries fail transiently.
    outages: AtomicU32,
    delivered: Mutex<Vec<StoredEvent>>,
}

impl Downstream {
    fn broken() -> Arc<Self> {
        let downstream = Self::default();
        downstream.broken.store(true, Ordering::SeqCst);
        Arc::new(downstream)
    }

    fn fix(&self) {
        self.broken.store(false, Ordering::SeqCst);
    }

    fn poison(&self, event: &StoredEvent) {
        self.poison.lock().unwrap().insert(event.id);
    }

    fn cure(&self) {
        self.poison.lock().unwrap().clear();
    }

    fn delivered(&self) -> Vec<Uuid> {
        self.delivered
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect()
    }

    fn deliver(&self, event: &StoredEvent) -> Result<(), ProcessError> {
        let outage = self
            .outages
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if outage.is_ok() {
            return Err(ProcessError::transient("unavailable", "downstream is down"));
        }
        if self.broken.load(Ordering::SeqCst) {
            return Err(ProcessError::permanent("rejected", "schema mismatch"));
        }
        if self.poison.lock().unwrap().contains(&event.id) {
            return Err(ProcessError::permanent(
                "poison",
                format!("{} is poison", event.id),
            ));
        }
        self.delivered.lock().unwrap().push(event.clone());
        Ok(())
    }
}

#[async_trait]
impl EventProcessor for Downstream {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        for (index, event) in events.iter().enumerate() {
            self.deliver(event).map_err(|error| error.at(index))?;
        }
        Ok(())
    }
}

/// `count` events, one append each, going round `streams` streams of `orders`, so
/// that the streams interleave in the log. Returned in append (and read) order.
async fn append(backend: &Backend, streams: usize, count: usize) -> Vec<StoredEvent> {
    let category = Category::new("orders").unwrap();
    let mut stored = Vec::with_capacity(count);
    for n in 0..count {
        let stream = StreamName::new(format!("order-{}", n % streams)).unwrap();
        let event = NewEvent::new(EventName::new("OrderPlaced").unwrap(), json!({ "n": n }));
        let appended = backend
            .stores
            .events
            .append(&category, &stream, WriteCondition::Any, vec![event])
            .await
            .unwrap();
        stored.extend(appended);
    }
    stored
}

/// Runs a consumer of `orders` under the `continue` policy with `downstream` until
/// it has made `count` dead letters, then stops it; returns them, oldest first.
async fn dead_letter_through_consumer(
    backend: &Backend,
    downstream: &Arc<Downstream>,
    count: usize,
) -> Vec<DeadLetter> {
    let settings = ConsumerSettings {
        poll_interval: Duration::from_millis(20),
        batch_size: 10,
        ..ConsumerSettings::default()
    };
    let runtime = EventRuntime::new(
        "node-a",
        Arc::new(SingletonBroker::new()),
        backend.stores.clone(),
        settings,
    );
    let processor: Arc<dyn EventProcessor> = downstream.clone();
    runtime
        .register_consumer(GROUP, "category:orders".parse().unwrap(), processor, None)
        .unwrap();
    runtime.start().await.unwrap();
    let started = Instant::now();
    let letters = loop {
        let letters = letters(backend).await;
        if letters.len() >= count {
            break letters;
        }
        assert!(started.elapsed() < WAIT, "{} dead letters", letters.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    runtime.stop().await;
    assert_eq!(letters.len(), count);
    letters
}

/// A dead letter of `group` recorded without a consumer, for an event of the
/// caller's choosing.
async fn record_by_hand(
    backend: &Backend,
    group: &str,
    event_id: Uuid,
    sequence: u64,
) -> DeadLetter {
    let letter = NewDeadLetter {
        group: group.into(),
        source: "category:orders".parse().unwrap(),
        event_id,
        sequence,
        kind: "rejected".into(),
        error: "schema mismatch".into(),
        attempts: 1,
    };
    backend.stores.dead_letters.record(&letter).await.unwrap()
}

async fn letters(backend: &Backend) -> Vec<DeadLetter> {
    backend
        .stores
        .dead_letters
        .list(Some(GROUP), 0, 10_000)
        .await
        .unwrap()
}

fn request(selection: Selection, dry_run: bool) -> DeadLetterRequest {
    DeadLetterRequest {
        group: GROUP.to_owned(),
        selection,
        dry_run,
    }
}

async fn retry(
    backend: &Backend,
    downstream: &Arc<Downstream>,
    request: &DeadLetterRequest,
) -> Result<RetryReport, ReplayError> {
    let processor: Arc<dyn EventProcessor> = downstream.clone();
    retry_dead_letters(
        backend.stores.events.as_ref(),
        backend.stores.dead_letters.as_ref(),
        &processor,
        &Executor::Main,
        request,
    )
    .await
}

fn ids(events: &[StoredEvent]) -> Vec<Uuid> {
    events.iter().map(|event| event.id).collect()
}

/// Each letter's outcome, by the id of its event.
fn outcomes(report: &RetryReport) -> BTreeMap<Uuid, Outcome> {
    report
        .letters
        .iter()
        .map(|letter: &LetterReport| (letter.event_id, letter.outcome.clone()))
        .collect()
}

async fn a_hundred_fixed_events_come_back_exactly_once_and_in_order(backend: Backend) {
    let events = append(&backend, 7, 100).await;
    let downstream = Downstream::broken();
    let recorded = dead_letter_through_consumer(&backend, &downstream, 100).await;
    assert!(downstream.delivered().is_empty());
    assert!(recorded.iter().all(|letter| letter.attempts == 1));
    let recorded_events: HashSet<Uuid> = recorded.iter().map(|l| l.event_id).collect();
    assert_eq!(recorded_events, ids(&events).into_iter().collect());

    downstream.fix();
    let report = retry(&backend, &downstream, &request(Selection::All, false))
        .await
        .unwrap();
    assert_eq!((report.chosen, report.retried), (100, 100), "{report:?}");
    assert_eq!(report.failed + report.held_back + report.not_tried, 0);
    // Exactly once, and in the order they were appended: oldest first, so each
    // stream in order too.
    assert_eq!(downstream.delivered(), ids(&events));
    assert!(letters(&backend).await.is_empty());

    // Nothing is left to deliver a second time.
    let again = retry(&backend, &downstream, &request(Selection::All, false))
        .await
        .unwrap();
    assert_eq!(again.chosen, 0);
    assert_eq!(downstream.delivered().len(), 100);
}

async fn letters_that_fail_again_stay_and_hold_back_their_stream(backend: Backend) {
    // Streams order-0 (events 0, 2, 4, 6) and order-1 (1, 3, 5, 7).
    let events = append(&backend, 2, 8).await;
    let downstream = Downstream::broken();
    let recorded = dead_letter_through_consumer(&backend, &downstream, 8).await;
    let letter_of = |event: &StoredEvent| {
        recorded
            .iter()
            .find(|letter| letter.event_id == event.id)
            .unwrap()
            .clone()
    };
    downstream.fix();
    downstream.poison(&events[2]);

    let report = retry(&backend, &downstream, &request(Selection::All, false))
        .await
        .unwrap();
    // order-0 goes as far as its poison event and waits behind it; order-1 goes on.
    let delivered = [0, 1, 3, 5, 7].map(|i| events[i].id);
    assert_eq!(downstream.delivered(), delivered);
    let outcomes = outcomes(&report);
    let poisoned = letter_of(&events[2]);
    assert_eq!(
        outcomes[&events[2].id],
        Outcome::Failed {
            kind: "poison".into(),
            error: format!("{} is poison", events[2].id),
            transient: false,
            attempts: 2,
        }
    );
    for held in [4, 6] {
        assert_eq!(
            outcomes[&events[held].id],
            Outcome::HeldBack {
                behind: poisoned.id
            }
        );
    }
    assert_eq!((report.retried, report.failed, report.held_back), (5, 1, 2));

    // What failed again stays with its newest error; what waited is unchanged.
    let left = letters(&backend).await;
    let expected_left = [
        DeadLetter {
            attempts: 2,
            kind: "poison".into(),
            error: format!("{} is poison", events[2].id),
            ..poisoned
        },
        letter_of(&events[4]),
        letter_of(&events[6]),
    ];
    assert_eq!(left, expected_left);

    // Once cured, the rest of order-0 follows in its order.
    downstream.cure();
    let report = retry(&backend, &downstream, &request(Selection::All, false))
        .await
        .unwrap();
    assert_eq!(report.retried, 3);
    assert_eq!(
        &downstream.delivered()[5..],
        [2, 4, 6].map(|i| events[i].id)
    );
    assert!(letters(&backend).await.is_empty());
}

async fn transient_failures_are_tried_again_then_stop_the_run(backend: Backend) {
    let events = append(&backend, 3, 6).await;
    let downstream = Downstream::broken();
    let recorded = dead_letter_through_consumer(&backend, &downstream, 6).await;
    downstream.fix();

    // Two outages in a row are outlasted by the backoff.
    downstream.outages.store(2, Ordering::SeqCst);
    let first = recorded
        .iter()
        .find(|l| l.event_id == events[0].id)
        .unwrap();
    let report = retry(
        &backend,
        &downstream,
        &request(Selection::Ids(vec![first.id]), false),
    )
    .await
    .unwrap();
    assert_eq!(report.retried, 1, "{report:?}");
    assert_eq!(downstream.delivered(), [events[0].id]);

    // An outage that outlasts every try fails its letter, and the run stops there:
    // the others are not tried, whatever their stream.
    downstream.outages.store(u32::MAX, Ordering::SeqCst);
    let report = retry(&backend, &downstream, &request(Selection::All, false))
        .await
        .unwrap();
    let down = recorded
        .iter()
        .find(|l| l.event_id == events[1].id)
        .unwrap();
    let outcomes = outcomes(&report);
    assert_eq!(
        outcomes[&events[1].id],
        Outcome::Failed {
            kind: "unavailable".into(),
            error: "downstream is down".into(),
            transient: true,
            attempts: 2,
        }
    );
    for later in 2..6 {
        assert_eq!(
            outcomes[&events[later].id],
            Outcome::NotTried { behind: down.id }
        );
    }
    assert_eq!(downstream.delivered().len(), 1);
    assert_eq!(letters(&backend).await.len(), 5);

    downstream.outages.store(0, Ordering::SeqCst);
    let report = retry(&backend, &downstream, &request(Selection::All, false))
        .await
        .unwrap();
    assert_eq!(report.retried, 5);
    assert_eq!(downstream.delivered(), ids(&events));
}

async fn a_dry_run_reports_and_changes_nothing(backend: Backend) {
    let events = append(&backend, 2, 4).await;
    let downstream = Downstream::broken();
    let recorded = dead_letter_through_consumer(&backend, &downstream, 4).await;
    downstream.fix();

    let letter_of = |i: usize| {
        recorded
            .iter()
            .find(|letter| letter.event_id == events[i].id)
            .unwrap()
    };
    let chosen = vec![letter_of(3).id, letter_of(1).id];
    let report = retry(
        &backend,
        &downstream,
        &request(Selection::Ids(chosen), true),
    )
    .await
    .unwrap();
    assert!(report.dry_run);
    assert_eq!((report.chosen, report.would_retry), (2, 2));
    assert_eq!(report.retried, 0);
    // Oldest first, each with its event and stream.
    let reported: Vec<(u64, Uuid, Option<String>)> = report
        .letters
        .iter()
        .map(|l| (l.id, l.event_id, l.stream.clone()))
        .collect();
    let expected: Vec<(u64, Uuid, Option<String>)> = [1, 3]
        .into_iter()
        .map(|i| {
            let stream = format!("orders/order-{}", i % 2);
            (letter_of(i).id, events[i].id, Some(stream))
        })
        .collect();
    assert_eq!(reported, expected);
    assert!(
        report
            .letters
            .iter()
            .all(|l| l.outcome == Outcome::WouldRetry)
    );

    let all = retry(&backend, &downstream, &request(Selection::All, true))
        .await
        .unwrap();
    assert_eq!(all.would_retry, 4);
    let purge = purge_dead_letters(
        backend.stores.dead_letters.as_ref(),
        &request(Selection::All, true),
    )
    .await
    .unwrap();
    assert_eq!((purge.chosen, purge.removed), (4, 0));

    assert!(downstream.delivered().is_empty());
    assert_eq!(letters(&backend).await, recorded);
}

async fn purge_removes_the_chosen_letters(backend: Backend) {
    append(&backend, 2, 5).await;
    let downstream = Downstream::broken();
    let recorded = dead_letter_through_consumer(&backend, &downstream, 5).await;
    let dead_letters = backend.stores.dead_letters.as_ref();

    let chosen = Selection::Ids(vec![recorded[0].id, recorded[3].id]);
    let report = purge_dead_letters(dead_letters, &request(chosen, false))
        .await
        .unwrap();
    assert_eq!((report.chosen, report.removed), (2, 2));
    assert_eq!(report.letters, [recorded[0].clone(), recorded[3].clone()]);
    let left = [&recorded[1], &recorded[2], &recorded[4]].map(Clone::clone);
    assert_eq!(letters(&backend).await, left);

    let report = purge_dead_letters(dead_letters, &request(Selection::All, false))
        .await
        .unwrap();
    assert_eq!((report.chosen, report.removed), (3, 3));
    assert!(letters(&backend).await.is_empty());
    // Ids are not reused: a letter recorded now cannot be mistaken for a purged one.
    let later = record_by_hand(&backend, "billing", Uuid::now_v7(), 1).await;
    assert!(
        later.id > recorded[4].id,
        "{} <= {}",
        later.id,
        recorded[4].id
    );
    // Purged is not delivered.
    downstream.fix();
    let report = retry(&backend, &downstream, &request(Selection::All, false))
        .await
        .unwrap();
    assert_eq!(report.chosen, 0);
    assert!(downstream.delivered().is_empty());
}

async fn ids_outside_the_group_are_refused_and_change_nothing(backend: Backend) {
    let events = append(&backend, 1, 2).await;
    let downstream = Downstream::broken();
    let ours = dead_letter_through_consumer(&backend, &downstream, 2).await;
    let theirs = record_by_hand(&backend, "billing", events[0].id, events[0].sequence).await;
    downstream.fix();
    let unknown = theirs.id + 1000;
    let chosen = Selection::Ids(vec![ours[0].id, theirs.id, unknown]);

    let refused = retry(&backend, &downstream, &request(chosen.clone(), false)).await;
    match &refused {
        Err(ReplayError::NotInGroup {
            group,
            unknown: missing,
            elsewhere,
        }) => {
            assert_eq!(group, GROUP);
            assert_eq!(missing, &[unknown]);
            assert_eq!(elsewhere, &[(theirs.id, "billing".to_owned())]);
        }
        other => panic!("expected NotInGroup, got {other:?}"),
    }
    let message = refused.unwrap_err().to_string();
    assert!(message.contains("belongs to group billing"), "{message}");
    assert!(message.contains("nothing was changed"), "{message}");

    let purge = request(chosen, false);
    let purged = purge_dead_letters(backend.stores.dead_letters.as_ref(), &purge).await;
    assert!(matches!(purged, Err(ReplayError::NotInGroup { .. })));
    let nothing = retry(
        &backend,
        &downstream,
        &request(Selection::Ids(vec![]), false),
    )
    .await;
    assert!(matches!(nothing, Err(ReplayError::NothingChosen { .. })));

    assert!(downstream.delivered().is_empty());
    assert_eq!(letters(&backend).await, ours);
    let billing = backend.stores.dead_letters.list(Some("billing"), 0, 10);
    assert_eq!(billing.await.unwrap(), [theirs]);
}

async fn a_letter_whose_event_is_gone_is_reported_and_kept(backend: Backend) {
    let events = append(&backend, 1, 2).await;
    let downstream = Downstream::broken();
    dead_letter_through_consumer(&backend, &downstream, 2).await;
    // A letter of an event the store no longer holds, as after pruning.
    let pruned = record_by_hand(&backend, GROUP, Uuid::now_v7(), events[0].sequence).await;
    downstream.fix();

    let report = retry(&backend, &downstream, &request(Selection::All, false))
        .await
        .unwrap();
    assert_eq!(
        (report.retried, report.events_missing),
        (2, 1),
        "{report:?}"
    );
    let missing = report.letters.iter().find(|l| l.id == pruned.id).unwrap();
    assert_eq!(
        (&missing.outcome, &missing.stream),
        (&Outcome::EventMissing, &None)
    );
    assert_eq!(downstream.delivered(), ids(&events));
    assert_eq!(letters(&backend).await, [pruned]);
}

async fn events_are_found_by_id_in_read_order(backend: Backend) {
    let events = append(&backend, 3, 9).await;
    let store = backend.stores.events.as_ref();
    let asked = [
        events[7].id,
        Uuid::now_v7(),
        events[2].id,
        events[7].id,
        events[4].id,
    ];
    let found = store.events_by_id(&asked).await.unwrap();
    assert_eq!(found, [2, 4, 7].map(|i| events[i].clone()));
    assert!(store.events_by_id(&[]).await.unwrap().is_empty());
    // What the JSON of a report looks like to the admin API.
    let source: Source = "category:orders".parse().unwrap();
    let letter = LetterReport {
        id: 3,
        event_id: events[0].id,
        source,
        stream: Some("orders/order-0".into()),
        sequence: events[0].sequence,
        outcome: Outcome::HeldBack { behind: 2 },
    };
    let json = serde_json::to_value(&letter).unwrap();
    assert_eq!(json["outcome"], "held_back");
    assert_eq!(json["behind"], 2);
    assert_eq!(json["source"], "category:orders");
    let selection: Selection = serde_json::from_value(json!({ "ids": [1, 2] })).unwrap();
    assert_eq!(selection, Selection::Ids(vec![1, 2]));
    let all: DeadLetterRequest =
        serde_json::from_value(json!({ "group": "g", "selection": "all" })).unwrap();
    assert_eq!((all.selection, all.dry_run), (Selection::All, false));
}

/// `--all` over more letters than a page and than a report lists: every letter
/// is taken, in stream order even where letter ids run against it, counted, and
/// only the first `LISTED` are listed one by one.
async fn every_letter_is_taken_a_page_at_a_time_in_order_and_listed_in_part(backend: Backend) {
    let listed = weir::consumer::replay::LISTED;
    let count = listed + 250;
    let events = append(&backend, 7, count).await;
    // Recorded newest first: letter ids run against the events' order.
    for event in events.iter().rev() {
        record_by_hand(&backend, GROUP, event.id, event.sequence).await;
    }
    let downstream = Arc::new(Downstream::default());
    let report = retry(&backend, &downstream, &request(Selection::All, false))
        .await
        .unwrap();
    assert_eq!((report.chosen, report.retried), (count, count));
    assert_eq!(report.letters.len(), listed);
    assert_eq!(report.letters_omitted, count - listed);
    assert_eq!(
        downstream.delivered(),
        ids(&events),
        "not once each, in order"
    );
    assert!(letters(&backend).await.is_empty());

    for event in &events {
        record_by_hand(&backend, GROUP, event.id, event.sequence).await;
    }
    let dry = purge_dead_letters(
        backend.stores.dead_letters.as_ref(),
        &request(Selection::All, true),
    )
    .await
    .unwrap();
    assert_eq!((dry.chosen, dry.removed), (count, 0));
    assert_eq!(
        (dry.letters.len(), dry.letters_omitted),
        (listed, count - listed)
    );
    assert_eq!(letters(&backend).await.len(), count);
    let purged = purge_dead_letters(
        backend.stores.dead_letters.as_ref(),
        &request(Selection::All, false),
    )
    .await
    .unwrap();
    assert_eq!((purged.chosen, purged.removed), (count, count as u64));
    assert!(letters(&backend).await.is_empty());
}
