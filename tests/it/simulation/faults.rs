//! Fault injectors: a [`Link`] per node process (and one for the whole fleet)
//! that the simulated stores and bus consult on every call, and the store
//! wrappers that consult it.
//!
//! A node whose link is frozen is a process paused whole (`SIGSTOP`, a long
//! garbage-collection stop): none of its tasks is polled while time moves on,
//! so its timers fire late, all at once, when it thaws; and its calls to a store
//! or the bus in flight complete only then. A store that is down answers every call with
//! the retryable `Unavailable` error of its kind; a slow one answers late.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;
use weir::broker::lease::{Lease, LeaseError, LeaseStore};
use weir::broker::membership::{MemberRecord, MembershipStore, Registration, SubscriberKey};
use weir::broker::subscriber::Grant;
use weir::consumer::{
    Checkpoint, CheckpointError, CheckpointStore, Claim, DeadLetter, DeadLetterStore, NewDeadLetter,
};
use weir::event::{Category, Cursor, Source, StoredEvent, StreamName};
use weir::store::{self, AppendWatcher, Backlog, EventStore, StreamAppend};

use super::check::Ledger;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkState {
    pub store_down: bool,
    pub bus_cut: bool,
    pub frozen: bool,
    pub slow: Duration,
    /// Chance that a bus payload is lost, held back, or duplicated (each).
    pub loss: f64,
}

/// The faults one node process (or the whole fleet) is under.
pub struct Link {
    state: watch::Sender<LinkState>,
    /// The node's tasks, frozen while the link is.
    process: weir::ambient::Process,
}

impl Link {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: watch::channel(LinkState::default()).0,
            process: weir::ambient::Process::new(),
        })
    }

    /// The process whose tasks this link freezes: run the node's start (and
    /// stop) in it.
    pub fn process(&self) -> &weir::ambient::Process {
        &self.process
    }

    pub fn state(&self) -> LinkState {
        self.state.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }

    pub fn change(&self, change: impl FnOnce(&mut LinkState)) {
        self.state.send_modify(change);
        match self.state.borrow().frozen {
            true => self.process.freeze(),
            false => self.process.thaw(),
        }
    }

    pub async fn wait_unfrozen(&self) {
        let mut state = self.state.subscribe();
        let _ = state.wait_for(|state| !state.frozen).await;
    }
}

/// What a store call passes through: the node's link and the fleet's.
#[derive(Clone)]
pub struct Gate {
    pub node: Arc<Link>,
    pub fleet: Arc<Link>,
}

impl Gate {
    async fn pass(&self) -> Result<(), store::Error> {
        self.node.wait_unfrozen().await;
        let slow = self.node.state().slow.max(self.fleet.state().slow);
        if !slow.is_zero() {
            tokio::time::sleep(slow).await;
            self.node.wait_unfrozen().await;
        }
        if self.node.state().store_down || self.fleet.state().store_down {
            return Err(store::Error::Unavailable("simulated store outage".into()));
        }
        Ok(())
    }
}

/// The event store, behind a gate.
pub struct GatedEvents {
    pub inner: Arc<dyn EventStore>,
    pub gate: Gate,
}

#[async_trait]
impl EventStore for GatedEvents {
    async fn append_batch(
        &self,
        category: &Category,
        appends: Vec<StreamAppend>,
    ) -> store::Result<Vec<StoredEvent>> {
        self.gate.pass().await?;
        self.inner.append_batch(category, appends).await
    }

    async fn read(
        &self,
        source: &Source,
        after: Cursor,
        limit: usize,
    ) -> store::Result<Vec<StoredEvent>> {
        self.gate.pass().await?;
        self.inner.read(source, after, limit).await
    }

    async fn latest(
        &self,
        category: &Category,
        stream: &StreamName,
    ) -> store::Result<Option<StoredEvent>> {
        self.gate.pass().await?;
        self.inner.latest(category, stream).await
    }

    async fn head(&self, source: &Source) -> store::Result<Option<StoredEvent>> {
        self.gate.pass().await?;
        self.inner.head(source).await
    }

    async fn watch(&self) -> store::Result<AppendWatcher> {
        self.gate.pass().await?;
        self.inner.watch().await
    }

    async fn backlog(&self, source: &Source, after: Cursor, limit: u64) -> store::Result<Backlog> {
        self.gate.pass().await?;
        self.inner.backlog(source, after, limit).await
    }

    async fn events_by_id(&self, ids: &[Uuid]) -> store::Result<Vec<StoredEvent>> {
        self.gate.pass().await?;
        self.inner.events_by_id(ids).await
    }

    async fn ping(&self) -> store::Result<()> {
        self.gate.pass().await?;
        self.inner.ping().await
    }

    async fn visibility_horizon(&self) -> store::Result<Duration> {
        self.gate.pass().await?;
        self.inner.visibility_horizon().await
    }
}

/// The checkpoint store, behind a gate, noting every claim and save of its
/// process that succeeds.
pub struct GatedCheckpoints {
    pub inner: Arc<dyn CheckpointStore>,
    pub gate: Gate,
    pub process: String,
    pub ledger: Ledger,
    /// Which store this is (see `Ledger::forget_store`).
    pub generation: u32,
}

#[async_trait]
impl CheckpointStore for GatedCheckpoints {
    async fn claim(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
    ) -> Result<(Claim, Cursor), CheckpointError> {
        self.gate.pass().await?;
        let claimed = self.inner.claim(group, source, owner).await?;
        self.ledger.claimed(source, &self.process, self.generation);
        Ok(claimed)
    }

