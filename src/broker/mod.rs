//! The broker: who owns which source. The pure allocation function lives below
//! it in [`crate::allocation`], since the bus carries its decisions.
//!
//! - [`lease`]: the leadership lease with epochs and the [`lease::Leadership`] driver.
//! - [`membership`]: the registry of subscribers and their heartbeats.
//! - [`coordinator`]: decides and publishes allocations while its node leads.
//! - [`observer`]: applies decisions to this node's subscribers.
//! - [`role`]: what a node does ([`BrokerRole`]) and how it is doing ([`BrokerStatus`]).
//! - [`subscriber`]: the [`Subscriber`] interface a broker drives.
//! - [`control`]: what operators steer through the leader: paused groups, node
//!   reports, and commands to the coordinator.
//! - [`distributed`] and [`singleton`]: the two [`Broker`]s: a fleet coordinated over
//!   a bus, and one process that needs no coordination.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub mod control;
pub mod coordinator;
pub mod distributed;
pub mod lease;
pub mod membership;
pub mod observer;
pub mod role;
pub mod settings;
pub mod singleton;
pub mod subscriber;

pub use distributed::DistributedBroker;
pub use role::{BrokerRole, BrokerStatus};
pub use settings::BrokerSettings;
pub use singleton::SingletonBroker;
pub use subscriber::{Grant, Subscriber, SubscriberError, SubscriberSpec};

use crate::event::ValidationError;

/// Why a broker refused a request.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "node {node} has the coordinator role, which runs no subscribers: set node.role to `full` or `observer` to run subscriber {group}/{subscriber} here"
    )]
    CoordinatorOnly {
        node: String,
        group: String,
        subscriber: String,
    },
    #[error(
        "subscriber {group}/{subscriber} is registered twice on this node: give each instance its own id"
    )]
    Duplicate { group: String, subscriber: String },
    #[error("subscriber {group}/{subscriber} cannot be registered: {source}")]
    Invalid {
        group: String,
        subscriber: String,
        source: ValidationError,
    },
    #[error("invalid broker settings: {0}")]
    InvalidSettings(String),
    #[error("the broker has already started: register subscribers before starting it")]
    AlreadyStarted,
    #[error("the broker has stopped; build a new one to start again")]
    Stopped,
}

/// Decides which of this node's subscribers consume which sources, and tells them.
/// Object safe, so a runtime holds an `Arc<dyn Broker>` of either kind.
///
/// Subscribers are registered before [`Broker::start`]; [`Broker::stop`] withdraws
/// every source from them before it returns.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// This node's role.
    fn role(&self) -> BrokerRole;

    /// Adds a local subscriber. Refused once started, for a duplicate id, and on a
    /// coordinator-only node.
    fn register(
        &self,
        spec: SubscriberSpec,
        subscriber: Arc<dyn Subscriber>,
    ) -> Result<(), BrokerError>;

    /// Starts the broker's work in the background; returns at once.
    async fn start(&self) -> Result<(), BrokerError>;

    /// How the broker is doing now.
    fn status(&self) -> BrokerStatus;

    /// Withdraws every source from the local subscribers, leaves the fleet and, if
    /// leading, gives up leadership. Returns once all of that is done.
    async fn stop(&self);

    /// Stops at once, without withdrawing, leaving or giving up leadership: to the
    /// fleet this looks like the process died, and it recovers the same way (member
    /// timeout, lease expiry). For tests of failure and for a process that must
    /// exit immediately.
    async fn abort(&self);

    /// The first of the broker's tasks to end on its own (a panic, or a task that
    /// returned while the broker runs), with the reason; `None` while all run. A
    /// broker with such a task cannot do its work: its status is errored from then
    /// on, and a runtime stops and reports it. The default never reports, for a
    /// broker that runs no tasks.
    fn failure(&self) -> watch::Receiver<Option<String>> {
        watch::channel(None).1
    }

    /// How operators' commands reach this node's coordinator, and who leads;
    /// `None` for a broker that coordinates with nobody.
    fn control(&self) -> Option<control::ControlHandle> {
        None
    }
}

/// Runs `task` and, should it end on its own (a panic, or returning before
/// `cancel` asked it to), keeps the first such end's reason in `failure`.
pub(crate) async fn supervised(
    what: &'static str,
    task: impl Future<Output = ()>,
    cancel: CancellationToken,
    failure: Arc<watch::Sender<Option<String>>>,
) {
    let outcome = AssertUnwindSafe(task).catch_unwind().await;
    let reason = match outcome {
        Ok(()) if cancel.is_cancelled() => return,
        Ok(()) => format!("the {what} task ended while the node runs"),
        Err(panic) => format!(
            "the {what} task panicked: {}",
            panic_message(panic.as_ref())
        ),
    };
    tracing::error!("{reason}: the node is not ready; restart it");
    failure.send_if_modified(|kept| {
        let first = kept.is_none();
        if first {
            *kept = Some(format!("{reason}; restart the node"));
        }
        first
    });
}

/// The message a panic was raised with, if it was a string.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// The registration checks both brokers share: a valid name, not already taken.
fn check_registration(
    spec: &SubscriberSpec,
    registered: &[(SubscriberSpec, Arc<dyn Subscriber>)],
) -> Result<(), BrokerError> {
    spec.validate().map_err(|source| BrokerError::Invalid {
        group: spec.group.clone(),
        subscriber: spec.id.clone(),
        source,
    })?;
    if registered
        .iter()
        .any(|(other, _)| other.group == spec.group && other.id == spec.id)
    {
        return Err(BrokerError::Duplicate {
            group: spec.group.clone(),
            subscriber: spec.id.clone(),
        });
    }
    Ok(())
}
