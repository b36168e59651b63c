//! `weir run` nodes as separate processes sharing one config file, which a test
//! can stop gracefully (SIGTERM), kill (SIGKILL), pause (SIGSTOP) and resume, and
//! ask over HTTP (`/status`, `/readyz`, `/metrics`).
//!
//! Every wait is async (the test's runtime keeps timestamping what its readers
//! receive meanwhile) and every operation returns `Err` with the node's log tail
//! instead of panicking, so a test can report a broken step and carry on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::node::{free_port, http_get, weir_command};
use super::services::{send_signal, tail};

/// How long a node may take to start or to exit: guards against hangs.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one HTTP request to a node may take (a paused node never answers).
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// One `weir run` process.
pub struct WeirNode {
    child: Child,
    pub log: PathBuf,
    pub http: SocketAddr,
    pub paused: bool,
}

/// Nodes started from one config file, by id.
pub struct WeirNodes {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub nodes: BTreeMap<String, WeirNode>,
    /// Nodes launched so far: numbers each run's log, so a restarted node's
    /// earlier logs are kept.
    launches: usize,
}

impl WeirNodes {
    /// Nodes that will run `weir run --config CONFIG`, logging into `dir`.
    pub fn new(dir: &Path, config: PathBuf) -> Self {
        Self {
            dir: dir.to_path_buf(),
            config,
            nodes: BTreeMap::new(),
            launches: 0,
        }
    }

