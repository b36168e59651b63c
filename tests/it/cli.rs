//! The `weir` binary end to end: exit codes, output and messages of each subcommand,
//! on the embedded default (memory store) and on Postgres.
//!
//! Postgres tests read the URL from `WEIR_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Without a reachable server they print a
//! note and pass, unless `WEIR_REQUIRE_SERVICES=1`, which makes them fail. Each one
//! works in a schema of its own, dropped when the test ends, so they run in parallel.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// How long a command that should finish may run: a guard against hangs, not a
/// performance assertion.
pub(crate) const FINISH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a signalled process may take to exit.
pub(crate) const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a follower may take to print an event appended after it started.
pub(crate) const FOLLOW_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node may take to log that it started.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Exit codes (see `CliError::exit_code`).
const EXIT_USAGE: i32 = 2; // clap
const EXIT_CONFIG: i32 = 64;
const EXIT_INPUT: i32 = 65;
const EXIT_STORE: i32 = 1;

// ---------------------------------------------------------------------------------
// Running the binary

/// `weir` with no inherited `WEIR_*` variable, so the developer's environment cannot
/// change the outcome, and with stdin closed. A node (`run`) serves its HTTP
/// endpoints on a free port, so that tests can run nodes side by side.
pub(crate) fn weir(args: &[&str]) -> Command {
    let mut command = Command::new(WEIR);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WEIR_") {
            command.env_remove(name);
        }
    }
    if args.contains(&"run") {
        command.env("WEIR_HTTP__LISTEN", "127.0.0.1:0");
    }
    command.args(args).stdin(Stdio::null());
    command
}

/// A finished `weir` process.
pub(crate) struct Finished {
    what: String,
    status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Finished {
    pub(crate) fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub(crate) fn context(&self) -> String {
        format!(
            "{}\nexit: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.what, self.status, self.stdout, self.stderr
        )
    }

    /// Asserts the exit code, showing everything on failure.
    #[track_caller]
    pub(crate) fn expect_code(self, code: i32) -> Self {
        assert_eq!(self.code(), Some(code), "{}", self.context());
        self
    }

    #[track_caller]
    pub(crate) fn expect_success(self) -> Self {
        self.expect_code(0)
    }

    #[track_caller]
    pub(crate) fn expect_stderr(self, needle: &str) -> Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}\n{}",
            self.context()
        );
        self
    }

    /// Every stdout line, parsed as JSON.
    #[track_caller]
    pub(crate) fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}\n{}", self.context()))
            })
            .collect()
    }
}

fn read_all(mut from: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = from.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `command` to completion, with `stdin` as its input if given. Fails if it runs
/// longer than [`FINISH_TIMEOUT`] or panics.
#[track_caller]
pub(crate) fn finish(mut command: Command, stdin: Option<&str>) -> Finished {
    let what = format!("{command:?}");
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let writer = stdin.map(|input| {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let input = input.to_owned();
        std::thread::spawn(move || {
            // The process may exit before reading everything; that is its business.
            let _ = pipe.write_all(input.as_bytes());
        })
    });
    let stdout = read_all(child.stdout.take().expect("stdout is piped"));
    let stderr = read_all(child.stderr.take().expect("stderr is piped"));
    let status = match wait_until(&mut child, FINISH_TIMEOUT) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {FINISH_TIMEOUT:?}; stderr:\n{}",
                stderr.join().unwrap_or_default()
            );
        }
    };
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    let finished = Finished {
        what,
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    };
    assert!(
        !finished.stderr.contains("panicked"),
        "weir panicked\n{}",
        finished.context()
    );
    finished
}

#[track_caller]
pub(crate) fn run(args: &[&str]) -> Finished {
    finish(weir(args), None)
}

fn wait_until(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for weir") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A long-running `weir` whose output is read line by line as it comes; killed when
/// dropped if still running.
pub(crate) struct Running {
    what: String,
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    stderr_seen: Vec<String>,
}

fn lines_of(from: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

impl Running {
    pub(crate) fn start(mut command: Command) -> Self {
        let what = format!("{command:?}");
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = lines_of(child.stdout.take().expect("stdout is piped"));
        let stderr = lines_of(child.stderr.take().expect("stderr is piped"));
        Self {
            what,
            child,
            stdout,
            stderr,
            stderr_seen: Vec::new(),
        }
    }

    /// Collects whatever stderr printed so far, for messages.
    pub(crate) fn stderr_so_far(&mut self) -> String {
        self.stderr_seen.extend(self.stderr.try_iter());
        self.stderr_seen.join("\n")
    }

    /// The next stdout line, parsed as JSON; fails after `timeout`. While no line
    /// comes, calls `meanwhile` every `every`.
    #[track_caller]
    pub(crate) fn next_json(
        &mut self,
        timeout: Duration,
        waiting_for: &str,
        every: Duration,
        mut meanwhile: impl FnMut(),
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let wait = every.min(deadline.saturating_duration_since(Instant::now()));
            match self.stdout.recv_timeout(wait) {
                Ok(line) => {
                    return serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("{}: not JSON: {line:?}: {e}", self.what));
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => meanwhile(),
                Err(_) => {
                    let stderr = self.stderr_so_far();
                    panic!(
                        "{}: no stdout line within {timeout:?} ({waiting_for}); stderr:\n{stderr}",
                        self.what
                    )
                }
            }
        }
    }

    /// Waits for a new stderr line containing `needle`.
    #[track_caller]
    pub(crate) fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) {
        self.wait_for_new_stderr_line(|line| line.contains(needle), timeout, needle);
    }

    /// Waits for a stderr line, seen already or new, that `wanted` accepts.
    #[track_caller]
    pub(crate) fn wait_for_stderr_line(
        &mut self,
        wanted: impl Fn(&str) -> bool,
        timeout: Duration,
    ) {
        self.stderr_seen.extend(self.stderr.try_iter());
        if !self.stderr_seen.iter().any(|line| wanted(line)) {
            self.wait_for_new_stderr_line(wanted, timeout, "such line");
        }
    }

    /// Reads stderr until a line that `wanted` accepts, failing after `timeout`.
    #[track_caller]
    fn wait_for_new_stderr_line(
        &mut self,
        wanted: impl Fn(&str) -> bool,
        timeout: Duration,
        what: &str,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    let found = wanted(&line);
                    self.stderr_seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!(
                    "{}: stderr showed no {what:?} within {timeout:?}:\n{}",
                    self.what,
                    self.stderr_seen.join("\n")
                ),
            }
        }
    }

    /// Sends SIGTERM, as `kill -TERM PID`.
    pub(crate) fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status:?}");
    }

    /// Waits for the process to exit; fails after `timeout`.
    #[track_caller]
    pub(crate) fn expect_exit(&mut self, timeout: Duration) -> ExitStatus {
        match wait_until(&mut self.child, timeout) {
            Some(status) => status,
            None => {
                let stderr = self.stderr_so_far();
                panic!(
                    "{} did not exit within {timeout:?}; stderr:\n{stderr}",
                    self.what
                )
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A directory of its own under the system temp dir, removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "weir-cli-test-{}-{}",
            std::process::id(),
            random_hex(16)
        ));
        std::fs::create_dir_all(&path).expect("create a temp dir");
        Self(path)
    }

    pub(crate) fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write a file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn random_hex(len: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string()[..len].to_owned()
}

