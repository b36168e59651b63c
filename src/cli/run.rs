//! `weir run`: start a node in its configured role and stop cleanly on a signal.
//!
//! The node opens its store, joins the fleet through the configured bus and runs
//! its broker: a `coordinator` or `full` node competes for leadership and
//! allocates, an `observer` or `full` node runs `instances` subscribers of every
//! `[[subscriptions]]` group. Until consumers land, a subscriber logs the sources
//! it is given and withdrawn instead of processing their events.

use std::sync::Arc;

use async_trait::async_trait;

use super::CliError;
use crate::broker::distributed::FleetServices;
use crate::broker::lease::MemoryLeaseStore;
use crate::broker::membership::MemoryMembershipStore;
use crate::broker::{
    Broker, BrokerRole, DistributedBroker, Subscriber, SubscriberError, SubscriberSpec,
};
use crate::bus::MemoryBus;
use crate::config::{BusKind, Config, StoreKind};
use crate::event::{Cursor, Source};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(config: &Config, _args: Args) -> Result<(), CliError> {
    let shutdown = super::signal::shutdown_token()?;
    let node = config.node_id();
    let role = config.node.role;
    let broker = DistributedBroker::new(
        &node,
        role,
        config.broker.clone(),
        fleet_services(config).await?,
    );
    register_subscriptions(config, &node, &broker)?;
    broker
        .start()
        .await
        .map_err(|error| CliError::Usage(error.to_string()))?;
    tracing::info!(
        node = %node,
        %role,
        store = ?config.store.kind,
        bus = ?config.bus.kind,
        "weir node started; stop it with Ctrl-C or SIGTERM"
    );
    shutdown.cancelled().await;
    broker.stop().await;
    tracing::info!(node = %node, "weir node stopped");
    Ok(())
}

/// Membership and leases in the configured store, and the configured bus.
async fn fleet_services(config: &Config) -> Result<FleetServices, CliError> {
    let bus = match config.bus.kind {
        BusKind::Memory => {
            if config.store.kind != StoreKind::Memory {
                tracing::warn!(
                    "bus.kind is memory: decisions reach only this process, so nodes in other processes will not coordinate with it"
                );
            }
            Arc::new(MemoryBus::new())
        }
        other => {
            return Err(CliError::Usage(format!(
                "bus.kind {other:?} is not available in this release of weir; use \"memory\""
            )));
        }
    };
    let services = match config.store.kind {
        StoreKind::Memory => FleetServices {
            membership: Arc::new(MemoryMembershipStore::new()),
            leases: Arc::new(MemoryLeaseStore::new()),
            bus,
        },
        #[cfg(feature = "postgres")]
        StoreKind::Postgres => {
            use crate::broker::lease::PostgresLeaseStore;
            use crate::broker::membership::PostgresMembershipStore;
            let store = Arc::new(super::open_postgres(config)?);
            store.check_schema().await?;
            FleetServices {
                membership: Arc::new(PostgresMembershipStore::new(Arc::clone(&store))),
                leases: Arc::new(PostgresLeaseStore::new(store)),
                bus,
            }
        }
        #[cfg(not(feature = "postgres"))]
        StoreKind::Postgres => {
            return Err(CliError::Usage(
                "this weir was built without the `postgres` feature".into(),
            ));
        }
    };
    Ok(services)
}

/// Registers `instances` subscribers of every configured group, named
/// `NODE/N`, unless the node only coordinates.
fn register_subscriptions(
    config: &Config,
    node: &str,
    broker: &dyn Broker,
) -> Result<(), CliError> {
    if !broker.role().observes() {
        if !config.subscriptions.is_empty() {
            tracing::info!(
                role = %BrokerRole::Coordinator,
                "this node runs no subscribers; observer and full nodes run the [[subscriptions]]"
            );
        }
        return Ok(());
    }
    for subscription in &config.subscriptions {
        for instance in 1..=subscription.instances {
            let id = format!("{node}/{instance}");
            let spec = SubscriberSpec::new(
                &subscription.group,
                &id,
                subscription.sources.iter().cloned(),
            );
            let subscriber = LoggingSubscriber {
                group: subscription.group.clone(),
                id,
            };
            broker
                .register(spec, Arc::new(subscriber))
                .map_err(|error| CliError::Usage(error.to_string()))?;
        }
    }
    Ok(())
}

/// Logs what the broker gives and takes away; the stand-in for a consumer until
/// the runtime processes events.
struct LoggingSubscriber {
    group: String,
    id: String,
}

#[async_trait]
impl Subscriber for LoggingSubscriber {
    async fn accept(&self, source: &Source) -> Result<(), SubscriberError> {
        tracing::info!(group = %self.group, subscriber = %self.id, %source, "source allocated to this node");
        Ok(())
    }

    async fn withdraw(&self, source: &Source) -> Result<Option<Cursor>, SubscriberError> {
        tracing::info!(group = %self.group, subscriber = %self.id, %source, "source withdrawn from this node");
        Ok(None)
    }
}
