//! Reads of events from a hot standby (`[store] read_url`), against a private
//! primary and a streaming standby made from it with `pg_basebackup -R`: what the
//! gap-free rule rests on, checked on the PostgreSQL these tests run; the
//! concurrent-writers test with its readers on the standby; and a node reading
//! from the standby while it is stopped and started again.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use weir::event::{Category, EventName, NewEvent, StreamName, WriteCondition};
use weir::postgres::{PostgresStore, PostgresStoreOptions};
use weir::store::{EventStore, StreamAppend};

use crate::cli::{Running, TempDir, wait_for_consuming, weir};
use crate::common::services::{PostgresSetup, PrivatePostgres};

/// A primary and its streaming standby; `None` when the programs are missing.
fn primary_and_standby() -> Option<(PrivatePostgres, PrivatePostgres)> {
    // Commits flushed at once, so that the standby receives each promptly.
    let primary = PrivatePostgres::start_with(PostgresSetup {
        settings: vec!["synchronous_commit = on".into()],
        ..PostgresSetup::default()
    })?;
    let standby = PrivatePostgres::start_standby(&primary, PostgresSetup::default())
        .unwrap_or_else(|error| panic!("cannot make a standby: {error}"));
    Some((primary, standby))
}

async fn client(postgres: &PrivatePostgres) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&postgres.socket_url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect through the socket");
    tokio::spawn(connection);
    client
}

/// Waits until the standby has replayed everything the primary wrote so far.
async fn caught_up(primary: &tokio_postgres::Client, standby: &tokio_postgres::Client) {
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done: bool = standby
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&lsn],
            )
            .await
            .unwrap()
            .get(0);
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the standby did not replay {lsn}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_snapshot_holds_back_readers_below_the_primarys_open_transactions() {
    let Some((primary, standby)) = tokio::task::block_in_place(primary_and_standby) else {
        return;
    };
    let (p, s) = (client(&primary).await, client(&standby).await);
    let in_recovery: bool = s
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery);
    // A standby has no transaction ids of its own to give.
    let error = s
        .query_one("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap_err();
    assert!(
        error
            .as_db_error()
            .is_some_and(|db| db.message().contains("recovery")),
        "{error:?}"
    );

    p.batch_execute("CREATE TABLE t (n int)").await.unwrap();
    // A transaction left open on the primary, holding a transaction id.
    let holder = client(&primary).await;
    holder
        .batch_execute("BEGIN; INSERT INTO t VALUES (0)")
        .await
        .unwrap();
    let open: String = holder
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0);
    let open: u64 = open.parse().unwrap();
    // Later transactions commit, and the standby replays them.
    for n in 1..=5 {
        p.execute("INSERT INTO t VALUES ($1)", &[&n]).await.unwrap();
    }
    caught_up(&p, &s).await;
    let standby_xmin: String = s
        .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
        .await
        .unwrap()
        .get(0);
    let standby_xmin: u64 = standby_xmin.parse().unwrap();
    let standby_xip: i64 = s
        .query_one(
            "SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot())",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "open on the primary: {open}; standby snapshot xmin {standby_xmin}, {standby_xip} ids listed in progress"
    );
    // The rule readers use, tx_id < xmin, keeps the open transaction (and all
    // after it) out on the standby as on the primary.
    assert!(standby_xmin <= open, "xmin {standby_xmin} > open {open}");
    let rows: i64 = s
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 5, "the committed rows are there, the open one is not");

    // Once it commits, the standby's xmin moves past it.
    holder.batch_execute("COMMIT").await.unwrap();
    p.execute("INSERT INTO t VALUES (6)", &[]).await.unwrap();
    caught_up(&p, &s).await;
    let later: String = s
        .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        later.parse::<u64>().unwrap() > open,
        "xmin {later} <= {open}"
    );

    // Promoted (as a failover would), it takes writes and keeps what it replayed.
    standby.promote().expect("promote the standby");
    let s = client(&standby).await;
    let in_recovery: bool = s
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery);
    s.execute("INSERT INTO t VALUES (7)", &[]).await.unwrap();
    let rows: i64 = s
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 8);
}

