//! The checkpoint and dead-letter store contracts, as one generic test body per clause,
//! run against the in-memory stores and Postgres (each test in its own schema).
//!
//! The Postgres-only tests at the end check what only a database can get wrong: the
//! order of text under a collation that is not bytewise, and values in the tables
//! that weir never writes.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;
use weir::consumer::{
    Checkpoint, CheckpointError, CheckpointStore, Claim, DeadLetter, DeadLetterStore, NewDeadLetter,
};
use weir::event::{Cursor, Source};

use crate::common;

/// One backend's stores, and the database they live in (kept alive for the test).
struct Backend {
    checkpoints: Arc<dyn CheckpointStore>,
    dead_letters: Arc<dyn DeadLetterStore>,
    db: Option<common::TestPostgres>,
}

impl Backend {
    fn memory() -> Self {
        Self {
            checkpoints: Arc::new(weir::consumer::MemoryCheckpointStore::new()),
            dead_letters: Arc::new(weir::consumer::MemoryDeadLetterStore::new()),
            db: None,
        }
    }

    async fn postgres() -> Option<Self> {
        let db = common::TestPostgres::start().await?;
        Some(Self {
            checkpoints: Arc::new(weir::postgres::PostgresCheckpointStore::new(
                db.store.clone(),
            )),
            dead_letters: Arc::new(weir::postgres::PostgresDeadLetterStore::new(
                db.store.clone(),
            )),
            db: Some(db),
        })
    }
}

on_every_backend!(
    Backend, workers = 4:
    claim_creates_the_row_at_start,
    save_then_load_returns_the_saved_cursor,
    a_claim_by_another_owner_fences_the_earlier_claim,
    a_second_claim_by_the_same_owner_fences_the_first,
    a_claim_under_an_older_decision_is_refused_and_changes_nothing,
    racing_claims_leave_exactly_one_valid,
    claims_of_other_groups_and_sources_are_independent,
    list_orders_by_group_then_source_and_filters_by_group,
    a_save_without_a_claimed_row_is_fenced_and_creates_nothing,
    record_returns_increasing_ids_and_the_stored_fields,
    list_filters_by_group_and_pages_oldest_first,
);

fn source(text: &str) -> Source {
    text.parse().unwrap()
}

/// The cursor of a save, with both halves distinct so a swap would show.
fn cursor(tx_id: u64, sequence: u64) -> Cursor {
    Cursor::new(tx_id, sequence)
}

#[track_caller]
fn expect_fenced(outcome: Result<(), CheckpointError>, claim: &Claim, owner: &str) {
    match outcome {
        Err(CheckpointError::Fenced {
            group,
            consumed,
            owner: holder,
            claimant,
        }) => {
            assert_eq!(group, claim.group);
            assert_eq!(consumed, claim.source);
            assert_eq!(holder, owner, "the error names who holds the row now");
            assert_eq!(claimant, claim.owner);
        }
        other => panic!("expected Fenced naming {owner:?}, got {other:?}"),
    }
}

// ---- checkpoints ----

async fn claim_creates_the_row_at_start(backend: Backend) {
    let checkpoints = &backend.checkpoints;
    let orders = source("category:orders");
    assert_eq!(checkpoints.load("billing", &orders).await.unwrap(), None);

    let (claim, at) = checkpoints.claim("billing", &orders, "n1/1").await.unwrap();
    assert_eq!(at, Cursor::START);
    assert_eq!(
        (claim.group.as_str(), &claim.source, claim.owner.as_str()),
        ("billing", &orders, "n1/1")
    );
    assert!(!claim.token.is_nil());

    let loaded = checkpoints
        .load("billing", &orders)
        .await
        .unwrap()
        .expect("the claim created the row");
    assert_eq!(
        (
            loaded.group.as_str(),
            &loaded.source,
            loaded.owner.as_str(),
            loaded.cursor
        ),
        ("billing", &orders, "n1/1", Cursor::START)
    );
    assert_eq!(checkpoints.list(None).await.unwrap(), [loaded]);
}

