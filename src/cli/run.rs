//! `weir run`: start a node in its configured role and stop cleanly on a signal.
//!
//! The node opens its store, joins the fleet through the configured bus and runs
//! its broker and consumers: a `coordinator` or `full` node competes for leadership
//! and allocates, an `observer` or `full` node runs `instances` subscription
//! consumers of every `[[subscriptions]]` group, each forwarding the events of the
//! sources it is given to the group's sink. `--demo` (or `[demo] enabled`) also
//! appends sample events, so the embedded default shows events flowing. The node
//! serves `/metrics`, `/livez`, `/readyz` and `/status` on `http.listen`
//! (`cli/observe.rs`).
//!
//! The first SIGINT or SIGTERM stops gracefully: sources are withdrawn, in-flight
//! batches finish within `node.shutdown_grace`, checkpoints are stored, the node
//! leaves the fleet and gives up leadership, and weir exits 0. A second signal
//! exits at once. An error policy's `exit` ends the node the same way, with its code.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::admin::{Admin, AdminParts};
use crate::broker::Broker;
use crate::broker::control::{FleetStore, MemoryFleetStore};
use crate::broker::distributed::FleetServices;
use crate::broker::lease::MemoryLeaseStore;
use crate::broker::membership::MemoryMembershipStore;
use crate::broker::{DistributedBroker, SubscriberSpec};
use crate::bus::{AllocationBus, MemoryBus};
use crate::config::{BusKind, Config, StoreKind};
use crate::consumer::{ConsumerSettings, EventProcessor};
use crate::ingest::{IngestStore, MemoryIngestStore, Shape};
use crate::lifecycle::{Journal, JournalTask};
use crate::runtime::{ConsumerStores, EventRuntime, Outcome, RuntimeError};
use crate::store::{EventStore, MemoryStore};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Append a trickle of sample events (see `[demo]`); with no
    /// `[[subscriptions]]` configured, also print them with a `demo` subscription.
    #[arg(long)]
    pub demo: bool,
}

pub async fn run(config: &Config, args: Args) -> Result<(), CliError> {
    let mut config = config.clone();
    if args.demo {
        super::demo::enable(&mut config);
    }
    let config = &config;
    check_advertised(config)?;
    let shutdown =
        super::signal::shutdown_token(config.node.shutdown_grace + super::signal::STOP_MARGIN)?;
    let node = config.node_id();
    let role = config.node.role;
    let (services, stores, fleet, ingest_store) = services(config).await?;
    let events = Arc::clone(&stores.events);
    let (journal, journal_task) = start_journal(config, &node, &stores);
    let observed = super::observe::Observed {
        events: Arc::clone(&events),
        bus: Arc::clone(&services.bus),
        leases: Arc::clone(&services.leases),
    };
    let membership = Arc::clone(&services.membership);
    let broker = DistributedBroker::new(&node, role, config.broker.clone(), services)
        .with_fleet_store(Arc::clone(&fleet))
        .with_journal(journal.clone());
    let broker = with_required_tags(broker, config);
    let control = broker.control();
    let runtime = Arc::new(
        EventRuntime::new(
            &node,
            Arc::new(broker),
            stores.clone(),
            ConsumerSettings::default(),
        )
        .with_shutdown_grace(config.node.shutdown_grace)
        .with_journal(journal.clone()),
    );
    let processors = register_subscriptions(config, &node, &runtime).await?;
    register_ingests(config, &node, &runtime, ingest_store).await?;
    let auth = super::observe::admin_auth(config)?;
    let executors = group_executors(config, &runtime);
    let admin = control.map(|control| {
        let parts = AdminParts {
            node: node.clone(),
            stores,
            membership,
            fleet,
            control,
            processors,
            auth,
            member_timeout: config.broker.member_timeout,
            handover_timeout: config.broker.handover_timeout,
            journal: journal.clone(),
        };
        Arc::new(Admin::new(parts).with_executors(executors))
    });
    // --- Observability: metrics and the HTTP endpoints (cli/observe.rs). ---
    let http = super::observe::start(config, Arc::clone(&runtime), observed, admin.clone()).await?;
    // ---
    runtime
        .start()
        .await
        .map_err(|error| CliError::Usage(error.to_string()))?;
    let demo = Demo::start(config, events, &shutdown);
    tracing::info!(
        node = %node,
        %role,
        store = ?config.store.kind,
        bus = ?config.bus.kind,
        "weir node started; stop it with Ctrl-C or SIGTERM"
    );
    let outcome = runtime.wait_until(shutdown.cancelled()).await;
    demo.stop().await;
    http.stop().await;
    if let Some(admin) = &admin {
        admin.stop().await;
    }
    // Last, so that what the stopping broker and consumers recorded is written.
    journal_task.stop().await;
    tracing::info!(node = %node, "weir node stopped");
    exit_of(outcome)
}