/// A store appending to `primary` and reading events from `standby`.
async fn store_with_standby(
    primary: &PrivatePostgres,
    standby: &PrivatePostgres,
    schema: &str,
) -> Arc<PostgresStore> {
    let mut options = PostgresStoreOptions::new(primary.url("postgres")).schema(schema);
    options.read_url = Some(standby.url("postgres"));
    let store = PostgresStore::connect(&options).expect("a store");
    store.migrate().await.expect("migrate");
    // The schema reaches the standby a moment later.
    caught_up(&client(primary).await, &client(standby).await).await;
    Arc::new(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_make_readers_on_a_standby_skip() {
    let Some((primary, standby)) = tokio::task::block_in_place(primary_and_standby) else {
        return;
    };
    let store = store_with_standby(&primary, &standby, "weir_standby").await;
    crate::store_conformance::concurrent_writers_never_make_readers_skip(store.clone()).await;
    // The readers' queries went to the standby.
    let s = client(&standby).await;
    let reads: i64 = s
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weir' \
             AND query LIKE '%weir_events%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reads > 0, "no reader connection on the standby");
}

fn append(runtime: &tokio::runtime::Runtime, store: &Arc<PostgresStore>, n: u64) {
    let store = store.clone();
    runtime.block_on(async move {
        store
            .append_batch(
                &Category::new("orders").unwrap(),
                vec![StreamAppend::new(
                    StreamName::new(format!("order-{}", n % 5)).unwrap(),
                    WriteCondition::Any,
                    vec![NewEvent::new(
                        EventName::new("Placed").unwrap(),
                        json!({ "n": n }),
                    )],
                )],
            )
            .await
            .expect("append to the primary");
    });
}

#[test]
fn a_node_reading_from_a_standby_falls_back_to_the_primary_while_it_is_stopped() {
    let Some((primary, standby)) = primary_and_standby() else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(store_with_standby(&primary, &standby, "weir_bridge"));
    let dir = TempDir::new();
    let config = dir.file(
        "weir.toml",
        &format!(
            "[store]\nkind = \"postgres\"\nurl = \"{}\"\nread_url = \"{}\"\nschema = \"weir_bridge\"\n\n\
             [[subscriptions]]\ngroup = \"bridge\"\nsources = [\"category:orders\"]\n\n\
             [subscriptions.consumer]\npoll_interval = \"200ms\"\n",
            primary.url("postgres"),
            standby.url("postgres")
        ),
    );
    let mut node = Running::start(weir(&[
        "--config",
        config.to_str().unwrap(),
        "run",
        "--node-id",
        "reader",
    ]));
    wait_for_consuming(&mut node, "reader/1");

    let mut next = 0u64;
    let mut printed = Vec::new();
    let mut append_and_collect =
        |node: &mut Running, count: u64, printed: &mut Vec<serde_json::Value>| {
            for _ in 0..count {
                append(&runtime, &store, next);
                next += 1;
            }
            while (printed.len() as u64) < next {
                printed.push(node.next_json(
                    Duration::from_secs(30),
                    "an appended event",
                    Duration::from_secs(30),
                    || {},
                ));
            }
        };
    append_and_collect(&mut node, 20, &mut printed);

    // The standby stops: reads go to the primary, nothing is lost.
    standby.stop().expect("stop the standby");
    append_and_collect(&mut node, 20, &mut printed);
    node.wait_for_stderr_line(
        |line| line.contains("reading events from the primary"),
        Duration::from_secs(30),
    );

    // Back, and caught up: reads return to it.
    standby.start_again().expect("start the standby again");
    node.wait_for_stderr_line(
        |line| line.contains("reading events from the standby"),
        Duration::from_secs(60),
    );
    append_and_collect(&mut node, 20, &mut printed);

    // Every event once, each stream in order.
    let ids: HashSet<String> = printed.iter().map(|e| e["id"].to_string()).collect();
    assert_eq!(ids.len(), printed.len(), "an event printed twice");
    assert_eq!(printed.len(), 60);
    let mut positions: BTreeMap<String, u64> = BTreeMap::new();
    for event in &printed {
        let stream = event["stream"].as_str().unwrap().to_owned();
        let expected = positions.entry(stream.clone()).or_default();
        assert_eq!(
            event["position"].as_u64(),
            Some(*expected),
            "{stream} out of order"
        );
        *expected += 1;
    }
    node.terminate();
    let status = node.expect_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", node.stderr_so_far());
    drop(runtime);
}