async fn save_then_load_returns_the_saved_cursor(backend: Backend) {
    let checkpoints = &backend.checkpoints;
    let log = source("log");
    let (claim, _) = checkpoints.claim("billing", &log, "n1/1").await.unwrap();
    let claimed = checkpoints.load("billing", &log).await.unwrap().unwrap();
    // Apart on every clock, so the save's updated_at is later.
    tokio::time::sleep(Duration::from_millis(5)).await;

    checkpoints.save(&claim, cursor(700, 12)).await.unwrap();
    let saved = checkpoints.load("billing", &log).await.unwrap().unwrap();
    assert_eq!(saved.cursor, cursor(700, 12));
    assert_eq!(saved.owner, "n1/1");
    assert!(
        saved.updated_at > claimed.updated_at,
        "{} <= {}",
        saved.updated_at,
        claimed.updated_at
    );

    // Later saves replace the cursor; the largest values a cursor column holds survive.
    checkpoints.save(&claim, cursor(701, 3)).await.unwrap();
    assert_eq!(
        checkpoints
            .load("billing", &log)
            .await
            .unwrap()
            .unwrap()
            .cursor,
        cursor(701, 3)
    );
    let largest = cursor(i64::MAX as u64, i64::MAX as u64 - 1);
    checkpoints.save(&claim, largest).await.unwrap();
    assert_eq!(
        checkpoints
            .load("billing", &log)
            .await
            .unwrap()
            .unwrap()
            .cursor,
        largest
    );
}

/// A node applying a decision the fleet has moved past (back from a partition, or
/// walking the bus's history after a restart) cannot take the row from the owner
/// a newer decision named; an equal decision's claim wins (an owner restarted under
/// the decision it had), and a claim outside any decision resets the grant.
async fn a_claim_under_an_older_decision_is_refused_and_changes_nothing(backend: Backend) {
    use weir::broker::Grant;
    let checkpoints = &backend.checkpoints;
    let orders = source("category:orders");
    let (owner, _) = checkpoints
        .claim_granted("billing", &orders, "n2/1", Grant::new(1, 6))
        .await
        .unwrap();
    checkpoints.save(&owner, cursor(40, 4)).await.unwrap();

    for stale in [Grant::new(1, 5), Grant::new(0, 99)] {
        match checkpoints
            .claim_granted("billing", &orders, "n1/1", stale)
            .await
        {
            Err(CheckpointError::Superseded(refused)) => {
                assert_eq!(
                    (refused.owner.as_str(), refused.held),
                    ("n2/1", Grant::new(1, 6))
                );
                assert_eq!((refused.claimant.as_str(), refused.grant), ("n1/1", stale));
            }
            other => panic!("expected Superseded, got {other:?}"),
        }
    }
    // The owner never noticed: its claim still holds.
    checkpoints.save(&owner, cursor(41, 5)).await.unwrap();
    let row = checkpoints.load("billing", &orders).await.unwrap().unwrap();
    assert_eq!((row.owner.as_str(), row.cursor), ("n2/1", cursor(41, 5)));

    // The same decision again, or a newer one, takes the row.
    let (again, at) = checkpoints
        .claim_granted("billing", &orders, "n2/1", Grant::new(1, 6))
        .await
        .unwrap();
    assert_eq!(at, cursor(41, 5));
    let (newer, _) = checkpoints
        .claim_granted("billing", &orders, "n1/1", Grant::new(2, 1))
        .await
        .unwrap();
    expect_fenced(
        checkpoints.save(&again, cursor(42, 6)).await,
        &again,
        "n1/1",
    );
    checkpoints.save(&newer, cursor(42, 6)).await.unwrap();

    // A claim under no decision (a single node) resets the grant for the next fleet.
    checkpoints.claim("billing", &orders, "solo").await.unwrap();
    checkpoints
        .claim_granted("billing", &orders, "n1/1", Grant::new(1, 1))
        .await
        .unwrap();
}

