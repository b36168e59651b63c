//! In-process fleets for broker tests: nodes sharing membership and lease stores
//! (memory or Postgres) and a memory bus, whose subscribers write every accept and
//! withdraw into one [`Ledger`] that catches two owners of a source at one instant.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use weir::broker::distributed::{COORDINATOR_LEASE, FleetServices};
use weir::broker::lease::{Lease, LeaseStore, MemoryLeaseStore};
use weir::broker::membership::{MembershipStore, MemoryMembershipStore};
use weir::broker::{
    Broker, BrokerRole, BrokerSettings, DistributedBroker, Subscriber, SubscriberError,
    SubscriberSpec,
};
use weir::bus::{AllocationBus, Decision, MemoryBus};
use weir::event::{Cursor, Source};
use weir::postgres::{PostgresLeaseStore, PostgresMembershipStore};

use super::TestPostgres;

/// Short timings, so that failures are noticed within seconds, yet wide enough
/// apart that a loaded machine's scheduling delays do not make a live node look dead.
pub fn settings() -> BrokerSettings {
    BrokerSettings {
        heartbeat_interval: Duration::from_millis(200),
        member_timeout: Duration::from_millis(1500),
        refresh_interval: Duration::from_millis(500),
        lease_ttl: Duration::from_millis(1500),
        handover_timeout: Duration::from_secs(3),
    }
}

/// The stores and bus one fleet shares.
pub struct Services {
    pub membership: Arc<dyn MembershipStore>,
    pub leases: Arc<dyn LeaseStore>,
    pub bus: MemoryBus,
    _db: Option<TestPostgres>,
}

impl Services {
    pub fn memory() -> Self {
        Self {
            membership: Arc::new(MemoryMembershipStore::new()),
            leases: Arc::new(MemoryLeaseStore::new()),
            bus: MemoryBus::new(),
            _db: None,
        }
    }

    /// `None` (after noting the skip) when Postgres is unreachable and not required.
    pub async fn postgres() -> Option<Self> {
        let db = TestPostgres::start().await?;
        Some(Self {
            membership: Arc::new(PostgresMembershipStore::new(db.store.clone())),
            leases: Arc::new(PostgresLeaseStore::new(db.store.clone())),
            bus: MemoryBus::new(),
            _db: Some(db),
        })
    }

    /// The fleet's services, as every node shares them.
    pub fn fleet(&self) -> FleetServices {
        self.for_node(Arc::clone(&self.leases))
    }

    fn for_node(&self, leases: Arc<dyn LeaseStore>) -> FleetServices {
        FleetServices {
            membership: Arc::clone(&self.membership),
            leases,
            bus: Arc::new(self.bus.clone()),
        }
    }
}

/// Who owns what, as the subscribers themselves report it, and every moment a
/// source had two owners.
#[derive(Default)]
pub struct Ledger {
    state: Mutex<LedgerState>,
}

#[derive(Default)]
struct LedgerState {
    /// (group, source) to the subscriber consuming it.
    owners: HashMap<(String, Source), String>,
    violations: Vec<String>,
    accepts: usize,
}

impl Ledger {
    fn state(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap()
    }

    fn accepted(&self, group: &str, subscriber: &str, source: &Source) {
        let mut state = self.state();
        state.accepts += 1;
        let key = (group.to_owned(), source.clone());
        if let Some(owner) = state.owners.insert(key, subscriber.to_owned()) {
            state.violations.push(format!(
                "{group}: {subscriber} accepted {source} while {owner} still consumed it"
            ));
        }
    }

    fn withdrew(&self, group: &str, subscriber: &str, source: &Source) {
        let mut state = self.state();
        let key = (group.to_owned(), source.clone());
        match state.owners.get(&key) {
            Some(owner) if owner == subscriber => {
                state.owners.remove(&key);
            }
            other => {
                let other = other.cloned();
                state.violations.push(format!(
                    "{group}: {subscriber} withdrew {source}, which it did not consume (owner: {other:?})"
                ));
            }
        }
    }

    /// A node died: its subscribers consume nothing from now on.
    fn died(&self, subscribers: &BTreeSet<String>) {
        self.state()
            .owners
            .retain(|_, owner| !subscribers.contains(owner));
    }

    pub fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }

    /// Source to owner, for one group.
    pub fn owners(&self, group: &str) -> BTreeMap<Source, String> {
        self.state()
            .owners
            .iter()
            .filter(|((g, _), _)| g == group)
            .map(|((_, source), owner)| (source.clone(), owner.clone()))
            .collect()
    }

    pub fn accepts(&self) -> usize {
        self.state().accepts
    }
}

