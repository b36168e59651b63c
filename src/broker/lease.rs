//! The leadership lease: a named, expiring claim that at most one node holds at a time,
//! with an epoch that grows with every change of hands, and the [`Leadership`] driver
//! that keeps a node's claim alive and reports whether it is the leader.
//!
//! The epoch is a fencing token: whatever the leader does on the lease's behalf carries
//! it, so that a deposed leader that has not yet noticed is recognisably stale.
//!
//! Backends: [`MemoryLeaseStore`] (one process, for tests and single-node runs) and
//! `PostgresLeaseStore` (feature `postgres`), which compares every expiry on the
//! database's clock so that the nodes' clocks never need to agree.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The longest ttl (and member timeout) accepted: far beyond any sensible setting,
/// and small enough that adding it to a timestamp never leaves the timestamp range.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// Why a lease operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease ttl {ttl:?} is out of range: give a ttl above zero and at most 100 years")]
    InvalidTtl { ttl: Duration },
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

pub type Result<T, E = LeaseError> = std::result::Result<T, E>;

pub(crate) fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(LeaseError::InvalidTtl { ttl });
    }
    Ok(())
}

/// One run of one process of a node, written `node-id@token`: the node id and a
/// token drawn when the process starts. Leases and member registrations belong to
/// incarnations, not to node ids, so that two processes sharing a node id (a pod
/// restarted while the old one is only paused, or a copy started by mistake) are
/// two holders: neither can renew, release or heartbeat for the other.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Incarnation {
    node: String,
    holder: String,
}

impl Incarnation {
    /// A new incarnation of `node`, with a random token of its own.
    pub fn new(node: impl Into<String>) -> Self {
        let node = node.into();
        let token = crate::ambient::token().simple().to_string();
        // 64 random bits tell the processes of one node apart; the rest only
        // lengthens every log line and status that shows the holder.
        let holder = format!("{node}@{}", &token[..16]);
        Self { node, holder }
    }

    /// The node id this is an incarnation of.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The holder name leases and registrations carry: `node-id@token`.
    pub fn as_str(&self) -> &str {
        &self.holder
    }
}

/// The node id in a holder name written by [`Incarnation`]: everything before the
/// last `@`, or the whole name if it has none.
pub fn node_of(holder: &str) -> &str {
    holder.rsplit_once('@').map_or(holder, |(node, _)| node)
}

impl std::fmt::Display for Incarnation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.holder)
    }
}

/// A lease as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    /// The holder's [`Incarnation`], as written by nodes: `node-id@token`.
    pub holder: String,
    /// Grows by one with every new acquisition; never reused for a name.
    pub epoch: u64,
    /// On the store's clock; after this instant anyone may take the lease.
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    /// The node id of the holder (its incarnation less the token).
    pub fn holder_node(&self) -> &str {
        node_of(&self.holder)
    }

    /// Whether it is held now, by this process's clock (for reports; the store's
    /// clock decides who may take it).
    pub fn is_live(&self) -> bool {
        self.expires_at > crate::ambient::now()
    }
}

/// Where leases live. Object safe, so a node can hold `Arc<dyn LeaseStore>`.
///
/// Contract (checked on every backend by `tests/it/broker_stores.rs`):
/// - At most one holder holds a live lease of a name at any instant of the store's clock.
///   Holders are compared as whole strings: nodes pass their [`Incarnation`], so two
///   processes of one node id are two holders.
/// - A new acquisition (of a free or expired lease, or of one another holder held)
///   increments the epoch; re-acquiring one's own live lease keeps it.
/// - Operations naming a holder and epoch change nothing unless both match a live lease.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Takes `name` for `node` for `ttl` if it is free, expired or already `node`'s.
    /// `None`: another node holds it.
    async fn try_acquire(&self, name: &str, node: &str, ttl: Duration) -> Result<Option<Lease>>;

    /// Extends `node`'s live lease of `name` at `epoch` to `ttl` from now. `None`, and
    /// nothing changed, if the lease has expired or is held by anyone else or at
    /// another epoch.
    async fn renew(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>>;

    /// Expires `name` now if `node` holds it live at `epoch`, so that another node can
    /// take it without waiting out the ttl. Otherwise does nothing.
    async fn release(&self, name: &str, node: &str, epoch: u64) -> Result<()>;

    /// The lease as last written, live or expired; `None` if it was never taken.
    async fn current(&self, name: &str) -> Result<Option<Lease>>;

    /// Raises the epoch of `node`'s live lease of `name` at `epoch` to at least
    /// `at_least` and extends it to `ttl` from now, so that the holder's next term
    /// starts above every epoch the bus still holds (a restored or reset store would
    /// otherwise make a new leader's decisions look old). The row keeps the raised
    /// epoch, so later acquisitions count on from it. `None`, and nothing changed,
    /// if the lease has expired or is held by anyone else or at another epoch.
    async fn raise_epoch(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        at_least: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>>;
}

/// Maps the tokio clock onto wall-clock timestamps, so that the memory backends can
/// run on `tokio::time::Instant` (which tests may pause and advance) yet report
/// `DateTime<Utc>` like the database does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MemoryClock {
    origin: Instant,
    origin_utc: DateTime<Utc>,
}

