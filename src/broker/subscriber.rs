//! The contract between a broker and the subscribers of its node: what a subscriber
//! asks for ([`SubscriberSpec`]) and how the broker tells it which sources it owns
//! ([`Subscriber::accept`], [`Subscriber::withdraw`]).

use std::collections::BTreeSet;

use async_trait::async_trait;

use crate::event::{Cursor, NameKind, Source, ValidationError, validate_name};

/// Why a subscriber could not take or give up a source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SubscriberError(pub String);

impl SubscriberError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// The allocation decision under which a broker gives a subscriber a source, by
/// its `(epoch, revision)`, compared lexicographically.
///
/// A subscriber that claims something for the source (a checkpoint row) claims it
/// under its grant, and a claim under an older grant than the row's last one is
/// refused: an observer that applies a decision the fleet has moved past (a node
/// back from a partition re-applying the decision it cached, or one walking the
/// bus's history after a restart) then cannot take the source from the owner a
/// newer decision named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Grant {
    pub epoch: u64,
    pub revision: u64,
}

impl Grant {
    pub fn new(epoch: u64, revision: u64) -> Self {
        Self { epoch, revision }
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.epoch, self.revision)
    }
}

/// One instance of a subscriber group on this node.
///
/// The broker calls these one source at a time and never accepts a source twice
/// without a withdraw in between, unless the subscriber reported it lost
/// ([`Subscriber::take_lost`]). A failed accept is tried again later; a failed
/// withdraw is taken as done once the call returns, since the broker cannot make a
/// subscriber hold on to a source.
#[async_trait]
pub trait Subscriber: Send + Sync + 'static {
    /// Starts consuming `source`, given by no particular decision (a broker that
    /// coordinates with nobody).
    async fn accept(&self, source: &Source) -> Result<(), SubscriberError>;

    /// Starts consuming `source`, given by the decision `grant`. Subscribers that
    /// claim anything for the source claim it under `grant`; the default ignores it.
    async fn accept_granted(&self, source: &Source, grant: Grant) -> Result<(), SubscriberError> {
        let _ = grant;
        self.accept(source).await
    }

    /// Sources this subscriber stopped consuming on its own since last asked (its
    /// claim was taken by another subscriber), so that the broker no longer counts
    /// them as held: it accepts them again while its newest decision still gives
    /// them, under that decision's grant. The default loses nothing.
    fn take_lost(&self) -> Vec<Source> {
        Vec::new()
    }

    /// Stops consuming `source`. Returns only once nothing more will be processed
    /// from it and its checkpoint is stored, with the cursor it stopped at (`None`
    /// if it read nothing). This is what makes the two-step handover safe: the
    /// broker tells the coordinator the source is released only after this returns.
    async fn withdraw(&self, source: &Source) -> Result<Option<Cursor>, SubscriberError>;

    /// The group was paused (`true`) or resumed by an operator: a paused
    /// subscriber keeps its sources and claims but reads nothing. The default
    /// ignores it.
    fn pause(&self, paused: bool) {
        let _ = paused;
    }
}

/// What a subscriber requests: its group, its id within the group, the sources it
/// wants a share of and the placement tags it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberSpec {
    pub group: String,
    pub id: String,
    pub sources: BTreeSet<Source>,
    pub tags: BTreeSet<String>,
}

impl SubscriberSpec {
    pub fn new(
        group: impl Into<String>,
        id: impl Into<String>,
        sources: impl IntoIterator<Item = Source>,
    ) -> Self {
        Self {
            group: group.into(),
            id: id.into(),
            sources: sources.into_iter().collect(),
            tags: BTreeSet::new(),
        }
    }

    /// Checks the group and subscriber names; the error says what is wrong.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name(NameKind::Group, &self.group)?;
        validate_name(NameKind::Subscriber, &self.id)
    }

    /// The same spec carrying `tags` as well.
    #[must_use]
    pub fn with_tags<T: Into<String>>(mut self, tags: impl IntoIterator<Item = T>) -> Self {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }
}
