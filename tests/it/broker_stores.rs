//! The lease and membership store contracts, as one generic test body per clause, run
//! against the in-memory stores and Postgres (each test in its own schema).
//!
//! Time here is real: expiry is decided on the store's clock, which for Postgres is
//! the database's. Timeouts in the tests are chosen far apart so that scheduling
//! delays cannot change an outcome; where a bound on time is asserted, it has slack.
//! A lease that must stay live while a test checks it is held for long, and
//! shortened by a last renewal when the test wants it to run out; a check of what
//! the store judges by age is judged only when the calls took less than the age
//! ([`within_a_window`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use weir::broker::lease::{Incarnation, LeaseError, LeaseStore};
use weir::broker::membership::{Membership, MembershipStore, Registration, SubscriberKey};
use weir::event::Source;

use crate::common;

/// One backend's stores, and the database they live in (kept alive for the test).
struct Backend {
    leases: Arc<dyn LeaseStore>,
    members: Arc<dyn MembershipStore>,
    db: Option<common::TestPostgres>,
}

impl Backend {
    fn memory() -> Self {
        Self {
            leases: Arc::new(weir::broker::lease::MemoryLeaseStore::new()),
            members: Arc::new(weir::broker::membership::MemoryMembershipStore::new()),
            db: None,
        }
    }

    async fn postgres() -> Option<Self> {
        let db = common::TestPostgres::start().await?;
        Some(Self {
            leases: Arc::new(weir::postgres::PostgresLeaseStore::new(db.store.clone())),
            members: Arc::new(weir::postgres::PostgresMembershipStore::new(
                db.store.clone(),
            )),
            db: Some(db),
        })
    }
}

on_every_backend!(
    Backend, workers = 4:
    racing_acquirers_let_exactly_one_win,
    holder_reacquires_under_the_same_epoch,
    expired_lease_is_taken_over_with_a_higher_epoch,
    a_second_incarnation_of_a_node_waits_for_the_lease,
    stale_epoch_changes_nothing,
    release_frees_the_lease_at_once,
    raised_epochs_stay_raised_for_later_terms,
    zero_ttl_is_rejected,
    register_live_and_leave,
    stale_members_are_not_live,
    live_all_lists_every_groups_live_members,
    heartbeats_keep_members_live,
    purge_removes_old_records,
    purged_subscribers_register_again_at_their_next_heartbeat,
    a_heartbeat_for_a_record_another_process_holds_fails_and_leaves_it_alone,
);

const LEASE: &str = "coordinator";
const LONG: Duration = Duration::from_secs(60);
/// Sleeps are this many times the short timeouts they outlast.
const SHORT: Duration = Duration::from_millis(100);

// ---- leases ----