async fn a_claim_by_another_owner_fences_the_earlier_claim(backend: Backend) {
    let checkpoints = &backend.checkpoints;
    let orders = source("stream:orders/o-1");
    let (first, _) = checkpoints.claim("billing", &orders, "n1/1").await.unwrap();
    checkpoints.save(&first, cursor(40, 4)).await.unwrap();

    let (second, at) = checkpoints.claim("billing", &orders, "n2/1").await.unwrap();
    assert_eq!(
        at,
        cursor(40, 4),
        "the new owner resumes where the old one saved"
    );
    assert_ne!(second.token, first.token);
    let taken = checkpoints.load("billing", &orders).await.unwrap().unwrap();
    assert_eq!(
        (taken.owner.as_str(), taken.cursor),
        ("n2/1", cursor(40, 4))
    );

    expect_fenced(
        checkpoints.save(&first, cursor(41, 9)).await,
        &first,
        "n2/1",
    );
    assert_eq!(
        checkpoints.load("billing", &orders).await.unwrap(),
        Some(taken),
        "a fenced save changes nothing"
    );

    checkpoints.save(&second, cursor(42, 1)).await.unwrap();
    assert_eq!(
        checkpoints
            .load("billing", &orders)
            .await
            .unwrap()
            .unwrap()
            .cursor,
        cursor(42, 1)
    );
    // Still fenced after the new owner saved.
    expect_fenced(
        checkpoints.save(&first, cursor(43, 0)).await,
        &first,
        "n2/1",
    );
}

async fn a_second_claim_by_the_same_owner_fences_the_first(backend: Backend) {
    let checkpoints = &backend.checkpoints;
    let orders = source("category:orders");
    // A restarted process under the same subscriber id.
    let (before, _) = checkpoints.claim("billing", &orders, "n1/1").await.unwrap();
    checkpoints.save(&before, cursor(10, 1)).await.unwrap();
    let (after, at) = checkpoints.claim("billing", &orders, "n1/1").await.unwrap();
    assert_eq!(at, cursor(10, 1));
    assert_ne!(after.token, before.token);

    let held = checkpoints.load("billing", &orders).await.unwrap();
    expect_fenced(
        checkpoints.save(&before, cursor(11, 0)).await,
        &before,
        "n1/1",
    );
    assert_eq!(checkpoints.load("billing", &orders).await.unwrap(), held);
    checkpoints.save(&after, cursor(12, 0)).await.unwrap();
    assert_eq!(
        checkpoints
            .load("billing", &orders)
            .await
            .unwrap()
            .unwrap()
            .cursor,
        cursor(12, 0)
    );
}

async fn racing_claims_leave_exactly_one_valid(backend: Backend) {
    let orders = source("category:orders");
    let mut racers = tokio::task::JoinSet::new();
    for n in 0..8 {
        let checkpoints = backend.checkpoints.clone();
        let orders = orders.clone();
        racers.spawn(async move {
            checkpoints
                .claim("billing", &orders, &format!("n{n}/1"))
                .await
        });
    }
    let mut claims = Vec::new();
    while let Some(outcome) = racers.join_next().await {
        let (claim, at) = outcome.unwrap().unwrap();
        assert_eq!(at, Cursor::START);
        claims.push(claim);
    }
    let holder = backend
        .checkpoints
        .load("billing", &orders)
        .await
        .unwrap()
        .unwrap()
        .owner;

    let mut saved = Vec::new();
    for (n, claim) in claims.iter().enumerate() {
        match backend
            .checkpoints
            .save(claim, cursor(n as u64 + 1, 0))
            .await
        {
            Ok(()) => saved.push(claim.owner.clone()),
            Err(error) => expect_fenced(Err(error), claim, &holder),
        }
    }
    assert_eq!(
        saved,
        [holder],
        "only the last claim to take the row may save"
    );
}

