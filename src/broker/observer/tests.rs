//! The observer's state machine, driven on tokio's paused clock by a scripted
//! bus (history replayed to each subscriber, then live messages) and a
//! subscriber that records what it is told.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
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
        paused: false,
    }
}

/// A bus whose subscriptions first replay `history`, one message per
/// millisecond as a broker's log would deliver it, then what is published.
struct ScriptedBus {
    retained: Mutex<Vec<Decision>>,
    /// How many times the retained decisions were read.
    fetches: std::sync::atomic::AtomicUsize,
    history: Vec<Decision>,
    live: Mutex<Vec<mpsc::UnboundedSender<Vec<u8>>>>,
    /// Every message published, in order.
    published: Mutex<Vec<BusMessage>>,
}

impl ScriptedBus {
    fn new(retained: Vec<Decision>, history: Vec<Decision>) -> Arc<Self> {
        Arc::new(Self {
            retained: Mutex::new(retained),
            fetches: 0.into(),
            history,
            live: Mutex::new(Vec::new()),
            published: Mutex::new(Vec::new()),
        })
    }

    fn send(&self, decision: Decision) {
        self.send_payload(encode(&BusMessage::Decision(decision)));
    }

    fn send_payload(&self, payload: Vec<u8>) {
        for live in self.live.lock().unwrap().iter() {
            let _ = live.send(payload.clone());
        }
    }

    /// Retains `decision` without sending it: what subscribers that missed it
    /// find when they fetch.
    fn retain(&self, decision: Decision) {
        *self.retained.lock().unwrap() = vec![decision];
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl AllocationBus for ScriptedBus {
    async fn publish(&self, message: &BusMessage) -> crate::bus::Result<()> {
        self.published.lock().unwrap().push(message.clone());
        Ok(())
    }

    async fn publish_whole(&self, _: &Decision) -> crate::bus::Result<()> {
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
            crate::bus::BusMeter::new(),
        ))
    }

