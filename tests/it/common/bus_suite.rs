//! The allocation bus test suite every backend runs: fixtures, a [`BusBackend`]
//! for each backend's tests to implement, and the bodies of the behaviour every bus
//! must show whatever carries its messages. [`bus_suite!`](crate::bus_suite)
//! turns the bodies into one test each for a backend.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use weir::allocation::Handover;
use weir::bus::{AllocationBus, BusMessage, BusSubscription, Decision, Digest, MemoryBus, Signal};
use weir::event::{Cursor, Source};

use super::unique_name;

/// How long a test waits for what it expects before failing.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Defines, for every body of the suite, a test of that name running it on the
/// backend that `$backend` (an expression giving a future of
/// `Option<impl BusBackend>`) makes. `None` means the service is missing and the
/// test skips; the backend's constructor has already failed the test instead
/// under `WEIR_REQUIRE_SERVICES=1`.
#[macro_export]
macro_rules! bus_suite {
    ($backend:expr) => {
        $crate::bus_suite!(@tests $backend;
            a_late_subscriber_gets_the_newest_decision_of_every_group,
            stale_decisions_do_not_replace_newer_ones,
            split_decisions_arrive_whole,
            signals_reach_those_subscribed_when_they_were_published,
            invalid_payloads_are_counted_and_skipped,
            fleets_are_isolated,
            retained_gives_the_newest_complete_decision_per_group,
            a_decision_above_a_stray_one_supersedes_it,
            changes_travel_as_deltas_and_late_subscribers_converge,
            a_subscriber_that_missed_changes_converges_through_a_digest,
            a_new_term_starts_whole_whoever_published_between,
            a_decision_written_whole_reaches_readers_that_lack_its_base,
        );
    };
    (@tests $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if let Some(backend) = $backend.await {
                    $crate::common::bus_suite::$name(&backend).await;
                }
            }
        )*
    };
}

/// What the suite's bodies need of a backend.
#[async_trait]
pub trait BusBackend: Send + Sync {
    /// A handle on the bus of `fleet`, as one node of that fleet would connect.
    /// Handles of one fleet share a bus; fleets are isolated from each other.
    async fn connect(&self, fleet: &str) -> Arc<dyn AllocationBus>;

    /// Delivers `bytes`, which need not be a valid message, to the subscribers
    /// of `fleet`'s bus, in order with the other raw payloads of `group`.
    async fn publish_raw(&self, fleet: &str, group: &str, bytes: &[u8]);

    /// Whether subscribers get decisions, signals and raw payloads in the one
    /// order they were published in. Network buses keep decisions and signals
    /// apart, so only the in-memory bus can promise this; where it does, the
    /// bodies check the order too.
    fn keeps_one_order(&self) -> bool {
        false
    }
}

/// One [`MemoryBus`] per fleet.
#[derive(Default)]
pub struct MemoryBackend {
    fleets: Mutex<HashMap<String, MemoryBus>>,
}

impl MemoryBackend {
    /// Always there: the suite's macro expects a future of an option.
    pub async fn start() -> Option<Self> {
        Some(Self::default())
    }

    fn fleet(&self, fleet: &str) -> MemoryBus {
        self.fleets
            .lock()
            .expect("not poisoned")
            .entry(fleet.to_owned())
            .or_default()
            .clone()
    }
}

#[async_trait]
impl BusBackend for MemoryBackend {
    async fn connect(&self, fleet: &str) -> Arc<dyn AllocationBus> {
        Arc::new(self.fleet(fleet))
    }

    async fn publish_raw(&self, fleet: &str, _group: &str, bytes: &[u8]) {
        self.fleet(fleet).publish_raw(bytes.to_vec());
    }

