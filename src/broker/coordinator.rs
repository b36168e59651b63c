//! The coordinator: while its node holds the leadership lease, it reads membership,
//! decides every group's allocation with [`allocate`] and publishes each decision on
//! the bus, stamped with the lease's epoch and a revision that grows with every
//! decision of the group.
//!
//! It decides again at once when a subscriber signals that it joined, is leaving or
//! released a source; on every membership tick (the heartbeat interval), which is how
//! dead members are noticed; and it republishes every decision each refresh interval
//! so that an observer that missed one converges. A source in handover goes to its
//! new owner once the old owner has released it, has died, or the handover timeout
//! has passed.
//!
//! On promotion it starts from the decisions the bus retains, so a change of leader
//! moves nothing. It stops deciding the moment the lease is lost, and also when a
//! decision of a newer epoch shows that another node leads.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::BrokerSettings;
use super::lease::LeaderState;
use super::membership::{MemberRecord, MembershipStore};
use super::role::{BrokerStatus, RETRY_DELAY, Reporter};
use crate::allocation::{Allocation, AllocationInput, Handover, Member, allocate};
use crate::bus::{AllocationBus, BusMessage, BusSubscription, Decision, Signal};
use crate::event::Source;
use crate::metrics;

/// Records silent for this many member timeouts are deleted from the registry.
/// Long after they stopped counting, so a node back from a short partition finds
/// its records still there; and a node whose records were purged registers again.
const PURGE_AFTER_MEMBER_TIMEOUTS: u32 = 10;

/// Decides allocations while its node leads. Build it, take [`Coordinator::status`],
/// then spawn [`Coordinator::run`] with the node's leadership state.
pub struct Coordinator {
    node: String,
    settings: BrokerSettings,
    membership: Arc<dyn MembershipStore>,
    bus: Arc<dyn AllocationBus>,
    required_tags: BTreeMap<String, BTreeSet<String>>,
    status: Reporter,
}

/// Why a term as leader ended.
enum TermEnd {
    Cancelled,
    /// The lease was lost, or another node showed a newer epoch.
    Deposed,
}

impl Coordinator {
    pub fn new(
        node: impl Into<String>,
        settings: BrokerSettings,
        membership: Arc<dyn MembershipStore>,
        bus: Arc<dyn AllocationBus>,
    ) -> Self {
        let node = node.into();
        Self {
            status: Reporter::new(&node),
            node,
            settings,
            membership,
            bus,
            required_tags: BTreeMap::new(),
        }
    }

    /// Placement tags a subscriber of `group` must carry to own any of its sources.
    #[must_use]
    pub fn with_required_tags(mut self, required_tags: BTreeMap<String, BTreeSet<String>>) -> Self {
        self.required_tags = required_tags;
        self
    }

    /// `Waiting` while another node leads, `Running` while this one does.
    pub fn status(&self) -> watch::Receiver<BrokerStatus> {
        self.status.subscribe()
    }

    /// Runs until `cancel` is cancelled or `leader`'s sender is dropped, deciding
    /// whenever `leader` says this node leads.
    pub async fn run(self, mut leader: watch::Receiver<LeaderState>, cancel: CancellationToken) {
        if let Some(mut subscription) = self.subscribe(&cancel).await {
            let mut following = Following::default();
            let mut previous: Option<Term> = None;
            while let Some(epoch) = self
                .await_leadership(&mut leader, &mut subscription, &mut following, &cancel)
                .await
            {
                tracing::info!(node = %self.node, epoch, "coordinating");
                let term = match previous.take() {
                    // The lease came back under the same epoch (a renewal failed and
                    // this node acquired it again before it expired). Nobody else
                    // decided meanwhile, so the term goes on where it stopped and its
                    // revisions keep counting up.
                    Some(term) if term.epoch == epoch => term,
                    _ => match self.begin_term(epoch, &mut leader, &cancel).await {
                        Ok(term) => term,
                        Err(TermEnd::Cancelled) => break,
                        Err(TermEnd::Deposed) => continue,
                    },
                };
                let (end, term) = self
                    .lead(
                        term,
                        &mut following,
                        &mut leader,
                        &mut subscription,
                        &cancel,
                    )
                    .await;
                // Only the leader counts a group's subscribers; a former leader's
                // count would go stale.
                for group in term.groups.keys() {
                    ::metrics::gauge!(metrics::GROUP_SUBSCRIBERS, "group" => group.clone())
                        .set(0.0);
                }
                previous = Some(term);
                match end {
                    TermEnd::Cancelled => break,
                    TermEnd::Deposed => {
                        tracing::info!(node = %self.node, epoch, "stopped coordinating");
                    }
                }
            }
        }
        self.status.set(BrokerStatus::Stopped);
    }

