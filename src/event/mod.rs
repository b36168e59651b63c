//! Events and the names around them: validated names, sources with their canonical
//! text form, read cursors and write conditions. Pure data; knows nothing of stores.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::metrics;

pub mod ingest;
pub mod partition;

pub use ingest::IngestSource;
pub use partition::{Partition, PartitionError, SLICES, slice_of};

/// The longest name weir accepts, in bytes. Long enough for any sensible identifier,
/// short enough to keep index entries small.
pub const MAX_NAME_BYTES: usize = 255;

/// Why a name, source or cursor was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("{kind} name is empty: give a non-empty name")]
    Empty { kind: NameKind },
    #[error("{kind} name is {len} bytes long: at most {MAX_NAME_BYTES} bytes are allowed")]
    TooLong { kind: NameKind, len: usize },
    #[error("{kind} name {name:?} contains a control character at byte {index}: remove it")]
    ControlCharacter {
        kind: NameKind,
        name: String,
        index: usize,
    },
    #[error("category name {name:?} contains '/': '/' separates category from stream in sources")]
    SlashInCategory { name: String },
    #[error(
        "invalid source {text:?}: {reason}; write `log`, `category:NAME` or `stream:CATEGORY/STREAM`"
    )]
    Source { text: String, reason: String },
    #[error(
        "invalid cursor {text:?}: write it as TX:SEQUENCE, two whole numbers, as printed by `weir read`"
    )]
    Cursor { text: String },
}

/// What kind of name a [`ValidationError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Category,
    Stream,
    Event,
    IdempotencyKey,
    Group,
    Subscriber,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Category => "category",
            NameKind::Stream => "stream",
            NameKind::Event => "event",
            NameKind::IdempotencyKey => "idempotency key",
            NameKind::Group => "group",
            NameKind::Subscriber => "subscriber",
        })
    }
}

/// Checks the rules every name follows: non-empty, at most [`MAX_NAME_BYTES`], no
/// control characters.
pub fn validate_name(kind: NameKind, name: &str) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::Empty { kind });
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(ValidationError::TooLong {
            kind,
            len: name.len(),
        });
    }
    if let Some((index, _)) = name.char_indices().find(|(_, c)| c.is_control()) {
        return Err(ValidationError::ControlCharacter {
            kind,
            name: name.to_owned(),
            index,
        });
    }
    Ok(())
}

