//! Ingest sources: what one `[[ingest]]` entry reads from its bus, one source per
//! Kafka partition of its topics or per NATS subject filter, allocated over the
//! fleet like any other source. Text form `ingest:NAME/KEY`: `ingest:orders-in/orders.v1@3`
//! (partition 3 of Kafka topic `orders.v1`) or `ingest:orders-in/orders.>` (the
//! NATS subject filter `orders.>`). The key means something only to the ingest
//! entry named; here it is text without spaces.

use std::fmt;

use super::{NameKind, ValidationError, validate_name};

/// One ingest source: the `[[ingest]]` entry's name and the key within it,
/// kept as `NAME/KEY` in one string (a name holds no `/`), so that a
/// [`Source`](super::Source) stays small.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IngestSource {
    name_and_key: String,
}

impl IngestSource {
    /// Validates both halves: the name as a group name without `/`, the key as
    /// non-empty text without whitespace or control characters.
    pub fn new(name: impl Into<String>, key: impl Into<String>) -> Result<Self, String> {
        let (name, key) = (name.into(), key.into());
        validate_name(NameKind::Group, &name).map_err(|e| e.to_string())?;
        if name.contains('/') {
            return Err(format!("ingest name {name:?} contains '/'"));
        }
        if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "ingest key {key:?} must be non-empty, without spaces or control characters"
            ));
        }
        Ok(Self {
            name_and_key: format!("{name}/{key}"),
        })
    }

    fn halves(&self) -> (&str, &str) {
        self.name_and_key
            .split_once('/')
            .expect("a name and a key, made so by `new`")
    }

    /// The Kafka partition `partition` of `topic` in ingest `name`.
    pub fn kafka(name: &str, topic: &str, partition: i32) -> Result<Self, String> {
        Self::new(name, format!("{topic}@{partition}"))
    }

    /// The `[[ingest]]` entry this source belongs to.
    pub fn name(&self) -> &str {
        self.halves().0
    }

    /// The topic and partition (Kafka) or the subject filter (NATS).
    pub fn key(&self) -> &str {
        self.halves().1
    }

    /// The key read as a Kafka `TOPIC@PARTITION`, if it is one.
    pub fn kafka_partition(&self) -> Option<(&str, i32)> {
        let (topic, partition) = self.key().rsplit_once('@')?;
        Some((topic, partition.parse().ok()?))
    }

    pub(super) fn parse(text: &str, rest: &str) -> Result<Self, ValidationError> {
        let invalid = |reason: String| ValidationError::Source {
            text: text.to_owned(),
            reason,
        };
        let (name, key) = rest
            .split_once('/')
            .ok_or_else(|| invalid("an ingest source needs NAME/KEY".into()))?;
        Self::new(name, key).map_err(invalid)
    }
}

impl fmt::Display for IngestSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ingest:{}", self.name_and_key)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Source;
    use super::*;

    #[test]
    fn ingest_sources_round_trip_through_text() {
        for text in ["ingest:orders-in/orders.v1@3", "ingest:o/orders.>"] {
            let source: Source = text.parse().unwrap();
            assert_eq!(source.to_string(), text);
            assert!(matches!(source, Source::Ingest(_)));
        }
        let kafka = IngestSource::kafka("in", "orders.v1", 7).unwrap();
        assert_eq!(kafka.kafka_partition(), Some(("orders.v1", 7)));
        for bad in ["ingest:", "ingest:name", "ingest:/key", "ingest:n/a b"] {
            assert!(bad.parse::<Source>().is_err(), "{bad}");
        }
    }
}
