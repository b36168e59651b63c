//! A message read from a bus, and what an ingest makes of it: the stream it goes
//! to and the event it becomes. A message that cannot become an event (too
//! large, no valid stream or event name, not JSON) is a permanent
//! [`ProcessError`], handled by the ingest's error policy.

use base64::Engine;
use serde_json::{Value, json};
use uuid::Uuid;

use super::config::{IngestConfig, PayloadMode};
use super::template::{Bus, Template};
use crate::consumer::ProcessError;
use crate::event::{Category, EventName, IdempotencyKey, NewEvent, StreamName};

/// The header whose UUID becomes the ingested event's id: weir's own sinks set
/// it, so that an event carried out and back in keeps its id.
pub const EVENT_ID_HEADER: &str = "Weir-Event-Id";

/// How many bytes of a bad message a dead letter keeps.
const FIRST_BYTES: usize = 256;

/// One message as read from Kafka or NATS.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// The transport position: the Kafka offset or the JetStream stream sequence.
    pub position: u64,
    pub key: Option<Vec<u8>>,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub subject: Option<String>,
    /// In the order they came; a name may repeat (the first counts).
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Message {
    /// The first header named `name`, matched exactly or else ignoring ASCII case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .or_else(|| {
                self.headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
            })
            .map(|(_, value)| value.as_str())
    }

    /// What a dead letter keeps of this message besides its error: its
    /// position, headers and first bytes.
    pub fn describe(&self) -> String {
        let end = self.payload.len().min(FIRST_BYTES);
        let headers: serde_json::Map<String, Value> = self
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), Value::String(v.clone())))
            .collect();
        json!({
            "position": self.position,
            "subject": self.subject,
            "topic": self.topic,
            "partition": self.partition,
            "key": self.key.as_deref().map(String::from_utf8_lossy),
            "headers": headers,
            "bytes": self.payload.len(),
            "first_bytes": String::from_utf8_lossy(&self.payload[..end]),
        })
        .to_string()
    }
}

/// An ingest's templates and rules, parsed once: what makes messages events.
#[derive(Debug, Clone)]
pub struct Shape {
    pub category: Category,
    stream: Template,
    names: Vec<Template>,
    keys: Vec<Template>,
    payload: PayloadMode,
    max_event_bytes: usize,
}

impl Shape {
    /// The shape `config` describes, for a store taking events up to
    /// `max_event_bytes`; the error is what validation reports earlier.
    pub fn new(config: &IngestConfig, max_event_bytes: usize) -> Result<Self, String> {
        let bus = config.from.bus();
        let parse_all = |templates: &[String]| {
            templates
                .iter()
                .map(|t| Template::parse(t, bus))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            category: Category::new(config.into.category.as_str()).map_err(|e| e.to_string())?,
            stream: Template::parse(&config.into.stream, bus)?,
            names: parse_all(&config.event_name)?,
            keys: parse_all(&config.idempotency_key)?,
            payload: config.payload,
            max_event_bytes,
        })
    }

    /// The stream `message` goes to and the event it becomes, with `metadata`.
    pub fn event(
        &self,
        message: &Message,
        metadata: Value,
    ) -> Result<(StreamName, NewEvent), ProcessError> {
        let stream = self.stream.render(message).ok_or_else(|| {
            ProcessError::permanent(
                "invalid_stream",
                "the stream template names a value the message does not carry",
            )
        })?;
        let stream =
            StreamName::new(stream).map_err(|e| ProcessError::permanent("invalid_stream", e))?;
        let name = first_rendered(&self.names, message).ok_or_else(|| {
            ProcessError::permanent(
                "invalid_name",
                "no event name: none of the event_name templates renders for this message",
            )
        })?;
        let name = EventName::new(name).map_err(|e| ProcessError::permanent("invalid_name", e))?;
        let mut event = match self.payload {
            PayloadMode::Weir => carried(&message.payload, metadata, name)?,
            _ => NewEvent::new(name, self.payload(&message.payload)?).with_metadata(metadata),
        };
        if let Some(key) =
            first_rendered(&self.keys, message).and_then(|key| IdempotencyKey::new(key).ok())
        {
            event = event.with_idempotency_key(key);
        }
        if let Some(id) = message
            .header(EVENT_ID_HEADER)
            .and_then(|id| Uuid::parse_str(id).ok())
        {
            event = event.with_id(id);
        }
        let size = crate::store::event_size(&event);
        if size > self.max_event_bytes {
            return Err(ProcessError::permanent(
                "too_large",
                format!(
                    "the event would be {size} bytes (payload and metadata as JSON), more than store.max_event_bytes = {}",
                    self.max_event_bytes
                ),
            ));
        }
        Ok((stream, event))
    }

    fn payload(&self, bytes: &[u8]) -> Result<Value, ProcessError> {
        match serde_json::from_slice(bytes) {
            Ok(value) => Ok(value),
            Err(_) if self.payload == PayloadMode::Base64 => Ok(json!({
                "base64": base64::engine::general_purpose::STANDARD.encode(bytes)
            })),
            Err(error) => Err(ProcessError::permanent(
                "not_json",
                format!(
                    "the message is not JSON ({error}); set payload = \"base64\" to store such messages wrapped"
                ),
            )),
        }
    }
}

