//! The demo appender of `weir run --demo` (or `[demo] enabled = true`): a trickle
//! of sample events, so that a newcomer sees a node consume and forward events
//! within seconds of starting it, without writing a producer first.
//!
//! Events go round-robin over streams `CATEGORY/CATEGORY-1`.. of each configured
//! category, with names that tell a small story (`Opened`, `Updated`, `Closed`).
//! When no `[[subscriptions]]` are configured, the demo also adds one, `demo`,
//! that prints the demo categories to standard output.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DemoConfig, SinkConfig, SubscriptionConfig};
use crate::consumer::ConsumerSettings;
use crate::event::{Category, EventName, NewEvent, Source, StreamName, WriteCondition};
use crate::store::EventStore;

/// Names the demo events cycle through.
const NAMES: [&str; 3] = ["Opened", "Updated", "Closed"];

/// The demo's categories; configuration validation has already refused invalid
/// names.
fn categories(demo: &DemoConfig) -> Vec<Category> {
    demo.categories
        .iter()
        .filter_map(|category| Category::new(category.as_str()).ok())
        .collect()
}

/// The subscription `--demo` adds when none is configured.
pub fn default_subscription(demo: &DemoConfig) -> SubscriptionConfig {
    SubscriptionConfig {
        group: "demo".into(),
        sources: categories(demo).into_iter().map(Source::Category).collect(),
        instances: 1,
        required_tags: Default::default(),
        filter: None,
        routes: Vec::new(),
        unmatched: Default::default(),
        sink: SinkConfig::Stdout,
        consumer: ConsumerSettings {
            // Show each event as it comes rather than once a second.
            poll_interval: Duration::from_millis(200),
            ..ConsumerSettings::default()
        },
        partitions: 1,
    }
}

/// Switches the demo on in `config`, adding [`default_subscription`] when there is
/// no subscription to see its events with.
pub fn enable(config: &mut Config) {
    config.demo.enabled = true;
    if config.subscriptions.is_empty() {
        config
            .subscriptions
            .push(default_subscription(&config.demo));
    }
}

/// Appends demo events until `stop` is cancelled. Append errors are logged and
/// retried at the next tick: the demo must never take the node down.
pub async fn run(store: Arc<dyn EventStore>, demo: DemoConfig, stop: CancellationToken) {
    let categories = categories(&demo);
    if categories.is_empty() {
        return;
    }
    let period = Duration::from_secs_f64(1.0 / f64::from(demo.rate.max(1)));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(
        rate = demo.rate,
        categories = ?demo.categories,
        streams = demo.streams,
        "demo appender started"
    );
    let streams = u64::from(demo.streams.max(1));
    for n in 0u64.. {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let category = &categories[(n % categories.len() as u64) as usize];
        let round = n / categories.len() as u64;
        let stream_number = round % streams + 1;
        let name = NAMES[((round / streams) % NAMES.len() as u64) as usize];
        let Ok(stream) = StreamName::new(format!("{category}-{stream_number}")) else {
            continue;
        };
        let event = NewEvent::new(
            EventName::new(name).expect("demo event names are valid"),
            json!({ "demo": n, "note": format!("{name} {category}-{stream_number}") }),
        );
        if let Err(error) = store
            .append(category, &stream, WriteCondition::Any, vec![event])
            .await
        {
            tracing::warn!(%error, "demo appender could not append; trying again");
        }
    }
    tracing::info!("demo appender stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Cursor;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn appends_round_robin_until_stopped() {
        let store = Arc::new(MemoryStore::new());
        let stop = CancellationToken::new();
        let demo = DemoConfig {
            enabled: true,
            rate: 1000,
            categories: vec!["orders".into(), "payments".into()],
            streams: 2,
        };
        let task = crate::ambient::spawn(run(store.clone(), demo, stop.clone()));
        let log = Source::Log;
        let events = loop {
            let events = store.read(&log, Cursor::START, 100).await.unwrap();
            if events.len() >= 8 {
                break events;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        stop.cancel();
        task.await.unwrap();
        let streams: Vec<String> = events[..4]
            .iter()
            .map(|e| format!("{}/{}", e.category, e.stream))
            .collect();
        assert_eq!(
            streams,
            [
                "orders/orders-1",
                "payments/payments-1",
                "orders/orders-2",
                "payments/payments-2"
            ]
        );
        assert_eq!(events[4].name.as_str(), "Updated");
    }

    #[test]
    fn enabling_adds_a_subscription_only_when_there_is_none() {
        let mut config = Config::default();
        enable(&mut config);
        assert!(config.demo.enabled);
        assert_eq!(config.subscriptions.len(), 1);
        assert_eq!(config.subscriptions[0].sink, SinkConfig::Stdout);
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        enable(&mut config);
        assert_eq!(config.subscriptions.len(), 1);
    }
}
