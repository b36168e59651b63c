//! [`NatsBus`] through the [`AllocationBus`] trait: what `tests/bus.rs` asks of
//! the in-memory bus, plus what only a network bus has to get right (split
//! decisions stored whole, namespaces, a server restart).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use weir::broker::allocation::Handover;
use weir::bus::{
    AllocationBus, BusMessage, BusSubscription, Decision, NatsBus, Signal, encode_decision_parts,
};
use weir::config::BusConfig;
use weir::event::{Cursor, Source};

use crate::common::unique_name;
use crate::server::PrivateServer;
use crate::{StreamCleanup, nats_config, nats_url, shared_client};

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
            [source("category:orders"), source("log")].into(),
        )]
        .into(),
        handovers: [(
            source(&format!("stream:orders/r-{revision}")),
            Handover {
                from: format!("{group}-1"),
                to: format!("{group}-2"),
            },
        )]
        .into(),
    }
}

/// A decision that `max_payload` splits into exactly `parts` payloads.
fn decision_in_parts(
    group: &str,
    epoch: u64,
    revision: u64,
    parts: usize,
    max_payload: usize,
) -> Decision {
    let mut d = decision(group, epoch, revision);
    for n in 0.. {
        let owned: BTreeSet<Source> = (0..n * 10)
            .map(|i| source(&format!("stream:orders/order-{revision}-{i:05}")))
            .collect();
        d.owners.insert(format!("{group}-2"), owned);
        let count = encode_decision_parts(&d, max_payload).len();
        if count == parts {
            return d;
        }
        assert!(count < parts, "no size gives exactly {parts} parts");
    }
    unreachable!()
}

fn released(group: &str) -> Signal {
    Signal::Released {
        group: group.into(),
        subscriber: format!("{group}-1"),
        source: source("log"),
        cursor: Some(Cursor::new(7, 1)),
    }
}

fn bus_config(namespace: &str) -> BusConfig {
    BusConfig {
        namespace: namespace.into(),
        ..BusConfig::default()
    }
}

/// A bus on the shared server in a namespace of its own, whose streams go with it.
struct TestBus {
    bus: NatsBus,
    _cleanup: StreamCleanup,
}

impl std::ops::Deref for TestBus {
    type Target = NatsBus;
    fn deref(&self) -> &NatsBus {
        &self.bus
    }
}

async fn shared_bus_in(namespace: &str) -> Option<TestBus> {
    let client = shared_client().await?;
    // Named before the bus exists, so that a half set up bus is cleaned up too.
    let upper = namespace.to_uppercase();
    let cleanup = StreamCleanup {
        url: nats_url(),
        streams: vec![format!("{upper}_DECISIONS"), format!("{upper}_SIGNALS")],
    };
    let bus = NatsBus::from_client(client, &bus_config(namespace))
        .await
        .expect("the bus sets up its streams");
    assert_eq!(bus.stream_names().to_vec(), cleanup.streams);
    Some(TestBus {
        bus,
        _cleanup: cleanup,
    })
}

async fn shared_bus() -> Option<TestBus> {
    shared_bus_in(&unique_name("weir_test")).await
}

async fn next_within(subscription: &mut BusSubscription, wait: Duration) -> BusMessage {
    tokio::time::timeout(wait, subscription.next())
        .await
        .expect("a message in time")
        .expect("the bus is still open")
}

async fn next(subscription: &mut BusSubscription) -> BusMessage {
    next_within(subscription, Duration::from_secs(10)).await
}

/// Reads until nothing arrives for a moment; returns the newest decision seen
/// per group and every signal.
async fn drain(subscription: &mut BusSubscription) -> (BTreeMap<String, Decision>, Vec<Signal>) {
    let mut decisions: BTreeMap<String, Decision> = BTreeMap::new();
    let mut signals = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), subscription.next()).await
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

fn by_group(decisions: Vec<Decision>) -> BTreeMap<String, Decision> {
    decisions
        .into_iter()
        .map(|d| (d.group.clone(), d))
        .collect()
}