    /// Waits until this node leads under an epoch newer than any other node has
    /// shown, keeping track of the fleet meanwhile; `None` once cancelled.
    async fn await_leadership(
        &self,
        leader: &mut watch::Receiver<LeaderState>,
        subscription: &mut BusSubscription,
        following: &mut Following,
        cancel: &CancellationToken,
    ) -> Option<u64> {
        self.status.set(BrokerStatus::Waiting);
        loop {
            if let LeaderState::Leader { epoch } = *leader.borrow_and_update() {
                if epoch > following.newest_epoch {
                    return Some(epoch);
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return None,
                changed = leader.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                message = subscription.next() => match message {
                    Some(message) => following.note(&self.node, message),
                    None => *subscription = self.subscribe(cancel).await?,
                },
            }
        }
    }

    /// A new term under `epoch`, starting from the decisions the bus retains.
    async fn begin_term(
        &self,
        epoch: u64,
        leader: &mut watch::Receiver<LeaderState>,
        cancel: &CancellationToken,
    ) -> Result<Term, TermEnd> {
        loop {
            match self.bus.retained().await {
                Ok(decisions) => return Ok(Term::new(epoch, decisions)),
                Err(error) => {
                    self.status
                        .error(format!("cannot read the retained decisions: {error}"));
                    tokio::select! {
                        () = cancel.cancelled() => return Err(TermEnd::Cancelled),
                        changed = leader.changed() => {
                            let still_leading = *leader.borrow_and_update() == LeaderState::Leader { epoch };
                            if changed.is_err() || !still_leading {
                                return Err(TermEnd::Deposed);
                            }
                        }
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                    }
                }
            }
        }
    }

    /// Leads for as long as `term`'s epoch holds the lease. Returns why it ended,
    /// and the term, which goes on should the lease come back under that epoch.
    async fn lead(
        &self,
        mut term: Term,
        following: &mut Following,
        leader: &mut watch::Receiver<LeaderState>,
        subscription: &mut BusSubscription,
        cancel: &CancellationToken,
    ) -> (TermEnd, Term) {
        let epoch = term.epoch;
        let still_leading = |state: &LeaderState| *state == LeaderState::Leader { epoch };
        for release in std::mem::take(&mut following.releases) {
            term.note(release);
        }
        self.status.set(BrokerStatus::Running);
        self.decide_all(&mut term).await;

        let mut tick = tokio::time::interval(self.settings.heartbeat_interval);
        let mut refresh = tokio::time::interval(self.settings.refresh_interval);
        for timer in [&mut tick, &mut refresh] {
            timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
            timer.reset();
        }
        loop {
            tokio::select! {
                // Losing the lease is noticed before anything else is decided.
                biased;
                () = cancel.cancelled() => return (TermEnd::Cancelled, term),
                changed = leader.changed() => {
                    if changed.is_err() || !still_leading(&leader.borrow_and_update()) {
                        return (TermEnd::Deposed, term);
                    }
                }
                message = subscription.next() => {
                    let Some(message) = message else {
                        match self.subscribe(cancel).await {
                            Some(fresh) => *subscription = fresh,
                            None => return (TermEnd::Cancelled, term),
                        }
                        continue;
                    };
                    // A burst of signals (a node starting with many subscribers) is
                    // decided in one go.
                    let mut dirty = BTreeSet::new();
                    let mut next = Some(message);
                    while let Some(message) = next {
                        match message {
                            BusMessage::Decision(decision) if decision.epoch > epoch => {
                                tracing::warn!(
                                    node = %self.node, epoch, newer = decision.epoch,
                                    coordinator = %decision.coordinator,
                                    "another node decides under a newer epoch; stepping down"
                                );
                                following.newest_epoch = following.newest_epoch.max(decision.epoch);
                                return (TermEnd::Deposed, term);
                            }
                            BusMessage::Decision(_) => {}
                            BusMessage::Signal(signal) => {
                                dirty.insert(signal.group().to_owned());
                                term.note(signal);
                            }
                        }
                        next = subscription.next().now_or_never().flatten();
                    }
                    match dirty.len() {
                        0 => {}
                        1 => {
                            let group = dirty.pop_first().unwrap_or_default();
                            self.decide_group(&mut term, &group).await;
                        }
                        _ => self.decide_all(&mut term).await,
                    }
                }
                _ = tick.tick() => self.decide_all(&mut term).await,
                _ = refresh.tick() => {
                    self.republish(&mut term).await;
                    self.purge().await;
                }
            }
        }
    }

    /// Decides every group that has live members or a decision, from one read of
    /// the registry, and publishes what changed.
    async fn decide_all(&self, term: &mut Term) {
        let records = match self.membership.live_all(self.settings.member_timeout).await {
            Ok(records) => records,
            Err(error) => {
                self.status
                    .error(format!("cannot read membership: {error}"));
                return;
            }
        };
        let mut by_group: BTreeMap<String, Vec<MemberRecord>> = BTreeMap::new();
        for record in records {
            by_group
                .entry(record.group.clone())
                .or_default()
                .push(record);
        }
        for group in term.groups.keys() {
            by_group.entry(group.clone()).or_default();
        }
        for (group, records) in by_group {
            self.decide(term, &group, &records).await;
        }
        self.publish_pending(term).await;
        self.status.set(BrokerStatus::Running);
    }

    async fn decide_group(&self, term: &mut Term, group: &str) {
        match self
            .membership
            .live(group, self.settings.member_timeout)
            .await
        {
            Ok(records) => {
                self.decide(term, group, &records).await;
                self.status.set(BrokerStatus::Running);
            }
            Err(error) => self
                .status
                .error(format!("cannot read membership: {error}")),
        }
    }

    /// Decides `group` from its live `records`; publishes if the decision changed or
    /// is the first of this term.
    async fn decide(&self, term: &mut Term, group: &str, records: &[MemberRecord]) {
        let now = Instant::now();
        let no_tags = BTreeSet::new();
        let required_tags = self.required_tags.get(group).unwrap_or(&no_tags);
        let members = members_of(records);
        let state = term.groups.entry(group.to_owned()).or_default();
        let current = state
            .decision
            .as_ref()
            .map(Decision::allocation)
            .unwrap_or_default();
        let released = state.ready_handovers(&current, now, self.settings.handover_timeout);
        let next = allocate(&AllocationInput {
            members: &members,
            required_tags,
            current: &current,
            released: &released,
        });
        ::metrics::gauge!(metrics::GROUP_SUBSCRIBERS, "group" => group.to_owned())
            .set(records.len() as f64);
        if state.revision > 0 && next == current {
            return;
        }
        state.measure(group, &current, &next, now);
        state.track_handovers(&next, now);
        state.revision += 1;
        let decision =
            Decision::from_allocation(group, term.epoch, state.revision, &self.node, &next);
        tracing::debug!(
            group,
            epoch = term.epoch,
            revision = state.revision,
            owners = decision.owners.len(),
            handovers = decision.handovers.len(),
            "decided"
        );
        metrics::decision_seen(group, term.epoch, state.revision);
        state.decision = Some(decision);
        state.unpublished = true;
        self.publish_pending_group(term, group).await;
    }

    async fn publish_pending_group(&self, term: &mut Term, group: &str) {
        let Some(state) = term.groups.get_mut(group) else {
            return;
        };
        let Some(decision) = state.decision.as_ref().filter(|_| state.unpublished) else {
            return;
        };
        match self
            .bus
            .publish(&BusMessage::Decision(decision.clone()))
            .await
        {
            // A group's state is kept even when nobody is in it any more: should
            // it come back, its revisions must go on counting up.
            Ok(()) => state.unpublished = false,
            Err(error) => {
                tracing::warn!(group, %error, "could not publish a decision; trying again at the next tick");
            }
        }
    }

    /// Publishes the decisions whose publication failed.
    async fn publish_pending(&self, term: &mut Term) {
        let pending: Vec<String> = term
            .groups
            .iter()
            .filter(|(_, state)| state.unpublished)
            .map(|(group, _)| group.clone())
            .collect();
        for group in pending {
            self.publish_pending_group(term, &group).await;
        }
    }

    /// Publishes every group's current decision again.
    async fn republish(&self, term: &mut Term) {
        for state in term.groups.values_mut() {
            state.unpublished |= state.decision.is_some();
        }
        self.publish_pending(term).await;
    }

    async fn purge(&self) {
        let older_than = self.settings.member_timeout * PURGE_AFTER_MEMBER_TIMEOUTS;
        match self.membership.purge(older_than).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "purged long-dead member records"),
            Err(error) => tracing::warn!(%error, "could not purge dead member records"),
        }
    }

    /// Subscribes to the bus, trying again until it answers; `None` once cancelled.
    async fn subscribe(&self, cancel: &CancellationToken) -> Option<BusSubscription> {
        self.status
            .retry(cancel, "cannot subscribe to the allocation bus", || {
                self.bus.subscribe()
            })
            .await
    }
}

