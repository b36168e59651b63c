//! The observer: keeps this node's subscribers registered and heartbeating, reads
//! decisions from the bus and tells each local subscriber which sources to accept
//! and which to withdraw.
//!
//! Decisions of a group are applied only if newer than the newest seen, by
//! `(epoch, revision)`, so a deposed coordinator's late decision changes nothing.
//! Each group is applied by a task of its own, so a subscriber slow to withdraw
//! holds up only its group; within a group every withdraw finishes before any
//! accept starts, and `released` is published for a source only once its withdraw
//! has returned, which is what makes a handover safe.
//!
//! A node that cannot heartbeat for a whole member timeout must assume the
//! coordinator counts it dead and gives its sources away, so it withdraws them
//! itself; it takes them up again once its heartbeats get through.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::future::join_all;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::BrokerSettings;
use super::membership::{Membership, MembershipStore, SubscriberKey};
use super::role::{BrokerStatus, RETRY_DELAY, Reporter};
use super::subscriber::{Subscriber, SubscriberSpec};
use crate::bus::{AllocationBus, BusMessage, BusSubscription, Decision, Signal};
use crate::event::{Cursor, Source};
use crate::metrics;

/// Applies decisions to this node's subscribers. Add subscribers, take
/// [`Observer::status`], then spawn [`Observer::run`].
pub struct Observer {
    node: String,
    settings: BrokerSettings,
    membership: Membership,
    bus: Arc<dyn AllocationBus>,
    /// Group to its local subscribers, by subscriber id.
    groups: BTreeMap<String, BTreeMap<String, Arc<dyn Subscriber>>>,
    status: Reporter,
}

/// What one group's applier is told: the newest decision, and whether the node has
/// fenced itself off (then it holds nothing, whatever the decision says).
#[derive(Clone, Default)]
struct Target {
    decision: Option<Arc<Decision>>,
    fenced: bool,
}

impl Target {
    fn sources_of(&self, subscriber: &str) -> BTreeSet<Source> {
        match &self.decision {
            Some(decision) if !self.fenced => {
                decision.owners.get(subscriber).cloned().unwrap_or_default()
            }
            _ => BTreeSet::new(),
        }
    }
}

impl Observer {
    pub fn new(
        node: impl Into<String>,
        settings: BrokerSettings,
        membership: Arc<dyn MembershipStore>,
        bus: Arc<dyn AllocationBus>,
    ) -> Self {
        let node = node.into();
        Self {
            membership: Membership::new(membership, node.clone()),
            status: Reporter::new(&node),
            node,
            settings,
            bus,
            groups: BTreeMap::new(),
        }
    }

    /// Adds a local subscriber. The caller has checked that its id is new.
    pub fn add(&mut self, spec: SubscriberSpec, subscriber: Arc<dyn Subscriber>) {
        self.membership
            .add(spec.group.clone(), spec.id.clone(), spec.sources, spec.tags);
        self.groups
            .entry(spec.group)
            .or_default()
            .insert(spec.id, subscriber);
    }

    pub fn status(&self) -> watch::Receiver<BrokerStatus> {
        self.status.subscribe()
    }

    /// Registers the subscribers, applies decisions until `cancel` is cancelled,
    /// then withdraws every source, removes the registrations and signals `leaving`.
    pub async fn run(self, cancel: CancellationToken) {
        if let Some((subscription, registered_at)) = self.start(&cancel).await {
            self.observe(subscription, registered_at, &cancel).await;
        }
        self.status.set(BrokerStatus::Stopped);
    }

    /// Registers every subscriber, subscribes to the bus and announces the
    /// subscribers. Returns the subscription and when the registration that
    /// succeeded was sent; `None` if cancelled first.
    async fn start(&self, cancel: &CancellationToken) -> Option<(BusSubscription, Instant)> {
        let registered_at = self
            .status
            .retry(cancel, "cannot register subscribers", || async {
                let sent = Instant::now();
                self.membership.register_all().await.map(|()| sent)
            })
            .await?;
        let subscription = self
            .status
            .retry(cancel, "cannot subscribe to the allocation bus", || {
                self.bus.subscribe()
            })
            .await?;
        for key in self.keys() {
            self.signal_joined(&key).await;
        }
        self.status.set(BrokerStatus::Running);
        Some((subscription, registered_at))
    }

