//! Fleet scenarios: in-process nodes sharing membership and leases (in memory, and
//! on Postgres) and an in-memory bus, 50 groups with one subscriber per group on
//! every observing node.
//!
//! After every step the fleet must settle within [`SETTLE_BOUND`]: each group's
//! newest decision has no handover in flight, names only running subscribers, owns
//! every source exactly once with loads differing by at most one, and the
//! subscribers consume exactly what it says. Throughout, the ledger fails the test
//! the moment a subscriber accepts a source another one has not finished
//! withdrawing.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::fleet::{Fleet, Services};
use weir::broker::BrokerRole;
use weir::bus::{AllocationBus, BusMessage, Decision};

const GROUPS: usize = 50;
const SOURCES: usize = 6;

/// How long any step may take to settle. With the fleet's timings (heartbeat
/// 200 ms, member timeout 1.5 s, lease ttl 1.5 s, handover timeout 3 s) a graceful
/// step settles in well under a second and a crash in about two; the rest is room
/// for a loaded machine.
const SETTLE_BOUND: Duration = Duration::from_secs(15);

on_every_backend!(
    Services:
    three_nodes_own_every_source_once,
    a_node_is_replaced,
    every_node_is_replaced_in_turn,
    crashed_nodes_are_replaced,
    a_fourth_node_gets_its_share,
    one_coordinator_and_two_observers_work_together,
    a_deposed_coordinators_late_decision_changes_nothing,
    a_reset_lease_store_starts_above_the_epochs_the_bus_holds,
    a_stray_decision_far_ahead_does_not_stop_the_fleet,
);

async fn settle(fleet: &Fleet, step: &str) {
    let took = fleet.settle(SETTLE_BOUND).await;
    eprintln!("{step}: settled in {took:?}");
}

async fn fleet_of_three(services: Services) -> Fleet {
    let mut fleet = Fleet::new(services, GROUPS, SOURCES);
    for _ in 0..3 {
        fleet.start_node(BrokerRole::Full).await;
    }
    settle(&fleet, "three nodes started").await;
    fleet
}

async fn stop_all(mut fleet: Fleet) {
    let names: Vec<String> = fleet.nodes.keys().cloned().collect();
    for name in names {
        fleet.stop_node(&name).await;
    }
    assert_eq!(fleet.ledger.violations(), Vec::<String>::new());
    for group in &fleet.groups {
        assert!(
            fleet.ledger.owners(group).is_empty(),
            "{group}: stopped nodes still consume"
        );
    }
}

/// Subscriber to the number of sources it consumes, for one group.
fn loads(fleet: &Fleet, group: &str) -> BTreeMap<String, usize> {
    let mut loads = BTreeMap::new();
    for owner in fleet.ledger.owners(group).into_values() {
        *loads.entry(owner).or_default() += 1;
    }
    loads
}

async fn three_nodes_own_every_source_once(services: Services) {
    let fleet = fleet_of_three(services).await;
    for group in &fleet.groups {
        assert_eq!(fleet.ledger.owners(group).len(), SOURCES, "{group}");
        let loads: Vec<usize> = loads(&fleet, group).into_values().collect();
        assert_eq!(loads, [2, 2, 2], "{group}");
    }
    stop_all(fleet).await;
}

async fn a_node_is_replaced(services: Services) {
    let mut fleet = fleet_of_three(services).await;
    // The leader, which is the harder case: leadership moves as well.
    let leader = fleet.leader().await.expect("a leader").holder;
    fleet.stop_node(&leader).await;
    settle(&fleet, "leader stopped").await;
    fleet.start_node(BrokerRole::Full).await;
    settle(&fleet, "replacement started").await;
    stop_all(fleet).await;
}

async fn every_node_is_replaced_in_turn(services: Services) {
    let mut fleet = fleet_of_three(services).await;
    let originals: Vec<String> = fleet.nodes.keys().cloned().collect();
    for old in originals {
        let new = fleet.start_node(BrokerRole::Full).await;
        settle(&fleet, &format!("{new} started")).await;
        fleet.stop_node(&old).await;
        settle(&fleet, &format!("{old} stopped")).await;
    }
    stop_all(fleet).await;
}