/// What a coordinator keeps track of while another node leads.
#[derive(Default)]
struct Following {
    /// The newest epoch seen on another node's decision: a lease of this epoch or
    /// an older one is already lost, whatever this node last heard.
    newest_epoch: u64,
    /// Per group, the handovers of the newest decision seen.
    handovers: HashMap<String, BTreeMap<Source, Handover>>,
    /// `released` signals for those handovers, so that a newly promoted
    /// coordinator completes them at once instead of waiting for them to time out.
    releases: Vec<Signal>,
}

impl Following {
    fn note(&mut self, node: &str, message: BusMessage) {
        match message {
            BusMessage::Decision(decision) => {
                metrics::decision_seen(&decision.group, decision.epoch, decision.revision);
                if decision.coordinator != node {
                    self.newest_epoch = self.newest_epoch.max(decision.epoch);
                }
                self.handovers
                    .insert(decision.group.clone(), decision.handovers);
                let handovers = &self.handovers;
                self.releases
                    .retain(|signal| Self::is_pending(handovers, signal));
            }
            BusMessage::Signal(signal) => {
                if Self::is_pending(&self.handovers, &signal) {
                    self.releases.push(signal);
                }
            }
        }
    }

    /// Whether `signal` releases a source that is in handover from its sender.
    fn is_pending(
        handovers: &HashMap<String, BTreeMap<Source, Handover>>,
        signal: &Signal,
    ) -> bool {
        let Signal::Released {
            group,
            subscriber,
            source,
            ..
        } = signal
        else {
            return false;
        };
        handovers
            .get(group)
            .and_then(|handovers| handovers.get(source))
            .is_some_and(|handover| handover.from == *subscriber)
    }
}

