//! Checkpoints: the cursor each group's consumer of a source has reached, one row per
//! (group, source), fenced by owner.
//!
//! Accepting a source *claims* its row: the claim gets a fresh token and every later
//! save must present it. A consumer that lost its source without knowing (its node
//! was partitioned, or paused past the member timeout) finds its next save refused
//! with [`CheckpointError::Fenced`] and stops, so it cannot move the new owner's
//! cursor. Saving happens only every so many events, so before handing each batch
//! to its processor a consumer also [verifies](CheckpointStore::verify) its claim:
//! a fenced consumer publishes at most the one batch already in flight.
//!
//! A claim made for an allocation decision carries the decision's [`Grant`], and
//! a claim under an older grant than the row was last claimed under is refused
//! with [`CheckpointError::Superseded`]: a node applying a decision the fleet has
//! moved past cannot take the row from the owner a newer decision named.
//!
//! Backends: [`MemoryCheckpointStore`] and `PostgresCheckpointStore` (feature
//! `postgres`, table `weir_checkpoints`).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::broker::Grant;
use crate::event::{Cursor, Source};
use crate::store;

/// Why a checkpoint operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "the checkpoint of {consumed} in group {group} was claimed by {owner} after {claimant} claimed it: {claimant} no longer owns the source and stops consuming it"
    )]
    Fenced {
        group: String,
        /// The source whose checkpoint it is (`source` would read as the error's cause).
        consumed: Source,
        /// Whoever holds the row now.
        owner: String,
        /// The subscriber whose claim was refused.
        claimant: String,
    },
    #[error(transparent)]
    Superseded(Box<Superseded>),
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// A claim refused because the row was claimed under a newer allocation decision.
#[derive(Debug, thiserror::Error)]
#[error(
    "the checkpoint of {consumed} in group {group} was claimed by {owner} under allocation decision {held}, newer than decision {grant} under which {claimant} claims it: {claimant} does not own the source and does not consume it; it takes the source up again once a newer decision gives it"
)]
pub struct Superseded {
    pub group: String,
    /// The source whose checkpoint it is.
    pub consumed: Source,
    /// Whoever holds the row now, and under which decision.
    pub owner: String,
    pub held: Grant,
    /// The subscriber whose claim was refused, and its decision.
    pub claimant: String,
    pub grant: Grant,
}

impl CheckpointError {
    /// Retrying may succeed; a fenced claim never will.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CheckpointError::Store(error) if error.is_retryable())
    }
}

/// Proof that a subscriber holds a checkpoint row, handed out by
/// [`CheckpointStore::claim`] and checked by [`CheckpointStore::save`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub group: String,
    pub source: Source,
    /// The subscriber that claimed the row, for operators.
    pub owner: String,
    /// Unique to this claim: a second claim by the same subscriber (say, a restarted
    /// process with the same id) fences the first.
    pub token: Uuid,
}

impl Claim {
    /// A new claim of (group, source) for `owner`, with a token of its own.
    pub fn new(group: &str, source: &Source, owner: &str) -> Self {
        Self {
            group: group.to_owned(),
            source: source.clone(),
            owner: owner.to_owned(),
            token: crate::ambient::token(),
        }
    }

    /// The error for this claim's save refused because `owner` holds the row now.
    pub fn fenced_by(&self, owner: String) -> CheckpointError {
        CheckpointError::Fenced {
            group: self.group.clone(),
            consumed: self.source.clone(),
            owner,
            claimant: self.owner.clone(),
        }
    }
}

/// A stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub group: String,
    pub source: Source,
    /// The subscriber holding the row (the last to claim it).
    pub owner: String,
    /// Where the group has got to in the source; [`Cursor::START`] before any event.
    pub cursor: Cursor,
    /// On the store's clock.
    pub updated_at: DateTime<Utc>,
}

/// Where checkpoints live. Object safe, so a runtime holds `Arc<dyn CheckpointStore>`.
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// Claims the (group, source) row for `owner`, creating it at [`Cursor::START`]
    /// if there is none, and returns the claim with the stored cursor. Every earlier
    /// claim is fenced from now on. The claim belongs to no allocation decision:
    /// the row's grant goes back to the lowest, which every decision's claim beats.
    async fn claim(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
    ) -> Result<(Claim, Cursor), CheckpointError>;

    /// Claims the row as [`CheckpointStore::claim`] does, for the allocation
    /// decision `grant`, unless the row was last claimed under a newer one: then
    /// [`CheckpointError::Superseded`] and nothing changes. An equal grant wins, so
    /// that an owner restarted under the same decision takes its row back.
    async fn claim_granted(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
        grant: Grant,
    ) -> Result<(Claim, Cursor), CheckpointError>;

    /// Stores `cursor` if `claim` still holds the row; [`CheckpointError::Fenced`]
    /// if another claim has taken it since.
    async fn save(&self, claim: &Claim, cursor: Cursor) -> Result<(), CheckpointError>;

    /// `Ok` if `claim` still holds its row; [`CheckpointError::Fenced`] if another
    /// claim has taken it since. Changes nothing: one read, cheap enough to ask
    /// before every batch.
    async fn verify(&self, claim: &Claim) -> Result<(), CheckpointError>;

    /// The checkpoint of (group, source), if it was ever claimed.
    async fn load(
        &self,
        group: &str,
        source: &Source,
    ) -> Result<Option<Checkpoint>, CheckpointError>;

    /// Every checkpoint, or one group's, ordered by group, then source text.
    async fn list(&self, group: Option<&str>) -> Result<Vec<Checkpoint>, CheckpointError>;
}