const BILLING: &str = r#"
[[subscriptions]]
group = "billing"
sources = ["category:invoices", "category:refunds"]
instances = 2
"#;

/// Waits until stderr shows a consumer starting for `owner`.
#[track_caller]
pub(crate) fn wait_for_consuming(node: &mut Running, owner: &str) {
    let needle = format!("owner={owner}");
    node.wait_for_stderr_line(
        |line| line.contains("consuming") && line.contains(&needle),
        START_TIMEOUT,
    );
}

/// How many consumers started and how many stopped (storing their checkpoints),
/// per stderr so far.
fn consumers_started_and_stopped(stderr: &str) -> (usize, usize) {
    let started = stderr
        .lines()
        .filter(|l| l.contains(": consuming "))
        .count();
    let stopped = stderr
        .lines()
        .filter(|l| l.contains("stopped consuming"))
        .count();
    (started, stopped)
}

#[test]
fn run_gives_each_instance_its_share_and_stops_every_consumer_on_sigterm() {
    let dir = TempDir::new();
    let config = dir.file("weir.toml", BILLING);
    let config = config.to_str().unwrap();
    let mut node = Running::start(weir(&["run", "--config", config, "--node-id", "node-a"]));
    // The second instance gets a share, whether it joined first or was handed one.
    wait_for_consuming(&mut node, "node-a/1");
    wait_for_consuming(&mut node, "node-a/2");

    node.terminate();
    let status = node.expect_exit(EXIT_TIMEOUT);
    let stderr = node.stderr_so_far();
    assert_eq!(status.code(), Some(0), "{status:?}\n{stderr}");
    let (started, stopped) = consumers_started_and_stopped(&stderr);
    assert!(started >= 2, "{stderr}");
    assert_eq!(
        started, stopped,
        "every consumer stops and stores its checkpoint:\n{stderr}"
    );
}

#[test]
fn run_as_coordinator_runs_no_subscribers() {
    let dir = TempDir::new();
    let config = dir.file("weir.toml", BILLING);
    let mut node = Running::start(weir(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--role",
        "coordinator",
    ]));
    node.wait_for_stderr("runs no subscribers", START_TIMEOUT);
    node.wait_for_stderr("started", START_TIMEOUT);
    node.terminate();
    let status = node.expect_exit(EXIT_TIMEOUT);
    let stderr = node.stderr_so_far();
    assert_eq!(status.code(), Some(0), "{status:?}\n{stderr}");
    assert_eq!(consumers_started_and_stopped(&stderr), (0, 0), "{stderr}");
}

#[test]
fn run_with_an_unreachable_bus_says_what_to_check_and_exits_69() {
    for (kind, key, address) in [
        ("nats", "WEIR_NATS__URL", "nats://127.0.0.1:1"),
        ("kafka", "WEIR_KAFKA__BROKERS", "127.0.0.1:1"),
    ] {
        let mut command = weir(&["run"]);
        command.env("WEIR_BUS__KIND", kind).env(key, address);
        let out = finish(command, None);
        assert_eq!(out.code(), Some(69), "{kind}: {}", out.context());
        assert!(out.stderr.contains("bus"), "{kind}: {}", out.context());
    }
}

#[test]
fn run_demo_shows_events_flowing_on_the_embedded_default() {
    let mut node = Running::start(weir(&["run", "--demo"]));
    let mut streams = std::collections::BTreeSet::new();
    while streams.len() < 3 {
        let event = node.next_json(FOLLOW_TIMEOUT, "a demo event", FOLLOW_TIMEOUT, || {});
        assert!(event["cursor"].is_string(), "{event}");
        streams.insert(format!("{}/{}", event["category"], event["stream"]));
    }
    node.terminate();
    let status = node.expect_exit(EXIT_TIMEOUT);
    let stderr = node.stderr_so_far();
    assert_eq!(status.code(), Some(0), "{status:?}\n{stderr}");
}

// ---------------------------------------------------------------------------------
// Postgres

/// A schema of the test database for one test, dropped with everything in it when
/// this is dropped (also when the test fails).
struct PgSchema {
    url: String,
    schema: String,
}