/// What a coordinator knows during one term as leader.
struct Term {
    epoch: u64,
    groups: BTreeMap<String, GroupState>,
}

impl Term {
    /// A term that starts from the decisions the bus retains.
    fn new(epoch: u64, inherited: Vec<Decision>) -> Self {
        let groups = inherited
            .into_iter()
            .map(|decision| {
                let group = decision.group.clone();
                let state = GroupState {
                    decision: Some(decision),
                    ..GroupState::default()
                };
                (group, state)
            })
            .collect();
        Self { epoch, groups }
    }

    fn note(&mut self, signal: Signal) {
        if let Signal::Released {
            group,
            subscriber,
            source,
            ..
        } = signal
        {
            // Only a released source that is in handover from this subscriber
            // counts; anything else is forgotten at the group's next decision.
            if let Some(state) = self.groups.get_mut(&group) {
                state.released.insert((source, subscriber));
            }
        }
    }
}

#[derive(Default)]
struct GroupState {
    /// The newest decision: this term's, or the one inherited from the bus.
    decision: Option<Decision>,
    /// Revision of this term's newest decision; 0 before its first.
    revision: u64,
    /// The newest decision has yet to reach the bus.
    unpublished: bool,
    /// When each source in handover started moving, and from whom.
    handovers_since: HashMap<Source, (String, Instant)>,
    /// Sources a subscriber said it released: (source, subscriber).
    released: HashSet<(Source, String)>,
}

