//! Reading what weir's sinks send in the CloudEvents formats with the official
//! Rust SDK (`cloudevents-sdk`, without its protocol bindings, which would bring
//! other Kafka and NATS clients into the build).
//!
//! [`Received`] is a message as a plain client got it (headers and body). It
//! implements the SDK's `MessageDeserializer` the way the SDK's own Kafka
//! binding does: structured when the content type is
//! `application/cloudevents+json`, the body then parsed by the SDK's JSON event
//! format; binary when the prefixed `specversion` header is there, each prefixed
//! header then handed to the SDK as an attribute (or extension) and
//! `content-type` as `datacontenttype`. The SDK builds and validates the event
//! (required attributes, `time` as RFC 3339); [`check`] then compares every
//! attribute with the stored event.

use cloudevents::event::{AttributesReader, SpecVersion};
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, Encoding, Error, MessageAttributeValue,
    MessageDeserializer, Result, StructuredDeserializer, StructuredSerializer,
};
use cloudevents::{Data, Event};
use weir::event::StoredEvent;

/// One message as a plain client received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// `ce_` (Kafka binding) or `ce-` (NATS binding's draft binary mode).
    prefix: &'static str,
    /// Values percent-encoded, as the HTTP binding (and so NATS') writes them.
    percent_encoded: bool,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn kafka(headers: Vec<(String, Vec<u8>)>, body: Vec<u8>) -> Self {
        Self {
            prefix: "ce_",
            percent_encoded: false,
            headers,
            body,
        }
    }

    pub fn nats(headers: Vec<(String, Vec<u8>)>, body: Vec<u8>) -> Self {
        Self {
            prefix: "ce-",
            percent_encoded: true,
            headers,
            body,
        }
    }

    /// The first value of header `name` (case-insensitive) as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| String::from_utf8(value.clone()).expect("a UTF-8 header"))
    }

    /// The event the SDK reads from this message.
    pub fn to_event(&self) -> Event {
        MessageDeserializer::into_event(self.clone())
            .unwrap_or_else(|error| panic!("the CloudEvents SDK cannot read {self:?}: {error}"))
    }

    fn text(&self, value: Vec<u8>) -> Result<String> {
        let text = String::from_utf8(value).map_err(|e| Error::Other {
            source: Box::new(e),
        })?;
        Ok(if self.percent_encoded {
            percent_decode(&text)
        } else {
            text
        })
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(byte) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).expect("percent-encoded UTF-8")
}

impl BinaryDeserializer for Received {
    fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(self, mut visitor: V) -> Result<R> {
        if self.encoding() != Encoding::BINARY {
            return Err(Error::WrongEncoding {});
        }
        let specversion_header = format!("{}specversion", self.prefix);
        let specversion = self
            .header(&specversion_header)
            .ok_or(Error::WrongEncoding {})?;
        let spec_version = SpecVersion::try_from(specversion.as_str())?;
        let attributes = spec_version.attribute_names();
        visitor = visitor.set_spec_version(spec_version)?;
        if let Some(content_type) = self.header("content-type") {
            visitor = visitor.set_attribute(
                "datacontenttype",
                MessageAttributeValue::String(content_type),
            )?;
        }
        for (key, value) in self.headers.clone() {
            let Some(name) = key.strip_prefix(self.prefix) else {
                continue;
            };
            if name == "specversion" {
                continue;
            }
            let value = MessageAttributeValue::String(self.text(value)?);
            visitor = if attributes.contains(&name) {
                visitor.set_attribute(name, value)?
            } else {
                visitor.set_extension(name, value)?
            };
        }
        visitor.end_with_data(self.body)
    }
}

impl StructuredDeserializer for Received {
    fn deserialize_structured<R: Sized, V: StructuredSerializer<R>>(self, visitor: V) -> Result<R> {
        if self.encoding() != Encoding::STRUCTURED {
            return Err(Error::WrongEncoding {});
        }
        visitor.set_structured_event(self.body)
    }
}

impl MessageDeserializer for Received {
    fn encoding(&self) -> Encoding {
        let structured = self
            .header("content-type")
            .is_some_and(|value| value.starts_with("application/cloudevents+json"));
        if structured {
            Encoding::STRUCTURED
        } else if self
            .header(&format!("{}specversion", self.prefix))
            .is_some()
        {
            Encoding::BINARY
        } else {
            Encoding::UNKNOWN
        }
    }
}

/// Checks every attribute of `event` (as the SDK read it) against `stored`,
/// with `source` the expected `source`: specversion, id, source, type, subject,
/// time, datacontenttype, the data, and no extensions.
#[track_caller]
pub fn check(event: &Event, stored: &StoredEvent, source: &str) {
    assert_eq!(event.specversion(), SpecVersion::V10, "{event}");
    assert_eq!(event.id(), stored.id.to_string(), "{event}");
    assert_eq!(event.source().as_str(), source, "{event}");
    assert_eq!(event.ty(), stored.name.as_str(), "{event}");
    assert_eq!(event.subject(), Some(stored.stream.as_str()), "{event}");
    assert_eq!(event.time(), Some(&stored.occurred_at), "{event}");
    assert_eq!(event.datacontenttype(), Some("application/json"), "{event}");
    assert_eq!(event.dataschema(), None, "{event}");
    let data = match event.data() {
        Some(Data::Json(value)) => value.clone(),
        Some(Data::Binary(bytes)) => serde_json::from_slice(bytes).expect("JSON data"),
        Some(Data::String(text)) => serde_json::from_str(text).expect("JSON data"),
        None => panic!("no data in {event}"),
    };
    assert_eq!(data, stored.payload, "{event}");
    assert_eq!(event.iter_extensions().count(), 0, "{event}");
}