macro_rules! validated_name {
    ($(#[$doc:meta])* $name:ident, $kind:expr, $extra:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `name`; the error says what is wrong with it.
            pub fn new(name: impl Into<String>) -> Result<Self, ValidationError> {
                let name = name.into();
                validate_name($kind, &name)?;
                let extra: fn(&str) -> Result<(), ValidationError> = $extra;
                extra(&name)?;
                Ok(Self(name))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(name: String) -> Result<Self, Self::Error> {
                Self::new(name)
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;
            fn from_str(name: &str) -> Result<Self, Self::Err> {
                Self::new(name)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

validated_name!(
    /// All streams of one kind, e.g. `orders`. Never contains `/`.
    Category,
    NameKind::Category,
    |name| {
        if name.contains('/') {
            Err(ValidationError::SlashInCategory {
                name: name.to_owned(),
            })
        } else {
            Ok(())
        }
    }
);
/// Categories whose name starts with this are weir's own (`$weir`, its lifecycle
/// events): only weir appends to them, and the log and its partitions leave them
/// out, so that a `log` subscription never forwards weir's records of its own work
/// back into that work. They are read as `category:$weir` like any category.
pub const RESERVED_PREFIX: char = '$';

impl Category {
    /// Whether this category is weir's own (see [`RESERVED_PREFIX`]).
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with(RESERVED_PREFIX)
    }
}

validated_name!(
    /// The events of one entity within a category, e.g. `order-42`.
    StreamName,
    NameKind::Stream,
    |_| Ok(())
);
validated_name!(
    /// What happened, e.g. `OrderPlaced`.
    EventName,
    NameKind::Event,
    |_| Ok(())
);
validated_name!(
    /// A caller-chosen key that makes an append idempotent within its category.
    IdempotencyKey,
    NameKind::IdempotencyKey,
    |_| Ok(())
);

/// An event to append. The store gives it its id, stream, position and sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    pub name: EventName,
    pub payload: Value,
    #[serde(default = "empty_object")]
    pub metadata: Value,
    #[serde(default = "Utc::now")]
    pub occurred_at: DateTime<Utc>,
    #[serde(default)]
    pub idempotency_key: Option<IdempotencyKey>,
    /// The id the event must be stored with (an ingested event keeps the id it
    /// had where it came from); the store assigns one when `None`.
    #[serde(skip)]
    pub id: Option<Uuid>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

impl NewEvent {
    /// An event that occurred now, with empty metadata and no idempotency key.
    pub fn new(name: EventName, payload: Value) -> Self {
        Self {
            name,
            payload,
            metadata: empty_object(),
            occurred_at: crate::ambient::now(),
            idempotency_key: None,
            id: None,
        }
    }

    pub fn with_metadata(mut self, metadata: Value) -> Self {
        self.metadata = metadata;
        self
    }

    pub fn with_occurred_at(mut self, occurred_at: DateTime<Utc>) -> Self {
        self.occurred_at = occurred_at;
        self
    }

    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }

    pub fn with_idempotency_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = Some(key);
        self
    }
}

/// An event as the store holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub id: Uuid,
    pub name: EventName,
    pub category: Category,
    pub stream: StreamName,
    /// 0-based position within its stream.
    pub position: u64,
    /// Global, increasing with commit order within a stream; unique across the log.
    pub sequence: u64,
    pub payload: Value,
    pub metadata: Value,
    pub occurred_at: DateTime<Utc>,
    pub observed_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<IdempotencyKey>,
    /// Where a reader stands after this event; read after it to get the next one.
    pub cursor: Cursor,
}

impl StoredEvent {
    /// The slice its stream belongs to (see [`partition`]).
    pub fn slice(&self) -> u16 {
        slice_of(self.stream.as_str())
    }
}

/// A position in read order: the writing transaction's id, then the event's sequence.
///
/// Readers order by this pair and only read below the oldest transaction still in
/// progress, which is what makes reads gap-free without a global write lock. Its text
/// form is `TX:SEQUENCE`; [`Cursor::START`] (`0:0`) is before every event.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Cursor {
    pub tx_id: u64,
    pub sequence: u64,
}

impl Cursor {
    pub const START: Cursor = Cursor {
        tx_id: 0,
        sequence: 0,
    };

    pub fn new(tx_id: u64, sequence: u64) -> Self {
        Self { tx_id, sequence }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.tx_id, self.sequence)
    }
}

impl FromStr for Cursor {
    type Err = ValidationError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || ValidationError::Cursor {
            text: text.to_owned(),
        };
        let (tx, seq) = text.split_once(':').ok_or_else(invalid)?;
        Ok(Cursor {
            tx_id: tx.parse().map_err(|_| invalid())?,
            sequence: seq.parse().map_err(|_| invalid())?,
        })
    }
}

impl TryFrom<String> for Cursor {
    type Error = ValidationError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Cursor> for String {
    fn from(cursor: Cursor) -> String {
        cursor.to_string()
    }
}

/// What can be consumed and allocated: the whole log, one category, one stream,
/// or one partition of the log or of a category.
///
/// Canonical text form: `log`, `category:orders`, `stream:orders/order-42`,
/// `log@0/4`, `category:orders@3/16` (see [`partition`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Source {
    Log,
    Category(Category),
    Stream(Category, StreamName),
    LogPartition(Partition),
    CategoryPartition(Category, Partition),
    /// What an `[[ingest]]` entry reads from NATS or Kafka: no event of the
    /// store belongs to it.
    Ingest(IngestSource),
}

/// Partitions of one category or the log are exported one series each up to this
/// many; a finer split is summed into one series per count (`category:orders@*/64`).
pub const PARTITION_LABELS_LIMIT: u32 = 16;

impl Source {
    /// Whether this source reads a reserved category (weir's own records):
    /// `category:$weir`, one of its partitions or streams.
    pub fn is_reserved(&self) -> bool {
        match self {
            // An ingest never writes weir's own records (its config refuses it).
            Source::Log | Source::LogPartition(_) | Source::Ingest(_) => false,
            Source::Category(c) | Source::Stream(c, _) | Source::CategoryPartition(c, _) => {
                c.is_reserved()
            }
        }
    }

