//! Private service processes for tests that stop, restart or pause the services
//! themselves: a PostgreSQL server, a NATS server with JetStream and a
//! Kafka-protocol broker (tansu). Each listens on a free loopback port and keeps
//! its data in a temporary directory of its own, so a test can run beside others
//! that use the shared services; each is stopped and its directory removed when
//! dropped.
//!
//! Binaries are looked up as follows; when one is missing, `start` returns `None`
//! after [`service_missing`] (which fails the test under `WEIR_REQUIRE_SERVICES=1`
//! and otherwise notes the skip):
//!
//! - PostgreSQL: the directory `WEIR_TEST_POSTGRES_BIN` names, else the newest
//!   `/usr/lib/postgresql/VERSION/bin` (Debian's layout), else `initdb` on `PATH`.
//!   PostgreSQL refuses to run as root, so under root its programs run as the
//!   `postgres` OS user through `runuser`, with a data directory chowned to it.
//! - NATS: `WEIR_TEST_NATS_SERVER`, else `nats-server` on `PATH` or in `/usr/sbin`.
//! - tansu: `WEIR_TEST_TANSU`, else `tansu` on `PATH` or in `$CARGO_HOME/bin`
//!   (where `scripts/test.sh` installs it).

use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::node::free_port;
use super::service_missing;

/// How long a service may take to start listening: a guard against hangs.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `signal` (a name such as `STOP`, `CONT`, `TERM`) to process `pid`.
pub fn send_signal(pid: u32, signal: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .map_err(|error| format!("cannot run kill -{signal} {pid}: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{signal} {pid} failed with {status}"))
    }
}

/// Whether this process runs as root (the owner of `/proc/self` is its uid).
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// The first of `candidates` that is a file.
fn first_file(candidates: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    candidates.into_iter().find(|candidate| candidate.is_file())
}

/// `name` in every directory of `PATH`, then in `extra` directories.
fn on_path(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    first_file(
        std::env::split_paths(&path)
            .chain(extra.iter().cloned())
            .map(|dir| dir.join(name)),
    )
}