async fn claims_of_other_groups_and_sources_are_independent(backend: Backend) {
    let checkpoints = &backend.checkpoints;
    let (orders, payments) = (source("category:orders"), source("category:payments"));
    let (billing_orders, _) = checkpoints.claim("billing", &orders, "a").await.unwrap();
    let (billing_payments, _) = checkpoints.claim("billing", &payments, "b").await.unwrap();
    let (audit_orders, _) = checkpoints.claim("audit", &orders, "c").await.unwrap();

    checkpoints
        .save(&billing_orders, cursor(1, 1))
        .await
        .unwrap();
    checkpoints
        .save(&billing_payments, cursor(2, 2))
        .await
        .unwrap();
    checkpoints.save(&audit_orders, cursor(3, 3)).await.unwrap();

    for (group, consumed, owner, at) in [
        ("billing", &orders, "a", cursor(1, 1)),
        ("billing", &payments, "b", cursor(2, 2)),
        ("audit", &orders, "c", cursor(3, 3)),
    ] {
        let loaded = checkpoints.load(group, consumed).await.unwrap().unwrap();
        assert_eq!(
            (loaded.owner.as_str(), loaded.cursor),
            (owner, at),
            "{group} {consumed}"
        );
    }
    // Nothing claimed here, though both the group and the source have rows elsewhere.
    assert_eq!(checkpoints.load("audit", &payments).await.unwrap(), None);
}

async fn list_orders_by_group_then_source_and_filters_by_group(backend: Backend) {
    let checkpoints = &backend.checkpoints;
    // Upper case sorts before lower case bytewise, after it in most locales.
    let claimed = [
        ("billing", "stream:orders/o-1"),
        ("Audit", "log"),
        ("billing", "category:orders"),
        ("billing", "category:Orders"),
        ("billing", "log"),
        ("audit", "category:orders"),
    ];
    for (n, (group, text)) in claimed.into_iter().enumerate() {
        let (claim, _) = checkpoints
            .claim(group, &source(text), &format!("owner-{n}"))
            .await
            .unwrap();
        checkpoints.save(&claim, cursor(n as u64, 0)).await.unwrap();
    }
    let keys = |checkpoints: &[Checkpoint]| -> Vec<(String, String)> {
        checkpoints
            .iter()
            .map(|c| (c.group.clone(), c.source.to_string()))
            .collect()
    };
    let owned = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(g, s)| (g.to_string(), s.to_string()))
            .collect()
    };

    let all = checkpoints.list(None).await.unwrap();
    assert_eq!(
        keys(&all),
        owned(&[
            ("Audit", "log"),
            ("audit", "category:orders"),
            ("billing", "category:Orders"),
            ("billing", "category:orders"),
            ("billing", "log"),
            ("billing", "stream:orders/o-1"),
        ])
    );
    // Whole rows, not just keys: owner and cursor come with each.
    assert_eq!(
        (all[0].owner.as_str(), all[0].cursor),
        ("owner-1", cursor(1, 0))
    );
    for checkpoint in &all {
        assert_eq!(
            checkpoints
                .load(&checkpoint.group, &checkpoint.source)
                .await
                .unwrap()
                .as_ref(),
            Some(checkpoint)
        );
    }

    let billing = checkpoints.list(Some("billing")).await.unwrap();
    assert_eq!(billing, all[2..]);
    let audit = checkpoints.list(Some("audit")).await.unwrap();
    assert_eq!(keys(&audit), owned(&[("audit", "category:orders")]));
    assert!(checkpoints.list(Some("nobody")).await.unwrap().is_empty());
}