    /// Whether an event appended to `category` can belong to this source.
    pub fn covers_category(&self, category: &Category) -> bool {
        match self {
            Source::Log | Source::LogPartition(_) => !category.is_reserved(),
            Source::Category(c) | Source::Stream(c, _) | Source::CategoryPartition(c, _) => {
                c == category
            }
            Source::Ingest(_) => false,
        }
    }

    /// Whether `event` belongs to this source.
    pub fn holds(&self, event: &StoredEvent) -> bool {
        match self {
            Source::Log => !event.category.is_reserved(),
            Source::Category(c) => *c == event.category,
            Source::Stream(c, s) => *c == event.category && *s == event.stream,
            Source::LogPartition(p) => !event.category.is_reserved() && p.holds(event.slice()),
            Source::CategoryPartition(c, p) => *c == event.category && p.holds(event.slice()),
            Source::Ingest(_) => false,
        }
    }

    /// The partition this source is, if it is one.
    pub fn partition(&self) -> Option<Partition> {
        match self {
            Source::LogPartition(p) | Source::CategoryPartition(_, p) => Some(*p),
            _ => None,
        }
    }

    /// The source this one is a partition of (the log or the category), or itself.
    pub fn unpartitioned(&self) -> Source {
        match self {
            Source::LogPartition(_) => Source::Log,
            Source::CategoryPartition(c, _) => Source::Category(c.clone()),
            other => other.clone(),
        }
    }

    /// This source split into `count` partitions: itself for a stream source or a
    /// count of 1, else one source per partition.
    pub fn split(&self, count: u32) -> Result<Vec<Source>, PartitionError> {
        let whole = self.unpartitioned();
        if count == 1 || matches!(whole, Source::Stream(..) | Source::Ingest(_)) {
            let _valid = Partition::all(count)?;
            return Ok(vec![whole]);
        }
        Ok(Partition::all(count)?
            .map(|p| match &whole {
                Source::Category(c) => Source::CategoryPartition(c.clone(), p),
                _ => Source::LogPartition(p),
            })
            .collect())
    }

    /// The `source` label this source's metrics carry: its text form for the log,
    /// categories and partitions of at most [`PARTITION_LABELS_LIMIT`];
    /// `category:orders@*/64` for finer partitions; [`metrics::STREAMS_LABEL`] for
    /// any stream. So no source kind can grow the label set without bound.
    pub fn metric_label(&self) -> String {
        match self {
            Source::Stream(..) => metrics::STREAMS_LABEL.to_owned(),
            Source::LogPartition(p) | Source::CategoryPartition(_, p)
                if p.count() > PARTITION_LABELS_LIMIT =>
            {
                format!("{}@*/{}", self.unpartitioned(), p.count())
            }
            other => other.to_string(),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Log => f.write_str("log"),
            Source::Category(category) => write!(f, "category:{category}"),
            Source::Stream(category, stream) => write!(f, "stream:{category}/{stream}"),
            Source::LogPartition(partition) => write!(f, "log@{partition}"),
            Source::CategoryPartition(category, partition) => {
                write!(f, "category:{category}@{partition}")
            }
            Source::Ingest(ingest) => ingest.fmt(f),
        }
    }
}

impl FromStr for Source {
    type Err = ValidationError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| ValidationError::Source {
            text: text.to_owned(),
            reason,
        };
        if text == "log" {
            return Ok(Source::Log);
        }
        if let Some(partition) = text.strip_prefix("log@") {
            return partition
                .parse()
                .map(Source::LogPartition)
                .map_err(|e: PartitionError| invalid(e.to_string()));
        }
        // A category name cannot hold `/`, so `@INDEX/COUNT` at the end of one can
        // only be a partition.
        if let Some((name, partition)) = text
            .strip_prefix("category:")
            .and_then(|rest| rest.rsplit_once('@'))
            .filter(|(_, partition)| partition.contains('/'))
        {
            let category = Category::new(name).map_err(|e| invalid(e.to_string()))?;
            let partition = partition
                .parse()
                .map_err(|e: PartitionError| invalid(e.to_string()))?;
            return Ok(Source::CategoryPartition(category, partition));
        }
        if let Some(name) = text.strip_prefix("category:") {
            return Category::new(name)
                .map(Source::Category)
                .map_err(|e| invalid(e.to_string()));
        }
        if let Some(rest) = text.strip_prefix("ingest:") {
            return IngestSource::parse(text, rest).map(Source::Ingest);
        }
        if let Some(rest) = text.strip_prefix("stream:") {
            let (category, stream) = rest
                .split_once('/')
                .ok_or_else(|| invalid("a stream source needs CATEGORY/STREAM".into()))?;
            let category = Category::new(category).map_err(|e| invalid(e.to_string()))?;
            let stream = StreamName::new(stream).map_err(|e| invalid(e.to_string()))?;
            return Ok(Source::Stream(category, stream));
        }
        Err(invalid("unknown kind".into()))
    }
}

