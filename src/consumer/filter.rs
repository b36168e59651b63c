//! Event filters: which of a source's events a group's processor is given.
//!
//! `[[subscriptions]] filter = { names = ["Order*"], exclude_names = ["OrderViewed"],
//! metadata = { tenant = "eu" } }` keeps an event when its name matches one of
//! `names` (every name when `names` is absent), matches none of `exclude_names`, and
//! its metadata has every `metadata` key at the top level with that value. Names
//! are [`Glob`]s.
//!
//! The consumer applies the filter between reading a batch and handing it to the
//! processor, whatever the source (a category, a stream, a partition, the log):
//! an event the filter drops is never processed, yet the checkpoint moves past
//! it like past a processed one, so it is not read again after a restart, and it
//! is counted in `weir_events_filtered_total{group}`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::StoredEvent;

/// A name pattern: `*` stands for any run of characters (none too), `?` for any
/// one character, `\` makes the character after it literal; everything else
/// stands for itself. `Order*` matches `OrderPlaced` and `Order`; `*Failed`
/// matches `PaymentFailed`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Glob {
    text: String,
    pieces: Vec<GlobPiece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum GlobPiece {
    Literal(char),
    AnyOne,
    AnyRun,
}

impl Glob {
    /// Parses `pattern`; fails only on a trailing `\`, which escapes nothing.
    pub fn new(pattern: impl Into<String>) -> Result<Self, String> {
        let text = pattern.into();
        let mut pieces = Vec::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            pieces.push(match c {
                '*' => {
                    if pieces.last() == Some(&GlobPiece::AnyRun) {
                        continue;
                    }
                    GlobPiece::AnyRun
                }
                '?' => GlobPiece::AnyOne,
                '\\' => match chars.next() {
                    Some(escaped) => GlobPiece::Literal(escaped),
                    None => {
                        return Err(format!(
                            "{text:?} ends with '\\', which escapes nothing: write '\\\\' for a backslash"
                        ));
                    }
                },
                other => GlobPiece::Literal(other),
            });
        }
        Ok(Self { text, pieces })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when every name matches: the pattern is only `*`.
    pub fn matches_everything(&self) -> bool {
        self.pieces == [GlobPiece::AnyRun]
    }

    /// True when `name` matches the whole pattern.
    pub fn matches(&self, name: &str) -> bool {
        // Iterative matching with one backtrack point (the last `*`): linear in
        // practice, never exponential.
        let name: Vec<char> = name.chars().collect();
        let (mut p, mut n) = (0, 0);
        let mut backtrack: Option<(usize, usize)> = None;
        while n < name.len() {
            match self.pieces.get(p) {
                Some(GlobPiece::AnyRun) => {
                    backtrack = Some((p, n));
                    p += 1;
                }
                Some(GlobPiece::AnyOne) => {
                    p += 1;
                    n += 1;
                }
                Some(GlobPiece::Literal(c)) if *c == name[n] => {
                    p += 1;
                    n += 1;
                }
                _ => match backtrack {
                    Some((star, from)) => {
                        p = star + 1;
                        n = from + 1;
                        backtrack = Some((star, from + 1));
                    }
                    None => return false,
                },
            }
        }
        self.pieces[p..]
            .iter()
            .all(|piece| *piece == GlobPiece::AnyRun)
    }
}

impl TryFrom<String> for Glob {
    type Error = String;

    fn try_from(pattern: String) -> Result<Self, String> {
        Glob::new(pattern)
    }
}

