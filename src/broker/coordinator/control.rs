//! Operators' commands while this coordinator leads: pausing a group, and holding
//! some of its sources away from their owners while an operator's work runs
//! (see [`crate::broker::control`]).

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Coordinator, Term};
use crate::broker::control::{Command, ControlError, Held, HoldWork, source_matches};
use crate::broker::membership::MemberRecord;
use crate::broker::subscriber::Grant;
use crate::event::Source;

/// Sources of one group held away from their owners.
pub(super) struct Hold {
    sources: BTreeSet<Source>,
    /// Held sources whose old owner (by subscriber id) has yet to release them.
    waiting: BTreeMap<Source, String>,
    since: Instant,
    /// The decision that took the sources away; set once it is made.
    grant: Option<Grant>,
    /// Taken when the work starts.
    work: Option<HoldWork>,
    reply: oneshot::Sender<Result<Value, ControlError>>,
}

impl Hold {
    /// `subscriber` says it released `source`.
    pub(super) fn released(&mut self, source: &Source, subscriber: &str) {
        if self
            .waiting
            .get(source)
            .is_some_and(|owner| owner == subscriber)
        {
            self.waiting.remove(source);
        }
    }
}

/// The next command, or never if there is no channel (or it closed).
pub(super) async fn next_command(commands: &mut Option<mpsc::Receiver<Command>>) -> Command {
    match commands {
        Some(receiver) => match receiver.recv().await {
            Some(command) => command,
            None => {
                *commands = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

impl Term {
    /// The sources of `group` held away from their owners now.
    pub(super) fn held(&self, group: &str) -> &BTreeSet<Source> {
        static NONE: BTreeSet<Source> = BTreeSet::new();
        self.holds.get(group).map_or(&NONE, |hold| &hold.sources)
    }

    /// The term is over: holds end unfinished, their callers told so by the
    /// dropped reply, and their work stops.
    pub(super) fn drop_holds(&mut self) {
        self.holds.clear();
        self.work.abort_all();
    }
}

impl Coordinator {
    /// Reads which groups are paused; keeps what it knew if the store fails.
    pub(super) async fn refresh_paused(&self, term: &mut Term) {
        match self.fleet.paused_groups().await {
            Ok(paused) => term.paused = paused,
            Err(error) => {
                tracing::warn!(%error, "cannot read which groups are paused; keeping what was known");
            }
        }
    }

    pub(super) async fn command(&self, term: &mut Term, command: Command) {
        if command.epoch() != term.epoch {
            command.refuse();
            return;
        }
        match command {
            Command::Pause {
                epoch: _,
                group,
                paused,
                reply,
            } => {
                let outcome = match self.fleet.set_paused(&group, paused, term.epoch).await {
                    // A later term set the group since: this node no longer leads,
                    // whatever it has heard yet.
                    Ok(None) => Err(ControlError::NotLeader),
                    Ok(Some(changed)) => {
                        if paused {
                            term.paused.insert(group.clone());
                        } else {
                            term.paused.remove(&group);
                        }
                        self.decide_group(term, &group).await;
                        Ok(changed)
                    }
                    Err(error) => Err(ControlError::Store(error.to_string())),
                };
                let _ = reply.send(outcome);
            }
            Command::Hold {
                epoch: _,
                group,
                filter,
                work,
                reply,
            } => self.start_hold(term, group, filter, work, reply).await,
        }
    }

    /// Takes the matching sources of `group` from their owners: the next
    /// decision gives them to nobody, and the work starts once every old owner
    /// has let go (see [`Coordinator::advance_hold`]).
    async fn start_hold(
        &self,
        term: &mut Term,
        group: String,
        filter: Option<Source>,
        work: HoldWork,
        reply: oneshot::Sender<Result<Value, ControlError>>,
    ) {
        if term.holds.contains_key(&group) {
            let _ = reply.send(Err(ControlError::Busy(group)));
            return;
        }
        let records = match self
            .membership
            .live(&group, self.settings.member_timeout)
            .await
        {
            Ok(records) => records,
            Err(error) => {
                let _ = reply.send(Err(ControlError::Store(error.to_string())));
                return;
            }
        };
        let matches = |source: &Source| filter.as_ref().is_none_or(|f| source_matches(f, source));
        let mut sources: BTreeSet<Source> = records
            .iter()
            .flat_map(|record| record.sources.iter())
            .filter(|source| matches(source))
            .cloned()
            .collect();
        let mut waiting = BTreeMap::new();
        if let Some(state) = term.groups.get(&group) {
            if let Some(decision) = &state.decision {
                for (owner, owned) in &decision.owners {
                    for source in owned.iter().filter(|source| matches(source)) {
                        waiting.insert(source.clone(), owner.clone());
                    }
                }
                for (source, handover) in &decision.handovers {
                    let released = state
                        .released
                        .contains(&(source.clone(), handover.from.clone()));
                    if matches(source) && !released {
                        waiting.insert(source.clone(), handover.from.clone());
                    }
                }
            }
        }
        sources.extend(waiting.keys().cloned());
        tracing::info!(
            group,
            sources = sources.len(),
            owners_to_wait_for = waiting.len(),
            "holding sources for an operator's work"
        );
        term.holds.insert(
            group.clone(),
            Hold {
                sources,
                waiting,
                since: Instant::now(),
                grant: None,
                work: Some(work),
                reply,
            },
        );
        self.decide(term, &group, &records).await;
    }

    /// After a decision of `group`: notes the grant that took a hold's sources,
    /// stops waiting for old owners that are gone or past the handover timeout,
    /// and starts the work once nobody holds the sources.
    pub(super) fn advance_hold(&self, term: &mut Term, group: &str, records: &[MemberRecord]) {
        let revision = term.groups.get(group).map_or(0, |state| state.revision);
        let epoch = term.epoch;
        let Some(hold) = term.holds.get_mut(group) else {
            return;
        };
        let grant = *hold.grant.get_or_insert(Grant::new(epoch, revision));
        hold.waiting
            .retain(|_, owner| records.iter().any(|record| record.subscriber == *owner));
        if !hold.waiting.is_empty() && hold.since.elapsed() >= self.settings.handover_timeout {
            tracing::warn!(
                group,
                waiting = hold.waiting.len(),
                "old owners did not release held sources within the handover timeout; the work fences them"
            );
            hold.waiting.clear();
        }
        if !hold.waiting.is_empty() {
            return;
        }
        let Some(work) = hold.work.take() else {
            return;
        };
        let held = Held {
            group: group.to_owned(),
            sources: hold.sources.clone(),
            grant,
        };
        let group = group.to_owned();
        crate::ambient::spawn_into(&mut term.work, async move {
            let outcome = AssertUnwindSafe(work(held))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    Err(format!(
                        "the work panicked: {}",
                        crate::broker::panic_message(panic.as_ref())
                    ))
                });
            (group, outcome)
        });
    }

    /// The work of a hold ended: gives the sources back and answers the caller.
    pub(super) async fn finish_hold(
        &self,
        term: &mut Term,
        done: Result<(String, Result<Value, String>), tokio::task::JoinError>,
    ) {
        let Ok((group, outcome)) = done else {
            // Aborted with the term; its hold went with it.
            return;
        };
        let Some(hold) = term.holds.remove(&group) else {
            return;
        };
        self.decide_group(term, &group).await;
        tracing::info!(group, ok = outcome.is_ok(), "gave held sources back");
        let _ = hold.reply.send(outcome.map_err(ControlError::Work));
    }
}
