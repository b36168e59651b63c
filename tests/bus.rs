//! Integration tests of the allocation bus through its public API, on [`MemoryBus`]:
//! retention for late subscribers, stale decisions, invalid payloads and lagging
//! subscribers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use weir::broker::allocation::Handover;
use weir::bus::{AllocationBus, BusMessage, BusSubscription, Decision, MemoryBus, Signal};
use weir::event::{Cursor, Source};

fn source(text: &str) -> Source {
    text.parse().expect("test sources are valid")
}

fn decision(group: &str, epoch: u64, revision: u64) -> Decision {
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
    }
}

fn released(group: &str) -> Signal {
    Signal::Released {
        group: group.into(),
        subscriber: format!("{group}-1"),
        source: source("log"),
        cursor: Some(Cursor::new(7, 1)),
    }
}

async fn next(subscription: &mut BusSubscription) -> BusMessage {
    tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("a message within 5 s")
        .expect("the bus is still open")
}

/// Reads until nothing arrives for a moment; returns the newest decision seen
/// per group and every signal.
async fn drain(subscription: &mut BusSubscription) -> (BTreeMap<String, Decision>, Vec<Signal>) {
    let mut decisions: BTreeMap<String, Decision> = BTreeMap::new();
    let mut signals = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(200), subscription.next()).await
    {
        match message {
            BusMessage::Decision(d) => {
                if let Some(seen) = decisions.get(&d.group) {
                    assert!(d.is_newer_than(seen), "went back from {seen:?} to {d:?}");
                }
                decisions.insert(d.group.clone(), d);
            }
            BusMessage::Signal(s) => signals.push(s),
        }
    }
    (decisions, signals)
}

#[tokio::test]
async fn a_late_subscriber_gets_the_newest_decision_of_every_group() {
    let bus = MemoryBus::new();
    for (group, epoch, revision) in [
        ("orders", 1, 1),
        ("orders", 1, 2),
        ("payments", 3, 9),
        ("orders", 2, 0),
        ("payments", 3, 10),
    ] {
        bus.publish(&decision(group, epoch, revision).into())
            .await
            .expect("publish");
    }
    bus.publish(&released("orders").into())
        .await
        .expect("publish");

    let mut late = bus.subscribe().await.expect("subscribe");
    let (decisions, signals) = drain(&mut late).await;
    assert_eq!(decisions.len(), 2);
    assert_eq!(decisions["orders"].version(), (2, 0));
    assert_eq!(decisions["payments"].version(), (3, 10));
    assert!(signals.is_empty(), "signals are not retained: {signals:?}");

    // Live messages follow the retained ones.
    let newer = decision("orders", 2, 1);
    bus.publish(&newer.clone().into()).await.expect("publish");
    bus.publish(&released("orders").into())
        .await
        .expect("publish");
    assert_eq!(next(&mut late).await, BusMessage::Decision(newer));
    assert_eq!(
        next(&mut late).await,
        BusMessage::Signal(released("orders"))
    );
}

#[tokio::test]
async fn a_stale_decision_does_not_replace_a_newer_retained_one() {
    let bus = MemoryBus::new();
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
    assert_eq!(bus.retained_decision("orders"), Some(current.clone()));

    let mut late = bus.subscribe().await.expect("subscribe");
    let (decisions, _) = drain(&mut late).await;
    assert_eq!(decisions["orders"], current);

    // A subscriber that saw the newer one never delivers the stale one.
    assert_eq!(
        next(&mut early).await,
        BusMessage::Decision(current.clone())
    );
    let (decisions, _) = drain(&mut early).await;
    assert!(decisions.is_empty(), "delivered {decisions:?}");
}

#[tokio::test]
async fn invalid_payloads_are_counted_and_the_subscription_keeps_delivering() {
    let bus = MemoryBus::new();
    let mut subscription = bus.subscribe().await.expect("subscribe");
    bus.publish_raw(b"\x00\xffnot json at all".to_vec());
    bus.publish_raw(br#"{"v":2,"kind":"decision","group":"orders","shiny":true}"#.to_vec());
    bus.publish_raw(br#"{"v":1,"kind":"decision","group":"orders"}"#.to_vec());
    let d = decision("orders", 1, 1);
    bus.publish(&d.clone().into()).await.expect("publish");
    bus.publish_raw(b"{".to_vec());
    bus.publish(&released("orders").into())
        .await
        .expect("publish");

    assert_eq!(next(&mut subscription).await, BusMessage::Decision(d));
    assert_eq!(subscription.invalid_messages(), 3);
    assert_eq!(
        next(&mut subscription).await,
        BusMessage::Signal(released("orders"))
    );
    assert_eq!(subscription.invalid_messages(), 4);
    assert_eq!(bus.invalid_messages(), 4);
}

#[tokio::test]
async fn a_lagging_subscriber_converges_to_the_newest_decision_per_group() {
    // Room for two payloads only, and decisions big enough to need several parts
    // each: the subscriber falls behind within a single decision.
    let bus = MemoryBus::with_options(2, 600);
    let mut slow = bus.subscribe().await.expect("subscribe");
    let mut newest = BTreeMap::new();
    for revision in 1..=20u64 {
        for group in ["orders", "payments", "refunds"] {
            let mut d = decision(group, 1, revision);
            let owned: BTreeSet<Source> = (0..20)
                .map(|i| source(&format!("stream:{group}/s-{revision}-{i}")))
                .collect();
            d.owners.insert(format!("{group}-3"), owned);
            bus.publish(&d.clone().into()).await.expect("publish");
            bus.publish(&released(group).into()).await.expect("publish");
            newest.insert(group.to_owned(), d);
        }
    }
    let (decisions, signals) = drain(&mut slow).await;
    assert_eq!(decisions, newest);
    // It did fall behind: most signals are gone for good.
    assert!(signals.len() < 60, "{} signals arrived", signals.len());

    // Still live after falling behind.
    let later = decision("orders", 2, 0);
    bus.publish(&later.clone().into()).await.expect("publish");
    assert_eq!(next(&mut slow).await, BusMessage::Decision(later));
}

#[tokio::test]
async fn publishers_are_never_held_up_by_a_subscriber_that_does_not_read() {
    let bus = Arc::new(MemoryBus::with_options(4, 1 << 20));
    let _idle = bus.subscribe().await.expect("subscribe");
    let publishing = async {
        for revision in 0..1_000 {
            bus.publish(&decision("orders", 1, revision).into())
                .await
                .expect("publish");
        }
    };
    tokio::time::timeout(Duration::from_secs(10), publishing)
        .await
        .expect("publishing finishes although nobody reads");
    assert_eq!(
        bus.retained_decision("orders").map(|d| d.version()),
        Some((1, 999))
    );
}

#[tokio::test]
async fn the_bus_is_usable_as_a_trait_object() {
    let bus: Arc<dyn AllocationBus> = Arc::new(MemoryBus::new());
    let mut subscription = bus.subscribe().await.expect("subscribe");
    let signal = Signal::Joined {
        group: "orders".into(),
        subscriber: "orders-9".into(),
        node: "node-9".into(),
    };
    bus.publish(&signal.clone().into()).await.expect("publish");
    assert_eq!(next(&mut subscription).await, BusMessage::Signal(signal));
}
