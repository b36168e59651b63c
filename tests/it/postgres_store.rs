//! What only the Postgres store has: migrations, the visibility horizon, and
//! recovery from lost connections.

use std::time::Duration;

use serde_json::json;
use weir::event::{Category, Cursor, EventName, NewEvent, Source, StreamName, WriteCondition};
use weir::postgres::{PostgresStore, PostgresStoreOptions};
use weir::store::{Error, EventStore};

use crate::common::{self, TestPostgres};

fn one_event() -> Vec<NewEvent> {
    vec![NewEvent::new(
        EventName::new("Happened").unwrap(),
        json!({}),
    )]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_under_concurrency() {
    let Some(db) = TestPostgres::start().await else {
        return;
    };
    // The harness migrated once; four more at the same time change nothing.
    let mut runs = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let store = db.store.clone();
        runs.spawn(async move { store.migrate().await });
    }
    while let Some(report) = runs.join_next().await {
        let report = report.unwrap().unwrap();
        assert!(report.applied.is_empty(), "{report:?}");
        assert_eq!(report.version, weir::postgres::CURRENT_VERSION);
    }
    let client = db.raw_client().await;
    // Versions may skip numbers (a number is reserved for a change still on its
    // way), so the newest one recorded is what must match.
    let newest: i32 = client
        .query_one(
            &format!("SELECT max(version) FROM \"{}\".weir_migrations", db.schema),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(newest, weir::postgres::CURRENT_VERSION);
    db.store.check_schema().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_schemas_migrate_concurrently_and_unmigrated_ones_say_so() {
    let Some(db) = TestPostgres::start().await else {
        return;
    };
    let schema = common::unique_name("weir_fresh");
    let options = PostgresStoreOptions::new(common::postgres_url()).schema(&schema);
    let store = PostgresStore::connect(&options).unwrap();

    let err = store.check_schema().await.unwrap_err();
    assert!(matches!(err, Error::NotMigrated { found: 0, .. }), "{err}");
    assert!(err.to_string().contains("run `weir migrate`"), "{err}");
    let err = store
        .append(
            &Category::new("c").unwrap(),
            &StreamName::new("s").unwrap(),
            WriteCondition::Any,
            one_event(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("weir migrate"), "{err}");

    let store = std::sync::Arc::new(store);
    let mut runs = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let store = store.clone();
        runs.spawn(async move { store.migrate().await.unwrap().applied.len() });
    }
    let mut applied = Vec::new();
    while let Some(count) = runs.join_next().await {
        applied.push(count.unwrap());
    }
    applied.sort();
    let recorded: i64 = db
        .raw_client()
        .await
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".weir_migrations"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, [0, 0, 0, recorded as usize]);
    store.check_schema().await.unwrap();
    db.raw_client()
        .await
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

/// An append that commits while an older transaction is still open stays unreadable
/// from the log and its category until that transaction ends: otherwise a reader
/// could move past the older transaction's events before they commit. On a
/// private server: the open transaction would hold back every other test's
/// readers on the shared one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_holds_log_readers_back() {
    let Some(db) = TestPostgres::private().await else {
        return;
    };
    let (category, stream) = (
        Category::new("held").unwrap(),
        StreamName::new("s").unwrap(),
    );
    let mut blocker = db.raw_client().await;
    let open = blocker.transaction().await.unwrap();
    // Taking a transaction id is what puts it in every snapshot's horizon.
    open.execute("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();

    let appended = db
        .store
        .append(&category, &stream, WriteCondition::Any, one_event())
        .await
        .unwrap();
    let log = db
        .store
        .read(&Source::Log, Cursor::START, 10)
        .await
        .unwrap();
    assert!(log.is_empty(), "read past an open transaction: {log:?}");
    assert!(
        db.store
            .head(&Source::Category(category.clone()))
            .await
            .unwrap()
            .is_none()
    );
    // A stream's appends are serialised, so its own reads need not wait.
    let own = db
        .store
        .read(
            &Source::Stream(category.clone(), stream.clone()),
            Cursor::START,
            10,
        )
        .await
        .unwrap();
    assert_eq!(own, appended);

    open.rollback().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = db
            .store
            .read(&Source::Category(category.clone()), Cursor::START, 10)
            .await
            .unwrap();
        if !log.is_empty() {
            assert_eq!(log, appended);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never became readable"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Connections killed under the store are replaced: reads retry, the notification
/// listener reconnects and keeps waking watchers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connections_are_restored() {
    let Some(db) = TestPostgres::start().await else {
        return;
    };
    let (category, stream) = (
        Category::new("lost").unwrap(),
        StreamName::new("s").unwrap(),
    );
    let source = Source::Stream(category.clone(), stream.clone());
    let mut watcher = db.store.watch().await.unwrap();
    db.store.read(&source, Cursor::START, 10).await.unwrap();

    let killed: i64 = db
        .raw_client()
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&db.schema],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        killed >= 2,
        "expected the pooled and the listening connection, killed {killed}"
    );

    assert!(
        db.store
            .read(&source, Cursor::START, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The listener announces the gap while it was away...
    tokio::time::timeout(Duration::from_secs(15), watcher.appended(&source))
        .await
        .expect("a wake-up after the listener reconnects");
    // ...and hears appends again on its new connection.
    db.store
        .append(&category, &stream, WriteCondition::Any, one_event())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(15), watcher.appended(&source))
        .await
        .expect("a notification over the restored connection");
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_retryable_error() {
    // Nothing listens on port 1.
    let options = PostgresStoreOptions {
        connect_timeout: Duration::from_millis(200),
        ..PostgresStoreOptions::new("postgres://postgres@127.0.0.1:1/test")
    };
    let store = PostgresStore::connect(&options).unwrap();
    let err = store.check_schema().await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        err.to_string().contains("cannot reach the event store"),
        "{err}"
    );
}

/// A store created and filled by the migrations before slices (1 to 3) gains
/// them through `weir migrate`: every stored event gets its slice, and its
/// partitions read back exactly the category.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_populated_store_upgrades_to_slices() {
    // Borrowed only for its connection and to know Postgres is there.
    let Some(db) = TestPostgres::start().await else {
        return;
    };
    let client = db.raw_client().await;
    let schema = common::unique_name("weir_upgrade");
    let migrations = concat!(env!("CARGO_MANIFEST_DIR"), "/src/postgres/migrations");
    let mut setup = format!(
        "CREATE SCHEMA {schema}; SET search_path TO {schema};
         CREATE TABLE weir_migrations (version integer PRIMARY KEY, name text NOT NULL,
                                       applied_at timestamptz NOT NULL DEFAULT now());"
    );
    for (version, file) in [
        (1, "0001_events"),
        (2, "0002_broker"),
        (3, "0003_consumers"),
    ] {
        let sql = std::fs::read_to_string(format!("{migrations}/{file}.sql")).unwrap();
        let name = &file[5..];
        setup.push_str(&format!(
            "{sql}\nINSERT INTO weir_migrations (version, name) VALUES ({version}, '{name}');\n"
        ));
    }
    // 300 events over 100 streams, written by the old schema's own append function.
    setup.push_str(
        "SELECT weir_append('orders', array_agg('s-' || (i % 100)), array_agg(gen_random_uuid()),
                            array_agg('Happened'::text), array_agg('{}'::json), array_agg('{}'::json),
                            array_agg(now()), array_agg(NULL::text), '{}'::jsonb)
           FROM generate_series(1, 300) AS i;",
    );
    client.batch_execute(&setup).await.unwrap();

    let url = common::postgres_url();
    let store = PostgresStore::connect(&PostgresStoreOptions::new(url).schema(&schema)).unwrap();
    let report = store.migrate().await.unwrap();
    // Every later migration too, up to the newest.
    assert_eq!(
        report.applied[..2],
        [(4, "slices".to_owned()), (5, "claim grants".to_owned())]
    );
    assert_eq!(report.version, weir::postgres::CURRENT_VERSION);

    let orders = Category::new("orders").unwrap();
    let whole = store
        .read(&Source::Category(orders.clone()), Cursor::START, 1_000)
        .await
        .unwrap();
    assert_eq!(whole.len(), 300);
    let mut total = 0;
    for source in Source::Category(orders).split(16).unwrap() {
        let events = store.read(&source, Cursor::START, 1_000).await.unwrap();
        assert!(events.iter().all(|e| source.holds(e)), "{source}");
        total += events.len();
    }
    assert_eq!(
        total, 300,
        "the partitions of the upgraded store cover it exactly"
    );
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
