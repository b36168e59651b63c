//! [`DistributedBroker`]: a node of a fleet that coordinates over a bus. It runs
//! what its role asks for: the leadership driver and the coordinator (roles
//! `coordinator` and `full`), the observer with the local subscribers (roles
//! `observer` and `full`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::control::{COMMAND_CAPACITY, Command, ControlHandle, FleetStore, MemoryFleetStore};
use super::coordinator::Coordinator;
use super::lease::{Incarnation, Leadership, LeaseStore};
use super::membership::MembershipStore;
use super::observer::Observer;
use super::{
    Broker, BrokerError, BrokerRole, BrokerSettings, BrokerStatus, Subscriber, SubscriberSpec,
    check_registration, supervised,
};
use crate::bus::AllocationBus;
use crate::lifecycle::Journal;

/// The name of the lease whose holder coordinates the fleet. Fleets are told
/// apart by their store schema, so one name serves.
pub const COORDINATOR_LEASE: &str = "coordinator";

/// The services a fleet shares: membership and leases (in the store) and the bus.
#[derive(Clone)]
pub struct FleetServices {
    pub membership: Arc<dyn MembershipStore>,
    pub leases: Arc<dyn LeaseStore>,
    pub bus: Arc<dyn AllocationBus>,
}

/// The coordinator's ends of a [`ControlHandle`]: the commands it takes, and
/// where it says under which epoch it leads.
type ControlEnds = (mpsc::Receiver<Command>, watch::Sender<Option<u64>>);

/// One node of a coordinated fleet.
pub struct DistributedBroker {
    node: String,
    /// This process's run of the node: it holds the lease, signs decisions and
    /// owns the member registrations, so that another process started with the
    /// same node id is a stranger to them.
    incarnation: Incarnation,
    role: BrokerRole,
    settings: BrokerSettings,
    services: FleetServices,
    required_tags: BTreeMap<String, BTreeSet<String>>,
    /// Where the coordinator records leadership, members and source moves.
    journal: Journal,
    state: Mutex<State>,
    /// The first task (coordinator, leadership, observer) to end on its own.
    failure: Arc<watch::Sender<Option<String>>>,
    /// Paused groups and node reports.
    fleet: Arc<dyn FleetStore>,
    control: ControlHandle,
    /// The coordinator's ends of `control`, handed to it when it starts.
    control_ends: Mutex<Option<ControlEnds>>,
}

enum State {
    Configured(Vec<(SubscriberSpec, Arc<dyn Subscriber>)>),
    Started(Started),
    Stopping(Vec<watch::Receiver<BrokerStatus>>),
    Stopped,
}

/// The running halves; the observer is stopped before the coordinator, so that a
/// full node's own `leaving` is still decided on by itself if it leads.
struct Started {
    observer: Option<Half>,
    coordinator: Option<Half>,
}

struct Half {
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    status: watch::Receiver<BrokerStatus>,
}

impl Half {
    async fn stop(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    async fn abort(mut self) {
        self.tasks.shutdown().await;
    }
}

impl DistributedBroker {
    pub fn new(
        node: impl Into<String>,
        role: BrokerRole,
        settings: BrokerSettings,
        services: FleetServices,
    ) -> Self {
        let node = node.into();
        let (commands, receiver) = mpsc::channel(COMMAND_CAPACITY);
        let (leading_sender, leading) = watch::channel(None);
        let control = ControlHandle {
            commands,
            leading,
            leases: Arc::clone(&services.leases),
            lease_name: COORDINATOR_LEASE,
        };
        Self {
            incarnation: Incarnation::new(&node),
            node,
            role,
            settings,
            services,
            required_tags: BTreeMap::new(),
            journal: Journal::disabled(),
            state: Mutex::new(State::Configured(Vec::new())),
            failure: Arc::new(watch::channel(None).0),
            fleet: Arc::new(MemoryFleetStore::new()),
            control,
            control_ends: Mutex::new(Some((receiver, leading_sender))),
        }
    }

    /// Where paused groups are kept (default: this process's memory). Every node
    /// of a fleet should be given the same store, so a new leader finds them.
    #[must_use]
    pub fn with_fleet_store(mut self, fleet: Arc<dyn FleetStore>) -> Self {
        self.fleet = fleet;
        self
    }

    /// Placement tags a subscriber of `group` must carry to own its sources. Only
    /// coordinating nodes use them; every node of a fleet should be given the same.
    #[must_use]
    pub fn with_required_tags<T: Into<String>>(
        mut self,
        group: impl Into<String>,
        tags: impl IntoIterator<Item = T>,
    ) -> Self {
        self.required_tags
            .entry(group.into())
            .or_default()
            .extend(tags.into_iter().map(Into::into));
        self
    }

