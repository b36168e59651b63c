//! Integration tests of the allocation bus through its public API, on [`MemoryBus`]:
//! the shared bus suite, which every backend runs, and what only the in-memory
//! bus has to get right (lagging subscribers, publishers that never wait).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use weir::bus::{AllocationBus, BusMessage, MemoryBus};
use weir::event::Source;

use crate::common::bus_suite::{decision, drain_until, next, reached, released, source};

mod suite {
    crate::bus_suite!(crate::common::bus_suite::MemoryBackend::start());
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
            bus.publish(&released(group, 1).into())
                .await
                .expect("publish");
            newest.insert(group.to_owned(), d);
        }
    }
    let (decisions, mut signals) = drain_until(&mut slow, reached(&newest)).await;
    assert_eq!(decisions, newest);

    // Still live after falling behind: after the last signals still on their
    // way, the next decision arrives.
    let later = decision("orders", 2, 0);
    bus.publish(&later.clone().into()).await.expect("publish");
    let after = loop {
        match next(&mut slow).await {
            BusMessage::Signal(signal) => signals.push(signal),
            BusMessage::Digest(_) => {}
            message => break message,
        }
    };
    assert_eq!(after, BusMessage::Decision(later));
    // It did fall behind: most signals are gone for good.
    assert!(signals.len() < 60, "{} signals arrived", signals.len());
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
async fn the_bus_keeps_its_own_count_of_invalid_payloads() {
    // The suite counts through subscriptions; the memory bus also answers for
    // itself, and keeps the newest decision per group for inspection.
    let bus = MemoryBus::new();
    let mut subscription = bus.subscribe().await.expect("subscribe");
    bus.publish_raw(b"{".to_vec());
    let d = decision("orders", 1, 1);
    bus.publish(&d.clone().into()).await.expect("publish");
    assert_eq!(
        next(&mut subscription).await,
        BusMessage::Decision(d.clone())
    );
    assert_eq!(bus.invalid_messages(), 1);
    assert_eq!(bus.retained_decision("orders"), Some(d));
}