impl GroupState {
    /// Sources in handover that may go to their new owner: released by their old
    /// owner, or waiting longer than `timeout`. (A dead old owner is seen to by
    /// `allocate`, which knows who is live.)
    fn ready_handovers(
        &self,
        current: &Allocation<Source>,
        now: Instant,
        timeout: Duration,
    ) -> BTreeSet<Source> {
        current
            .handovers
            .iter()
            .filter(|(source, handover)| {
                let released = self
                    .released
                    .contains(&((*source).clone(), handover.from.clone()));
                let timed_out = self
                    .handovers_since
                    .get(*source)
                    .is_some_and(|(_, since)| now.duration_since(*since) >= timeout);
                if timed_out && !released {
                    tracing::warn!(
                        source = %source, from = %handover.from, to = %handover.to,
                        "handover timed out without a release; giving the source to its new owner"
                    );
                }
                released || timed_out
            })
            .map(|(source, _)| source.clone())
            .collect()
    }

    /// Counts a decision that takes sources from their owners as a rebalance, and
    /// records how long each source that `next` hands to its new owner was in
    /// handover. Measured here, where both decisions are made, with one clock.
    fn measure(
        &self,
        group: &str,
        current: &Allocation<Source>,
        next: &Allocation<Source>,
        now: Instant,
    ) {
        let moved = current.owners.iter().any(|(owner, sources)| {
            sources
                .iter()
                .any(|source| next.owner_of(source) != Some(owner.as_str()))
        });
        if moved {
            ::metrics::counter!(metrics::REBALANCES, "group" => group.to_owned()).increment(1);
        }
        for (source, handover) in &current.handovers {
            if next.handovers.contains_key(source) {
                continue;
            }
            if let Some((_, since)) = self.handovers_since.get(source) {
                let elapsed = now.duration_since(*since);
                ::metrics::histogram!(metrics::HANDOVER_DURATION, "group" => group.to_owned())
                    .record(elapsed.as_secs_f64());
                tracing::debug!(group, %source, from = %handover.from, to = %handover.to, ?elapsed, "handover complete");
            }
        }
    }

    /// Starts the clock on handovers that `next` begins, keeps it on those that go
    /// on from the same owner, and forgets the rest and their releases.
    fn track_handovers(&mut self, next: &Allocation<Source>, now: Instant) {
        self.handovers_since.retain(|source, (from, _)| {
            next.handovers
                .get(source)
                .is_some_and(|handover| &handover.from == from)
        });
        for (source, handover) in &next.handovers {
            self.handovers_since
                .entry(source.clone())
                .or_insert_with(|| (handover.from.clone(), now));
        }
        self.released.retain(|(source, from)| {
            next.handovers
                .get(source)
                .is_some_and(|handover| &handover.from == from)
        });
    }
}

