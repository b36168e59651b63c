//! Routes: a forwarding sink sending different events to different destinations.
//!
//! ```toml
//! [[subscriptions.routes]]
//! match = { names = ["Order*"], category = "orders" }
//! topic = "orders.{name}"
//! key = "{stream}"
//! ```
//!
//! Each of a subscription's `[[subscriptions.routes]]` has a `match` (event name
//! patterns and a category pattern, [`Glob`]s; an absent one matches anything)
//! and its own destination template (`subject` for NATS, `topic` for Kafka, and
//! optionally a Kafka `key`). An event goes to the first route that matches it;
//! one that no route matches goes where the subscription's `unmatched` says:
//! `default` (the sink's own template), `skip` (not sent, counted in
//! `weir_events_unrouted_total{group}`) or `dead_letter` (kept as a dead letter,
//! whatever the group's error policy).
//!
//! A [`Router`] decides; each sink renders what the decision names.

use serde::{Deserialize, Serialize};

use crate::consumer::filter::{Glob, any_matches};
use crate::event::StoredEvent;

/// `match = { names = [...], category = "…" }` of a route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// The event's name matches one of these; any name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<Glob>>,
    /// The event's category matches this; any category when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<Glob>,
}

impl RouteMatch {
    pub fn matches(&self, event: &StoredEvent) -> bool {
        self.names
            .as_ref()
            .is_none_or(|names| any_matches(names, event.name.as_str()))
            && self
                .category
                .as_ref()
                .is_none_or(|category| category.matches(event.category.as_str()))
    }

    /// True when it matches every event.
    pub fn matches_everything(&self) -> bool {
        self.names
            .as_ref()
            .is_none_or(|names| names.iter().any(Glob::matches_everything))
            && self.category.as_ref().is_none_or(Glob::matches_everything)
    }
}

/// One `[[subscriptions.routes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(rename = "match")]
    pub matches: RouteMatch,
    /// The subject template, for a NATS sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The topic template, for a Kafka sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The key template, for a Kafka sink; by default `{category}/{stream}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// `unmatched`: what happens to an event no route matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// Sent where the sink's own template says.
    #[default]
    Default,
    /// Not sent; counted in `weir_events_unrouted_total`.
    Skip,
    /// Kept as a dead letter of kind `unrouted`, whatever the error policy.
    DeadLetter,
}

/// A subscription's routes and what becomes of the events they miss.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    pub routes: Vec<RouteConfig>,
    pub unmatched: Unmatched,
}

/// No routes: everything to the sink's own template.
pub static NO_ROUTES: Routing = Routing {
    routes: Vec::new(),
    unmatched: Unmatched::Default,
};

/// Where one event goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed<'a, D> {
    To(&'a D),
    Skip,
    DeadLetter,
}

/// Routes compiled for one sink, each with its destination `D` (templates,
/// parsed), and the sink's own.
#[derive(Debug, Clone)]
pub struct Router<D> {
    routes: Vec<(RouteMatch, D)>,
    unmatched: Unmatched,
    default: D,
}

impl<D> Router<D> {
    /// Everything to `default`.
    pub fn single(default: D) -> Self {
        Self {
            routes: Vec::new(),
            unmatched: Unmatched::Default,
            default,
        }
    }

    pub fn new(routes: Vec<(RouteMatch, D)>, unmatched: Unmatched, default: D) -> Self {
        Self {
            routes,
            unmatched,
            default,
        }
    }

    /// Where `event` goes: the first matching route's destination, or what
    /// `unmatched` says.
    pub fn route(&self, event: &StoredEvent) -> Routed<'_, D> {
        if let Some((_, destination)) = self.routes.iter().find(|(m, _)| m.matches(event)) {
            return Routed::To(destination);
        }
        match self.unmatched {
            Unmatched::Default => Routed::To(&self.default),
            Unmatched::Skip => Routed::Skip,
            Unmatched::DeadLetter => Routed::DeadLetter,
        }
    }

    /// Every destination an event may go to: the routes', then the sink's own
    /// when unmatched events go there.
    pub fn destinations(&self) -> impl Iterator<Item = &D> {
        let default = (self.unmatched == Unmatched::Default).then_some(&self.default);
        self.routes.iter().map(|(_, d)| d).chain(default)
    }

    pub fn default_destination(&self) -> &D {
        &self.default
    }

    /// The same routes with each destination mapped.
    pub fn map<E>(self, mut f: impl FnMut(D) -> E) -> Router<E> {
        Router {
            routes: self.routes.into_iter().map(|(m, d)| (m, f(d))).collect(),
            unmatched: self.unmatched,
            default: f(self.default),
        }
    }
}

