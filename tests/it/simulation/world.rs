//! One simulated run: a fleet of `full` nodes (the real broker, runtime and
//! consumers) over shared memory stores and the simulated bus, an appender, and
//! a fault plan drawn from the seed. The run has a fault phase, then every fault
//! heals and the fleet must settle within the liveness bound.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::time::Instant;
use weir::broker::Broker;
use weir::broker::control::{ControlHandle, MemoryFleetStore};
use weir::broker::distributed::{COORDINATOR_LEASE, FleetServices};
use weir::broker::lease::MemoryLeaseStore;
use weir::broker::membership::MemoryMembershipStore;
use weir::broker::{BrokerRole, BrokerSettings, DistributedBroker, SubscriberSpec};
use weir::consumer::{ConsumerSettings, MemoryCheckpointStore, MemoryDeadLetterStore};
use weir::event::{Category, EventName, NewEvent, Source, StreamName, WriteCondition};
use weir::runtime::{ConsumerStores, EventRuntime};
use weir::store::{EventStore, MemoryStore};

use super::bus::{Flavour, LogBus, SharedLog};
use super::check::{Ledger, Sink};
use super::faults::{
    Gate, GatedCheckpoints, GatedDeadLetters, GatedEvents, GatedLeases, GatedMembership, Link,
};

mod liveness;
mod operator;

pub const GROUP: &str = "bridge";
const NODES: usize = 3;
/// A fault's node that stands for whichever node leads when the fault begins:
/// leadership changing hands is where the protocol keeps most state.
pub const LEADER: usize = usize::MAX;
/// Where the appender writes: (category, streams).
const STREAMS: [(&str, usize); 3] = [("orders", 8), ("refunds", 2), ("audits", 2)];
const TICK: Duration = Duration::from_millis(50);
/// How long events may take to arrive once the fleet has settled.
const DRAIN: Duration = Duration::from_secs(20);

pub fn broker_settings() -> BrokerSettings {
    BrokerSettings {
        heartbeat_interval: Duration::from_millis(200),
        member_timeout: Duration::from_millis(1500),
        refresh_interval: Duration::from_millis(500),
        lease_ttl: Duration::from_millis(1500),
        handover_timeout: Duration::from_secs(3),
    }
}

pub fn consumer_settings() -> ConsumerSettings {
    ConsumerSettings {
        batch_size: 10,
        checkpoint_every: 20,
        checkpoint_interval: Duration::from_millis(500),
        poll_interval: Duration::from_millis(200),
        ..ConsumerSettings::default()
    }
}

/// The liveness bound of DESIGN.md: member timeout + lease + two refreshes.
pub fn liveness_bound() -> Duration {
    let broker = broker_settings();
    broker.member_timeout + broker.lease_ttl + broker.refresh_interval * 2
}

/// How many partitions the group reads `orders` in at first.
const FIRST_PARTITIONS: u32 = 4;
/// The partition counts an operator may change to.
const PARTITION_COUNTS: [u32; 4] = [2, 3, 4, 8];

/// The group's sources when it reads `orders` in `partitions` partitions.
pub fn sources(partitions: u32) -> Vec<Source> {
    let mut sources: Vec<Source> = (0..partitions)
        .map(|i| format!("category:orders@{i}/{partitions}").parse().unwrap())
        .collect();
    sources.push("category:refunds".parse().unwrap());
    sources.push("category:audits".parse().unwrap());
    sources
}