async fn a_save_without_a_claimed_row_is_fenced_and_creates_nothing(backend: Backend) {
    let checkpoints = &backend.checkpoints;
    let orders = source("category:orders");
    assert_eq!(checkpoints.load("billing", &orders).await.unwrap(), None);
    // A claim this store never handed out, e.g. from before the row was deleted.
    let stray = Claim {
        group: "billing".into(),
        source: orders.clone(),
        owner: "n1/1".into(),
        token: Uuid::new_v4(),
    };
    expect_fenced(checkpoints.save(&stray, cursor(5, 5)).await, &stray, "");
    assert_eq!(checkpoints.load("billing", &orders).await.unwrap(), None);
    assert!(checkpoints.list(None).await.unwrap().is_empty());

    // With the row claimed by someone else, a stray token is still refused.
    let (claim, _) = checkpoints.claim("billing", &orders, "n2/1").await.unwrap();
    expect_fenced(checkpoints.save(&stray, cursor(5, 5)).await, &stray, "n2/1");
    let row = checkpoints.load("billing", &orders).await.unwrap().unwrap();
    assert_eq!(row.cursor, Cursor::START);
    assert_eq!(row.owner, claim.owner);
}

// ---- dead letters ----

fn letter(group: &str, text: &str, sequence: u64) -> NewDeadLetter {
    NewDeadLetter {
        group: group.into(),
        source: source(text),
        event_id: Uuid::now_v7(),
        sequence,
        kind: format!("kind-{sequence}"),
        error: format!("error {sequence}: the processor gave up"),
        attempts: sequence as u32 % 7 + 1,
    }
}

/// Records `letters` in order and returns them as stored.
async fn record_all(store: &dyn DeadLetterStore, letters: &[NewDeadLetter]) -> Vec<DeadLetter> {
    let mut stored = Vec::new();
    for letter in letters {
        stored.push(store.record(letter).await.unwrap());
    }
    stored
}

async fn record_returns_increasing_ids_and_the_stored_fields(backend: Backend) {
    let store = &*backend.dead_letters;
    assert!(store.list(None, 0, 100).await.unwrap().is_empty());
    let letters = [
        letter("billing", "category:orders", 10),
        letter("audit", "stream:orders/o-1", 11),
        NewDeadLetter {
            attempts: u32::MAX >> 1,
            sequence: i64::MAX as u64,
            ..letter("billing", "log", 12)
        },
    ];
    let before = chrono::Utc::now() - chrono::Duration::seconds(60);
    let stored = record_all(store, &letters).await;

    assert!(stored.windows(2).all(|w| w[0].id < w[1].id), "{stored:?}");
    assert!(stored[0].id > 0, "0 is `after` for the beginning");
    for (stored, sent) in stored.iter().zip(&letters) {
        assert_eq!(
            (
                &stored.group,
                &stored.source,
                stored.event_id,
                stored.sequence,
                &stored.kind,
                &stored.error,
                stored.attempts
            ),
            (
                &sent.group,
                &sent.source,
                sent.event_id,
                sent.sequence,
                &sent.kind,
                &sent.error,
                sent.attempts
            )
        );
        // On the store's clock, which is near this one.
        assert!(stored.recorded_at > before, "{}", stored.recorded_at);
    }
    // Exactly as recorded, recorded_at to the microsecond included.
    assert_eq!(store.list(None, 0, 100).await.unwrap(), stored);
}

