//! Tests of the lease stores and the leadership driver.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

// Tokio's paused clock: time moves only when every task waits, so the timing
// bounds below hold exactly, however loaded the machine is.
const TTL: Duration = Duration::from_millis(600);
/// Allowance for scheduling delays in the few assertions about timing.
const SLACK: Duration = Duration::from_millis(150);

/// A memory store whose renewals can be switched to fail, as when the database
/// becomes unreachable.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryLeaseStore,
    fail_renewals: AtomicBool,
}

#[async_trait]
impl LeaseStore for FlakyStore {
    async fn try_acquire(&self, name: &str, node: &str, ttl: Duration) -> Result<Option<Lease>> {
        self.inner.try_acquire(name, node, ttl).await
    }
    async fn renew(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        if self.fail_renewals.load(Ordering::SeqCst) {
            return Err(crate::store::Error::Unavailable("switched off by the test".into()).into());
        }
        self.inner.renew(name, node, epoch, ttl).await
    }
    async fn release(&self, name: &str, node: &str, epoch: u64) -> Result<()> {
        self.inner.release(name, node, epoch).await
    }
    async fn current(&self, name: &str) -> Result<Option<Lease>> {
        self.inner.current(name).await
    }
    async fn raise_epoch(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        at_least: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        self.inner
            .raise_epoch(name, node, epoch, at_least, ttl)
            .await
    }
}

/// Waits until `state` satisfies `want`, at most `within`.
async fn wait_for(
    state: &mut watch::Receiver<LeaderState>,
    within: Duration,
    want: impl Fn(&LeaderState) -> bool,
) -> LeaderState {
    tokio::time::timeout(within, state.wait_for(|s| want(s)))
        .await
        .expect("state not reached in time")
        .map(|s| *s)
        .expect("the driver stopped")
}

/// A `Leadership` driver for `node` on `store`, running: its state, its cancel
/// token and its task.
fn start_driver(
    store: Arc<dyn LeaseStore>,
    node: &str,
) -> (
    watch::Receiver<LeaderState>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let leadership = Leadership::new(store, "coordinator", node, TTL).unwrap();
    let state = leadership.subscribe();
    let cancel = CancellationToken::new();
    let driver = tokio::spawn(leadership.run(cancel.clone()));
    (state, cancel, driver)
}

#[tokio::test(start_paused = true)]
async fn a_single_node_becomes_leader_and_releases_when_cancelled() {
    let store = Arc::new(MemoryLeaseStore::new());
    let (mut state, cancel, driver) = start_driver(store.clone(), "a");

    let led = wait_for(&mut state, TTL, LeaderState::is_leader).await;
    assert_eq!(led, LeaderState::Leader { epoch: 1 });
    // Renewals keep it leader well past the ttl.
    tokio::time::sleep(TTL * 5).await;
    assert_eq!(*state.borrow(), LeaderState::Leader { epoch: 1 });

    cancel.cancel();
    driver.await.unwrap();
    assert_eq!(*state.borrow(), LeaderState::Follower);
    // Released: another node takes it at once, under a new epoch.
    let taken = store.try_acquire("coordinator", "b", TTL).await.unwrap();
    assert_eq!(taken.map(|l| l.epoch), Some(2));
}

