//! The observer: keeps this node's subscribers registered and heartbeating, reads
//! decisions from the bus and tells each local subscriber which sources to accept
//! and which to withdraw.
//!
//! Only the newest decision of each group is ever applied. On start the observer
//! subscribes, then reads what the bus retains (the newest decision of every
//! group) and applies that; after it, a decision counts only if it is newer, by
//! `(epoch, revision)`, than the newest known. A bus that replays its history to a
//! new subscriber (Kafka reads the topic from the beginning) therefore changes
//! nothing, however many old decisions it holds, and a deposed coordinator's late
//! decision changes nothing either. When the coordinator's digest names a decision
//! this node does not hold (it missed a change, or holds another decision of that
//! version), or a change arrives to a decision it does not hold, the observer
//! fetches what the bus retains in the background and takes it like any other.
//!
//! Each group is applied by a task of its own, so a subscriber slow to withdraw
//! holds up only its group; within a group every withdraw finishes before any
//! accept starts, and `released` is published for a source only once its withdraw
//! has returned, which is what makes a handover safe. Sources are accepted under
//! the decision's [`Grant`], so that a claim made for a decision the fleet has
//! moved past is refused by whatever the subscriber claims.
//!
//! A node that cannot heartbeat for a whole member timeout must assume the
//! coordinator counts it dead and gives its sources away, so it withdraws them
//! itself; it takes them up again once its heartbeats get through, under the
//! grant of the decision it knows, which loses to the grant of any decision that
//! gave them away meanwhile.
//!
//! A subscriber that loses a source on its own (its claim taken) reports it
//! through [`Subscriber::take_lost`]; the applier accepts it again while the
//! newest decision still gives it. While a source the node owns is consumed by
//! nobody, the observer reports itself errored, which makes the node not ready.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::future::join_all;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use self::lacking::Lacking;
use self::targets::{Target, Targets, take_fetched};
use super::BrokerSettings;
use super::membership::{Membership, MembershipStore, SubscriberKey};
use super::role::{BrokerStatus, RETRY_DELAY, Reporter};
use super::subscriber::{Grant, Subscriber, SubscriberSpec};
use crate::bus::{AllocationBus, BusMessage, BusSubscription, Decision, Digest, Signal};
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
    /// Group to the sources each local subscriber asks for, by subscriber id.
    asks: BTreeMap<String, BTreeMap<String, BTreeSet<Source>>>,
    status: Arc<Reporter>,
}

/// When the node must fence itself: a member timeout, less one heartbeat interval,
/// after the last heartbeat that got through was sent.
struct FenceClock {
    after: std::time::Duration,
    at: Instant,
    fenced: bool,
}

impl FenceClock {
    fn new(settings: &BrokerSettings, registered_at: Instant) -> Self {
        // The registry stamps a heartbeat at some moment after it was sent, so the
        // coordinator counts this node dead no earlier than a member timeout after
        // the last successful send. Fencing one interval before that leaves the
        // coordinator's tick no chance to give a source away first.
        let after = settings
            .member_timeout
            .saturating_sub(settings.heartbeat_interval);
        Self {
            after,
            at: registered_at + after,
            fenced: false,
        }
    }