pub(crate) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let connecting = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| "timed out connecting".to_owned())?
        .map_err(|e| describe(&e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// An error and its sources, e.g. `error connecting to server: Connection refused`.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

impl PgSchema {
    /// A fresh, not yet migrated schema; `None` (after a note on stderr) if Postgres
    /// cannot be reached and `WEIR_REQUIRE_SERVICES` is not `1`.
    fn new(test: &str) -> Option<Self> {
        let url = common::postgres_url();
        let reachable = block_on(async {
            let client = pg_connect(&url).await?;
            client
                .simple_query("SELECT 1")
                .await
                .map(drop)
                .map_err(|e| describe(&e))
        });
        if let Err(error) = reachable {
            if common::services_required() {
                panic!(
                    "{test}: Postgres at {url} is required (WEIR_REQUIRE_SERVICES=1) but unreachable: {error}"
                );
            }
            eprintln!("{test}: skipped: Postgres at {url} is unreachable: {error}");
            return None;
        }
        Some(Self {
            url,
            schema: format!("weir_cli_{}", random_hex(12)),
        })
    }

    /// `weir ARGS` against this schema, through the command-line flags.
    fn weir(&self, args: &[&str]) -> Command {
        let mut command = weir(args);
        command.args([
            "--store",
            "postgres",
            "--store-url",
            &self.url,
            "--schema",
            &self.schema,
        ]);
        command
    }

    #[track_caller]
    fn run(&self, args: &[&str]) -> Finished {
        finish(self.weir(args), None)
    }

    #[track_caller]
    fn run_with_stdin(&self, args: &[&str], stdin: &str) -> Finished {
        finish(self.weir(args), Some(stdin))
    }

    #[track_caller]
    fn migrate(&self) {
        self.run(&["migrate"]).expect_success();
    }

    /// Sends the notice an append to `category` sends after it commits.
    #[track_caller]
    fn notify_appended(&self, category: &str) {
        let channel = format!("{}.appended", self.schema);
        block_on(async {
            let client = pg_connect(&self.url).await?;
            client
                .execute("SELECT pg_notify($1, $2)", &[&channel, &category])
                .await
                .map_err(|e| describe(&e))
        })
        .unwrap();
    }

    /// The store's append notices, each payload (a category) in the order heard, on a
    /// connection of its own that is listening when this returns. It closes at the
    /// first notice after the receiver is dropped, or when the test process ends.
    fn listen_appended(&self) -> mpsc::Receiver<String> {
        use futures::StreamExt;

        let (notices, heard) = mpsc::channel();
        let (listening, ready) = mpsc::channel();
        let url = self.url.clone();
        let listen = format!("LISTEN \"{}.appended\"", self.schema);
        std::thread::spawn(move || {
            block_on(async move {
                let (client, mut connection) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                // The connection makes progress only while polled, LISTEN included.
                let (messages, mut received) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(async move {
                    let mut stream =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(message)) = stream.next().await {
                        if messages.send(message).is_err() {
                            break;
                        }
                    }
                });
                client.batch_execute(&listen).await?;
                let _ = listening.send(());
                while let Some(message) = received.recv().await {
                    if let tokio_postgres::AsyncMessage::Notification(notice) = message {
                        if notices.send(notice.payload().to_owned()).is_err() {
                            break;
                        }
                    }
                }
                Ok::<(), tokio_postgres::Error>(())
            })
        });
        ready
            .recv_timeout(FINISH_TIMEOUT)
            .expect("listening on the store's append channel");
        heard
    }

    /// The events of a source, read with `weir read`.
    #[track_caller]
    fn read(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["read"];
        all.extend_from_slice(args);
        self.run(&all).expect_success().json_lines()
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let statement = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        let dropped = block_on(async {
            let client = pg_connect(&self.url).await?;
            client
                .batch_execute(&statement)
                .await
                .map_err(|e| describe(&e))
        });
        if let Err(error) = dropped {
            eprintln!("cannot drop test schema {}: {error}", self.schema);
        }
    }
}

/// Skips the test (returns) when Postgres is unreachable and not required.
macro_rules! pg_schema {
    ($test:literal) => {
        match PgSchema::new($test) {
            Some(schema) => schema,
            None => return,
        }
    };
}

fn positions(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["position"].as_u64().expect("position"))
        .collect()
}

