//! The coordinator: while its node holds the leadership lease, it reads membership,
//! decides every group's allocation with [`allocate`] and publishes each decision on
//! the bus, stamped with the lease's epoch and a revision that grows with every
//! decision of the group.
//!
//! It decides again at once when a subscriber signals that it joined, is leaving or
//! released a source; on every membership tick (the heartbeat interval), which is how
//! dead members are noticed; and each refresh interval it publishes the digest of
//! every decision (a few dozen bytes), so that an observer that missed one notices
//! and fetches it from what the bus retains. A source in handover goes to its
//! new owner once the old owner has released it, has died, or the handover timeout
//! has passed.
//!
//! On promotion it starts from the decisions the bus retains, so a change of leader
//! moves nothing. It stops deciding the moment the lease is lost.
//!
//! The lease store, not the bus, says who leads. A term always starts above every
//! epoch the bus holds: when the bus retains a decision of the leader's epoch or a
//! higher one (the store was restored or reset while the bus kept its decisions, or
//! a stray publisher wrote one), the coordinator asks its [`Leadership`] to raise the
//! lease's epoch above it ([`EpochFloor`]) and starts its term under the raised
//! epoch. A higher epoch appearing while the lease is valid is handled the same
//! way, so a decision on the bus can never stop a legitimate leader. A coordinator
//! whose decisions do not reach the bus reports itself errored, with the reason.
//!
//! [`Leadership`]: super::lease::Leadership

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use self::following::Following;
use self::group::GroupState;
use super::BrokerSettings;
use super::control::{Command, FleetStore, MemoryFleetStore};
use super::lease::{EpochFloor, LeaderState};
use super::membership::{MemberRecord, MembershipStore};
use super::role::{BrokerStatus, RETRY_DELAY, Reporter};
use crate::allocation::{AllocationInput, Member, allocate};
use crate::bus::{AllocationBus, BusMessage, BusSubscription, Decision, Digest, Signal};
use crate::event::Source;
use crate::lifecycle::Journal;
use crate::metrics;

mod journal;

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
    /// Where to ask for a higher epoch; without one, a higher epoch on the bus
    /// makes this coordinator step down instead.
    floor: Option<EpochFloor>,
    /// When this coordinator last asked for higher epochs, to tell a one-off stray
    /// decision from another fleet publishing on the same namespace.
    raises: std::sync::Mutex<std::collections::VecDeque<Instant>>,
    /// Which groups are paused, kept where every leader finds it.
    fleet: Arc<dyn FleetStore>,
    /// Commands from the admin API; refused while another node leads.
    commands: Option<mpsc::Receiver<Command>>,
    /// The epoch this coordinator decides under while it leads, for the admin API.
    leading: watch::Sender<Option<u64>>,
    /// Where leadership, membership and source moves are recorded.
    journal: Journal,
}