    /// A heartbeat sent at `sent` got through; returns whether that unfenced.
    fn heard(&mut self, sent: Instant) -> bool {
        self.at = sent + self.after;
        std::mem::replace(&mut self.fenced, false)
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
            status: Arc::new(Reporter::new(&node)),
            node,
            settings,
            bus,
            groups: BTreeMap::new(),
            asks: BTreeMap::new(),
        }
    }

    /// Adds a local subscriber. The caller has checked that its id is new.
    pub fn add(&mut self, spec: SubscriberSpec, subscriber: Arc<dyn Subscriber>) {
        self.asks
            .entry(spec.group.clone())
            .or_default()
            .insert(spec.id.clone(), spec.sources.clone());
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
        if let Some(started) = self.start(&cancel).await {
            self.observe(started, &cancel).await;
        }
        self.status.set(BrokerStatus::Stopped);
    }

    /// Registers every subscriber, subscribes to the bus, reads the decisions it
    /// retains and announces the subscribers. `None` if cancelled first.
    async fn start(&self, cancel: &CancellationToken) -> Option<Started> {
        let registered_at = self
            .status
            .retry(cancel, "cannot register subscribers", || async {
                let sent = Instant::now();
                self.membership.register_all().await.map(|()| sent)
            })
            .await?;
        // Subscribed before reading what is retained, so that a decision published
        // in between arrives on the subscription.
        let subscription = self.subscribe(cancel).await?;
        let retained = self
            .status
            .retry(cancel, "cannot read the retained decisions", || {
                self.bus.retained()
            })
            .await?;
        for key in self.keys() {
            self.signal_joined(&key).await;
        }
        self.status.set(BrokerStatus::Running);
        Some(Started {
            subscription,
            registered_at,
            retained,
        })
    }

    async fn subscribe(&self, cancel: &CancellationToken) -> Option<BusSubscription> {
        self.status
            .retry(cancel, "cannot subscribe to the allocation bus", || {
                self.bus.subscribe()
            })
            .await
    }

    /// Applies the newest decisions until `cancel`, fencing the node while its
    /// heartbeats do not get through; then withdraws everything and leaves.
    async fn observe(&self, started: Started, cancel: &CancellationToken) {
        let Started {
            mut subscription,
            registered_at,
            retained,
        } = started;
        let mut targets = Targets::new(self.groups.keys(), retained);
        let patience = self.settings.refresh_interval;
        let mut lacking = Lacking::new(&self.node, patience, Arc::clone(&self.status));
        // At most one fetch of the retained decisions at a time.
        let mut fetches: JoinSet<crate::bus::Result<Vec<Decision>>> = JoinSet::new();
        let stop_appliers = CancellationToken::new();
        let appliers = self.spawn_appliers(&targets, &stop_appliers);
        let mut heartbeat = tokio::time::interval(self.settings.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        heartbeat.reset();
        let mut fence = FenceClock::new(&self.settings, registered_at);
        // The heartbeat under way, if any. It runs beside the loop rather than in
        // it, so that decisions and the fence clock are served meanwhile and a
        // heartbeat slower than its interval (a store just back, reconnecting
        // under load) still counts from when it was sent instead of being cut off.
        let mut beating: Option<Heartbeat<'_>> = None;
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                _ = heartbeat.tick(), if beating.is_none() => {
                    let sent = Instant::now();
                    beating = Some(Box::pin(async move { (sent, self.heartbeat().await) }));
                }
                (sent, beat) = async {
                    match beating.as_mut() {
                        Some(beat) => beat.await,
                        None => std::future::pending().await,
                    }
                }, if beating.is_some() => {
                    beating = None;
                    self.take_beat(beat, sent, &mut fence, &targets);
                }
                () = tokio::time::sleep_until(fence.at), if !fence.fenced => {
                    fence.fenced = true;
                    tracing::error!(
                        node = %self.node,
                        "no heartbeat got through for most of a member timeout: withdrawing every source before the coordinator gives them away"
                    );
                    targets.fence(true);
                }
                () = sleep_until_some(lacking.deadline()) => lacking.report_overdue(Instant::now()),
                Some(fetched) = fetches.join_next(), if !fetches.is_empty() => {
                    if take_fetched(fetched, &mut subscription, &targets, &mut lacking) {
                        // What the bus retains does not give it: the coordinator
                        // writes it whole.
                        for request in lacking.requests() {
                            publish_signal(self.bus.as_ref(), request).await;
                        }
                    }
                }
                message = subscription.next() => match message {
                    Some(BusMessage::Decision(decision)) => {
                        let group = decision.group.clone();
                        targets.offer(decision);
                        if let Some(current) = targets.current(&group) {
                            lacking.held(&current);
                        }
                    }
                    Some(BusMessage::Digest(digest)) => {
                        self.compare(&digest, &mut targets, &mut lacking, &mut fetches);
                    }
                    Some(BusMessage::Signal(_)) => {}
                    None => match self.subscribe(cancel).await {
                        Some(fresh) => subscription = fresh,
                        None => break,
                    },
                },
            }
        }
        self.leave(appliers, stop_appliers).await;
    }

    /// Compares the coordinator's `digest` with what this node holds, and
    /// fetches what the bus retains if it lacks the decision named.
    fn compare(
        &self,
        digest: &Digest,
        targets: &mut Targets,
        lacking: &mut Lacking,
        fetches: &mut JoinSet<crate::bus::Result<Vec<Decision>>>,
    ) {
        if !targets.lacks(digest) {
            if let Some(current) = targets.current(&digest.group) {
                lacking.held(&current);
            }
            return;
        }
        lacking.note(digest, Instant::now());
        if fetches.is_empty() {
            tracing::info!(group = %digest.group, epoch = digest.epoch, revision = digest.revision, "this node lacks the coordinator's newest decision; fetching it from the bus");
            let bus = Arc::clone(&self.bus);
            crate::ambient::spawn_into(fetches, async move { bus.retained().await });
        }
    }

    fn spawn_appliers(&self, targets: &Targets, stop: &CancellationToken) -> JoinSet<()> {
        let mut appliers = JoinSet::new();
        for (group, subscribers) in &self.groups {
            let Some(receiver) = targets.receiver(group) else {
                continue;
            };
            let applier = GroupApplier {
                group: group.clone(),
                subscribers: subscribers.clone(),
                asks: self.asks.get(group).cloned().unwrap_or_default(),
                held: BTreeMap::new(),
                bus: Arc::clone(&self.bus),
                status: Arc::clone(&self.status),
            };
            crate::ambient::spawn_into(&mut appliers, applier.run(receiver, stop.clone()));
        }
        appliers
    }

    /// Withdraws and releases every source, then removes the registrations and
    /// says the subscribers leave.
    async fn leave(&self, mut appliers: JoinSet<()>, stop_appliers: CancellationToken) {
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

    /// Fences or unfences the node after a heartbeat sent at `sent`.
    fn take_beat(&self, beat: Beat, sent: Instant, fence: &mut FenceClock, targets: &Targets) {
        match beat {
            Beat::Heard if fence.heard(sent) => {
                tracing::info!(node = %self.node, "heartbeats get through again: taking sources back up");
                targets.fence(false);
            }
            // Certain, unlike a heartbeat that did not get through: withdrawing
            // at once ends two processes taking one source from each other.
            Beat::Taken if !fence.fenced => {
                fence.fenced = true;
                tracing::error!(node = %self.node, "another process of this node holds its subscribers' records: withdrawing every source at once");
                targets.fence(true);
            }
            Beat::Heard | Beat::Taken | Beat::Failed => {}
        }
    }

    /// Heartbeats every subscriber and announces those registered again.
    async fn heartbeat(&self) -> Beat {
        // Bounded, so that a registry that stops answering is reported; past a
        // member timeout a heartbeat could not keep the node alive anyway.
        let heartbeat = self.membership.heartbeat_once(self.settings.member_timeout);
        match tokio::time::timeout(self.settings.member_timeout, heartbeat).await {
            Err(_) => {
                self.status
                    .error("heartbeat timed out: the membership store does not answer".to_owned());
                Beat::Failed
            }
            Ok(Ok(registered_again)) => {
                for key in registered_again {
                    self.signal_joined(&key).await;
                }
                self.status.set(BrokerStatus::Running);
                Beat::Heard
            }
            Ok(Err(error)) => {
                let taken = matches!(error, crate::store::Error::MemberTaken { .. });
                self.status
                    .error(format!("cannot heartbeat subscribers: {error}"));
                if taken { Beat::Taken } else { Beat::Failed }
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

/// A heartbeat under way: when it was sent, and whether it got through.
type Heartbeat<'a> = Pin<Box<dyn Future<Output = (Instant, Beat)> + Send + 'a>>;

/// How a heartbeat went.
enum Beat {
    Heard,
    /// The store did not answer, or failed.
    Failed,
    /// Another process of this node holds the records (and lives).
    Taken,
}

/// What [`Observer::start`] hands to [`Observer::observe`].
struct Started {
    subscription: BusSubscription,
    /// When the registration that succeeded was sent.
    registered_at: Instant,
    /// The newest decision of every group, as the bus retained them at start.
    retained: Vec<Decision>,
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Signals are hints: the coordinator also reads membership and times handovers
/// out, so a signal that cannot be published is logged, not retried.
async fn publish_signal(bus: &dyn AllocationBus, signal: Signal) {
    if let Err(error) = bus.publish(&BusMessage::Signal(signal.clone())).await {
        tracing::warn!(?signal, %error, "could not publish a signal");
    }
}

/// Changes an applier plans: (subscriber id, source).
type Planned = Vec<(String, Source)>;

/// One change an applier makes: a subscriber (by id) and a source.
type Change<'a> = (&'a String, &'a Arc<dyn Subscriber>, Source);

/// Applies one group's decisions to its local subscribers.
struct GroupApplier {
    group: String,
    subscribers: BTreeMap<String, Arc<dyn Subscriber>>,
    /// The sources each subscriber asks for. A decision may give it others: one
    /// made before its sources changed (a new partition count), read back from the
    /// bus when the node starts. Those it never takes: their checkpoints belong to
    /// another layout, and the coordinator's next decision gives the sources asked
    /// for.
    asks: BTreeMap<String, BTreeSet<Source>>,
    /// What each subscriber holds now.
    held: BTreeMap<String, BTreeSet<Source>>,
    bus: Arc<dyn AllocationBus>,
    status: Arc<Reporter>,
}

impl GroupApplier {
    /// Applies the newest target whenever it changes, until `stop`; then
    /// withdraws everything.
    async fn run(mut self, mut targets: watch::Receiver<Target>, stop: CancellationToken) {
        // How often subscribers are asked for sources they lost on their own.
        let mut recheck = tokio::time::interval(RETRY_DELAY);
        recheck.set_missed_tick_behavior(MissedTickBehavior::Delay);
        recheck.reset();
        let mut target = targets.borrow_and_update().clone();
        let mut complete = self.apply(&target).await;
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                changed = targets.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    target = targets.borrow_and_update().clone();
                }
                // A failed accept is tried again even if no new decision comes, and
                // so is a source a subscriber lost.
                _ = recheck.tick() => {
                    if !self.forget_lost() && complete {
                        continue;
                    }
                }
            }
            complete = self.apply(&target).await;
        }
        self.apply(&Target::default()).await;
        self.status.problem(&self.problem_key(), None);
    }

    fn problem_key(&self) -> String {
        format!("group {}", self.group)
    }

    /// Stops counting as held what subscribers lost on their own; returns whether
    /// anything was lost.
    fn forget_lost(&mut self) -> bool {
        let mut any = false;
        for (id, subscriber) in &self.subscribers {
            for source in subscriber.take_lost() {
                tracing::warn!(group = %self.group, subscriber = %id, %source, "the subscriber lost the source; accepting it again while the decision gives it");
                if let Some(held) = self.held.get_mut(id) {
                    held.remove(&source);
                }
                any = true;
            }
        }
        any
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
    /// whether every source it gives is held.
    async fn apply(&mut self, target: &Target) -> bool {
        let paused = target.decision.as_ref().is_some_and(|d| d.paused);
        for subscriber in self.subscribers.values() {
            subscriber.pause(paused);
        }
        ::metrics::gauge!(metrics::GROUP_PAUSED, "group" => self.group.clone()).set(if paused {
            1.0
        } else {
            0.0
        });
        let (withdrawals, acceptances) = self.plan(target);
        let subscribers = self.subscribers.clone();
        let released = self
            .withdraw(with_subscribers(&subscribers, withdrawals))
            .await;
        self.release_unheld_handovers(target, &released).await;
        let acceptances = with_subscribers(&subscribers, acceptances);
        self.accept(acceptances, target.grant()).await;
        let owned: usize = self.held.values().map(BTreeSet::len).sum();
        ::metrics::gauge!(metrics::SOURCES_OWNED, "group" => self.group.clone()).set(owned as f64);
        self.report_unconsumed(target)
    }

    /// The sources `target` gives subscriber `id` that it asks for.
    fn given(&self, target: &Target, id: &str) -> BTreeSet<Source> {
        let asks = self.asks.get(id);
        let mut given = target.sources_of(id);
        given.retain(|source| asks.is_some_and(|asks| asks.contains(source)));
        given
    }

    /// What to withdraw and what to accept, as (subscriber id, source).
    fn plan(&self, target: &Target) -> (Planned, Planned) {
        let mut withdrawals = Vec::new();
        let mut acceptances = Vec::new();
        for id in self.subscribers.keys() {
            let wanted = self.given(target, id);
            let held = self.held.get(id);
            for source in held.into_iter().flatten() {
                if !wanted.contains(source) {
                    withdrawals.push((id.clone(), source.clone()));
                }
            }
            for source in wanted {
                if !held.is_some_and(|held| held.contains(&source)) {
                    acceptances.push((id.clone(), source));
                }
            }
        }
        (withdrawals, acceptances)
    }

    /// Withdraws every change at once and releases each source once its withdraw
    /// returned. Returns what was released.
    async fn withdraw(&mut self, withdrawals: Vec<Change<'_>>) -> BTreeSet<(String, Source)> {
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
            let cursor = outcome.unwrap_or_else(|error| {
                tracing::error!(group = %self.group, subscriber = %id, %source, %error, "withdraw failed; releasing the source anyway");
                None
            });
            tracing::debug!(group = %self.group, subscriber = %id, %source, "withdrew");
            self.release(id, &source, cursor).await;
            released.insert((id.clone(), source));
        }
        released
    }

    /// A source can be in handover from a subscriber that never held it: it
    /// applied a later decision than the one that gave it the source, or its
    /// accept failed. Nothing runs on it here, so it is released at once.
    async fn release_unheld_handovers(
        &self,
        target: &Target,
        released: &BTreeSet<(String, Source)>,
    ) {
        let Some(decision) = &target.decision else {
            return;
        };
        for (source, handover) in &decision.handovers {
            let Some((id, _)) = self.subscribers.get_key_value(&handover.from) else {
                continue;
            };
            let holds = self.held.get(id).is_some_and(|held| held.contains(source));
            if !holds && !released.contains(&(id.clone(), source.clone())) {
                self.release(id, source, None).await;
            }
        }
    }

    /// Accepts every change at once under `grant`, counting what succeeded as held.
    async fn accept(&mut self, acceptances: Vec<Change<'_>>, grant: Grant) {
        let accepted = join_all(acceptances.into_iter().map(
            |(id, subscriber, source)| async move {
                let outcome = subscriber.accept_granted(&source, grant).await;
                (id, source, outcome)
            },
        ))
        .await;
        for (id, source, outcome) in accepted {
            match outcome {
                Ok(()) => {
                    tracing::debug!(group = %self.group, subscriber = %id, %source, %grant, "accepted");
                    self.held.entry(id.clone()).or_default().insert(source);
                }
                Err(error) => {
                    tracing::warn!(group = %self.group, subscriber = %id, %source, %error, "accept failed; trying again");
                }
            }
        }
    }

    /// Reports the sources the target gives this node that nobody holds (their
    /// accept failed, or they were lost), or clears the report. Returns whether
    /// every source is held.
    fn report_unconsumed(&self, target: &Target) -> bool {
        let unconsumed: Vec<String> = self
            .subscribers
            .keys()
            .flat_map(|id| {
                let held = self.held.get(id);
                self.given(target, id)
                    .into_iter()
                    .filter(move |source| !held.is_some_and(|held| held.contains(source)))
                    .map(move |source| format!("{id}: {source}"))
            })
            .collect();
        let problem = (!unconsumed.is_empty()).then(|| {
            format!(
                "group {} has sources this node owns but does not consume ({}); trying again",
                self.group,
                unconsumed.join(", ")
            )
        });
        let complete = problem.is_none();
        self.status.problem(&self.problem_key(), problem);
        complete
    }
}

/// Pairs each (subscriber id, source) with the subscriber.
fn with_subscribers(
    subscribers: &BTreeMap<String, Arc<dyn Subscriber>>,
    changes: Planned,
) -> Vec<Change<'_>> {
    changes
        .into_iter()
        .filter_map(|(id, source)| {
            subscribers
                .get_key_value(&id)
                .map(|(id, subscriber)| (id, subscriber, source))
        })
        .collect()
}

mod lacking;
mod targets;
#[cfg(test)]
mod tests;