/// The `cursor` field, checked to be `TX:SEQUENCE`.
#[track_caller]
fn cursor(event: &Value) -> (u64, u64) {
    let text = event["cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("no cursor in {event}"));
    let (tx, sequence) = text
        .split_once(':')
        .unwrap_or_else(|| panic!("cursor {text:?} is not TX:SEQUENCE"));
    (
        tx.parse().expect("cursor tx"),
        sequence.parse().expect("cursor sequence"),
    )
}

// ---------------------------------------------------------------------------------
// Configuration

#[test]
fn config_check_without_anything_prints_the_embedded_default() {
    let out = run(&["config", "check"]).expect_success();
    let printed: toml::Table = toml::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not TOML: {e}\n{}", out.context()));
    assert_eq!(printed["store"]["kind"].as_str(), Some("memory"));
    assert_eq!(printed["store"]["schema"].as_str(), Some("weir"));
    assert_eq!(printed["bus"]["kind"].as_str(), Some("memory"));
    assert_eq!(printed["http"]["listen"].as_str(), Some("127.0.0.1:9600"));
    assert!(printed["store"].get("url").is_none(), "{}", out.stdout);
    // The generated node id is printed, so the output says which node this is.
    let id = printed["node"]["id"].as_str().expect("node.id is printed");
    assert!(id.starts_with("node-"), "{id}");
}

#[test]
fn config_check_with_a_bad_file_exits_64_naming_every_key() {
    let dir = TempDir::new();
    let bad = dir.file(
        "bad.toml",
        r#"
            [store]
            kind = "postgres"
            schema = "Not-A-Schema"
            pool_size = 0

            [bus]
            kind = "nats"
            namespace = "not.a.token"

            [http]
            listen = "nope"

            [[subscriptions]]
            group = "billing"
            sources = []
        "#,
    );
    let out = run(&["config", "check", "--config", bad.to_str().unwrap()])
        .expect_code(EXIT_CONFIG)
        .expect_stderr("invalid configuration");
    for key in [
        "store.url",
        "store.schema",
        "store.pool_size",
        "bus.namespace",
        "http.listen",
        "subscriptions[0].sources",
    ] {
        assert!(
            out.stderr.contains(&format!("- {key}: ")),
            "{key} not named\n{}",
            out.context()
        );
    }
    assert!(out.stdout.is_empty(), "{}", out.context());
}

#[test]
fn config_check_with_a_missing_file_exits_64() {
    let dir = TempDir::new();
    let missing = dir.0.join("missing.toml");
    let missing = missing.to_str().unwrap();
    run(&["config", "check", "--config", missing])
        .expect_code(EXIT_CONFIG)
        .expect_stderr("does not exist")
        .expect_stderr(missing);

    // WEIR_CONFIG names the file when --config does not.
    let mut command = weir(&["config", "check"]);
    command.env("WEIR_CONFIG", missing);
    finish(command, None)
        .expect_code(EXIT_CONFIG)
        .expect_stderr("does not exist");
}

#[test]
fn config_check_shows_environment_and_flag_overrides() {
    let schema_of = |out: &Finished| -> String {
        let printed: toml::Table = toml::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("stdout is not TOML: {e}\n{}", out.context()));
        printed["store"]["schema"].as_str().unwrap().to_owned()
    };

    let mut command = weir(&["config", "check"]);
    command
        .env("WEIR_STORE__SCHEMA", "from_env")
        .env("WEIR_HTTP__LISTEN", "127.0.0.1:1002")
        .env("WEIR_NODE__ROLE", "observer");
    let out = finish(command, None).expect_success();
    assert_eq!(schema_of(&out), "from_env");
    assert!(
        out.stdout.contains("listen = \"127.0.0.1:1002\""),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("role = \"observer\""), "{}", out.stdout);

    let mut command = weir(&[
        "config",
        "check",
        "--schema",
        "from_cli",
        "--listen",
        "127.0.0.1:1003",
        "--role",
        "coordinator",
        "--node-id",
        "node-from-cli",
    ]);
    command
        .env("WEIR_STORE__SCHEMA", "from_env")
        .env("WEIR_HTTP__LISTEN", "127.0.0.1:1002")
        .env("WEIR_NODE__ROLE", "observer");
    let out = finish(command, None).expect_success();
    assert_eq!(schema_of(&out), "from_cli");
    assert!(
        out.stdout.contains("listen = \"127.0.0.1:1003\""),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("role = \"coordinator\""),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("id = \"node-from-cli\""),
        "{}",
        out.stdout
    );

    // A file is the layer below the environment.
    let dir = TempDir::new();
    let file = dir.file("weir.toml", "[store]\nschema = \"from_file\"\n");
    let out = run(&["config", "check", "--config", file.to_str().unwrap()]).expect_success();
    assert_eq!(schema_of(&out), "from_file");
    let mut command = weir(&["config", "check", "--config", file.to_str().unwrap()]);
    command.env("WEIR_STORE__SCHEMA", "from_env");
    assert_eq!(
        schema_of(&finish(command, None).expect_success()),
        "from_env"
    );
}

#[test]
fn config_check_redacts_the_store_password() {
    let url = "postgres://weir:hunter2hunter2@127.0.0.1:5432/db";
    let out = run(&["config", "check", "--store", "postgres", "--store-url", url]).expect_success();
    assert!(
        out.stdout
            .contains("url = \"postgres://weir:***@127.0.0.1:5432/db\""),
        "{}",
        out.context()
    );
    assert!(!out.stdout.contains("hunter2"), "{}", out.context());
    assert!(!out.stderr.contains("hunter2"), "{}", out.context());

    // The same through the environment, in libpq form.
    let mut command = weir(&["config", "check"]);
    command.env("WEIR_STORE__KIND", "postgres").env(
        "WEIR_STORE__URL",
        "host=127.0.0.1 user=weir password=hunter2hunter2 dbname=db",
    );
    let out = finish(command, None).expect_success();
    assert!(out.stdout.contains("password=***"), "{}", out.context());
    assert!(!out.stdout.contains("hunter2"), "{}", out.context());
}

#[test]
fn a_misspelled_environment_variable_is_a_config_error() {
    let mut command = weir(&["config", "check"]);
    command.env("WEIR_STORE_SCHEMA", "typo");
    finish(command, None)
        .expect_code(EXIT_CONFIG)
        .expect_stderr("WEIR_STORE__SCHEMA");

    // Variables that are not configuration keys are left alone.
    let mut command = weir(&["config", "check"]);
    command
        .env("WEIR_TEST_POSTGRES_URL", common::DEFAULT_POSTGRES_URL)
        .env("WEIR_REQUIRE_SERVICES", "1");
    finish(command, None).expect_success();
}

#[test]
fn an_invalid_log_filter_exits_64() {
    run(&["--log", "[", "config", "check"])
        .expect_code(EXIT_CONFIG)
        .expect_stderr("--log");
}

#[cfg(unix)]
#[test]
fn a_non_utf8_environment_variable_does_not_crash_weir() {
    use std::os::unix::ffi::OsStrExt;
    let mut command = weir(&["config", "check"]);
    command.env(
        "UNRELATED_BINARY_VALUE",
        std::ffi::OsStr::from_bytes(b"\xff\xfe"),
    );
    finish(command, None).expect_success();
}