    fn keeps_one_order(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------
// Fixtures

pub fn source(text: &str) -> Source {
    text.parse().expect("test sources are valid")
}

pub fn decision(group: &str, epoch: u64, revision: u64) -> Decision {
    Decision {
        group: group.into(),
        epoch,
        revision,
        coordinator: format!("node-{epoch}"),
        issued_at: Utc::now(),
        owners: [(
            format!("{group}-1"),
            [source(&format!("category:{group}")), source("log")].into(),
        )]
        .into(),
        handovers: [(
            source(&format!("stream:{group}/r-{revision}")),
            Handover {
                from: format!("{group}-1"),
                to: format!("{group}-2"),
            },
        )]
        .into(),
        paused: false,
    }
}

/// A decision of about 2.8 MB: larger than any backend's default payload limit.
pub fn large_decision(group: &str, revision: u64) -> Decision {
    let mut owners = BTreeMap::new();
    for subscriber in 0..100 {
        let sources: BTreeSet<Source> = (0..1_000)
            .map(|i| source(&format!("stream:orders/order-{subscriber:03}-{i:04}")))
            .collect();
        owners.insert(format!("{group}-{subscriber}"), sources);
    }
    Decision {
        owners,
        ..decision(group, 1, revision)
    }
}

pub fn released(group: &str, sequence: u64) -> Signal {
    Signal::Released {
        group: group.into(),
        subscriber: format!("{group}-1"),
        source: source("log"),
        cursor: Some(Cursor::new(7, sequence)),
    }
}

pub fn joined(group: &str, subscriber: &str) -> Signal {
    Signal::Joined {
        group: group.into(),
        subscriber: subscriber.into(),
        node: "node-9".into(),
    }
}

pub fn by_group(decisions: Vec<Decision>) -> BTreeMap<String, Decision> {
    decisions
        .into_iter()
        .map(|d| (d.group.clone(), d))
        .collect()
}

pub async fn publish_all(bus: &dyn AllocationBus, messages: impl IntoIterator<Item = BusMessage>) {
    for message in messages {
        bus.publish(&message).await.expect("publish");
    }
}

/// What a node connecting now finds retained on `fleet`'s bus, by group: it
/// must not depend on what the publishing handle has in memory.
pub async fn retained_on_another_node(backend: &dyn BusBackend, fleet: &str) -> Vec<Decision> {
    let mut retained = backend
        .connect(fleet)
        .await
        .retained()
        .await
        .expect("retained");
    retained.sort_by(|a, b| a.group.cmp(&b.group));
    retained
}

pub async fn next(subscription: &mut BusSubscription) -> BusMessage {
    tokio::time::timeout(PATIENCE, subscription.next())
        .await
        .expect("a message in time")
        .expect("the bus is still open")
}

/// Reads until `done` holds for the newest decision seen per group; returns
/// those and every signal read on the way. Fails if a group's decisions go
/// back, or when [`PATIENCE`] runs out first.
pub async fn drain_until(
    subscription: &mut BusSubscription,
    done: impl Fn(&BTreeMap<String, Decision>) -> bool,
) -> (BTreeMap<String, Decision>, Vec<Signal>) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut decisions: BTreeMap<String, Decision> = BTreeMap::new();
    let mut signals = Vec::new();
    while !done(&decisions) {
        let message = tokio::time::timeout_at(deadline, subscription.next())
            .await
            .unwrap_or_else(|_| panic!("waited {PATIENCE:?}; the newest decisions: {decisions:?}"))
            .expect("the bus is still open");
        match message {
            BusMessage::Decision(d) => {
                if let Some(seen) = decisions.get(&d.group) {
                    assert!(d.is_newer_than(seen), "went back from {seen:?} to {d:?}");
                }
                decisions.insert(d.group.clone(), d);
            }
            BusMessage::Signal(s) => signals.push(s),
            BusMessage::Digest(_) => {}
        }
    }
    (decisions, signals)
}

/// For [`drain_until`]: whether every group of `expected` has a decision at
/// least as new as `expected`'s. Callers then compare what they read with
/// `expected` itself, so that a wrong decision fails with both to see.
pub fn reached(
    expected: &BTreeMap<String, Decision>,
) -> impl Fn(&BTreeMap<String, Decision>) -> bool + '_ {
    |decisions| {
        expected.iter().all(|(group, wanted)| {
            decisions
                .get(group)
                .is_some_and(|seen| !wanted.is_newer_than(seen))
        })
    }
}