async fn list_filters_by_group_and_pages_oldest_first(backend: Backend) {
    let store = &*backend.dead_letters;
    let letters: Vec<NewDeadLetter> = (0..7)
        .map(|n| {
            let group = if n % 3 == 1 { "audit" } else { "billing" };
            letter(group, "category:orders", 100 + n)
        })
        .collect();
    let stored = record_all(store, &letters).await;
    let billing: Vec<DeadLetter> = stored
        .iter()
        .filter(|l| l.group == "billing")
        .cloned()
        .collect();
    let audit: Vec<DeadLetter> = stored
        .iter()
        .filter(|l| l.group == "audit")
        .cloned()
        .collect();
    assert_eq!((billing.len(), audit.len()), (5, 2));

    assert_eq!(store.list(None, 0, 100).await.unwrap(), stored);
    assert_eq!(store.list(Some("billing"), 0, 100).await.unwrap(), billing);
    assert_eq!(store.list(Some("audit"), 0, 100).await.unwrap(), audit);
    assert!(store.list(Some("nobody"), 0, 100).await.unwrap().is_empty());

    // The limit takes the oldest.
    assert_eq!(store.list(None, 0, 3).await.unwrap(), stored[..3]);
    assert_eq!(
        store.list(Some("billing"), 0, 2).await.unwrap(),
        billing[..2]
    );
    assert!(store.list(None, 0, 0).await.unwrap().is_empty());

    // `after` is exclusive, also when the id is another group's.
    assert_eq!(
        store.list(None, stored[2].id, 100).await.unwrap(),
        stored[3..]
    );
    assert_eq!(
        store
            .list(Some("billing"), stored[1].id, 100)
            .await
            .unwrap(),
        billing[1..]
    );
    assert!(
        store
            .list(None, stored[6].id, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.list(None, u64::MAX, 100).await.unwrap().is_empty());

    // Paging by the last id seen, two at a time, visits each of a group's letters once.
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page = store.list(Some("billing"), after, 2).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.id;
        paged.extend(page);
    }
    assert_eq!(paged, billing);
}

// ---- Postgres only ----

/// The test's Postgres backend and a plain connection to its database.
async fn postgres_with_client() -> Option<(Backend, tokio_postgres::Client, String)> {
    let backend = Backend::postgres().await?;
    let db = backend
        .db
        .as_ref()
        .expect("a Postgres backend has a database");
    let client = db.raw_client().await;
    let schema = format!("\"{}\"", db.schema);
    Some((backend, client, schema))
}

