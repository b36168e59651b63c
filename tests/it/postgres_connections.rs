//! The connection budget of a node, against a private server with a small
//! `max_connections`: how many connections a running node holds (at most
//! `store.pool_size` + 1, the pool and the LISTEN connection), and what it does
//! when Postgres refuses it new ones: it says why once, answers `/readyz` with
//! 503 and that reason while it lasts, and is ready again once connections open.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::cli::{Running, TempDir, block_on, wait_for_consuming, weir};
use crate::common::node::{free_port, http_get};
use crate::common::services::{PostgresSetup, PrivatePostgres};

/// How long a node may take to become ready, or not ready, after a change.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections of a role through the socket, held until dropped.
struct Held {
    clients: Vec<tokio_postgres::Client>,
    runtime: tokio::runtime::Runtime,
}

impl Held {
    /// Opens connections as `user` until the server refuses one; returns them
    /// and the refusal.
    fn fill(postgres: &PrivatePostgres, user: &str) -> (Self, String) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let url = format!(
            "host={} port={} user={user} dbname=postgres",
            postgres.socket_dir().display(),
            postgres.port
        );
        let mut clients = Vec::new();
        let refusal = runtime.block_on(async {
            loop {
                match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((client, connection)) => {
                        tokio::spawn(connection);
                        clients.push(client);
                        assert!(clients.len() < 100, "the server never refused");
                    }
                    Err(error) => {
                        break error
                            .as_db_error()
                            .map_or_else(|| error.to_string(), |db| db.message().to_owned());
                    }
                }
            }
        });
        (Self { clients, runtime }, refusal)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.clients.clear();
        // Let the connections' tasks see their clients gone and close.
        self.runtime
            .block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
    }
}

fn sql(postgres: &PrivatePostgres, statement: &str) -> Vec<tokio_postgres::Row> {
    let url = postgres.socket_url("postgres");
    block_on(async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect through the socket (superusers have reserved slots)");
        tokio::spawn(connection);
        client
            .query(statement, &[])
            .await
            .expect("run the statement")
    })
}

/// Waits until `/readyz` answers `code`; returns its body.
#[track_caller]
fn wait_for_readyz(node: &mut Running, http: SocketAddr, code: u16) -> String {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok((got, body)) = http_get(http, "/readyz") {
            if got == code {
                return body;
            }
        }
        if Instant::now() > deadline {
            panic!(
                "/readyz did not answer {code} within {READY_TIMEOUT:?}; stderr:\n{}",
                node.stderr_so_far()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_node_stays_within_its_budget_and_is_not_ready_while_postgres_refuses_connections() {
    // 12 slots; 3 of them only superusers (this test's own checks) may use.
    let setup = PostgresSetup {
        settings: vec![
            "max_connections = 12".into(),
            "superuser_reserved_connections = 3".into(),
        ],
        ..PostgresSetup::default()
    };
    let Some(postgres) = PrivatePostgres::start_with(setup) else {
        return;
    };
    for statement in [
        "CREATE ROLE weir_app LOGIN",
        "CREATE ROLE hog LOGIN",
        "GRANT CREATE ON DATABASE postgres TO weir_app",
    ] {
        sql(&postgres, statement);
    }
    let dir = TempDir::new();
    let pool_size = 4;
    let config = dir.file(
        "weir.toml",
        &format!(
            "[store]\nkind = \"postgres\"\nurl = \"postgres://weir_app@127.0.0.1:{}/postgres?sslmode=disable\"\n\
             schema = \"budget\"\npool_size = {pool_size}\n\n\
             [[subscriptions]]\ngroup = \"shipping\"\nsources = [\"category:orders\", \"category:refunds\"]\ninstances = 2\n",
            postgres.port
        ),
    );
    let config = config.to_str().unwrap();
    let mut migrate = weir(&["--config", config, "migrate"]);
    let status = migrate.status().expect("run weir migrate");
    assert!(status.success());

    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = weir(&["--config", config, "run", "--node-id", "budget"]);
    command.env("WEIR_HTTP__LISTEN", http.to_string());
    let mut node = Running::start(command);
    wait_for_consuming(&mut node, "budget/1");
    wait_for_consuming(&mut node, "budget/2");
    wait_for_readyz(&mut node, http, 200);

    // Within its budget: the pool's connections and the LISTEN connection.
    let count = || -> i64 {
        sql(
            &postgres,
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'weir_app'",
        )[0]
        .get(0)
    };
    std::thread::sleep(Duration::from_secs(3));
    let held = count();
    eprintln!("a full node with two consumers holds {held} connections (pool_size {pool_size})");
    assert!(
        (1..=pool_size + 1).contains(&held),
        "{held} connections, more than pool_size + 1"
    );

    // Another client takes every slot a non-superuser may use, and the node's
    // connections are closed (as a restarting pooler or an operator would):
    // the node cannot open new ones.
    sql(&postgres, "ALTER ROLE weir_app CONNECTION LIMIT 0");
    sql(
        &postgres,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'weir_app'",
    );
    let (hogs, refusal) = Held::fill(&postgres, "hog");
    assert!(
        refusal.contains("reserved for non-replication superuser"),
        "{refusal}"
    );
    sql(&postgres, "ALTER ROLE weir_app CONNECTION LIMIT -1");
    let outage = Instant::now();
    let stderr_before = node.stderr_so_far().lines().count();

    let body = wait_for_readyz(&mut node, http, 503);
    assert!(body.contains("max_connections"), "{body}");
    assert!(body.contains("pool_size"), "{body}");
    // Not ready for as long as it lasts.
    std::thread::sleep(Duration::from_secs(5));
    let body = wait_for_readyz(&mut node, http, 503);
    assert!(body.contains("cannot open a new connection"), "{body}");

    // Said once, not by every caller's every attempt.
    let during = node.stderr_so_far();
    let during: Vec<&str> = during.lines().skip(stderr_before).collect();
    let warnings = during
        .iter()
        .filter(|line| line.contains("cannot open a connection to the event store"))
        .count();
    eprintln!(
        "{} lines logged in {:?} of refused connections:\n{}",
        during.len(),
        outage.elapsed(),
        during.join("\n")
    );
    assert!(warnings <= 2, "{warnings} warnings:\n{}", during.join("\n"));
    // No warning repeats while the outage lasts: each says what failed once.
    let mut seen = std::collections::BTreeMap::new();
    for line in during.iter().filter(|line| line.contains(" WARN ")) {
        let (_, message) = line.split_once(" WARN ").expect("a level");
        let message: String = message.chars().take(100).collect();
        *seen.entry(message).or_insert(0) += 1;
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        repeated
            .iter()
            .all(|(message, _)| message.starts_with("deadpool")),
        "repeated warnings {repeated:#?}\n{}",
        during.join("\n")
    );

    drop(hogs);
    wait_for_readyz(&mut node, http, 200);
    node.wait_for_stderr_line(
        |line| line.contains("connections to the event store open again"),
        READY_TIMEOUT,
    );
    node.terminate();
    let status = node.expect_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", node.stderr_so_far());
}