    async fn retained(&self) -> crate::bus::Result<Vec<Decision>> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Ok(self.retained.lock().unwrap().clone())
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
    async fn accept_granted(&self, source: &Source, grant: Grant) -> Result<(), SubscriberError> {
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

/// A membership store whose heartbeats can be made to fail, or to take a while.
#[derive(Default)]
struct Flaky {
    inner: MemoryMembershipStore,
    down: AtomicBool,
    /// How long each heartbeat takes, in milliseconds.
    slow_millis: std::sync::atomic::AtomicU64,
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
        let slow = self.slow_millis.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(slow)).await;
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

impl Running {
    /// Cancels the observer and waits until it has withdrawn everything and left.
    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
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
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_source_the_subscriber_does_not_ask_for_is_never_taken() {
    // The retained decision was made when the group read `orders` whole; the
    // subscriber now asks for its partitions (a new partition count).
    let mut old_layout = decision(1, 4, MINE);
    let first_half: Source = "category:orders@0/2".parse().unwrap();
    old_layout
        .owners
        .get_mut(MINE)
        .unwrap()
        .insert(first_half.clone());
    let bus = ScriptedBus::new(vec![old_layout], Vec::new());
    let recorder = Arc::new(Recorder::default());
    let mut observer = Observer::new(
        "node@1",
        settings(),
        Arc::new(MemoryMembershipStore::new()),
        bus.clone(),
    );
    let second_half: Source = "category:orders@1/2".parse().unwrap();
    observer.add(
        SubscriberSpec::new("g", MINE, [first_half.clone(), second_half.clone()]),
        Arc::clone(&recorder) as Arc<dyn Subscriber>,
    );
    let status = observer.status();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(observer.run(cancel.clone()));
    until(|| !recorder.accepted().is_empty()).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        recorder.accepted(),
        [(first_half.clone(), Grant::new(1, 4))],
        "only what it asks for is taken from the old decision"
    );
    assert_eq!(
        *status.borrow(),
        BrokerStatus::Running,
        "and nothing counts as unconsumed"
    );

    let mut new_layout = decision(2, 1, MINE);
    new_layout.owners = [(
        MINE.to_owned(),
        BTreeSet::from([first_half, second_half.clone()]),
    )]
    .into();
    bus.send(new_layout);
    until(|| recorder.accepted().len() == 2).await;
    assert_eq!(recorder.accepted()[1], (second_half, Grant::new(2, 1)));
    cancel.cancel();
    task.await.unwrap();
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
    let recorder = Arc::clone(&node.recorder);
    node.stop().await;
    assert_eq!(recorder.withdrawn(), 1, "withdrawn on stopping");
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
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn heartbeats_slower_than_their_interval_still_keep_the_node_unfenced() {
    // A store just back from an outage, reconnecting on a loaded machine: each
    // heartbeat takes 2.5 intervals, still far inside the member timeout.
    let bus = ScriptedBus::new(vec![decision(1, 3, MINE)], Vec::new());
    let membership = Arc::new(Flaky::default());
    let node = start(bus.clone(), membership.clone());
    until(|| node.recorder.accepted().len() == 1).await;
    membership.slow_millis.store(250, Ordering::SeqCst);
    // Several member timeouts: every heartbeat gets through, late.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(node.recorder.withdrawn(), 0, "the node fenced itself");
    assert_eq!(*node.status.borrow(), BrokerStatus::Running);
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_process_whose_subscribers_another_process_registered_fences_itself() {
    let bus = ScriptedBus::new(vec![decision(1, 3, MINE)], Vec::new());
    let membership = Arc::new(MemoryMembershipStore::new());
    let node = start(bus.clone(), membership.clone());
    until(|| node.recorder.accepted().len() == 1).await;

    // A second process started with the same node id (while this one was
    // paused, say) registers the same subscriber.
    membership
        .register(&Registration {
            group: "g".into(),
            subscriber: MINE.into(),
            node: "node@2".into(),
            sources: BTreeSet::from([orders()]),
            tags: BTreeSet::new(),
        })
        .await
        .unwrap();
    until(|| node.recorder.withdrawn() == 1).await;
    match &*node.status.borrow() {
        BrokerStatus::Errored(reason) => {
            assert!(reason.contains("another process, node@2"), "{reason}");
        }
        other => panic!("expected an error naming the other process, got {other:?}"),
    }
    // It stays out: nothing is accepted again while the other process lives.
    let theirs = [crate::broker::membership::SubscriberKey::new("g", MINE)];
    for _ in 0..50 {
        membership.heartbeat("node@2", &theirs).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(node.recorder.accepted().len(), 1);
    // Once the other process is dead (no heartbeat for a member timeout), this
    // one takes its subscriber back and consumes again.
    until(|| node.recorder.accepted().len() == 2).await;
    until(|| *node.status.borrow() == BrokerStatus::Running).await;
    node.stop().await;
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
    node.stop().await;
}

fn delta(base: &Decision, next: &Decision) -> Vec<u8> {
    crate::bus::encode_delta(&crate::bus::Delta::between(base, next).expect("newer"))
}

fn digest(decision: &Decision) -> Vec<u8> {
    encode(&BusMessage::Digest(Digest::of(decision)))
}

#[tokio::test(start_paused = true)]
async fn a_decision_the_bus_cannot_rebuild_is_asked_for_whole_and_unready_meanwhile() {
    let bus = ScriptedBus::new(vec![decision(1, 1, THEIRS)], Vec::new());
    let node = start(bus.clone(), Arc::new(MemoryMembershipStore::new()));
    until(|| bus.fetches() == 1).await;
    until(|| *node.status.borrow() == BrokerStatus::Running).await;
    // A change to revision 2, which the bus lost: fetching gives revision 1.
    let third = decision(1, 3, MINE);
    bus.send_payload(delta(&decision(1, 2, THEIRS), &third));
    let asked = Signal::Lacking {
        group: "g".into(),
        node: "node@1".into(),
        epoch: 1,
        revision: 3,
    };
    until(|| {
        bus.published
            .lock()
            .unwrap()
            .contains(&asked.clone().into())
    })
    .await;
    assert_eq!(bus.fetches(), 2);
    // Past a refresh interval without it, the node is not ready and says why.
    until(|| matches!(*node.status.borrow(), BrokerStatus::Errored(_))).await;
    let BrokerStatus::Errored(reason) = node.status.borrow().clone() else {
        unreachable!()
    };
    assert!(
        reason.contains("newest decision of group g (epoch 1, revision 3)"),
        "{reason}"
    );
    assert!(node.recorder.accepted().is_empty());

    // The coordinator writes it whole: applied, and ready again.
    bus.send(third);
    until(|| !node.recorder.accepted().is_empty()).await;
    assert_eq!(node.recorder.accepted(), [(orders(), Grant::new(1, 3))]);
    until(|| *node.status.borrow() == BrokerStatus::Running).await;
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_change_to_a_decision_the_node_missed_makes_it_fetch_the_newest() {
    let first = decision(1, 1, THEIRS);
    let bus = ScriptedBus::new(vec![first.clone()], Vec::new());
    let node = start(bus.clone(), Arc::new(MemoryMembershipStore::new()));
    until(|| bus.fetches() == 1).await;
    // Revision 2 never reaches the node; the change from 2 to 3 does.
    let (second, third) = (decision(1, 2, THEIRS), decision(1, 3, MINE));
    bus.retain(third.clone());
    bus.send_payload(delta(&second, &third));
    until(|| !node.recorder.accepted().is_empty()).await;
    assert_eq!(node.recorder.accepted(), [(orders(), Grant::new(1, 3))]);
    assert_eq!(bus.fetches(), 2);

    // The fetched decision is the base of the next change: no fetch needed.
    let fourth = decision(1, 4, THEIRS);
    bus.send_payload(delta(&third, &fourth));
    until(|| node.recorder.withdrawn() == 1).await;
    assert_eq!(bus.fetches(), 2);
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_digest_of_a_decision_the_node_lacks_makes_it_fetch_it() {
    let bus = ScriptedBus::new(vec![decision(1, 1, THEIRS)], Vec::new());
    let node = start(bus.clone(), Arc::new(MemoryMembershipStore::new()));
    until(|| bus.fetches() == 1).await;
    // Every message about revisions 2 to 5 is lost; the refresh's digest is not.
    let newest = decision(1, 5, MINE);
    bus.retain(newest.clone());
    bus.send_payload(digest(&newest));
    until(|| !node.recorder.accepted().is_empty()).await;
    assert_eq!(node.recorder.accepted(), [(orders(), Grant::new(1, 5))]);

    // A digest of what it holds, or of a deposed coordinator's older decision,
    // fetches nothing and changes nothing.
    bus.send_payload(digest(&newest));
    bus.send_payload(digest(&decision(0, 99, THEIRS)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(bus.fetches(), 2);
    assert_eq!(node.recorder.withdrawn(), 0);
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_digest_covers_whether_the_group_is_paused() {
    let held = decision(1, 1, MINE);
    let bus = ScriptedBus::new(vec![held.clone()], Vec::new());
    let node = start(bus.clone(), Arc::new(MemoryMembershipStore::new()));
    until(|| !node.recorder.accepted().is_empty()).await;
    // Same version, other content: only a fault makes it, and the retained
    // decision wins.
    let paused = held.clone().with_paused(true);
    assert_ne!(Digest::of(&paused), Digest::of(&held));
    bus.retain(paused);
    bus.send_payload(digest(&bus.retained.lock().unwrap()[0]));
    until(|| bus.fetches() == 2).await;
    node.stop().await;
}