#[tokio::test(start_paused = true)]
async fn a_raised_floor_moves_the_leader_to_a_higher_epoch_at_once() {
    let store = Arc::new(MemoryLeaseStore::new());
    let leadership = Leadership::new(store.clone(), "coordinator", "a", TTL).unwrap();
    let floor = leadership.epoch_floor();
    let mut state = leadership.subscribe();
    let cancel = CancellationToken::new();
    let driver = tokio::spawn(leadership.run(cancel.clone()));
    wait_for(&mut state, TTL, LeaderState::is_leader).await;
    floor.raise(1005);
    // Woken by the raise rather than at the next renewal.
    let raised = wait_for(&mut state, SLACK, |s| {
        *s != LeaderState::Leader { epoch: 1 }
    })
    .await;
    assert_eq!(raised, LeaderState::Leader { epoch: 1005 });
    let lease = store.current("coordinator").await.unwrap().unwrap();
    assert_eq!((lease.holder.as_str(), lease.epoch), ("a", 1005));
    // Renewals go on under the raised epoch.
    tokio::time::sleep(TTL * 3).await;
    assert_eq!(*state.borrow(), LeaderState::Leader { epoch: 1005 });
    cancel.cancel();
    driver.await.unwrap();
    let next = store.try_acquire("coordinator", "b", TTL).await.unwrap();
    assert_eq!(next.map(|l| l.epoch), Some(1006));
}