    /// Records what the coordinator sees happen to the fleet in `journal` (by
    /// default nowhere).
    #[must_use]
    pub fn with_journal(mut self, journal: Journal) -> Self {
        self.journal = journal;
        self
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// This process's incarnation of the node: the holder of its lease and of its
    /// member registrations.
    pub fn incarnation(&self) -> &Incarnation {
        &self.incarnation
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change of state is a single assignment, so a poisoned lock still
        // guards a whole value.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn supervised(
        &self,
        what: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
        cancel: &CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        supervised(what, task, cancel.clone(), Arc::clone(&self.failure))
    }

    fn start_coordinator(&self) -> Result<Half, BrokerError> {
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let leadership = Leadership::new(
            Arc::clone(&self.services.leases),
            COORDINATOR_LEASE,
            self.incarnation.as_str(),
            self.settings.lease_ttl,
        )
        .map_err(|error| BrokerError::InvalidSettings(error.to_string()))?;
        let coordinator = Coordinator::new(
            self.incarnation.as_str(),
            self.settings.clone(),
            Arc::clone(&self.services.membership),
            Arc::clone(&self.services.bus),
        )
        .with_required_tags(self.required_tags.clone())
        .with_epoch_floor(leadership.epoch_floor())
        .with_journal(self.journal.clone());
        let ends = self
            .control_ends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let coordinator = match ends {
            Some((commands, leading)) => {
                coordinator.with_control(Arc::clone(&self.fleet), commands, leading)
            }
            None => coordinator,
        };
        let status = coordinator.status();
        let leader = leadership.subscribe();
        crate::ambient::spawn_into(
            &mut tasks,
            self.supervised(
                "coordinator",
                coordinator.run(leader, cancel.clone()),
                &cancel,
            ),
        );
        crate::ambient::spawn_into(
            &mut tasks,
            self.supervised("leadership", leadership.run(cancel.clone()), &cancel),
        );
        Ok(Half {
            cancel,
            tasks,
            status,
        })
    }

    fn start_observer(&self, subscribers: Vec<(SubscriberSpec, Arc<dyn Subscriber>)>) -> Half {
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut observer = Observer::new(
            self.incarnation.as_str(),
            self.settings.clone(),
            Arc::clone(&self.services.membership),
            Arc::clone(&self.services.bus),
        );
        for (spec, subscriber) in subscribers {
            observer.add(spec, subscriber);
        }
        let status = observer.status();
        crate::ambient::spawn_into(
            &mut tasks,
            self.supervised("observer", observer.run(cancel.clone()), &cancel),
        );
        Half {
            cancel,
            tasks,
            status,
        }
    }
}

#[async_trait]
impl Broker for DistributedBroker {
    fn role(&self) -> BrokerRole {
        self.role
    }

    fn register(
        &self,
        spec: SubscriberSpec,
        subscriber: Arc<dyn Subscriber>,
    ) -> Result<(), BrokerError> {
        if !self.role.observes() {
            return Err(BrokerError::CoordinatorOnly {
                node: self.node.clone(),
                group: spec.group,
                subscriber: spec.id,
            });
        }
        match &mut *self.lock() {
            State::Configured(subscribers) => {
                check_registration(&spec, subscribers)?;
                subscribers.push((spec, subscriber));
                Ok(())
            }
            State::Started(_) => Err(BrokerError::AlreadyStarted),
            State::Stopping(_) | State::Stopped => Err(BrokerError::Stopped),
        }
    }

    async fn start(&self) -> Result<(), BrokerError> {
        let problems = self.settings.validate();
        if !problems.is_empty() {
            let problems: Vec<String> = problems
                .into_iter()
                .map(|(key, message)| format!("{key}: {message}"))
                .collect();
            return Err(BrokerError::InvalidSettings(problems.join("; ")));
        }
        let mut state = self.lock();
        let subscribers = match &mut *state {
            State::Configured(subscribers) => std::mem::take(subscribers),
            State::Started(_) => return Err(BrokerError::AlreadyStarted),
            State::Stopping(_) | State::Stopped => return Err(BrokerError::Stopped),
        };
        let coordinator = match self.role.coordinates() {
            true => Some(self.start_coordinator()?),
            false => None,
        };
        let started = Started {
            coordinator,
            observer: self
                .role
                .observes()
                .then(|| self.start_observer(subscribers)),
        };
        tracing::info!(node = %self.node, incarnation = %self.incarnation, role = %self.role, "broker started");
        *state = State::Started(started);
        Ok(())
    }

    fn status(&self) -> BrokerStatus {
        if let Some(reason) = self.failure.borrow().clone() {
            return BrokerStatus::Errored(reason);
        }
        match &*self.lock() {
            State::Configured(_) => BrokerStatus::Starting,
            State::Started(started) => {
                let statuses: Vec<BrokerStatus> = [&started.coordinator, &started.observer]
                    .into_iter()
                    .flatten()
                    .map(|half| half.status.borrow().clone())
                    .collect();
                BrokerStatus::combine(&statuses)
            }
            State::Stopping(statuses) => {
                let statuses: Vec<BrokerStatus> = statuses
                    .iter()
                    .map(|status| status.borrow().clone())
                    .collect();
                // Stopping until stop() returns, even if both halves are done.
                match BrokerStatus::combine(&statuses) {
                    BrokerStatus::Stopped => BrokerStatus::Stopping,
                    other => other,
                }
            }
            State::Stopped => BrokerStatus::Stopped,
        }
    }

    async fn stop(&self) {
        let started = {
            let mut state = self.lock();
            match std::mem::replace(&mut *state, State::Stopped) {
                State::Started(started) => {
                    let statuses = [&started.coordinator, &started.observer]
                        .into_iter()
                        .flatten()
                        .map(|half| half.status.clone())
                        .collect();
                    *state = State::Stopping(statuses);
                    started
                }
                // Never started, or already stopped (or stopping elsewhere).
                other => {
                    if matches!(other, State::Stopping(_)) {
                        *state = other;
                    }
                    return;
                }
            }
        };
        if let Some(observer) = started.observer {
            observer.stop().await;
        }
        if let Some(coordinator) = started.coordinator {
            coordinator.stop().await;
        }
        *self.lock() = State::Stopped;
        tracing::info!(node = %self.node, "broker stopped");
    }

    fn failure(&self) -> watch::Receiver<Option<String>> {
        self.failure.subscribe()
    }

    fn control(&self) -> Option<ControlHandle> {
        Some(self.control.clone())
    }

    async fn abort(&self) {
        let previous = std::mem::replace(&mut *self.lock(), State::Stopped);
        if let State::Started(started) = previous {
            for half in [started.observer, started.coordinator]
                .into_iter()
                .flatten()
            {
                half.abort().await;
            }
        }
    }
}
