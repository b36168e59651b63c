//! [`MemoryBus`]: the allocation bus within one process, for single-node runs and
//! tests.
//!
//! It behaves like the network buses where it matters: every message is encoded to
//! the wire format and decoded again by each subscriber, decisions larger than the
//! payload limit (1 MiB by default, like NATS) travel as parts, a decision that
//! changes little travels as a delta ([`super::chain`]), and the newest decision
//! of each group is retained, as its snapshot and the deltas since, for
//! subscribers that come later.
//!
//! Delivery uses a bounded broadcast channel, so a slow subscriber never holds up
//! a publisher. A subscriber that falls more than the channel's capacity behind
//! loses the oldest messages it has not read; it then receives the retained
//! decisions again and carries on with what is still in the channel. Decisions are
//! state, so that is enough for it to catch up with the newest one of every group;
//! the signals it missed are lost, which the coordinator tolerates because it also
//! learns membership from the store and times handovers out.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::broadcast;

use super::chain::{Chain, Publication};
use super::message::{BusMessage, Decision, encode, encode_decision_parts};
use super::{AllocationBus, BusMeter, BusSubscription, Error, Result};
use crate::metrics as names;

/// How many payloads a subscriber may fall behind by default.
pub const DEFAULT_CAPACITY: usize = 1024;

/// The largest payload by default: NATS's default `max_payload`, so splitting
/// behaves here as it will there.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// Payloads are shared between subscribers, not copied per send.
type Payload = Arc<[u8]>;

/// An allocation bus inside one process. Clones share the same bus.
#[derive(Clone, Debug)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Held while retaining and sending a decision, and while a subscriber
    /// subscribes and copies the retained decisions, so that a subscriber sees
    /// every decision either among the retained ones or in its channel.
    retained: Mutex<BTreeMap<String, Retained>>,
    sender: broadcast::Sender<Payload>,
    max_payload: usize,
    meter: Arc<BusMeter>,
}

