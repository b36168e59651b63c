//! The membership registry: which subscribers exist, in which groups, on which node,
//! asking for which sources, and whether they are alive (they heartbeat; the
//! coordinator counts only those heard from within the member timeout).
//!
//! Backends: [`MemoryMembershipStore`] (on the tokio clock) and
//! `PostgresMembershipStore` (feature `postgres`, on the database clock). [`Membership`]
//! keeps one node's subscribers registered.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::lease::{MAX_TTL, MemoryClock};
use crate::event::Source;
use crate::store::Result;

/// A subscriber as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRecord {
    pub group: String,
    pub subscriber: String,
    /// The incarnation of the node the subscriber runs on (`node-id@token`), which
    /// heartbeats for it: a second process of the same node id that registers the
    /// subscriber takes the record over, and the first one's heartbeats stop
    /// counting.
    pub node: String,
    /// What the subscriber asks to be allocated.
    pub sources: BTreeSet<Source>,
    pub tags: BTreeSet<String>,
    /// On the store's clock.
    pub heartbeat_at: DateTime<Utc>,
}

impl MemberRecord {
    /// The node id the subscriber runs on (its incarnation less the token).
    pub fn node_id(&self) -> &str {
        super::lease::node_of(&self.node)
    }
}

/// What a node registers for one of its subscribers: a [`MemberRecord`] less the
/// heartbeat time, which the store sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub group: String,
    pub subscriber: String,
    pub node: String,
    pub sources: BTreeSet<Source>,
    pub tags: BTreeSet<String>,
}

impl Registration {
    pub fn key(&self) -> SubscriberKey {
        SubscriberKey::new(&self.group, &self.subscriber)
    }
}

/// A subscriber's identity: unique within its group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubscriberKey {
    pub group: String,
    pub subscriber: String,
}

impl SubscriberKey {
    pub fn new(group: impl Into<String>, subscriber: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            subscriber: subscriber.into(),
        }
    }
}

/// Where membership lives. Object safe, so a node can hold `Arc<dyn MembershipStore>`.
///
/// Durations beyond [`MAX_TTL`] are taken as [`MAX_TTL`]: longer means "forever" anyway.
#[async_trait]
pub trait MembershipStore: Send + Sync + 'static {
    /// Inserts or replaces the subscriber's record, heartbeat now.
    async fn register(&self, registration: &Registration) -> Result<MemberRecord>;

    /// Refreshes the heartbeat of `node`'s records among `subscribers`, and returns
    /// those that have no record at all (e.g. purged while the node was unreachable),
    /// for the node to register again. A record another process registered under
    /// the same key (a second process started with the same node id, while this
    /// one was paused or cut off) is left alone and fails the heartbeat with
    /// [`Error::MemberTaken`](crate::store::Error::MemberTaken): heartbeats that
    /// do not get through make this process fence itself, so that only the one
    /// that registered last consumes.
    async fn heartbeat(
        &self,
        node: &str,
        subscribers: &[SubscriberKey],
    ) -> Result<Vec<SubscriberKey>>;

    /// Removes the subscriber's record; `false` if it had none.
    async fn leave(&self, group: &str, subscriber: &str) -> Result<bool>;

    /// The group's members heard from within `member_timeout`, ordered by subscriber.
    async fn live(&self, group: &str, member_timeout: Duration) -> Result<Vec<MemberRecord>>;

    /// Every group's members heard from within `member_timeout`, ordered by group,
    /// then subscriber: what a coordinator reads on each tick, in one round trip.
    async fn live_all(&self, member_timeout: Duration) -> Result<Vec<MemberRecord>>;

    /// Every group with at least one record, live or not, in order.
    async fn groups(&self) -> Result<Vec<String>>;

    /// Removes records not heard from for longer than `older_than`; returns how many.
    async fn purge(&self, older_than: Duration) -> Result<u64>;
}

/// The heartbeat's refusal for `key`, which `holder` registered.
pub(crate) fn taken(key: &SubscriberKey, holder: &str) -> crate::store::Error {
    crate::store::Error::MemberTaken {
        group: key.group.clone(),
        subscriber: key.subscriber.clone(),
        holder: holder.to_owned(),
    }
}

#[derive(Debug, Clone)]
struct Entry {
    node: String,
    sources: BTreeSet<Source>,
    tags: BTreeSet<String>,
    heartbeat: Instant,
}

/// Membership in this process's memory, on the tokio clock.
#[derive(Debug)]
pub struct MemoryMembershipStore {
    clock: MemoryClock,
    members: Mutex<HashMap<SubscriberKey, Entry>>,
}

impl Default for MemoryMembershipStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryMembershipStore {
    pub fn new() -> Self {
        Self {
            clock: MemoryClock::new(),
            members: Mutex::new(HashMap::new()),
        }
    }

