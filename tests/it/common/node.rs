//! A `weir run --demo` process on the embedded default (memory store and bus) with
//! its HTTP endpoints on a free port, for tests that scrape a real node, and a
//! plain HTTP GET to read them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// How long a node may take to serve its endpoints: a guard against hangs.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One GET over HTTP/1.1; the status code and body.
pub fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    read_answer(stream)
}

/// One POST of a JSON `body`, with a bearer `token` if given: the status code
/// and the body.
pub fn http_post(
    address: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let auth = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    read_answer(stream)
}

fn read_answer(mut stream: TcpStream) -> std::io::Result<(u16, String)> {
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let invalid = || std::io::Error::other(format!("not an HTTP response: {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(invalid)?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(invalid)?;
    Ok((code, body.to_owned()))
}

/// A free local port (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free local port")
}

/// The `weir` binary under test: the one cargo built for this test, unless
/// `WEIR_TEST_BINARY` names another (e.g. a copy kept apart from a target
/// directory that other checkouts' builds overwrite while a long test runs).
pub fn weir_binary() -> std::path::PathBuf {
    std::env::var_os("WEIR_TEST_BINARY")
        .filter(|path| !path.is_empty())
        .map_or_else(|| WEIR.into(), Into::into)
}

/// The `weir` binary with no inherited `WEIR_*` variable, so that the
/// developer's environment cannot change what a test runs, and stdin closed.
pub fn weir_command() -> Command {
    let mut command = Command::new(weir_binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WEIR_") {
            command.env_remove(name);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// A running demo node, killed when dropped.
pub struct DemoNode {
    child: Child,
    pub address: SocketAddr,
}

impl DemoNode {
    /// Starts the node and waits until `/livez` answers.
    pub fn start() -> Self {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let child = weir_command()
            .args(["run", "--demo", "--listen", &address.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start weir run --demo");
        let mut node = Self { child, address };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok((200, _)) = http_get(address, "/livez") {
                return node;
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                panic!("weir run --demo exited with {status} before serving {address}");
            }
            assert!(
                Instant::now() < deadline,
                "weir run --demo does not serve {address}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's `/metrics` body.
    pub fn scrape(&self) -> String {
        match http_get(self.address, "/metrics") {
            Ok((200, body)) => body,
            other => panic!("GET /metrics: {other:?}"),
        }
    }
}

impl Drop for DemoNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