impl TryFrom<String> for Source {
    type Error = ValidationError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Source> for String {
    fn from(source: Source) -> String {
        source.to_string()
    }
}

/// A condition on a stream's state that an append requires; if it does not hold,
/// nothing is written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteCondition {
    /// No condition.
    #[default]
    Any,
    /// The stream holds no event yet.
    StreamIsEmpty,
    /// The stream's last event is at this position.
    PositionIs(u64),
    And(Box<WriteCondition>, Box<WriteCondition>),
    Or(Box<WriteCondition>, Box<WriteCondition>),
}

/// The stream states a [`WriteCondition`] accepts, in a form a store can check in one
/// step: either every state, or a finite set of last positions (`None` = empty stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcceptedHeads {
    All,
    Only(BTreeSet<Option<u64>>),
}

impl AcceptedHeads {
    pub fn accepts(&self, last_position: Option<u64>) -> bool {
        match self {
            AcceptedHeads::All => true,
            AcceptedHeads::Only(heads) => heads.contains(&last_position),
        }
    }
}

impl WriteCondition {
    pub fn and(self, other: WriteCondition) -> WriteCondition {
        WriteCondition::And(Box::new(self), Box::new(other))
    }

    pub fn or(self, other: WriteCondition) -> WriteCondition {
        WriteCondition::Or(Box::new(self), Box::new(other))
    }

    /// Whether the condition holds for a stream whose last position is `last_position`.
    pub fn holds(&self, last_position: Option<u64>) -> bool {
        self.accepted_heads().accepts(last_position)
    }

    /// Every condition built from these parts accepts either everything or a finite
    /// set of heads, so it can be checked by a store as set membership.
    pub fn accepted_heads(&self) -> AcceptedHeads {
        match self {
            WriteCondition::Any => AcceptedHeads::All,
            WriteCondition::StreamIsEmpty => AcceptedHeads::Only(BTreeSet::from([None])),
            WriteCondition::PositionIs(n) => AcceptedHeads::Only(BTreeSet::from([Some(*n)])),
            WriteCondition::And(a, b) => match (a.accepted_heads(), b.accepted_heads()) {
                (AcceptedHeads::All, other) | (other, AcceptedHeads::All) => other,
                (AcceptedHeads::Only(a), AcceptedHeads::Only(b)) => {
                    AcceptedHeads::Only(a.intersection(&b).copied().collect())
                }
            },
            WriteCondition::Or(a, b) => match (a.accepted_heads(), b.accepted_heads()) {
                (AcceptedHeads::All, _) | (_, AcceptedHeads::All) => AcceptedHeads::All,
                (AcceptedHeads::Only(a), AcceptedHeads::Only(b)) => {
                    AcceptedHeads::Only(a.union(&b).copied().collect())
                }
            },
        }
    }
}

