//! CloudEvents 1.0 for the forwarding sinks: `sink.format` picks how an event is
//! put on the wire ([`Format`]), and [`CloudEvents`] derives an event's context
//! attributes from the stored event:
//!
//! | attribute | value |
//! |---|---|
//! | `specversion` | `1.0` |
//! | `id` | the event's id |
//! | `source` | `sink.cloudevents_source` rendered, by default `weir://{category}/{stream}` (each value percent-encoded) |
//! | `type` | the event's name |
//! | `subject` | the event's stream (its id within its category) |
//! | `time` | when the event occurred (`occurred_at`), RFC 3339 in UTC |
//! | `datacontenttype` | `application/json` |
//! | `data` | the event's payload |
//!
//! In binary mode the attributes travel as headers (`ce_` on Kafka, `ce-` on NATS)
//! and the payload is the message body; in structured mode the body is the JSON
//! event format's envelope. weir's own headers (`Weir-Event-Id`, …, and
//! `Nats-Msg-Id` on NATS) are sent in every format, so deduplication and anything
//! reading them keep working.

use std::borrow::Cow;

use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};

use super::template::escape_bytes;
use super::{Template, TemplateError};
use crate::event::StoredEvent;

/// The CloudEvents version weir speaks.
pub const SPEC_VERSION: &str = "1.0";

/// The default `sink.cloudevents_source`.
pub const DEFAULT_SOURCE: &str = "weir://{category}/{stream}";

/// The content type of a structured-mode message.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";

/// The content type of the data (and of a message in weir's own format).
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// `sink.format`: how a forwarding sink puts an event on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The stored event as JSON, with weir's headers: what weir has always sent.
    #[default]
    Weir,
    /// CloudEvents binary content mode: attributes as headers, the payload as
    /// the body.
    CloudeventsBinary,
    /// CloudEvents structured content mode: the JSON envelope as the body.
    CloudeventsStructured,
}

impl Format {
    pub fn is_weir(self) -> bool {
        self == Format::Weir
    }
}

/// Renders an event's CloudEvents attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvents {
    source: Template,
}

/// One event's context attributes, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub id: String,
    pub source: String,
    pub ty: String,
    pub subject: String,
    pub time: String,
}

impl Attributes {
    /// (attribute name, value) for each attribute but `specversion` and
    /// `datacontenttype`, in the order they are sent.
    pub fn named(&self) -> [(&'static str, &str); 5] {
        [
            ("id", &self.id),
            ("source", &self.source),
            ("type", &self.ty),
            ("subject", &self.subject),
            ("time", &self.time),
        ]
    }
}

/// The JSON event format's envelope.
#[derive(Serialize)]
struct Envelope<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    subject: &'a str,
    time: &'a str,
    datacontenttype: &'static str,
    data: &'a serde_json::Value,
}

impl CloudEvents {
    /// Attributes with `source` rendered from the template `source` (by
    /// default [`DEFAULT_SOURCE`]).
    pub fn new(source: Option<&str>) -> Result<Self, TemplateError> {
        let template = source.unwrap_or(DEFAULT_SOURCE);
        let source = Template::parse(template)?;
        if let Some(reason) = source_problem(&source) {
            return Err(TemplateError {
                template: template.to_owned(),
                reason,
            });
        }
        Ok(Self { source })
    }

    pub fn attributes(&self, event: &StoredEvent) -> Attributes {
        Attributes {
            id: event.id.hyphenated().to_string(),
            source: self.source.render(event, percent_encode),
            ty: event.name.as_str().to_owned(),
            subject: event.stream.as_str().to_owned(),
            time: event
                .occurred_at
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        }
    }