/// The allocator's view of live records. Members requesting the same sources share
/// one set, which `allocate` recognises cheaply.
fn members_of(records: &[MemberRecord]) -> Vec<Member<Source>> {
    let mut shared: HashMap<&BTreeSet<Source>, Arc<BTreeSet<Source>>> = HashMap::new();
    records
        .iter()
        .map(|record| {
            let sources = shared
                .entry(&record.sources)
                .or_insert_with(|| Arc::new(record.sources.clone()));
            Member::new(&record.subscriber, &record.node, Arc::clone(sources))
                .with_tags(record.tags.iter().cloned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::broker::membership::{MemoryMembershipStore, Registration};
    use crate::bus::MemoryBus;

    const WAIT: Duration = Duration::from_secs(10);

    fn settings() -> BrokerSettings {
        BrokerSettings {
            heartbeat_interval: Duration::from_millis(20),
            member_timeout: Duration::from_secs(60),
            refresh_interval: Duration::from_millis(100),
            lease_ttl: Duration::from_secs(1),
            handover_timeout: Duration::from_secs(60),
        }
    }

    struct Harness {
        membership: Arc<MemoryMembershipStore>,
        bus: MemoryBus,
        leader: watch::Sender<LeaderState>,
        status: watch::Receiver<BrokerStatus>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        fn start() -> Self {
            let membership = Arc::new(MemoryMembershipStore::new());
            let bus = MemoryBus::new();
            let coordinator = Coordinator::new(
                "node-a",
                settings(),
                Arc::clone(&membership) as Arc<dyn MembershipStore>,
                Arc::new(bus.clone()),
            );
            let status = coordinator.status();
            let (leader, following) = watch::channel(LeaderState::Follower);
            let cancel = CancellationToken::new();
            let task = tokio::spawn(coordinator.run(following, cancel.clone()));
            Self {
                membership,
                bus,
                leader,
                status,
                cancel,
                task,
            }
        }

        async fn join(&self, subscriber: &str) {
            let registration = Registration {
                group: "g".into(),
                subscriber: subscriber.into(),
                node: "node-a".into(),
                sources: ["log".parse().unwrap(), "category:orders".parse().unwrap()].into(),
                tags: BTreeSet::new(),
            };
            self.membership.register(&registration).await.unwrap();
        }

        fn lead(&self, epoch: u64) {
            self.leader.send_replace(LeaderState::Leader { epoch });
        }

        async fn wait_for_status(&self, wanted: BrokerStatus) {
            let mut status = self.status.clone();
            status.wait_for(|s| *s == wanted).await.unwrap();
        }

        /// Waits until the retained decision of group `g` satisfies `wanted`.
        async fn decision(&self, wanted: impl Fn(&Decision) -> bool) -> Decision {
            let started = Instant::now();
            loop {
                if let Some(decision) = self.bus.retained_decision("g") {
                    if wanted(&decision) {
                        return decision;
                    }
                }
                assert!(
                    started.elapsed() < WAIT,
                    "no such decision: {:?}",
                    self.bus.retained_decision("g")
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        async fn stop(self) {
            self.cancel.cancel();
            self.task.await.unwrap();
        }
    }

    fn owners(decision: &Decision) -> Vec<&str> {
        decision.owners.keys().map(String::as_str).collect()
    }

    #[tokio::test]
    async fn a_group_that_empties_and_comes_back_keeps_counting_revisions() {
        let harness = Harness::start();
        harness.lead(1);
        harness.join("s1").await;
        let first = harness.decision(|d| owners(d) == ["s1"]).await;
        harness.membership.leave("g", "s1").await.unwrap();
        let empty = harness.decision(|d| d.owners.is_empty()).await;
        assert!(empty.is_newer_than(&first));
        harness.join("s1").await;
        let back = harness
            .decision(|d| owners(d) == ["s1"] && d.is_newer_than(&empty))
            .await;
        assert_eq!(back.epoch, 1);
        harness.stop().await;
    }

    #[tokio::test]
    async fn a_lease_regained_under_the_same_epoch_resumes_the_term() {
        let harness = Harness::start();
        harness.lead(3);
        harness.join("s1").await;
        let first = harness.decision(|d| owners(d) == ["s1"]).await;
        assert_eq!(first.version(), (3, 1));

        // A failed renewal demotes the node; it regains the lease before it expires.
        harness.leader.send_replace(LeaderState::Follower);
        harness.wait_for_status(BrokerStatus::Waiting).await;
        harness.join("s2").await;
        harness.lead(3);
        // The newcomer's share is handed over, in a decision of the same epoch.
        let resumed = harness.decision(|d| d.handovers.len() == 1).await;
        assert_eq!(resumed.epoch, 3);
        assert!(resumed.is_newer_than(&first), "{resumed:?} after {first:?}");
        harness.stop().await;
    }

    #[tokio::test]
    async fn a_newer_epoch_on_the_bus_makes_the_leader_step_down() {
        let harness = Harness::start();
        harness.lead(2);
        harness.join("s1").await;
        let mine = harness.decision(|d| owners(d) == ["s1"]).await;
        let newer = Decision {
            epoch: 5,
            revision: 1,
            coordinator: "node-b".into(),
            ..mine.clone()
        };
        harness
            .bus
            .publish(&BusMessage::Decision(newer.clone()))
            .await
            .unwrap();
        harness.wait_for_status(BrokerStatus::Waiting).await;
        // Membership changes, but this node no longer decides.
        harness.join("s2").await;
        tokio::time::sleep(settings().refresh_interval * 3).await;
        assert_eq!(harness.bus.retained_decision("g"), Some(newer));
        harness.stop().await;
    }
}