/// The event a weir sink carried in `bytes` (a stored event as JSON), named
/// `name`: its payload, its metadata with `ingest` added, its time.
fn carried(bytes: &[u8], ingest: Value, name: EventName) -> Result<NewEvent, ProcessError> {
    #[derive(serde::Deserialize)]
    struct Carried {
        payload: Value,
        #[serde(default)]
        metadata: Value,
        occurred_at: chrono::DateTime<chrono::Utc>,
    }
    let carried: Carried = serde_json::from_slice(bytes).map_err(|error| {
        ProcessError::permanent(
            "not_weir_event",
            format!("the message is not an event as weir's sinks send it ({error})"),
        )
    })?;
    let mut metadata = match carried.metadata {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    if let Value::Object(added) = ingest {
        metadata.extend(added);
    }
    Ok(NewEvent::new(name, carried.payload)
        .with_metadata(Value::Object(metadata))
        .with_occurred_at(carried.occurred_at))
}

/// The first of `templates` that renders for `message`.
fn first_rendered(templates: &[Template], message: &Message) -> Option<String> {
    templates.iter().find_map(|t| t.render(message))
}

/// What `bus` is, for the templates of a config.
impl super::config::IngestFrom {
    pub fn bus(&self) -> Bus {
        match self {
            super::config::IngestFrom::Kafka { .. } => Bus::Kafka,
            super::config::IngestFrom::Nats { .. } => Bus::Nats,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> IngestConfig {
        toml::from_str(toml).unwrap()
    }

    fn kafka() -> IngestConfig {
        config(
            r#"
            name = "orders-in"
            from = { kind = "kafka", topics = ["orders.v1"] }
            into = { category = "orders", stream = "{key}" }
            "#,
        )
    }

    fn message(payload: &[u8], headers: &[(&str, &str)]) -> Message {
        Message {
            position: 7,
            key: Some(b"order-42".to_vec()),
            topic: Some("orders.v1".into()),
            partition: Some(0),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).into(), (*v).into()))
                .collect(),
            payload: payload.to_vec(),
            ..Message::default()
        }
    }

    #[test]
    fn a_json_message_becomes_an_event_named_and_keyed_by_its_headers() {
        let shape = Shape::new(&kafka(), 1024).unwrap();
        let id = Uuid::now_v7().to_string();
        let (stream, event) = shape
            .event(
                &message(
                    br#"{"total": 12.5}"#,
                    &[("Weir-Event-Name", "OrderPlaced"), ("Weir-Event-Id", &id)],
                ),
                json!({}),
            )
            .unwrap();
        assert_eq!(stream.as_str(), "order-42");
        assert_eq!(event.name.as_str(), "OrderPlaced");
        assert_eq!(event.payload, json!({"total": 12.5}));
        assert_eq!(event.idempotency_key.unwrap().as_str(), id);
        assert_eq!(event.id.unwrap().to_string(), id);
    }

    #[test]
    fn names_and_keys_fall_back_in_order() {
        let shape = Shape::new(&kafka(), 1024).unwrap();
        let (_, event) = shape
            .event(
                &message(
                    b"1",
                    &[
                        ("ce_type", "Placed"),
                        ("ce-id", "c-1"),
                        ("Nats-Msg-Id", "n-1"),
                    ],
                ),
                json!({}),
            )
            .unwrap();
        assert_eq!(event.name.as_str(), "Placed");
        assert_eq!(event.idempotency_key.unwrap().as_str(), "c-1");
        assert_eq!(event.id, None, "no Weir-Event-Id");
        let error = shape.event(&message(b"1", &[]), json!({})).unwrap_err();
        assert_eq!(error.kind(), "invalid_name");
        let mut constant = kafka();
        constant.event_name.push("Ingested".into());
        constant.idempotency_key.clear();
        let shape = Shape::new(&constant, 1024).unwrap();
        let (_, event) = shape
            .event(&message(b"1", &[("ce-id", "c-1")]), json!({}))
            .unwrap();
        assert_eq!(event.name.as_str(), "Ingested");
        assert_eq!(event.idempotency_key, None);
    }

    #[test]
    fn bad_messages_are_permanent_failures_of_their_own_kind() {
        let shape = Shape::new(&kafka(), 16).unwrap();
        let named = [("Weir-Event-Name", "E")];
        let kind = |m: &Message| shape.event(m, json!({})).unwrap_err().kind().to_owned();
        assert_eq!(kind(&message(b"not json", &named)), "not_json");
        assert_eq!(
            kind(&message(br#""a string longer than sixteen bytes""#, &named)),
            "too_large"
        );
        assert_eq!(
            kind(&Message {
                key: None,
                ..message(b"1", &named)
            }),
            "invalid_stream"
        );
        assert_eq!(
            kind(&message(b"1", &[("Weir-Event-Name", "bad\u{7}name")])),
            "invalid_name"
        );
        assert!(
            !shape
                .event(&message(b"not json", &named), json!({}))
                .unwrap_err()
                .is_transient()
        );
    }

    #[test]
    fn base64_wraps_what_is_not_json_and_keeps_json_as_it_is() {
        let mut config = kafka();
        config.payload = PayloadMode::Base64;
        let shape = Shape::new(&config, 1024).unwrap();
        let named = [("Weir-Event-Name", "E")];
        let (_, event) = shape
            .event(&message(b"\x00raw", &named), json!({}))
            .unwrap();
        assert_eq!(event.payload, json!({"base64": "AHJhdw=="}));
        let (_, event) = shape.event(&message(b"[1]", &named), json!({})).unwrap();
        assert_eq!(event.payload, json!([1]));
    }

    #[test]
    fn weir_keeps_the_carried_events_payload_metadata_and_time() {
        let mut config = kafka();
        config.payload = PayloadMode::Weir;
        let shape = Shape::new(&config, 1024).unwrap();
        let named = [("Weir-Event-Name", "E")];
        let body = br#"{"payload": {"a": 1}, "metadata": {"by": "t"}, "occurred_at": "2026-01-02T03:04:05Z", "name": "E"}"#;
        let (_, event) = shape
            .event(&message(body, &named), json!({"ingest": 1}))
            .unwrap();
        assert_eq!(event.payload, json!({"a": 1}));
        assert_eq!(event.metadata, json!({"by": "t", "ingest": 1}));
        assert_eq!(event.occurred_at.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        let error = shape
            .event(&message(b"[1]", &named), json!({}))
            .unwrap_err();
        assert_eq!(error.kind(), "not_weir_event");
    }

    #[test]
    fn a_dead_letter_keeps_position_headers_and_first_bytes() {
        let described = message(b"not json", &[("h", "v")]).describe();
        let value: Value = serde_json::from_str(&described).unwrap();
        assert_eq!(value["position"], 7);
        assert_eq!(value["headers"]["h"], "v");
        assert_eq!(value["first_bytes"], "not json");
    }
}
