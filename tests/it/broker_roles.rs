//! Roles and the broker lifecycle: each role runs exactly its halves, registration
//! is refused where it must be, status follows the role, and the singleton broker
//! gives every subscriber everything it requests.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common;
use crate::common::fleet::{Fleet, Ledger, RecordingSubscriber, Services};
use weir::broker::{
    Broker, BrokerError, BrokerRole, BrokerStatus, SingletonBroker, Subscriber, SubscriberSpec,
};
use weir::event::Source;

const WAIT: Duration = Duration::from_secs(10);

fn spec(group: &str, id: &str, sources: &[&str]) -> SubscriberSpec {
    SubscriberSpec::new(
        group,
        id,
        sources.iter().map(|s| s.parse::<Source>().unwrap()),
    )
}

fn subscriber(ledger: &Arc<Ledger>, group: &str, id: &str) -> Arc<dyn Subscriber> {
    Arc::new(RecordingSubscriber::new(group, id, Arc::clone(ledger)))
}

/// Waits until `broker` reports `wanted`, failing after [`WAIT`].
async fn wait_for_status(broker: &dyn Broker, wanted: BrokerStatus) {
    let started = tokio::time::Instant::now();
    while broker.status() != wanted {
        assert!(
            started.elapsed() < WAIT,
            "status stayed {} instead of {wanted}",
            broker.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_coordinator_only_node_refuses_subscribers_and_the_others_accept_them() {
    let fleet = Fleet::new(Services::memory(), 0, 0);
    let ledger = Arc::clone(&fleet.ledger);
    for role in [
        BrokerRole::Coordinator,
        BrokerRole::Observer,
        BrokerRole::Full,
    ] {
        let broker = fleet.build_broker(&format!("node-{role}"), role);
        let outcome = broker.register(spec("g", "g-1", &["log"]), subscriber(&ledger, "g", "g-1"));
        match role {
            BrokerRole::Coordinator => {
                let error = outcome.expect_err("a coordinator runs no subscribers");
                assert!(
                    matches!(error, BrokerError::CoordinatorOnly { .. }),
                    "{error}"
                );
                assert!(error.to_string().contains("coordinator"), "{error}");
            }
            _ => outcome.unwrap(),
        }
    }
}

#[tokio::test]
async fn registration_is_refused_after_start_for_duplicates_and_for_bad_names() {
    let fleet = Fleet::new(Services::memory(), 0, 0);
    let ledger = Arc::clone(&fleet.ledger);
    let broker = fleet.build_broker("node-a", BrokerRole::Full);
    broker
        .register(spec("g", "g-1", &["log"]), subscriber(&ledger, "g", "g-1"))
        .unwrap();
    let duplicate = broker.register(spec("g", "g-1", &["log"]), subscriber(&ledger, "g", "g-1"));
    assert!(matches!(duplicate, Err(BrokerError::Duplicate { .. })));
    let unnamed = broker.register(spec("", "g-2", &["log"]), subscriber(&ledger, "", "g-2"));
    assert!(matches!(unnamed, Err(BrokerError::Invalid { .. })));
    assert_eq!(broker.status(), BrokerStatus::Starting);

    broker.start().await.unwrap();
    let late = broker.register(spec("g", "g-3", &["log"]), subscriber(&ledger, "g", "g-3"));
    assert!(matches!(late, Err(BrokerError::AlreadyStarted)));
    assert!(matches!(
        broker.start().await,
        Err(BrokerError::AlreadyStarted)
    ));
    broker.stop().await;
    assert_eq!(broker.status(), BrokerStatus::Stopped);
    assert!(matches!(broker.start().await, Err(BrokerError::Stopped)));
}

#[tokio::test]
async fn each_role_runs_exactly_its_halves() {
    let mut fleet = Fleet::new(Services::memory(), 1, 4);
    let observer = fleet.start_node(BrokerRole::Observer).await;
    // No coordinator yet: the observer registers but nobody decides.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(fleet.leader().await.is_none(), "an observer took the lease");
    assert!(fleet.services.bus.retained_decision("group-00").is_none());
    let live = fleet.services.membership.live_all(WAIT).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].node_id(), observer);

    let coordinator = fleet.start_node(BrokerRole::Coordinator).await;
    fleet.settle(WAIT).await;
    assert_eq!(fleet.leader().await.unwrap().holder, coordinator);
    let live = fleet.services.membership.live_all(WAIT).await.unwrap();
    assert!(live.iter().all(|m| m.node_id() == observer), "{live:?}");
    assert_eq!(
        fleet.nodes[&observer]
            .leases
            .acquire_attempts
            .load(Ordering::SeqCst),
        0
    );
    assert!(
        fleet.nodes[&coordinator]
            .leases
            .acquire_attempts
            .load(Ordering::SeqCst)
            > 0
    );

    // A full node does both: it registers its subscriber and stands by to lead.
    let full = fleet.start_node(BrokerRole::Full).await;
    fleet.settle(WAIT).await;
    let live = fleet.services.membership.live_all(WAIT).await.unwrap();
    assert!(live.iter().any(|m| m.node_id() == full));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        fleet.nodes[&full]
            .leases
            .acquire_attempts
            .load(Ordering::SeqCst)
            > 0,
        "a full node never tried to lead"
    );
    fleet.stop_node(&coordinator).await;
    let started = tokio::time::Instant::now();
    while fleet
        .leader()
        .await
        .is_none_or(|lease| lease.holder != full)
    {
        assert!(started.elapsed() < WAIT, "the full node did not take over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.settle(WAIT).await;
    for name in [observer, full] {
        fleet.stop_node(&name).await;
    }
}

#[tokio::test]
async fn status_follows_the_role() {
    let mut fleet = Fleet::new(Services::memory(), 1, 2);
    let first = fleet.start_node(BrokerRole::Coordinator).await;
    // The only coordinator leads.
    wait_for_status(&fleet.nodes[&first].broker, BrokerStatus::Running).await;
    // A second one waits.
    let second = fleet.start_node(BrokerRole::Coordinator).await;
    wait_for_status(&fleet.nodes[&second].broker, BrokerStatus::Waiting).await;
    // Observers and full nodes run; a full node that does not lead runs too.
    let observer = fleet.start_node(BrokerRole::Observer).await;
    wait_for_status(&fleet.nodes[&observer].broker, BrokerStatus::Running).await;
    let full = fleet.start_node(BrokerRole::Full).await;
    wait_for_status(&fleet.nodes[&full].broker, BrokerStatus::Running).await;
    // When the leader goes, the waiting coordinator takes over.
    fleet.stop_node(&first).await;
    wait_for_status(&fleet.nodes[&second].broker, BrokerStatus::Running).await;

    let broker = &fleet.nodes[&observer].broker;
    broker.stop().await;
    assert_eq!(broker.status(), BrokerStatus::Stopped);
}

#[tokio::test]
async fn a_coordinator_whose_lease_store_fails_stops_leading_at_once() {
    let mut fleet = Fleet::new(Services::memory(), 1, 2);
    let node = fleet.start_node(BrokerRole::Coordinator).await;
    wait_for_status(&fleet.nodes[&node].broker, BrokerStatus::Running).await;
    fleet.nodes[&node].leases.fail();
    // Its renewal fails: it stops leading at once and waits to lead again.
    wait_for_status(&fleet.nodes[&node].broker, BrokerStatus::Waiting).await;
    fleet.stop_node(&node).await;
}

#[tokio::test]
async fn a_singleton_gives_every_subscriber_everything_it_requests() {
    let ledger = Arc::new(Ledger::default());
    let broker = SingletonBroker::new();
    assert_eq!(broker.role(), BrokerRole::Full);
    // Two instances of one group, and a second group: all get all they request.
    broker
        .register(
            spec(
                "billing",
                "billing-1",
                &["category:invoices", "category:refunds"],
            ),
            subscriber(&ledger, "billing", "billing-1"),
        )
        .unwrap();
    broker
        .register(
            spec("audit", "audit-1", &["log"]),
            subscriber(&ledger, "audit", "audit-1"),
        )
        .unwrap();
    assert_eq!(broker.status(), BrokerStatus::Starting);
    broker.start().await.unwrap();
    assert_eq!(broker.status(), BrokerStatus::Running);
    assert_eq!(ledger.owners("billing").len(), 2);
    assert!(ledger.owners("billing").values().all(|o| o == "billing-1"));
    assert_eq!(ledger.owners("audit").len(), 1);
    let late = broker.register(spec("g", "g-1", &["log"]), subscriber(&ledger, "g", "g-1"));
    assert!(matches!(late, Err(BrokerError::AlreadyStarted)));

    broker.stop().await;
    assert_eq!(broker.status(), BrokerStatus::Stopped);
    assert!(ledger.owners("billing").is_empty());
    assert!(ledger.owners("audit").is_empty());
    assert!(ledger.violations().is_empty(), "{:?}", ledger.violations());
}

#[tokio::test]
async fn a_singleton_reports_a_subscriber_that_cannot_accept() {
    struct Refusing;
    #[async_trait::async_trait]
    impl Subscriber for Refusing {
        async fn accept(&self, source: &Source) -> Result<(), weir::broker::SubscriberError> {
            Err(weir::broker::SubscriberError::new(format!(
                "{source} is not ready"
            )))
        }
        async fn withdraw(
            &self,
            _: &Source,
        ) -> Result<Option<weir::event::Cursor>, weir::broker::SubscriberError> {
            panic!("a source that was never accepted is never withdrawn")
        }
    }
    let broker = SingletonBroker::new();
    broker
        .register(spec("g", "g-1", &["log"]), Arc::new(Refusing))
        .unwrap();
    broker.start().await.unwrap();
    match broker.status() {
        BrokerStatus::Errored(reason) => {
            assert!(
                reason.contains("g/g-1") && reason.contains("log is not ready"),
                "{reason}"
            );
        }
        other => panic!("expected errored, got {other}"),
    }
    broker.stop().await;
    assert_eq!(broker.status(), BrokerStatus::Stopped);
}

/// A second process with the node id of a live one (a restarted pod while the old
/// one still runs, or is only paused) is another lease holder: it waits while the
/// first renews, and leads under a higher epoch only once the first is gone and its
/// lease has expired. The two never lead at once.
#[tokio::test]
async fn a_second_process_of_a_node_waits_for_the_first_ones_lease() {
    let mut fleet = Fleet::new(Services::memory(), 1, 2);
    let node = fleet.start_node(BrokerRole::Coordinator).await;
    wait_for_status(&fleet.nodes[&node].broker, BrokerStatus::Running).await;
    let first = fleet.leader().await.expect("the first process leads");

    let second = fleet.build_broker(&node, BrokerRole::Coordinator);
    assert_ne!(
        second.incarnation(),
        fleet.nodes[&node].broker.incarnation()
    );
    second.start().await.unwrap();
    wait_for_status(&second, BrokerStatus::Waiting).await;
    // Several lease ttls, sampled: the first renews, so the second never leads.
    let ttl = common::fleet::settings().lease_ttl;
    let until = tokio::time::Instant::now() + ttl * 3;
    while tokio::time::Instant::now() < until {
        assert_eq!(second.status(), BrokerStatus::Waiting);
        assert_eq!(fleet.nodes[&node].broker.status(), BrokerStatus::Running);
        assert_eq!(fleet.leader().await.map(|l| l.epoch), Some(first.epoch));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    fleet.crash_node(&node).await;
    wait_for_status(&second, BrokerStatus::Running).await;
    let now = fleet.leader().await.expect("the second process leads");
    assert!(now.epoch > first.epoch, "{now:?} after {first:?}");
    second.stop().await;
}