/// A subscriber that writes what it is told into the ledger. Withdrawing takes a
/// moment, like a consumer finishing its batch and storing its checkpoint, which
/// gives a wrong handover a window in which to show.
pub struct RecordingSubscriber {
    group: String,
    id: String,
    ledger: Arc<Ledger>,
}

impl RecordingSubscriber {
    pub fn new(group: &str, id: &str, ledger: Arc<Ledger>) -> Self {
        Self {
            group: group.to_owned(),
            id: id.to_owned(),
            ledger,
        }
    }
}

#[async_trait]
impl Subscriber for RecordingSubscriber {
    async fn accept(&self, source: &Source) -> Result<(), SubscriberError> {
        // Counted as consuming from the moment it is asked to.
        self.ledger.accepted(&self.group, &self.id, source);
        Ok(())
    }

    async fn withdraw(&self, source: &Source) -> Result<Option<Cursor>, SubscriberError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Counted as consuming until it returns.
        self.ledger.withdrew(&self.group, &self.id, source);
        Ok(None)
    }
}

/// A lease store that a test can make fail, as when one node loses its database
/// connection; it counts the acquire attempts that reach it.
pub struct SwitchableLeases {
    inner: Arc<dyn LeaseStore>,
    failing: AtomicBool,
    pub acquire_attempts: AtomicUsize,
}

impl SwitchableLeases {
    pub fn new(inner: Arc<dyn LeaseStore>) -> Self {
        Self {
            inner,
            failing: AtomicBool::new(false),
            acquire_attempts: AtomicUsize::new(0),
        }
    }

    pub fn fail(&self) {
        self.failing.store(true, Ordering::SeqCst);
    }

