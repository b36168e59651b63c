//! Ingest templates: what a message carries, made into a stream name, an event
//! name or an idempotency key. `{key}` (the Kafka record's key), `{topic}`,
//! `{partition}`, `{subject}` (the whole NATS subject), `{subject.N}` (its
//! token N, from 0) and `{header.NAME}`; the rest is literal text.
//!
//! A template is parsed once; rendering a message that lacks a value (no key, no
//! such header, too few subject tokens, a key that is not UTF-8) gives `None`,
//! which the caller treats as "try the next template" or as a bad message.

use super::message::Message;

/// Which bus a template is written for: `{key}`, `{topic}` and `{partition}`
/// exist only on Kafka, `{subject}` only on NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    Kafka,
    Nats,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Key,
    Topic,
    Partition,
    Subject,
    SubjectToken(usize),
    Header(String),
}

/// A parsed ingest template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses `text` for a message of `bus`; the error says what is wrong.
    pub fn parse(text: &str, bus: Bus) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if rest[..open].contains('}') {
                return Err("a '}' has no matching '{'".into());
            }
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..].find('}').ok_or("a '{' has no matching '}'")?;
            pieces.push(placeholder(&rest[open + 1..open + close], bus)?);
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err("a '}' has no matching '{'".into());
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_owned()));
        }
        if pieces.is_empty() {
            return Err("it is empty".into());
        }
        Ok(Self { pieces })
    }

    /// What `message` makes of this template, `None` when a value is missing.
    pub fn render(&self, message: &Message) -> Option<String> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Key => out.push_str(std::str::from_utf8(message.key.as_deref()?).ok()?),
                Piece::Topic => out.push_str(message.topic.as_deref()?),
                Piece::Partition => out.push_str(&message.partition?.to_string()),
                Piece::Subject => out.push_str(message.subject.as_deref()?),
                Piece::SubjectToken(n) => {
                    out.push_str(message.subject.as_deref()?.split('.').nth(*n)?);
                }
                Piece::Header(name) => out.push_str(message.header(name)?),
            }
        }
        Some(out)
    }
}

fn placeholder(name: &str, bus: Bus) -> Result<Piece, String> {
    let only = |piece: Piece, on: Bus| {
        if on == bus {
            Ok(piece)
        } else {
            Err(format!(
                "{{{name}}} exists only for {} messages",
                if on == Bus::Kafka { "Kafka" } else { "NATS" }
            ))
        }
    };
    match name {
        "key" => only(Piece::Key, Bus::Kafka),
        "topic" => only(Piece::Topic, Bus::Kafka),
        "partition" => only(Piece::Partition, Bus::Kafka),
        "subject" => only(Piece::Subject, Bus::Nats),
        _ => {
            if let Some(header) = name.strip_prefix("header.") {
                if header.is_empty() || header.chars().any(|c| c.is_whitespace() || c == ':') {
                    return Err(format!("{{{name}}} names no valid header"));
                }
                return Ok(Piece::Header(header.to_owned()));
            }
            if let Some(token) = name.strip_prefix("subject.") {
                let token = token.parse().map_err(|_| {
                    format!("{{{name}}}: write {{subject.N}} with N a token's index from 0")
                })?;
                return only(Piece::SubjectToken(token), Bus::Nats);
            }
            Err(format!(
                "unknown placeholder {{{name}}}; use {{key}}, {{topic}}, {{partition}} (Kafka), {{subject}}, {{subject.N}} (NATS) or {{header.NAME}}"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka_message() -> Message {
        Message {
            key: Some(b"order-42".to_vec()),
            topic: Some("orders.v1".into()),
            partition: Some(3),
            headers: vec![("Weir-Event-Name".into(), "OrderPlaced".into())],
            ..Message::default()
        }
    }

    #[test]
    fn renders_what_a_kafka_message_carries() {
        let message = kafka_message();
        let render = |text: &str| Template::parse(text, Bus::Kafka).unwrap().render(&message);
        assert_eq!(render("{key}").as_deref(), Some("order-42"));
        assert_eq!(
            render("{topic}-{partition}/{key}").as_deref(),
            Some("orders.v1-3/order-42")
        );
        assert_eq!(
            render("{header.Weir-Event-Name}").as_deref(),
            Some("OrderPlaced")
        );
        assert_eq!(
            render("{header.weir-event-name}").as_deref(),
            Some("OrderPlaced")
        );
        assert_eq!(render("{header.ce_type}"), None, "a missing header");
        assert_eq!(render("Constant").as_deref(), Some("Constant"));
        let keyless = Message {
            key: None,
            ..kafka_message()
        };
        assert_eq!(
            Template::parse("{key}", Bus::Kafka)
                .unwrap()
                .render(&keyless),
            None
        );
        let binary = Message {
            key: Some(vec![0xff, 0xfe]),
            ..kafka_message()
        };
        assert_eq!(
            Template::parse("{key}", Bus::Kafka)
                .unwrap()
                .render(&binary),
            None
        );
    }

    #[test]
    fn renders_subject_tokens_of_a_nats_message() {
        let message = Message {
            subject: Some("orders.eu.42".into()),
            ..Message::default()
        };
        let render = |text: &str| Template::parse(text, Bus::Nats).unwrap().render(&message);
        assert_eq!(render("{subject}").as_deref(), Some("orders.eu.42"));
        assert_eq!(render("{subject.1}-{subject.2}").as_deref(), Some("eu-42"));
        assert_eq!(render("{subject.3}"), None);
    }

    #[test]
    fn refuses_what_it_cannot_render_and_placeholders_of_the_other_bus() {
        for (text, bus, says) in [
            ("", Bus::Kafka, "empty"),
            ("{nope}", Bus::Kafka, "unknown placeholder"),
            ("{key", Bus::Kafka, "no matching '}'"),
            ("a}b", Bus::Kafka, "no matching '{'"),
            ("{subject}", Bus::Kafka, "only for NATS"),
            ("{key}", Bus::Nats, "only for Kafka"),
            ("{partition}", Bus::Nats, "only for Kafka"),
            ("{subject.x}", Bus::Nats, "token's index"),
            ("{header.}", Bus::Nats, "no valid header"),
        ] {
            let error = Template::parse(text, bus).unwrap_err();
            assert!(error.contains(says), "{text:?}: {error}");
        }
    }
}
