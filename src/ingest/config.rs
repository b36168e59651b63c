//! `[[ingest]]`: one entry per thing to bring into the store, with its checks.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::template::Template;
use crate::consumer::ConsumerSettings;
use crate::event::{Category, NameKind, validate_name};

/// `[[ingest]]`: messages of Kafka topics or of a JetStream stream, appended to
/// one category of the store, exactly once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Names the ingest, its sources (`ingest:NAME/...`) and its group (for
    /// status, pauses and dead letters). Unique among ingests and groups.
    pub name: String,
    pub from: IngestFrom,
    pub into: IngestInto,
    /// Templates for the event name, tried in order; the first that renders
    /// names the event. A constant (no placeholder) as the last one names
    /// every message no header names.
    #[serde(default = "default_event_name")]
    pub event_name: Vec<String>,
    /// Templates for the idempotency key, tried in order; `[]` for none.
    #[serde(default = "default_idempotency_key")]
    pub idempotency_key: Vec<String>,
    /// `json`: the message is the payload, and one that is not JSON is a bad
    /// message; `base64`: one that is not JSON is stored as `{"base64": "..."}`;
    /// `weir`: the message is an event as weir's sinks send it, whose
    /// payload, metadata and time are kept.
    #[serde(default)]
    pub payload: PayloadMode,
    /// Tags a node must carry (`node.tags`) to be given this ingest's sources.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub required_tags: BTreeSet<String>,
    /// `batch_size` (messages per transaction) and `error_policy` (for bad
    /// messages) apply; every key is optional.
    #[serde(default)]
    pub consumer: ConsumerSettings,
}

/// `from = { kind = ... }`: where the messages are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum IngestFrom {
    /// Every partition of these topics, through `[kafka]`.
    Kafka { topics: Vec<String> },
    /// A JetStream stream weir reads but never creates, through `[nats]`: one
    /// source per subject filter.
    Nats {
        stream: String,
        subjects: Vec<String>,
    },
}

/// `into = { category = ..., stream = ... }`: where the events go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestInto {
    pub category: String,
    /// A template: `{key}`, `{topic}`, `{partition}`, `{subject}`,
    /// `{subject.N}`, `{header.NAME}` and literal text.
    pub stream: String,
}

/// How a message's bytes become an event's payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadMode {
    #[default]
    Json,
    Base64,
    /// The stored event as JSON, as weir's NATS and Kafka sinks send it.
    Weir,
}

fn default_event_name() -> Vec<String> {
    [
        "{header.Weir-Event-Name}",
        "{header.ce_type}",
        "{header.ce-type}",
    ]
    .map(String::from)
    .to_vec()
}

fn default_idempotency_key() -> Vec<String> {
    [
        "{header.Weir-Event-Id}",
        "{header.ce_id}",
        "{header.ce-id}",
        "{header.Nats-Msg-Id}",
    ]
    .map(String::from)
    .to_vec()
}

impl IngestConfig {
    /// Problems as (key within the entry, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| problems.push((key.to_owned(), message));
        if let Err(error) = validate_name(NameKind::Group, &self.name) {
            problem("name", error.to_string());
        } else if self.name.contains('/') {
            problem("name", format!("{:?} may not contain '/'", self.name));
        }
        for (key, message) in self.from.validate() {
            problem(&format!("from.{key}"), message);
        }
        match Category::new(self.into.category.as_str()) {
            Err(error) => problem("into.category", error.to_string()),
            Ok(category) if category.is_reserved() => problem(
                "into.category",
                format!(
                    "{:?} is reserved for weir's own records (names starting with '$')",
                    category.as_str()
                ),
            ),
            Ok(_) => {}
        }
        let bus = self.from.bus();
        if let Err(message) = Template::parse(&self.into.stream, bus) {
            problem("into.stream", format!("{:?}: {message}", self.into.stream));
        }
        if self.event_name.is_empty() {
            problem("event_name", "give at least one template".into());
        }
        for (key, templates) in [
            ("event_name", &self.event_name),
            ("idempotency_key", &self.idempotency_key),
        ] {
            for template in templates {
                if let Err(message) = Template::parse(template, bus) {
                    problem(key, format!("{template:?}: {message}"));
                }
            }
        }
        problems.extend(
            self.consumer
                .validate()
                .into_iter()
                .map(|(key, message)| (format!("consumer.{key}"), message)),
        );
        problems
    }
}

