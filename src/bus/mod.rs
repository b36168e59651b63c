//! The allocation bus: how a group's coordinator tells observers which subscriber
//! owns which source, and how subscribers tell the coordinator they joined, are
//! leaving or released a source.
//!
//! [`AllocationBus`] is the trait every backend implements; [`message`] is the wire
//! format they all share, so nodes on different backends' clients agree on bytes.
//! Backends: [`memory`] (one process, always built), `nats` (NATS JetStream,
//! feature `nats`) and [`kafka`] (feature `kafka`).
//!
//! Decisions are state, signals are events: a bus retains the newest decision of
//! each group (as a snapshot and the deltas after it, see [`chain`]) and hands it
//! to every new subscriber, while a signal, and a coordinator's digest of its
//! decisions, reaches only those subscribed when it was published.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

pub mod chain;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;
pub mod message;
#[cfg(feature = "nats")]
pub mod nats;

use crate::metrics as names;

#[cfg(feature = "kafka")]
pub use kafka::KafkaBus;
pub use memory::MemoryBus;
pub use message::{
    BusMessage, ContentDigest, Decision, DecisionAssembler, DecisionPart, DecisionReader,
    DecodeError, Delta, Digest, Frame, Signal, decode, decode_frame, encode, encode_decision_parts,
    encode_delta,
};
#[cfg(feature = "nats")]
pub use nats::NatsBus;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot reach the allocation bus: {0}; check the [bus] settings and that the broker is running"
    )]
    Unavailable(String),
    #[error(
        "a bus message of {size} bytes exceeds the broker's limit of {limit} bytes: raise the broker's payload limit or shorten subscriber ids and source names"
    )]
    TooLarge { size: usize, limit: usize },
    #[error("the allocation bus has shut down: restart the node")]
    Closed,
    #[error("the allocation bus failed: {0}")]
    Backend(String),
}

impl From<crate::connect::ConnectError> for Error {
    fn from(error: crate::connect::ConnectError) -> Self {
        match error {
            crate::connect::ConnectError::Unavailable(reason) => Error::Unavailable(reason),
            crate::connect::ConnectError::Invalid(reason) => Error::Backend(reason),
        }
    }
}

impl Error {
    /// Retrying may succeed (the broker could not be reached); other errors will
    /// fail the same way again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

/// Which allocation bus backend to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    #[default]
    Memory,
    Nats,
    Kafka,
}

/// `[bus]`: which allocation bus the fleet shares. Connection settings live in
/// `[nats]` and `[kafka]`, which the sinks use too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    #[serde(default)]
    pub kind: BusKind,
    /// Prefix of every subject, stream and topic the bus uses, so that several
    /// fleets can share one NATS or Kafka cluster.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// How long the broker keeps signals (joined, leaving, released). They matter
    /// only to the coordinator of the moment, so a short time is enough.
    #[serde(default = "default_signal_retention", with = "humantime_serde")]
    pub signal_retention: Duration,
}

fn default_namespace() -> String {
    "weir".into()
}
fn default_signal_retention() -> Duration {
    Duration::from_secs(60)
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            kind: BusKind::default(),
            namespace: default_namespace(),
            signal_retention: default_signal_retention(),
        }
    }
}

/// A transport for [`BusMessage`]s. Object safe, so nodes hold an
/// `Arc<dyn AllocationBus>` chosen by configuration.
///
/// Metrics: a backend counts each payload it sends with
/// [`bus_message`](crate::metrics::bus_message)`(kind, "sent")`;
/// [`BusSubscription`] counts what is received and what cannot be read, for every
/// backend alike.
#[async_trait]
pub trait AllocationBus: Send + Sync + 'static {
    /// Answers once the bus is reachable, for the node's readiness check: one
    /// quick round trip to the broker where the backend has one. The default
    /// says yes, for backends with nothing to reach.
    async fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Publishes `message` to every subscriber. A decision too large for one
    /// payload is split into parts ([`encode_decision_parts`]) by the backend.
    async fn publish(&self, message: &BusMessage) -> Result<()>;

    /// Publishes `decision` whole (a snapshot, never a change), even if the
    /// bus holds this version already: for observers that cannot rebuild it
    /// from what the bus retains ([`Signal::Lacking`]), whatever the bus lost.
    async fn publish_whole(&self, decision: &Decision) -> Result<()>;

    /// Starts receiving: first the retained decision of every group, then
    /// messages as they are published.
    async fn subscribe(&self) -> Result<BusSubscription>;

    /// The newest decision of every group, as the bus retains them now. A newly
    /// promoted coordinator starts from these, so that leadership changing hands
    /// moves no source.
    async fn retained(&self) -> Result<Vec<Decision>>;
}

