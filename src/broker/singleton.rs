//! [`SingletonBroker`]: one process, no fleet. Every local subscriber is given every
//! source it requests at start and has them withdrawn at stop; there is no
//! election, membership or bus. For embedded use where one process does all the
//! work, and for tests of subscribers.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use futures::future::join_all;

use crate::event::Source;

use super::{
    Broker, BrokerError, BrokerRole, BrokerStatus, Subscriber, SubscriberSpec, check_registration,
};

type Registered = Vec<(SubscriberSpec, Arc<dyn Subscriber>)>;

/// A broker that coordinates nothing: each subscriber owns all it requests.
pub struct SingletonBroker {
    state: Mutex<State>,
}

enum State {
    Configured(Registered),
    Running(Running),
    Stopping,
    Stopped,
}

struct Running {
    registered: Registered,
    /// (index into `registered`, source) of every accepted source.
    accepted: Vec<(usize, Source)>,
    /// Why some accepts failed, if any did.
    error: Option<String>,
}

impl Default for SingletonBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl SingletonBroker {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::Configured(Vec::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change of state is a single assignment, so a poisoned lock still
        // guards a whole value.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Broker for SingletonBroker {
    /// A singleton does both halves' work, as a `full` node does.
    fn role(&self) -> BrokerRole {
        BrokerRole::Full
    }

    fn register(
        &self,
        spec: SubscriberSpec,
        subscriber: Arc<dyn Subscriber>,
    ) -> Result<(), BrokerError> {
        match &mut *self.lock() {
            State::Configured(registered) => {
                check_registration(&spec, registered)?;
                registered.push((spec, subscriber));
                Ok(())
            }
            State::Running(_) => Err(BrokerError::AlreadyStarted),
            State::Stopping | State::Stopped => Err(BrokerError::Stopped),
        }
    }

    /// Accepts every requested source of every subscriber. A source whose accept
    /// fails leaves the broker errored, naming it; the others are still accepted.
    async fn start(&self) -> Result<(), BrokerError> {
        let registered = match std::mem::replace(&mut *self.lock(), State::Stopping) {
            State::Configured(registered) => registered,
            other => {
                let error = match other {
                    State::Stopping | State::Stopped => BrokerError::Stopped,
                    _ => BrokerError::AlreadyStarted,
                };
                *self.lock() = other;
                return Err(error);
            }
        };
        let accepts = registered
            .iter()
            .enumerate()
            .flat_map(|(i, (spec, subscriber))| {
                spec.sources.iter().map(move |source| async move {
                    match subscriber.accept(source).await {
                        Ok(()) => Ok((i, source.clone())),
                        Err(error) => Err(format!(
                            "subscriber {}/{} could not accept {source}: {error}",
                            spec.group, spec.id
                        )),
                    }
                })
            });
        let (accepted, failures): (Vec<_>, Vec<_>) =
            join_all(accepts).await.into_iter().partition(Result::is_ok);
        let failures: Vec<String> = failures.into_iter().filter_map(Result::err).collect();
        for failure in &failures {
            tracing::error!("{failure}");
        }
        *self.lock() = State::Running(Running {
            accepted: accepted.into_iter().filter_map(Result::ok).collect(),
            registered,
            error: (!failures.is_empty()).then(|| failures.join("; ")),
        });
        Ok(())
    }

    fn status(&self) -> BrokerStatus {
        match &*self.lock() {
            State::Configured(_) => BrokerStatus::Starting,
            State::Running(Running { error: None, .. }) => BrokerStatus::Running,
            State::Running(Running {
                error: Some(reason),
                ..
            }) => BrokerStatus::Errored(reason.clone()),
            State::Stopping => BrokerStatus::Stopping,
            State::Stopped => BrokerStatus::Stopped,
        }
    }

    async fn stop(&self) {
        let running = match std::mem::replace(&mut *self.lock(), State::Stopping) {
            State::Running(running) => running,
            State::Stopping => return,
            State::Configured(_) | State::Stopped => {
                *self.lock() = State::Stopped;
                return;
            }
        };
        let withdrawals = running.accepted.iter().map(|(i, source)| {
            let (spec, subscriber) = &running.registered[*i];
            async move {
                if let Err(error) = subscriber.withdraw(source).await {
                    tracing::error!(group = %spec.group, subscriber = %spec.id, %source, %error, "withdraw failed");
                }
            }
        });
        join_all(withdrawals).await;
        *self.lock() = State::Stopped;
    }

    /// Forgets every subscriber without withdrawing anything.
    async fn abort(&self) {
        *self.lock() = State::Stopped;
    }
}