    /// The structured-mode body of `event`: the envelope, with the payload as
    /// `data`.
    pub fn envelope(&self, event: &StoredEvent, into: &mut Vec<u8>) -> serde_json::Result<()> {
        let attributes = self.attributes(event);
        serde_json::to_writer(
            into,
            &Envelope {
                specversion: SPEC_VERSION,
                id: &attributes.id,
                source: &attributes.source,
                ty: &attributes.ty,
                subject: &attributes.subject,
                time: &attributes.time,
                datacontenttype: JSON_CONTENT_TYPE,
                data: &event.payload,
            },
        )
    }
}

/// What is wrong with a `cloudevents_source` template, if anything: its literal
/// text must be a URI reference's (no spaces, quotes, angle brackets or control
/// characters), and it must not be empty.
pub fn source_problem(template: &Template) -> Option<String> {
    let literal = template.with_placeholders_as("");
    literal
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || "\"<>\\^`{|}".contains(*c))
        .map(|c| format!("may not contain {c:?}: the source is a URI reference"))
}

/// `value` with every byte but the URI's unreserved characters (letters,
/// digits, `-`, `.`, `_`, `~`) written as `%XX`, so a category or stream name
/// cannot change the shape of the source.
pub fn percent_encode(value: &str) -> Cow<'_, str> {
    escape_bytes(
        value,
        |byte| byte.is_ascii_alphanumeric() || b"-._~".contains(&byte),
        '%',
    )
}

/// A header value as the CloudEvents HTTP binding (which the NATS binding's
/// binary mode follows) writes it: printable ASCII but space, `"` and `%` as it
/// is, everything else percent-encoded as UTF-8.
pub fn header_value(value: &str) -> Cow<'_, str> {
    escape_bytes(
        value,
        |byte| (0x21..=0x7E).contains(&byte) && byte != b'"' && byte != b'%',
        '%',
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn attributes_come_from_the_stored_event() {
        let event = crate::consumer::testing::events(1).await.remove(0);
        let attributes = CloudEvents::new(None).unwrap().attributes(&event);
        assert_eq!(attributes.id, event.id.to_string());
        assert_eq!(attributes.source, "weir://things/thing-1");
        assert_eq!(attributes.ty, "Happened");
        assert_eq!(attributes.subject, "thing-1");
        assert_eq!(
            chrono::DateTime::parse_from_rfc3339(&attributes.time).unwrap(),
            event.occurred_at
        );
        assert!(attributes.time.ends_with('Z'), "{}", attributes.time);

        let mut body = Vec::new();
        CloudEvents::new(Some("urn:weir:{category}:{name}"))
            .unwrap()
            .envelope(&event, &mut body)
            .unwrap();
        let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(envelope["specversion"], "1.0");
        assert_eq!(envelope["source"], "urn:weir:things:Happened");
        assert_eq!(envelope["datacontenttype"], "application/json");
        assert_eq!(envelope["data"], event.payload);
    }

    #[test]
    fn values_cannot_change_the_shape_of_the_source() {
        assert_eq!(percent_encode("order-42"), "order-42");
        assert_eq!(percent_encode("a/b c?é"), "a%2Fb%20c%3F%C3%A9");
        assert_eq!(header_value("Order Placed"), "Order%20Placed");
        assert_eq!(header_value("100%é"), "100%25%C3%A9");
        assert_eq!(header_value("plain"), "plain");
    }

    #[test]
    fn a_source_that_is_no_uri_reference_is_refused() {
        assert!(CloudEvents::new(Some("weir://{category}")).is_ok());
        for bad in ["weir:// {category}", "a\"{stream}", "{nope}", ""] {
            assert!(CloudEvents::new(Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn formats_are_spelt_as_configured() {
        for (text, format) in [
            ("weir", Format::Weir),
            ("cloudevents-binary", Format::CloudeventsBinary),
            ("cloudevents-structured", Format::CloudeventsStructured),
        ] {
            let parsed: Format = serde_json::from_value(serde_json::json!(text)).unwrap();
            assert_eq!(parsed, format);
        }
        assert!(serde_json::from_value::<Format>(serde_json::json!("cloudevents")).is_err());
    }
}
