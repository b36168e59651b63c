//! What a node does in the fleet ([`BrokerRole`]) and how healthy its broker is
//! ([`BrokerStatus`]), including how the statuses of a `full` node's two halves
//! combine into one, and the [`Reporter`] through which each half keeps its status.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a broker half waits before trying an unreachable bus or store again.
pub(crate) const RETRY_DELAY: Duration = Duration::from_millis(500);

/// What a node does in the fleet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerRole {
    /// Elects and allocates; runs no subscribers.
    Coordinator,
    /// Runs subscribers; never tries to lead.
    Observer,
    /// Both.
    #[default]
    Full,
}

impl BrokerRole {
    /// Whether nodes of this role compete for leadership and allocate.
    pub fn coordinates(self) -> bool {
        matches!(self, BrokerRole::Coordinator | BrokerRole::Full)
    }

    /// Whether nodes of this role run subscribers.
    pub fn observes(self) -> bool {
        matches!(self, BrokerRole::Observer | BrokerRole::Full)
    }
}

impl BrokerRole {
    /// The role's name in config and in the `role` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerRole::Coordinator => "coordinator",
            BrokerRole::Observer => "observer",
            BrokerRole::Full => "full",
        }
    }
}

impl fmt::Display for BrokerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of a broker or of one of its halves (coordinator, observer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "lowercase")]
pub enum BrokerStatus {
    /// Registered but not started, or starting.
    Starting,
    /// Running, and idle by design: a coordinator that is not the leader.
    Waiting,
    /// Doing its work.
    Running,
    /// Shutting down.
    Stopping,
    /// Shut down.
    Stopped,
    /// Cannot do its work; the reason says why and what to do.
    Errored(String),
}

impl BrokerStatus {
    /// The status of a node made of `parts`: errored if any part is, stopped if
    /// all are, stopping if any is stopping or stopped, starting if any is
    /// starting, waiting if all wait, and running otherwise (every part running
    /// or waiting). No parts at all is stopped.
    pub fn combine<'a>(parts: impl IntoIterator<Item = &'a BrokerStatus>) -> BrokerStatus {
        let parts: Vec<&BrokerStatus> = parts.into_iter().collect();
        let any = |wanted: fn(&BrokerStatus) -> bool| parts.iter().any(|p| wanted(p));
        let all = |wanted: fn(&BrokerStatus) -> bool| parts.iter().all(|p| wanted(p));
        let errors: Vec<&str> = parts
            .iter()
            .filter_map(|part| match part {
                BrokerStatus::Errored(reason) => Some(reason.as_str()),
                _ => None,
            })
            .collect();
        if !errors.is_empty() {
            BrokerStatus::Errored(errors.join("; "))
        } else if all(|p| *p == BrokerStatus::Stopped) {
            BrokerStatus::Stopped
        } else if any(|p| matches!(p, BrokerStatus::Stopping | BrokerStatus::Stopped)) {
            BrokerStatus::Stopping
        } else if any(|p| *p == BrokerStatus::Starting) {
            BrokerStatus::Starting
        } else if all(|p| *p == BrokerStatus::Waiting) {
            BrokerStatus::Waiting
        } else {
            BrokerStatus::Running
        }
    }

    /// Whether the broker does what its role asks (running or waiting).
    pub fn is_healthy(&self) -> bool {
        matches!(self, BrokerStatus::Running | BrokerStatus::Waiting)
    }
}

impl fmt::Display for BrokerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerStatus::Starting => f.write_str("starting"),
            BrokerStatus::Waiting => f.write_str("waiting"),
            BrokerStatus::Running => f.write_str("running"),
            BrokerStatus::Stopping => f.write_str("stopping"),
            BrokerStatus::Stopped => f.write_str("stopped"),
            BrokerStatus::Errored(reason) => write!(f, "errored: {reason}"),
        }
    }
}

/// One half of a broker (coordinator or observer) keeping its status: what it
/// sets, what it reports when something fails, and how it retries.
///
/// Besides the status the half sets, parts of it (an observer's group appliers)
/// report standing problems by key, such as a source the node owns but nobody
/// consumes. While any is reported, a running or waiting half reads as errored
/// with those reasons, whatever it sets meanwhile.
pub(crate) struct Reporter {
    node: String,
    status: watch::Sender<BrokerStatus>,
    state: std::sync::Mutex<ReporterState>,
}

struct ReporterState {
    set: BrokerStatus,
    problems: std::collections::BTreeMap<String, String>,
}