/// Checkpoints in this process's memory.
#[derive(Debug, Default)]
pub struct MemoryCheckpointStore {
    rows: Mutex<BTreeMap<(String, String), Row>>,
}

#[derive(Debug, Clone)]
struct Row {
    source: Source,
    owner: String,
    /// The decision the row was last claimed under.
    grant: Grant,
    token: Uuid,
    cursor: Cursor,
    updated_at: DateTime<Utc>,
}

impl MemoryCheckpointStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn rows(&self) -> MutexGuard<'_, BTreeMap<(String, String), Row>> {
        // Every update is a single insert or assignment, so a poisoned map is whole.
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn checkpoint(group: &str, row: &Row) -> Checkpoint {
        Checkpoint {
            group: group.to_owned(),
            source: row.source.clone(),
            owner: row.owner.clone(),
            cursor: row.cursor,
            updated_at: row.updated_at,
        }
    }
}

impl MemoryCheckpointStore {
    /// Claims the row under `grant` (`None`: under no decision, unconditionally).
    fn claim_row(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
        grant: Option<Grant>,
    ) -> Result<(Claim, Cursor), CheckpointError> {
        let claim = Claim::new(group, source, owner);
        let mut rows = self.rows();
        let row = rows.entry(key(group, source)).or_insert_with(|| Row {
            source: source.clone(),
            owner: String::new(),
            grant: Grant::default(),
            token: Uuid::nil(),
            cursor: Cursor::START,
            updated_at: crate::ambient::now(),
        });
        if let Some(grant) = grant.filter(|grant| *grant < row.grant) {
            return Err(CheckpointError::Superseded(Box::new(Superseded {
                group: group.to_owned(),
                consumed: source.clone(),
                owner: row.owner.clone(),
                held: row.grant,
                claimant: owner.to_owned(),
                grant,
            })));
        }
        row.owner = owner.to_owned();
        row.grant = grant.unwrap_or_default();
        row.token = claim.token;
        row.updated_at = crate::ambient::now();
        Ok((claim, row.cursor))
    }
}

fn key(group: &str, source: &Source) -> (String, String) {
    (group.to_owned(), source.to_string())
}

#[async_trait]
impl CheckpointStore for MemoryCheckpointStore {
    async fn claim(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
    ) -> Result<(Claim, Cursor), CheckpointError> {
        self.claim_row(group, source, owner, None)
    }

    async fn claim_granted(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
        grant: Grant,
    ) -> Result<(Claim, Cursor), CheckpointError> {
        self.claim_row(group, source, owner, Some(grant))
    }

    async fn save(&self, claim: &Claim, cursor: Cursor) -> Result<(), CheckpointError> {
        let mut rows = self.rows();
        match rows.get_mut(&key(&claim.group, &claim.source)) {
            Some(row) if row.token == claim.token => {
                row.cursor = cursor;
                row.updated_at = crate::ambient::now();
                Ok(())
            }
            row => Err(claim.fenced_by(row.map(|row| row.owner.clone()).unwrap_or_default())),
        }
    }

    async fn verify(&self, claim: &Claim) -> Result<(), CheckpointError> {
        match self.rows().get(&key(&claim.group, &claim.source)) {
            Some(row) if row.token == claim.token => Ok(()),
            row => Err(claim.fenced_by(row.map(|row| row.owner.clone()).unwrap_or_default())),
        }
    }

    async fn load(
        &self,
        group: &str,
        source: &Source,
    ) -> Result<Option<Checkpoint>, CheckpointError> {
        Ok(self
            .rows()
            .get(&key(group, source))
            .map(|row| Self::checkpoint(group, row)))
    }

    async fn list(&self, group: Option<&str>) -> Result<Vec<Checkpoint>, CheckpointError> {
        Ok(self
            .rows()
            .iter()
            .filter(|((g, _), _)| group.is_none_or(|wanted| g == wanted))
            .map(|((g, _), row)| Self::checkpoint(g, row))
            .collect())
    }
}
/// The readers of lifecycle events as the checkpoints say: every checkpoint of
/// a source in a reserved category. Lifecycle retention keeps what the lowest
/// of them has still to read.
pub struct LifecycleCheckpoints(pub std::sync::Arc<dyn CheckpointStore>);

#[async_trait]
impl crate::lifecycle::LifecycleReaders for LifecycleCheckpoints {
    async fn lowest(&self) -> store::Result<Option<Cursor>> {
        let checkpoints = self.0.list(None).await.map_err(|error| match error {
            CheckpointError::Store(error) => error,
            other => store::Error::Backend(other.to_string()),
        })?;
        Ok(checkpoints
            .iter()
            .filter(|checkpoint| checkpoint.source.is_reserved())
            .map(|checkpoint| checkpoint.cursor)
            .min())
    }
}