/// The kind of the dead letter an unmatched event becomes under
/// `unmatched = "dead_letter"`.
pub const KIND_UNROUTED: &str = "unrouted";

/// The error that makes the consumer keep `event` as a dead letter.
pub fn unrouted(event: &StoredEvent) -> crate::consumer::ProcessError {
    crate::consumer::ProcessError::dead_letter(
        KIND_UNROUTED,
        format!(
            "no route of the sink matches event {} ({} in {}/{}), and unmatched = \"dead_letter\"",
            event.id, event.name, event.category, event.stream
        ),
    )
}

/// Counts events left unsent because no route matched.
pub fn count_unrouted(group: &str, events: u64) {
    if events > 0 {
        ::metrics::counter!(crate::metrics::EVENTS_UNROUTED, "group" => group.to_owned())
            .increment(events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(toml_text: &str) -> Vec<RouteConfig> {
        #[derive(Deserialize)]
        struct Holder {
            routes: Vec<RouteConfig>,
        }
        toml::from_str::<Holder>(toml_text).expect("routes").routes
    }

    #[tokio::test]
    async fn the_first_matching_route_wins_and_unmatched_decides_the_rest() {
        let configured = routes(
            r#"
            [[routes]]
            match = { names = ["Happ*"], category = "other" }
            topic = "never"
            [[routes]]
            match = { names = ["Nope", "Hap?ened"] }
            topic = "first"
            [[routes]]
            match = { category = "things" }
            topic = "second"
            "#,
        );
        let router = |unmatched| {
            Router::new(
                configured
                    .iter()
                    .map(|r| (r.matches.clone(), r.topic.clone().unwrap()))
                    .collect(),
                unmatched,
                "default".to_owned(),
            )
        };
        let mut event = crate::consumer::testing::events(1).await.remove(0);
        assert_eq!(
            router(Unmatched::Skip).route(&event),
            Routed::To(&"first".to_owned())
        );
        event.name = crate::event::EventName::new("Other").unwrap();
        assert_eq!(
            router(Unmatched::Skip).route(&event),
            Routed::To(&"second".to_owned())
        );
        event.category = crate::event::Category::new("elsewhere").unwrap();
        assert_eq!(router(Unmatched::Skip).route(&event), Routed::Skip);
        assert_eq!(
            router(Unmatched::DeadLetter).route(&event),
            Routed::DeadLetter
        );
        assert_eq!(
            router(Unmatched::Default).route(&event),
            Routed::To(&"default".to_owned())
        );
        assert_eq!(router(Unmatched::Skip).destinations().count(), 3);
        assert_eq!(router(Unmatched::Default).destinations().count(), 4);
    }

    #[test]
    fn a_route_needs_its_match() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Holder {
            routes: Vec<RouteConfig>,
        }
        assert!(toml::from_str::<Holder>("[[routes]]\ntopic = \"t\"").is_err());
        assert!(
            toml::from_str::<Holder>("[[routes]]\nmatch = {}\ntopic = \"t\"\nother = 1").is_err()
        );
        let everything = routes("[[routes]]\nmatch = {}\ntopic = \"t\"");
        assert!(everything[0].matches.matches_everything());
        let star =
            routes("[[routes]]\nmatch = { names = [\"*\"], category = \"*\" }\ntopic = \"t\"");
        assert!(star[0].matches.matches_everything());
        let narrow = routes("[[routes]]\nmatch = { names = [\"A\"] }\ntopic = \"t\"");
        assert!(!narrow[0].matches.matches_everything());
    }
}
