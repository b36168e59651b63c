//! The sampler: on a timer, measures how far each consumer lags (running, or
//! failed or fenced on a source this node still owns) and how
//! long the store's visibility horizon holds readers back, and sets the gauges.
//!
//! Lag is measured from the store, never per event: for each running consumer, the
//! readable events after its cursor (counted up to [`LAG_COUNT_LIMIT`]) and the age
//! of the oldest of them. Log and category sources are exported per source; stream
//! sources are summed per group under `source="streams"` (events added up, the
//! oldest age kept), so that thousands of streams never become thousands of series.
//! A gauge this node set before for a source it no longer consumes goes back to 0,
//! so that summing or taking the maximum over the fleet counts only the owner.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::consumer::source::{Board, ConsumerState, Lag};
use crate::metrics::{
    CONSUMER_LAG_EVENTS, CONSUMER_LAG_SECONDS, LAG_COUNT_LIMIT, STORE_VISIBILITY_HORIZON,
};
use crate::store::EventStore;

/// How often lag and the horizon are measured unless told otherwise.
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// A lag gauge's labels: group and source label.
type Series = (String, String);

/// Measures the consumers of one board against one store.
pub struct Sampler {
    events: Arc<dyn EventStore>,
    board: Board,
    interval: Duration,
    /// The series this sampler set at its last round.
    exported: BTreeSet<Series>,
}

impl Sampler {
    pub fn new(events: Arc<dyn EventStore>, board: Board, interval: Duration) -> Self {
        Self {
            events,
            board,
            interval,
            exported: BTreeSet::new(),
        }
    }

    /// Samples every interval until `cancel`, then sets its lag gauges to 0: a
    /// stopped node lags behind nothing.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut timer = tokio::time::interval(self.interval);
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                _ = timer.tick() => self.sample().await,
            }
        }
        for (group, source) in std::mem::take(&mut self.exported) {
            set_lag(&group, &source, 0, 0.0);
        }
    }

    /// One round: the horizon, then every running consumer's lag.
    pub async fn sample(&mut self) {
        match self.events.visibility_horizon().await {
            Ok(horizon) => {
                ::metrics::gauge!(STORE_VISIBILITY_HORIZON).set(horizon.as_secs_f64());
            }
            Err(error) => {
                tracing::debug!(%error, "cannot measure the store's visibility horizon");
            }
        }
        let mut totals: BTreeMap<Series, (u64, f64)> = BTreeMap::new();
        for (key, entry) in self.board.entries_now() {
            // A retrying consumer's lag is what tells how far the outage set it
            // back; one that failed or was fenced still owns its source until it is
            // withdrawn (then it reports stopped): its lag keeps growing, and must
            // show, or a source nobody consumes would look caught up.
            let owned = matches!(
                entry.state,
                ConsumerState::Running
                    | ConsumerState::Retrying(_)
                    | ConsumerState::Failed(_)
                    | ConsumerState::Fenced(_)
            );
            let (true, Some(cursor)) = (owned, entry.cursor) else {
                continue;
            };
            let backlog = match self
                .events
                .backlog(&key.source, cursor, LAG_COUNT_LIMIT)
                .await
            {
                Ok(backlog) => backlog,
                Err(error) => {
                    tracing::debug!(group = %key.group, source = %key.source, %error, "cannot measure lag");
                    continue;
                }
            };
            let now = crate::ambient::now();
            let seconds = backlog
                .oldest
                .map(|oldest| (now - oldest).as_seconds_f64().max(0.0))
                .unwrap_or(0.0);
            self.board.set_lag(
                &key,
                Lag {
                    events: backlog.events,
                    seconds,
                    measured_at: now,
                },
            );
            let total = totals
                .entry((key.group.clone(), key.source.metric_label()))
                .or_default();
            total.0 = total.0.saturating_add(backlog.events).min(LAG_COUNT_LIMIT);
            total.1 = total.1.max(seconds);
        }
        for series in &self.exported {
            if !totals.contains_key(series) {
                set_lag(&series.0, &series.1, 0, 0.0);
            }
        }
        for ((group, source), (events, seconds)) in &totals {
            set_lag(group, source, *events, *seconds);
        }
        self.exported = totals.into_keys().collect();
    }
}

fn set_lag(group: &str, source: &str, events: u64, seconds: f64) {
    let labels = [("group", group.to_owned()), ("source", source.to_owned())];
    ::metrics::gauge!(CONSUMER_LAG_EVENTS, &labels).set(events as f64);
    ::metrics::gauge!(CONSUMER_LAG_SECONDS, &labels).set(seconds);
}