/// Fails if a decision or a signal arrives within `window`, for tests that
/// something does not arrive. `window` is how long such a message would take
/// at most to arrive, were it sent: each caller says why it suffices.
pub async fn assert_quiet(subscription: &mut BusSubscription, window: Duration) {
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, subscription.next()).await {
        if !matches!(message, BusMessage::Digest(_)) {
            panic!("nothing should have arrived, but this did: {message:?}");
        }
    }
}

/// What a subscription delivered until `done` held: every decision and every
/// signal, in order, and every message in the one order they arrived in.
#[derive(Debug, Default)]
pub struct Seen {
    pub decisions: Vec<Decision>,
    pub signals: Vec<Signal>,
    pub messages: Vec<BusMessage>,
}

impl Seen {
    pub fn newest(&self, group: &str) -> Option<(u64, u64)> {
        self.decisions
            .iter()
            .rev()
            .find(|d| d.group == group)
            .map(Decision::version)
    }
}

pub async fn read_until(subscription: &mut BusSubscription, done: impl Fn(&Seen) -> bool) -> Seen {
    let mut seen = Seen::default();
    while !done(&seen) {
        let message = next(subscription).await;
        seen.messages.push(message.clone());
        match message {
            BusMessage::Decision(d) => {
                if let Some(before) = seen.decisions.iter().rev().find(|s| s.group == d.group) {
                    assert!(
                        d.is_newer_than(before),
                        "went back from {before:?} to {d:?}"
                    );
                }
                seen.decisions.push(d);
            }
            BusMessage::Signal(s) => seen.signals.push(s),
            BusMessage::Digest(_) => {}
        }
    }
    seen
}

// ---------------------------------------------------------------------------
// Bodies

pub async fn a_late_subscriber_gets_the_newest_decision_of_every_group(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let coordinator = backend.connect(&fleet).await;
    let decisions = [
        ("orders", 1, 1),
        ("orders", 1, 2),
        ("payments", 3, 9),
        ("orders", 2, 0),
        ("payments", 3, 10),
    ]
    .map(|(group, epoch, revision)| decision(group, epoch, revision).into());
    publish_all(&*coordinator, decisions).await;
    publish_all(&*coordinator, [released("orders", 1).into()]).await;

    let observer = backend.connect(&fleet).await;
    let mut late = observer.subscribe().await.expect("subscribe");
    let seen = read_until(&mut late, |seen| {
        seen.newest("orders") == Some((2, 0)) && seen.newest("payments") == Some((3, 10))
    })
    .await;
    assert!(seen.signals.is_empty(), "old signals: {:?}", seen.signals);

    // Live messages follow.
    let newer = decision("orders", 2, 1);
    publish_all(
        &*coordinator,
        [newer.clone().into(), released("orders", 2).into()],
    )
    .await;
    let seen = read_until(&mut late, |seen| {
        !seen.decisions.is_empty() && !seen.signals.is_empty()
    })
    .await;
    if backend.keeps_one_order() {
        assert_eq!(
            seen.messages,
            vec![
                BusMessage::Decision(newer.clone()),
                BusMessage::Signal(released("orders", 2))
            ]
        );
    }
    assert_eq!(seen.decisions, vec![newer]);
    // The signal published before subscribing never arrives; this one does.
    assert_eq!(seen.signals, vec![released("orders", 2)]);
}