/// One fault, on one node (by slot) or on the fleet.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The store answers `Unavailable`: to one node, or (`None`) to everyone.
    StoreDown(Option<usize>),
    /// Every store call of a node takes this long.
    SlowStore(usize, Duration),
    /// The node cannot reach the bus.
    BusCut(usize),
    /// The node's bus payloads are lost, held back or duplicated, each with
    /// this chance.
    Lossy(usize, f64),
    /// The node's process is paused whole: none of its tasks runs until it
    /// thaws, while time moves on.
    Freeze(usize),
    /// The node's process is killed; it starts again when the fault ends.
    Crash(usize),
    /// The node stops gracefully; it starts again when the fault ends.
    Stop(usize),
    /// A second process with the node's id starts beside it (a restart while
    /// the old process still runs, say paused); when the fault ends the old one
    /// is killed, as an operator told by its status would.
    Twin(usize),
    /// The bus compacts its log (instant).
    Compact,
    /// An operator pauses the group through the leader, and resumes it when the
    /// fault ends (retrying while no node leads).
    Pause,
    /// An operator changes the partition count of the group to this: stops
    /// every node gracefully and starts them again, with the new count, once
    /// all have stopped (as README tells). Nodes that crash or stop meanwhile
    /// wait for the new count too.
    Repartition(u32),
    /// An operator resets the checkpoint of one source (by index, wrapping
    /// around the sources of the layout of the day) through the leader, to
    /// where it stands: the leader holds the source away from its
    /// owner, the work claims and writes the row under the hold's grant, and the
    /// source goes back. Leadership may change hands in the middle.
    Reset(usize),
    /// As `Reset`, but to the start: the owner processes the source again.
    Rewind(usize),
    /// An operator replaces the store with a new, empty one while the bus keeps
    /// its decisions: stops every node gracefully, and once all have stopped
    /// starts them on the new store (as the docs tell for a restore or a
    /// re-created store). What the old store held is gone with it.
    StoreReset,
}

