//! `weir run` nodes started by a bench as real processes of this executable,
//! from a config file the bench writes, so that what is measured is what an
//! operator runs: separate processes, their own pools, bus clients and sinks.

use std::collections::BTreeMap;
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

    /// The consumers' timing histograms, added up over every node.
    pub(super) async fn stage_times(&self) -> StageTimes {
        let mut times = StageTimes::default();
        for node in &self.nodes {
            if let Ok((200, body)) = get(node.http, "/metrics").await {
                times.add(&body);
            }
        }
        times
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
    get(address, path).await.map(|(status, _)| status)
}

/// The status code and body of one HTTP/1.1 GET.
async fn get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP response"))?;
        let body = response
            .split_once("\r\n\r\n")
            .map_or_else(String::new, |(_, body)| body.to_owned());
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), ask)
        .await
        .map_err(|_| std::io::Error::other("no answer"))?
}

/// Sums and counts of the consumers' timing histograms, added up over the
/// nodes: what the time of a batch went to.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct StageTimes {
    /// By stage (`read`, `claim_check`, `process`, `checkpoint`, `pickup`,
    /// `publish`): (seconds in all, how many were timed).
    pub(super) stages: BTreeMap<String, (f64, f64)>,
}

impl StageTimes {
    /// Adds up the histograms of one `/metrics` body.
    fn add(&mut self, body: &str) {
        for line in body.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let Some((stage, is_sum)) = stage_of(series) else {
                continue;
            };
            let entry = self.stages.entry(stage).or_default();
            if is_sum {
                entry.0 += value;
            } else {
                entry.1 += value;
            }
        }
    }

    /// Mean milliseconds per stage from `earlier` to `self`, and the batches timed.
    pub(super) fn since(&self, earlier: &StageTimes) -> serde_json::Value {
        let mut means = serde_json::Map::new();
        for (stage, &(sum, count)) in &self.stages {
            let (sum_before, count_before) = earlier.stages.get(stage).copied().unwrap_or_default();
            let timed = count - count_before;
            if timed > 0.0 {
                let mean_ms = (sum - sum_before) / timed * 1000.0;
                means.insert(
                    stage.clone(),
                    serde_json::json!((mean_ms * 100.0).round() / 100.0),
                );
            }
        }
        serde_json::Value::Object(means)
    }
}

/// The stage a histogram series line counts for, and whether it is the sum
/// (else the count).
fn stage_of(series: &str) -> Option<(String, bool)> {
    let (name, labels) = series.split_once('{').unwrap_or((series, ""));
    let (metric, is_sum) = if let Some(metric) = name.strip_suffix("_sum") {
        (metric, true)
    } else {
        (name.strip_suffix("_count")?, false)
    };
    let stage = match metric {
        "weir_consumer_stage_duration_seconds" => {
            let start = labels.find("stage=\"")? + "stage=\"".len();
            let end = labels[start..].find('"')? + start;
            labels[start..end].to_owned()
        }
        "weir_consumer_pickup_delay_seconds" => "pickup".to_owned(),
        "weir_sink_publish_duration_seconds" => "publish".to_owned(),
        _ => return None,
    };
    Some((stage, is_sum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_times_add_up_over_nodes_and_give_means_since_an_earlier_scrape() {
        let scrape = |read_sum: f64, read_count: u64, publish_sum: f64| {
            format!(
                "# TYPE weir_consumer_stage_duration_seconds histogram\n\
                 weir_consumer_stage_duration_seconds_bucket{{group=\"g\",stage=\"read\",le=\"0.001\"}} 1\n\
                 weir_consumer_stage_duration_seconds_sum{{group=\"g\",stage=\"read\"}} {read_sum}\n\
                 weir_consumer_stage_duration_seconds_count{{group=\"g\",stage=\"read\"}} {read_count}\n\
                 weir_sink_publish_duration_seconds_sum{{sink=\"nats\"}} {publish_sum}\n\
                 weir_sink_publish_duration_seconds_count{{sink=\"nats\"}} {read_count}\n\
                 weir_consumer_events_total{{group=\"g\"}} 7\n"
            )
        };
        let mut before = StageTimes::default();
        before.add(&scrape(0.010, 10, 0.020));
        let mut after = StageTimes::default();
        // Two nodes: their histograms add up.
        after.add(&scrape(0.030, 20, 0.060));
        after.add(&scrape(0.020, 10, 0.020));
        let means = after.since(&before);
        // (0.050 - 0.010) s over (30 - 10) batches = 2 ms; publish 3 ms.
        assert_eq!(means["read"], serde_json::json!(2.0));
        assert_eq!(means["publish"], serde_json::json!(3.0));
        assert!(means.get("claim_check").is_none());
    }
}