pub async fn stale_decisions_do_not_replace_newer_ones(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let bus = backend.connect(&fleet).await;
    let mut early = bus.subscribe().await.expect("subscribe");
    let current = decision("orders", 5, 1);
    bus.publish(&current.clone().into()).await.expect("publish");
    // A deposed coordinator's late decision: higher revision, lower epoch.
    bus.publish(&decision("orders", 4, 99).into())
        .await
        .expect("publish");
    // The same version again is not newer either.
    bus.publish(&decision("orders", 5, 1).into())
        .await
        .expect("publish");
    assert_eq!(
        bus.retained().await.expect("retained"),
        vec![current.clone()]
    );

    let other_node = backend.connect(&fleet).await;
    assert_eq!(
        other_node.retained().await.expect("retained"),
        vec![current.clone()]
    );
    let mut late = other_node.subscribe().await.expect("subscribe");
    let seen = read_until(&mut late, |seen| seen.newest("orders").is_some()).await;
    assert_eq!(seen.decisions, vec![current.clone()]);

    // Decisions of one group arrive in order, so once the next one is here the
    // stale ones have been and gone without being delivered.
    let next_one = decision("orders", 5, 2);
    bus.publish(&next_one.clone().into())
        .await
        .expect("publish");
    let seen = read_until(&mut early, |seen| seen.newest("orders") == Some((5, 2))).await;
    assert_eq!(seen.decisions, vec![current, next_one.clone()]);
    let seen = read_until(&mut late, |seen| seen.newest("orders") == Some((5, 2))).await;
    assert_eq!(seen.decisions, vec![next_one]);
}

pub async fn split_decisions_arrive_whole(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let bus = backend.connect(&fleet).await;
    let mut subscription = bus.subscribe().await.expect("subscribe");
    let big = large_decision("orders", 1);
    let other = large_decision("payments", 4);
    bus.publish(&big.clone().into()).await.expect("publish");
    bus.publish(&other.clone().into()).await.expect("publish");
    let seen = read_until(&mut subscription, |seen| seen.decisions.len() == 2).await;
    assert_eq!(seen.decisions, vec![big.clone(), other.clone()]);

    let retained = retained_on_another_node(backend, &fleet).await;
    assert_eq!(retained, vec![big, other]);
}

pub async fn signals_reach_those_subscribed_when_they_were_published(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let coordinator = backend.connect(&fleet).await;
    let mut first = coordinator.subscribe().await.expect("subscribe");
    let node = backend.connect(&fleet).await;
    let mut second = node.subscribe().await.expect("subscribe");
    let signals = vec![
        joined("orders", "orders-3"),
        released("orders", 4),
        Signal::Leaving {
            group: "orders".into(),
            subscriber: "orders-3".into(),
            node: "node-9".into(),
        },
    ];
    for signal in &signals {
        node.publish(&signal.clone().into()).await.expect("publish");
    }
    for subscription in [&mut first, &mut second] {
        let seen = read_until(subscription, |seen| seen.signals.len() == 3).await;
        assert_eq!(seen.signals, signals);
    }

    let mut later = backend
        .connect(&fleet)
        .await
        .subscribe()
        .await
        .expect("subscribe");
    let after = joined("orders", "orders-4");
    node.publish(&after.clone().into()).await.expect("publish");
    let seen = read_until(&mut later, |seen| !seen.signals.is_empty()).await;
    assert_eq!(seen.signals, vec![after.clone()]);
    let seen = read_until(&mut first, |seen| !seen.signals.is_empty()).await;
    assert_eq!(seen.signals, vec![after]);
}

pub async fn invalid_payloads_are_counted_and_skipped(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let bus = backend.connect(&fleet).await;
    let mut subscription = bus.subscribe().await.expect("subscribe");
    for junk in [
        &b"\x00\xffnot json at all"[..],
        br#"{"v":2,"kind":"decision","group":"orders","shiny":true}"#,
        br#"{"v":1,"kind":"decision","group":"orders"}"#,
    ] {
        backend.publish_raw(&fleet, "orders", junk).await;
    }
    let first = decision("orders", 1, 1);
    bus.publish(&first.clone().into()).await.expect("publish");
    backend.publish_raw(&fleet, "orders", b"{").await;
    let second = decision("orders", 1, 2);
    bus.publish(&second.clone().into()).await.expect("publish");
    bus.publish(&released("orders", 1).into())
        .await
        .expect("publish");

    let seen = read_until(&mut subscription, |seen| seen.newest("orders").is_some()).await;
    assert_eq!(seen.decisions, vec![first]);
    if backend.keeps_one_order() {
        // Exactly the payloads published before the first decision are behind it.
        assert_eq!(subscription.invalid_messages(), 3);
    }
    let seen = read_until(&mut subscription, |seen| {
        seen.newest("orders") == Some((1, 2)) && !seen.signals.is_empty()
    })
    .await;
    assert_eq!(seen.decisions, vec![second]);
    assert_eq!(seen.signals, vec![released("orders", 1)]);
    assert_eq!(subscription.invalid_messages(), 4);
    // The bus's own total, shared by its subscriptions.
    assert!(subscription.invalid_counter().load(Ordering::Relaxed) >= 4);
}