impl From<Glob> for String {
    fn from(glob: Glob) -> String {
        glob.text
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// True when `name` matches any of `globs`.
pub fn any_matches(globs: &[Glob], name: &str) -> bool {
    globs.iter().any(|glob| glob.matches(name))
}

/// `filter = { names = [...], exclude_names = [...], metadata = { key = "value" } }`
/// of a subscription: see the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    /// Keep only events whose name matches one of these; every name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<Glob>>,
    /// Drop events whose name matches one of these, even if `names` keeps them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_names: Vec<Glob>,
    /// Keep only events whose metadata has each key at its top level with this
    /// value: a string equal to it, or a number or boolean whose JSON text is it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl EventFilter {
    /// True when the group's processor is to be given `event`.
    pub fn keeps(&self, event: &StoredEvent) -> bool {
        let name = event.name.as_str();
        if let Some(names) = &self.names {
            if !any_matches(names, name) {
                return false;
            }
        }
        if any_matches(&self.exclude_names, name) {
            return false;
        }
        self.metadata
            .iter()
            .all(|(key, wanted)| metadata_value_is(event.metadata.get(key), wanted))
    }

    /// Why the filter can never keep an event, as (key within `filter`,
    /// message); empty when it can.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if let Some(names) = &self.names {
            if names.is_empty() {
                problems.push((
                    "names".into(),
                    "is empty, so the filter keeps no event: list at least one name pattern, or leave names out to keep every name".into(),
                ));
            }
            for glob in names {
                if let Some(reason) = never_a_name(glob) {
                    problems.push(("names".into(), reason));
                }
            }
            let all_excluded = !names.is_empty()
                && names.iter().all(|glob| {
                    self.exclude_names
                        .iter()
                        .any(|exclude| exclude.matches_everything() || exclude == glob)
                });
            if all_excluded {
                problems.push((
                    "exclude_names".into(),
                    "excludes every name that names keeps, so the filter keeps no event".into(),
                ));
            }
        } else if self.exclude_names.iter().any(Glob::matches_everything) {
            problems.push((
                "exclude_names".into(),
                "\"*\" excludes every name, so the filter keeps no event".into(),
            ));
        }
        for glob in &self.exclude_names {
            if let Some(reason) = never_a_name(glob) {
                problems.push(("exclude_names".into(), reason));
            }
        }
        for key in self.metadata.keys() {
            if key.is_empty() {
                problems.push((
                    "metadata".into(),
                    "has an empty key: name a top-level metadata key".into(),
                ));
            }
        }
        problems
    }
}

/// Why no event name can match `glob`, if none can: names are non-empty and
/// hold no control characters.
fn never_a_name(glob: &Glob) -> Option<String> {
    if glob.as_str().is_empty() {
        return Some("\"\" matches no event name: names are never empty".into());
    }
    glob.pieces
        .iter()
        .any(|piece| matches!(piece, GlobPiece::Literal(c) if c.is_control()))
        .then(|| {
            format!(
                "{:?} holds a control character, which no event name does",
                glob.as_str()
            )
        })
}