impl IngestFrom {
    /// Problems as (key within `from`, message).
    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| problems.push((key.to_owned(), message));
        match self {
            IngestFrom::Kafka { topics } => {
                if !cfg!(feature = "kafka") {
                    problem(
                        "kind",
                        "this weir was built without the `kafka` feature".into(),
                    );
                }
                if topics.is_empty() {
                    problem("topics", "give at least one topic".into());
                }
                for topic in topics {
                    if !is_kafka_topic(topic) {
                        problem(
                            "topics",
                            format!(
                                "{topic:?} is not a Kafka topic name: 1 to 249 letters, digits, '.', '_' and '-'"
                            ),
                        );
                    }
                }
            }
            IngestFrom::Nats { stream, subjects } => {
                if !cfg!(feature = "nats") {
                    problem(
                        "kind",
                        "this weir was built without the `nats` feature".into(),
                    );
                }
                if stream.is_empty()
                    || stream
                        .chars()
                        .any(|c| c.is_whitespace() || ".*>/\\".contains(c))
                {
                    problem(
                        "stream",
                        format!(
                            "{stream:?} is not a JetStream stream name: no spaces, '.', '*', '>', '/' or '\\'"
                        ),
                    );
                }
                if subjects.is_empty() {
                    problem("subjects", "give at least one subject filter".into());
                }
                for subject in subjects {
                    if let Err(message) = check_subject_filter(subject) {
                        problem("subjects", format!("{subject:?} {message}"));
                    }
                }
            }
        }
        problems
    }
}

fn is_kafka_topic(topic: &str) -> bool {
    (1..=249).contains(&topic.len())
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// A NATS subject filter: tokens separated by '.', none empty, `>` only last.
fn check_subject_filter(subject: &str) -> Result<(), String> {
    if subject.chars().any(char::is_whitespace) {
        return Err("may not contain spaces".into());
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    if tokens.iter().any(|t| t.is_empty()) {
        return Err("has an empty token: do not start or end with '.' or write '..'".into());
    }
    for (i, token) in tokens.iter().enumerate() {
        let wildcard_inside = token.len() > 1 && (token.contains('*') || token.contains('>'));
        if wildcard_inside || (*token == ">" && i + 1 < tokens.len()) {
            return Err("uses a wildcard wrongly: '*' is a whole token, '>' only the last".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(toml: &str) -> Vec<(String, String)> {
        toml::from_str::<IngestConfig>(toml).unwrap().validate()
    }

    #[test]
    fn a_complete_entry_of_each_bus_is_valid() {
        assert_eq!(
            problems(
                r#"
                name = "orders-in"
                from = { kind = "kafka", topics = ["orders.v1", "orders.v2"] }
                into = { category = "orders", stream = "{key}" }
                event_name = ["{header.Weir-Event-Name}", "OrderEvent"]
                payload = "base64"
                consumer = { batch_size = 500, error_policy = { policy = "stop" } }
                "#
            ),
            vec![]
        );
        assert_eq!(
            problems(
                r#"
                name = "payments-in"
                from = { kind = "nats", stream = "PAYMENTS", subjects = ["payments.>", "refunds.*.done"] }
                into = { category = "payments", stream = "{subject.1}" }
                idempotency_key = []
                "#
            ),
            vec![]
        );
    }

    #[test]
    fn every_problem_is_reported_at_its_key() {
        let found = problems(
            r#"
            name = "a/b"
            from = { kind = "nats", stream = "OR.DERS", subjects = ["orders.>.x", ""] }
            into = { category = "$weir", stream = "{key}" }
            event_name = []
            idempotency_key = ["{nope}"]
            consumer = { batch_size = 0 }
            "#,
        );
        let keys: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "name",
                "from.stream",
                "from.subjects",
                "from.subjects",
                "into.category",
                "into.stream",
                "event_name",
                "idempotency_key",
                "consumer.batch_size"
            ],
            "{found:?}"
        );
        assert!(found[5].1.contains("only for Kafka"), "{found:?}");
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        for (toml, unknown) in [
            (
                r#"name = "n"
                from = { kind = "kafka", topics = ["t"], group = "g" }
                into = { category = "c", stream = "{key}" }"#,
                "group",
            ),
            (
                r#"name = "n"
                from = { kind = "kafka", topics = ["t"] }
                into = { category = "c", stream = "{key}", name = "x" }"#,
                "name",
            ),
            (
                r#"name = "n"
                from = { kind = "kafka", topics = ["t"] }
                into = { category = "c", stream = "{key}" }
                start = "latest""#,
                "start",
            ),
        ] {
            let error = toml::from_str::<IngestConfig>(toml)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("unknown field `{unknown}`")),
                "{error}"
            );
        }
    }
}