    fn check(&self) -> weir::broker::lease::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(weir::broker::lease::LeaseError::Store(
                weir::store::Error::Unavailable("switched off by the test".into()),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl LeaseStore for SwitchableLeases {
    async fn try_acquire(
        &self,
        name: &str,
        node: &str,
        ttl: Duration,
    ) -> weir::broker::lease::Result<Option<Lease>> {
        self.acquire_attempts.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.try_acquire(name, node, ttl).await
    }
    async fn renew(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> weir::broker::lease::Result<Option<Lease>> {
        self.check()?;
        self.inner.renew(name, node, epoch, ttl).await
    }
    async fn release(&self, name: &str, node: &str, epoch: u64) -> weir::broker::lease::Result<()> {
        self.check()?;
        self.inner.release(name, node, epoch).await
    }
    async fn current(&self, name: &str) -> weir::broker::lease::Result<Option<Lease>> {
        self.inner.current(name).await
    }
    async fn raise_epoch(
        &self,
        name: &str,
        node: &str,
        epoch: u64,
        at_least: u64,
        ttl: Duration,
    ) -> weir::broker::lease::Result<Option<Lease>> {
        self.check()?;
        self.inner
            .raise_epoch(name, node, epoch, at_least, ttl)
            .await
    }
}

pub struct Node {
    pub broker: DistributedBroker,
    pub role: BrokerRole,
    pub leases: Arc<SwitchableLeases>,
    /// Subscriber ids on this node.
    pub subscribers: BTreeSet<String>,
}

/// A fleet of in-process nodes; every observing node runs one subscriber of each
/// group, and every subscriber requests all of its group's sources.
pub struct Fleet {
    pub services: Services,
    pub ledger: Arc<Ledger>,
    pub nodes: BTreeMap<String, Node>,
    pub groups: Vec<String>,
    pub sources: usize,
    started: usize,
}

impl Fleet {
    pub fn new(services: Services, groups: usize, sources: usize) -> Self {
        super::init_logging();
        Self {
            services,
            ledger: Arc::default(),
            nodes: BTreeMap::new(),
            groups: (0..groups).map(|g| format!("group-{g:02}")).collect(),
            sources,
            started: 0,
        }
    }

    pub fn sources_of(&self, group: &str) -> BTreeSet<Source> {
        (0..self.sources)
            .map(|i| format!("stream:{group}/entity-{i}").parse().unwrap())
            .collect()
    }

    /// A broker of this fleet that is neither registered with subscribers nor
    /// started, and the lease store it uses.
    fn broker_with_leases(
        &self,
        name: &str,
        role: BrokerRole,
    ) -> (DistributedBroker, Arc<SwitchableLeases>) {
        let leases = Arc::new(SwitchableLeases::new(Arc::clone(&self.services.leases)));
        let services = self
            .services
            .for_node(Arc::clone(&leases) as Arc<dyn LeaseStore>);
        let broker = DistributedBroker::new(name, role, settings(), services);
        (broker, leases)
    }

    /// A broker of this fleet, not started and not tracked by it.
    pub fn build_broker(&self, name: &str, role: BrokerRole) -> DistributedBroker {
        self.broker_with_leases(name, role).0
    }

    /// Starts a node of `role` named `node-N`; returns its name.
    pub async fn start_node(&mut self, role: BrokerRole) -> String {
        self.started += 1;
        let name = format!("node-{}", self.started);
        let (broker, leases) = self.broker_with_leases(&name, role);
        let mut subscribers = BTreeSet::new();
        if role.observes() {
            for group in &self.groups {
                let id = format!("{group}@{name}");
                let subscriber = RecordingSubscriber::new(group, &id, Arc::clone(&self.ledger));
                broker
                    .register(
                        SubscriberSpec::new(group, &id, self.sources_of(group)),
                        Arc::new(subscriber),
                    )
                    .unwrap();
                subscribers.insert(id);
            }
        }
        broker.start().await.unwrap();
        self.nodes.insert(
            name.clone(),
            Node {
                broker,
                role,
                leases,
                subscribers,
            },
        );
        name
    }

    /// Stops a node gracefully: it withdraws, leaves and gives up leadership.
    pub async fn stop_node(&mut self, name: &str) {
        let node = self.nodes.remove(name).expect("a running node");
        node.broker.stop().await;
    }

    /// Kills a node: nothing is withdrawn, left or released.
    pub async fn crash_node(&mut self, name: &str) {
        let node = self.nodes.remove(name).expect("a running node");
        node.broker.abort().await;
        self.ledger.died(&node.subscribers);
    }

    /// The coordinator lease, if any holds it now, its holder given as the node id
    /// (as the fleet names its nodes) rather than the incarnation.
    pub async fn leader(&self) -> Option<Lease> {
        self.services
            .leases
            .current(COORDINATOR_LEASE)
            .await
            .unwrap()
            .filter(|lease| lease.expires_at > chrono::Utc::now())
            .map(|lease| Lease {
                holder: lease.holder_node().to_owned(),
                ..lease
            })
    }

    /// Waits until the fleet has settled, failing the test if that takes longer
    /// than `bound` or any source ever had two owners. Returns how long it took.
    pub async fn settle(&self, bound: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let problem = self.unsettled().await;
            let violations = self.ledger.violations();
            assert!(violations.is_empty(), "two owners at once: {violations:#?}");
            match problem {
                None => return started.elapsed(),
                Some(problem) if started.elapsed() > bound => {
                    panic!("the fleet did not settle within {bound:?}: {problem}")
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// What is still unsettled, if anything: a group whose newest decision has a
    /// handover, names a subscriber that is not running, leaves a source unowned or
    /// is unbalanced, or whose subscribers do not consume exactly what it says.
    async fn unsettled(&self) -> Option<String> {
        let observers: Vec<&Node> = self
            .nodes
            .values()
            .filter(|node| node.role.observes())
            .collect();
        if observers.is_empty() {
            return None;
        }
        let decisions: HashMap<String, Decision> = self
            .services
            .bus
            .retained()
            .await
            .unwrap()
            .into_iter()
            .map(|decision| (decision.group.clone(), decision))
            .collect();
        for group in &self.groups {
            let Some(decision) = decisions.get(group) else {
                return Some(format!("{group}: no decision yet"));
            };
            if !decision.handovers.is_empty() {
                return Some(format!(
                    "{group}: handovers in flight: {:?}",
                    decision.handovers
                ));
            }
            let running: BTreeSet<String> = observers
                .iter()
                .map(|node| format!("{group}@{}", node.broker.node()))
                .collect();
            let mut decided = BTreeMap::new();
            for (subscriber, sources) in &decision.owners {
                if !running.contains(subscriber) {
                    return Some(format!(
                        "{group}: {subscriber} owns sources but is not running"
                    ));
                }
                for source in sources {
                    if decided.insert(source.clone(), subscriber.clone()).is_some() {
                        return Some(format!("{group}: {source} decided twice"));
                    }
                }
            }
            let wanted = self.sources_of(group);
            if decided.keys().cloned().collect::<BTreeSet<_>>() != wanted {
                return Some(format!("{group}: not every source is owned: {decided:?}"));
            }
            let loads: Vec<usize> = running
                .iter()
                .map(|subscriber| decision.owners.get(subscriber).map_or(0, BTreeSet::len))
                .collect();
            let (least, most) = (loads.iter().min()?, loads.iter().max()?);
            if most - least > 1 {
                return Some(format!("{group}: unbalanced loads {loads:?}"));
            }
            let consumed = self.ledger.owners(group);
            if consumed != decided {
                return Some(format!(
                    "{group}: subscribers consume {consumed:?}, the decision says {decided:?}"
                ));
            }
        }
        None
    }
}