/// Under a column collation where `a` sorts before `B` (the test database's own may be
/// bytewise already), list still orders bytewise, as the memory store does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_list_is_bytewise_whatever_the_collation() {
    let Some((backend, client, schema)) = postgres_with_client().await else {
        return;
    };
    let icu: Option<String> = client
        .query_opt(
            "SELECT collname::text FROM pg_collation WHERE collname = 'en-US-x-icu'",
            &[],
        )
        .await
        .unwrap()
        .map(|row| row.get(0));
    if icu.is_none() {
        let missing = "this Postgres has no en-US-x-icu collation (it was built without ICU)";
        assert!(
            !common::services_required(),
            "WEIR_REQUIRE_SERVICES=1 but {missing}"
        );
        eprintln!("skipping: {missing}");
        return;
    }
    client
        .batch_execute(&format!(
            "ALTER TABLE {schema}.weir_checkpoints \
               ALTER COLUMN group_name TYPE text COLLATE \"en-US-x-icu\", \
               ALTER COLUMN source TYPE text COLLATE \"en-US-x-icu\""
        ))
        .await
        .unwrap();
    let checkpoints = &backend.checkpoints;
    for (group, text) in [
        ("a", "category:b"),
        ("B", "log"),
        ("a", "category:C"),
        ("a", "category:a"),
    ] {
        checkpoints.claim(group, &source(text), "n1").await.unwrap();
    }
    // The columns' own order really is not bytewise, or this test proves nothing.
    let column_order: Vec<String> = client
        .query(
            &format!(
                "SELECT group_name || ' ' || source FROM {schema}.weir_checkpoints \
                 ORDER BY group_name, source"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        column_order,
        ["a category:a", "a category:b", "a category:C", "B log"]
    );

    let keys = |list: Vec<Checkpoint>| -> Vec<String> {
        list.iter()
            .map(|c| format!("{} {}", c.group, c.source))
            .collect()
    };
    assert_eq!(
        keys(checkpoints.list(None).await.unwrap()),
        ["B log", "a category:C", "a category:a", "a category:b"]
    );
    assert_eq!(
        keys(checkpoints.list(Some("a")).await.unwrap()),
        ["a category:C", "a category:a", "a category:b"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_values_its_columns_cannot_hold() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let orders = source("category:orders");
    let (claim, _) = backend
        .checkpoints
        .claim("billing", &orders, "n1")
        .await
        .unwrap();
    for beyond in [
        cursor(i64::MAX as u64 + 1, 0),
        cursor(0, i64::MAX as u64 + 1),
        cursor(u64::MAX, u64::MAX),
    ] {
        match backend.checkpoints.save(&claim, beyond).await {
            Err(CheckpointError::Store(weir::store::Error::Backend(message))) => {
                assert!(message.contains(&beyond.to_string()), "{message}");
                assert!(message.contains("at most"), "{message}");
            }
            other => panic!("saving {beyond}: expected a backend error, got {other:?}"),
        }
    }
    let row = backend
        .checkpoints
        .load("billing", &orders)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.cursor, Cursor::START, "nothing was written");

    for beyond in [
        NewDeadLetter {
            sequence: i64::MAX as u64 + 1,
            ..letter("billing", "log", 1)
        },
        NewDeadLetter {
            attempts: i32::MAX as u32 + 1,
            ..letter("billing", "log", 1)
        },
    ] {
        match backend.dead_letters.record(&beyond).await {
            Err(weir::store::Error::Backend(message)) => {
                assert!(message.contains(&beyond.event_id.to_string()), "{message}");
            }
            other => panic!("recording {beyond:?}: expected a backend error, got {other:?}"),
        }
    }
    assert!(
        backend
            .dead_letters
            .list(None, 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_negative_values_read_back_are_backend_errors() {
    let Some((backend, client, schema)) = postgres_with_client().await else {
        return;
    };
    let orders = source("category:orders");
    backend
        .checkpoints
        .claim("billing", &orders, "n1")
        .await
        .unwrap();
    // As an operator's mistaken hand edit would leave it.
    client
        .batch_execute(&format!(
            "UPDATE {schema}.weir_checkpoints SET sequence = -3"
        ))
        .await
        .unwrap();
    let expect_negative_cursor = |outcome: Result<(), CheckpointError>, what: &str| match outcome {
        Err(CheckpointError::Store(weir::store::Error::Backend(message))) => {
            assert!(
                message.contains("negative cursor 0:-3"),
                "{what}: {message}"
            );
        }
        other => panic!("{what}: expected a backend error, got {other:?}"),
    };
    expect_negative_cursor(
        backend.checkpoints.load("billing", &orders).await.map(drop),
        "load",
    );
    expect_negative_cursor(backend.checkpoints.list(None).await.map(drop), "list");
    expect_negative_cursor(
        backend
            .checkpoints
            .claim("billing", &orders, "n2")
            .await
            .map(drop),
        "claim",
    );

    let recorded = backend
        .dead_letters
        .record(&letter("billing", "log", 1))
        .await
        .unwrap();
    for (column, value) in [("sequence", -1), ("attempts", -2)] {
        client
            .batch_execute(&format!(
                "UPDATE {schema}.weir_dead_letters SET {column} = {value}"
            ))
            .await
            .unwrap();
        match backend.dead_letters.list(None, 0, 100).await {
            Err(weir::store::Error::Backend(message)) => {
                assert!(
                    message.contains(&format!("{column} {value}")),
                    "{column}: {message}"
                );
            }
            other => panic!("{column} {value}: expected a backend error, got {other:?}"),
        }
        // Put it back, so the next column is the only one wrong.
        client
            .batch_execute(&format!(
                "UPDATE {schema}.weir_dead_letters SET sequence = {}, attempts = {}",
                recorded.sequence, recorded.attempts
            ))
            .await
            .unwrap();
    }
}
