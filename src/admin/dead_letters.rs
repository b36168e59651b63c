//! Dead letters retried through the group's processor or sink, or purged, by the
//! leader (see [`crate::consumer::replay`] for the order and what happens to
//! each letter). One retry or purge runs at a time, so that two retries cannot
//! deliver one event twice.

use crate::consumer::replay::{
    DeadLetterRequest, PurgeReport, ReplayError, RetryReport, purge_dead_letters,
    retry_dead_letters,
};
use crate::consumer::settings::Executor;

use super::{Admin, AdminError};

impl From<ReplayError> for AdminError {
    fn from(error: ReplayError) -> Self {
        match error {
            ReplayError::NothingChosen { .. } => AdminError::BadRequest(error.to_string()),
            ReplayError::NotInGroup { .. } => AdminError::NotFound(error.to_string()),
            ReplayError::Store(error) => error.into(),
        }
    }
}

impl Admin {
    /// Retries the chosen dead letters of a group through its processor, on
    /// the group's executor, for as long as this node's leadership term lasts:
    /// a deposed leader's retry must not run beside the new leader's.
    pub async fn retry_dead_letters(
        &self,
        request: &DeadLetterRequest,
    ) -> Result<RetryReport, AdminError> {
        let processor = self.processors.get(&request.group).ok_or_else(|| {
            AdminError::NotFound(format!(
                "the leader ({}) has no processor for group {}: the group is not configured on it, or its sink could not be built there (see its log); retry once the leader can build it",
                self.node, request.group
            ))
        })?;
        let executor = self
            .executors
            .get(&request.group)
            .unwrap_or(&Executor::Main);
        let _one_at_a_time = self.dead_letter_lock.lock().await;
        let epoch = self.ensure_leader().await?;
        let mut leading = self.control.leading.clone();
        let term_over = async move {
            // A closed channel: the coordinator is gone, and its term with it.
            let _ = leading.wait_for(|now| *now != Some(epoch)).await;
        };
        let retry = retry_dead_letters(
            self.stores.events.as_ref(),
            self.stores.dead_letters.as_ref(),
            processor,
            executor,
            request,
        );
        tokio::select! {
            report = retry => Ok(report?),
            () = term_over => Err(AdminError::Unavailable(format!(
                "this node's term as leader (epoch {epoch}) ended during the retry of group {}'s dead letters, which stopped there: letters whose events went through since the last removal are delivered once more by the next retry (at least once); send it again, to the new leader",
                request.group
            ))),
        }
    }

    /// Forgets the chosen dead letters of a group.
    pub async fn purge_dead_letters(
        &self,
        request: &DeadLetterRequest,
    ) -> Result<PurgeReport, AdminError> {
        let _one_at_a_time = self.dead_letter_lock.lock().await;
        Ok(purge_dead_letters(self.stores.dead_letters.as_ref(), request).await?)
    }
}