/// The node's journal of lifecycle events, whose retention keeps what the
/// readers of `$weir` (their checkpoints say how far) have still to read.
fn start_journal(config: &Config, node: &str, stores: &ConsumerStores) -> (Journal, JournalTask) {
    let readers = crate::consumer::LifecycleCheckpoints(Arc::clone(&stores.checkpoints));
    Journal::start_keeping(
        Arc::clone(&stores.events),
        node,
        &config.lifecycle,
        Some(Arc::new(readers)),
    )
}

/// A node of a fleet (a shared store) names its admin address to the others,
/// and must say it when it listens beyond loopback; the embedded default's node
/// is alone.
fn check_advertised(config: &Config) -> Result<(), CliError> {
    match config.http.unadvertised() {
        Some(problem) if config.store.kind != StoreKind::Memory => {
            Err(CliError::Config(crate::config::ConfigError {
                problems: vec![problem],
            }))
        }
        _ => Ok(()),
    }
}

/// The demo appender, while `[demo] enabled`.
struct Demo(Option<(CancellationToken, tokio::task::JoinHandle<()>)>);

impl Demo {
    fn start(config: &Config, events: Arc<dyn EventStore>, shutdown: &CancellationToken) -> Self {
        Self(config.demo.enabled.then(|| {
            let stop = shutdown.child_token();
            let task =
                crate::ambient::spawn(super::demo::run(events, config.demo.clone(), stop.clone()));
            (stop, task)
        }))
    }

    async fn stop(self) {
        if let Some((stop, task)) = self.0 {
            stop.cancel();
            let _ = task.await;
        }
    }
}

/// Each configured group's executor, where the admin API retries its dead
/// letters (keeping its isolation); a group whose thread cannot start uses the
/// main executor, and says so.
fn group_executors(
    config: &Config,
    runtime: &EventRuntime,
) -> BTreeMap<String, crate::consumer::settings::Executor> {
    let mut executors = BTreeMap::new();
    for subscription in &config.subscriptions {
        let group = &subscription.group;
        match runtime.group_executor(group, Some(&subscription.consumer)) {
            Ok(executor) => {
                executors.insert(group.clone(), executor);
            }
            Err(error) => {
                tracing::warn!(%group, %error, "cannot start the group's thread for dead-letter retries; they run on the main executor");
            }
        }
    }
    executors
}

/// The broker, with every configured group's required placement tags.
fn with_required_tags(mut broker: DistributedBroker, config: &Config) -> DistributedBroker {
    for subscription in &config.subscriptions {
        broker = broker.with_required_tags(
            &subscription.group,
            subscription.required_tags.iter().cloned(),
        );
    }
    for ingest in &config.ingest {
        broker = broker.with_required_tags(&ingest.name, ingest.required_tags.iter().cloned());
    }
    broker
}

/// How `weir run` ends for how its runtime ended.
fn exit_of(outcome: Result<Outcome, RuntimeError>) -> Result<(), CliError> {
    match outcome {
        Ok(Outcome::Stopped) => Ok(()),
        Ok(Outcome::Exit(code)) => Err(CliError::Halted(code)),
        Err(RuntimeError::Raised(error)) => Err(CliError::Raised(error.to_string())),
        // Exit 1 after the graceful stop, so that an orchestrator restarts the node.
        Err(error @ RuntimeError::TaskEnded(_)) => Err(CliError::Raised(error.to_string())),
        Err(error) => Err(CliError::Usage(error.to_string())),
    }
}

/// What a node keeps in its store: membership and leases (with the configured
/// bus), where consumers read events and keep checkpoints and dead letters,
/// where paused groups and node reports are kept, and where ingests append.
type Services = (
    FleetServices,
    ConsumerStores,
    Arc<dyn FleetStore>,
    Arc<dyn IngestStore>,
);

/// The [`Services`] of the configured store.
async fn services(config: &Config) -> Result<Services, CliError> {
    let bus = bus(config).await?;
    Ok(match config.store.kind {
        StoreKind::Memory => {
            let events: Arc<dyn EventStore> =
                Arc::new(MemoryStore::new().with_max_event_bytes(config.store.max_event_bytes));
            (
                FleetServices {
                    membership: Arc::new(MemoryMembershipStore::new()),
                    leases: Arc::new(MemoryLeaseStore::new()),
                    bus,
                },
                ConsumerStores::in_memory(Arc::clone(&events)),
                Arc::new(MemoryFleetStore::new()),
                Arc::new(MemoryIngestStore::new(events)),
            )
        }
        #[cfg(feature = "postgres")]
        StoreKind::Postgres => {
            use crate::postgres::{
                PostgresFleetStore, PostgresIngestStore, PostgresLeaseStore,
                PostgresMembershipStore,
            };
            let store = Arc::new(super::open_postgres(config)?);
            store.check_schema().await?;
            (
                FleetServices {
                    membership: Arc::new(PostgresMembershipStore::new(Arc::clone(&store))),
                    leases: Arc::new(PostgresLeaseStore::new(Arc::clone(&store))),
                    bus,
                },
                ConsumerStores::postgres(Arc::clone(&store)),
                Arc::new(PostgresFleetStore::new(Arc::clone(&store))),
                Arc::new(PostgresIngestStore::new(store)),
            )
        }
        #[cfg(not(feature = "postgres"))]
        StoreKind::Postgres => {
            return Err(CliError::Usage(
                "this weir was built without the `postgres` feature".into(),
            ));
        }
    })
}

