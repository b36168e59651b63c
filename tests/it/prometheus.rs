//! A real Prometheus scraping a running weir node: the metrics reach Prometheus
//! and can be queried back through its HTTP API, as dashboards and alerts will.
//!
//! Needs the `prometheus` server binary (Debian's `prometheus` package, which
//! `scripts/test.sh` installs); without it the test skips, unless
//! `WEIR_REQUIRE_SERVICES=1`, which makes it fail.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::node::{DemoNode, free_port, http_get};
use crate::common::{self, service_missing};
use serde_json::Value;

/// How long Prometheus may take to start and scrape: a guard against hangs.
const WAIT: Duration = Duration::from_secs(90);

struct Prometheus {
    child: Child,
    address: SocketAddr,
    dir: std::path::PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second; `None` (after noting the
    /// skip, or failing when services are required) if it is not installed.
    fn start(target: SocketAddr) -> Option<Self> {
        let binary = ["prometheus", "/usr/bin/prometheus"]
            .into_iter()
            .find(|binary| {
                Command::new(binary)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
            });
        let Some(binary) = binary else {
            service_missing("Prometheus", "no prometheus binary on PATH");
            return None;
        };
        let dir = std::env::temp_dir().join(common::unique_name("weir_prometheus"));
        std::fs::create_dir_all(&dir).expect("a directory for Prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: weir\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write the Prometheus config");
        let address: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("a log file");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start Prometheus");
        Some(Self {
            child,
            address,
            dir,
        })
    }

    /// The result vector of an instant query, once the API answers.
    fn query(&self, expr: &str) -> Option<Vec<Value>> {
        let path = format!("/api/v1/query?query={}", url_encode(expr));
        let (code, body) = http_get(self.address, &path).ok()?;
        if code != 200 {
            return None;
        }
        let reply: Value = serde_json::from_str(&body).ok()?;
        reply["data"]["result"].as_array().cloned()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_a_node_and_answers_queries_for_its_lag() {
    common::init_logging();
    let node = DemoNode::start();
    let Some(prometheus) = Prometheus::start(node.address) else {
        return;
    };
    let deadline = Instant::now() + WAIT;
    let lag = loop {
        if let Some(result) = prometheus.query("weir_consumer_lag_events") {
            if !result.is_empty() {
                break result;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus returned no weir_consumer_lag_events within {WAIT:?}\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // The demo subscription consumes the demo categories, each a source of its own.
    let mut sources: Vec<&str> = lag
        .iter()
        .map(|series| {
            assert_eq!(series["metric"]["group"], "demo", "{series}");
            assert_eq!(series["metric"]["job"], "weir", "{series}");
            let value: f64 = series["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .expect("a numeric sample");
            assert!(value >= 0.0, "{series}");
            series["metric"]["source"].as_str().expect("a source label")
        })
        .collect();
    sources.sort_unstable();
    assert_eq!(sources, ["category:orders", "category:payments"]);

    // The events the node processed reach Prometheus too, and they keep growing.
    let processed = |prometheus: &Prometheus| -> f64 {
        prometheus
            .query("sum(weir_consumer_events_total)")
            .and_then(|result| result.first().cloned())
            .and_then(|series| series["value"][1].as_str().and_then(|v| v.parse().ok()))
            .unwrap_or(0.0)
    };
    let first = processed(&prometheus);
    loop {
        if processed(&prometheus) > first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "weir_consumer_events_total did not grow in Prometheus\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
