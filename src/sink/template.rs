//! Destination templates of the forwarding sinks: `events.{category}.{stream}`
//! becomes `events.orders.order-42` for an event of stream `orders/order-42`.
//! `{slice}` is the event's slice (0 to 1,023) and `{partition}` the index of the
//! partition holding it when the group reads its categories as `partitions`
//! partitions (0 when it does not).
//!
//! A template is parsed once when the sink is built; rendering is a walk over its
//! pieces with each placeholder's value passed through the sink's encoding, which
//! keeps values that contain separators (`.` for NATS) from changing the shape of
//! the destination.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::event::StoredEvent;

/// `value` with every byte `keeps` refuses written as `escape` and two
/// upper-case hex digits: the encodings that keep a value from changing the
/// shape of a destination (`_` for Kafka topics, `%` for URIs and headers).
pub fn escape_bytes(value: &str, keeps: impl Fn(u8) -> bool, escape: char) -> Cow<'_, str> {
    if value.bytes().all(&keeps) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        if keeps(byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "{escape}{byte:02X}");
        }
    }
    Cow::Owned(out)
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Category,
    Stream,
    Name,
    Slice,
    Partition,
}

/// A parsed destination template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
    /// How many partitions `{partition}` counts in.
    partitions: u32,
}

/// Why a template cannot be used; configuration validation reports the same
/// problems earlier, with the key they are at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("destination template {template:?} is invalid: {reason}")]
pub struct TemplateError {
    pub template: String,
    pub reason: String,
}

impl Template {
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let invalid = |reason: String| TemplateError {
            template: template.to_owned(),
            reason,
        };
        let mut pieces = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| invalid("a '{' has no matching '}'".into()))?;
            pieces.push(match &rest[open + 1..open + close] {
                "category" => Piece::Category,
                "stream" => Piece::Stream,
                "name" => Piece::Name,
                "slice" => Piece::Slice,
                "partition" => Piece::Partition,
                other => {
                    return Err(invalid(format!(
                        "unknown placeholder {{{other}}}; use {{category}}, {{stream}}, {{name}}, {{slice}} or {{partition}}"
                    )));
                }
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(invalid("a '}' has no matching '{'".into()));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_owned()));
        }
        if pieces.is_empty() {
            return Err(invalid("it is empty".into()));
        }
        Ok(Self {
            pieces,
            partitions: 1,
        })
    }

    /// The same template with `{partition}` counting in `partitions` partitions
    /// (an invalid count counts as 1).
    #[must_use]
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = if crate::event::Partition::all(partitions).is_ok() {
            partitions
        } else {
            1
        };
        self
    }

    /// True when every event renders to the same destination.
    pub fn is_constant(&self) -> bool {
        self.pieces.iter().all(|p| matches!(p, Piece::Literal(_)))
    }

    /// The destination of `event`, each value passed through `encode`.
    pub fn render<'a>(
        &self,
        event: &'a StoredEvent,
        encode: impl Fn(&'a str) -> Cow<'a, str>,
    ) -> String {
        let mut out = String::with_capacity(64);
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Category => out.push_str(&encode(event.category.as_str())),
                Piece::Stream => out.push_str(&encode(event.stream.as_str())),
                Piece::Name => out.push_str(&encode(event.name.as_str())),
                Piece::Slice => out.push_str(&event.slice().to_string()),
                Piece::Partition => {
                    let index = crate::event::Partition::holding(event.slice(), self.partitions)
                        .map_or(0, |p| p.index());
                    out.push_str(&index.to_string());
                }
            }
        }
        out
    }

    /// The template with every placeholder replaced by `wildcard`: for NATS,
    /// `events.{category}.{stream}` gives `events.*.*`, the subjects a stream
    /// must capture.
    pub fn with_placeholders_as(&self, wildcard: &str) -> String {
        self.pieces
            .iter()
            .map(|piece| match piece {
                Piece::Literal(text) => text.as_str(),
                _ => wildcard,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renders_each_placeholder_through_the_encoding() {
        let events = crate::consumer::testing::events(1).await;
        let event = &events[0];
        let template = Template::parse("events.{category}.{stream}.{name}").unwrap();
        let rendered = template.render(event, |value| Cow::Owned(value.replace('.', "_")));
        assert_eq!(
            rendered,
            format!(
                "events.{}.{}.{}",
                event.category.as_str().replace('.', "_"),
                event.stream.as_str().replace('.', "_"),
                event.name.as_str().replace('.', "_")
            )
        );
        assert!(!template.is_constant());
        assert_eq!(template.with_placeholders_as("*"), "events.*.*.*");
        assert!(Template::parse("all-events").unwrap().is_constant());
    }

    #[test]
    fn rejects_what_it_cannot_render() {
        for bad in ["", "a.{nope}", "a.{category", "a.}"] {
            assert!(Template::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn slice_and_partition_name_where_the_stream_falls() {
        let events = crate::consumer::testing::events(1).await;
        let event = &events[0];
        let slice = event.slice();
        let template = Template::parse("events.{partition}.{slice}").unwrap();
        assert_eq!(
            template.render(event, Cow::Borrowed),
            format!("events.0.{slice}")
        );
        let partition = crate::event::Partition::holding(slice, 16).unwrap().index();
        let sixteen = template.with_partitions(16);
        assert_eq!(
            sixteen.render(event, Cow::Borrowed),
            format!("events.{partition}.{slice}")
        );
    }
}