pub async fn fleets_are_isolated(backend: &dyn BusBackend) {
    let (fleet_a, fleet_b) = (unique_name("fleet"), unique_name("fleet"));
    let bus_a = backend.connect(&fleet_a).await;
    let bus_b = backend.connect(&fleet_b).await;
    let mut subscription_a = bus_a.subscribe().await.expect("subscribe");
    let mut subscription_b = bus_b.subscribe().await.expect("subscribe");
    // Fleet B goes first with the same group and higher versions: were the
    // fleets sharing a bus, A would see B's messages before its own, and B
    // A's after its own.
    let fleets = [
        (&bus_b, decision("orders", 9, 9), joined("orders", "b-1")),
        (&bus_a, decision("orders", 1, 1), joined("orders", "a-1")),
    ];
    for (bus, decision, signal) in &fleets {
        bus.publish(&decision.clone().into())
            .await
            .expect("publish");
        bus.publish(&signal.clone().into()).await.expect("publish");
    }

    for ((bus, decision, signal), subscription) in fleets
        .iter()
        .zip([&mut subscription_b, &mut subscription_a])
    {
        let seen = read_until(subscription, |seen| {
            !seen.decisions.is_empty() && !seen.signals.is_empty()
        })
        .await;
        assert_eq!(seen.decisions, vec![decision.clone()]);
        assert_eq!(seen.signals, vec![signal.clone()]);
        assert_eq!(
            bus.retained().await.expect("retained"),
            vec![decision.clone()]
        );
    }
    // A's messages have reached A's subscription; had the fleets shared a bus,
    // half a second more is ample for them to reach B's too.
    assert_quiet(&mut subscription_b, Duration::from_millis(500)).await;
}

pub async fn retained_gives_the_newest_complete_decision_per_group(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let bus = backend.connect(&fleet).await;
    assert_eq!(bus.retained().await.expect("retained"), vec![]);
    let newest = [
        decision("orders", 1, 3),
        decision("payments", 2, 1),
        large_decision("refunds", 3),
    ];
    for message in [
        decision("orders", 1, 1),
        newest[1].clone(),
        decision("orders", 1, 2),
        large_decision("refunds", 2),
        decision("payments", 1, 7),
        newest[2].clone(),
        newest[0].clone(),
    ] {
        bus.publish(&message.into()).await.expect("publish");
    }
    bus.publish(&released("orders", 1).into())
        .await
        .expect("publish");

    let retained = retained_on_another_node(backend, &fleet).await;
    let versions: Vec<(&str, (u64, u64))> = retained
        .iter()
        .map(|d| (d.group.as_str(), d.version()))
        .collect();
    assert_eq!(
        versions,
        vec![
            ("orders", (1, 3)),
            ("payments", (2, 1)),
            ("refunds", (1, 3))
        ]
    );
    // Whole decisions, not just their versions.
    assert_eq!(retained, newest.to_vec());
}