async fn crashed_nodes_are_replaced(services: Services) {
    let mut fleet = fleet_of_three(services).await;
    let leader = fleet.leader().await.expect("a leader").holder;
    let follower = fleet
        .nodes
        .keys()
        .find(|name| **name != leader)
        .cloned()
        .unwrap();
    fleet.crash_node(&follower).await;
    settle(&fleet, "follower crashed").await;
    fleet.start_node(BrokerRole::Full).await;
    settle(&fleet, "replacement started").await;
    fleet.crash_node(&leader).await;
    settle(&fleet, "leader crashed").await;
    let new_leader = fleet.leader().await.expect("a new leader").holder;
    assert_ne!(new_leader, leader);
    stop_all(fleet).await;
}

async fn a_fourth_node_gets_its_share(services: Services) {
    let mut fleet = fleet_of_three(services).await;
    let before: BTreeMap<String, _> = fleet
        .groups
        .iter()
        .map(|group| (group.clone(), fleet.ledger.owners(group)))
        .collect();
    let newcomer = fleet.start_node(BrokerRole::Full).await;
    settle(&fleet, "fourth node started").await;
    for group in &fleet.groups {
        let newcomer_id = format!("{group}@{newcomer}");
        let after = fleet.ledger.owners(group);
        let share = after
            .values()
            .filter(|owner| **owner == newcomer_id)
            .count();
        assert!(
            (1..=2).contains(&share),
            "{group}: newcomer owns {share} of {SOURCES}"
        );
        // Sticky: only what the newcomer took moved.
        let moved: Vec<_> = after
            .iter()
            .filter(|(source, owner)| before[group].get(*source) != Some(*owner))
            .collect();
        assert!(
            moved.iter().all(|(_, owner)| **owner == newcomer_id),
            "{group}: moved between old nodes: {moved:?}"
        );
        let mut loads: Vec<usize> = loads(&fleet, group).into_values().collect();
        loads.sort_unstable();
        assert_eq!(loads, [1, 1, 2, 2], "{group}");
    }
    stop_all(fleet).await;
}

