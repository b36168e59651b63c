//! TLS towards Postgres through the `weir` binary, against private servers with
//! `ssl = on`, a certificate authority and certificates made here with the
//! `openssl` command line, and a `pg_hba.conf` that lets TCP clients in over TLS
//! only (`hostssl`): `sslmode` with libpq's meaning on every connection weir
//! opens (migrations, appends, `read --follow` and its LISTEN connection, a
//! node's pool), each failure named with the setting to change (exit 69), and
//! client certificates with an encrypted key whose password `config check` hides.
//!
//! Each test starts its own servers (`common::services::PrivatePostgres`), so
//! the module needs PostgreSQL's server programs and `openssl`, not the shared
//! test server.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::cli::{
    FINISH_TIMEOUT, Finished, Running, START_TIMEOUT, TempDir, block_on, finish,
    wait_for_consuming, weir,
};
use crate::common::certs::{Issued, TestCa};
use crate::common::services::{PostgresSetup, PrivatePostgres};

/// The exit code of a service that cannot be reached (`CliError::exit_code`).
const EXIT_UNAVAILABLE: i32 = 69;
const EXIT_CONFIG: i32 = 64;
/// How often the follower's wake-up is repeated while a test waits for a line.
const NOTICE_REPEAT: Duration = Duration::from_millis(500);

/// A private server that speaks TLS with a certificate for `localhost` only,
/// signed by `ca`, and lets TCP clients in only over TLS: with a client
/// certificate (CN = the user) for the database `certdb`, without one for the
/// others. Unix-socket clients (the test's own checks) need neither.
struct TlsServer {
    postgres: PrivatePostgres,
    ca: TestCa,
}

impl TlsServer {
    fn start() -> Option<Self> {
        let ca = TestCa::new("weir test CA")?;
        let server = ca.issue("server", "localhost", &["DNS:localhost"]);
        let read = |path: &Path| std::fs::read(path).expect("read a certificate file");
        let setup = PostgresSetup {
            settings: vec![
                "ssl = on".into(),
                "ssl_cert_file = 'server.crt'".into(),
                "ssl_key_file = 'server.key'".into(),
                "ssl_ca_file = 'root.crt'".into(),
            ],
            hba: Some(
                "local all all trust\n\
                 hostssl certdb all 127.0.0.1/32 cert\n\
                 hostssl all all 127.0.0.1/32 trust\n\
                 hostssl all all ::1/128 trust\n"
                    .into(),
            ),
            files: vec![
                ("server.crt".into(), read(&server.cert)),
                ("server.key".into(), read(&server.key)),
                ("root.crt".into(), read(&ca.cert())),
            ],
        };
        let postgres = PrivatePostgres::start_with(setup)?;
        Some(Self { postgres, ca })
    }

    /// Runs `sql` through the Unix socket (no TLS needed there).
    fn query(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        query(&self.postgres, sql)
    }
}

fn query(postgres: &PrivatePostgres, sql: &str) -> Vec<tokio_postgres::Row> {
    let url = postgres.socket_url("postgres");
    block_on(async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect through the socket");
        tokio::spawn(connection);
        client.query(sql, &[]).await.expect("run the query")
    })
}

/// A config file for the store at `host:port` of `database` with `sslmode`,
/// `[store.tls]` as `tls` (TOML lines) and `more` after it.
fn config_file(dir: &TempDir, name: &str, url: &str, tls: &[(&str, &str)], more: &str) -> String {
    let mut text = format!(
        "[store]\nkind = \"postgres\"\nurl = \"{url}\"\nschema = \"weir_tls\"\n\n[store.tls]\n"
    );
    for (key, value) in tls {
        text.push_str(&format!("{key} = {value:?}\n"));
    }
    text.push_str(more);
    dir.file(name, &text).to_str().unwrap().to_owned()
}