/// A well-formed decision far ahead of the fleet's epoch, from a publisher that
/// holds no lease, is stored like any other; the coordinator then moves its epoch
/// above it, and its next decision must supersede the stray one everywhere:
/// retained, and delivered to subscribers old and new.
pub async fn a_decision_above_a_stray_one_supersedes_it(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let bus = backend.connect(&fleet).await;
    let mut early = bus.subscribe().await.expect("subscribe");
    publish_all(&*bus, [decision("orders", 4, 2).into()]).await;
    let stray = Decision {
        coordinator: "stray".into(),
        ..decision("orders", 1004, 1)
    };
    publish_all(&*bus, [stray.into()]).await;
    let above = decision("orders", 1005, 1);
    publish_all(&*bus, [above.clone().into()]).await;
    assert_eq!(bus.retained().await.expect("retained"), vec![above.clone()]);
    assert_eq!(
        retained_on_another_node(backend, &fleet).await,
        vec![above.clone()]
    );
    reads_up_to(&mut early, &above).await;
    // A log-based bus may hand a late subscriber the older ones first, in order.
    a_late_subscriber_reaches(backend, &fleet, &above).await;
}

/// Reads `subscription` until `decision`'s version and checks it arrived whole.
pub async fn reads_up_to(subscription: &mut BusSubscription, decision: &Decision) {
    let version = Some(decision.version());
    let seen = read_until(subscription, |seen| seen.newest(&decision.group) == version).await;
    assert_eq!(seen.decisions.last(), Some(decision));
}

/// Checks that a node subscribing to `fleet`'s bus now reaches `decision`.
pub async fn a_late_subscriber_reaches(backend: &dyn BusBackend, fleet: &str, decision: &Decision) {
    let mut late = backend
        .connect(fleet)
        .await
        .subscribe()
        .await
        .expect("subscribe");
    reads_up_to(&mut late, decision).await;
}

/// `decision` with one source of its last subscriber moved to another, as
/// revision `revision`.
pub fn one_source_moved(decision: &Decision, revision: u64) -> Decision {
    let mut next = decision.clone();
    next.revision = revision;
    next.issued_at = Utc::now();
    let (last, _) = next.owners.last_key_value().expect("an owner");
    let last = last.clone();
    let moving = next
        .owners
        .get_mut(&last)
        .and_then(BTreeSet::pop_first)
        .expect("a source to move");
    next.owners
        .entry(format!("moved-{revision}"))
        .or_default()
        .insert(moving);
    next
}

/// Whether `payload` is a decision written as a change.
pub fn is_delta(payload: &[u8]) -> bool {
    matches!(
        weir::bus::decode_frame(payload),
        Ok(weir::bus::Frame::Delta(_))
    )
}

pub async fn changes_travel_as_deltas_and_late_subscribers_converge(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let coordinator = backend.connect(&fleet).await;
    let observer = backend.connect(&fleet).await;
    let mut early = observer.subscribe().await.expect("subscribe");
    let mut current = large_decision("orders", 1);
    publish_all(&*coordinator, [current.clone().into()]).await;
    read_until(&mut early, |seen| seen.newest("orders") == Some((1, 1))).await;
    for revision in 2..=4 {
        current = one_source_moved(&current, revision);
        publish_all(&*coordinator, [current.clone().into()]).await;
    }
    reads_up_to(&mut early, &current).await;
    a_late_subscriber_reaches(backend, &fleet, &current).await;
    assert_eq!(
        retained_on_another_node(backend, &fleet).await,
        vec![current]
    );
}

