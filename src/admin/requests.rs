//! Resets run apart from the HTTP request that asked for them, remembered by
//! request id in the fleet store.
//!
//! A reset can outlast its request (the old owners take up to the handover
//! timeout to let go), and its caller can go away mid-way. So the reset is a
//! task of its own: the audit record that it starts is in the store before the
//! work begins, its outcome is stored under its request id and recorded when it
//! ends, whoever is still listening. The request waits for the outcome for a
//! while, then answers 202 "in progress"; a resend of the same id waits again,
//! or gets the first outcome once there is one, and never runs the reset twice.
//! A request that was running under an earlier leader's term, which ended before
//! it finished, is answered "interrupted" (its work stopped with the term).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use super::audit::Audit;
use super::reset::ResetStores;
use super::{Admin, AdminError, ResetReport, ResetRequest};
use crate::broker::control::{ControlHandle, FleetStore, HoldWork, RequestRecord};
use crate::event::Source;
use crate::lifecycle::Journal;

/// An answer as it is sent and remembered: the HTTP status and the JSON body.
pub type Answer = (u16, Value);

/// How long stopping waits for resets under way to record their outcome.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The body of a 202: the request runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgress {
    pub request_id: String,
    /// Always `in_progress`.
    pub state: String,
    pub message: String,
}

/// A reset under way: its group, and its outcome once known.
type UnderWay = (String, watch::Receiver<Option<Answer>>);

/// The resets under way on this node, and their tasks.
#[derive(Default)]
pub(crate) struct Running {
    /// By request id: the group, and the outcome once known.
    outcomes: Arc<Mutex<BTreeMap<String, UnderWay>>>,
    tasks: Mutex<tokio::task::JoinSet<()>>,
}