#[tokio::test]
async fn a_late_subscriber_gets_the_newest_decision_of_every_group() {
    let Some(bus) = shared_bus().await else {
        return;
    };
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
async fn retained_returns_the_newest_decision_of_every_group() {
    let Some(bus) = shared_bus().await else {
        return;
    };
    assert_eq!(bus.retained().await.expect("retained"), vec![]);
    let newest = [decision("orders", 2, 0), decision("payments", 1, 7)];
    for d in [decision("orders", 1, 5), decision("payments", 1, 6)]
        .iter()
        .chain(&newest)
    {
        bus.publish(&d.clone().into()).await.expect("publish");
    }
    bus.publish(&released("orders").into())
        .await
        .expect("publish");
    assert_eq!(
        by_group(bus.retained().await.expect("retained")),
        by_group(newest.to_vec())
    );
}

#[tokio::test]
async fn a_stale_decision_does_not_replace_a_newer_stored_one() {
    let Some(bus) = shared_bus().await else {
        return;
    };
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

    let mut late = bus.subscribe().await.expect("subscribe");
    let (decisions, _) = drain(&mut late).await;
    assert_eq!(decisions["orders"], current);

    assert_eq!(
        next(&mut early).await,
        BusMessage::Decision(current.clone())
    );
    let (decisions, _) = drain(&mut early).await;
    assert!(decisions.is_empty(), "delivered {decisions:?}");
}

#[tokio::test]
async fn signals_reach_subscribers_of_the_moment_only() {
    let Some(bus) = shared_bus().await else {
        return;
    };
    let before = Signal::Joined {
        group: "orders".into(),
        subscriber: "orders-0".into(),
        node: "node-0".into(),
    };
    bus.publish(&before.into()).await.expect("publish");
    let mut subscription = bus.subscribe().await.expect("subscribe");
    let signals = [
        Signal::Joined {
            group: "orders".into(),
            subscriber: "orders-3".into(),
            node: "node-c".into(),
        },
        released("payments"),
        Signal::Leaving {
            group: "orders".into(),
            subscriber: "orders-3".into(),
            node: "node-c".into(),
        },
    ];
    for signal in &signals {
        bus.publish(&signal.clone().into()).await.expect("publish");
    }
    for signal in signals {
        assert_eq!(next(&mut subscription).await, BusMessage::Signal(signal));
    }
    let (decisions, rest) = drain(&mut subscription).await;
    assert!(
        decisions.is_empty() && rest.is_empty(),
        "{decisions:?} {rest:?}"
    );
}

#[tokio::test]
async fn invalid_payloads_are_counted_and_the_subscription_keeps_delivering() {
    let Some(bus) = shared_bus().await else {
        return;
    };
    let namespace = bus.stream_names()[0]
        .trim_end_matches("_DECISIONS")
        .to_lowercase();
    let mut subscription = bus.subscribe().await.expect("subscribe");
    let jetstream = async_nats::jetstream::new(shared_client().await.expect("connected before"));
    for (subject, payload) in [
        ("signals.orders", &b"\x00\xffnot json at all"[..]),
        (
            "decisions.junk.2.0.1.1",
            br#"{"v":2,"kind":"decision","group":"orders","shiny":true}"#,
        ),
        (
            "signals.orders",
            br#"{"v":1,"kind":"decision","group":"orders"}"#,
        ),
    ] {
        jetstream
            .publish(format!("{namespace}.{subject}"), payload.to_vec().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let d = decision("orders", 1, 1);
    bus.publish(&d.clone().into()).await.expect("publish");
    let signal = released("orders");
    bus.publish(&signal.clone().into()).await.expect("publish");

    let mut received = vec![next(&mut subscription).await, next(&mut subscription).await];
    received.sort_by_key(|m| matches!(m, BusMessage::Signal(_)));
    assert_eq!(
        received,
        vec![BusMessage::Decision(d), BusMessage::Signal(signal)]
    );
    assert_eq!(subscription.invalid_messages(), 3);
    assert_eq!(bus.invalid_messages(), 3);
}

#[tokio::test]
async fn namespaces_keep_fleets_apart() {
    let Some(a) = shared_bus().await else { return };
    let Some(b) = shared_bus().await else { return };
    let mut on_a = a.subscribe().await.expect("subscribe");
    let mut on_b = b.subscribe().await.expect("subscribe");
    let for_a = decision("orders", 1, 1);
    let for_b = decision("orders", 7, 7);
    a.publish(&for_a.clone().into()).await.expect("publish");
    a.publish(&released("orders").into())
        .await
        .expect("publish");
    b.publish(&for_b.clone().into()).await.expect("publish");

    let (decisions, signals) = drain(&mut on_a).await;
    assert_eq!(decisions, by_group(vec![for_a.clone()]));
    assert_eq!(signals, vec![released("orders")]);
    let (decisions, signals) = drain(&mut on_b).await;
    assert_eq!(decisions, by_group(vec![for_b.clone()]));
    assert!(signals.is_empty());
    assert_eq!(a.retained().await.expect("retained"), vec![for_a]);
    assert_eq!(b.retained().await.expect("retained"), vec![for_b]);
}

#[tokio::test]
async fn a_namespace_differing_only_in_case_is_refused_not_merged() {
    let namespace = unique_name("weir_test");
    let Some(_lower) = shared_bus_in(&namespace).await else {
        return;
    };
    let client = shared_client().await.expect("connected before");
    let error = NatsBus::from_client(client, &bus_config(&namespace.to_uppercase()))
        .await
        .expect_err("the streams belong to the other namespace");
    let message = error.to_string();
    assert!(message.contains("bus.namespace"), "{message}");
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn group_names_with_separators_and_wildcards_work() {
    let Some(bus) = shared_bus().await else {
        return;
    };
    let groups = [
        "a.b",
        "*",
        ">",
        "with space",
        "a/b%c",
        "é.*.>",
        "a",
        "a.b.c",
    ];
    for (revision, group) in (1..).zip(groups) {
        bus.publish(&decision(group, 1, revision).into())
            .await
            .expect("publish");
    }
    let mut subscription = bus.subscribe().await.expect("subscribe");
    let (decisions, _) = drain(&mut subscription).await;
    let expected: BTreeMap<String, Decision> = by_group(
        (1..)
            .zip(groups)
            .map(|(revision, group)| decision(group, 1, revision))
            .collect(),
    );
    assert_eq!(
        decisions.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (group, d) in &decisions {
        assert_eq!(d.version(), expected[group].version(), "{group}");
    }
    assert_eq!(bus.retained().await.expect("retained").len(), groups.len());
    bus.publish(&released("a.b").into()).await.expect("publish");
    assert_eq!(
        next(&mut subscription).await,
        BusMessage::Signal(released("a.b"))
    );
}

#[tokio::test]
async fn the_bus_is_usable_as_a_trait_object() {
    let Some(bus) = shared_bus().await else {
        return;
    };
    let bus: Arc<dyn AllocationBus> = Arc::new(NatsBus::clone(&bus));
    let mut subscription = bus.subscribe().await.expect("subscribe");
    let signal = Signal::Joined {
        group: "orders".into(),
        subscriber: "orders-9".into(),
        node: "node-9".into(),
    };
    bus.publish(&signal.clone().into()).await.expect("publish");
    assert_eq!(next(&mut subscription).await, BusMessage::Signal(signal));
}

#[tokio::test]
async fn streams_deleted_under_a_running_bus_are_made_again() {
    let Some(bus) = shared_bus().await else {
        return;
    };
    let mut subscription = bus.subscribe().await.expect("subscribe");
    let jetstream = async_nats::jetstream::new(shared_client().await.expect("connected before"));
    for stream in bus.stream_names() {
        jetstream.delete_stream(stream).await.expect("delete");
    }
    let d = decision("orders", 1, 1);
    bus.publish(&d.clone().into())
        .await
        .expect("publish makes the streams again");
    assert_eq!(bus.retained().await.expect("retained"), vec![d.clone()]);
    assert_eq!(
        next_within(&mut subscription, Duration::from_secs(30)).await,
        BusMessage::Decision(d)
    );
}

/// A private server whose payload limit is small enough to split decisions.
fn small_payload_server(max_payload: usize) -> Option<PrivateServer> {
    PrivateServer::start_with(|dir| {
        let config = dir.join("server.conf");
        std::fs::write(&config, format!("max_payload: {max_payload}\n")).expect("write config");
        vec!["-c".into(), config.to_string_lossy().into_owned()]
    })
}

#[tokio::test]
async fn split_decisions_are_stored_and_delivered_whole_even_when_the_next_has_fewer_parts() {
    const MAX_PAYLOAD: usize = 4096;
    let Some(server) = small_payload_server(MAX_PAYLOAD) else {
        return;
    };
    let bus = NatsBus::connect(&nats_config(&server.url()), &bus_config("split"))
        .await
        .expect("connect");
    let mut early = bus.subscribe().await.expect("subscribe");
    let three = decision_in_parts("orders", 1, 1, 3, MAX_PAYLOAD);
    let two = decision_in_parts("orders", 1, 2, 2, MAX_PAYLOAD);
    let other = decision_in_parts("payments", 1, 1, 3, MAX_PAYLOAD);
    bus.publish(&three.clone().into()).await.expect("publish");
    assert_eq!(next(&mut early).await, BusMessage::Decision(three));
    for d in [&other, &two] {
        bus.publish(&d.clone().into()).await.expect("publish");
    }
    // Comparing whole decisions shows that no part went missing or stayed behind.
    let newest = by_group(vec![two, other]);
    assert_eq!(drain(&mut early).await.0, newest);
    assert_eq!(by_group(bus.retained().await.expect("retained")), newest);
    let mut late = bus.subscribe().await.expect("subscribe");
    assert_eq!(drain(&mut late).await.0, newest);
    assert_eq!(late.invalid_messages(), 0);
}

#[tokio::test]
async fn a_decision_too_large_for_the_server_is_refused_as_too_large() {
    const MAX_PAYLOAD: usize = 4096;
    let Some(server) = small_payload_server(MAX_PAYLOAD) else {
        return;
    };
    let bus = NatsBus::connect(&nats_config(&server.url()), &bus_config("large"))
        .await
        .expect("connect");
    let signal = Signal::Joined {
        group: "g".repeat(MAX_PAYLOAD),
        subscriber: "s".into(),
        node: "n".into(),
    };
    let error = bus.publish(&signal.into()).await.expect_err("too large");
    assert!(
        matches!(
            error,
            weir::bus::Error::TooLarge {
                limit: MAX_PAYLOAD,
                ..
            }
        ),
        "{error}"
    );
}

/// Publishes until the bus takes it, for after a restart.
async fn publish_eventually(bus: &NatsBus, message: BusMessage) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match bus.publish(&message).await {
            Ok(()) => return,
            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                eprintln!("publishing after the restart: {error}; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("publishing after the restart failed: {error}"),
        }
    }
}

#[tokio::test]
async fn a_subscription_survives_a_server_restart() {
    let Some(mut server) = PrivateServer::start(&[]) else {
        return;
    };
    let bus = NatsBus::connect(&nats_config(&server.url()), &bus_config("restart"))
        .await
        .expect("connect");
    let mut subscription = bus.subscribe().await.expect("subscribe");
    let first = decision("orders", 1, 1);
    bus.publish(&first.clone().into()).await.expect("publish");
    assert_eq!(
        next(&mut subscription).await,
        BusMessage::Decision(first.clone())
    );

    server.restart();
    let second = decision("payments", 1, 1);
    publish_eventually(&bus, second.clone().into()).await;
    let third = decision("orders", 1, 2);
    publish_eventually(&bus, third.clone().into()).await;

    let started = Instant::now();
    assert_eq!(
        next_within(&mut subscription, Duration::from_secs(30)).await,
        BusMessage::Decision(second.clone())
    );
    assert_eq!(
        next(&mut subscription).await,
        BusMessage::Decision(third.clone())
    );
    eprintln!(
        "the subscription caught up {:?} after the restart",
        started.elapsed()
    );
    assert_eq!(
        by_group(bus.retained().await.expect("retained")),
        by_group(vec![third, second])
    );
}