/// More raises than this within [`OUTBID_WINDOW`] mean that something keeps
/// publishing above this fleet's leader: most likely another fleet (another
/// store or schema) on the same bus namespace.
const OUTBID_LIMIT: usize = 5;
const OUTBID_WINDOW: Duration = Duration::from_secs(60);

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
            floor: None,
            raises: std::sync::Mutex::default(),
            fleet: Arc::new(MemoryFleetStore::new()),
            commands: None,
            leading: watch::channel(None).0,
            journal: Journal::disabled(),
        }
    }

    /// Takes operators' commands from `commands`, keeps paused groups in `fleet`
    /// and says in `leading` under which epoch it leads.
    #[must_use]
    pub(crate) fn with_control(
        mut self,
        fleet: Arc<dyn FleetStore>,
        commands: mpsc::Receiver<Command>,
        leading: watch::Sender<Option<u64>>,
    ) -> Self {
        self.fleet = fleet;
        self.commands = Some(commands);
        self.leading = leading;
        self
    }

    /// Records terms, members and source moves in `journal` (by default nowhere).
    #[must_use]
    pub fn with_journal(mut self, journal: Journal) -> Self {
        self.journal = journal;
        self
    }

    /// Lets the coordinator raise its lease's epoch above the epochs the bus holds,
    /// through the [`EpochFloor`] of the node's `Leadership`.
    #[must_use]
    pub fn with_epoch_floor(mut self, floor: EpochFloor) -> Self {
        self.floor = Some(floor);
        self
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
    pub async fn run(
        mut self,
        mut leader: watch::Receiver<LeaderState>,
        cancel: CancellationToken,
    ) {
        let mut commands = self.commands.take();
        if let Some(mut subscription) = self.subscribe(&cancel).await {
            let mut following = Following::default();
            let mut previous: Option<Term> = None;
            while let Some(epoch) = self
                .await_leadership(
                    &mut leader,
                    &mut subscription,
                    &mut following,
                    &mut commands,
                    &cancel,
                )
                .await
            {
                tracing::info!(node = %self.node, epoch, "coordinating");
                let term = match previous.take() {
                    // The lease came back under the same epoch (a renewal failed and
                    // this node acquired it again before it expired). Nobody else
                    // decided meanwhile, so the term goes on where it stopped and its
                    // revisions keep counting up.
                    Some(term) if term.epoch == epoch => term,
                    previous => match self
                        .begin_term(epoch, &following, &mut leader, &cancel)
                        .await
                    {
                        // This node raised its own epoch over a stray decision: it
                        // goes on from its own decisions, under the new epoch.
                        Ok(inherited) => match previous {
                            Some(term) if term.raising && self.floor_is(epoch) => {
                                term.renumber(epoch)
                            }
                            _ => Term::new(epoch, inherited, self.journal.clone()),
                        },
                        Err(TermEnd::Cancelled) => break,
                        Err(TermEnd::Deposed) => continue,
                    },
                };
                self.leading.send_replace(Some(term.epoch));
                journal::leadership(&self.journal, &self.node, epoch, None);
                let (end, mut term) = self
                    .lead(
                        term,
                        &mut following,
                        &mut leader,
                        (&mut subscription, &mut commands),
                        &cancel,
                    )
                    .await;
                self.leading.send_replace(None);
                term.drop_holds();
                // Only the leader counts a group's subscribers; a former leader's
                // count would go stale.
                for group in term.groups.keys() {
                    ::metrics::gauge!(metrics::GROUP_SUBSCRIBERS, "group" => group.clone())
                        .set(0.0);
                }
                previous = Some(term);
                journal::leadership(&self.journal, &self.node, epoch, Some(&end));
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
        commands: &mut Option<mpsc::Receiver<Command>>,
        cancel: &CancellationToken,
    ) -> Option<u64> {
        self.status.set(BrokerStatus::Waiting);
        loop {
            if let LeaderState::Leader { epoch } = *leader.borrow_and_update() {
                // With a floor to raise, the store's word is enough: the term
                // starts above any newer epoch seen (see `begin_term`).
                if self.floor.is_some() || epoch > following.newest_epoch {
                    return Some(epoch);
                }
            }
            tokio::select! {
                biased;
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
                command = control::next_command(commands) => command.refuse(),
            }
        }
    }

    /// The decisions the bus retains, to start a new term under `epoch` from, once
    /// `epoch` is above every epoch the bus holds. Otherwise asks for a higher one
    /// and ends when the lease moves to it (`Deposed`, to start over under it).
    async fn begin_term(
        &self,
        epoch: u64,
        following: &Following,
        leader: &mut watch::Receiver<LeaderState>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Decision>, TermEnd> {
        loop {
            match self.bus.retained().await {
                Ok(decisions) => {
                    let held = decisions
                        .iter()
                        .map(|decision| decision.epoch)
                        .fold(following.newest_epoch, u64::max);
                    if held < epoch {
                        return Ok(decisions);
                    }
                    self.outranked(epoch, held);
                }
                Err(error) => self
                    .status
                    .error(format!("cannot read the retained decisions: {error}")),
            }
            tokio::select! {
                biased;
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

    /// Whether `epoch` is the one this coordinator last asked its lease to reach.
    fn floor_is(&self, epoch: u64) -> bool {
        self.floor
            .as_ref()
            .is_some_and(|floor| floor.get() == epoch)
    }

    /// The bus holds a decision of epoch `held`, at or above this leader's `epoch`:
    /// asks for the lease's epoch to be raised above it. `false` if this coordinator
    /// has no floor to raise, and so has to give way.
    fn outranked(&self, epoch: u64, held: u64) -> bool {
        let Some(floor) = &self.floor else {
            self.status.error(format!(
                "the allocation bus holds decisions of epoch {held}, not below this leader's epoch {epoch}, and this coordinator cannot raise its epoch"
            ));
            return false;
        };
        let above = held.saturating_add(1);
        if floor.get() < above {
            tracing::warn!(
                node = %self.node, epoch, bus_epoch = held, raising_to = above,
                "the allocation bus holds a decision of an epoch not below this leader's (a restored or reset store, or a stray publisher); raising the lease's epoch above it"
            );
            self.note_raise(held);
        }
        floor.raise(above);
        true
    }

    /// Says so, loudly, when raises keep coming: two fleets outbidding each other
    /// on one namespace would otherwise only show as fast-growing epochs.
    fn note_raise(&self, held: u64) {
        let now = Instant::now();
        let mut raises = self
            .raises
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        raises.retain(|at| now.duration_since(*at) < OUTBID_WINDOW);
        raises.push_back(now);
        if raises.len() > OUTBID_LIMIT {
            tracing::error!(
                node = %self.node, bus_epoch = held, raises = raises.len(),
                "the lease's epoch keeps being outbid by decisions on the allocation bus: another fleet (another store or schema) probably publishes on this bus namespace; give each fleet its own bus.namespace"
            );
        }
    }

    /// Leads for as long as `term`'s epoch holds the lease. Returns why it ended,
    /// and the term, which goes on should the lease come back under that epoch.
    /// Long because every event a term reacts to is one arm of its one select.
    async fn lead(
        &self,
        mut term: Term,
        following: &mut Following,
        leader: &mut watch::Receiver<LeaderState>,
        (subscription, commands): (&mut BusSubscription, &mut Option<mpsc::Receiver<Command>>),
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
                    if !self.take_burst(&mut term, following, subscription, message).await {
                        return (TermEnd::Deposed, term);
                    }
                }
                command = control::next_command(commands) => self.command(&mut term, command).await,
                Some(done) = term.work.join_next(), if !term.work.is_empty() => {
                    self.finish_hold(&mut term, done).await;
                }
                _ = tick.tick() => self.decide_all(&mut term).await,
                _ = refresh.tick() => {
                    self.republish(&mut term).await;
                    self.purge().await;
                }
            }
        }
    }

    /// Takes `first` and every message already waiting (a burst of signals, say
    /// a node starting with many subscribers, is decided in one go); `false` if
    /// a newer epoch it cannot rise above deposes this term.
    async fn take_burst(
        &self,
        term: &mut Term,
        following: &mut Following,
        subscription: &mut BusSubscription,
        first: BusMessage,
    ) -> bool {
        let epoch = term.epoch;
        let mut dirty = BTreeSet::new();
        let mut wholes = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                BusMessage::Signal(Signal::Lacking {
                    group,
                    epoch,
                    revision,
                    ..
                }) => wholes.extend(term.groups.get_mut(&group).and_then(|state| {
                    let interval = self.settings.refresh_interval;
                    state.wanted_whole((epoch, revision), Instant::now(), interval)
                })),
                // The lease store says this node leads: a newer epoch on the bus
                // is stale or foreign, and this term moves above it.
                BusMessage::Decision(Decision { epoch: theirs, .. })
                | BusMessage::Digest(Digest { epoch: theirs, .. })
                    if theirs > epoch =>
                {
                    following.newest_epoch = following.newest_epoch.max(theirs);
                    if !self.outranked(epoch, theirs) {
                        return false;
                    }
                    term.raising = true;
                }
                BusMessage::Decision(_) | BusMessage::Digest(_) => {}
                BusMessage::Signal(signal) => {
                    dirty.insert(signal.group().to_owned());
                    term.note(signal);
                }
            }
            next = subscription.next().now_or_never().flatten();
        }
        for decision in wholes {
            tracing::info!(group = %decision.group, epoch, revision = decision.revision, "a node cannot rebuild this decision from the bus; writing it whole");
            if let Err(error) = self.bus.publish_whole(&decision).await {
                tracing::warn!(group = %decision.group, %error, "could not write the decision whole");
            }
        }
        match dirty.len() {
            0 => {}
            1 => {
                let group = dirty.pop_first().unwrap_or_default();
                self.decide_group(term, &group).await;
            }
            _ => self.decide_all(term).await,
        }
        true
    }

    /// Decides every group that has live members or a decision, from one read of
    /// the registry, and publishes what changed.
    async fn decide_all(&self, term: &mut Term) {
        self.refresh_paused(term).await;
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
        self.settle(term);
    }

    /// Running once every decision reached the bus; errored (set by the failed
    /// publication, with its reason) until then.
    fn settle(&self, term: &Term) {
        if term.groups.values().all(|state| !state.unpublished) {
            self.status.set(BrokerStatus::Running);
        }
    }

    async fn decide_group(&self, term: &mut Term, group: &str) {
        match self
            .membership
            .live(group, self.settings.member_timeout)
            .await
        {
            Ok(records) => {
                self.decide(term, group, &records).await;
                self.settle(term);
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
        let members = members_of(records, term.held(group));
        let paused = term.paused.contains(group);
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
        let grace = self.settings.heartbeat_interval;
        (term.members).decided(group, records, state.decision.is_some(), grace);
        let pause_changed = state.decision.as_ref().is_some_and(|d| d.paused != paused);
        if state.revision > 0 && next == current && !pause_changed {
            self.advance_hold(term, group, records);
            return;
        }
        journal::record_moves(&self.journal, group, &current, &next);
        state.measure(group, &current, &next, now);
        state.track_handovers(&next, now);
        state.revision += 1;
        let decision =
            Decision::from_allocation(group, term.epoch, state.revision, &self.node, &next)
                .with_paused(paused);
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
        self.advance_hold(term, group, records);
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
                self.status.error(format!(
                    "cannot publish the decision of group {group}; trying again at the next tick: {error}"
                ));
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

    /// Publishes the digest of every group's current decision, so that an
    /// observer lacking it fetches it from the bus, and the decisions whose
    /// publication failed.
    async fn republish(&self, term: &mut Term) {
        for (group, state) in &term.groups {
            let Some(decision) = state.decision.as_ref().filter(|_| !state.unpublished) else {
                continue;
            };
            let digest = BusMessage::Digest(Digest::of(decision));
            if let Err(error) = self.bus.publish(&digest).await {
                tracing::warn!(group, %error, "could not publish the digest of a decision");
            }
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

/// What a coordinator knows during one term as leader.
struct Term {
    epoch: u64,
    groups: BTreeMap<String, GroupState>,
    /// This term asked for its lease's epoch to be raised; it goes on under the
    /// raised epoch once the lease has it.
    raising: bool,
    /// Groups whose decisions say they are paused.
    paused: BTreeSet<String>,
    /// Per group, the sources held away from their owners for an operator's work.
    holds: BTreeMap<String, control::Hold>,
    /// Holds' work in progress, each ending with its group and outcome.
    work: tokio::task::JoinSet<(String, Result<serde_json::Value, String>)>,
    members: journal::Members,
}

impl Term {
    /// A term that starts from the decisions the bus retains.
    fn new(epoch: u64, inherited: Vec<Decision>, journal: Journal) -> Self {
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
        Self {
            epoch,
            groups,
            raising: false,
            paused: BTreeSet::new(),
            holds: BTreeMap::new(),
            work: tokio::task::JoinSet::new(),
            members: journal::Members::new(journal),
        }
    }

    /// This term, going on under the raised `epoch`: every group's decision is
    /// made again from revision 1 and published, handovers in flight kept.
    fn renumber(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self.raising = false;
        for state in self.groups.values_mut() {
            state.revision = 0;
        }
        self
    }

    fn note(&mut self, signal: Signal) {
        self.members.note(&signal);
        if let Signal::Released {
            group,
            subscriber,
            source,
            ..
        } = signal
        {
            if let Some(hold) = self.holds.get_mut(&group) {
                hold.released(&source, &subscriber);
            }
            // Only a released source that is in handover from this subscriber
            // counts; anything else is forgotten at the group's next decision.
            if let Some(state) = self.groups.get_mut(&group) {
                state.released.insert((source, subscriber));
            }
        }
    }
}

/// The allocator's view of live records. Members requesting the same sources share
/// one set, which `allocate` recognises cheaply.
/// Sources held away for an operator's work are asked for by nobody meanwhile.
fn members_of(records: &[MemberRecord], held: &BTreeSet<Source>) -> Vec<Member<Source>> {
    let mut shared: HashMap<&BTreeSet<Source>, Arc<BTreeSet<Source>>> = HashMap::new();
    records
        .iter()
        .map(|record| {
            let sources = shared
                .entry(&record.sources)
                .or_insert_with(|| Arc::new(record.sources.difference(held).cloned().collect()));
            Member::new(&record.subscriber, &record.node, Arc::clone(sources))
                .with_tags(record.tags.iter().cloned())
        })
        .collect()
}

mod control;
mod following;
mod group;
#[cfg(test)]
mod tests;