    async fn observe(
        &self,
        mut subscription: BusSubscription,
        registered_at: Instant,
        cancel: &CancellationToken,
    ) {
        let mut appliers = JoinSet::new();
        let mut targets: BTreeMap<&str, watch::Sender<Target>> = BTreeMap::new();
        let stop_appliers = CancellationToken::new();
        for (group, subscribers) in &self.groups {
            let (sender, receiver) = watch::channel(Target::default());
            let applier = GroupApplier {
                group: group.clone(),
                subscribers: subscribers.clone(),
                held: BTreeMap::new(),
                bus: Arc::clone(&self.bus),
            };
            appliers.spawn(applier.run(receiver, stop_appliers.clone()));
            targets.insert(group, sender);
        }

        let mut heartbeat = tokio::time::interval(self.settings.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        heartbeat.reset();
        // The registry stamps a heartbeat at some moment after it was sent, so the
        // coordinator counts this node dead no earlier than a member timeout after
        // the last successful send. Fencing one interval before that leaves the
        // coordinator's tick no chance to give a source away first.
        let fence_after = self
            .settings
            .member_timeout
            .saturating_sub(self.settings.heartbeat_interval);
        let mut fence_at = registered_at + fence_after;
        let mut fenced = false;
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = heartbeat.tick() => {
                    let sent = Instant::now();
                    if self.heartbeat().await {
                        fence_at = sent + fence_after;
                        if fenced {
                            fenced = false;
                            tracing::info!(node = %self.node, "heartbeats get through again: taking sources back up");
                            for target in targets.values() {
                                target.send_modify(|target| target.fenced = false);
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(fence_at), if !fenced => {
                    fenced = true;
                    tracing::error!(
                        node = %self.node,
                        "no heartbeat got through for most of a member timeout: withdrawing every source before the coordinator gives them away"
                    );
                    for target in targets.values() {
                        target.send_modify(|target| target.fenced = true);
                    }
                }
                message = subscription.next() => match message {
                    Some(BusMessage::Decision(decision)) => {
                        if let Some(target) = targets.get(decision.group.as_str()) {
                            target.send_if_modified(|target| {
                                let newer = target
                                    .decision
                                    .as_ref()
                                    .is_none_or(|seen| decision.is_newer_than(seen));
                                if newer {
                                    metrics::decision_seen(&decision.group, decision.epoch, decision.revision);
                                    target.decision = Some(Arc::new(decision));
                                }
                                newer
                            });
                        }
                    }
                    Some(BusMessage::Signal(_)) => {}
                    None => match self.status.retry(cancel, "cannot subscribe to the allocation bus", || self.bus.subscribe()).await {
                        Some(fresh) => subscription = fresh,
                        None => break,
                    },
                },
            }
        }

        self.status.set(BrokerStatus::Stopping);
        // Every source is withdrawn and released before the node says it leaves:
        // the coordinator hands a leaving node's sources on at once.
        stop_appliers.cancel();
        while appliers.join_next().await.is_some() {}
        if let Err(error) = self.membership.leave_all().await {
            tracing::warn!(node = %self.node, %error, "could not remove member records; they expire after the member timeout");
        }
        for key in self.keys() {
            let leaving = Signal::Leaving {
                group: key.group,
                subscriber: key.subscriber,
                node: self.node.clone(),
            };
            publish_signal(self.bus.as_ref(), leaving).await;
        }
    }

    /// Heartbeats every subscriber and announces those registered again. Returns
    /// whether the registry was reached.
    async fn heartbeat(&self) -> bool {
        // Bounded, so that a registry that stops answering cannot hold up fencing.
        let heartbeat = self.membership.heartbeat_once();
        match tokio::time::timeout(self.settings.heartbeat_interval, heartbeat).await {
            Err(_) => {
                self.status
                    .error("heartbeat timed out: the membership store does not answer".to_owned());
                false
            }
            Ok(Ok(registered_again)) => {
                for key in registered_again {
                    self.signal_joined(&key).await;
                }
                self.status.set(BrokerStatus::Running);
                true
            }
            Ok(Err(error)) => {
                self.status
                    .error(format!("cannot heartbeat subscribers: {error}"));
                false
            }
        }
    }

    async fn signal_joined(&self, key: &SubscriberKey) {
        let joined = Signal::Joined {
            group: key.group.clone(),
            subscriber: key.subscriber.clone(),
            node: self.node.clone(),
        };
        publish_signal(self.bus.as_ref(), joined).await;
    }

    fn keys(&self) -> Vec<SubscriberKey> {
        self.membership
            .subscribers()
            .map(|registration| registration.key())
            .collect()
    }
}

/// Signals are hints: the coordinator also reads membership and times handovers
/// out, so a signal that cannot be published is logged, not retried.
async fn publish_signal(bus: &dyn AllocationBus, signal: Signal) {
    if let Err(error) = bus.publish(&BusMessage::Signal(signal.clone())).await {
        tracing::warn!(?signal, %error, "could not publish a signal");
    }
}

/// Applies one group's decisions to its local subscribers.
struct GroupApplier {
    group: String,
    subscribers: BTreeMap<String, Arc<dyn Subscriber>>,
    /// What each subscriber holds now.
    held: BTreeMap<String, BTreeSet<Source>>,
    bus: Arc<dyn AllocationBus>,
}

impl GroupApplier {
    /// Applies the newest target whenever it changes, until `stop`; then
    /// withdraws everything.
    async fn run(mut self, mut targets: watch::Receiver<Target>, stop: CancellationToken) {
        loop {
            let target = targets.borrow_and_update().clone();
            let complete = self.apply(&target).await;
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                changed = targets.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                // A failed accept is tried again even if no new decision comes.
                () = tokio::time::sleep(RETRY_DELAY), if !complete => {}
            }
        }
        self.apply(&Target::default()).await;
    }

    /// Tells the coordinator `subscriber` no longer consumes `source`.
    async fn release(&self, subscriber: &str, source: &Source, cursor: Option<Cursor>) {
        let released = Signal::Released {
            group: self.group.clone(),
            subscriber: subscriber.to_owned(),
            source: source.clone(),
            cursor,
        };
        publish_signal(self.bus.as_ref(), released).await;
    }

    /// Withdraws what the target takes away, then accepts what it gives. Returns
    /// whether every accept succeeded.
    async fn apply(&mut self, target: &Target) -> bool {
        let mut withdrawals = Vec::new();
        let mut acceptances = Vec::new();
        for (id, subscriber) in &self.subscribers {
            let wanted = target.sources_of(id);
            let held = self.held.get(id);
            for source in held.into_iter().flatten() {
                if !wanted.contains(source) {
                    withdrawals.push((id, subscriber, source.clone()));
                }
            }
            for source in wanted {
                if !held.is_some_and(|held| held.contains(&source)) {
                    acceptances.push((id, subscriber, source));
                }
            }
        }

        let withdrawn = join_all(withdrawals.into_iter().map(
            |(id, subscriber, source)| async move {
                let outcome = subscriber.withdraw(&source).await;
                (id, source, outcome)
            },
        ))
        .await;
        let mut released = BTreeSet::new();
        for (id, source, outcome) in withdrawn {
            // A subscriber cannot be made to hold on to a source: whatever the
            // outcome, it no longer counts as holding it.
            if let Some(held) = self.held.get_mut(id) {
                held.remove(&source);
            }
            let cursor = match outcome {
                Ok(cursor) => cursor,
                Err(error) => {
                    tracing::error!(group = %self.group, subscriber = %id, %source, %error, "withdraw failed; releasing the source anyway");
                    None
                }
            };
            tracing::debug!(group = %self.group, subscriber = %id, %source, "withdrew");
            self.release(id, &source, cursor).await;
            released.insert((id, source));
        }
        // A source can be in handover from a subscriber that never held it: it
        // applied a later decision than the one that gave it the source, or its
        // accept failed. Nothing runs on it here, so it is released at once.
        if let Some(decision) = &target.decision {
            for (source, handover) in &decision.handovers {
                let Some((id, _)) = self.subscribers.get_key_value(&handover.from) else {
                    continue;
                };
                let holds = self.held.get(id).is_some_and(|held| held.contains(source));
                if !holds && !released.contains(&(id, source.clone())) {
                    self.release(id, source, None).await;
                }
            }
        }

        let accepted = join_all(acceptances.into_iter().map(
            |(id, subscriber, source)| async move {
                let outcome = subscriber.accept(&source).await;
                (id, source, outcome)
            },
        ))
        .await;
        let mut complete = true;
        for (id, source, outcome) in accepted {
            match outcome {
                Ok(()) => {
                    tracing::debug!(group = %self.group, subscriber = %id, %source, "accepted");
                    self.held.entry(id.clone()).or_default().insert(source);
                }
                Err(error) => {
                    tracing::warn!(group = %self.group, subscriber = %id, %source, %error, "accept failed; trying again");
                    complete = false;
                }
            }
        }
        let owned: usize = self.held.values().map(BTreeSet::len).sum();
        ::metrics::gauge!(metrics::SOURCES_OWNED, "group" => self.group.clone()).set(owned as f64);
        complete
    }
}