// ---------------------------------------------------------------------------------
// Usage and input errors

#[test]
fn bad_flags_exit_with_clap_usage_code() {
    for args in [
        &["read"][..],
        &[
            "append",
            "--category",
            "c",
            "--stream",
            "s",
            "--name",
            "N",
            "--payload",
            "{}",
            "--expect-position",
            "1",
            "--expect-empty",
        ],
        &[
            "append",
            "--category",
            "c",
            "--stream",
            "s",
            "--expect-position",
            "minus-one",
        ],
        &["append", "--stream", "s", "--payload", "{}"],
        &[
            "append",
            "--category",
            "c",
            "--stream",
            "s",
            "--metadata",
            "{}",
        ],
        &["read", "--source", "log", "--limit", "-1"],
        &["read", "--source", "log", "--poll-interval", "whenever"],
        &["config", "check", "--store", "sqlite"],
        &["no-such-command"],
    ] {
        let out = run(args).expect_code(EXIT_USAGE);
        assert!(out.stderr.starts_with("error:"), "{}", out.context());
    }
}

#[test]
fn read_rejects_a_bad_source_or_cursor_with_exit_65() {
    run(&["read", "--source", "nonsense"])
        .expect_code(EXIT_INPUT)
        .expect_stderr("--source")
        .expect_stderr("nonsense");
    run(&["read", "--source", "stream:no-slash"])
        .expect_code(EXIT_INPUT)
        .expect_stderr("--source");
    run(&["read", "--source", "category:"])
        .expect_code(EXIT_INPUT)
        .expect_stderr("--source");
    run(&["read", "--source", "log", "--after", "bogus"])
        .expect_code(EXIT_INPUT)
        .expect_stderr("--after")
        .expect_stderr("bogus");
}

fn append_args<'a>(
    category: &'a str,
    stream: &'a str,
    name: &'a str,
    payload: &'a str,
) -> Vec<&'a str> {
    vec![
        "append",
        "--category",
        category,
        "--stream",
        stream,
        "--name",
        name,
        "--payload",
        payload,
    ]
}

#[test]
fn append_rejects_bad_input_with_exit_65() {
    run(&append_args("c", "s", "N", "{not json"))
        .expect_code(EXIT_INPUT)
        .expect_stderr("--payload");
    let mut with_metadata = append_args("c", "s", "N", "{}");
    with_metadata.extend(["--metadata", "[unclosed"]);
    run(&with_metadata)
        .expect_code(EXIT_INPUT)
        .expect_stderr("--metadata");
    run(&append_args("a/b", "s", "N", "{}"))
        .expect_code(EXIT_INPUT)
        .expect_stderr("'/'");
    run(&append_args("c", "s", "", "{}"))
        .expect_code(EXIT_INPUT)
        .expect_stderr("empty");
    run(&append_args("c", "", "N", "{}"))
        .expect_code(EXIT_INPUT)
        .expect_stderr("empty");
    run(&append_args("", "s", "N", "{}"))
        .expect_code(EXIT_INPUT)
        .expect_stderr("empty");
    // --payload needs a name.
    run(&[
        "append",
        "--category",
        "c",
        "--stream",
        "s",
        "--payload",
        "{}",
    ])
    .expect_code(EXIT_CONFIG)
    .expect_stderr("--name");
}

#[test]
fn append_rejects_bad_stdin_lines_with_exit_65() {
    let args = ["append", "--category", "c", "--stream", "s", "--name", "N"];
    finish(
        weir(&args),
        Some("{\"payload\":1}\nnot json\n{\"payload\":3}\n"),
    )
    .expect_code(EXIT_INPUT)
    .expect_stderr("line 2");
    finish(
        weir(&args),
        Some("{\"payload\":1}\n{\"payload\":2,\"colour\":\"red\"}\n"),
    )
    .expect_code(EXIT_INPUT)
    .expect_stderr("line 2");
    finish(weir(&args), Some(""))
        .expect_code(EXIT_INPUT)
        .expect_stderr("no events");
    // Without --name every line must name its event.
    finish(
        weir(&["append", "--category", "c", "--stream", "s"]),
        Some("{\"name\":\"A\",\"payload\":1}\n{\"payload\":2}\n"),
    )
    .expect_code(EXIT_INPUT)
    .expect_stderr("line 2");
}

// ---------------------------------------------------------------------------------
// The memory store (embedded default)

#[test]
fn append_on_the_memory_store_prints_the_stored_event() {
    let out = run(&append_args("c", "s", "N", "{\"a\":1}")).expect_success();
    let events = out.json_lines();
    assert_eq!(events.len(), 1, "{}", out.context());
    let event = &events[0];
    assert_eq!(event["position"], 0);
    assert_eq!(event["category"], "c");
    assert_eq!(event["stream"], "s");
    assert_eq!(event["name"], "N");
    assert_eq!(event["payload"], serde_json::json!({"a": 1}));
    assert_eq!(event["metadata"], serde_json::json!({}));
    let id = event["id"].as_str().expect("id");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    cursor(event);
}

#[test]
fn dead_letters_list_on_the_memory_store_prints_nothing() {
    // Nothing is persisted in memory, so a fresh process has no dead letters.
    let out = run(&["dead-letters", "list"]).expect_success();
    assert!(out.stdout.is_empty(), "{}", out.context());
}

#[test]
fn dead_letters_list_rejects_a_bad_limit_with_exit_64() {
    for limit in ["abc", "0", "-1", "1.5", ""] {
        let out = run(&["dead-letters", "list", "--limit", limit])
            .expect_code(EXIT_CONFIG)
            .expect_stderr("--limit")
            .expect_stderr("a whole number of at least 1");
        assert!(out.stdout.is_empty(), "{}", out.context());
    }
    run(&["dead-letters", "list", "--group", ""])
        .expect_code(EXIT_INPUT)
        .expect_stderr("--group");
}