async fn racing_acquirers_let_exactly_one_win(backend: Backend) {
    let mut racers = tokio::task::JoinSet::new();
    for n in 0..8 {
        let leases = backend.leases.clone();
        racers.spawn(async move { leases.try_acquire(LEASE, &format!("node-{n}"), LONG).await });
    }
    let mut winners = Vec::new();
    while let Some(outcome) = racers.join_next().await {
        if let Some(lease) = outcome.unwrap().unwrap() {
            winners.push(lease);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(winners[0].epoch, 1);
    assert_eq!(
        backend.leases.current(LEASE).await.unwrap().as_ref(),
        Some(&winners[0])
    );
}

async fn holder_reacquires_under_the_same_epoch(backend: Backend) {
    let leases = &backend.leases;
    assert_eq!(leases.current(LEASE).await.unwrap(), None);
    let first = leases.try_acquire(LEASE, "a", LONG).await.unwrap().unwrap();
    assert_eq!((first.name.as_str(), first.holder.as_str()), (LEASE, "a"));
    assert_eq!(leases.try_acquire(LEASE, "b", LONG).await.unwrap(), None);

    let again = leases
        .try_acquire(LEASE, "a", LONG * 2)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.epoch, first.epoch);
    assert!(again.expires_at > first.expires_at);

    let renewed = leases
        .renew(LEASE, "a", again.epoch, LONG * 3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(renewed.epoch, first.epoch);
    assert!(renewed.expires_at > again.expires_at);
    assert_eq!(leases.current(LEASE).await.unwrap(), Some(renewed));
}

/// Two processes started with one node id (a pod restarted while the old one is
/// paused) are two holders: the second waits for the first's lease to expire and
/// then leads under a higher epoch; neither can renew or release for the other.
async fn a_second_incarnation_of_a_node_waits_for_the_lease(backend: Backend) {
    let leases = &backend.leases;
    let ttl = SHORT * 3;
    let (old, new) = (Incarnation::new("n1"), Incarnation::new("n1"));
    assert_ne!(old.as_str(), new.as_str());
    // Held for long, so that it is live for the checks below however slow the
    // store is.
    let first = leases
        .try_acquire(LEASE, old.as_str(), LONG)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.holder_node(), "n1");
    assert_eq!(
        leases.try_acquire(LEASE, new.as_str(), ttl).await.unwrap(),
        None
    );
    assert_eq!(
        leases
            .renew(LEASE, new.as_str(), first.epoch, ttl)
            .await
            .unwrap(),
        None
    );
    leases
        .release(LEASE, new.as_str(), first.epoch)
        .await
        .unwrap();
    assert_eq!(leases.current(LEASE).await.unwrap(), Some(first.clone()));

    // The old process renews for `ttl` one last time and is paused: it renews
    // no more, and its lease runs out. The new one, trying every ttl / 3, takes
    // it for long, so that the checks below run while it holds it.
    leases
        .renew(LEASE, old.as_str(), first.epoch, ttl)
        .await
        .unwrap()
        .unwrap();
    let waiting = Instant::now();
    let lease = loop {
        tokio::time::sleep(ttl / 3).await;
        if let Some(lease) = leases.try_acquire(LEASE, new.as_str(), LONG).await.unwrap() {
            break lease;
        }
        assert!(waiting.elapsed() < LONG, "the old lease never ran out");
    };
    assert_eq!(lease.holder, new.as_str());
    assert!(lease.epoch > first.epoch, "{lease:?} after {first:?}");
    // Back from its pause, the old process cannot renew: it has lost the lease.
    assert_eq!(
        leases
            .renew(LEASE, old.as_str(), first.epoch, ttl)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        leases.try_acquire(LEASE, old.as_str(), ttl).await.unwrap(),
        None
    );
}

async fn expired_lease_is_taken_over_with_a_higher_epoch(backend: Backend) {
    let leases = &backend.leases;
    let ttl = SHORT * 3;
    let interval = ttl / 3;
    // Held for long, so that "b" finds it live however slow the store is; then
    // "a" renews it for `ttl` one last time.
    let first = leases.try_acquire(LEASE, "a", LONG).await.unwrap().unwrap();
    assert_eq!(leases.try_acquire(LEASE, "b", ttl).await.unwrap(), None);
    leases
        .renew(LEASE, "a", first.epoch, ttl)
        .await
        .unwrap()
        .unwrap();
    // The store set the expiry before this point, so it is at most `ttl` from here.
    let acquired = Instant::now();

    // "a" stops renewing; "b" keeps trying every ttl / 3 from "a"'s last renewal.
    // Attempts are judged by when they were due: one that runs late can only find
    // the lease more expired, so machine load cannot fail this test.
    let mut attempt = acquired;
    let lease = loop {
        attempt += interval;
        tokio::time::sleep_until(attempt).await;
        if let Some(lease) = leases.try_acquire(LEASE, "b", ttl).await.unwrap() {
            break lease;
        }
        assert!(
            attempt - acquired < ttl + interval,
            "not taken over at the attempt due {:?} after acquisition",
            attempt - acquired
        );
    };
    assert_eq!(lease.holder, "b");
    assert!(lease.epoch > first.epoch);
    // Taken over within ttl plus one attempt interval.
    assert!(
        attempt - acquired <= ttl + interval,
        "taken over at the attempt due {:?} after acquisition",
        attempt - acquired
    );
}

async fn stale_epoch_changes_nothing(backend: Backend) {
    let leases = &backend.leases;
    let old = leases
        .try_acquire(LEASE, "a", SHORT)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(SHORT * 3).await;
    let new = leases.try_acquire(LEASE, "b", LONG).await.unwrap().unwrap();
    assert!(new.epoch > old.epoch);

    // The deposed holder, under its old epoch.
    assert_eq!(
        leases.renew(LEASE, "a", old.epoch, LONG).await.unwrap(),
        None
    );
    // The new holder under a wrong epoch, and someone else under the right one.
    assert_eq!(
        leases.renew(LEASE, "b", old.epoch, LONG).await.unwrap(),
        None
    );
    assert_eq!(
        leases.renew(LEASE, "a", new.epoch, LONG).await.unwrap(),
        None
    );
    leases.release(LEASE, "a", old.epoch).await.unwrap();
    leases.release(LEASE, "a", new.epoch).await.unwrap();
    assert_eq!(leases.current(LEASE).await.unwrap().as_ref(), Some(&new));
    assert_eq!(leases.try_acquire(LEASE, "a", LONG).await.unwrap(), None);
    assert_eq!(leases.current(LEASE).await.unwrap(), Some(new));
}

async fn raised_epochs_stay_raised_for_later_terms(backend: Backend) {
    let leases = &backend.leases;
    let held = leases.try_acquire(LEASE, "a", LONG).await.unwrap().unwrap();
    assert_eq!(held.epoch, 1);
    // Only the live holder at its epoch may raise it.
    assert_eq!(
        leases.raise_epoch(LEASE, "b", 1, 1005, LONG).await.unwrap(),
        None
    );
    assert_eq!(
        leases.raise_epoch(LEASE, "a", 2, 1005, LONG).await.unwrap(),
        None
    );
    let raised = leases
        .raise_epoch(LEASE, "a", 1, 1005, LONG)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((raised.holder.as_str(), raised.epoch), ("a", 1005));
    // Never lowered; renewals go on under the raised epoch, the old one is stale.
    let same = leases
        .raise_epoch(LEASE, "a", 1005, 3, LONG)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(same.epoch, 1005);
    assert_eq!(leases.renew(LEASE, "a", 1, LONG).await.unwrap(), None);
    assert!(
        leases
            .renew(LEASE, "a", 1005, LONG)
            .await
            .unwrap()
            .is_some()
    );
    // The row keeps it: the next term starts above it.
    leases.release(LEASE, "a", 1005).await.unwrap();
    let next = leases.try_acquire(LEASE, "b", LONG).await.unwrap().unwrap();
    assert_eq!(next.epoch, 1006);
}

async fn release_frees_the_lease_at_once(backend: Backend) {
    let leases = &backend.leases;
    let held = leases.try_acquire(LEASE, "a", LONG).await.unwrap().unwrap();
    leases.release(LEASE, "a", held.epoch).await.unwrap();
    let taken = leases.try_acquire(LEASE, "b", LONG).await.unwrap().unwrap();
    assert_eq!(taken.epoch, held.epoch + 1);
    // The old holder's renewal fails once it has released.
    assert_eq!(
        leases.renew(LEASE, "a", held.epoch, LONG).await.unwrap(),
        None
    );

    // Releasing and taking it back is a new acquisition too.
    leases.release(LEASE, "b", taken.epoch).await.unwrap();
    let back = leases.try_acquire(LEASE, "b", LONG).await.unwrap().unwrap();
    assert_eq!(back.epoch, taken.epoch + 1);
}

async fn zero_ttl_is_rejected(backend: Backend) {
    let outcome = backend.leases.try_acquire(LEASE, "a", Duration::ZERO).await;
    assert!(
        matches!(outcome, Err(LeaseError::InvalidTtl { .. })),
        "{outcome:?}"
    );
    assert_eq!(backend.leases.current(LEASE).await.unwrap(), None);
}

// ---- membership ----

fn sources(list: &[&str]) -> BTreeSet<Source> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn tags(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn registration(group: &str, subscriber: &str, node: &str) -> Registration {
    Registration {
        group: group.into(),
        subscriber: subscriber.into(),
        node: node.into(),
        sources: sources(&["log", "category:orders", "stream:orders/o-1"]),
        tags: tags(&["eu", "gpu"]),
    }
}

fn subscribers(records: &[weir::broker::membership::MemberRecord]) -> Vec<&str> {
    records.iter().map(|r| r.subscriber.as_str()).collect()
}

/// For checks of what a store judges by age (a member younger than a timeout is
/// live, one older is purged): runs `attempt` with a window, `first` and then
/// twice as wide each time, until the calls it made from the instant it returns
/// took less than the window, and returns what that attempt found. Only then do
/// the records it made count as younger than the window for certain: a loaded
/// machine or database can take longer over a round trip.
async fn within_a_window<T>(
    first: Duration,
    mut attempt: impl AsyncFnMut(Duration) -> (Instant, T),
) -> T {
    let mut window = first;
    loop {
        let (began, found) = attempt(window).await;
        if began.elapsed() < window {
            return found;
        }
        window *= 2;
        assert!(
            window < LONG,
            "no attempt's calls took less than {window:?}"
        );
    }
}

async fn register_live_and_leave(backend: Backend) {
    let members = &backend.members;
    let record = members
        .register(&registration("g", "s2", "n1"))
        .await
        .unwrap();
    members
        .register(&registration("g", "s1", "n1"))
        .await
        .unwrap();
    members
        .register(&registration("h", "s1", "n2"))
        .await
        .unwrap();

    let live = members.live("g", LONG).await.unwrap();
    assert_eq!(subscribers(&live), ["s1", "s2"]);
    assert_eq!(live[1], record);
    assert_eq!(live[1].node, "n1");
    assert_eq!(
        live[1].sources,
        sources(&["log", "category:orders", "stream:orders/o-1"])
    );
    assert_eq!(live[1].tags, tags(&["eu", "gpu"]));
    assert_eq!(members.groups().await.unwrap(), ["g", "h"]);

    // Registering again replaces the record.
    let mut moved = registration("g", "s2", "n3");
    moved.sources = sources(&["category:payments"]);
    moved.tags = BTreeSet::new();
    members.register(&moved).await.unwrap();
    let live = members.live("g", LONG).await.unwrap();
    assert_eq!(
        (live[1].node.as_str(), &live[1].sources, &live[1].tags),
        ("n3", &moved.sources, &moved.tags)
    );

    assert!(members.leave("g", "s2").await.unwrap());
    assert!(!members.leave("g", "s2").await.unwrap());
    assert_eq!(subscribers(&members.live("g", LONG).await.unwrap()), ["s1"]);
    assert!(members.leave("h", "s1").await.unwrap());
    assert_eq!(members.groups().await.unwrap(), ["g"]);
}

async fn stale_members_are_not_live(backend: Backend) {
    let members = &backend.members;
    members
        .register(&registration("g", "s1", "n1"))
        .await
        .unwrap();
    tokio::time::sleep(SHORT * 3).await;
    assert!(members.live("g", SHORT).await.unwrap().is_empty());
    // Still registered, just not live within the short timeout.
    assert_eq!(members.live("g", LONG).await.unwrap().len(), 1);
    assert_eq!(members.groups().await.unwrap(), ["g"]);
}

async fn live_all_lists_every_groups_live_members(backend: Backend) {
    let members = &backend.members;
    for (group, subscriber) in [("h", "s1"), ("g", "s2"), ("g", "s1")] {
        members
            .register(&registration(group, subscriber, "n1"))
            .await
            .unwrap();
    }
    let registered = Instant::now();
    let (all, fresh) = within_a_window(SHORT * 2, async |window| {
        // The three above are older than the window, the fourth younger.
        tokio::time::sleep_until(registered + window + SHORT).await;
        let began = Instant::now();
        members
            .register(&registration("h", "s2", "n2"))
            .await
            .unwrap();
        let all = members.live_all(LONG).await.unwrap();
        let fresh = members.live_all(window).await.unwrap();
        (began, (all, fresh))
    })
    .await;
    let keys = |records: &[weir::broker::membership::MemberRecord]| -> Vec<(String, String)> {
        records
            .iter()
            .map(|r| (r.group.clone(), r.subscriber.clone()))
            .collect()
    };
    let expected = [("g", "s1"), ("g", "s2"), ("h", "s1"), ("h", "s2")];
    assert_eq!(
        keys(&all),
        expected.map(|(g, s)| (g.to_owned(), s.to_owned()))
    );
    assert_eq!(all[3].node, "n2");
    // Only the fresh registration is live within the short timeout.
    assert_eq!(keys(&fresh), [("h".to_owned(), "s2".to_owned())]);
}

async fn heartbeats_keep_members_live(backend: Backend) {
    let members = &backend.members;
    let before = members
        .register(&registration("g", "s1", "n1"))
        .await
        .unwrap();
    tokio::time::sleep(SHORT * 12).await;
    let missing = members
        .heartbeat("n1", &[SubscriberKey::new("g", "s1")])
        .await
        .unwrap();
    assert!(missing.is_empty(), "{missing:?}");
    // Live by its fresh heartbeat: the registration alone is older than the timeout.
    let live = members.live("g", SHORT * 10).await.unwrap();
    assert_eq!(subscribers(&live), ["s1"]);
    assert!(live[0].heartbeat_at > before.heartbeat_at);
    assert!(members.heartbeat("n1", &[]).await.unwrap().is_empty());
}

async fn purge_removes_old_records(backend: Backend) {
    let members = &backend.members;
    let (purged, again, live) = within_a_window(SHORT * 5, async |age| {
        for group in ["g", "h"] {
            members
                .register(&registration(group, "old", "n1"))
                .await
                .unwrap();
        }
        // "old" is twice the purge's age, "new" younger than it.
        tokio::time::sleep(age * 2).await;
        let began = Instant::now();
        members
            .register(&registration("g", "new", "n2"))
            .await
            .unwrap();
        let purged = members.purge(age).await.unwrap();
        let again = members.purge(age).await.unwrap();
        let live = members.live("g", LONG).await.unwrap();
        (began, (purged, again, live))
    })
    .await;
    assert_eq!(purged, 2);
    assert_eq!(again, 0);
    assert_eq!(subscribers(&live), ["new"]);
    assert_eq!(members.groups().await.unwrap(), ["g"]);
}

async fn purged_subscribers_register_again_at_their_next_heartbeat(backend: Backend) {
    let mut membership = Membership::new(backend.members.clone(), "n1");
    let kept = membership.add("g", "s1", sources(&["log"]), tags(&["eu"]));
    let purged = membership.add("g", "s2", sources(&["category:orders"]), BTreeSet::new());
    membership.register_all().await.unwrap();
    assert_eq!(backend.members.live("g", LONG).await.unwrap().len(), 2);

    // A purge while the node lives, e.g. after it was unreachable for a while.
    assert!(backend.members.leave("g", "s2").await.unwrap());
    assert_eq!(
        membership.heartbeat_once(LONG).await.unwrap(),
        std::slice::from_ref(&purged)
    );
    let live = backend.members.live("g", LONG).await.unwrap();
    assert_eq!(subscribers(&live), ["s1", "s2"]);
    assert_eq!(live[1].sources, sources(&["category:orders"]));
    assert_eq!(live[1].node, "n1");

    // Everything purged by age comes back the same way.
    tokio::time::sleep(SHORT * 3).await;
    assert_eq!(backend.members.purge(SHORT).await.unwrap(), 2);
    let registering = Instant::now();
    let mut back = membership.heartbeat_once(LONG).await.unwrap();
    back.sort();
    assert_eq!(back, [kept, purged]);
    let live = within_a_window(SHORT, async |window| {
        let live = backend.members.live("g", window).await.unwrap();
        (registering, live.len())
    })
    .await;
    assert_eq!(live, 2);
    assert!(membership.heartbeat_once(LONG).await.unwrap().is_empty());

    membership.leave_all().await.unwrap();
    assert!(backend.members.groups().await.unwrap().is_empty());
}

async fn a_heartbeat_for_a_record_another_process_holds_fails_and_leaves_it_alone(
    backend: Backend,
) {
    let members = &backend.members;
    members
        .register(&registration("g", "s1", "n1@old"))
        .await
        .unwrap();
    // A second process of the node registers the same subscriber while the
    // first is paused.
    let theirs = members
        .register(&registration("g", "s1", "n1@new"))
        .await
        .unwrap();
    let key = SubscriberKey::new("g", "s1");
    match members.heartbeat("n1@old", &[key]).await {
        Err(weir::store::Error::MemberTaken {
            group,
            subscriber,
            holder,
        }) => {
            assert_eq!(
                (group.as_str(), subscriber.as_str(), holder.as_str()),
                ("g", "s1", "n1@new")
            );
        }
        other => panic!("expected MemberTaken, got {other:?}"),
    }
    let live = members.live("g", LONG).await.unwrap();
    assert_eq!(live, [theirs]);
}

/// Postgres only: a record made old by hand, on the database clock, is neither live
/// nor kept by a purge; no sleeping needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_heartbeat_age_is_judged_on_the_database_clock() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let Some(db) = backend.db.as_ref() else {
        unreachable!("a Postgres backend has a database");
    };
    let members = &backend.members;
    members
        .register(&registration("g", "old", "n1"))
        .await
        .unwrap();
    members
        .register(&registration("g", "new", "n1"))
        .await
        .unwrap();
    db.raw_client()
        .await
        .execute(
            &format!(
                "UPDATE \"{}\".weir_members SET heartbeat_at = now() - interval '1 hour' \
                 WHERE subscriber = 'old'",
                db.schema
            ),
            &[],
        )
        .await
        .unwrap();

    let ten_minutes = Duration::from_secs(600);
    assert_eq!(
        subscribers(&members.live("g", ten_minutes).await.unwrap()),
        ["new"]
    );
    assert_eq!(
        members
            .live("g", Duration::from_secs(7200))
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(members.purge(ten_minutes).await.unwrap(), 1);
    assert_eq!(
        subscribers(&members.live("g", Duration::from_secs(7200)).await.unwrap()),
        ["new"]
    );
}