impl fmt::Display for WriteCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteCondition::Any => f.write_str("any"),
            WriteCondition::StreamIsEmpty => f.write_str("stream is empty"),
            WriteCondition::PositionIs(n) => write!(f, "position is {n}"),
            WriteCondition::And(a, b) => write!(f, "({a} and {b})"),
            WriteCondition::Or(a, b) => write!(f, "({a} or {b})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sources_round_trip_through_text() {
        for text in [
            "log",
            "category:orders",
            "stream:orders/order-42",
            "stream:a/b/c",
        ] {
            let source: Source = text.parse().unwrap();
            assert_eq!(source.to_string(), text);
        }
        assert_eq!(
            "stream:a/b/c".parse::<Source>().unwrap(),
            Source::Stream(Category::new("a").unwrap(), StreamName::new("b/c").unwrap())
        );
    }

    #[test]
    fn bad_sources_say_what_is_wrong() {
        for (text, needle) in [
            ("", "unknown kind"),
            ("logs", "unknown kind"),
            ("category:", "empty"),
            ("stream:orders", "CATEGORY/STREAM"),
            ("stream:/x", "empty"),
            ("stream:orders/", "empty"),
            ("category:a\u{7}", "control character"),
        ] {
            let err = text.parse::<Source>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn names_are_validated() {
        assert!(Category::new("orders").is_ok());
        assert!(matches!(
            Category::new("a/b"),
            Err(ValidationError::SlashInCategory { .. })
        ));
        assert!(StreamName::new("a/b").is_ok());
        assert!(matches!(
            EventName::new(""),
            Err(ValidationError::Empty {
                kind: NameKind::Event
            })
        ));
        assert!(matches!(
            StreamName::new("x".repeat(256)),
            Err(ValidationError::TooLong { len: 256, .. })
        ));
        assert!(StreamName::new("é".repeat(127)).is_ok());
        assert!(StreamName::new("é".repeat(128)).is_err());
        assert!(matches!(
            StreamName::new("a\nb"),
            Err(ValidationError::ControlCharacter { index: 1, .. })
        ));
        let err = serde_json::from_str::<Category>("\"a/b\"").unwrap_err();
        assert!(err.to_string().contains("contains '/'"), "{err}");
    }

    #[test]
    fn cursors_round_trip_and_order_by_transaction_first() {
        let cursor: Cursor = "812:45".parse().unwrap();
        assert_eq!(cursor, Cursor::new(812, 45));
        assert_eq!(cursor.to_string(), "812:45");
        assert!(Cursor::new(1, 100) < Cursor::new(2, 1));
        for bad in ["", "1", "1:", ":1", "a:b", "1:2:3", "-1:2"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad}");
        }
    }

    #[test]
    fn write_conditions_combine() {
        use WriteCondition::*;
        assert!(Any.holds(None) && Any.holds(Some(3)));
        assert!(StreamIsEmpty.holds(None) && !StreamIsEmpty.holds(Some(0)));
        assert!(PositionIs(3).holds(Some(3)) && !PositionIs(3).holds(None));
        let either = StreamIsEmpty.or(PositionIs(2));
        assert!(either.holds(None) && either.holds(Some(2)) && !either.holds(Some(1)));
        assert!(!StreamIsEmpty.and(PositionIs(2)).holds(None));
        assert!(Any.and(PositionIs(2)).holds(Some(2)));
        assert_eq!(either.to_string(), "(stream is empty or position is 2)");
    }

    fn condition() -> impl Strategy<Value = WriteCondition> {
        let leaf = prop_oneof![
            Just(WriteCondition::Any),
            Just(WriteCondition::StreamIsEmpty),
            (0u64..4).prop_map(WriteCondition::PositionIs),
        ];
        leaf.prop_recursive(4, 16, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| a.and(b)),
                (inner.clone(), inner).prop_map(|(a, b)| a.or(b)),
            ]
        })
    }

    fn evaluate(condition: &WriteCondition, head: Option<u64>) -> bool {
        match condition {
            WriteCondition::Any => true,
            WriteCondition::StreamIsEmpty => head.is_none(),
            WriteCondition::PositionIs(n) => head == Some(*n),
            WriteCondition::And(a, b) => evaluate(a, head) && evaluate(b, head),
            WriteCondition::Or(a, b) => evaluate(a, head) || evaluate(b, head),
        }
    }

    proptest! {
        #[test]
        fn accepted_heads_agree_with_direct_evaluation(c in condition(), head in proptest::option::of(0u64..5)) {
            prop_assert_eq!(c.holds(head), evaluate(&c, head));
        }

        #[test]
        fn source_text_round_trips(category in "[a-z][a-z0-9_-]{0,12}", stream in "[a-z0-9/_-]{1,12}") {
            let source = Source::Stream(Category::new(category).unwrap(), StreamName::new(stream).unwrap());
            prop_assert_eq!(source.to_string().parse::<Source>().unwrap(), source);
        }
    }

    #[test]
    fn stream_sources_share_one_metric_label() {
        let stream: Source = "stream:orders/order-42".parse().unwrap();
        let category: Source = "category:orders".parse().unwrap();
        assert_eq!(stream.metric_label(), metrics::STREAMS_LABEL);
        assert_eq!(category.metric_label(), "category:orders");
        assert_eq!(Source::Log.metric_label(), "log");
    }
}