    fn members(&self) -> std::sync::MutexGuard<'_, HashMap<SubscriberKey, Entry>> {
        // Every update is a single insert, assignment or removal, so a map whose lock
        // was poisoned by a panic elsewhere is still consistent.
        self.members
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, key: &SubscriberKey, entry: &Entry) -> MemberRecord {
        MemberRecord {
            group: key.group.clone(),
            subscriber: key.subscriber.clone(),
            node: entry.node.clone(),
            sources: entry.sources.clone(),
            tags: entry.tags.clone(),
            heartbeat_at: self.clock.to_utc(entry.heartbeat),
        }
    }
}

impl MemoryMembershipStore {
    /// Live records whose key passes `wanted`, ordered by group, then subscriber.
    fn live_where(
        &self,
        member_timeout: Duration,
        wanted: impl Fn(&SubscriberKey) -> bool,
    ) -> Vec<MemberRecord> {
        let now = Instant::now();
        let timeout = member_timeout.min(MAX_TTL);
        let members = self.members();
        let mut live: Vec<MemberRecord> = members
            .iter()
            .filter(|(key, entry)| wanted(key) && age(now, entry.heartbeat) < timeout)
            .map(|(key, entry)| self.record(key, entry))
            .collect();
        live.sort_by(|a, b| (&a.group, &a.subscriber).cmp(&(&b.group, &b.subscriber)));
        live
    }
}

/// How long ago `instant` was, zero if it is in the future.
fn age(now: Instant, instant: Instant) -> Duration {
    now.saturating_duration_since(instant)
}

#[async_trait]
impl MembershipStore for MemoryMembershipStore {
    async fn register(&self, registration: &Registration) -> Result<MemberRecord> {
        let key = registration.key();
        let entry = Entry {
            node: registration.node.clone(),
            sources: registration.sources.clone(),
            tags: registration.tags.clone(),
            heartbeat: Instant::now(),
        };
        let record = self.record(&key, &entry);
        self.members().insert(key, entry);
        Ok(record)
    }

    async fn heartbeat(
        &self,
        node: &str,
        subscribers: &[SubscriberKey],
    ) -> Result<Vec<SubscriberKey>> {
        let now = Instant::now();
        let mut members = self.members();
        let mut missing = Vec::new();
        for key in subscribers {
            match members.get_mut(key) {
                Some(entry) if entry.node == node => entry.heartbeat = now,
                Some(entry) => return Err(taken(key, &entry.node)),
                None => missing.push(key.clone()),
            }
        }
        Ok(missing)
    }

    async fn leave(&self, group: &str, subscriber: &str) -> Result<bool> {
        Ok(self
            .members()
            .remove(&SubscriberKey::new(group, subscriber))
            .is_some())
    }

    async fn live(&self, group: &str, member_timeout: Duration) -> Result<Vec<MemberRecord>> {
        Ok(self.live_where(member_timeout, |key| key.group == group))
    }

    async fn live_all(&self, member_timeout: Duration) -> Result<Vec<MemberRecord>> {
        Ok(self.live_where(member_timeout, |_| true))
    }

    async fn groups(&self) -> Result<Vec<String>> {
        let groups: BTreeSet<String> = self.members().keys().map(|k| k.group.clone()).collect();
        Ok(groups.into_iter().collect())
    }

    async fn purge(&self, older_than: Duration) -> Result<u64> {
        let now = Instant::now();
        let older_than = older_than.min(MAX_TTL);
        let mut members = self.members();
        let before = members.len();
        members.retain(|_, entry| age(now, entry.heartbeat) <= older_than);
        Ok((before - members.len()) as u64)
    }
}

/// One node's subscribers and their registrations: registers them, and keeps them
/// registered through heartbeats, re-registering any whose record was purged.
pub struct Membership {
    store: Arc<dyn MembershipStore>,
    node: String,
    subscribers: BTreeMap<SubscriberKey, Registration>,
}

