//! librdkafka clients from [`KafkaOptions`]: client settings, topic creation,
//! and the classification of cluster errors.

use std::collections::BTreeSet;
use std::ops::Deref;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::kafka::KafkaOptions;

/// How long connecting, creating topics and reading partition metadata may take
/// before the cluster counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a bus publish or a sink's delivery waits for the broker to store it
/// (librdkafka's `message.timeout.ms`, unless `[kafka.properties]` sets it).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// What a record costs beyond its key and value: the record batch header and the
/// record's own framing, with room to spare.
const RECORD_OVERHEAD: usize = 512;

/// Why weir could not set up its use of a Kafka cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("librdkafka refused the [kafka] settings: {0}; fix or remove that property")]
    InvalidProperty(String),
    #[error("cannot reach Kafka at {brokers}: {reason}")]
    Unreachable { brokers: String, reason: String },
    #[error("cannot create Kafka topic {topic:?}: {reason}")]
    Topic { topic: String, reason: String },
}

/// librdkafka settings weir changes from librdkafka's defaults in every client
/// (bus, sink, topic admin), so that a client is back at work soon after a
/// broker it lost comes back. Each can be overridden in `[kafka.properties]`.
///
/// - `reconnect.backoff.max.ms`: librdkafka doubles its wait between attempts to
///   reconnect to a broker it lost, from `reconnect.backoff.ms` (100 ms) up to
///   this, with up to 50 % jitter on top. Its default, 10 s, meant that a broker
///   back after a 3 s outage was reached again up to 15 s later: sinks and the
///   bus stood still for 11-13 s after a 3 s restart. At 500 ms a client tries
///   again at most 750 ms after the broker is back (the fault suite allows an
///   outage to hold events up for 2 s beyond it, and measured 0.5-1 s), which
///   costs a lost broker two connection attempts a second per client.
pub const RECONNECT_DEFAULTS: [(&str, &str); 1] = [("reconnect.backoff.max.ms", "500")];

/// librdkafka settings for `kafka`: `bootstrap.servers` from `brokers`,
/// [`RECONNECT_DEFAULTS`], then every `[kafka.properties]` entry as it is
/// written (overriding those defaults).
pub fn client_config(kafka: &KafkaOptions) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    config.set("client.id", "weir");
    for (key, value) in RECONNECT_DEFAULTS {
        config.set(key, value);
    }
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config
}

/// Sets `key` to `value` unless the operator set it in `[kafka.properties]`.
pub fn set_default(config: &mut ClientConfig, key: &str, value: &str) {
    if config.get(key).is_none() {
        config.set(key, value);
    }
}

/// A topic to create when it is missing, with its topic-level settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub settings: Vec<(String, String)>,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            settings: Vec::new(),
        }
    }

    /// The same topic with `key` (e.g. `retention.ms`) set to `value`.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((key.into(), value.into()));
        self
    }
}