fn url(host: &str, port: u16, database: &str, sslmode: &str) -> String {
    format!("postgres://postgres@{host}:{port}/{database}?sslmode={sslmode}")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

#[track_caller]
fn weir_with(config: &str, args: &[&str]) -> Finished {
    let mut all = vec!["--config", config];
    all.extend_from_slice(args);
    finish(weir(&all), None)
}

#[track_caller]
fn expect_unavailable(finished: Finished, needles: &[&str]) {
    let finished = finished.expect_code(EXIT_UNAVAILABLE);
    for needle in needles {
        finished_has(&finished, needle);
    }
}

#[track_caller]
fn finished_has(finished: &Finished, needle: &str) {
    assert!(
        finished.stderr.contains(needle),
        "stderr lacks {needle:?}\n{}",
        finished.context()
    );
}

#[test]
fn verify_full_with_the_right_ca_works_end_to_end() {
    let Some(server) = TlsServer::start() else {
        return;
    };
    let port = server.postgres.port;
    let dir = TempDir::new();
    let config = config_file(
        &dir,
        "weir.toml",
        &url("localhost", port, "postgres", "verify-full"),
        &[("ca_file", path(&server.ca.cert()))],
        "\n[[subscriptions]]\ngroup = \"shipping\"\nsources = [\"category:orders\"]\n",
    );
    weir_with(&config, &["migrate"]).expect_success();
    let append = |stream: &str, n: u32| {
        weir_with(
            &config,
            &[
                "append",
                "--category",
                "orders",
                "--stream",
                stream,
                "--name",
                "Placed",
                "--payload",
                &format!("{{\"n\":{n}}}"),
            ],
        )
        .expect_success()
        .json_lines()
    };
    let first = append("order-1", 0);

    // Polling only every minute: new events reach the follower through its
    // LISTEN connection, which must speak TLS too.
    let mut follower = Running::start(weir(&[
        "--config",
        &config,
        "read",
        "--source",
        "category:orders",
        "--follow",
        "--poll-interval",
        "60s",
    ]));
    let wake = || {
        server.query("NOTIFY \"weir_tls.appended\", 'orders'");
    };
    let event = follower.next_json(FINISH_TIMEOUT, "the first event", NOTICE_REPEAT, wake);
    assert_eq!(event["id"], first[0]["id"], "{event}");

    let mut node = Running::start(weir(&["--config", &config, "run", "--node-id", "node-tls"]));
    wait_for_consuming(&mut node, "node-tls/1");
    let printed = node.next_json(START_TIMEOUT, "the first event", START_TIMEOUT, || {});
    assert_eq!(printed["id"], first[0]["id"], "{printed}");

    let second = append("order-2", 1);
    let event = follower.next_json(FINISH_TIMEOUT, "an appended event", NOTICE_REPEAT, wake);
    assert_eq!(event["id"], second[0]["id"], "{event}");
    let printed = node.next_json(START_TIMEOUT, "an appended event", START_TIMEOUT, || {});
    assert_eq!(printed["id"], second[0]["id"], "{printed}");

    // Every connection weir holds now (the node's pool and LISTEN connection,
    // the follower's) is encrypted; pg_hba.conf would refuse any other over TCP.
    let rows = server.query(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'weir'",
    );
    let (encrypted, plain): (i64, i64) = (rows[0].get(0), rows[0].get(1));
    assert!(encrypted >= 3, "{encrypted} encrypted connections");
    assert_eq!(plain, 0);

    for running in [&mut follower, &mut node] {
        running.terminate();
        let status = running.expect_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "{}", running.stderr_so_far());
    }
}