    async fn claim_granted(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
        grant: Grant,
    ) -> Result<(Claim, Cursor), CheckpointError> {
        self.gate.pass().await?;
        let claimed = self
            .inner
            .claim_granted(group, source, owner, grant)
            .await?;
        self.ledger.claimed(source, &self.process, self.generation);
        Ok(claimed)
    }

    async fn save(&self, claim: &Claim, cursor: Cursor) -> Result<(), CheckpointError> {
        self.gate.pass().await?;
        self.inner.save(claim, cursor).await?;
        self.ledger
            .saved(&claim.source, &self.process, cursor, self.generation);
        Ok(())
    }

    async fn verify(&self, claim: &Claim) -> Result<(), CheckpointError> {
        self.gate.pass().await?;
        self.inner.verify(claim).await
    }

    async fn load(
        &self,
        group: &str,
        source: &Source,
    ) -> Result<Option<Checkpoint>, CheckpointError> {
        self.gate.pass().await?;
        self.inner.load(group, source).await
    }

    async fn list(&self, group: Option<&str>) -> Result<Vec<Checkpoint>, CheckpointError> {
        self.gate.pass().await?;
        self.inner.list(group).await
    }
}

/// The dead-letter store, behind a gate.
pub struct GatedDeadLetters {
    pub inner: Arc<dyn DeadLetterStore>,
    pub gate: Gate,
}

#[async_trait]
impl DeadLetterStore for GatedDeadLetters {
    async fn record(&self, letter: &NewDeadLetter) -> store::Result<DeadLetter> {
        self.gate.pass().await?;
        self.inner.record(letter).await
    }

    async fn list(
        &self,
        group: Option<&str>,
        after: u64,
        limit: usize,
    ) -> store::Result<Vec<DeadLetter>> {
        self.gate.pass().await?;
        self.inner.list(group, after, limit).await
    }

    async fn list_in_order(
        &self,
        group: &str,
        up_to: u64,
        after: (u64, u64),
        limit: usize,
    ) -> store::Result<Vec<DeadLetter>> {
        self.gate.pass().await?;
        self.inner.list_in_order(group, up_to, after, limit).await
    }

    async fn last_id(&self, group: &str) -> store::Result<Option<u64>> {
        self.gate.pass().await?;
        self.inner.last_id(group).await
    }

    async fn get(&self, ids: &[u64]) -> store::Result<Vec<DeadLetter>> {
        self.gate.pass().await?;
        self.inner.get(ids).await
    }

    async fn remove(&self, ids: &[u64]) -> store::Result<u64> {
        self.gate.pass().await?;
        self.inner.remove(ids).await
    }

    async fn record_failure(
        &self,
        id: u64,
        kind: &str,
        error: &str,
    ) -> store::Result<Option<DeadLetter>> {
        self.gate.pass().await?;
        self.inner.record_failure(id, kind, error).await
    }
}

/// Membership, behind a gate.
pub struct GatedMembership {
    pub inner: Arc<dyn MembershipStore>,
    pub gate: Gate,
}

#[async_trait]
impl MembershipStore for GatedMembership {
    async fn register(&self, registration: &Registration) -> store::Result<MemberRecord> {
        self.gate.pass().await?;
        self.inner.register(registration).await
    }

    async fn heartbeat(
        &self,
        node: &str,
        subscribers: &[SubscriberKey],
    ) -> store::Result<Vec<SubscriberKey>> {
        self.gate.pass().await?;
        self.inner.heartbeat(node, subscribers).await
    }

    async fn leave(&self, group: &str, subscriber: &str) -> store::Result<bool> {
        self.gate.pass().await?;
        self.inner.leave(group, subscriber).await
    }

    async fn live(
        &self,
        group: &str,
        member_timeout: Duration,
    ) -> store::Result<Vec<MemberRecord>> {
        self.gate.pass().await?;
        self.inner.live(group, member_timeout).await
    }

    async fn live_all(&self, member_timeout: Duration) -> store::Result<Vec<MemberRecord>> {
        self.gate.pass().await?;
        self.inner.live_all(member_timeout).await
    }

    async fn groups(&self) -> store::Result<Vec<String>> {
        self.gate.pass().await?;
        self.inner.groups().await
    }

    async fn purge(&self, older_than: Duration) -> store::Result<u64> {
        self.gate.pass().await?;
        self.inner.purge(older_than).await
    }
}

/// Leases, behind a gate.
pub struct GatedLeases {
    pub inner: Arc<dyn LeaseStore>,
    pub gate: Gate,
}

#[async_trait]
impl LeaseStore for GatedLeases {
    async fn try_acquire(
        &self,
        name: &str,
        node: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, LeaseError> {
        self.gate.pass().await?;
        self.inner.try_acquire(name, node, ttl).await
    }

    async fn renew(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>, LeaseError> {
        self.gate.pass().await?;
        self.inner.renew(name, node, epoch, ttl).await
    }

    async fn release(&self, name: &str, node: &str, epoch: u64) -> Result<(), LeaseError> {
        self.gate.pass().await?;
        self.inner.release(name, node, epoch).await
    }

    async fn current(&self, name: &str) -> Result<Option<Lease>, LeaseError> {
        self.gate.pass().await?;
        self.inner.current(name).await
    }

    async fn raise_epoch(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        at_least: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>, LeaseError> {
        self.gate.pass().await?;
        self.inner
            .raise_epoch(name, node, epoch, at_least, ttl)
            .await
    }
}