/// A group's newest decision: its snapshot and the deltas after it.
#[derive(Debug)]
struct Retained {
    chain: Chain,
    payloads: Vec<Payload>,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBus {
    /// A bus with [`DEFAULT_CAPACITY`] and [`DEFAULT_MAX_PAYLOAD`].
    pub fn new() -> Self {
        Self::with_options(DEFAULT_CAPACITY, DEFAULT_MAX_PAYLOAD)
    }

    /// A bus on which a subscriber may fall `capacity` payloads behind (at least
    /// one) and whose payloads are at most `max_payload` bytes.
    pub fn with_options(capacity: usize, max_payload: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self {
            inner: Arc::new(Inner {
                retained: Mutex::new(BTreeMap::new()),
                sender,
                max_payload,
                meter: BusMeter::new(),
            }),
        }
    }

    /// Sends `bytes` to every subscriber as they are, without retaining them, so
    /// tests can deliver payloads that do not decode.
    #[cfg(any(test, feature = "testing"))]
    pub fn publish_raw(&self, bytes: Vec<u8>) {
        // No subscriber is not an error: nobody was there to miss it.
        let _ = self.inner.sender.send(bytes.into());
    }

    /// The decision retained for `group`: the newest published.
    pub fn retained_decision(&self, group: &str) -> Option<Decision> {
        self.inner
            .lock()
            .get(group)
            .map(|retained| Decision::clone(&retained.chain.decision))
    }

    /// Payloads dropped because they did not decode, summed over all
    /// subscriptions (a bad payload read by three subscribers counts three times).
    pub fn invalid_messages(&self) -> u64 {
        self.inner.meter.invalid().load(Ordering::Relaxed)
    }

    /// The counter behind [`MemoryBus::invalid_messages`], for metrics.
    pub fn invalid_counter(&self) -> Arc<AtomicU64> {
        self.inner.meter.invalid()
    }

    fn check_size(&self, payload: &[u8]) -> Result<()> {
        if payload.len() > self.inner.max_payload {
            return Err(Error::TooLarge {
                size: payload.len(),
                limit: self.inner.max_payload,
            });
        }
        Ok(())
    }
}

impl MemoryBus {
    /// Retains `decision` as a change to the retained one where that is
    /// cheaper (never if `whole`), and sends what was retained to every
    /// subscriber. Written `whole`, the retained version itself is written again.
    fn publish_decision(&self, decision: &Decision, whole: bool) -> Result<()> {
        let max_payload = self.inner.max_payload;
        let mut retained = self.inner.lock();
        let current = retained.remove(&decision.group);
        let newer = current.as_ref().is_none_or(|r| {
            decision.is_newer_than(&r.chain.decision)
                || (whole && decision.version() == r.chain.decision.version())
        });
        let publication = match &current {
            Some(current) if newer && !whole => {
                Chain::plan(Some(&current.chain), decision, max_payload)
            }
            _ => Publication::Snapshot(encode_decision_parts(decision, max_payload)),
        };
        let checked = publication
            .payloads()
            .iter()
            .try_for_each(|payload| self.check_size(payload));
        let sent: Vec<Payload> = publication
            .payloads()
            .iter()
            .map(|payload| Payload::from(payload.as_slice()))
            .collect();
        match (current, newer && checked.is_ok()) {
            (current, true) => {
                let (chain, mut payloads) = current
                    .map(|current| (Some(current.chain), current.payloads))
                    .unwrap_or_default();
                if let Publication::Snapshot(_) = publication {
                    payloads.clear();
                }
                payloads.extend(sent.iter().cloned());
                let chain = Chain::after(chain, decision, &publication);
                retained.insert(decision.group.clone(), Retained { chain, payloads });
            }
            (Some(current), false) => {
                retained.insert(decision.group.clone(), current);
            }
            (None, false) => {}
        }
        checked?;
        if !newer {
            tracing::debug!(
                group = %decision.group, epoch = decision.epoch, revision = decision.revision,
                "decision is not newer than the retained one; delivered but not retained"
            );
        }
        // A stale decision is still delivered, as a network broker would;
        // subscriptions drop decisions older than what they have seen.
        for payload in sent {
            let _ = self.inner.sender.send(payload);
            names::bus_message(publication.kind(), "sent");
        }
        Ok(())
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Retained>> {
        // Nothing panics while the lock is held, so a poisoned map is still whole.
        self.retained.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn retained_payloads(retained: &BTreeMap<String, Retained>) -> VecDeque<Payload> {
        retained
            .values()
            .flat_map(|r| r.payloads.iter().cloned())
            .collect()
    }
}

#[async_trait]
impl AllocationBus for MemoryBus {
    async fn publish(&self, message: &BusMessage) -> Result<()> {
        match message {
            BusMessage::Decision(decision) => self.publish_decision(decision, false),
            BusMessage::Digest(_) => {
                let payload = encode(message);
                let _ = self.inner.sender.send(payload.into());
                names::bus_message("digest", "sent");
                Ok(())
            }
            BusMessage::Signal(_) => {
                let payload = encode(message);
                self.check_size(&payload)?;
                let _ = self.inner.sender.send(payload.into());
                names::bus_message("signal", "sent");
                Ok(())
            }
        }
    }

    async fn publish_whole(&self, decision: &Decision) -> Result<()> {
        self.publish_decision(decision, true)
    }

    async fn retained(&self) -> Result<Vec<Decision>> {
        Ok(self
            .inner
            .lock()
            .values()
            .map(|retained| Decision::clone(&retained.chain.decision))
            .collect())
    }

    async fn subscribe(&self) -> Result<BusSubscription> {
        let (receiver, backlog) = {
            let retained = self.inner.lock();
            (
                self.inner.sender.subscribe(),
                Inner::retained_payloads(&retained),
            )
        };
        let reader = Reader {
            bus: Arc::downgrade(&self.inner),
            receiver,
            backlog,
        };
        let payloads = futures::stream::unfold(reader, |mut reader| async move {
            let payload = reader.next().await?;
            Some((payload.to_vec(), reader))
        })
        .boxed();
        Ok(BusSubscription::new(
            payloads,
            Arc::clone(&self.inner.meter),
        ))
    }
}

/// One subscriber's side of the channel.
struct Reader {
    /// Weak, so that a subscription does not keep a dropped bus alive: once every
    /// handle is gone the channel closes and the subscription ends.
    bus: Weak<Inner>,
    receiver: broadcast::Receiver<Payload>,
    /// Retained decisions still to hand out before reading the channel.
    backlog: VecDeque<Payload>,
}

impl Reader {
    async fn next(&mut self) -> Option<Payload> {
        loop {
            if let Some(payload) = self.backlog.pop_front() {
                return Some(payload);
            }
            match self.receiver.recv().await {
                Ok(payload) => return Some(payload),
                Err(broadcast::error::RecvError::Closed) => return None,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "allocation bus subscriber fell behind; resending retained decisions, missed signals are lost"
                    );
                    let bus = self.bus.upgrade()?;
                    self.backlog = Inner::retained_payloads(&bus.lock());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::message::Signal;
    use crate::event::Source;
    use std::collections::BTreeSet;
    use std::time::Duration;

    fn decision(group: &str, epoch: u64, revision: u64, sources: usize) -> Decision {
        let owned: BTreeSet<Source> = (0..sources)
            .map(|i| {
                format!("stream:orders/order-{i:06}")
                    .parse()
                    .expect("valid source")
            })
            .collect();
        Decision {
            group: group.into(),
            epoch,
            revision,
            coordinator: "node-a".into(),
            issued_at: crate::ambient::now(),
            owners: [("sub-1".to_owned(), owned)].into(),
            handovers: Default::default(),
            paused: false,
        }
    }

    async fn next(subscription: &mut BusSubscription) -> Option<BusMessage> {
        tokio::time::timeout(Duration::from_secs(5), subscription.next())
            .await
            .expect("a message within 5 s")
    }

    #[tokio::test]
    async fn large_decisions_travel_in_parts_and_arrive_whole() {
        let bus = MemoryBus::with_options(64, 1_000);
        let mut subscription = bus.subscribe().await.expect("subscribe");
        let big = decision("g", 1, 1, 200);
        assert!(encode_decision_parts(&big, 1_000).len() > 1);
        bus.publish(&big.clone().into()).await.expect("publish");
        assert_eq!(next(&mut subscription).await, Some(big.into()));
    }

    /// `decision` with its first source moved to a new subscriber.
    fn one_source_moved(decision: &Decision, revision: u64) -> Decision {
        let mut next = decision.clone();
        next.revision = revision;
        let owned = next.owners.get_mut("sub-1").expect("sub-1 owns");
        let first = owned.pop_first().expect("a source");
        next.owners
            .insert(format!("sub-{revision}"), [first].into());
        next
    }

    fn retained_bytes(bus: &MemoryBus, group: &str) -> usize {
        bus.inner.lock()[group]
            .payloads
            .iter()
            .map(|p| p.len())
            .sum()
    }

    #[tokio::test]
    async fn a_change_travels_as_a_delta_and_late_subscribers_still_get_it_whole() {
        let bus = MemoryBus::with_options(64, 1_000);
        let mut early = bus.subscribe().await.expect("subscribe");
        let mut raw = bus.inner.sender.subscribe();
        let first = decision("g", 1, 1, 200);
        bus.publish(&first.clone().into()).await.expect("publish");
        let second = one_source_moved(&first, 2);
        bus.publish(&second.clone().into()).await.expect("publish");
        let mut sent = Vec::new();
        while let Ok(payload) = raw.try_recv() {
            sent.push(payload.len());
        }
        let snapshot = encode_decision_parts(&first, 1_000);
        assert_eq!(sent.len(), snapshot.len() + 1, "the parts, then one delta");
        assert!(*sent.last().unwrap() < 400, "a delta of {sent:?} bytes");

        assert_eq!(next(&mut early).await, Some(first.into()));
        assert_eq!(next(&mut early).await, Some(second.clone().into()));
        // A late subscriber reads the snapshot, then the delta on top of it.
        let mut late = bus.subscribe().await.expect("subscribe");
        let _snapshot = next(&mut late).await;
        assert!(next(&mut late).await == Some(second.clone().into()));
        assert!(bus.retained().await.expect("retained") == vec![second]);
    }

    #[tokio::test]
    async fn what_a_group_retains_stays_under_twice_its_snapshot() {
        let bus = MemoryBus::with_options(4, 1_000);
        let mut current = decision("g", 1, 1, 100);
        bus.publish(&current.clone().into()).await.expect("publish");
        for revision in 2..=99 {
            current = one_source_moved(&current, revision);
            bus.publish(&current.clone().into()).await.expect("publish");
            // Snapshots only grow here, so the newest bounds the one retained.
            let snapshot: usize = encode_decision_parts(&current, 1_000)
                .iter()
                .map(Vec::len)
                .sum();
            assert!(retained_bytes(&bus, "g") <= 2 * snapshot);
        }
        let mut late = bus.subscribe().await.expect("subscribe");
        let mut newest = None;
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(100), late.next()).await
        {
            newest = Some(message);
        }
        assert_eq!(newest, Some(current.into()));
    }

    #[tokio::test]
    async fn oversized_signals_are_refused_with_a_hint() {
        let bus = MemoryBus::with_options(4, 50);
        let signal = Signal::Joined {
            group: "g".repeat(100),
            subscriber: "s".into(),
            node: "n".into(),
        };
        let error = bus.publish(&signal.into()).await.expect_err("too large");
        assert!(matches!(error, Error::TooLarge { limit: 50, .. }));
        assert!(error.to_string().contains("payload limit"), "{error}");
    }

    #[tokio::test]
    async fn a_dropped_bus_ends_its_subscriptions() {
        let bus = MemoryBus::new();
        let mut subscription = bus.subscribe().await.expect("subscribe");
        drop(bus);
        assert_eq!(next(&mut subscription).await, None);
    }

    #[tokio::test]
    async fn publishing_without_subscribers_still_retains() {
        let bus = MemoryBus::new();
        let d = decision("g", 1, 1, 3);
        bus.publish(&d.clone().into()).await.expect("publish");
        bus.publish_raw(b"nobody listens".to_vec());
        assert_eq!(bus.retained_decision("g"), Some(d));
    }
}