impl Membership {
    pub fn new(store: Arc<dyn MembershipStore>, node: impl Into<String>) -> Self {
        Self {
            store,
            node: node.into(),
            subscribers: BTreeMap::new(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Adds (or replaces) a local subscriber; registers nothing yet.
    pub fn add(
        &mut self,
        group: impl Into<String>,
        subscriber: impl Into<String>,
        sources: BTreeSet<Source>,
        tags: BTreeSet<String>,
    ) -> SubscriberKey {
        let registration = Registration {
            group: group.into(),
            subscriber: subscriber.into(),
            node: self.node.clone(),
            sources,
            tags,
        };
        let key = registration.key();
        self.subscribers.insert(key.clone(), registration);
        key
    }

    /// Forgets a local subscriber and removes its record.
    pub async fn remove(&mut self, key: &SubscriberKey) -> Result<()> {
        if self.subscribers.remove(key).is_some() {
            self.store.leave(&key.group, &key.subscriber).await?;
        }
        Ok(())
    }

    pub fn subscribers(&self) -> impl Iterator<Item = &Registration> {
        self.subscribers.values()
    }

    /// Registers every local subscriber.
    pub async fn register_all(&self) -> Result<()> {
        for registration in self.subscribers.values() {
            self.store.register(registration).await?;
        }
        Ok(())
    }

    /// Heartbeats for every local subscriber and registers again those whose record
    /// has gone. Returns the ones registered again.
    ///
    /// A record another process of this node registered since (see
    /// [`MembershipStore::heartbeat`]) fails the heartbeat while that process
    /// lives; once it has missed its heartbeats for `member_timeout` (it was
    /// killed, or is paused for as long as any dead member), this process takes
    /// the record back. Without that, a process that lost its records to a
    /// process that then died would stay fenced until the dead records were
    /// purged, and its node would consume nothing meanwhile.
    pub async fn heartbeat_once(&self, member_timeout: Duration) -> Result<Vec<SubscriberKey>> {
        let keys: Vec<SubscriberKey> = self.subscribers.keys().cloned().collect();
        let mut taken_back = Vec::new();
        loop {
            match self.store.heartbeat(&self.node, &keys).await {
                Ok(missing) => {
                    let mut again = self.register_missing(missing).await?;
                    again.append(&mut taken_back);
                    return Ok(again);
                }
                Err(crate::store::Error::MemberTaken {
                    group,
                    subscriber,
                    holder,
                }) => {
                    let key = SubscriberKey::new(group, subscriber);
                    let live = self.store.live(&key.group, member_timeout).await?;
                    let registration = self.subscribers.get(&key);
                    let holder_lives = live.iter().any(|r| r.subscriber == key.subscriber);
                    let (Some(registration), false) = (registration, holder_lives) else {
                        return Err(taken(&key, &holder));
                    };
                    tracing::warn!(group = %key.group, subscriber = %key.subscriber, %holder, "the process that took this subscriber's record over is dead: taking it back");
                    self.store.register(registration).await?;
                    taken_back.push(key);
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn register_missing(&self, missing: Vec<SubscriberKey>) -> Result<Vec<SubscriberKey>> {
        for key in &missing {
            if let Some(registration) = self.subscribers.get(key) {
                tracing::info!(group = %key.group, subscriber = %key.subscriber, "member record gone, registering again");
                self.store.register(registration).await?;
            }
        }
        Ok(missing)
    }

    /// Removes every local subscriber's record, for a clean shutdown.
    pub async fn leave_all(&self) -> Result<()> {
        for key in self.subscribers.keys() {
            self.store.leave(&key.group, &key.subscriber).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(list: &[&str]) -> BTreeSet<Source> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    // Tokio's paused clock, which the memory store reads: sleeps are exact.
    const SHORT: Duration = Duration::from_millis(50);
    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn memory_live_follows_the_clock() {
        let store = Arc::new(MemoryMembershipStore::new());
        let mut membership = Membership::new(store.clone(), "node-a");
        membership.add("g", "s1", sources(&["log"]), BTreeSet::new());
        membership.register_all().await.unwrap();
        assert_eq!(store.live("g", LONG).await.unwrap().len(), 1);

        tokio::time::sleep(SHORT * 2).await;
        assert!(store.live("g", SHORT).await.unwrap().is_empty());
        assert_eq!(store.live("g", LONG).await.unwrap().len(), 1);

        assert!(membership.heartbeat_once(LONG).await.unwrap().is_empty());
        assert_eq!(store.live("g", SHORT).await.unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_once_registers_purged_subscribers_again() {
        let store = Arc::new(MemoryMembershipStore::new());
        let mut membership = Membership::new(store.clone(), "node-a");
        let key = membership.add("g", "s1", sources(&["category:orders"]), BTreeSet::new());
        membership.register_all().await.unwrap();
        tokio::time::sleep(SHORT * 2).await;
        assert_eq!(store.purge(SHORT).await.unwrap(), 1);
        assert!(store.live("g", LONG).await.unwrap().is_empty());

        assert_eq!(membership.heartbeat_once(LONG).await.unwrap(), vec![key]);
        let live = store.live("g", LONG).await.unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].sources, sources(&["category:orders"]));
    }

    #[tokio::test(start_paused = true)]
    async fn another_process_record_is_left_alone_and_fails_the_heartbeat() {
        let store = Arc::new(MemoryMembershipStore::new());
        let mut theirs = Membership::new(store.clone(), "node-b");
        theirs.add("g", "s1", BTreeSet::new(), BTreeSet::new());
        theirs.register_all().await.unwrap();
        let mut ours = Membership::new(store.clone(), "node-a");
        ours.add("g", "s1", BTreeSet::new(), BTreeSet::new());

        assert!(matches!(
            ours.heartbeat_once(LONG).await,
            Err(crate::store::Error::MemberTaken { holder, .. }) if holder == "node-b"
        ));
        let live = store.live("g", Duration::from_secs(10)).await.unwrap();
        assert_eq!(live[0].node, "node-b");

        // Once the other process has missed its heartbeats for a member
        // timeout, this one takes its record back.
        tokio::time::sleep(SHORT * 2).await;
        let key = SubscriberKey::new("g", "s1");
        assert_eq!(ours.heartbeat_once(SHORT).await.unwrap(), vec![key.clone()]);
        let live = store.live("g", SHORT).await.unwrap();
        assert_eq!(live[0].node, "node-a");
        assert!(matches!(
            theirs.heartbeat_once(SHORT).await,
            Err(crate::store::Error::MemberTaken { holder, .. }) if holder == "node-a"
        ));
    }
}
