//! Private `nats-server` processes for tests that restart a server or need
//! settings the shared one does not have (authentication, a small payload limit).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::service_missing;

/// A `nats-server` with JetStream on a free loopback port, its store in a
/// directory of its own; killed and removed when dropped.
pub struct PrivateServer {
    binary: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl PrivateServer {
    /// Starts a server with `extra` arguments; `None` (after noting the skip, or
    /// failing under `WEIR_REQUIRE_SERVICES=1`) if there is no `nats-server`.
    pub fn start(extra: &[&str]) -> Option<Self> {
        Self::start_with(|_| extra.iter().map(|a| a.to_string()).collect())
    }

    /// Like [`PrivateServer::start`], with arguments computed from the store
    /// directory (for config files written there).
    pub fn start_with(extra: impl FnOnce(&Path) -> Vec<String>) -> Option<Self> {
        crate::common::init_logging();
        let Some(binary) = binary() else {
            service_missing("nats-server (not on PATH nor in /usr/sbin)", "not found");
            return None;
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let store = dir.path().join("jetstream");
        let mut args: Vec<String> = [
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-js",
            "-sd",
            store.to_str().expect("UTF-8 temporary path"),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra(dir.path()));
        let mut server = Self {
            binary,
            args,
            child: None,
            port,
            dir,
        };
        server.launch();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("a log file");
        let child = Command::new(&self.binary)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on port {} within 15 s; its log: {}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "log of the private nats-server on port {}:\n{}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
        }
    }
}

fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}