pub async fn a_subscriber_that_missed_changes_converges_through_a_digest(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let coordinator = backend.connect(&fleet).await;
    let observer = backend.connect(&fleet).await;
    let first = large_decision("orders", 1);
    publish_all(&*coordinator, [first.clone().into()]).await;
    // Loses the next two changes, as a subscriber cut off for a while would.
    let mut lost = 0;
    let mut lossy = observer
        .subscribe()
        .await
        .expect("subscribe")
        .with_loss(move |payload| {
            let lose = lost < 2 && is_delta(payload);
            lost += usize::from(lose);
            lose
        });
    read_until(&mut lossy, |seen| seen.newest("orders") == Some((1, 1))).await;
    let second = one_source_moved(&first, 2);
    let third = one_source_moved(&second, 3);
    publish_all(&*coordinator, [second.into(), third.clone().into()]).await;
    // The refresh names the decision it lacks.
    let digest = Digest::of(&third);
    publish_all(&*coordinator, [BusMessage::Digest(digest.clone())]).await;
    loop {
        match next(&mut lossy).await {
            BusMessage::Digest(seen) if seen == digest => break,
            BusMessage::Decision(d) => panic!("applied {:?} without its base", d.version()),
            _ => {}
        }
    }
    let fetched = observer.retained().await.expect("retained");
    assert_eq!(fetched, vec![third.clone()]);
    lossy.adopt(&third);
    // The next change applies to the fetched decision.
    let fourth = one_source_moved(&third, 4);
    publish_all(&*coordinator, [fourth.clone().into()]).await;
    let seen = read_until(&mut lossy, |seen| !seen.decisions.is_empty()).await;
    assert_eq!(seen.decisions, vec![fourth]);
}

/// The stall of a fleet whose leader came back for a second term: its first
/// decision of the new term was written as a change to the last decision it
/// published two terms earlier, which nobody held any more.
pub async fn a_new_term_starts_whole_whoever_published_between(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let first_leader = backend.connect(&fleet).await;
    let second_leader = backend.connect(&fleet).await;
    // Term 1 on the first node: a snapshot and a change.
    let mut first_term = large_decision("orders", 1);
    publish_all(&*first_leader, [first_term.clone().into()]).await;
    first_term = one_source_moved(&first_term, 2);
    publish_all(&*first_leader, [first_term.clone().into()]).await;
    // Term 2 on another node, with owners of its own.
    let mut second_term = Decision {
        epoch: 2,
        coordinator: "node-2".into(),
        ..large_decision("orders", 1)
    };
    second_term.owners = second_term
        .owners
        .into_iter()
        .map(|(subscriber, sources)| (format!("{subscriber}-b"), sources))
        .collect();
    publish_all(&*second_leader, [second_term.clone().into()]).await;
    let second_term = one_source_moved(&second_term, 2);
    publish_all(&*second_leader, [second_term.clone().into()]).await;
    // Term 3 on the first node again, a small change from what it published
    // in term 1: what it writes must not depend on that.
    let third_term = Decision {
        epoch: 3,
        ..one_source_moved(&first_term, 1)
    };
    publish_all(&*first_leader, [third_term.clone().into()]).await;
    a_late_subscriber_reaches(backend, &fleet, &third_term).await;
    assert_eq!(
        retained_on_another_node(backend, &fleet).await,
        vec![third_term]
    );
}

/// A reader that lost a change's base gets the decision once the coordinator
/// writes it whole, which a plain republish of a version the bus holds never
/// does.
pub async fn a_decision_written_whole_reaches_readers_that_lack_its_base(backend: &dyn BusBackend) {
    let fleet = unique_name("fleet");
    let coordinator = backend.connect(&fleet).await;
    let first = large_decision("orders", 1);
    let second = one_source_moved(&first, 2);
    publish_all(&*coordinator, [first.into(), second.clone().into()]).await;
    let mut lacking = backend
        .connect(&fleet)
        .await
        .subscribe()
        .await
        .expect("subscribe")
        .with_loss(|payload| {
            matches!(
                weir::bus::decode_frame(payload),
                Ok(weir::bus::Frame::Decision(part)) if part.decision.revision == 1
            )
        });
    loop {
        match next(&mut lacking).await {
            BusMessage::Digest(digest) if digest.version() == second.version() => break,
            BusMessage::Decision(d) => panic!("applied {:?} without its base", d.version()),
            _ => {}
        }
    }
    coordinator
        .publish_whole(&second)
        .await
        .expect("publish whole");
    reads_up_to(&mut lacking, &second).await;
    a_late_subscriber_reaches(backend, &fleet, &second).await;
    assert_eq!(
        retained_on_another_node(backend, &fleet).await,
        vec![second]
    );
}