/// What the subscriptions of one bus handle share: the count of payloads that did
/// not decode, and which subscription feeds the node's metrics.
///
/// A node subscribes more than once (its coordinator and its observer each do), and
/// each subscription sees every message; the metrics
/// `weir_bus_messages_total{direction="received"}` and
/// `weir_bus_invalid_messages_total` count what reached the node, so only one
/// subscription at a time counts them. Another takes over when it ends.
#[derive(Debug, Default)]
pub struct BusMeter {
    invalid: Arc<AtomicU64>,
    /// Id of the subscription that counts metrics; 0 while none does.
    metering: AtomicU64,
    ids: AtomicU64,
}

impl BusMeter {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Payloads dropped by any subscription because they did not decode (one
    /// payload read by two subscriptions counts twice).
    pub fn invalid(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.invalid)
    }
}

/// Messages from one subscription, decoded and with split decisions reassembled.
///
/// Payloads that do not decode (malformed, or from a weir with a newer wire
/// format) are dropped and counted; they never end the subscription, because one
/// bad publisher must not cut every observer off from decisions.
pub struct BusSubscription {
    payloads: BoxStream<'static, Vec<u8>>,
    reader: DecisionReader,
    invalid: u64,
    meter: Arc<BusMeter>,
    id: u64,
}

impl BusSubscription {
    /// Wraps a backend's raw payloads. Invalid payloads are also added to the
    /// count in `meter`, which a backend shares between its subscriptions.
    pub fn new(payloads: BoxStream<'static, Vec<u8>>, meter: Arc<BusMeter>) -> Self {
        let id = meter.ids.fetch_add(1, Ordering::Relaxed) + 1;
        Self {
            payloads,
            reader: DecisionReader::new(),
            invalid: 0,
            meter,
            id,
        }
    }

    /// The same subscription, losing every payload `lose` says it loses, as a
    /// subscriber cut off for a while would: for tests of convergence.
    #[cfg(any(test, feature = "testing"))]
    #[must_use]
    pub fn with_loss(mut self, mut lose: impl FnMut(&[u8]) -> bool + Send + 'static) -> Self {
        let payloads = std::mem::replace(&mut self.payloads, futures::stream::empty().boxed());
        self.payloads = payloads
            .filter(move |payload| std::future::ready(!lose(payload)))
            .boxed();
        self
    }

    /// Whether this subscription is the one of its bus that counts metrics,
    /// taking the part over if no other has it.
    fn meters(&self) -> bool {
        let metering = &self.meter.metering;
        let current = metering.load(Ordering::Relaxed);
        current == self.id
            || (current == 0
                && metering
                    .compare_exchange(0, self.id, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok())
    }

    /// The next message; `None` once the bus has shut down.
    ///
    /// A decision is delivered only if it is newer than the last one delivered
    /// for its group, so a stale coordinator's late decision or a redelivery
    /// never takes an observer back. A decision published as a change to one
    /// this subscription does not hold arrives as the [`Digest`] of the decision
    /// it makes: fetch it with [`AllocationBus::retained`] and [`adopt`](Self::adopt) it.
    pub async fn next(&mut self) -> Option<BusMessage> {
        loop {
            let payload = self.payloads.next().await?;
            match decode_frame(&payload) {
                Ok(frame) => {
                    if self.meters() {
                        names::bus_message(frame_kind(&frame), "received");
                    }
                    if let Some(message) = self.reader.push(frame) {
                        return Some(message);
                    }
                }
                Err(error) => {
                    self.invalid += 1;
                    self.meter.invalid.fetch_add(1, Ordering::Relaxed);
                    if self.meters() {
                        names::bus_invalid_message();
                    }
                    tracing::warn!(
                        %error,
                        bytes = payload.len(),
                        "dropped an allocation bus message that cannot be read"
                    );
                    tracing::debug!(
                        payload = %String::from_utf8_lossy(&payload[..payload.len().min(512)]),
                        "start of the dropped bus message"
                    );
                }
            }
        }
    }

    /// Takes `decision`, fetched from [`AllocationBus::retained`] after a
    /// [`BusMessage::Digest`] said this subscription lacks it, as the base that
    /// the changes published after it apply to.
    pub fn adopt(&mut self, decision: &Decision) {
        self.reader.adopt(decision);
    }

    /// How many payloads this subscription dropped because they did not decode.
    pub fn invalid_messages(&self) -> u64 {
        self.invalid
    }

    /// The counter shared with the bus (over all its subscriptions).
    pub fn invalid_counter(&self) -> Arc<AtomicU64> {
        self.meter.invalid()
    }
}

/// The metric kind of a payload.
fn frame_kind(frame: &Frame) -> &'static str {
    match frame {
        Frame::Decision(_) => "decision",
        Frame::Signal(_) => "signal",
        Frame::Delta(_) => "delta",
        Frame::Digest(_) => "digest",
    }
}

