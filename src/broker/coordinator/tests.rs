//! The coordinator's unit tests, on the memory bus and membership store.

use std::time::Duration;

use super::*;
use crate::broker::control::ControlError;
use crate::broker::membership::{MemoryMembershipStore, Registration};
use crate::bus::MemoryBus;
use tokio::sync::oneshot;

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
        Self::start_with(None, |bus| Arc::new(bus))
    }

    /// A coordinator with `floor` (if any) publishing on what `wrap` makes of
    /// the memory bus.
    fn start_with(
        floor: Option<EpochFloor>,
        wrap: impl FnOnce(MemoryBus) -> Arc<dyn AllocationBus>,
    ) -> Self {
        let membership = Arc::new(MemoryMembershipStore::new());
        let bus = MemoryBus::new();
        let mut coordinator = Coordinator::new(
            "node-a",
            settings(),
            Arc::clone(&membership) as Arc<dyn MembershipStore>,
            wrap(bus.clone()),
        );
        if let Some(floor) = floor {
            coordinator = coordinator.with_epoch_floor(floor);
        }
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

/// A stray publisher's decision far above the leader's epoch, while the lease
/// store still says this node leads: the leader asks for a higher epoch instead of
/// stepping down, and goes on under it from its own decisions.
#[tokio::test]
async fn a_stray_decision_far_ahead_moves_the_term_above_it() {
    let floor = EpochFloor::default();
    let harness = Harness::start_with(Some(floor.clone()), |bus| Arc::new(bus));
    harness.lead(2);
    harness.join("s1").await;
    let mine = harness.decision(|d| owners(d) == ["s1"]).await;
    let stray = Decision {
        epoch: 1002,
        revision: 1,
        coordinator: "stray".into(),
        owners: BTreeMap::new(),
        ..mine.clone()
    };
    harness
        .bus
        .publish(&BusMessage::Decision(stray))
        .await
        .unwrap();
    // What the node's Leadership does: raise the lease's epoch to the floor.
    let started = Instant::now();
    while floor.get() <= 1002 {
        assert!(
            started.elapsed() < WAIT,
            "the leader did not ask for a higher epoch"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(floor.get(), 1003);
    harness.lead(1003);
    let above = harness
        .decision(|d| d.epoch == 1003 && owners(d) == ["s1"])
        .await;
    assert_eq!(above.revision, 1);
    harness.wait_for_status(BrokerStatus::Running).await;
    harness.stop().await;
}

/// After a store reset the lease starts again at epoch 1 while the bus keeps a
/// decision of epoch 4: the first term waits for a lease above it.
#[tokio::test]
async fn a_first_term_starts_above_the_retained_epochs() {
    let floor = EpochFloor::default();
    let harness = Harness::start_with(Some(floor.clone()), |bus| Arc::new(bus));
    let before_the_reset = Decision {
        group: "g".into(),
        epoch: 4,
        revision: 9,
        coordinator: "node-a".into(),
        issued_at: chrono::Utc::now(),
        owners: BTreeMap::new(),
        handovers: BTreeMap::new(),
        paused: false,
    };
    harness
        .bus
        .publish(&BusMessage::Decision(before_the_reset))
        .await
        .unwrap();
    harness.join("s1").await;
    harness.lead(1);
    let started = Instant::now();
    while floor.get() != 5 {
        assert!(
            started.elapsed() < WAIT,
            "the leader did not ask for epoch 5"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(harness.bus.retained_decision("g").map(|d| d.epoch), Some(4));
    harness.lead(5);
    let first = harness.decision(|d| owners(d) == ["s1"]).await;
    assert_eq!(first.version(), (5, 1));
    harness.stop().await;
}

/// A bus that refuses every publish, as a broker that is down would.
struct RefusingBus(MemoryBus);

#[async_trait::async_trait]
impl AllocationBus for RefusingBus {
    async fn publish(&self, _message: &BusMessage) -> crate::bus::Result<()> {
        Err(crate::bus::Error::Unavailable("refused by the test".into()))
    }
    async fn publish_whole(&self, _decision: &Decision) -> crate::bus::Result<()> {
        Err(crate::bus::Error::Unavailable("refused by the test".into()))
    }
    async fn subscribe(&self) -> crate::bus::Result<BusSubscription> {
        self.0.subscribe().await
    }
    async fn retained(&self) -> crate::bus::Result<Vec<Decision>> {
        self.0.retained().await
    }
}

#[tokio::test]
async fn a_leader_whose_decisions_do_not_reach_the_bus_says_so() {
    let harness = Harness::start_with(None, |bus| Arc::new(RefusingBus(bus)));
    harness.join("s1").await;
    harness.lead(1);
    let mut status = harness.status.clone();
    let errored = status
        .wait_for(|s| matches!(s, BrokerStatus::Errored(_)))
        .await
        .unwrap()
        .clone();
    let BrokerStatus::Errored(reason) = errored else {
        unreachable!()
    };
    assert!(
        reason.contains("cannot publish the decision of group g"),
        "{reason}"
    );
    assert!(reason.contains("refused by the test"), "{reason}");
    // It stays errored through the ticks that follow: never running meanwhile.
    let running = tokio::time::timeout(
        settings().heartbeat_interval * 10,
        status.wait_for(BrokerStatus::is_healthy),
    )
    .await;
    assert!(running.is_err(), "{:?}", *harness.status.borrow());
    harness.stop().await;
}

/// The memory bus, counting the decisions written whole on request.
struct WholeCounting(MemoryBus, Arc<std::sync::atomic::AtomicUsize>);

#[async_trait::async_trait]
impl AllocationBus for WholeCounting {
    async fn publish(&self, message: &BusMessage) -> crate::bus::Result<()> {
        self.0.publish(message).await
    }
    async fn publish_whole(&self, decision: &Decision) -> crate::bus::Result<()> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.publish_whole(decision).await
    }
    async fn subscribe(&self) -> crate::bus::Result<BusSubscription> {
        self.0.subscribe().await
    }
    async fn retained(&self) -> crate::bus::Result<Vec<Decision>> {
        self.0.retained().await
    }
}

#[tokio::test]
async fn a_node_lacking_the_current_decision_gets_it_written_whole_once() {
    let wholes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&wholes);
    let harness = Harness::start_with(None, move |bus| Arc::new(WholeCounting(bus, counter)));
    harness.join("s1").await;
    harness.lead(1);
    let current = harness.decision(|d| owners(d) == ["s1"]).await;
    let lacking = |node: &str, (epoch, revision): (u64, u64)| {
        BusMessage::Signal(Signal::Lacking {
            group: "g".into(),
            node: node.into(),
            epoch,
            revision,
        })
    };
    // Two nodes ask at once, and one asks for a decision that is not current.
    for message in [
        lacking("node-b", current.version()),
        lacking("node-c", current.version()),
        lacking("node-b", (current.epoch, current.revision + 7)),
    ] {
        harness.bus.publish(&message).await.unwrap();
    }
    let count = || wholes.load(std::sync::atomic::Ordering::SeqCst);
    let started = Instant::now();
    while count() == 0 && started.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(settings().refresh_interval / 2).await;
    assert_eq!(count(), 1);
    assert_eq!(harness.bus.retained_decision("g"), Some(current.clone()));
    // Asked again a refresh interval later (the write did not help): again.
    tokio::time::sleep(settings().refresh_interval).await;
    harness
        .bus
        .publish(&lacking("node-b", current.version()))
        .await
        .unwrap();
    let started = Instant::now();
    while count() == 1 && started.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(count(), 2);
    harness.stop().await;
}

#[tokio::test]
async fn a_pause_from_a_term_the_fleet_store_has_seen_superseded_is_refused() {
    // The interleaving a frozen leader meets when it thaws with a pause in its
    // queue: its term (epoch 1) still looks current to it, but the next
    // leader (epoch 2) has already written the group's state.
    let fleet = Arc::new(MemoryFleetStore::new());
    assert_eq!(fleet.set_paused("g", false, 2).await.unwrap(), Some(false));
    let (commands, received) = mpsc::channel(4);
    let (leading, _) = watch::channel(None);
    let coordinator = Coordinator::new(
        "node-a",
        settings(),
        Arc::new(MemoryMembershipStore::new()),
        Arc::new(MemoryBus::new()),
    )
    .with_control(Arc::clone(&fleet) as Arc<dyn FleetStore>, received, leading);
    let (leader, following) = watch::channel(LeaderState::Leader { epoch: 1 });
    let cancel = CancellationToken::new();
    let task = tokio::spawn(coordinator.run(following, cancel.clone()));
    let (reply, answer) = oneshot::channel();
    let pause = Command::Pause {
        epoch: 1,
        group: "g".into(),
        paused: true,
        reply,
    };
    commands.send(pause).await.unwrap();
    let answer = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
    assert!(matches!(answer, Err(ControlError::NotLeader)), "{answer:?}");
    assert!(
        fleet.paused_groups().await.unwrap().is_empty(),
        "the stale pause was written"
    );
    drop(leader);
    cancel.cancel();
    task.await.unwrap();
}