impl Running {
    fn outcomes(&self) -> MutexGuard<'_, BTreeMap<String, UnderWay>> {
        lock(&self.outcomes)
    }

    /// The request id of the reset of `group` still running here, if one is.
    fn of_group(&self, group: &str) -> Option<String> {
        self.outcomes()
            .iter()
            .find(|(_, (of, outcome))| of == group && outcome.borrow().is_none())
            .map(|(id, _)| id.clone())
    }

    /// Waits (a few seconds at most) for the resets under way to record how
    /// they ended; their work stops with the coordinator's term.
    pub(crate) async fn stop(&self) {
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        let drained = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(STOP_TIMEOUT, drained).await.is_err() {
            tracing::warn!("resets under way did not record their outcome before the node stopped");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change is one insert, remove or swap: a poisoned lock guards a whole value.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `outcome` as it is answered.
pub(crate) fn answer_of<T: Serialize>(outcome: Result<T, AdminError>) -> Answer {
    let value = match outcome {
        Ok(value) => serde_json::to_value(value).map_err(|e| AdminError::Failed(e.to_string())),
        Err(error) => Err(error),
    };
    match value {
        Ok(value) => (200, value),
        Err(error) => error_answer(&error),
    }
}

/// `error` as it is answered.
pub(crate) fn error_answer(error: &AdminError) -> Answer {
    (
        error.status().as_u16(),
        serde_json::to_value(error.body()).unwrap_or(Value::Null),
    )
}

/// What one reset's task needs of the node.
struct ResetRun {
    id: String,
    request: ResetRequest,
    requested: BTreeSet<Source>,
    audit: Audit,
    stores: ResetStores,
    control: ControlHandle,
    fleet: Arc<dyn FleetStore>,
    journal: Journal,
}

impl ResetRun {
    /// Holds the sources, writes the plan, and remembers and records how it
    /// ended; whether the fleet store took the outcome (if not, this node
    /// keeps answering it to resends).
    async fn run(self, done: watch::Sender<Option<Answer>>) -> bool {
        let outcome = self.hold().await;
        let failure = outcome.as_ref().err().map(ToString::to_string);
        let answer = answer_of(outcome);
        let stored = self
            .fleet
            .finish_request(&self.id, answer.0, &answer.1)
            .await;
        if let Err(error) = &stored {
            tracing::warn!(request = %self.id, %error, "cannot store the outcome of a reset; this node answers it to resends of its id");
        }
        tracing::info!(request = %self.id, group = %self.request.group, error = failure.as_deref(), "reset ended");
        let answered = (answer.0 == 200).then_some(&answer.1);
        self.journal.record(
            self.audit
                .event(failure.as_deref().unwrap_or("done"), answered),
        );
        let _ = done.send(Some(answer));
        stored.is_ok()
    }

    async fn hold(&self) -> Result<ResetReport, AdminError> {
        let stores = self.stores.clone();
        let (requested, target, filter) = (
            self.requested.clone(),
            self.request.target,
            self.request.source.clone(),
        );
        let request_id = self.id.clone();
        // Planned again once the sources are held: their owners stored their
        // cursors on the way out.
        let work: HoldWork = Box::new(move |held| {
            Box::pin(async move {
                let requested: BTreeSet<Source> = requested.union(&held.sources).cloned().collect();
                let lines = stores
                    .plan(&held.group, filter.as_ref(), target, &requested)
                    .await
                    .map_err(|error| error.to_string())?;
                stores
                    .write(&held.group, &lines, held.grant)
                    .await
                    .map_err(|error| error.to_string())?;
                serde_json::to_value(ResetReport {
                    group: held.group,
                    dry_run: false,
                    lines,
                    grant: Some(held.grant.to_string()),
                    request_id: Some(request_id),
                })
                .map_err(|error| error.to_string())
            })
        });
        let outcome = self
            .control
            .hold(&self.request.group, self.request.source.clone(), work)
            .await?;
        serde_json::from_value(outcome).map_err(|error| AdminError::Failed(error.to_string()))
    }
}

impl Admin {
    /// Starts reset `id` (already remembered as running) in a task of its own,
    /// once its audit record is stored, and waits a while for its outcome.
    pub(crate) async fn start_reset(
        &self,
        id: String,
        request: ResetRequest,
        requested: BTreeSet<Source>,
        audit: Audit,
    ) -> Result<Answer, AdminError> {
        if let Some(other) = self.running.of_group(&request.group) {
            let busy = AdminError::Conflict(format!(
                "reset {other} of group {} is in progress; wait for it to finish (resend it with its request id for its outcome), then try again",
                request.group
            ));
            let (status, body) = error_answer(&busy);
            self.fleet.finish_request(&id, status, &body).await?;
            return Err(busy);
        }
        if let Err(error) = self.journal.record_now(audit.event("started", None)).await {
            let refused = AdminError::Unavailable(format!(
                "cannot store the audit record of reset {id} ({error}), so it did not start; nothing was changed: try again once the store answers"
            ));
            let (status, body) = error_answer(&refused);
            let _ = self.fleet.finish_request(&id, status, &body).await;
            return Err(refused);
        }
        let run = ResetRun {
            id: id.clone(),
            request,
            requested,
            audit,
            stores: self.reset_stores(),
            control: self.control.clone(),
            fleet: Arc::clone(&self.fleet),
            journal: self.journal.clone(),
        };
        let (done, outcome) = watch::channel(None);
        self.running
            .outcomes()
            .insert(id.clone(), (run.request.group.clone(), outcome.clone()));
        let outcomes = Arc::clone(&self.running.outcomes);
        let task_id = id.clone();
        {
            let mut tasks = lock(&self.running.tasks);
            while tasks.try_join_next().is_some() {}
            crate::ambient::spawn_into(&mut tasks, async move {
                if run.run(done).await {
                    lock(&outcomes).remove(&task_id);
                }
            });
        }
        Ok(self.await_outcome(&id, outcome).await)
    }

    /// The outcome of reset `id` if it comes within the write timeout, else
    /// "in progress".
    async fn await_outcome(
        &self,
        id: &str,
        mut outcome: watch::Receiver<Option<Answer>>,
    ) -> Answer {
        let finished = tokio::time::timeout(self.write_timeout, async {
            outcome.wait_for(Option::is_some).await.ok()?.clone()
        })
        .await;
        match finished {
            Ok(Some(answer)) => answer,
            _ => in_progress(id, self.write_timeout),
        }
    }

    /// The answer to a resend of a known request id, `known` as remembered.
    pub(crate) async fn known_request(
        &self,
        id: &str,
        request: &Value,
        known: RequestRecord,
        epoch: u64,
    ) -> Result<Answer, AdminError> {
        if known.request != *request {
            return Err(AdminError::BadRequest(format!(
                "request id {id} was sent before with another request ({}); give each request an id of its own",
                known.request
            )));
        }
        if let Some(answer) = known.outcome {
            tracing::info!(request = %id, "a resend of a finished request: answering its first outcome");
            return Ok(answer);
        }
        let under_way = self
            .running
            .outcomes()
            .get(id)
            .map(|(_, outcome)| outcome.clone());
        if let Some(outcome) = under_way {
            return Ok(self.await_outcome(id, outcome).await);
        }
        if known.epoch == epoch && known.node == self.node {
            // Between storing its outcome and leaving the running set.
            return Ok(in_progress(id, Duration::ZERO));
        }
        let interrupted = AdminError::Unavailable(format!(
            "request {id} was taken by {} under coordinator term {}, which ended before it finished: its work stopped there, and some checkpoints may have moved; check `weir checkpoints list` and send the reset again (with a new request id)",
            known.node, known.epoch
        ));
        let (status, body) = error_answer(&interrupted);
        self.fleet.finish_request(id, status, &body).await?;
        Err(interrupted)
    }
}

fn in_progress(id: &str, waited: Duration) -> Answer {
    let body = InProgress {
        request_id: id.to_owned(),
        state: "in_progress".to_owned(),
        message: format!(
            "the reset is still in progress after {}s (old owners may take up to the handover timeout to let go); send the same request with request id {id} again for its outcome: it will not run twice",
            waited.as_secs()
        ),
    };
    (202, serde_json::to_value(body).unwrap_or(Value::Null))
}