impl Reporter {
    pub(crate) fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            status: watch::channel(BrokerStatus::Starting).0,
            state: std::sync::Mutex::new(ReporterState {
                set: BrokerStatus::Starting,
                problems: std::collections::BTreeMap::new(),
            }),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<BrokerStatus> {
        self.status.subscribe()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ReporterState> {
        // Every update is one assignment or one map entry, so a poisoned lock
        // still guards a whole value.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, state: &ReporterState) {
        let status = match &state.set {
            set if set.is_healthy() && !state.problems.is_empty() => {
                let reasons: Vec<&str> = state.problems.values().map(String::as_str).collect();
                BrokerStatus::Errored(reasons.join("; "))
            }
            set => set.clone(),
        };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }

    pub(crate) fn set(&self, status: BrokerStatus) {
        let mut state = self.state();
        state.set = status;
        self.publish(&state);
    }

    /// Reports (`Some`) or clears (`None`) the standing problem under `key`.
    pub(crate) fn problem(&self, key: &str, problem: Option<String>) {
        let mut state = self.state();
        let changed = match problem {
            Some(problem) => {
                let new = state.problems.get(key) != Some(&problem);
                if new {
                    tracing::warn!(node = %self.node, "{problem}");
                    state.problems.insert(key.to_owned(), problem);
                }
                new
            }
            None => state.problems.remove(key).is_some(),
        };
        if changed {
            self.publish(&state);
        }
    }

    /// Logs `reason` and reports the half errored until it next sets a status.
    /// The same reason again, while it stands, is logged at debug only: a store
    /// that stays down is one warning, not one per heartbeat.
    pub(crate) fn error(&self, reason: String) {
        let mut state = self.state();
        if matches!(&state.set, BrokerStatus::Errored(standing) if *standing == reason) {
            tracing::debug!(node = %self.node, "{reason}");
        } else {
            tracing::warn!(node = %self.node, "{reason}");
        }
        state.set = BrokerStatus::Errored(reason);
        self.publish(&state);
    }

    /// Runs `attempt` until it succeeds, reporting each failure as `what: error`
    /// and waiting [`RETRY_DELAY`] between tries; `None` if cancelled first.
    pub(crate) async fn retry<T, E, F>(
        &self,
        cancel: &CancellationToken,
        what: &str,
        mut attempt: impl FnMut() -> F,
    ) -> Option<T>
    where
        E: fmt::Display,
        F: Future<Output = Result<T, E>>,
    {
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return None,
                outcome = attempt() => match outcome {
                    Ok(value) => return Some(value),
                    Err(error) => self.error(format!("{what}: {error}")),
                },
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => return None,
                () = tokio::time::sleep(RETRY_DELAY) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BrokerStatus::*;
    use super::*;

    fn combined(parts: &[BrokerStatus]) -> BrokerStatus {
        BrokerStatus::combine(parts)
    }

    #[test]
    fn the_default_role_is_full_and_roles_run_their_halves() {
        assert_eq!(BrokerRole::default(), BrokerRole::Full);
        assert!(BrokerRole::Coordinator.coordinates() && !BrokerRole::Coordinator.observes());
        assert!(!BrokerRole::Observer.coordinates() && BrokerRole::Observer.observes());
        assert!(BrokerRole::Full.coordinates() && BrokerRole::Full.observes());
    }

    #[test]
    fn a_single_part_is_its_own_status() {
        for status in [
            Starting,
            Waiting,
            Running,
            Stopping,
            Stopped,
            Errored("x".into()),
        ] {
            assert_eq!(combined(std::slice::from_ref(&status)), status);
        }
    }

    #[test]
    fn parts_combine_by_severity() {
        assert_eq!(
            combined(&[Running, Errored("lease store down".into())]),
            Errored("lease store down".into())
        );
        assert_eq!(
            combined(&[Errored("a".into()), Stopping, Errored("b".into())]),
            Errored("a; b".into())
        );
        assert_eq!(combined(&[Stopped, Stopped]), Stopped);
        assert_eq!(combined(&[Running, Stopped]), Stopping);
        assert_eq!(combined(&[Stopping, Starting]), Stopping);
        assert_eq!(combined(&[Starting, Running]), Starting);
        assert_eq!(combined(&[Waiting, Running]), Running);
        assert_eq!(combined(&[Running, Running]), Running);
        assert_eq!(combined(&[Waiting, Waiting]), Waiting);
        assert_eq!(combined(&[]), Stopped);
    }

    #[test]
    fn only_running_and_waiting_are_healthy() {
        assert!(Running.is_healthy() && Waiting.is_healthy());
        assert!(!Starting.is_healthy() && !Stopping.is_healthy() && !Stopped.is_healthy());
        assert!(!Errored("x".into()).is_healthy());
    }
}
