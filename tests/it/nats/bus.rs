//! [`NatsBus`] through the [`AllocationBus`] trait: the shared bus suite that
//! every backend runs, plus what only a JetStream bus has to get right (subject
//! tokens, namespaces that differ in case, deleted streams, split decisions on a
//! server with a small payload limit, a server restart, more replicas than the
//! server keeps).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use weir::bus::{
    AllocationBus, BusMessage, BusSubscription, Decision, NatsBus, Signal, encode_decision_parts,
};
use weir::config::BusConfig;
use weir::connect::nats_client::subject_token;
use weir::event::Source;

use super::{StreamCleanup, nats_config, nats_url, shared_client};
use crate::common::bus_suite::{
    self, BusBackend, assert_quiet, by_group, decision, drain_until, next, reached, source,
};
use crate::common::services::PrivateNats;
use crate::common::unique_name;

mod suite {
    crate::bus_suite!(super::NatsBackend::start());
}

/// Fleets as namespaces on the shared server, each connect a client of its
/// own; the streams of every namespace it made go when the backend does.
struct NatsBackend {
    cleanups: Mutex<Vec<StreamCleanup>>,
}

impl NatsBackend {
    /// `None` (after noting the skip, or failing under
    /// `WEIR_REQUIRE_SERVICES=1`) when the shared server is unreachable.
    async fn start() -> Option<Self> {
        shared_client().await?;
        Some(Self {
            cleanups: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl BusBackend for NatsBackend {
    async fn connect(&self, fleet: &str) -> Arc<dyn AllocationBus> {
        let bus = shared_bus_in(fleet)
            .await
            .expect("the server answered when the backend started");
        self.cleanups
            .lock()
            .expect("not poisoned")
            .push(bus._cleanup);
        Arc::new(bus.bus)
    }

    /// Onto the group's signal subject: the signals stream keeps every message,
    /// whereas one on a decision subject would stand for a decision version.
    async fn publish_raw(&self, fleet: &str, group: &str, bytes: &[u8]) {
        let client = shared_client().await.expect("connected before");
        async_nats::jetstream::new(client)
            .publish(
                format!("{fleet}.signals.{}", subject_token(group)),
                bytes.to_vec().into(),
            )
            .await
            .expect("publish")
            .await
            .expect("stored");
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
    bus_suite::released(group, 1)
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

#[tokio::test]
async fn an_invalid_payload_on_a_decision_subject_is_counted_and_skipped() {
    // The suite's raw payloads travel as signals; a decision subject's payload
    // goes through the decisions stream and its reassembly instead.
    let Some(bus) = shared_bus().await else {
        return;
    };
    let namespace = bus.stream_names()[0]
        .trim_end_matches("_DECISIONS")
        .to_lowercase();
    let mut subscription = bus.subscribe().await.expect("subscribe");
    let jetstream = async_nats::jetstream::new(shared_client().await.expect("connected before"));
    jetstream
        .publish(
            format!("{namespace}.decisions.junk.2.0.1.1"),
            br#"{"v":2,"kind":"decision","group":"orders","shiny":true}"#
                .to_vec()
                .into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    let d = decision("orders", 1, 1);
    bus.publish(&d.clone().into()).await.expect("publish");
    assert_eq!(next(&mut subscription).await, BusMessage::Decision(d));
    // The junk went into the stream before the decision, so it has been read
    // by now; half a second more is ample for anything made of it to arrive.
    assert_quiet(&mut subscription, Duration::from_millis(500)).await;
    assert_eq!(subscription.invalid_messages(), 1);
    assert_eq!(bus.invalid_messages(), 1);
}

#[tokio::test]
async fn unreadable_bytes_under_a_newer_version_never_block_publishing() {
    let Some(bus) = shared_bus().await else {
        return;
    };
    let namespace = bus.stream_names()[0]
        .trim_end_matches("_DECISIONS")
        .to_lowercase();
    let jetstream = async_nats::jetstream::new(shared_client().await.expect("connected before"));
    // Any bytes on a subject naming epoch 1005 of the group.
    jetstream
        .publish(
            format!("{namespace}.decisions.orders.1005.1.1.1"),
            b"not a decision".to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    let current = decision("orders", 5, 1);
    bus.publish(&current.clone().into())
        .await
        .expect("the unreadable version does not stop the publish");
    assert_eq!(
        bus.retained().await.expect("retained"),
        vec![current.clone()]
    );
    assert!(bus.invalid_messages() >= 1, "counted");
    // Removed: the next decision is not held up either.
    let next_one = decision("orders", 5, 2);
    bus.publish(&next_one.clone().into())
        .await
        .expect("publish");
    assert_eq!(bus.retained().await.expect("retained"), vec![next_one]);

    // A readable newer decision stays: the coordinator sees it and moves its
    // epoch above it (the shared suite shows the publish above it winning).
    let newer = decision("orders", 1004, 1);
    bus.publish(&newer.clone().into()).await.expect("publish");
    bus.publish(&decision("orders", 5, 3).into())
        .await
        .expect("a stale publish changes nothing, as on every bus");
    assert_eq!(bus.retained().await.expect("retained"), vec![newer]);
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
async fn more_replicas_than_the_server_can_keep_are_refused_with_the_reason() {
    let Some(client) = shared_client().await else {
        return;
    };
    let namespace = unique_name("weir_test");
    let upper = namespace.to_uppercase();
    let _cleanup = StreamCleanup {
        url: nats_url(),
        streams: vec![format!("{upper}_DECISIONS"), format!("{upper}_SIGNALS")],
    };
    // The shared server is not clustered: it keeps one copy of a stream.
    let error = NatsBus::from_client_replicated(client, &bus_config(&namespace), 3)
        .await
        .expect_err("a single server cannot keep three copies");
    let message = error.to_string();
    assert!(message.contains("nats.replicas = 3"), "{message}");
    assert!(!error.is_retryable(), "{message}");
}

/// A decision of `group`, whose sources do not mention the group: not every
/// group name makes a valid category.
fn odd_group_decision(group: &str, revision: u64) -> Decision {
    Decision {
        group: group.into(),
        ..decision("orders", 1, revision)
    }
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
        bus.publish(&odd_group_decision(group, revision).into())
            .await
            .expect("publish");
    }
    let mut subscription = bus.subscribe().await.expect("subscribe");
    let expected: BTreeMap<String, Decision> = by_group(
        (1..)
            .zip(groups)
            .map(|(revision, group)| odd_group_decision(group, revision))
            .collect(),
    );
    let (decisions, _) = drain_until(&mut subscription, reached(&expected)).await;
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
fn small_payload_server(max_payload: usize) -> Option<PrivateNats> {
    PrivateNats::start_with(|dir| {
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
    assert_eq!(drain_until(&mut early, reached(&newest)).await.0, newest);
    assert_eq!(by_group(bus.retained().await.expect("retained")), newest);
    let mut late = bus.subscribe().await.expect("subscribe");
    assert_eq!(drain_until(&mut late, reached(&newest)).await.0, newest);
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
async fn the_bus_check_fails_while_the_server_is_down_and_passes_again_after() {
    let Some(mut server) = PrivateNats::start() else {
        return;
    };
    let bus = NatsBus::connect(&nats_config(&server.url()), &bus_config("check"))
        .await
        .expect("connect");
    bus.check().await.expect("reachable");
    server.server.kill();
    // The client notices the lost connection by itself; the check then fails
    // (it is polled, so waiting for that is what readiness does too).
    let started = Instant::now();
    let error = loop {
        match bus.check().await {
            Err(error) => break error,
            Ok(()) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(()) => panic!("the check still passes with the server down"),
        }
    };
    assert!(error.is_retryable(), "{error}");
    assert!(error.to_string().contains("NATS"), "{error}");
    server
        .server
        .start()
        .expect("the private nats-server starts again");
    let started = Instant::now();
    while bus.check().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never reachable again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_subscription_survives_a_server_restart() {
    let Some(mut server) = PrivateNats::start() else {
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

    server.server.kill();
    server
        .server
        .start()
        .expect("the private nats-server starts again");
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
