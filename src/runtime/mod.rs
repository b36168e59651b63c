//! [`EventRuntime`]: one node's consumers and its broker, started and stopped
//! together.
//!
//! Register, then [`EventRuntime::start`]:
//! - [`EventRuntime::register_subscriber`]: a plain [`Subscriber`], handed to the broker;
//! - [`EventRuntime::register_consumer`]: a processor consuming one fixed source on
//!   this node, with error handling and polling around it, and no broker involved;
//! - [`EventRuntime::register_subscription_consumer`]: both at once: a subscriber
//!   that consumes, with a processor, whatever sources the broker gives it.
//!
//! [`EventRuntime::stop`] withdraws every source (each consumer finishes its batch
//! within the grace period and stores its checkpoint), leaves the fleet and gives
//! up leadership. [`EventRuntime::run_until`] does all of it around a shutdown
//! signal, and also stops when an error policy says `Exit` or `Raise`.
//!
//! [`sampler`] measures consumer lag and the store's visibility horizon beside
//! the consumers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, BrokerStatus, Subscriber, SubscriberSpec};
use crate::consumer::checkpoint::{CheckpointStore, MemoryCheckpointStore};
use crate::consumer::dead_letter::{DeadLetterStore, MemoryDeadLetterStore};
use crate::consumer::processor::{EventProcessor, ProcessError};
use crate::consumer::settings::{ConsumerSettings, Executor, IsolatedThread};
use crate::consumer::source::{
    Board, ConsumerContext, ConsumerKey, ConsumerState, Halt, Lag, RunningConsumer,
};
use crate::consumer::subscription::SubscriptionConsumer;
use crate::event::{Cursor, Source};
use crate::ingest::{IngestBus, IngestContext, IngestStore, IngestSubscriber, Shape};
use crate::store::EventStore;
use sampler::{DEFAULT_SAMPLE_INTERVAL, Sampler};

pub mod sampler;

/// How long stopping waits for each consumer's batch in hand, by default: no
/// longer than the default `broker.handover_timeout`, which it must not exceed.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the runtime refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the runtime has already started: register everything before starting it")]
    AlreadyStarted,
    #[error("the runtime has stopped; build a new one to start again")]
    Stopped,
    #[error("invalid consumer settings for group {group}: {problems}")]
    InvalidSettings { group: String, problems: String },
    #[error("cannot start a processing thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("a processor's error stopped the runtime (error policy `raise`): {0}")]
    Raised(ProcessError),
    #[error("a task of the node ended: {0}")]
    TaskEnded(String),
}

/// Where consumers read events and keep checkpoints and dead letters.
#[derive(Clone)]
pub struct ConsumerStores {
    pub events: Arc<dyn EventStore>,
    pub checkpoints: Arc<dyn CheckpointStore>,
    pub dead_letters: Arc<dyn DeadLetterStore>,
}

impl ConsumerStores {
    /// Events, checkpoints and dead letters in one Postgres schema.
    #[cfg(feature = "postgres")]
    pub fn postgres(store: Arc<crate::postgres::PostgresStore>) -> Self {
        use crate::postgres::PostgresCheckpointStore;
        use crate::postgres::PostgresDeadLetterStore;
        Self {
            checkpoints: Arc::new(PostgresCheckpointStore::new(Arc::clone(&store))),
            dead_letters: Arc::new(PostgresDeadLetterStore::new(Arc::clone(&store))),
            events: store,
        }
    }

    /// Checkpoints and dead letters in memory, beside `events`.
    pub fn in_memory(events: Arc<dyn EventStore>) -> Self {
        Self {
            events,
            checkpoints: Arc::new(MemoryCheckpointStore::new()),
            dead_letters: Arc::new(MemoryDeadLetterStore::new()),
        }
    }
}

/// How a runtime that was run to the end ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped on request.
    Stopped,
    /// An error policy said `Exit`: the process should exit with this code.
    Exit(i32),
}

/// The runtime's status: the broker's and every source consumer's.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeStatus {
    pub broker: BrokerStatus,
    pub consumers: Vec<ConsumerReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsumerReport {
    #[serde(flatten)]
    pub key: ConsumerKey,
    #[serde(flatten)]
    pub state: ConsumerState,
    /// Where it has got to, once it has claimed its checkpoint.
    pub cursor: Option<Cursor>,
    /// Where an ingest source's consumer has got to on its bus.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// How far it lagged at the last measurement.
    pub lag: Option<Lag>,
}

impl RuntimeStatus {
    /// The broker does what its role asks and no consumer has failed or been fenced.
    pub fn is_healthy(&self) -> bool {
        self.broker.is_healthy() && self.consumers.iter().all(|c| c.state.is_healthy())
    }
}