    /// Runs `weir migrate` with the config.
    pub async fn migrate(&self) -> Result<(), String> {
        let output = tokio::process::Command::from(weir_command())
            .args(["migrate", "--config"])
            .arg(&self.config)
            .output()
            .await
            .map_err(|error| format!("cannot run weir migrate: {error}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "weir migrate failed with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Starts node `id` in `role` (without waiting for it to start).
    fn launch(&mut self, id: &str, role: &str) -> Result<(), String> {
        self.launches += 1;
        let log = self.dir.join(format!("{id}.{}.log", self.launches));
        let file = std::fs::File::create(&log).map_err(|error| error.to_string())?;
        let http: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("a local address");
        let child = weir_command()
            .args(["run", "--config"])
            .arg(&self.config)
            .env("WEIR_NODE__ID", id)
            .env("WEIR_NODE__ROLE", role)
            .env("WEIR_HTTP__LISTEN", http.to_string())
            .env("WEIR_LOG", "info,weir=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|error| format!("cannot start weir: {error}"))?;
        self.nodes.insert(
            id.to_owned(),
            WeirNode {
                child,
                log,
                http,
                paused: false,
            },
        );
        Ok(())
    }

    /// Starts nodes `ids` in `role` together and waits until each says it started.
    pub async fn start(&mut self, ids: &[&str], role: &str) -> Result<(), String> {
        for id in ids {
            self.launch(id, role)?;
        }
        for id in ids {
            self.wait_for_log(id, "weir node started", START_TIMEOUT)
                .await?;
        }
        Ok(())
    }

    async fn wait_for_log(
        &mut self,
        id: &str,
        needle: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let node = self
                .nodes
                .get_mut(id)
                .ok_or_else(|| format!("no node {id}"))?;
            let log = std::fs::read_to_string(&node.log).unwrap_or_default();
            if log.contains(needle) {
                return Ok(());
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                let log = tail(&log, 30);
                self.nodes.remove(id);
                return Err(format!(
                    "node {id} exited ({status}) before logging {needle:?}:\n{log}"
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "node {id} did not log {needle:?} within {timeout:?}:\n{}",
                    tail(&log, 30)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM to each of `ids` at once, then waits for all of them to exit;
    /// `Err` if one does not exit in time or exits with a failure.
    pub async fn stop(&mut self, ids: &[&str]) -> Result<(), String> {
        let mut stopping = Vec::new();
        for id in ids {
            let node = self
                .nodes
                .remove(*id)
                .ok_or_else(|| format!("no running node {id}"))?;
            send_signal(node.child.id(), "TERM")?;
            stopping.push((id.to_string(), node));
        }
        let mut problems = Vec::new();
        for (id, mut node) in stopping {
            match wait_for_exit(&mut node.child, EXIT_TIMEOUT).await {
                Some(status) if status.success() => {}
                Some(status) => problems.push(format!(
                    "node {id} stopped with {status}:\n{}",
                    tail(&read(&node.log), 30)
                )),
                None => {
                    let _ = node.child.kill();
                    let _ = node.child.wait();
                    problems.push(format!(
                        "node {id} did not exit within {EXIT_TIMEOUT:?} of SIGTERM (killed it):\n{}",
                        tail(&read(&node.log), 30)
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// SIGKILL: no goodbye, no final checkpoint.
    pub fn kill(&mut self, id: &str) -> Result<(), String> {
        let mut node = self
            .nodes
            .remove(id)
            .ok_or_else(|| format!("no running node {id}"))?;
        node.child
            .kill()
            .map_err(|error| format!("cannot kill node {id}: {error}"))?;
        let _ = node.child.wait();
        Ok(())
    }

    /// SIGSTOP: the node freezes, its connections stay open.
    pub fn pause(&mut self, id: &str) -> Result<(), String> {
        let node = self
            .nodes
            .get_mut(id)
            .ok_or_else(|| format!("no node {id}"))?;
        send_signal(node.child.id(), "STOP")?;
        node.paused = true;
        Ok(())
    }

    /// SIGCONT: a paused node carries on where it was.
    pub fn resume(&mut self, id: &str) -> Result<(), String> {
        let node = self
            .nodes
            .get_mut(id)
            .ok_or_else(|| format!("no node {id}"))?;
        send_signal(node.child.id(), "CONT")?;
        node.paused = false;
        Ok(())
    }

    /// Ids of the nodes running (not paused).
    pub fn running(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, node)| !node.paused)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// One GET to node `id`: status code and body.
    pub async fn get(&self, id: &str, path: &str) -> Result<(u16, String), String> {
        let node = self.nodes.get(id).ok_or_else(|| format!("no node {id}"))?;
        if node.paused {
            return Err(format!("node {id} is paused"));
        }
        let address = node.http;
        let path = path.to_owned();
        let request = tokio::task::spawn_blocking(move || http_get(address, &path));
        match tokio::time::timeout(HTTP_TIMEOUT, request).await {
            Ok(Ok(Ok(answer))) => Ok(answer),
            Ok(Ok(Err(error))) => Err(format!("GET {address}: {error}")),
            Ok(Err(error)) => Err(format!("GET {address}: {error}")),
            Err(_) => Err(format!("GET {address}: no answer within {HTTP_TIMEOUT:?}")),
        }
    }

    /// Node `id`'s `/status` as JSON.
    pub async fn status(&self, id: &str) -> Result<Value, String> {
        match self.get(id, "/status").await? {
            (200, body) => serde_json::from_str(&body)
                .map_err(|error| format!("/status of {id} is not JSON ({error}): {body}")),
            (code, body) => Err(format!("/status of {id} answered {code}: {body}")),
        }
    }

    /// The leader and epoch as node `id` reports them.
    pub async fn leader(&self, id: &str) -> Result<(Option<String>, u64), String> {
        let status = self.status(id).await?;
        Ok((
            status["leader"].as_str().map(str::to_owned),
            status["epoch"].as_u64().unwrap_or(0),
        ))
    }

    /// The sources node `id` consumes now, by its `/status`.
    pub async fn owned_sources(&self, id: &str) -> Result<Vec<String>, String> {
        Ok(owned_in(&self.status(id).await?))
    }

    /// Every source node `id` holds, with its consumer's state (`running`,
    /// `paused`, ...), by its `/status`.
    pub async fn source_states(&self, id: &str) -> Result<Vec<(String, String)>, String> {
        Ok(source_states_in(&self.status(id).await?))
    }

    /// The last lines of every log file written here (every node, every run).
    pub fn logs(&self, lines: usize) -> String {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "log"))
            .collect();
        entries.sort();
        entries
            .iter()
            .map(|path| {
                format!(
                    "--- {} (last lines)\n{}\n",
                    path.display(),
                    tail(&read(path), lines)
                )
            })
            .collect()
    }
}

impl Drop for WeirNodes {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            // SIGKILL ends a paused process too.
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

/// Every source a node's `/status` lists, with its consumer's state.
pub fn source_states_in(status: &Value) -> Vec<(String, String)> {
    let mut states = Vec::new();
    for group in status["groups"].as_array().into_iter().flatten() {
        for subscriber in group["subscribers"].as_array().into_iter().flatten() {
            for source in subscriber["sources"].as_array().into_iter().flatten() {
                states.push((
                    source["source"].as_str().unwrap_or("?").to_owned(),
                    source["state"].as_str().unwrap_or("?").to_owned(),
                ));
            }
        }
    }
    states
}

/// The sources a node's `/status` shows it consuming (starting or running).
pub fn owned_in(status: &Value) -> Vec<String> {
    source_states_in(status)
        .into_iter()
        .filter(|(_, state)| state == "running" || state == "starting")
        .map(|(source, _)| source)
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

async fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of every sample of `name` whose labels contain `labels`, by series.
pub fn metric_samples(body: &str, name: &str, labels: &str) -> Vec<(String, f64)> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            series.strip_prefix(name).is_some_and(|rest| {
                (rest.is_empty() || rest.starts_with('{')) && rest.contains(labels)
            })
        })
        .filter_map(|(series, value)| Some((series.to_owned(), value.parse::<f64>().ok()?)))
        .collect()
}