#[test]
fn migrate_on_the_memory_store_has_nothing_to_do() {
    let out = run(&["migrate"]).expect_success();
    assert!(
        out.stdout.contains("nothing to migrate"),
        "{}",
        out.context()
    );
}

#[test]
fn run_on_the_embedded_default_stops_cleanly_on_sigterm() {
    let mut node = Running::start(weir(&["run"]));
    node.wait_for_stderr("started", START_TIMEOUT);
    node.terminate();
    let status = node.expect_exit(EXIT_TIMEOUT);
    let stderr = node.stderr_so_far();
    assert_eq!(status.code(), Some(0), "{status:?}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

// ---------------------------------------------------------------------------------
// Postgres

#[test]
fn pg_migrate_is_idempotent() {
    let pg = pg_schema!("pg_migrate_is_idempotent");
    let first = pg.run(&["migrate"]).expect_success();
    assert!(first.stdout.contains(&pg.schema), "{}", first.context());
    assert!(first.stdout.contains("applied"), "{}", first.context());
    let second = pg.run(&["migrate"]).expect_success();
    assert!(second.stdout.contains("up to date"), "{}", second.context());
    assert!(!second.stdout.contains("applied"), "{}", second.context());
}

#[test]
fn pg_using_the_store_before_migrate_says_to_run_migrate() {
    let pg = pg_schema!("pg_using_the_store_before_migrate_says_to_run_migrate");
    for args in [
        &append_args("orders", "order-1", "Placed", "{}")[..],
        &["read", "--source", "log"],
        &["dead-letters", "list"],
        &["run"],
    ] {
        let out = pg.run(args).expect_stderr("weir migrate");
        assert_ne!(out.code(), Some(0), "{}", out.context());
    }
    // Nothing was created on the way.
    pg.migrate();
    assert!(pg.read(&["--source", "log"]).is_empty());
}

#[test]
fn pg_append_read_and_write_conditions() {
    let pg = pg_schema!("pg_append_read_and_write_conditions");
    pg.migrate();
    let stream = ["--category", "orders", "--stream", "order-1"];

    // Three events from stdin: one takes --name, one names itself, one has a key.
    let mut args = vec!["append"];
    args.extend(stream);
    args.extend(["--name", "Placed"]);
    let stdin = concat!(
        "{\"payload\":{\"n\":0}}\n",
        "{\"name\":\"Paid\",\"payload\":{\"n\":1},\"metadata\":{\"by\":\"test\"}}\n",
        "\n",
        "{\"payload\":{\"n\":2},\"idempotency_key\":\"ship-1\"}\n",
    );
    let out = pg.run_with_stdin(&args, stdin).expect_success();
    let appended = out.json_lines();
    assert_eq!(positions(&appended), [0, 1, 2], "{}", out.context());
    let names: Vec<&str> = appended
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Placed", "Paid", "Placed"]);
    assert_eq!(appended[1]["metadata"], serde_json::json!({"by": "test"}));
    assert_eq!(appended[2]["idempotency_key"], "ship-1");
    for event in &appended {
        assert_eq!(event["category"], "orders");
        assert_eq!(event["stream"], "order-1");
    }

    // A condition that does not hold names the stream and its last position.
    let mut stale = append_args("orders", "order-1", "Cancelled", "{}");
    stale.extend(["--expect-position", "0"]);
    let out = pg
        .run(&stale)
        .expect_code(EXIT_STORE)
        .expect_stderr("orders/order-1")
        .expect_stderr("last position is 2");
    assert!(out.stdout.is_empty(), "{}", out.context());
    let mut empty = append_args("orders", "order-1", "Cancelled", "{}");
    empty.push("--expect-empty");
    pg.run(&empty)
        .expect_code(EXIT_STORE)
        .expect_stderr("last position is 2");

    // One that holds appends.
    let mut current = append_args("orders", "order-1", "Shipped", "{\"n\":3}");
    current.extend(["--expect-position", "2"]);
    let out = pg.run(&current).expect_success();
    assert_eq!(positions(&out.json_lines()), [3], "{}", out.context());

    // The idempotency key returns the stored event instead of writing another.
    let mut again = append_args("orders", "order-1", "Other", "{\"n\":99}");
    again.extend(["--idempotency-key", "ship-1"]);
    let out = pg.run(&again).expect_success();
    let returned = out.json_lines();
    assert_eq!(returned.len(), 1, "{}", out.context());
    assert_eq!(returned[0]["id"], appended[2]["id"]);
    assert_eq!(returned[0]["position"], 2);
    assert_eq!(returned[0]["name"], "Placed");

    // Reading the stream: every event once, in order, each with its cursor.
    let events = pg.read(&["--source", "stream:orders/order-1"]);
    assert_eq!(positions(&events), [0, 1, 2, 3]);
    let cursors: Vec<(u64, u64)> = events.iter().map(cursor).collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");
    for (read, written) in events.iter().zip(&appended) {
        assert_eq!(read["id"], written["id"]);
        assert_eq!(read["cursor"], written["cursor"]);
    }
    let first = events[0]["cursor"].as_str().unwrap();
    let last = events[3]["cursor"].as_str().unwrap();
    assert_eq!(
        positions(&pg.read(&["--source", "stream:orders/order-1", "--after", first])),
        [1, 2, 3]
    );
    assert_eq!(
        positions(&pg.read(&["--source", "stream:orders/order-1", "--limit", "1"])),
        [0]
    );
    assert_eq!(
        positions(&pg.read(&[
            "--source",
            "stream:orders/order-1",
            "--after",
            first,
            "--limit",
            "2"
        ])),
        [1, 2]
    );
    assert!(
        pg.read(&["--source", "stream:orders/order-1", "--after", last])
            .is_empty()
    );

    // The category and the log hold the same events; other sources hold none.
    assert_eq!(
        positions(&pg.read(&["--source", "category:orders"])),
        [0, 1, 2, 3]
    );
    assert_eq!(positions(&pg.read(&["--source", "log"])), [0, 1, 2, 3]);
    assert!(pg.read(&["--source", "category:invoices"]).is_empty());
    assert!(pg.read(&["--source", "stream:orders/order-2"]).is_empty());
}

#[test]
fn pg_a_bad_stdin_line_appends_nothing() {
    let pg = pg_schema!("pg_a_bad_stdin_line_appends_nothing");
    pg.migrate();
    let args = [
        "append",
        "--category",
        "orders",
        "--stream",
        "order-1",
        "--name",
        "Placed",
    ];
    pg.run_with_stdin(&args, "{\"payload\":1}\n{\"payload\":\n{\"payload\":3}\n")
        .expect_code(EXIT_INPUT)
        .expect_stderr("line 2");
    assert!(pg.read(&["--source", "log"]).is_empty());

    // The same lines, fixed, are appended whole.
    let out = pg
        .run_with_stdin(&args, "{\"payload\":1}\n{\"payload\":2}\n{\"payload\":3}\n")
        .expect_success();
    assert_eq!(positions(&out.json_lines()), [0, 1, 2]);
}

/// How often [`next_followed`] repeats the append notice while it waits.
const NOTICE_REPEAT: Duration = Duration::from_millis(500);

/// The next event a `weir read --follow` of category `orders` prints, within `timeout`.
///
/// An appended event becomes readable only once every transaction that began before
/// its append has ended. One running alongside (another test's, say) can outlast the
/// notice, so the read the notice wakes finds nothing and the follower waits for the
/// next notice. While no line comes, this sends that notice again every
/// [`NOTICE_REPEAT`], on the store's channel, as a later append would: the follower
/// still learns of the event through NOTIFY, not by polling.
#[track_caller]
fn next_followed(
    follower: &mut Running,
    pg: &PgSchema,
    timeout: Duration,
    waiting_for: &str,
) -> Value {
    follower.next_json(timeout, waiting_for, NOTICE_REPEAT, || {
        pg.notify_appended("orders")
    })
}

#[test]
fn pg_follow_prints_new_events_until_sigterm() {
    let pg = pg_schema!("pg_follow_prints_new_events_until_sigterm");
    pg.migrate();
    for n in 0..2 {
        let payload = format!("{{\"n\":{n}}}");
        pg.run(&append_args("orders", "order-1", "Placed", &payload))
            .expect_success();
    }

    // Polling only every minute: the new event must arrive through NOTIFY.
    let mut follower = Running::start(pg.weir(&[
        "read",
        "--source",
        "category:orders",
        "--follow",
        "--poll-interval",
        "60s",
    ]));
    for n in 0..2 {
        let event = next_followed(&mut follower, &pg, FINISH_TIMEOUT, "an existing event");
        assert_eq!(event["payload"]["n"], n, "{event}");
    }

    // Events of another category do not show; the next one of this category does.
    let notices = pg.listen_appended();
    pg.run(&append_args("invoices", "invoice-1", "Issued", "{}"))
        .expect_success();
    let appended = pg
        .run(&append_args("orders", "order-2", "Placed", "{\"n\":2}"))
        .expect_success()
        .json_lines();
    // Each `weir append` sent its notice before it exited (next_followed below may
    // repeat a notice, so this is where the appends' own are checked).
    let heard: Vec<String> = (0..2)
        .map(|_| {
            notices
                .recv_timeout(FOLLOW_TIMEOUT)
                .expect("the append's notice")
        })
        .collect();
    assert_eq!(heard, ["invoices", "orders"]);
    let event = next_followed(
        &mut follower,
        &pg,
        FOLLOW_TIMEOUT,
        "the event appended after it started",
    );
    assert_eq!(event["id"], appended[0]["id"], "{event}");
    assert_eq!(event["stream"], "order-2");
    cursor(&event);

    follower.terminate();
    let status = follower.expect_exit(EXIT_TIMEOUT);
    let stderr = follower.stderr_so_far();
    assert_eq!(status.code(), Some(0), "{status:?}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing else was printed.
    assert!(follower.stdout.try_iter().next().is_none());
}

#[test]
fn pg_run_stops_cleanly_on_sigterm() {
    let pg = pg_schema!("pg_run_stops_cleanly_on_sigterm");
    pg.migrate();
    let mut node = Running::start(pg.weir(&["run"]));
    node.wait_for_stderr("started", START_TIMEOUT);
    node.terminate();
    let status = node.expect_exit(EXIT_TIMEOUT);
    let stderr = node.stderr_so_far();
    assert_eq!(status.code(), Some(0), "{status:?}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn pg_run_processes_appended_events_and_leaves_cleanly_on_sigterm() {
    let pg = pg_schema!("pg_run_processes_appended_events_and_leaves_cleanly_on_sigterm");
    pg.migrate();
    let dir = TempDir::new();
    let config = dir.file(
        "weir.toml",
        "[[subscriptions]]\ngroup = \"shipping\"\nsources = [\"category:orders\"]\n",
    );
    let mut node = Running::start(pg.weir(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--node-id",
        "node-a",
    ]));
    wait_for_consuming(&mut node, "node-a/1");
    let appended = pg
        .run_with_stdin(
            &[
                "append",
                "--category",
                "orders",
                "--stream",
                "order-1",
                "--name",
                "Placed",
            ],
            "{\"payload\":{\"n\":0}}\n{\"payload\":{\"n\":1}}\n{\"payload\":{\"n\":2}}\n",
        )
        .expect_success()
        .json_lines();
    // The node's stdout sink prints each event as `weir read` would.
    for expected in &appended {
        let printed = node.next_json(START_TIMEOUT, "an appended event", START_TIMEOUT, || {});
        assert_eq!(printed["id"], expected["id"], "{printed}");
        assert_eq!(printed["cursor"], expected["cursor"], "{printed}");
    }
    let query = |sql: String| {
        block_on(async {
            let client = pg_connect(&pg.url).await?;
            let row = client
                .query_one(&sql, &[])
                .await
                .map_err(|e| describe(&e))?;
            Ok::<String, String>(row.get(0))
        })
        .unwrap()
    };
    let members = format!("SELECT count(*)::text FROM \"{}\".weir_members", pg.schema);
    assert_eq!(query(members.clone()), "1");

    node.terminate();
    let status = node.expect_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}\n{}",
        node.stderr_so_far()
    );
    assert_eq!(query(members), "0", "a stopped node leaves the registry");
    // Stopping stored the checkpoint at the last event.
    let checkpoint = format!(
        "SELECT owner || ' ' || tx_id || ':' || sequence FROM \"{}\".weir_checkpoints \
         WHERE group_name = 'shipping' AND source = 'category:orders'",
        pg.schema
    );
    let last = appended.last().unwrap()["cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(query(checkpoint), format!("node-a/1 {last}"));
}

// ---------------------------------------------------------------------------------
// The admin commands against stand-in nodes

/// A stand-in for a node's admin API on `address`: answers every request with
/// `status` and `body`, and keeps each request it read (head and body).
struct StandIn {
    address: std::net::SocketAddr,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl StandIn {
    fn start(ip: &str, status: u16, body: &str) -> Self {
        let listener = std::net::TcpListener::bind((ip, 0)).expect("bind a stand-in node");
        let address = listener.local_addr().unwrap();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (seen, body) = (std::sync::Arc::clone(&requests), body.to_owned());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut request = vec![0u8; 64 * 1024];
                stream
                    .set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let read = stream.read(&mut request).unwrap_or(0);
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&request[..read]).into_owned());
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { address, requests }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

#[test]
fn a_write_never_follows_the_leader_to_another_host_with_the_token() {
    // The leader a non-leader names is on another (loopback) address than the
    // one the operator gave: the token must not go there.
    let elsewhere = StandIn::start(
        "127.0.0.2",
        200,
        r#"{"group":"g","paused":true,"changed":true}"#,
    );
    let follower = StandIn::start(
        "127.0.0.1",
        503,
        &format!(
            r#"{{"error":"this node does not lead","leader":"node-b","leader_url":"{}"}}"#,
            elsewhere.url()
        ),
    );
    let finished = run(&[
        "groups",
        "pause",
        "--group",
        "g",
        "--url",
        &follower.url(),
        "--token",
        "s3cret-token",
    ]);
    finished
        .expect_code(75)
        .expect_stderr(&format!("--url {}", elsewhere.url()));
    assert_eq!(follower.requests().len(), 1);
    assert!(
        elsewhere.requests().is_empty(),
        "the token went to an address the operator did not give: {:?}",
        elsewhere.requests()
    );
}

#[test]
fn a_fleet_node_listening_beyond_loopback_needs_an_advertised_address() {
    run(&[
        "run",
        "--store",
        "postgres",
        "--store-url",
        "postgres://weir@127.0.0.1:1/none",
        "--listen",
        "0.0.0.0:0",
    ])
    .expect_code(EXIT_CONFIG)
    .expect_stderr("http.advertise");
}

#[test]
fn the_nats_url_password_is_never_printed() {
    let url = "nats://weir:hunter2hunter2@127.0.0.1:1,nats://t0ken-hunter2@127.0.0.1:2";
    let mut command = weir(&["config", "check"]);
    command.env("WEIR_NATS__URL", url);
    let out = finish(command, None).expect_success();
    assert!(
        out.stdout
            .contains("url = \"nats://weir:***@127.0.0.1:1,nats://***@127.0.0.1:2\""),
        "{}",
        out.context()
    );
    assert!(!out.stdout.contains("hunter2"), "{}", out.context());

    // Nor when connecting fails.
    let mut command = weir(&["run"]);
    command
        .env("WEIR_BUS__KIND", "nats")
        .env("WEIR_NATS__URL", url);
    let out = finish(command, None);
    assert_eq!(out.code(), Some(69), "{}", out.context());
    assert!(
        out.stderr.contains("nats://weir:***@127.0.0.1:1"),
        "{}",
        out.context()
    );
    assert!(!out.stderr.contains("hunter2"), "{}", out.context());
}

#[test]
fn admin_refusals_exit_with_a_code_that_says_whether_to_try_again() {
    for (status, code) in [
        (503, 75),
        (409, 75),
        (401, 77),
        (403, 77),
        (404, 65),
        (400, 65),
        (500, 1),
    ] {
        let node = StandIn::start("127.0.0.1", status, r#"{"error":"refused for the test"}"#);
        run(&[
            "groups",
            "pause",
            "--group",
            "g",
            "--url",
            &node.url(),
            "--token",
            "t0ken",
        ])
        .expect_code(code)
        .expect_stderr("refused for the test");
    }
}

#[test]
fn an_admin_write_gives_up_after_its_timeout() {
    // A node that accepts the connection and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let started = Instant::now();
    run(&[
        "dead-letters",
        "purge",
        "--group",
        "g",
        "--all",
        "--url",
        &url,
        "--token",
        "t0ken",
        "--timeout",
        "1s",
    ])
    .expect_code(75)
    .expect_stderr("did not answer within 1s");
    assert!(started.elapsed() < FINISH_TIMEOUT);
    drop(listener);
}