/// The binary an environment variable names, if it is set (even if it is wrong:
/// a wrong setting should fail loudly, not fall back to something else).
fn from_env(variable: &str) -> Option<PathBuf> {
    std::env::var_os(variable)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

fn wait_for_port(port: u16, what: &str, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "{what} did not listen on port {port} within {LISTEN_TIMEOUT:?}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// A broker process we start ourselves (NATS, tansu)

/// One server process on a fixed port, in a directory of its own, which can be
/// killed and started again there; killed when dropped.
pub struct ServerProcess {
    name: &'static str,
    binary: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl ServerProcess {
    fn new(name: &'static str, binary: PathBuf, args: Vec<String>, port: u16) -> Self {
        Self {
            name,
            binary,
            args,
            child: None,
            port,
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Starts the process (again) and waits until it listens on its port.
    pub fn start(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        // Appending keeps the log of earlier runs, for when a test fails later.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .map_err(|error| format!("cannot open the {} log: {error}", self.name))?;
        // In its own directory, where a server given relative paths keeps its data.
        let child = Command::new(&self.binary)
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|error| error.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|error| format!("cannot start {}: {error}", self.binary.display()))?;
        self.child = Some(child);
        wait_for_port(self.port, self.name, &self.log())
    }

    /// Kills the process at once, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The end of the process's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(
            &std::fs::read_to_string(self.log()).unwrap_or_default(),
            lines,
        )
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // A paused process ignores nothing but SIGKILL, which is what kill sends.
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- log of the private {} on port {} (last lines)\n{}",
                self.name,
                self.port,
                self.log_tail(30)
            );
        }
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A private `nats-server` with JetStream, its store in its own directory, so a
/// restart keeps every stream.
pub struct PrivateNats {
    pub server: ServerProcess,
}

impl PrivateNats {
    /// `None` (after noting the skip, or failing when services are required) if
    /// there is no `nats-server`; one that is there but does not start fails the
    /// test.
    pub fn start() -> Option<Self> {
        Self::start_with(|_| Vec::new())
    }

    /// Like [`PrivateNats::start`], with more arguments for the server, made from
    /// its directory (for a config file written there): authentication, a small
    /// payload limit.
    pub fn start_with(extra: impl FnOnce(&Path) -> Vec<String>) -> Option<Self> {
        super::init_logging();
        let binary = from_env("WEIR_TEST_NATS_SERVER").or_else(|| {
            on_path(
                "nats-server",
                &[PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")],
            )
        });
        let Some(binary) = binary else {
            service_missing(
                "nats-server",
                "not found on PATH nor in /usr/sbin (or set WEIR_TEST_NATS_SERVER)",
            );
            return None;
        };
        let port = free_port();
        let mut server = ServerProcess::new("nats-server", binary, Vec::new(), port);
        let store = server.dir.path().join("jetstream");
        server.args = [
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-js",
            "-sd",
            store.to_str().expect("a UTF-8 temporary path"),
        ]
        .map(String::from)
        .to_vec();
        server.args.extend(extra(server.dir.path()));
        if let Err(error) = server.start() {
            panic!("a private nats-server did not start: {error}");
        }
        Some(Self { server })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.server.port)
    }
}

/// Private `nats-server`s with JetStream clustered on loopback: each a
/// [`PrivateNats`] (a free client port, a store of its own) with a server name
/// (`n1`, `n2`, ...) and a free cluster port, routed to every other. A server
/// killed and started again keeps its port, name, routes and store. The servers
/// listen once started, but JetStream serves only once they have found each
/// other: wait for that before using it.
pub struct PrivateNatsCluster {
    pub servers: Vec<PrivateNats>,
}

impl PrivateNatsCluster {
    /// `size` servers; `None` as [`PrivateNats::start`].
    pub fn start(size: usize) -> Option<Self> {
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|port| format!("\"nats-route://127.0.0.1:{port}\""))
            .collect();
        let mut servers = Vec::with_capacity(size);
        for (index, port) in cluster_ports.iter().enumerate() {
            let config = format!(
                "server_name: {}\ncluster {{\n  name: weir-test\n  listen: \"127.0.0.1:{port}\"\n  routes: [{}]\n}}\n",
                Self::server_name(index),
                routes.join(", ")
            );
            servers.push(PrivateNats::start_with(|dir| {
                let file = dir.join("cluster.conf");
                std::fs::write(&file, config).expect("write the server's config file");
                let file = file.to_str().expect("a UTF-8 temporary path").to_owned();
                vec!["-c".to_owned(), file]
            })?);
        }
        Some(Self { servers })
    }

    /// The `server_name` of server `index`, as JetStream names stream leaders.
    pub fn server_name(index: usize) -> String {
        format!("n{}", index + 1)
    }

    /// Every server's URL, comma-separated, as `nats.url` takes them.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(PrivateNats::url)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// tansu's storage engine for a private broker: topics in a SQLite file in the
/// broker's directory (where it runs), which survives a restart, so a test can
/// kill the broker and start it again on the same port and data. (With its
/// in-memory storage, a restart would wipe every topic.)
const TANSU_STORAGE: &str = "sqlite://tansu.db";

/// The feature tansu needs for [`TANSU_STORAGE`], as `tansu --help` names it.
const TANSU_ENGINE: &str = "libsql";

/// A private tansu broker (Kafka protocol), its topics in a file of its own
/// directory (see [`TANSU_STORAGE`]).
pub struct PrivateTansu {
    pub server: ServerProcess,
}

impl PrivateTansu {
    /// `None` (after noting the skip, or failing when services are required) if
    /// there is no `tansu`, or none built with its `libsql` feature
    /// (`scripts/test.sh` installs one).
    pub fn start() -> Option<Self> {
        let cargo_bin = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
            .map(|home| home.join("bin"));
        let binary = from_env("WEIR_TEST_TANSU").or_else(|| on_path("tansu", cargo_bin.as_slice()));
        let Some(binary) = binary else {
            service_missing(
                "tansu (a Kafka-protocol broker)",
                "not found on PATH nor in $CARGO_HOME/bin (or set WEIR_TEST_TANSU); scripts/test.sh installs it",
            );
            return None;
        };
        let engines = storage_engines(&binary);
        if !engines.iter().any(|engine| engine == TANSU_ENGINE) {
            service_missing(
                "tansu with file storage",
                format!(
                    "{} was built with the storage engines {engines:?}, not {TANSU_ENGINE}; scripts/test.sh installs one with `--features dynostore,libsql`",
                    binary.display()
                ),
            );
            return None;
        }
        let port = free_port();
        let listener = format!("tcp://127.0.0.1:{port}");
        let args = [
            "broker",
            "--listener-url",
            &listener,
            "--advertised-listener-url",
            &listener,
            "--storage-engine",
            TANSU_STORAGE,
        ]
        .map(String::from)
        .to_vec();
        let mut server = ServerProcess::new("tansu", binary, args, port);
        if let Err(error) = server.start() {
            service_missing("a private tansu broker", error);
            return None;
        }
        Some(Self { server })
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.server.port)
    }
}

/// The storage engines `binary` (a tansu) was built with, from the
/// `Storage engines: a, b` line of its `--help`.
fn storage_engines(binary: &Path) -> Vec<String> {
    let help = Command::new(binary)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default();
    help.lines()
        .find_map(|line| line.strip_prefix("Storage engines:"))
        .map(|list| {
            list.split(',')
                .map(|engine| engine.trim().to_owned())
                .filter(|engine| !engine.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// PostgreSQL

/// A private PostgreSQL server: its own data directory and socket directory, on
/// a free loopback port, trusting local connections. It can be stopped (`pg_ctl
/// stop -m fast`, as an operator would) and started again on the same port and
/// data; it is stopped and removed when dropped. [`PostgresSetup`] changes its
/// settings, its `pg_hba.conf` and the files in its data directory (TLS
/// certificates); [`PrivatePostgres::start_standby`] makes a streaming standby
/// of a running one.
pub struct PrivatePostgres {
    bin: PathBuf,
    /// The OS user to run PostgreSQL's programs as (`postgres` when we are root).
    run_as: Option<String>,
    dir: tempfile::TempDir,
    pub port: u16,
}

/// How to set a [`PrivatePostgres`] up beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct PostgresSetup {
    /// Lines added to `postgresql.conf` after the defaults (later lines win).
    pub settings: Vec<String>,
    /// The whole `pg_hba.conf`, instead of initdb's (trust for local and loopback
    /// connections, replication included).
    pub hba: Option<String>,
    /// Files written into the data directory, owned by the server's OS user and
    /// readable by it alone (as PostgreSQL wants of a TLS key): (name, contents).
    pub files: Vec<(String, Vec<u8>)>,
}

impl PrivatePostgres {
    /// Creates a cluster with `initdb` and starts it; `None` (after noting the
    /// skip, or failing when services are required) if that is impossible here.
    pub fn start() -> Option<Self> {
        Self::start_with(PostgresSetup::default())
    }

    /// As [`PrivatePostgres::start`], set up as `setup` says.
    pub fn start_with(setup: PostgresSetup) -> Option<Self> {
        let bin = Self::find_bin()?;
        match Self::create(bin, &setup) {
            Ok(postgres) => Some(postgres),
            Err(error) => {
                service_missing("a private PostgreSQL server", error);
                None
            }
        }
    }

    /// A streaming hot standby of `primary` (which must be running), made with
    /// `pg_basebackup -R` and started on a port of its own; `setup` adds to it
    /// as to a primary (its `hba`, if any, replaces the copied one).
    pub fn start_standby(primary: &PrivatePostgres, setup: PostgresSetup) -> Result<Self, String> {
        let standby = Self::empty(primary.bin.clone())?;
        let data = standby.data();
        standby.run(
            "pg_basebackup",
            &[
                "-D",
                data.to_str().expect("a UTF-8 temporary path"),
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        )?;
        standby.configure(&setup, &["hot_standby = on".to_owned()])?;
        standby.start_server()?;
        Ok(standby)
    }

    fn find_bin() -> Option<PathBuf> {
        let bin = postgres_bin();
        if bin.is_none() {
            service_missing(
                "PostgreSQL's server programs (initdb, pg_ctl)",
                "not found in WEIR_TEST_POSTGRES_BIN, /usr/lib/postgresql/*/bin or on PATH",
            );
        }
        bin
    }

    /// A server with its directories made, no cluster yet.
    fn empty(bin: PathBuf) -> Result<Self, String> {
        let run_as = running_as_root().then(|| "postgres".to_owned());
        let dir = tempfile::tempdir().map_err(|error| error.to_string())?;
        std::fs::create_dir(dir.path().join("socket")).map_err(|error| error.to_string())?;
        let postgres = Self {
            bin,
            run_as,
            dir,
            port: free_port(),
        };
        postgres.give_to_server(postgres.dir.path())?;
        Ok(postgres)
    }

    /// Makes `path` (recursively) the server's OS user's, when that is another.
    fn give_to_server(&self, path: &Path) -> Result<(), String> {
        let Some(user) = &self.run_as else {
            return Ok(());
        };
        // PostgreSQL runs as `user` and must own its directories.
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{user}:"))
            .arg(path)
            .status()
            .map_err(|error| format!("cannot run chown: {error}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "cannot give {} to OS user {user} (does it exist?): chown {status}",
                path.display()
            ))
        }
    }

    fn create(bin: PathBuf, setup: &PostgresSetup) -> Result<Self, String> {
        let postgres = Self::empty(bin)?;
        let data = postgres.data();
        postgres.run(
            "initdb",
            &[
                "-D",
                data.to_str().expect("a UTF-8 temporary path"),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        postgres.configure(setup, &[])?;
        postgres.start_server()?;
        Ok(postgres)
    }

    /// Writes the settings (the defaults, `more`, then `setup`'s), the
    /// `pg_hba.conf` and the files of `setup` into the data directory.
    fn configure(&self, setup: &PostgresSetup, more: &[String]) -> Result<(), String> {
        let data = self.data();
        // Settings in the cluster's own file, so every start uses the same port
        // and socket directory. Durability does not matter for a throwaway
        // cluster, and skipping fsync keeps it fast on a small machine.
        let mut settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n",
            self.port,
            self.dir.path().join("socket").display()
        );
        for line in more.iter().chain(&setup.settings) {
            settings.push_str(line);
            settings.push('\n');
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(|error| error.to_string())?;
        text.push_str(&settings);
        std::fs::write(&conf, text).map_err(|error| error.to_string())?;
        if let Some(hba) = &setup.hba {
            std::fs::write(data.join("pg_hba.conf"), hba).map_err(|error| error.to_string())?;
        }
        for (name, contents) in &setup.files {
            let path = data.join(name);
            std::fs::write(&path, contents).map_err(|error| error.to_string())?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|error| error.to_string())?;
        }
        self.give_to_server(&data)
    }

    /// The directory of the server's Unix socket, for connections that
    /// `pg_hba.conf`'s `local` lines let in whatever its TCP lines say.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// A connection string through the Unix socket, for `database`.
    pub fn socket_url(&self, database: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={database}",
            self.socket_dir().display(),
            self.port
        )
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Runs one of PostgreSQL's programs (as the `postgres` user when we are root).
    fn run(&self, program: &str, args: &[&str]) -> Result<ExitStatus, String> {
        let binary = self.bin.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        // PG* variables of the caller's environment must not redirect the programs.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PG") {
                command.env_remove(name);
            }
        }
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("cannot run {}: {error}", binary.display()))?;
        if output.status.success() {
            Ok(output.status)
        } else {
            Err(format!(
                "{program} {} failed with {}:\n{}{}\nserver log:\n{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                tail(&std::fs::read_to_string(self.log()).unwrap_or_default(), 20)
            ))
        }
    }

    fn start_server(&self) -> Result<(), String> {
        let data = self.data();
        let log = self.log();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("a UTF-8 temporary path"),
                "-l",
                log.to_str().expect("a UTF-8 temporary path"),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        wait_for_port(self.port, "PostgreSQL", &log)
    }

    /// Stops the server as an operator would (`pg_ctl stop -m fast`: open
    /// connections are closed, transactions in progress roll back).
    pub fn stop(&self) -> Result<(), String> {
        self.pg_ctl_stop("fast")
    }

    /// Promotes a standby to a primary (`pg_ctl promote -w`), as a failover does.
    pub fn promote(&self) -> Result<(), String> {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("a UTF-8 temporary path"),
                "-w",
                "-t",
                "60",
                "promote",
            ],
        )
        .map(drop)
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn start_again(&self) -> Result<(), String> {
        self.start_server()
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), String> {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("a UTF-8 temporary path"),
                "-m",
                mode,
                "-w",
                "-t",
                "60",
                "stop",
            ],
        )
        .map(drop)
    }

    /// A connection URL for `database` (`postgres` always exists).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(
            &std::fs::read_to_string(self.log()).unwrap_or_default(),
            lines,
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- log of the private PostgreSQL on port {} (last lines)\n{}",
                self.port,
                self.log_tail(30)
            );
        }
        // Immediate: nothing in a throwaway cluster is worth a clean shutdown.
        let _ = self.pg_ctl_stop("immediate");
    }
}

/// Where PostgreSQL's server programs are: see the module docs.
fn postgres_bin() -> Option<PathBuf> {
    if let Some(dir) = from_env("WEIR_TEST_POSTGRES_BIN") {
        return Some(dir);
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<f64>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, bin)| bin);
    newest.or_else(|| {
        on_path("initdb", &[])
            .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
            .filter(|dir| dir.join("pg_ctl").is_file())
    })
}