/// The configured allocation bus, connected.
async fn bus(config: &Config) -> Result<Arc<dyn AllocationBus>, CliError> {
    Ok(match config.bus.kind {
        BusKind::Memory => {
            if config.store.kind != StoreKind::Memory {
                tracing::warn!(
                    "bus.kind is memory: decisions reach only this process, so nodes in other processes will not coordinate with it"
                );
            }
            Arc::new(MemoryBus::new())
        }
        #[cfg(feature = "nats")]
        BusKind::Nats => Arc::new(crate::bus::NatsBus::connect(&config.nats, &config.bus).await?),
        #[cfg(feature = "kafka")]
        BusKind::Kafka => {
            Arc::new(crate::bus::KafkaBus::connect(&config.kafka, &config.bus).await?)
        }
        #[allow(unreachable_patterns)]
        other => {
            return Err(CliError::Usage(format!(
                "this weir was built without the `{}` feature needed by bus.kind",
                other.missing_feature().unwrap_or("?")
            )));
        }
    })
}

/// Registers `instances` subscription consumers of every configured group, named
/// `NODE/N`, unless the node only coordinates. Returns each group's sink, which
/// the admin API retries dead letters through (on a coordinator-only node too,
/// since it may lead).
async fn register_subscriptions(
    config: &Config,
    node: &str,
    runtime: &EventRuntime,
) -> Result<BTreeMap<String, Arc<dyn EventProcessor>>, CliError> {
    let mut sinks = BTreeMap::new();
    if !config.node.role.observes() {
        if !config.subscriptions.is_empty() {
            tracing::info!(
                role = %config.node.role,
                "this node runs no subscribers; observer and full nodes run the [[subscriptions]]"
            );
        }
        for subscription in &config.subscriptions {
            let routing = subscription.routing();
            let sink = crate::sink::build(
                &subscription.sink,
                &config.nats,
                &config.kafka,
                subscription.sink_context(&routing),
            )
            .await;
            match sink {
                Ok(sink) => {
                    sinks.insert(subscription.group.clone(), sink);
                }
                Err(error) => {
                    tracing::warn!(group = %subscription.group, %error, "cannot build the group's sink here: this node cannot retry its dead letters while it leads");
                }
            }
        }
        return Ok(sinks);
    }
    for subscription in &config.subscriptions {
        // One sink per group, shared by its instances: one connection, and the
        // instances' publishes pipeline together.
        let routing = subscription.routing();
        let sink: Arc<dyn EventProcessor> = crate::sink::build(
            &subscription.sink,
            &config.nats,
            &config.kafka,
            subscription.sink_context(&routing),
        )
        .await?;
        sinks.insert(subscription.group.clone(), Arc::clone(&sink));
        for instance in 1..=subscription.instances {
            let spec = SubscriberSpec::new(
                &subscription.group,
                format!("{node}/{instance}"),
                subscription.allocated_sources(),
            )
            .with_tags(config.node.tags.iter().cloned());
            runtime
                .register_subscription_consumer(
                    spec,
                    Arc::clone(&sink),
                    Some(subscription.consumer_settings()),
                )
                .map_err(|error| CliError::Usage(error.to_string()))?;
        }
    }
    Ok(sinks)
}

/// Registers one subscriber of every `[[ingest]]` entry's group, named
/// `NODE/ingest`, unless the node only coordinates: it connects to the entry's
/// bus and requests every source the entry reads.
async fn register_ingests(
    config: &Config,
    node: &str,
    runtime: &EventRuntime,
    store: Arc<dyn IngestStore>,
) -> Result<(), CliError> {
    if !config.node.role.observes() {
        return Ok(());
    }
    for ingest in &config.ingest {
        let failed = |error: String| CliError::Usage(format!("ingest {}: {error}", ingest.name));
        let shape = Shape::new(ingest, config.store.max_event_bytes).map_err(failed)?;
        let connected = crate::ingest::connect(ingest, &config.nats, &config.kafka)
            .await
            .map_err(|error| CliError::Unreachable(format!("ingest {}: {error}", ingest.name)))?;
        let spec = SubscriberSpec::new(&ingest.name, format!("{node}/ingest"), connected.sources)
            .with_tags(config.node.tags.iter().cloned());
        runtime
            .register_ingest(
                spec,
                shape,
                connected.bus,
                Arc::clone(&store),
                ingest.consumer.clone(),
            )
            .map_err(|error| CliError::Usage(error.to_string()))?;
    }
    Ok(())
}