/// Whether a metadata value equals the configured text.
fn metadata_value_is(value: Option<&Value>, wanted: &str) -> bool {
    match value {
        Some(Value::String(text)) => text == wanted,
        Some(value @ (Value::Number(_) | Value::Bool(_))) => {
            serde_json::to_string(value).is_ok_and(|text| text == wanted)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(pattern: &str) -> Glob {
        Glob::new(pattern).expect("a valid pattern")
    }

    fn filter(toml_text: &str) -> EventFilter {
        toml::from_str(toml_text).expect("a filter")
    }

    async fn event(name: &str, metadata: Value) -> StoredEvent {
        let mut event = crate::consumer::testing::events(1).await.remove(0);
        event.name = crate::event::EventName::new(name).unwrap();
        event.metadata = metadata;
        event
    }

    #[test]
    fn globs_match_whole_names() {
        let cases = [
            ("OrderPlaced", "OrderPlaced", true),
            ("OrderPlaced", "OrderPlaced2", false),
            ("Order*", "OrderPlaced", true),
            ("Order*", "Order", true),
            ("Order*", "PlacedOrder", false),
            ("*Failed", "PaymentFailed", true),
            ("*Failed", "PaymentFailedTwice", false),
            ("*", "anything at all", true),
            ("O*d*d", "OrderPlaced", true),
            ("O*d*d", "OrderPlacedX", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "acb", false),
            ("Order?", "Orders", true),
            ("Order?", "Order", false),
            ("Order\\*", "Order*", true),
            ("Order\\*", "OrderPlaced", false),
            ("Ünïcödé*", "ÜnïcödéEvent", true),
            ("**x", "x", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(glob(pattern).matches(name), expected, "{pattern} ~ {name}");
        }
        assert!(Glob::new("trailing\\").is_err());
        assert!(glob("*").matches_everything());
        assert!(glob("**").matches_everything());
        assert!(!glob("*a").matches_everything());
    }

    #[test]
    fn matching_a_long_name_against_many_stars_stays_linear() {
        let pattern = glob(&"a*".repeat(50));
        let name = "a".repeat(10_000) + "b";
        let started = std::time::Instant::now();
        assert!(pattern.matches(&name));
        assert!(!glob(&("a*".repeat(50) + "c")).matches(&name));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[tokio::test]
    async fn names_exclusions_and_metadata_all_have_to_agree() {
        let filter = filter(
            r#"
            names = ["Order*", "PaymentFailed"]
            exclude_names = ["OrderViewed"]
            metadata = { tenant = "eu", priority = "2", urgent = "true" }
            "#,
        );
        let eu = serde_json::json!({ "tenant": "eu", "priority": 2, "urgent": true, "other": 1 });
        assert!(filter.keeps(&event("OrderPlaced", eu.clone()).await));
        assert!(filter.keeps(&event("PaymentFailed", eu.clone()).await));
        assert!(!filter.keeps(&event("OrderViewed", eu.clone()).await));
        assert!(!filter.keeps(&event("PaymentTaken", eu.clone()).await));
        let us = serde_json::json!({ "tenant": "us", "priority": 2, "urgent": true });
        assert!(!filter.keeps(&event("OrderPlaced", us).await));
        let missing = serde_json::json!({ "tenant": "eu", "priority": 2 });
        assert!(!filter.keeps(&event("OrderPlaced", missing).await));
        let nested = serde_json::json!({ "tenant": { "eu": true }, "priority": 2, "urgent": true });
        assert!(!filter.keeps(&event("OrderPlaced", nested).await));
        assert!(!filter.keeps(&event("OrderPlaced", Value::Null).await));
    }

    #[tokio::test]
    async fn an_empty_filter_keeps_everything() {
        let everything = filter("");
        assert!(everything.validate().is_empty());
        assert!(everything.keeps(&event("Anything", Value::Null).await));
        let only_exclusions = filter(r#"exclude_names = ["Debug*"]"#);
        assert!(only_exclusions.keeps(&event("OrderPlaced", Value::Null).await));
        assert!(!only_exclusions.keeps(&event("DebugTick", Value::Null).await));
    }

    #[test]
    fn a_filter_that_can_never_match_is_refused() {
        let problems = |text: &str| -> Vec<String> {
            filter(text)
                .validate()
                .into_iter()
                .map(|(key, _)| key)
                .collect()
        };
        assert_eq!(problems("names = []"), ["names"]);
        assert_eq!(problems(r#"names = [""]"#), ["names"]);
        assert_eq!(problems("names = [\"a\\u0001\"]"), ["names"]);
        assert_eq!(
            problems(
                r#"names = ["A", "B*"]
                        exclude_names = ["B*", "A"]"#
            ),
            ["exclude_names"]
        );
        assert_eq!(problems(r#"exclude_names = ["*"]"#), ["exclude_names"]);
        assert_eq!(
            problems(
                r#"names = ["A"]
                        exclude_names = ["*"]"#
            ),
            ["exclude_names"]
        );
        assert_eq!(problems(r#"metadata = { "" = "x" }"#), ["metadata"]);
        assert!(
            problems(
                r#"names = ["A", "B*"]
                            exclude_names = ["B*"]"#
            )
            .is_empty()
        );
        assert!(
            toml::from_str::<EventFilter>(r#"name = ["A"]"#).is_err(),
            "unknown keys are refused"
        );
        assert!(toml::from_str::<EventFilter>(r#"names = ["A\\"]"#).is_err());
    }
}
