//! The coordinator's unit tests, on the memory bus and membership store.

use std::time::Duration;

use super::*;
use crate::broker::membership::{MemoryMembershipStore, Registration};
use crate::bus::MemoryBus;

const WAIT: Duration = Duration::from_secs(10);

fn settings() -> BrokerSettings {
    BrokerSettings {
        heartbeat_interval: Duration::from_millis(20),
        member_timeout: Duration::from_secs(60),
        refresh_interval: Duration::from_millis(100),
        lease_ttl: Duration::from_secs(1),
        handover_timeout: Duration::from_secs(60),
    }
}

struct Harness {
    membership: Arc<MemoryMembershipStore>,
    bus: MemoryBus,
    leader: watch::Sender<LeaderState>,
    status: watch::Receiver<BrokerStatus>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn start() -> Self {
        let membership = Arc::new(MemoryMembershipStore::new());
        let bus = MemoryBus::new();
        let coordinator = Coordinator::new(
            "node-a",
            settings(),
            Arc::clone(&membership) as Arc<dyn MembershipStore>,
            Arc::new(bus.clone()),
        );
        let status = coordinator.status();
        let (leader, following) = watch::channel(LeaderState::Follower);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(coordinator.run(following, cancel.clone()));
        Self {
            membership,
            bus,
            leader,
            status,
            cancel,
            task,
        }
    }

    async fn join(&self, subscriber: &str) {
        let registration = Registration {
            group: "g".into(),
            subscriber: subscriber.into(),
            node: "node-a".into(),
            sources: ["log".parse().unwrap(), "category:orders".parse().unwrap()].into(),
            tags: BTreeSet::new(),
        };
        self.membership.register(&registration).await.unwrap();
    }

    fn lead(&self, epoch: u64) {
        self.leader.send_replace(LeaderState::Leader { epoch });
    }

    async fn wait_for_status(&self, wanted: BrokerStatus) {
        let mut status = self.status.clone();
        status.wait_for(|s| *s == wanted).await.unwrap();
    }

    /// Waits until the retained decision of group `g` satisfies `wanted`.
    async fn decision(&self, wanted: impl Fn(&Decision) -> bool) -> Decision {
        let started = Instant::now();
        loop {
            if let Some(decision) = self.bus.retained_decision("g") {
                if wanted(&decision) {
                    return decision;
                }
            }
            assert!(
                started.elapsed() < WAIT,
                "no such decision: {:?}",
                self.bus.retained_decision("g")
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
}

fn owners(decision: &Decision) -> Vec<&str> {
    decision.owners.keys().map(String::as_str).collect()
}

#[tokio::test]
async fn a_group_that_empties_and_comes_back_keeps_counting_revisions() {
    let harness = Harness::start();
    harness.lead(1);
    harness.join("s1").await;
    let first = harness.decision(|d| owners(d) == ["s1"]).await;
    harness.membership.leave("g", "s1").await.unwrap();
    let empty = harness.decision(|d| d.owners.is_empty()).await;
    assert!(empty.is_newer_than(&first));
    harness.join("s1").await;
    let back = harness
        .decision(|d| owners(d) == ["s1"] && d.is_newer_than(&empty))
        .await;
    assert_eq!(back.epoch, 1);
    harness.stop().await;
}

#[tokio::test]
async fn a_lease_regained_under_the_same_epoch_resumes_the_term() {
    let harness = Harness::start();
    harness.lead(3);
    harness.join("s1").await;
    let first = harness.decision(|d| owners(d) == ["s1"]).await;
    assert_eq!(first.version(), (3, 1));

    // A failed renewal demotes the node; it regains the lease before it expires.
    harness.leader.send_replace(LeaderState::Follower);
    harness.wait_for_status(BrokerStatus::Waiting).await;
    harness.join("s2").await;
    harness.lead(3);
    // The newcomer's share is handed over, in a decision of the same epoch.
    let resumed = harness.decision(|d| d.handovers.len() == 1).await;
    assert_eq!(resumed.epoch, 3);
    assert!(resumed.is_newer_than(&first), "{resumed:?} after {first:?}");
    harness.stop().await;
}

#[tokio::test]
async fn a_newer_epoch_on_the_bus_makes_the_leader_step_down() {
    let harness = Harness::start();
    harness.lead(2);
    harness.join("s1").await;
    let mine = harness.decision(|d| owners(d) == ["s1"]).await;
    let newer = Decision {
        epoch: 5,
        revision: 1,
        coordinator: "node-b".into(),
        ..mine.clone()
    };
    harness
        .bus
        .publish(&BusMessage::Decision(newer.clone()))
        .await
        .unwrap();
    harness.wait_for_status(BrokerStatus::Waiting).await;
    // Membership changes, but this node no longer decides.
    harness.join("s2").await;
    tokio::time::sleep(settings().refresh_interval * 3).await;
    assert_eq!(harness.bus.retained_decision("g"), Some(newer));
    harness.stop().await;
}