/// One node's consumers and broker.
pub struct EventRuntime {
    node: String,
    broker: Arc<dyn Broker>,
    stores: ConsumerStores,
    defaults: ConsumerSettings,
    grace: Duration,
    sample_interval: Duration,
    board: Board,
    /// Every subscriber registered with the broker: (group, id).
    subscribers: Mutex<Vec<(String, String)>>,
    /// The thread `SharedThread` consumers share, started by the first of them.
    shared_thread: Mutex<Option<Executor>>,
    /// Each group's executor (its first consumer's), for work done for the
    /// group outside its consumers: the admin API's dead-letter retries.
    executors: Mutex<BTreeMap<String, Executor>>,
    state: Mutex<State>,
}

enum State {
    Configured(Registered),
    Started(Registered, Vec<RunningConsumer>, SamplerTask),
    Stopped,
}

/// The lag sampler, running beside the consumers.
struct SamplerTask {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl SamplerTask {
    async fn stop(mut self) {
        self.cancel.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for SamplerTask {
    /// A runtime dropped without stopping takes its sampler with it.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[derive(Default)]
struct Registered {
    /// Consumers of a fixed source, started with the runtime.
    fixed: Vec<(Arc<ConsumerContext>, Source)>,
    /// Subscription consumers, registered with the broker; kept to abort them.
    subscriptions: Vec<Arc<SubscriptionConsumer>>,
    /// Ingest subscribers, registered with the broker; kept to abort them.
    ingests: Vec<Arc<IngestSubscriber>>,
}

impl EventRuntime {
    /// A runtime for node `node` driving `broker`, whose consumers use `stores` and,
    /// unless given their own, `defaults`.
    pub fn new(
        node: impl Into<String>,
        broker: Arc<dyn Broker>,
        stores: ConsumerStores,
        defaults: ConsumerSettings,
    ) -> Self {
        Self {
            node: node.into(),
            broker,
            stores,
            defaults,
            grace: DEFAULT_SHUTDOWN_GRACE,
            sample_interval: DEFAULT_SAMPLE_INTERVAL,
            board: Board::default(),
            subscribers: Mutex::new(Vec::new()),
            shared_thread: Mutex::new(None),
            executors: Mutex::new(BTreeMap::new()),
            state: Mutex::new(State::Configured(Registered::default())),
        }
    }

    /// How long stopping (or withdrawing a source) waits for a consumer to finish
    /// its batch in hand before aborting it.
    #[must_use]
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Records consumers that end fenced or failed, and dead letters, in `journal`
    /// (by default nothing is recorded).
    #[must_use]
    pub fn with_journal(mut self, journal: crate::lifecycle::Journal) -> Self {
        self.board = self.board.with_journal(journal);
        self
    }

    /// How often consumer lag and the store's visibility horizon are measured for
    /// the metrics and the status (default 5 s). Each measurement is one bounded
    /// count per running consumer.
    #[must_use]
    pub fn with_sample_interval(mut self, interval: Duration) -> Self {
        self.sample_interval = interval;
        self
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The broker's role for this node.
    pub fn role(&self) -> crate::broker::BrokerRole {
        self.broker.role()
    }

    /// Every subscriber registered with the broker, as (group, subscriber id).
    pub fn subscribers(&self) -> Vec<(String, String)> {
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn note_subscriber(&self, spec: &SubscriberSpec) {
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((spec.group.clone(), spec.id.clone()));
    }

    /// The settings consumers get unless registered with their own.
    pub fn default_settings(&self) -> &ConsumerSettings {
        &self.defaults
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change of state is a single assignment, so a poisoned lock still
        // guards a whole value.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `register` on the registrations, if the runtime has not started.
    fn registering<T>(
        &self,
        register: impl FnOnce(&mut Registered) -> Result<T, RuntimeError>,
    ) -> Result<T, RuntimeError> {
        match &mut *self.lock() {
            State::Configured(registered) => register(registered),
            State::Started(..) => Err(RuntimeError::AlreadyStarted),
            State::Stopped => Err(RuntimeError::Stopped),
        }
    }

    /// Hands a plain subscriber to the broker. A coordinator-only broker refuses.
    pub fn register_subscriber(
        &self,
        spec: SubscriberSpec,
        subscriber: Arc<dyn Subscriber>,
    ) -> Result<(), RuntimeError> {
        self.registering(|_| {
            self.note_subscriber(&spec);
            Ok(self.broker.register(spec, subscriber)?)
        })
    }

    /// Consumes `source` on this node for `group`, whatever the broker decides:
    /// for work that one node does alone. Its checkpoint is claimed by the node id.
    pub fn register_consumer(
        &self,
        group: impl Into<String>,
        source: Source,
        processor: Arc<dyn EventProcessor>,
        settings: Option<ConsumerSettings>,
    ) -> Result<(), RuntimeError> {
        let group = group.into();
        let context = self.context(group, self.node.clone(), processor, settings)?;
        self.registering(|registered| {
            registered.fixed.push((context, source));
            Ok(())
        })
    }

    /// Registers with the broker a subscriber that consumes, with `processor`,
    /// every source the broker gives it. A coordinator-only broker refuses.
    pub fn register_subscription_consumer(
        &self,
        spec: SubscriberSpec,
        processor: Arc<dyn EventProcessor>,
        settings: Option<ConsumerSettings>,
    ) -> Result<(), RuntimeError> {
        let context = self.context(spec.group.clone(), spec.id.clone(), processor, settings)?;
        let consumer = Arc::new(SubscriptionConsumer::new(context, self.grace));
        self.register_kept(spec, consumer, |registered, consumer| {
            registered.subscriptions.push(consumer);
        })
    }

    /// Hands `subscriber` to the broker under `spec` and notes it; `keep` files
    /// it among the registrations, for stopping and aborting it.
    fn register_kept<S: Subscriber>(
        &self,
        spec: SubscriberSpec,
        subscriber: Arc<S>,
        keep: impl FnOnce(&mut Registered, Arc<S>),
    ) -> Result<(), RuntimeError> {
        self.registering(|registered| {
            let noted = spec.clone();
            self.broker
                .register(spec, Arc::clone(&subscriber) as Arc<dyn Subscriber>)?;
            self.note_subscriber(&noted);
            keep(registered, subscriber);
            Ok(())
        })
    }

    /// Registers with the broker a subscriber of an ingest's group that reads
    /// every ingest source the broker gives it from `bus` and appends to
    /// `store`; bad messages go through `settings`' error policy into the
    /// runtime's dead letters. A coordinator-only broker refuses.
    pub fn register_ingest(
        &self,
        spec: SubscriberSpec,
        shape: Shape,
        bus: Arc<dyn IngestBus>,
        store: Arc<dyn IngestStore>,
        settings: ConsumerSettings,
    ) -> Result<(), RuntimeError> {
        check_settings(&spec.group, &settings)?;
        let context = Arc::new(IngestContext {
            group: spec.group.clone(),
            owner: spec.id.clone(),
            shape,
            store,
            dead_letters: Arc::clone(&self.stores.dead_letters),
            bus,
            settings,
            board: self.board.clone(),
            pause: Default::default(),
        });
        let subscriber = Arc::new(IngestSubscriber::new(context, self.grace));
        self.register_kept(spec, subscriber, |registered, subscriber| {
            registered.ingests.push(subscriber);
        })
    }

    fn context(
        &self,
        group: String,
        owner: String,
        processor: Arc<dyn EventProcessor>,
        settings: Option<ConsumerSettings>,
    ) -> Result<Arc<ConsumerContext>, RuntimeError> {
        let settings = settings.unwrap_or_else(|| self.defaults.clone());
        check_settings(&group, &settings)?;
        let executor =
            Executor::for_isolation(settings.isolation, &group, || self.shared_executor())?;
        self.executors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(group.clone())
            .or_insert_with(|| executor.clone());
        Ok(Arc::new(ConsumerContext {
            group,
            owner,
            events: Arc::clone(&self.stores.events),
            checkpoints: Arc::clone(&self.stores.checkpoints),
            dead_letters: Arc::clone(&self.stores.dead_letters),
            processor,
            settings,
            executor,
            board: self.board.clone(),
            pause: Default::default(),
        }))
    }

    /// Where work for `group` outside its consumers runs its processor: the
    /// executor of the group's consumers on this node, or, on a node that runs
    /// none, one made for `settings` (the runtime's defaults if `None`), so
    /// that such work keeps the group's isolation.
    pub fn group_executor(
        &self,
        group: &str,
        settings: Option<&ConsumerSettings>,
    ) -> std::io::Result<Executor> {
        if let Some(executor) = self
            .executors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(group)
        {
            return Ok(executor.clone());
        }
        let isolation = settings.unwrap_or(&self.defaults).isolation;
        let executor = Executor::for_isolation(isolation, group, || self.shared_executor())?;
        Ok(self
            .executors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(group.to_owned())
            .or_insert(executor)
            .clone())
    }

    fn shared_executor(&self) -> std::io::Result<Executor> {
        let mut shared = self
            .shared_thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(executor) = shared.as_ref() {
            return Ok(executor.clone());
        }
        let executor = Executor::Thread(Arc::new(IsolatedThread::start("shared")?));
        *shared = Some(executor.clone());
        Ok(executor)
    }

    /// Starts the broker and the consumers of fixed sources; returns at once.
    pub async fn start(&self) -> Result<(), RuntimeError> {
        let registered = match std::mem::replace(&mut *self.lock(), State::Stopped) {
            State::Configured(registered) => registered,
            State::Started(registered, running, sampler) => {
                *self.lock() = State::Started(registered, running, sampler);
                return Err(RuntimeError::AlreadyStarted);
            }
            State::Stopped => return Err(RuntimeError::Stopped),
        };
        if let Err(error) = self.broker.start().await {
            *self.lock() = State::Configured(registered);
            return Err(error.into());
        }
        let running = registered
            .fixed
            .iter()
            .map(|(context, source)| RunningConsumer::spawn(Arc::clone(context), source.clone()))
            .collect();
        let cancel = CancellationToken::new();
        let sampler = Sampler::new(
            Arc::clone(&self.stores.events),
            self.board.clone(),
            self.sample_interval,
        );
        let sampler = SamplerTask {
            task: crate::ambient::spawn(sampler.run(cancel.clone())),
            cancel,
        };
        *self.lock() = State::Started(registered, running, sampler);
        Ok(())
    }

    /// Withdraws every source (consumers finish their batch within the grace
    /// period and store their checkpoints), stops the consumers of fixed sources,
    /// leaves the fleet and gives up leadership.
    pub async fn stop(&self) {
        let State::Started(registered, running, sampler) =
            std::mem::replace(&mut *self.lock(), State::Stopped)
        else {
            return;
        };
        self.broker.stop().await;
        sampler.stop().await;
        // The broker withdrew what it gave; this catches anything it could not.
        for subscription in &registered.subscriptions {
            subscription.stop().await;
        }
        for ingest in &registered.ingests {
            ingest.stop().await;
        }
        futures::future::join_all(running.into_iter().map(|c| c.stop(self.grace))).await;
    }

    /// Stops every consumer and the broker at once, storing no checkpoint: what a
    /// crash does. For tests of failure.
    #[cfg(any(test, feature = "testing"))]
    pub async fn abort(&self) {
        let State::Started(registered, running, sampler) =
            std::mem::replace(&mut *self.lock(), State::Stopped)
        else {
            return;
        };
        sampler.task.abort();
        // The broker first, so that it hands out nothing more while consumers go.
        self.broker.abort().await;
        for subscription in &registered.subscriptions {
            subscription.abort().await;
        }
        for ingest in &registered.ingests {
            ingest.abort().await;
        }
        for consumer in running {
            consumer.abort().await;
        }
    }

    /// Starts, runs until `shutdown` completes, an error policy halts the runtime
    /// or a task of the node ends on its own (a consumer that panicked, a broker
    /// task that panicked or returned), then stops gracefully. A `Raise` and an
    /// ended task come back as the error, so that the process exits non-zero and
    /// its orchestrator restarts it.
    pub async fn run_until(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Outcome, RuntimeError> {
        self.start().await?;
        self.wait_until(shutdown).await
    }

    /// For a started runtime: waits until `shutdown` completes or an error policy
    /// halts the runtime, then stops gracefully. A `Raise` comes back as the error.
    pub async fn wait_until(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Outcome, RuntimeError> {
        let mut halted = self.board.halted();
        let mut failure = self.broker.failure();
        let broker_failed = async {
            // A broker that reports no failures closes its channel at once.
            if failure.wait_for(Option::is_some).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            () = shutdown => {}
            _ = halted.wait_for(Option::is_some) => {
                tracing::warn!(node = %self.node, "the runtime was halted; stopping");
            }
            () = broker_failed => {
                tracing::error!(node = %self.node, "a broker task ended; stopping");
            }
        }
        self.stop().await;
        let halt = halted.borrow().clone();
        let failure = failure.borrow().clone();
        match (halt, failure) {
            (Some(Halt::Exit { code, .. }), _) => Ok(Outcome::Exit(code)),
            (Some(Halt::Raise(error)), _) => Err(RuntimeError::Raised(error)),
            (Some(Halt::Panicked(reason)), _) | (None, Some(reason)) => {
                Err(RuntimeError::TaskEnded(reason))
            }
            (None, None) => Ok(Outcome::Stopped),
        }
    }

    pub fn status(&self) -> RuntimeStatus {
        RuntimeStatus {
            broker: self.broker.status(),
            consumers: self
                .board
                .entries_now()
                .into_iter()
                .map(|(key, entry)| ConsumerReport {
                    key,
                    state: entry.state,
                    cursor: entry.cursor,
                    position: entry.position,
                    lag: entry.lag,
                })
                .collect(),
        }
    }
}

/// `Ok` if `settings` are valid, else every problem with them, for `group`.
fn check_settings(group: &str, settings: &ConsumerSettings) -> Result<(), RuntimeError> {
    let problems = settings.validate();
    if problems.is_empty() {
        return Ok(());
    }
    let problems: Vec<String> = problems
        .into_iter()
        .map(|(key, message)| format!("{key}: {message}"))
        .collect();
    Err(RuntimeError::InvalidSettings {
        group: group.to_owned(),
        problems: problems.join("; "),
    })
}