async fn one_coordinator_and_two_observers_work_together(services: Services) {
    let mut fleet = Fleet::new(services, GROUPS, SOURCES);
    let coordinator = fleet.start_node(BrokerRole::Coordinator).await;
    let observers = [
        fleet.start_node(BrokerRole::Observer).await,
        fleet.start_node(BrokerRole::Observer).await,
    ];
    settle(&fleet, "coordinator and observers started").await;
    assert_eq!(fleet.leader().await.expect("a leader").holder, coordinator);
    let members = fleet
        .services
        .membership
        .live_all(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(members.len(), GROUPS * 2);
    assert!(
        members
            .iter()
            .all(|m| observers.iter().any(|o| o == m.node_id()))
    );
    for group in &fleet.groups {
        let loads: Vec<usize> = loads(&fleet, group).into_values().collect();
        assert_eq!(loads, [3, 3], "{group}");
    }
    // Observers never compete for the lease.
    for observer in &observers {
        let attempts = fleet.nodes[observer]
            .leases
            .acquire_attempts
            .load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(attempts, 0, "{observer} tried to lead");
    }
    stop_all(fleet).await;
}

async fn a_deposed_coordinators_late_decision_changes_nothing(services: Services) {
    let fleet = fleet_of_three(services).await;
    let old = fleet.leader().await.expect("a leader");
    // The leader loses its lease store: its renewals fail, it stops deciding, and
    // once the lease expires another node takes over under a higher epoch.
    fleet.nodes[&old.holder].leases.fail();
    let started = tokio::time::Instant::now();
    let new = loop {
        match fleet.leader().await {
            Some(lease) if lease.holder != old.holder => break lease,
            _ if started.elapsed() > SETTLE_BOUND => panic!("no node took over from {old:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert!(new.epoch > old.epoch, "{new:?} after {old:?}");
    // The new leader's first decisions are out once every group carries its epoch.
    loop {
        let retained = fleet.services.bus.retained().await.unwrap();
        if retained.len() == GROUPS && retained.iter().all(|d| d.epoch == new.epoch) {
            break;
        }
        assert!(
            started.elapsed() < SETTLE_BOUND,
            "the new leader did not decide"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    settle(&fleet, "leadership moved").await;

    let before: Vec<_> = fleet
        .groups
        .iter()
        .map(|group| fleet.ledger.owners(group))
        .collect();
    let accepts = fleet.ledger.accepts();
    // The old leader's late decisions, with revisions far beyond the new leader's,
    // give every source to its own subscribers.
    for group in &fleet.groups {
        let mine = format!("{group}@{}", old.holder);
        let late = Decision {
            group: group.clone(),
            epoch: old.epoch,
            revision: 1_000_000,
            coordinator: old.holder.clone(),
            issued_at: chrono::Utc::now(),
            owners: [(mine, fleet.sources_of(group))].into(),
            handovers: BTreeMap::new(),
            paused: false,
        };
        fleet
            .services
            .bus
            .publish(&BusMessage::Decision(late))
            .await
            .unwrap();
    }
    // Several refresh intervals and ticks for it to do harm, if it could.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Vec<_> = fleet
        .groups
        .iter()
        .map(|group| fleet.ledger.owners(group))
        .collect();
    assert_eq!(
        after, before,
        "a deposed coordinator's decision was applied"
    );
    assert_eq!(fleet.ledger.accepts(), accepts, "something was accepted");
    for decision in fleet.services.bus.retained().await.unwrap() {
        assert_eq!(decision.epoch, new.epoch, "{}", decision.group);
    }
    settle(&fleet, "after the late decisions").await;
    stop_all(fleet).await;
}

/// The lease store was reset (or restored from a backup) while the bus kept the
/// decisions of an earlier fleet's epoch 4: the new leader's first term must start
/// above them, or observers would drop every one of its decisions as old.
async fn a_reset_lease_store_starts_above_the_epochs_the_bus_holds(services: Services) {
    let mut fleet = Fleet::new(services, GROUPS, SOURCES);
    for group in fleet.groups.clone() {
        let before_the_reset = Decision {
            group: group.clone(),
            epoch: 4,
            revision: 30,
            coordinator: "node-before-the-reset".into(),
            issued_at: chrono::Utc::now(),
            owners: [(format!("{group}@gone"), fleet.sources_of(&group))].into(),
            handovers: BTreeMap::new(),
            paused: false,
        };
        fleet
            .services
            .bus
            .publish(&BusMessage::Decision(before_the_reset))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        fleet.start_node(BrokerRole::Full).await;
    }
    settle(&fleet, "three nodes started over a reset store").await;
    let leader = fleet.leader().await.expect("a leader");
    assert!(
        leader.epoch > 4,
        "the lease row keeps the raised epoch: {leader:?}"
    );
    // Sources move again when a node leaves.
    let leaving = fleet
        .nodes
        .keys()
        .find(|name| **name != leader.holder)
        .cloned()
        .unwrap();
    fleet.stop_node(&leaving).await;
    settle(&fleet, "a node stopped").await;
    stop_all(fleet).await;
}

/// A well-formed decision of an epoch 1,000 above the leader's, from a publisher
/// that holds no lease: the leader moves its epoch above it instead of stepping
/// down, and allocation goes on.
async fn a_stray_decision_far_ahead_does_not_stop_the_fleet(services: Services) {
    let mut fleet = fleet_of_three(services).await;
    let leader = fleet.leader().await.expect("a leader");
    let group = fleet.groups[0].clone();
    let current = fleet
        .services
        .bus
        .retained()
        .await
        .unwrap()
        .into_iter()
        .find(|decision| decision.group == group)
        .expect("a decision");
    let stray = Decision {
        epoch: leader.epoch + 1000,
        revision: 1,
        coordinator: "stray".into(),
        ..current
    };
    fleet
        .services
        .bus
        .publish(&BusMessage::Decision(stray.clone()))
        .await
        .unwrap();
    let leaving = fleet
        .nodes
        .keys()
        .find(|name| **name != leader.holder)
        .cloned()
        .unwrap();
    fleet.stop_node(&leaving).await;
    settle(&fleet, "a node stopped after a stray decision").await;
    let now = fleet.leader().await.expect("a leader");
    assert!(now.epoch > stray.epoch, "{now:?} after {stray:?}");
    let retained = fleet.services.bus.retained().await.unwrap();
    assert!(
        retained.iter().all(|decision| decision.epoch == now.epoch),
        "every group decided again under the raised epoch"
    );
    stop_all(fleet).await;
}