#[test]
fn each_tls_mistake_fails_at_start_naming_the_setting_to_change() {
    let Some(server) = TlsServer::start() else {
        return;
    };
    let port = server.postgres.port;
    let other = TestCa::new("another CA").expect("openssl worked a moment ago");
    let dir = TempDir::new();
    let (ca_cert, other_cert) = (server.ca.cert(), other.cert());
    let right_ca = [("ca_file", path(&ca_cert))];

    // A CA that did not sign the server's certificate.
    let wrong_ca = [("ca_file", path(&other_cert))];
    let config = config_file(
        &dir,
        "wrong-ca.toml",
        &url("localhost", port, "postgres", "verify-full"),
        &wrong_ca,
        "",
    );
    let started = Instant::now();
    expect_unavailable(
        weir_with(&config, &["migrate"]),
        &[
            "is not signed by [store.tls] ca_file",
            "set [store.tls] ca_file",
        ],
    );
    // A node fails at start as well, rather than running without its store.
    expect_unavailable(
        weir_with(&config, &["run", "--node-id", "node-wrong-ca"]),
        &["is not signed by [store.tls] ca_file"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );

    // The right CA, but a host name the certificate does not hold (it names
    // `localhost`, weir connects to 127.0.0.1): verify-full refuses it,
    // verify-ca, which checks only the chain, accepts it.
    let config = config_file(
        &dir,
        "wrong-host.toml",
        &url("127.0.0.1", port, "postgres", "verify-full"),
        &right_ca,
        "",
    );
    expect_unavailable(
        weir_with(&config, &["migrate"]),
        &["does not name the host", "sslmode=verify-ca"],
    );
    let config = config_file(
        &dir,
        "verify-ca.toml",
        &url("127.0.0.1", port, "postgres", "verify-ca"),
        &right_ca,
        "",
    );
    weir_with(&config, &["migrate"]).expect_success();

    // require encrypts but checks nothing, as libpq's does without a CA file.
    let config = config_file(
        &dir,
        "require.toml",
        &url("127.0.0.1", port, "postgres", "require"),
        &[],
        "",
    );
    weir_with(&config, &["migrate"]).expect_success();
    // ... and with one it checks the chain, as libpq's does.
    let config = config_file(
        &dir,
        "require-wrong-ca.toml",
        &url("127.0.0.1", port, "postgres", "require"),
        &wrong_ca,
        "",
    );
    expect_unavailable(
        weir_with(&config, &["migrate"]),
        &["is not signed by [store.tls] ca_file"],
    );

    // Without TLS, this server's pg_hba.conf lets nobody in over TCP.
    let config = config_file(
        &dir,
        "disable.toml",
        &url("127.0.0.1", port, "postgres", "disable"),
        &[],
        "",
    );
    expect_unavailable(
        weir_with(&config, &["migrate"]),
        &["accepts only TLS connections", "sslmode=verify-full"],
    );
}

#[test]
fn a_client_certificate_with_an_encrypted_key_connects_and_its_password_stays_hidden() {
    let Some(server) = TlsServer::start() else {
        return;
    };
    server.query("CREATE DATABASE certdb");
    let port = server.postgres.port;
    let client: Issued = server.ca.issue("client", "postgres", &[]);
    let password = "s3cret-key-pass";
    let encrypted = server.ca.encrypt_key(&client.key, password);
    let dir = TempDir::new();
    let store_url = url("localhost", port, "certdb", "verify-full");
    let ca_cert = server.ca.cert();
    let files = [
        ("ca_file", path(&ca_cert)),
        ("cert_file", path(&client.cert)),
        ("key_file", path(&encrypted)),
    ];
    let with_password = [&files[..], &[("key_password", password)]].concat();
    let config = config_file(&dir, "client.toml", &store_url, &with_password, "");
    // `cert` authentication: the server let weir in on its certificate alone.
    weir_with(&config, &["migrate"]).expect_success();
    let check = weir_with(&config, &["config", "check"]).expect_success();
    assert!(!check.stdout.contains(password), "{}", check.context());
    assert!(
        check.stdout.contains("key_password = \"<redacted>\""),
        "{}",
        check.context()
    );

    // Without its certificate, weir is refused for that database.
    let config = config_file(&dir, "no-cert.toml", &store_url, &files[..1], "");
    assert_ne!(weir_with(&config, &["migrate"]).code(), Some(0));

    // A wrong or missing password is a configuration error, found when the store
    // opens, before connecting (`config check` reads no file: where it runs, a
    // container's mounted secret may not be).
    let wrong = [&files[..], &[("key_password", "not-it")]].concat();
    let config = config_file(&dir, "wrong-pass.toml", &store_url, &wrong, "");
    let finished = weir_with(&config, &["migrate"]).expect_code(EXIT_CONFIG);
    finished_has(&finished, "store.tls.key_file");
    finished_has(&finished, "[store.tls] key_password is its password");
    assert!(
        !finished.stderr.contains("not-it"),
        "{}",
        finished.context()
    );
    let missing = [("ca_file", "/nonexistent/ca.crt")];
    let config = config_file(&dir, "missing-ca.toml", &store_url, &missing, "");
    weir_with(&config, &["config", "check"]).expect_success();
    let finished = weir_with(&config, &["migrate"]).expect_code(EXIT_CONFIG);
    finished_has(
        &finished,
        "store.tls.ca_file: /nonexistent/ca.crt cannot be read",
    );
    let config = config_file(&dir, "no-pass.toml", &store_url, &files, "");
    let finished = weir_with(&config, &["migrate"]).expect_code(EXIT_CONFIG);
    finished_has(&finished, "set [store.tls] key_password");

    // sslpassword in the URL is hidden as well.
    let in_url = format!("{store_url}&sslpassword={password}");
    let config = config_file(&dir, "url-pass.toml", &in_url, &files, "");
    let check = weir_with(&config, &["config", "check"]).expect_success();
    assert!(!check.stdout.contains(password), "{}", check.context());
    weir_with(&config, &["migrate"]).expect_success();
}

#[test]
fn require_against_a_server_without_tls_fails_at_start_and_prefer_falls_back() {
    let Some(postgres) = PrivatePostgres::start() else {
        return;
    };
    let ssl: String = query(&postgres, "SHOW ssl")[0].get(0);
    assert_eq!(ssl, "off");
    let dir = TempDir::new();
    for mode in ["require", "verify-full"] {
        let config = config_file(
            &dir,
            &format!("{mode}.toml"),
            &url("127.0.0.1", postgres.port, "postgres", mode),
            &[],
            "",
        );
        expect_unavailable(
            weir_with(&config, &["migrate"]),
            &[
                "does not accept TLS connections",
                "set sslmode=prefer or disable",
            ],
        );
    }
    let config = config_file(
        &dir,
        "prefer.toml",
        &url("127.0.0.1", postgres.port, "postgres", "prefer"),
        &[],
        "",
    );
    weir_with(&config, &["migrate"]).expect_success();
}
