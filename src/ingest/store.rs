//! Where ingested events and transport positions are written together: the
//! [`IngestStore`] trait, and [`MemoryIngestStore`] for the embedded default
//! (`PostgresIngestStore` in the Postgres adapter, table `weir_ingest_positions`).
//!
//! An ingest source's owner claims the source as a consumer claims a
//! checkpoint (the same rows and grants, so the same fencing), and every append
//! presents that claim: the events and the new position are written in one
//! transaction only while the claim still holds the row. A fenced owner's append
//! fails whole, and the new owner resumes from the position the last successful
//! append stored. So each message is in the store once.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::broker::Grant;
use crate::consumer::{CheckpointError, CheckpointStore, Claim, MemoryCheckpointStore};
use crate::event::{Category, Source};
use crate::store::{EventStore, StreamAppend};

/// Where an ingest source has got to on its bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IngestPosition {
    pub group: String,
    pub source: Source,
    /// The Kafka offset or JetStream stream sequence of the last message
    /// appended (or skipped as bad).
    pub position: u64,
    pub updated_at: DateTime<Utc>,
}

/// Appends of ingested messages with their transport position. Object safe.
#[async_trait]
pub trait IngestStore: Send + Sync + 'static {
    /// Claims `source` for `owner` (under `grant` when given, as
    /// [`CheckpointStore::claim_granted`] does), fencing every earlier claim,
    /// and returns the claim with the position stored for the source.
    async fn claim(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
        grant: Option<Grant>,
    ) -> Result<(Claim, Option<u64>), CheckpointError>;

    /// Appends `appends` (possibly none) to `category` and stores `position`
    /// for the claim's source, in one transaction, if `claim` still holds the
    /// row: else [`CheckpointError::Fenced`] and nothing is written. Events
    /// whose idempotency key the category holds are not written again.
    async fn append(
        &self,
        claim: &Claim,
        category: &Category,
        appends: &[StreamAppend],
        position: u64,
    ) -> Result<(), CheckpointError>;

    /// Every stored position, or one group's, by group, then source text.
    async fn positions(&self, group: Option<&str>) -> Result<Vec<IngestPosition>, CheckpointError>;
}

/// Positions in this process's memory, beside the events of `events`. Claims
/// live in a checkpoint store of its own, and one lock makes each claim and
/// each append (check, write, position) one step.
pub struct MemoryIngestStore {
    events: Arc<dyn EventStore>,
    claims: MemoryCheckpointStore,
    positions: tokio::sync::Mutex<BTreeMap<(String, String), IngestPosition>>,
}

impl MemoryIngestStore {
    pub fn new(events: Arc<dyn EventStore>) -> Self {
        Self {
            events,
            claims: MemoryCheckpointStore::new(),
            positions: tokio::sync::Mutex::default(),
        }
    }
}

/// Claims the checkpoint row of (group, source) in `claims`, under `grant`
/// when given: the claim an ingest source's appends present.
pub async fn claim_row(
    claims: &dyn CheckpointStore,
    group: &str,
    source: &Source,
    owner: &str,
    grant: Option<Grant>,
) -> Result<Claim, CheckpointError> {
    let (claim, _) = match grant {
        Some(grant) => claims.claim_granted(group, source, owner, grant).await?,
        None => claims.claim(group, source, owner).await?,
    };
    Ok(claim)
}

fn key(group: &str, source: &Source) -> (String, String) {
    (group.to_owned(), source.to_string())
}

#[async_trait]
impl IngestStore for MemoryIngestStore {
    async fn claim(
        &self,
        group: &str,
        source: &Source,
        owner: &str,
        grant: Option<Grant>,
    ) -> Result<(Claim, Option<u64>), CheckpointError> {
        let positions = self.positions.lock().await;
        let claim = claim_row(&self.claims, group, source, owner, grant).await?;
        Ok((
            claim,
            positions.get(&key(group, source)).map(|p| p.position),
        ))
    }

    async fn append(
        &self,
        claim: &Claim,
        category: &Category,
        appends: &[StreamAppend],
        position: u64,
    ) -> Result<(), CheckpointError> {
        let mut positions = self.positions.lock().await;
        self.claims.verify(claim).await?;
        if !appends.is_empty() {
            self.events.append_batch(category, appends.to_vec()).await?;
        }
        positions.insert(
            key(&claim.group, &claim.source),
            IngestPosition {
                group: claim.group.clone(),
                source: claim.source.clone(),
                position,
                updated_at: crate::store::store_precision(crate::ambient::now()),
            },
        );
        Ok(())
    }

    async fn positions(&self, group: Option<&str>) -> Result<Vec<IngestPosition>, CheckpointError> {
        Ok(self
            .positions
            .lock()
            .await
            .values()
            .filter(|p| group.is_none_or(|g| p.group == g))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventName, NewEvent, StreamName, WriteCondition};
    use crate::store::MemoryStore;

    fn batch(n: u64) -> Vec<StreamAppend> {
        let event = NewEvent::new(EventName::new("E").unwrap(), serde_json::json!(n));
        vec![StreamAppend::new(
            StreamName::new("s").unwrap(),
            WriteCondition::Any,
            vec![event],
        )]
    }

    #[tokio::test]
    async fn a_fenced_owner_appends_nothing_and_the_new_owner_resumes_from_the_position() {
        let events = Arc::new(MemoryStore::new());
        let store = MemoryIngestStore::new(events.clone());
        let source: Source = "ingest:in/t@0".parse().unwrap();
        let category = Category::new("c").unwrap();
        let (old, position) = store
            .claim("in", &source, "a", Some(Grant::new(1, 1)))
            .await
            .unwrap();
        assert_eq!(position, None);
        store.append(&old, &category, &batch(0), 10).await.unwrap();
        let (new, position) = store
            .claim("in", &source, "b", Some(Grant::new(1, 2)))
            .await
            .unwrap();
        assert_eq!(position, Some(10));
        let refused = store
            .append(&old, &category, &batch(1), 11)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, CheckpointError::Fenced { .. }),
            "{refused}"
        );
        assert!(matches!(
            store
                .claim("in", &source, "a", Some(Grant::new(1, 1)))
                .await,
            Err(CheckpointError::Superseded(_))
        ));
        store.append(&new, &category, &[], 12).await.unwrap();
        assert_eq!(
            events
                .read(&Source::Log, crate::event::Cursor::START, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        let positions = store.positions(Some("in")).await.unwrap();
        assert_eq!(
            positions.iter().map(|p| p.position).collect::<Vec<_>>(),
            [12]
        );
    }
}
