//! Stopping a `weir run --demo` process is bounded whatever its stdout and stderr
//! do: with both pipes closed by their reader (`weir run --demo 2>&1 | head`) the
//! first SIGINT stops it within the shutdown grace period plus a small margin, and
//! while a stop waits on a stdout nobody reads, a second SIGINT exits at once.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::node::{free_port, http_get, weir_command};

/// How long a node may take to start: a guard against hangs.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// What stopping may take beyond the grace period: the margin weir allows itself
/// plus slack for a loaded test machine.
const STOP_SLACK: Duration = Duration::from_secs(10);

struct Node {
    child: Child,
    address: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// `weir run --demo` with its stdout and stderr piped to the test.
    fn start(grace: &str, rate: &str) -> Self {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = weir_command()
            .args(["run", "--demo", "--listen", &address.to_string()])
            .env("WEIR_NODE__SHUTDOWN_GRACE", grace)
            // A grace period may not exceed the handover timeout.
            .env("WEIR_BROKER__HANDOVER_TIMEOUT", grace)
            .env("WEIR_DEMO__RATE", rate)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start weir run --demo");
        let mut node = Self { child, address };
        node.wait_until("the node serves /livez", START_TIMEOUT, |node| {
            matches!(http_get(node.address, "/livez"), Ok((200, _)))
        });
        node
    }

    fn wait_until(&mut self, what: &str, guard: Duration, mut done: impl FnMut(&Self) -> bool) {
        let started = Instant::now();
        while !done(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("weir exited ({status}) before: {what}");
            }
            assert!(started.elapsed() < guard, "never: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit, failing after `guard`.
    fn exit_within(&mut self, guard: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for weir") {
                return status;
            }
            assert!(
                started.elapsed() < guard,
                "weir was still running {guard:?} after being told to stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn status_text(&self) -> String {
        http_get(self.address, "/status").map_or_else(|_| String::new(), |(_, body)| body)
    }
}

#[test]
fn a_stop_is_bounded_when_the_reader_of_stdout_and_stderr_has_gone() {
    let grace = Duration::from_secs(2);
    let mut node = Node::start("2s", "20");
    // The reader takes one line, then goes away like `head` does.
    let mut first = String::new();
    BufReader::new(node.child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"cursor\""), "{first}");
    drop(node.child.stderr.take());
    // Once its writes fail, the stdout sink keeps the events and retries: the
    // consumers say so rather than dropping events as dead letters.
    node.wait_until(
        "the consumers report that they retry",
        START_TIMEOUT,
        |node| node.status_text().contains("\"retrying\""),
    );
    assert!(
        node.status_text().contains("Broken pipe"),
        "{}",
        node.status_text()
    );

    node.signal("INT");
    let status = node.exit_within(grace + STOP_SLACK);
    assert!(status.success(), "weir exited with {status}");
}

#[test]
fn a_second_signal_exits_at_once_while_a_stop_waits_on_a_stuck_stdout() {
    // Nobody reads stdout, so the pipe fills and the sink's write blocks; the
    // grace period is far longer than the test waits.
    let mut node = Node::start("10m", "2000");
    let stdout = node.child.stdout.take();
    drop(node.child.stderr.take());
    node.wait_until(
        "events back up behind the unread stdout",
        START_TIMEOUT,
        |node| {
            node.status_text()
                .split("\"lag_events\":")
                .skip(1)
                .any(|rest| rest.split(',').next().and_then(|n| n.parse::<u64>().ok()) > Some(1000))
        },
    );
    node.signal("INT");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "weir stopped although its stdout write could not finish"
    );
    node.signal("INT");
    let status = node.exit_within(STOP_SLACK);
    assert_eq!(status.code(), Some(130), "weir exited with {status}");
    drop(stdout);
}