impl Fault {
    /// Whether the protocol promises no repeat across this fault.
    fn planned(&self) -> bool {
        matches!(
            self,
            Fault::Stop(_)
                | Fault::Compact
                | Fault::Pause
                | Fault::Reset(_)
                | Fault::Rewind(_)
                | Fault::Repartition(_)
                | Fault::StoreReset
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled {
    pub at: Duration,
    pub lasts: Duration,
    pub fault: Fault,
}

/// Everything a seed decides before the run starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub flavour: Flavour,
    pub faults: Vec<Scheduled>,
    pub fault_phase: Duration,
}

impl Plan {
    pub fn from_seed(seed: u64) -> Self {
        let mut random = StdRng::seed_from_u64(seed);
        let flavour = if random.random() {
            Flavour::Kafka
        } else {
            Flavour::JetStream
        };
        let fault_phase = Duration::from_millis(random.random_range(5_000..12_000));
        let count = random.random_range(2..8);
        let mut faults: Vec<Scheduled> = (0..count)
            .map(|_| {
                let node = match random.random_bool(0.4) {
                    true => LEADER,
                    false => random.random_range(0..NODES),
                };
                let fault = match random.random_range(0..15) {
                    0 => Fault::StoreDown(None),
                    1 => Fault::StoreDown(Some(node)),
                    2 => Fault::SlowStore(
                        node,
                        Duration::from_millis(random.random_range(50..1_500)),
                    ),
                    3 => Fault::BusCut(node),
                    4 => Fault::Lossy(node, random.random_range(0.05..0.3)),
                    5 => Fault::Freeze(node),
                    6 => Fault::Crash(node),
                    7 => Fault::Stop(node),
                    8 => Fault::Twin(node),
                    9 => Fault::Pause,
                    10 => Fault::Reset(random.random_range(0..16)),
                    12 => Fault::Rewind(random.random_range(0..16)),
                    11 => Fault::Repartition(
                        PARTITION_COUNTS[random.random_range(0..PARTITION_COUNTS.len())],
                    ),
                    13 => Fault::StoreReset,
                    _ => Fault::Compact,
                };
                let phase = u64::try_from(fault_phase.as_millis()).unwrap();
                Scheduled {
                    at: Duration::from_millis(random.random_range(500..phase)),
                    lasts: Duration::from_millis(random.random_range(100..4_000)),
                    fault,
                }
            })
            .collect();
        faults.sort_by_key(|scheduled| scheduled.at);
        Self {
            flavour,
            faults,
            fault_phase,
        }
    }

    pub fn all_planned(&self) -> bool {
        self.faults
            .iter()
            .all(|scheduled| scheduled.fault.planned())
    }

    /// Faults after which repeats are allowed (each adds a checkpoint's worth).
    fn disruptive(&self) -> u64 {
        self.faults.iter().filter(|s| !s.fault.planned()).count() as u64
    }
}

struct Process {
    label: String,
    runtime: EventRuntime,
    link: Arc<Link>,
    control: Option<ControlHandle>,
}

struct Slot {
    name: String,
    starts: u32,
    main: Option<Process>,
    twin: Option<Process>,
}

/// What one run found.
pub struct Report {
    pub violations: Vec<String>,
    pub trace_hash: u64,
    pub trace_tail: Vec<String>,
    pub repeats: u64,
}

pub struct World {
    seed: u64,
    plan: Plan,
    log: Arc<SharedLog>,
    events: Arc<MemoryStore>,
    checkpoints: Arc<MemoryCheckpointStore>,
    dead_letters: Arc<MemoryDeadLetterStore>,
    membership: Arc<MemoryMembershipStore>,
    leases: Arc<MemoryLeaseStore>,
    fleet_store: Arc<MemoryFleetStore>,
    fleet: Arc<Link>,
    ledger: Ledger,
    slots: Vec<Slot>,
    appended: BTreeMap<String, u64>,
    random: StdRng,
    /// Processes stopping gracefully.
    stopping: tokio::task::JoinSet<()>,
    /// Operators' requests under way.
    operations: tokio::task::JoinSet<()>,
    /// The link of every process started, to heal them all.
    links: Vec<Arc<Link>>,
    /// The lease holder and epoch last seen.
    leader: Option<(String, u64)>,
    /// Whether the group is to be paused (or resumed), until a leader took it.
    paused: Option<bool>,
    /// Each planned fault as it began, its node resolved.
    resolved: Vec<Option<Fault>>,
    /// How many partitions the group reads `orders` in.
    partitions: u32,
    /// Whether nodes wait to start until every process has stopped (for a new
    /// partition count or a new store).
    repartitioning: bool,
    /// Whether the store is to be replaced once every process has stopped.
    store_reset: bool,
    /// How many times the store was replaced: the appender's streams carry it,
    /// so that a new store's streams are new to the ledger.
    generation: u32,
    /// Since when no fault has been active (`None` while one is).
    calm_since: Option<Instant>,
    /// A live process leading, its epoch, and since when.
    led: Option<(String, u64, Instant)>,
    /// The link of each process a freeze froze, by the freeze's index.
    frozen: BTreeMap<usize, Arc<Link>>,
}

/// Runs the seed's plan to the end and reports what it found.
pub async fn run(seed: u64, plan: Plan, tail: usize) -> Report {
    let origin = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .to_utc();
    let _simulation = weir::ambient::simulate(seed, origin);
    let mut world = World::new(seed, plan, tail);
    for slot in 0..NODES {
        world.start(slot, false).await;
    }
    world.fault_phase().await;
    world.heal().await;
    world.settle().await;
    world.finish().await
}

impl World {
    fn new(seed: u64, plan: Plan, tail: usize) -> Self {
        let ledger = Ledger::new(tail);
        let plan_faults = plan.faults.len();
        ledger.step(format!("seed {seed}: {plan:?}"));
        Self {
            seed,
            log: SharedLog::new(plan.flavour),
            plan,
            events: Arc::new(MemoryStore::new()),
            checkpoints: Arc::new(MemoryCheckpointStore::new()),
            dead_letters: Arc::new(MemoryDeadLetterStore::new()),
            membership: Arc::new(MemoryMembershipStore::new()),
            leases: Arc::new(MemoryLeaseStore::new()),
            fleet_store: Arc::new(MemoryFleetStore::new()),
            fleet: Link::new(),
            ledger,
            slots: (0..NODES)
                .map(|i| Slot {
                    name: format!("node-{}", i + 1),
                    starts: 0,
                    main: None,
                    twin: None,
                })
                .collect(),
            appended: BTreeMap::new(),
            random: StdRng::seed_from_u64(seed ^ 0x5eed),
            stopping: tokio::task::JoinSet::new(),
            operations: tokio::task::JoinSet::new(),
            links: Vec::new(),
            leader: None,
            paused: None,
            resolved: vec![None; plan_faults],
            partitions: FIRST_PARTITIONS,
            repartitioning: false,
            store_reset: false,
            generation: 0,
            calm_since: Some(Instant::now()),
            led: None,
            frozen: BTreeMap::new(),
        }
    }

    /// Starts a process of the node in `slot` (its main one, or a twin).
    async fn start(&mut self, slot: usize, twin: bool) {
        let seed = self.seed;
        let entry = &mut self.slots[slot];
        entry.starts += 1;
        let name = entry.name.clone();
        let label = format!("{name}#{}", entry.starts);
        let link = Link::new();
        self.links.push(Arc::clone(&link));
        let gate = Gate {
            node: Arc::clone(&link),
            fleet: Arc::clone(&self.fleet),
        };
        let bus_seed = seed ^ (u64::try_from(slot).unwrap() << 40) ^ u64::from(entry.starts);
        let services = FleetServices {
            membership: Arc::new(GatedMembership {
                inner: Arc::clone(&self.membership) as _,
                gate: gate.clone(),
            }),
            leases: Arc::new(GatedLeases {
                inner: Arc::clone(&self.leases) as _,
                gate: gate.clone(),
            }),
            bus: Arc::new(LogBus::new(
                Arc::clone(&self.log),
                Arc::clone(&link),
                bus_seed,
                self.ledger.clone(),
                label.clone(),
            )),
        };
        let broker = DistributedBroker::new(&name, BrokerRole::Full, broker_settings(), services)
            .with_fleet_store(Arc::clone(&self.fleet_store) as _);
        let control = broker.control();
        let stores = ConsumerStores {
            events: Arc::new(GatedEvents {
                inner: Arc::clone(&self.events) as _,
                gate: gate.clone(),
            }),
            checkpoints: Arc::new(GatedCheckpoints {
                inner: Arc::clone(&self.checkpoints) as _,
                gate: gate.clone(),
                process: label.clone(),
                ledger: self.ledger.clone(),
                generation: self.generation,
            }),
            dead_letters: Arc::new(GatedDeadLetters {
                inner: Arc::clone(&self.dead_letters) as _,
                gate,
            }),
        };
        let runtime = EventRuntime::new(&name, Arc::new(broker), stores, consumer_settings())
            .with_sample_interval(Duration::from_secs(3600))
            .with_shutdown_grace(Duration::from_secs(2));
        let sources = sources(self.partitions);
        let sink = Sink {
            process: label.clone(),
            sources: sources.clone(),
            ledger: self.ledger.clone(),
        };
        runtime
            .register_subscription_consumer(
                SubscriberSpec::new(GROUP, format!("{GROUP}@{name}"), sources),
                Arc::new(sink),
                None,
            )
            .expect("a valid subscription");
        link.process()
            .run(runtime.start())
            .await
            .expect("the runtime starts");
        self.ledger.step(format!("{label} started"));
        let process = Process {
            label,
            runtime,
            link,
            control,
        };
        let entry = &mut self.slots[slot];
        if twin {
            entry.twin = Some(process);
        } else {
            entry.main = Some(process);
        }
    }

    async fn fault_phase(&mut self) {
        // (when, begins?, index into the plan's faults)
        let mut timeline: Vec<(Duration, bool, usize)> = Vec::new();
        for (index, scheduled) in self.plan.faults.iter().enumerate() {
            timeline.push((scheduled.at, true, index));
            timeline.push((scheduled.at + scheduled.lasts, false, index));
        }
        timeline.sort();
        let start = Instant::now();
        let mut next = 0;
        let mut active = vec![false; self.plan.faults.len()];
        while start.elapsed() < self.plan.fault_phase {
            while next < timeline.len() && timeline[next].0 <= start.elapsed() {
                let (_, begins, index) = timeline[next];
                next += 1;
                if begins {
                    active[index] = true;
                    self.begin(index).await;
                } else if active[index] {
                    active[index] = false;
                    self.end(index).await;
                }
                self.calm_since = (!active.contains(&true)).then(Instant::now);
            }
            self.append().await;
            self.note_leader().await;
            self.operate().await;
            self.restart_repartitioned().await;
            self.check_decisions_held();
            tokio::time::sleep(TICK).await;
        }
        for (index, active) in active.into_iter().enumerate() {
            if active {
                self.end(index).await;
            }
        }
    }

    fn link(&self, slot: usize) -> Option<Arc<Link>> {
        self.slots[slot].main.as_ref().map(|p| Arc::clone(&p.link))
    }

    /// The fault of the plan's entry `index`, its node resolved when it begins.
    fn resolve(&mut self, index: usize) -> Fault {
        if let Some(fault) = &self.resolved[index] {
            return fault.clone();
        }
        let leader = self.leader.as_ref().and_then(|(holder, _)| {
            let node = holder.split('@').next()?;
            self.slots.iter().position(|slot| slot.name == node)
        });
        let at = |slot: usize| match slot {
            LEADER => leader.unwrap_or(0),
            slot => slot,
        };
        let fault = match self.plan.faults[index].fault.clone() {
            Fault::StoreDown(Some(slot)) => Fault::StoreDown(Some(at(slot))),
            Fault::SlowStore(slot, slow) => Fault::SlowStore(at(slot), slow),
            Fault::BusCut(slot) => Fault::BusCut(at(slot)),
            Fault::Lossy(slot, loss) => Fault::Lossy(at(slot), loss),
            Fault::Freeze(slot) => Fault::Freeze(at(slot)),
            Fault::Crash(slot) => Fault::Crash(at(slot)),
            Fault::Stop(slot) => Fault::Stop(at(slot)),
            Fault::Twin(slot) => Fault::Twin(at(slot)),
            fault @ (Fault::StoreDown(None)
            | Fault::Compact
            | Fault::Pause
            | Fault::Reset(_)
            | Fault::Rewind(_)
            | Fault::Repartition(_)
            | Fault::StoreReset) => fault,
        };
        self.resolved[index] = Some(fault.clone());
        fault
    }

    async fn begin(&mut self, index: usize) {
        let fault = self.resolve(index);
        self.ledger.step(format!("begin {fault:?}"));
        match fault {
            Fault::StoreDown(None) => self.fleet.change(|s| s.store_down = true),
            Fault::StoreDown(Some(slot)) => self.on_link(slot, |s| s.store_down = true),
            Fault::SlowStore(slot, slow) => self.on_link(slot, |s| s.slow = slow),
            Fault::BusCut(slot) => self.on_link(slot, |s| s.bus_cut = true),
            Fault::Lossy(slot, loss) => self.on_link(slot, |s| s.loss = loss),
            Fault::Freeze(slot) => {
                // The process frozen thaws when the fault ends, even if it is
                // no longer the slot's (stopping, or replaced meanwhile).
                if let Some(link) = self.link(slot) {
                    link.change(|s| s.frozen = true);
                    self.frozen.insert(index, link);
                }
            }
            Fault::Crash(slot) => {
                if let Some(process) = self.slots[slot].main.take() {
                    process.runtime.abort().await;
                }
            }
            Fault::Stop(slot) => {
                // A frozen process stops once it thaws: the driver goes on.
                if let Some(process) = self.slots[slot].main.take() {
                    let stop = process.link.process().clone();
                    self.stopping
                        .spawn(stop.run(async move { process.runtime.stop().await }));
                }
            }
            Fault::Twin(slot) => {
                if self.slots[slot].twin.is_none() && !self.repartitioning {
                    self.start(slot, true).await;
                }
            }
            Fault::Compact => self.log.compact(),
            Fault::Pause => {
                self.paused = Some(true);
                self.operate().await;
            }
            Fault::Reset(source) => self.reset(source, false),
            Fault::Rewind(source) => self.reset(source, true),
            Fault::Repartition(partitions) => self.repartition(partitions),
            Fault::StoreReset => {
                self.store_reset = true;
                self.repartition(self.partitions);
            }
        }
    }

    async fn end(&mut self, index: usize) {
        let fault = self.resolve(index);
        self.ledger.step(format!("end {fault:?}"));
        match fault {
            Fault::StoreDown(None) => self.fleet.change(|s| s.store_down = false),
            Fault::StoreDown(Some(slot)) => self.on_link(slot, |s| s.store_down = false),
            Fault::SlowStore(slot, _) => self.on_link(slot, |s| s.slow = Duration::ZERO),
            Fault::BusCut(slot) => self.on_link(slot, |s| s.bus_cut = false),
            Fault::Lossy(slot, _) => self.on_link(slot, |s| s.loss = 0.0),
            Fault::Freeze(_) => {
                if let Some(link) = self.frozen.remove(&index) {
                    link.change(|s| s.frozen = false);
                }
            }
            Fault::Crash(slot) | Fault::Stop(slot) => {
                if self.slots[slot].main.is_none() && !self.repartitioning {
                    self.start(slot, false).await;
                }
            }
            Fault::Twin(slot) => self.retire_old_process(slot).await,
            Fault::Compact | Fault::Repartition(_) | Fault::Rewind(_) | Fault::StoreReset => {}
            Fault::Pause => {
                self.paused = Some(false);
                self.operate().await;
            }
            Fault::Reset(_) => {}
        }
    }

    /// Kills the older of two processes of the node in `slot`, if it has two.
    async fn retire_old_process(&mut self, slot: usize) {
        let entry = &mut self.slots[slot];
        if let Some(twin) = entry.twin.take() {
            if let Some(old) = entry.main.replace(twin) {
                self.ledger.step(format!("{} retired", old.label));
                old.runtime.abort().await;
            }
        }
    }

    fn on_link(&self, slot: usize, change: impl FnOnce(&mut super::faults::LinkState)) {
        if let Some(link) = self.link(slot) {
            link.change(change);
        }
    }

    /// Appends a few events at random, unless the store is down for everyone.
    async fn append(&mut self) {
        if self.fleet.state().store_down || self.random.random_bool(0.4) {
            return;
        }
        for _ in 0..self.random.random_range(1..4) {
            let (category, streams) = STREAMS[self.random.random_range(0..STREAMS.len())];
            let stream = match self.generation {
                0 => format!("s{}", self.random.random_range(0..streams)),
                generation => format!("g{generation}s{}", self.random.random_range(0..streams)),
            };
            let event = NewEvent::new(EventName::new("Happened").unwrap(), json!({}));
            let stored = self
                .events
                .append(
                    &Category::new(category).unwrap(),
                    &StreamName::new(stream.clone()).unwrap(),
                    WriteCondition::Any,
                    vec![event],
                )
                .await
                .expect("the memory store appends");
            *self
                .appended
                .entry(format!("{category}/{stream}"))
                .or_default() += stored.len() as u64;
        }
    }

    /// Notes in the trace when the coordinator lease changes hands.
    async fn note_leader(&mut self) {
        use weir::broker::lease::LeaseStore;
        let Ok(Some(lease)) = self.leases.current(COORDINATOR_LEASE).await else {
            return;
        };
        let leader = (lease.holder.clone(), lease.epoch);
        if self.leader.as_ref() != Some(&leader) {
            self.ledger
                .step(format!("{} leads at epoch {}", leader.0, leader.1));
            self.leader = Some(leader);
        }
        let live = self
            .slots
            .iter()
            .filter_map(|slot| slot.main.as_ref())
            .find(|process| {
                let leading = process.control.as_ref().and_then(ControlHandle::leading);
                leading == Some(lease.epoch) && !process.link.state().frozen
            });
        let live = live.map(|process| (process.label.clone(), lease.epoch));
        let same = |(label, epoch, _): &(String, u64, Instant)| {
            live.as_ref() == Some(&(label.clone(), *epoch))
        };
        if !self.led.as_ref().is_some_and(same) {
            self.led = live.map(|(label, epoch)| (label, epoch, Instant::now()));
        }
    }

    /// Ends every fault and starts every node that is down.
    async fn heal(&mut self) {
        self.fleet.change(|s| *s = Default::default());
        for link in &self.links {
            link.change(|s| *s = Default::default());
        }
        if self.repartitioning {
            let stopped = tokio::time::timeout(DRAIN, async {
                while self.stopping.join_next().await.is_some() {}
            });
            if stopped.await.is_err() {
                self.ledger.violate(format!(
                    "the fleet did not stop for a change of partition count or store within {DRAIN:?} of healing"
                ));
            }
            self.repartitioning = false;
            self.replace_store_if_asked();
        }
        self.calm_since = Some(Instant::now());
        for slot in 0..NODES {
            self.retire_old_process(slot).await;
            if self.slots[slot].main.is_none() {
                self.start(slot, false).await;
            }
        }
        self.ledger.step("healed".into());
    }

    /// Waits for the fleet to settle within the liveness bound, then for every
    /// event to arrive.
    async fn settle(&mut self) {
        let healed = Instant::now();
        loop {
            self.operate().await;
            self.note_leader().await;
            self.check_decisions_held();
            let unsettled = self.unsettled();
            if unsettled.is_none() {
                self.ledger
                    .step(format!("settled after {:?}", healed.elapsed()));
                break;
            }
            if healed.elapsed() > liveness_bound() {
                self.ledger.violate(format!(
                    "not settled {:?} after the last fault healed: {}",
                    liveness_bound(),
                    unsettled.unwrap_or_default()
                ));
                return;
            }
            tokio::time::sleep(TICK).await;
        }
        let settled = Instant::now();
        while !self.ledger.all_emitted(&self.appended) && settled.elapsed() < DRAIN {
            self.operate().await;
            tokio::time::sleep(TICK).await;
        }
    }

    async fn finish(mut self) -> Report {
        let settings = consumer_settings();
        // A crash or a fence loses what was processed since the last checkpoint:
        // at most `checkpoint_every` events, or what arrives within
        // `checkpoint_interval`, plus the batch in flight and the one read ahead.
        let per_episode = settings.checkpoint_every + 2 * settings.batch_size as u64;
        let bound = if self.plan.all_planned() {
            0
        } else {
            per_episode * self.plan.disruptive()
        };
        self.ledger.verdict(&self.appended, bound);
        if tokio::time::timeout(DRAIN, async {
            while self.stopping.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            self.ledger.violate(format!(
                "a graceful stop did not finish within {DRAIN:?} after healing"
            ));
        }
        for slot in self.slots {
            for process in [slot.main, slot.twin].into_iter().flatten() {
                process.runtime.abort().await;
            }
        }
        Report {
            violations: self.ledger.violations(),
            trace_hash: self.ledger.trace_hash(),
            trace_tail: self.ledger.trace_tail(),
            repeats: self.ledger.repeats(),
        }
    }
}