/// Creates those of `topics` that do not exist yet, with `kafka.partitions`
/// partitions and `kafka.replication` replicas; existing topics are left as they
/// are. Existing topics are looked up first, so an account that may write to
/// topics but not create them works as long as the topics are there.
pub async fn ensure_topics(kafka: &KafkaOptions, topics: &[TopicSpec]) -> Result<(), ClusterError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(kafka)
        .create()
        .map_err(|error| property_error(kafka, error))?;
    let names: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
    let (admin, existing) = tokio::task::spawn_blocking(move || {
        let existing = existing_topics(&admin, &names);
        (DropOffRuntime::new(admin), existing)
    })
    .await
    .map_err(|error| unreachable(kafka, &error.to_string()))?;
    let existing = existing.map_err(|error| cluster_error(kafka, None, error))?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .filter(|topic| !existing.contains(&topic.name))
        .map(|topic| {
            topic.settings.iter().fold(
                NewTopic::new(
                    &topic.name,
                    kafka.partitions,
                    TopicReplication::Fixed(kafka.replication),
                ),
                |new, (key, value)| new.set(key, value),
            )
        })
        .collect();
    if new_topics.is_empty() {
        return Ok(());
    }
    let options = AdminOptions::new()
        .request_timeout(Some(CONNECT_TIMEOUT))
        .operation_timeout(Some(CONNECT_TIMEOUT));
    let created = tokio::time::timeout(
        CONNECT_TIMEOUT + Duration::from_secs(1),
        admin.create_topics(&new_topics, &options),
    )
    .await
    .map_err(|_| unreachable(kafka, "creating topics timed out"))?
    .map_err(|error| cluster_error(kafka, None, error))?;
    for result in created {
        match result {
            // Another node may have created it meanwhile.
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) if is_transient(code) => {
                return Err(unreachable(
                    kafka,
                    &format!("creating topic {topic:?} failed: {code}"),
                ));
            }
            Err((topic, code)) => {
                return Err(ClusterError::Topic {
                    topic,
                    reason: format!(
                        "{code}; create it yourself, or give weir's Kafka account the right to create topics"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Which of `names` the cluster has, by one metadata request each.
fn existing_topics(
    admin: &AdminClient<DefaultClientContext>,
    names: &[String],
) -> Result<BTreeSet<String>, KafkaError> {
    let mut existing = BTreeSet::new();
    for name in names {
        let metadata = admin.inner().fetch_metadata(Some(name), CONNECT_TIMEOUT)?;
        if metadata
            .topics()
            .iter()
            .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
        {
            existing.insert(name.clone());
        }
    }
    Ok(existing)
}

fn unreachable(kafka: &KafkaOptions, reason: &str) -> ClusterError {
    ClusterError::Unreachable {
        brokers: kafka.brokers.clone(),
        reason: reason.to_owned(),
    }
}

pub fn property_error(kafka: &KafkaOptions, error: KafkaError) -> ClusterError {
    match error {
        KafkaError::ClientConfig(..) => ClusterError::InvalidProperty(error.to_string()),
        other => cluster_error(kafka, None, other),
    }
}

/// Classifies a client error: transport problems mean the cluster is unreachable.
fn cluster_error(kafka: &KafkaOptions, topic: Option<&str>, error: KafkaError) -> ClusterError {
    match error.rdkafka_error_code() {
        Some(code) if is_transient(code) => unreachable(kafka, &error.to_string()),
        _ => match topic {
            Some(topic) => ClusterError::Topic {
                topic: topic.to_owned(),
                reason: error.to_string(),
            },
            None => unreachable(kafka, &error.to_string()),
        },
    }
}

/// Error codes that say the cluster could not be reached or did not answer in
/// time, as opposed to refusing what was asked.
pub fn is_transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::TimedOutQueue
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::BrokerNotAvailable
            | RDKafkaErrorCode::CoordinatorNotAvailable
            | RDKafkaErrorCode::NotCoordinator
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
    )
}

/// Holds a librdkafka client and closes it on a thread of its own when dropped:
/// closing waits for the client's threads and outstanding requests, which must
/// not hold up an async runtime's worker.
pub struct DropOffRuntime<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> DropOffRuntime<T> {
    pub fn new(client: T) -> Self {
        Self(Some(client))
    }
}

impl<T: Send + 'static> Deref for DropOffRuntime<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_ref().expect("taken only in drop")
    }
}

impl<T: Send + 'static> Drop for DropOffRuntime<T> {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            // If no thread can be started the client is closed here instead,
            // which is slower but still correct.
            let _ = std::thread::Builder::new()
                .name("weir-kafka-close".into())
                .spawn(move || drop(client));
        }
    }
}

/// The largest payload a producer configured by `config` sends: its
/// `message.max.bytes` less what the record around the payload needs.
pub fn payload_limit(config: &ClientConfig, key_len: usize) -> usize {
    let max = config
        .get("message.max.bytes")
        .and_then(|value| value.trim().parse::<usize>().ok())
        .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
    max.saturating_sub(RECORD_OVERHEAD + key_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_reconnect_within_a_second_unless_the_properties_say_otherwise() {
        let kafka = KafkaOptions::default();
        let config = client_config(&kafka);
        assert_eq!(config.get("reconnect.backoff.max.ms"), Some("500"));

        let mut kafka = KafkaOptions::default();
        kafka
            .properties
            .insert("reconnect.backoff.max.ms".into(), "5000".into());
        let config = client_config(&kafka);
        assert_eq!(config.get("reconnect.backoff.max.ms"), Some("5000"));
    }

    #[test]
    fn the_payload_limit_follows_message_max_bytes() {
        let mut config = ClientConfig::new();
        assert_eq!(
            payload_limit(&config, 10),
            DEFAULT_MESSAGE_MAX_BYTES - RECORD_OVERHEAD - 10
        );
        config.set("message.max.bytes", "4000");
        assert_eq!(payload_limit(&config, 0), 4000 - RECORD_OVERHEAD);
    }
}
