//! `weir run` nodes started by a bench as real processes of this executable,
//! from a config file the bench writes, so that what is measured is what an
//! operator runs: separate processes, their own pools, bus clients and sinks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::CliError;
use crate::config::Config;

/// How long a node may take to become ready, or to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// One running node. Killed when dropped, should the bench fail before it stops
/// them gracefully.
struct Node {
    id: String,
    child: Child,
    http: SocketAddr,
    log: PathBuf,
}

/// Nodes sharing one generated config file in a directory of their own.
pub(super) struct Nodes {
    dir: PathBuf,
    nodes: Vec<Node>,
}

fn io_error(context: &str, error: impl std::fmt::Display) -> CliError {
    CliError::Io(std::io::Error::other(format!("{context}: {error}")))
}

impl Nodes {
    /// Writes `config` into a fresh directory named after `tag` and starts
    /// `count` nodes from it, each with its own id and a free HTTP port.
    pub(super) async fn start(config: &Config, tag: &str, count: usize) -> Result<Self, CliError> {
        let dir = std::env::temp_dir().join(format!("weir-bench-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("weir.toml");
        let text = toml::to_string(config).map_err(|e| io_error("cannot write the config", e))?;
        std::fs::write(&path, text)?;
        let exe = std::env::current_exe()?;
        let mut nodes = Self {
            dir,
            nodes: Vec::new(),
        };
        for index in 1..=count {
            let id = format!("{tag}-{index}");
            let http: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            let log = nodes.dir.join(format!("{id}.log"));
            let mut command = Command::new(&exe);
            // The generated file says everything; inherited variables would
            // override it (the env layer is stronger than the file).
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("WEIR_") {
                    command.env_remove(name);
                }
            }
            let child = command
                .args(["run", "--config"])
                .arg(&path)
                .env("WEIR_NODE__ID", &id)
                .env("WEIR_HTTP__LISTEN", http.to_string())
                .env("WEIR_LOG", "warn")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .kill_on_drop(true)
                .spawn()?;
            nodes.nodes.push(Node {
                id,
                child,
                http,
                log,
            });
        }
        Ok(nodes)
    }

    /// Waits until every node answers `/readyz` with 200.
    pub(super) async fn wait_ready(&mut self) -> Result<(), CliError> {
        let deadline = Instant::now() + START_TIMEOUT;
        for node in &mut self.nodes {
            loop {
                if let Ok(200) = get_status(node.http, "/readyz").await {
                    break;
                }
                if let Ok(Some(status)) = node.child.try_wait() {
                    return Err(node.failure(&format!("exited ({status}) before it was ready")));
                }
                if Instant::now() > deadline {
                    return Err(node.failure(&format!("was not ready within {START_TIMEOUT:?}")));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// SIGTERM to every node, then waits for each to exit; an error names the
    /// node that failed to stop cleanly, with its log's tail.
    pub(super) async fn stop(mut self) -> Result<(), CliError> {
        for node in &self.nodes {
            if let Some(pid) = node.child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
        }
        let mut problems = Vec::new();
        for node in &mut self.nodes {
            match tokio::time::timeout(EXIT_TIMEOUT, node.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => problems.push(node.failure(&format!("stopped with {status}"))),
                Ok(Err(error)) => problems.push(io_error(&node.id, error)),
                Err(_) => {
                    let _ = node.child.kill().await;
                    problems.push(node.failure("did not exit after SIGTERM (killed it)"));
                }
            }
        }
        match problems.into_iter().next() {
            Some(problem) => Err(problem),
            None => {
                let _ = std::fs::remove_dir_all(&self.dir);
                Ok(())
            }
        }
    }
}

impl Node {
    fn failure(&self, what: &str) -> CliError {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        io_error(
            &format!("bench node {} {what}; its log ends", self.id),
            tail.join("\n"),
        )
    }
}

/// The status code of one HTTP/1.1 GET.
async fn get_status(address: SocketAddr, path: &str) -> std::io::Result<u16> {
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP response"))
    };
    tokio::time::timeout(Duration::from_secs(5), ask)
        .await
        .map_err(|_| std::io::Error::other("no answer"))?
}
