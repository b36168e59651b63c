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
//! decision changes nothing either.
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
use std::sync::Arc;

use futures::future::join_all;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::BrokerSettings;
use super::membership::{Membership, MembershipStore, SubscriberKey};
use super::role::{BrokerStatus, RETRY_DELAY, Reporter};
use super::subscriber::{Grant, Subscriber, SubscriberSpec};
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
    status: Arc<Reporter>,
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

    fn grant(&self) -> Grant {
        self.decision
            .as_ref()
            .map(|decision| Grant::new(decision.epoch, decision.revision))
            .unwrap_or_default()
    }
}

/// The targets of every local group: the one place that decides which decision
/// each group's applier sees.
struct Targets {
    senders: BTreeMap<String, watch::Sender<Target>>,
}

impl Targets {
    /// A target per group, starting from the newest `retained` decision of each.
    fn new<'a>(groups: impl IntoIterator<Item = &'a String>, retained: Vec<Decision>) -> Self {
        let senders: BTreeMap<String, watch::Sender<Target>> = groups
            .into_iter()
            .map(|group| (group.clone(), watch::channel(Target::default()).0))
            .collect();
        let targets = Self { senders };
        for decision in retained {
            targets.offer(decision);
        }
        targets
    }

    fn receiver(&self, group: &str) -> Option<watch::Receiver<Target>> {
        self.senders.get(group).map(watch::Sender::subscribe)
    }

    /// Takes `decision` if its group is local and it is newer than the newest
    /// known; returns whether it was taken.
    fn offer(&self, decision: Decision) -> bool {
        let Some(target) = self.senders.get(decision.group.as_str()) else {
            return false;
        };
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
        })
    }

    fn fence(&self, fenced: bool) {
        for target in self.senders.values() {
            target.send_if_modified(|target| {
                let changed = target.fenced != fenced;
                target.fenced = fenced;
                changed
            });
        }
    }
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
        let targets = Targets::new(self.groups.keys(), retained);
        let stop_appliers = CancellationToken::new();
        let appliers = self.spawn_appliers(&targets, &stop_appliers);
        let mut heartbeat = tokio::time::interval(self.settings.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        heartbeat.reset();
        let mut fence = FenceClock::new(&self.settings, registered_at);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = heartbeat.tick() => self.heartbeat_and_unfence(&mut fence, &targets).await,
                () = tokio::time::sleep_until(fence.at), if !fence.fenced => {
                    fence.fenced = true;
                    tracing::error!(
                        node = %self.node,
                        "no heartbeat got through for most of a member timeout: withdrawing every source before the coordinator gives them away"
                    );
                    targets.fence(true);
                }
                message = subscription.next() => match message {
                    Some(BusMessage::Decision(decision)) => {
                        targets.offer(decision);
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

    fn spawn_appliers(&self, targets: &Targets, stop: &CancellationToken) -> JoinSet<()> {
        let mut appliers = JoinSet::new();
        for (group, subscribers) in &self.groups {
            let Some(receiver) = targets.receiver(group) else {
                continue;
            };
            let applier = GroupApplier {
                group: group.clone(),
                subscribers: subscribers.clone(),
                held: BTreeMap::new(),
                bus: Arc::clone(&self.bus),
                status: Arc::clone(&self.status),
            };
            appliers.spawn(applier.run(receiver, stop.clone()));
        }
        appliers
    }

    async fn heartbeat_and_unfence(&self, fence: &mut FenceClock, targets: &Targets) {
        let sent = Instant::now();
        if self.heartbeat().await && fence.heard(sent) {
            tracing::info!(node = %self.node, "heartbeats get through again: taking sources back up");
            targets.fence(false);
        }
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

/// What [`Observer::start`] hands to [`Observer::observe`].
struct Started {
    subscription: BusSubscription,
    /// When the registration that succeeded was sent.
    registered_at: Instant,
    /// The newest decision of every group, as the bus retained them at start.
    retained: Vec<Decision>,
}

/// Signals are hints: the coordinator also reads membership and times handovers
/// out, so a signal that cannot be published is logged, not retried.
async fn publish_signal(bus: &dyn AllocationBus, signal: Signal) {
    if let Err(error) = bus.publish(&BusMessage::Signal(signal.clone())).await {
        tracing::warn!(?signal, %error, "could not publish a signal");
    }
}

/// One change an applier makes: a subscriber (by id) and a source.
type Change<'a> = (&'a String, &'a Arc<dyn Subscriber>, Source);

/// Applies one group's decisions to its local subscribers.
struct GroupApplier {
    group: String,
    subscribers: BTreeMap<String, Arc<dyn Subscriber>>,
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

    /// What to withdraw and what to accept, as (subscriber id, source).
    fn plan(&self, target: &Target) -> (Vec<(String, Source)>, Vec<(String, Source)>) {
        let mut withdrawals = Vec::new();
        let mut acceptances = Vec::new();
        for id in self.subscribers.keys() {
            let wanted = target.sources_of(id);
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
                target
                    .sources_of(id)
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
    changes: Vec<(String, Source)>,
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

#[cfg(test)]
mod tests {
    //! The observer's state machine, driven on tokio's paused clock by a scripted
    //! bus (history replayed to each subscriber, then live messages) and a
    //! subscriber that records what it is told.

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use futures::StreamExt;
    use tokio::sync::mpsc;

    use super::*;
    use crate::broker::membership::{MemberRecord, MemoryMembershipStore, Registration};
    use crate::broker::subscriber::SubscriberError;
    use crate::bus::encode;

    const MINE: &str = "mine";
    const THEIRS: &str = "theirs";
    /// Far beyond anything the tests wait for; only a hang reaches it.
    const HANG_GUARD: Duration = Duration::from_secs(600);

    fn settings() -> BrokerSettings {
        BrokerSettings {
            heartbeat_interval: Duration::from_millis(100),
            member_timeout: Duration::from_secs(1),
            refresh_interval: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(1),
            handover_timeout: Duration::from_secs(5),
        }
    }

    fn orders() -> Source {
        "category:orders".parse().unwrap()
    }

    fn decision(epoch: u64, revision: u64, owner: &str) -> Decision {
        Decision {
            group: "g".into(),
            epoch,
            revision,
            coordinator: "c".into(),
            issued_at: chrono::Utc::now(),
            owners: [(owner.to_owned(), BTreeSet::from([orders()]))].into(),
            handovers: BTreeMap::new(),
        }
    }

    /// A bus whose subscriptions first replay `history`, one message per
    /// millisecond as a broker's log would deliver it, then what is published.
    struct ScriptedBus {
        retained: Vec<Decision>,
        history: Vec<Decision>,
        live: Mutex<Vec<mpsc::UnboundedSender<Vec<u8>>>>,
    }

    impl ScriptedBus {
        fn new(retained: Vec<Decision>, history: Vec<Decision>) -> Arc<Self> {
            Arc::new(Self {
                retained,
                history,
                live: Mutex::new(Vec::new()),
            })
        }

        fn send(&self, decision: Decision) {
            let payload = encode(&BusMessage::Decision(decision));
            for live in self.live.lock().unwrap().iter() {
                let _ = live.send(payload.clone());
            }
        }
    }

    #[async_trait]
    impl AllocationBus for ScriptedBus {
        async fn publish(&self, _: &BusMessage) -> crate::bus::Result<()> {
            Ok(())
        }

        async fn subscribe(&self) -> crate::bus::Result<BusSubscription> {
            let (sender, mut receiver) = mpsc::unbounded_channel();
            self.live.lock().unwrap().push(sender);
            let history: Vec<Vec<u8>> = self
                .history
                .iter()
                .map(|d| encode(&BusMessage::Decision(d.clone())))
                .collect();
            let replay = futures::stream::iter(history).then(|payload| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                payload
            });
            let live = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx));
            Ok(BusSubscription::new(
                replay.chain(live).boxed(),
                Arc::new(AtomicU64::new(0)),
            ))
        }

        async fn retained(&self) -> crate::bus::Result<Vec<Decision>> {
            Ok(self.retained.clone())
        }
    }

    /// Records every accept (with its grant) and withdraw; can be made to lose a
    /// source or to refuse accepts.
    #[derive(Default)]
    struct Recorder {
        accepted: Mutex<Vec<(Source, Grant)>>,
        withdrawn: Mutex<Vec<Source>>,
        lost: Mutex<Vec<Source>>,
        refuse: AtomicBool,
    }

    impl Recorder {
        fn accepted(&self) -> Vec<(Source, Grant)> {
            self.accepted.lock().unwrap().clone()
        }
        fn withdrawn(&self) -> usize {
            self.withdrawn.lock().unwrap().len()
        }
    }

    #[async_trait]
    impl Subscriber for Recorder {
        async fn accept(&self, source: &Source) -> Result<(), SubscriberError> {
            self.accept_granted(source, Grant::default()).await
        }
        async fn accept_granted(
            &self,
            source: &Source,
            grant: Grant,
        ) -> Result<(), SubscriberError> {
            if self.refuse.load(Ordering::SeqCst) {
                return Err(SubscriberError::new("refused by the test"));
            }
            self.accepted.lock().unwrap().push((source.clone(), grant));
            Ok(())
        }
        async fn withdraw(&self, source: &Source) -> Result<Option<Cursor>, SubscriberError> {
            self.withdrawn.lock().unwrap().push(source.clone());
            Ok(None)
        }
        fn take_lost(&self) -> Vec<Source> {
            std::mem::take(&mut *self.lost.lock().unwrap())
        }
    }

    /// A membership store whose heartbeats can be made to fail.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryMembershipStore,
        down: AtomicBool,
    }

    #[async_trait]
    impl MembershipStore for Flaky {
        async fn register(&self, r: &Registration) -> crate::store::Result<MemberRecord> {
            self.inner.register(r).await
        }
        async fn heartbeat(
            &self,
            node: &str,
            keys: &[SubscriberKey],
        ) -> crate::store::Result<Vec<SubscriberKey>> {
            if self.down.load(Ordering::SeqCst) {
                return Err(crate::store::Error::Unavailable("down by the test".into()));
            }
            self.inner.heartbeat(node, keys).await
        }
        async fn leave(&self, group: &str, subscriber: &str) -> crate::store::Result<bool> {
            self.inner.leave(group, subscriber).await
        }
        async fn live(&self, g: &str, t: Duration) -> crate::store::Result<Vec<MemberRecord>> {
            self.inner.live(g, t).await
        }
        async fn live_all(&self, t: Duration) -> crate::store::Result<Vec<MemberRecord>> {
            self.inner.live_all(t).await
        }
        async fn groups(&self) -> crate::store::Result<Vec<String>> {
            self.inner.groups().await
        }
        async fn purge(&self, older_than: Duration) -> crate::store::Result<u64> {
            self.inner.purge(older_than).await
        }
    }

    struct Running {
        recorder: Arc<Recorder>,
        status: watch::Receiver<BrokerStatus>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(bus: Arc<dyn AllocationBus>, membership: Arc<dyn MembershipStore>) -> Running {
        let recorder = Arc::new(Recorder::default());
        let mut observer = Observer::new("node@1", settings(), membership, bus);
        observer.add(
            SubscriberSpec::new("g", MINE, [orders()]),
            Arc::clone(&recorder) as Arc<dyn Subscriber>,
        );
        let status = observer.status();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(observer.run(cancel.clone()));
        Running {
            recorder,
            status,
            cancel,
            task,
        }
    }

    async fn until(mut done: impl FnMut() -> bool) {
        tokio::time::timeout(HANG_GUARD, async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the observer never got there");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_applies_only_the_newest_decision_however_long_the_history() {
        // The bus's history gives the source to this subscriber 2,000 times over;
        // the newest decision, which it retains, gives it to another.
        let newest = decision(1, 2_001, THEIRS);
        let mut history: Vec<Decision> = (1..=2_000).map(|r| decision(1, r, MINE)).collect();
        history.push(newest.clone());
        let bus = ScriptedBus::new(vec![newest], history);
        let node = start(bus.clone(), Arc::new(MemoryMembershipStore::new()));
        // Long enough for the whole history to be replayed and applied.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(node.recorder.accepted(), [], "an old decision was applied");

        // A decision newer than the retained one is applied, under its grant.
        bus.send(decision(1, 2_002, MINE));
        until(|| !node.recorder.accepted().is_empty()).await;
        assert_eq!(node.recorder.accepted(), [(orders(), Grant::new(1, 2_002))]);
        node.cancel.cancel();
        node.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_decision_not_newer_than_the_newest_changes_nothing() {
        let bus = ScriptedBus::new(vec![decision(2, 1, MINE)], Vec::new());
        let node = start(bus.clone(), Arc::new(MemoryMembershipStore::new()));
        until(|| !node.recorder.accepted().is_empty()).await;
        // A deposed coordinator's late decision, and a redelivery of the newest.
        bus.send(decision(1, 99, THEIRS));
        bus.send(decision(2, 1, THEIRS));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(node.recorder.accepted(), [(orders(), Grant::new(2, 1))]);
        assert_eq!(node.recorder.withdrawn(), 0);
        node.cancel.cancel();
        node.task.await.unwrap();
        assert_eq!(node.recorder.withdrawn(), 1, "withdrawn on stopping");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fenced_node_withdraws_and_takes_up_again_under_the_grant_it_knows() {
        let bus = ScriptedBus::new(vec![decision(1, 3, MINE)], Vec::new());
        let membership = Arc::new(Flaky::default());
        let node = start(bus.clone(), membership.clone());
        until(|| node.recorder.accepted().len() == 1).await;

        membership.down.store(true, Ordering::SeqCst);
        until(|| node.recorder.withdrawn() == 1).await;
        assert!(!node.status.borrow().is_healthy());

        membership.down.store(false, Ordering::SeqCst);
        until(|| node.recorder.accepted().len() == 2).await;
        // Accepted again under the decision it knew: a claim under it loses to
        // one under any decision that gave the source away meanwhile.
        assert_eq!(node.recorder.accepted()[1], (orders(), Grant::new(1, 3)));
        until(|| *node.status.borrow() == BrokerStatus::Running).await;
        node.cancel.cancel();
        node.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_source_makes_the_node_unready_until_it_is_accepted_again() {
        let bus = ScriptedBus::new(vec![decision(1, 1, MINE)], Vec::new());
        let node = start(bus.clone(), Arc::new(MemoryMembershipStore::new()));
        until(|| node.recorder.accepted().len() == 1).await;
        until(|| *node.status.borrow() == BrokerStatus::Running).await;

        // The subscriber's claim was taken, and accepting again fails for now.
        node.recorder.refuse.store(true, Ordering::SeqCst);
        node.recorder.lost.lock().unwrap().push(orders());
        until(|| matches!(*node.status.borrow(), BrokerStatus::Errored(_))).await;
        let BrokerStatus::Errored(reason) = node.status.borrow().clone() else {
            unreachable!()
        };
        assert!(reason.contains("category:orders"), "{reason}");

        node.recorder.refuse.store(false, Ordering::SeqCst);
        until(|| node.recorder.accepted().len() == 2).await;
        until(|| *node.status.borrow() == BrokerStatus::Running).await;
        assert_eq!(node.recorder.accepted()[1], (orders(), Grant::new(1, 1)));
        node.cancel.cancel();
        node.task.await.unwrap();
    }
}