impl MemoryClock {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            origin_utc: crate::ambient::now(),
        }
    }

    pub(crate) fn to_utc(self, instant: Instant) -> DateTime<Utc> {
        // Both arms stay in range: instants come from this process's lifetime plus at
        // most MAX_TTL.
        let offset = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        let utc = if instant >= self.origin {
            self.origin_utc
                .checked_add_signed(offset(instant - self.origin))
        } else {
            self.origin_utc
                .checked_sub_signed(offset(self.origin - instant))
        };
        crate::store::store_precision(utc.unwrap_or(self.origin_utc))
    }
}

#[derive(Debug, Clone)]
struct HeldLease {
    holder: String,
    epoch: u64,
    expires: Instant,
}

/// Leases in this process's memory, on the tokio clock.
#[derive(Debug)]
pub struct MemoryLeaseStore {
    clock: MemoryClock,
    leases: Mutex<HashMap<String, HeldLease>>,
}

impl Default for MemoryLeaseStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryLeaseStore {
    pub fn new() -> Self {
        Self {
            clock: MemoryClock::new(),
            leases: Mutex::new(HashMap::new()),
        }
    }

    fn lease(&self, name: &str, held: &HeldLease) -> Lease {
        Lease {
            name: name.to_owned(),
            holder: held.holder.clone(),
            epoch: held.epoch,
            expires_at: self.clock.to_utc(held.expires),
        }
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, HeldLease>> {
        // A panic while holding the lock cannot leave a lease half-written (every
        // update is a single assignment), so a poisoned map is still consistent.
        self.leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl LeaseStore for MemoryLeaseStore {
    async fn try_acquire(&self, name: &str, node: &str, ttl: Duration) -> Result<Option<Lease>> {
        check_ttl(ttl)?;
        let now = Instant::now();
        let mut leases = self.leases();
        let epoch = match leases.get(name) {
            None => 1,
            Some(held) if held.expires <= now => held.epoch + 1,
            Some(held) if held.holder == node => held.epoch,
            Some(_) => return Ok(None),
        };
        let held = HeldLease {
            holder: node.to_owned(),
            epoch,
            expires: now + ttl,
        };
        let lease = self.lease(name, &held);
        leases.insert(name.to_owned(), held);
        Ok(Some(lease))
    }

    async fn renew(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        check_ttl(ttl)?;
        let now = Instant::now();
        let mut leases = self.leases();
        match leases.get_mut(name) {
            Some(held) if held.holder == node && held.epoch == epoch && held.expires > now => {
                held.expires = now + ttl;
                let held = held.clone();
                Ok(Some(self.lease(name, &held)))
            }
            _ => Ok(None),
        }
    }

    async fn release(&self, name: &str, node: &str, epoch: u64) -> Result<()> {
        let now = Instant::now();
        let mut leases = self.leases();
        match leases.get_mut(name) {
            Some(held) if held.holder == node && held.epoch == epoch && held.expires > now => {
                held.expires = now;
            }
            _ => {}
        }
        Ok(())
    }

    async fn current(&self, name: &str) -> Result<Option<Lease>> {
        Ok(self.leases().get(name).map(|held| self.lease(name, held)))
    }

    async fn raise_epoch(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        at_least: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        check_ttl(ttl)?;
        let now = Instant::now();
        let mut leases = self.leases();
        match leases.get_mut(name) {
            Some(held) if held.holder == node && held.epoch == epoch && held.expires > now => {
                held.epoch = held.epoch.max(at_least);
                held.expires = now + ttl;
                let held = held.clone();
                Ok(Some(self.lease(name, &held)))
            }
            _ => Ok(None),
        }
    }
}

/// Asks a node's [`Leadership`] to move its lease to a higher epoch, shared between
/// the driver and the coordinator. The coordinator raises the floor when the bus
/// holds decisions of an epoch at or above its own; the driver raises the lease's
/// epoch in the store at its next renewal (at once, as it is woken) and reports the
/// new epoch as a change of leadership.
#[derive(Debug, Clone, Default)]
pub struct EpochFloor {
    inner: Arc<EpochFloorInner>,
}

#[derive(Debug, Default)]
struct EpochFloorInner {
    floor: std::sync::atomic::AtomicU64,
    raised: tokio::sync::Notify,
}

impl EpochFloor {
    /// Asks for the lease's epoch to become at least `epoch`.
    pub fn raise(&self, epoch: u64) {
        let previous = self
            .inner
            .floor
            .fetch_max(epoch, std::sync::atomic::Ordering::SeqCst);
        if epoch > previous {
            self.inner.raised.notify_one();
        }
    }

    /// The highest epoch asked for so far; 0 if none.
    pub fn get(&self) -> u64 {
        self.inner.floor.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn raised(&self) {
        self.inner.raised.notified().await;
    }
}

/// Whether this node leads, as [`Leadership`] last knew it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaderState {
    Follower,
    Leader { epoch: u64 },
}

impl LeaderState {
    pub fn is_leader(&self) -> bool {
        matches!(self, LeaderState::Leader { .. })
    }
}

/// Keeps a process's claim on a lease: tries to acquire it every `ttl / 3` while a
/// follower, renews it as often while leader, and demotes the moment a renewal fails
/// or the local deadline passes. Spawn [`Leadership::run`]; watch [`Leadership::subscribe`].
///
/// The local deadline is the start of the last successful acquire or renew call plus
/// the ttl, on this node's monotonic clock. The store set the expiry after that call
/// started, so the node gives up leading no later than the store frees the lease, even
/// if the store stops answering.
///
/// The holder it claims under is an [`Incarnation`], never the bare node id: a
/// second process started with the same node id (a pod restarted while the old one
/// is paused) is then another holder, which waits for the lease to expire and leads
/// under a higher epoch, instead of sharing the old process's term.
pub struct Leadership {
    store: Arc<dyn LeaseStore>,
    name: String,
    node: String,
    ttl: Duration,
    state: watch::Sender<LeaderState>,
    floor: EpochFloor,
}

impl Leadership {
    pub fn new(
        store: Arc<dyn LeaseStore>,
        name: impl Into<String>,
        node: impl Into<String>,
        ttl: Duration,
    ) -> Result<Self> {
        check_ttl(ttl)?;
        Ok(Self {
            store,
            name: name.into(),
            node: node.into(),
            ttl,
            state: watch::channel(LeaderState::Follower).0,
            floor: EpochFloor::default(),
        })
    }

    /// The handle through which the coordinator asks for a higher epoch.
    pub fn epoch_floor(&self) -> EpochFloor {
        self.floor.clone()
    }

    /// Renews the lease held at `epoch`, raising its epoch first if the floor
    /// asks for a higher one.
    async fn renew(&self, epoch: u64) -> Result<Option<Lease>> {
        let floor = self.floor.get();
        if floor > epoch {
            tracing::info!(
                lease = %self.name, node = %self.node, epoch, raised_to = floor,
                "raising the lease's epoch above the epochs the bus holds"
            );
            return self
                .store
                .raise_epoch(&self.name, &self.node, epoch, floor, self.ttl)
                .await;
        }
        self.store
            .renew(&self.name, &self.node, epoch, self.ttl)
            .await
    }

    /// The node's state, updated at every promotion and demotion.
    pub fn subscribe(&self) -> watch::Receiver<LeaderState> {
        self.state.subscribe()
    }

    fn attempt_interval(&self) -> Duration {
        // A floor keeps a tiny ttl from turning the loop into a busy spin.
        (self.ttl / 3).max(Duration::from_millis(1))
    }

    fn set(&self, state: LeaderState) {
        let changed = self.state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
        if changed {
            match state {
                LeaderState::Leader { epoch } => {
                    crate::metrics::leadership(true, Some(epoch));
                }
                LeaderState::Follower => crate::metrics::leadership(false, None),
            }
        }
    }

    /// Logs a failure of the lease store (`None`: it answered): as a warning the
    /// first time in a run of the same failure, at debug while it repeats.
    fn log_failure(&self, last_failure: &mut Option<String>, error: Option<String>) {
        let Some(error) = error else {
            *last_failure = None;
            return;
        };
        if last_failure.as_ref() == Some(&error) {
            tracing::debug!(lease = %self.name, node = %self.node, %error, "lease store failed");
        } else {
            tracing::warn!(lease = %self.name, node = %self.node, %error, "lease store failed");
        }
        *last_failure = Some(error);
    }

    /// Runs until `cancel` is cancelled, then releases the lease if it holds it.
    pub async fn run(self, cancel: CancellationToken) {
        let interval = self.attempt_interval();
        // (epoch, local deadline) while leader.
        let mut held: Option<(u64, Instant)> = None;
        // The last failure logged as a warning, until the store answers again.
        let mut last_failure: Option<String> = None;
        loop {
            let started = Instant::now();
            let outcome = match held {
                None => tokio::select! {
                    biased;
                    () = cancel.cancelled() => break,
                    outcome = self.store.try_acquire(&self.name, &self.node, self.ttl) => outcome,
                },
                // Biased: a deadline that passed while this node waited to renew
                // demotes it before it asks the store, never after.
                Some((epoch, deadline)) => tokio::select! {
                    biased;
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep_until(deadline) => {
                        self.demote(&mut held, "the lease's local deadline passed during a renewal");
                        continue;
                    }
                    outcome = self.renew(epoch) => outcome,
                },
            };
            self.log_failure(
                &mut last_failure,
                outcome.as_ref().err().map(|e| e.to_string()),
            );
            match outcome {
                // An answer that came after the local deadline cannot be relied on:
                // the lease may already be someone else's.
                Ok(Some(_)) if Instant::now() >= started + self.ttl => {
                    self.demote(
                        &mut held,
                        "the lease store answered after the local deadline",
                    );
                }
                Ok(Some(lease)) => {
                    // Deadline from the call's start: the store's expiry is later.
                    held = Some((lease.epoch, started + self.ttl));
                    if !self.state.borrow().is_leader() {
                        tracing::info!(lease = %self.name, node = %self.node, epoch = lease.epoch, "became leader");
                    }
                    self.set(LeaderState::Leader { epoch: lease.epoch });
                }
                Ok(None) => self.demote(&mut held, "another node holds the lease"),
                Err(_) => self.demote(&mut held, "the lease store failed"),
            }
            let next = started + interval;
            // While leader the deadline (start + ttl) is always after the next
            // renewal (start + ttl / 3), so this wait never outlasts leadership.
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                () = tokio::time::sleep_until(next) => {}
                // A leader asked to raise its epoch does so at once.
                () = self.floor.raised(), if held.is_some() => {}
            }
        }
        // Stop claiming to lead before giving the lease away, so that nobody watching
        // both nodes ever sees two leaders.
        self.set(LeaderState::Follower);
        if let Some((epoch, _)) = held {
            let release = self.store.release(&self.name, &self.node, epoch);
            // Bounded: a store that does not answer lets the lease expire on its own.
            match tokio::time::timeout(self.ttl, release).await {
                Ok(Ok(())) => {
                    tracing::info!(lease = %self.name, node = %self.node, epoch, "released the lease");
                }
                Ok(Err(error)) => {
                    tracing::warn!(lease = %self.name, node = %self.node, %error, "could not release the lease; it expires on its own");
                }
                Err(_) => {
                    tracing::warn!(lease = %self.name, node = %self.node, "releasing the lease timed out; it expires on its own");
                }
            }
        }
    }

    fn demote(&self, held: &mut Option<(u64, Instant)>, reason: &str) {
        if let Some((epoch, _)) = held.take() {
            tracing::warn!(lease = %self.name, node = %self.node, epoch, reason, "no longer leader");
        }
        self.set(LeaderState::Follower);
    }
}

#[cfg(test)]
mod tests;