#[tokio::test(start_paused = true)]
async fn a_restarted_node_waits_for_the_lease_and_leads_under_a_higher_epoch() {
    let store = Arc::new(MemoryLeaseStore::new());
    let old = Incarnation::new("a");
    let (mut state, _cancel, paused) = start_driver(store.clone(), old.as_str());
    wait_for(&mut state, TTL, LeaderState::is_leader).await;
    // The old process stops renewing (paused, or crashed) with its lease live.
    paused.abort();
    let _ = paused.await;
    let lease = store.current("coordinator").await.unwrap().unwrap();

    let new = Incarnation::new("a");
    assert_ne!(new, old);
    let (mut state, cancel, driver) = start_driver(store.clone(), new.as_str());
    let led = wait_for(&mut state, TTL * 2, LeaderState::is_leader).await;
    // Not before the old process's lease ran out: it may still act on it.
    let led_at = store.clock.to_utc(Instant::now());
    assert!(
        led_at >= lease.expires_at,
        "{led_at} < {}",
        lease.expires_at
    );
    assert_eq!(led, LeaderState::Leader { epoch: 2 });
    cancel.cancel();
    driver.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn two_processes_of_one_node_never_lead_together() {
    let store = Arc::new(MemoryLeaseStore::new());
    let (mut first, cancel_first, first_driver) =
        start_driver(store.clone(), Incarnation::new("a").as_str());
    wait_for(&mut first, TTL, LeaderState::is_leader).await;
    let (second, cancel_second, second_driver) =
        start_driver(store.clone(), Incarnation::new("a").as_str());
    // Many ttls: the first keeps renewing, so the second never takes over.
    for _ in 0..60 {
        tokio::time::sleep(TTL / 10).await;
        assert_eq!(*first.borrow(), LeaderState::Leader { epoch: 1 });
        assert_eq!(*second.borrow(), LeaderState::Follower);
    }
    cancel_first.cancel();
    cancel_second.cancel();
    first_driver.await.unwrap();
    second_driver.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn failing_renewals_demote_at_once() {
    let store = Arc::new(FlakyStore::default());
    let (mut state, cancel, driver) = start_driver(store.clone(), "a");
    wait_for(&mut state, TTL, LeaderState::is_leader).await;

    store.fail_renewals.store(true, Ordering::SeqCst);
    let lease = store.inner.current("coordinator").await.unwrap().unwrap();
    wait_for(&mut state, TTL, |s| !s.is_leader()).await;
    // Demoted at the first failing renewal, well before the lease (and with it the
    // local deadline) ran out.
    let demoted_at = store.inner.clock.to_utc(Instant::now());
    assert!(
        demoted_at < lease.expires_at,
        "{demoted_at} >= {}",
        lease.expires_at
    );

    cancel.cancel();
    driver.await.unwrap();
}

/// A store whose renewals never answer: only the local deadline can demote.
#[derive(Default)]
struct SilentStore {
    inner: MemoryLeaseStore,
    silent: AtomicBool,
}

#[async_trait]
impl LeaseStore for SilentStore {
    async fn try_acquire(&self, name: &str, node: &str, ttl: Duration) -> Result<Option<Lease>> {
        if self.silent.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.try_acquire(name, node, ttl).await
    }
    async fn renew(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        if self.silent.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.renew(name, node, epoch, ttl).await
    }
    async fn release(&self, name: &str, node: &str, epoch: u64) -> Result<()> {
        self.inner.release(name, node, epoch).await
    }
    async fn current(&self, name: &str) -> Result<Option<Lease>> {
        self.inner.current(name).await
    }
    async fn raise_epoch(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        at_least: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        self.inner
            .raise_epoch(name, node, epoch, at_least, ttl)
            .await
    }
}

#[tokio::test(start_paused = true)]
async fn a_store_that_stops_answering_demotes_by_the_local_deadline() {
    let store = Arc::new(SilentStore::default());
    let (mut state, cancel, driver) = start_driver(store.clone(), "a");
    wait_for(&mut state, TTL, LeaderState::is_leader).await;

    store.silent.store(true, Ordering::SeqCst);
    let lease = store.inner.current("coordinator").await.unwrap().unwrap();
    wait_for(&mut state, TTL * 2, |s| !s.is_leader()).await;
    // The node stopped leading no later than the store's lease expired.
    let demoted_at = store.inner.clock.to_utc(Instant::now());
    // The deadline and the store's expiry both count from the renewal's start, so
    // the demotion is seen within scheduling slack of the expiry, not a renewal later.
    assert!(
        demoted_at <= lease.expires_at + SLACK,
        "{demoted_at} > {} + {SLACK:?}",
        lease.expires_at
    );
    // No renewal got through since.
    assert_eq!(
        store.inner.current("coordinator").await.unwrap(),
        Some(lease)
    );

    cancel.cancel();
    driver.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn two_drivers_never_lead_together_and_hand_over_on_cancel() {
    let store: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
    let (mut state_a, cancel_a, driver_a) = start_driver(store.clone(), "a");
    let (mut state_b, cancel_b, driver_b) = start_driver(store.clone(), "b");

    // Every change on either side is checked against the other side's state.
    let both = {
        let (mut a, mut b) = (state_a.clone(), state_b.clone());
        tokio::spawn(async move {
            let mut both_led = false;
            loop {
                tokio::select! {
                    changed = a.changed() => if changed.is_err() { break },
                    changed = b.changed() => if changed.is_err() { break },
                }
                both_led |= a.borrow().is_leader() && b.borrow().is_leader();
            }
            both_led
        })
    };

    let first = tokio::select! {
        s = wait_for(&mut state_a, TTL, LeaderState::is_leader) => s,
        s = wait_for(&mut state_b, TTL, LeaderState::is_leader) => s,
    };
    let LeaderState::Leader { epoch: first_epoch } = first else {
        unreachable!()
    };
    // Sample through several renewal rounds.
    for _ in 0..60 {
        tokio::time::sleep(TTL / 20).await;
        assert!(!(state_a.borrow().is_leader() && state_b.borrow().is_leader()));
    }
    let (cancel_leader, driver_leader, follower_state) = if state_a.borrow().is_leader() {
        (cancel_a.clone(), driver_a, &mut state_b)
    } else {
        (cancel_b.clone(), driver_b, &mut state_a)
    };
    assert!(!follower_state.borrow().is_leader());

    cancel_leader.cancel();
    driver_leader.await.unwrap();
    // Released, so the follower takes over at its next attempt.
    let next = wait_for(follower_state, TTL / 3 + SLACK, LeaderState::is_leader).await;
    let LeaderState::Leader { epoch } = next else {
        unreachable!()
    };
    assert!(epoch > first_epoch);

    cancel_a.cancel();
    cancel_b.cancel();
    tokio::time::sleep(TTL).await;
    drop((state_a, state_b));
    // Both drivers are done, so their senders are gone and the checker ends.
    assert!(!both.await.unwrap(), "both nodes reported leader at once");
}