impl Drop for BusSubscription {
    fn drop(&mut self) {
        // Hands the metrics over to the bus's next subscription to read a message.
        let _ =
            self.meter
                .metering
                .compare_exchange(self.id, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for BusSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusSubscription")
            .field("invalid", &self.invalid)
            .field("pending_decisions", &self.reader.pending())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn only_unreachable_is_retryable() {
        assert!(Error::Unavailable("connection refused".into()).is_retryable());
        assert!(!Error::Closed.is_retryable());
        assert!(!Error::TooLarge { size: 2, limit: 1 }.is_retryable());
        assert!(!Error::Backend("boom".into()).is_retryable());
    }

    #[tokio::test]
    async fn invalid_payloads_are_counted_and_skipped() {
        let signal = Signal::Joined {
            group: "g".into(),
            subscriber: "s".into(),
            node: "n".into(),
        };
        let payloads = vec![
            b"garbage".to_vec(),
            br#"{"v":9,"kind":"signal"}"#.to_vec(),
            encode(&signal.clone().into()),
        ];
        let meter = BusMeter::new();
        meter.invalid.store(5, Ordering::Relaxed);
        let mut subscription =
            BusSubscription::new(futures::stream::iter(payloads).boxed(), Arc::clone(&meter));
        assert_eq!(subscription.next().await, Some(BusMessage::Signal(signal)));
        assert_eq!(subscription.invalid_messages(), 2);
        assert_eq!(meter.invalid().load(Ordering::Relaxed), 7);
        assert_eq!(subscription.next().await, None);
    }

    #[test]
    fn a_node_with_two_subscriptions_counts_each_message_once() {
        use futures::FutureExt;
        let signal: BusMessage = Signal::Joined {
            group: "g".into(),
            subscriber: "s".into(),
            node: "n".into(),
        }
        .into();
        let decision: BusMessage = Decision {
            group: "g".into(),
            epoch: 1,
            revision: 1,
            coordinator: "n".into(),
            issued_at: chrono::Utc::now(),
            owners: BTreeMap::new(),
            handovers: BTreeMap::new(),
            paused: false,
        }
        .into();
        let payloads = || {
            let list = vec![b"garbage".to_vec(), encode(&signal), encode(&decision)];
            futures::stream::iter(list).boxed()
        };
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let meter = BusMeter::new();
        ::metrics::with_local_recorder(&recorder, || {
            // A coordinator and an observer on one node, each reading everything.
            let mut first = BusSubscription::new(payloads(), Arc::clone(&meter));
            let mut second = BusSubscription::new(payloads(), Arc::clone(&meter));
            for subscription in [&mut first, &mut second] {
                while subscription.next().now_or_never().flatten().is_some() {}
            }
            drop(first);
            // The other subscription takes over once the first is gone.
            let signal = Signal::Leaving {
                group: "g".into(),
                subscriber: "s".into(),
                node: "n".into(),
            };
            let mut third = BusSubscription::new(
                futures::stream::iter(vec![encode(&signal.into())]).boxed(),
                Arc::clone(&meter),
            );
            drop(second);
            assert!(third.next().now_or_never().flatten().is_some());
        });
        let text = handle.render();
        for line in [
            "weir_bus_invalid_messages_total 1",
            r#"weir_bus_messages_total{kind="decision",direction="received"} 1"#,
            r#"weir_bus_messages_total{kind="signal",direction="received"} 2"#,
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
        // The bus's own count still sums over subscriptions.
        assert_eq!(meter.invalid().load(Ordering::Relaxed), 2);
    }
}
