//! The `weir` command line: argument definitions and one module per subcommand.
//! `main.rs` parses, starts logging and calls [`run`]; every subcommand returns a
//! [`CliError`] whose [`CliError::exit_code`] the process exits with.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use crate::broker::BrokerRole;
use crate::config::{self, Config, ConfigError, Overrides, StoreKind};
use crate::store::{self, EventStore, MemoryStore};

mod append;
mod bench;
pub mod client;
mod config_check;
mod dead_letters;
mod demo;
mod migrate;
mod observe;
pub(crate) mod operate;
mod read;
mod run;
mod signal;
mod status;

/// weir: a distributed event-processing runtime and streaming bridge.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about, propagate_version = true)]
pub struct Cli {
    /// TOML config file; without one, the embedded default (memory store) is used.
    #[arg(long, global = true, env = "WEIR_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Overrides node.id.
    #[arg(long, global = true, value_name = "ID")]
    pub node_id: Option<String>,
    /// Overrides node.role.
    #[arg(long, global = true, value_enum)]
    pub role: Option<RoleArg>,
    /// Overrides store.kind.
    #[arg(long, global = true, value_enum)]
    pub store: Option<StoreArg>,
    /// Overrides store.url.
    #[arg(long, global = true, value_name = "URL")]
    pub store_url: Option<String>,
    /// Overrides store.schema.
    #[arg(long, global = true, value_name = "NAME")]
    pub schema: Option<String>,
    /// Overrides http.listen.
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Log filter, e.g. `info` or `info,weir=debug` (also read from WEIR_LOG);
    /// overrides RUST_LOG and log.level.
    #[arg(long, global = true, env = "WEIR_LOG", value_name = "FILTER")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a node in the configured role; stops cleanly on SIGINT or SIGTERM.
    Run(run::Args),
    /// Create or upgrade the store's schema (idempotent).
    Migrate,
    /// Append events to one stream, from --payload or JSON lines on stdin.
    Append(append::Args),
    /// Print events of a source as JSON lines, optionally following new ones.
    Read(read::Args),
    /// Ask a running node (at http.listen, or --url) how it is doing.
    Status(status::Args),
    /// Inspect the events consumers skipped (dead letters).
    #[command(subcommand)]
    DeadLetters(dead_letters::DeadLetters),
    /// List or reset checkpoints through a running node (writes go to the leader).
    #[command(subcommand)]
    Checkpoints(operate::Checkpoints),
    /// Pause or resume a group through a running node (writes go to the leader).
    #[command(subcommand)]
    Groups(operate::Groups),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Measure weir against raw baselines; prints one JSON line per result.
    #[command(subcommand)]
    Bench(bench::Bench),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and print the effective result (passwords redacted).
    Check,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Coordinator,
    Observer,
    Full,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StoreArg {
    Memory,
    Postgres,
}

impl Cli {
    fn overrides(&self) -> Overrides {
        Overrides {
            node_id: self.node_id.clone(),
            role: self.role.map(|r| match r {
                RoleArg::Coordinator => BrokerRole::Coordinator,
                RoleArg::Observer => BrokerRole::Observer,
                RoleArg::Full => BrokerRole::Full,
            }),
            store_kind: self.store.map(|s| match s {
                StoreArg::Memory => StoreKind::Memory,
                StoreArg::Postgres => StoreKind::Postgres,
            }),
            store_url: self.store_url.clone(),
            schema: self.schema.clone(),
            listen: self.listen.clone(),
        }
    }

    /// Loads and validates the configuration this invocation describes.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        Config::load(self.config.as_deref(), &self.overrides())
    }
}

/// Why a subcommand failed; each kind has its own exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Bus(#[from] crate::bus::Error),
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("stopped by an error policy (exit code {0})")]
    Halted(i32),
    #[error("{0}")]
    Raised(String),
    /// A running node could not be asked (`weir status`).
    #[error("{0}")]
    Unreachable(String),
    /// A running node refused an admin request; the message says why.
    #[error("{0}")]
    Refused(String),
    /// Not done yet, and worth trying again (no leader yet, a reset still in
    /// progress).
    #[error("{0}")]
    Retry(String),
    /// A running node does not let this caller write (the admin token).
    #[error("{0}")]
    Denied(String),
}

impl CliError {
    /// BSD sysexits: 64 usage or config, 65 bad input data, 69 a service is unavailable,
    /// 74 I/O, 75 not done yet (try again), 77 not allowed; an error policy's `exit`
    /// code; 1 for anything else (e.g. a write
    /// condition that does not hold, or an error policy's `raise`).
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Config(_) | CliError::Usage(_) => config::EXIT_INVALID_CONFIG,
            CliError::Input(_) | CliError::Store(store::Error::Validation(_)) => 65,
            CliError::Store(store::Error::Unavailable(_))
            | CliError::Bus(crate::bus::Error::Unavailable(_))
            | CliError::Sink(crate::sink::SinkError::Unavailable(_))
            | CliError::Unreachable(_) => 69,
            CliError::Bus(_) | CliError::Sink(_) => 1,
            CliError::Store(_) => 1,
            CliError::Io(_) => 74,
            CliError::Retry(_) => 75,
            CliError::Denied(_) => 77,
            CliError::Halted(code) => *code,
            CliError::Raised(_) | CliError::Refused(_) => 1,
        }
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let config = cli.load_config()?;
    run_with_config(cli, config).await
}

/// Runs the parsed command line with its configuration, loaded already.
pub async fn run_with_config(cli: Cli, config: Config) -> Result<(), CliError> {
    match cli.command {
        Command::Run(args) => run::run(&config, args).await,
        Command::Migrate => migrate::run(&config).await,
        Command::Append(args) => append::run(&config, args).await,
        Command::Read(args) => read::run(&config, args).await,
        Command::Status(args) => status::run(&config, args).await,
        Command::DeadLetters(command) => dead_letters::run(&config, command).await,
        Command::Checkpoints(command) => operate::checkpoints(&config, command).await,
        Command::Groups(command) => operate::groups(&config, command).await,
        Command::Config(ConfigCommand::Check) => config_check::run(&config),
        Command::Bench(bench) => bench::run(&config, bench).await,
    }
}

/// Prints `items` to stdout as JSON lines, in one write. Returns `false` once the
/// reader has gone away (`weir read | head`), which is a normal end, not an error.
pub(crate) fn print_json_lines<T: serde::Serialize>(
    items: &[T],
    buffer: &mut Vec<u8>,
) -> Result<bool, CliError> {
    use std::io::Write;
    buffer.clear();
    crate::sink::stdout::json_lines(items, buffer).map_err(std::io::Error::other)?;
    let mut out = std::io::stdout().lock();
    match out.write_all(buffer).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        written => written.map(|()| true).map_err(CliError::from),
    }
}

/// The configured store, with its schema checked, ready for use.
pub async fn open_store(config: &Config) -> Result<Arc<dyn EventStore>, CliError> {
    match config.store.kind {
        StoreKind::Memory => Ok(Arc::new(
            MemoryStore::new().with_max_event_bytes(config.store.max_event_bytes),
        )),
        #[cfg(feature = "postgres")]
        StoreKind::Postgres => {
            let store = open_postgres(config)?;
            store.check_schema().await?;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "postgres"))]
        StoreKind::Postgres => Err(CliError::Usage(
            "this weir was built without the `postgres` feature".into(),
        )),
    }
}

/// The configured Postgres store, not yet connected.
#[cfg(feature = "postgres")]
pub fn open_postgres(config: &Config) -> Result<crate::postgres::PostgresStore, CliError> {
    let url = config.store.url.clone().ok_or_else(|| {
        CliError::Usage("store.url is required when store.kind is \"postgres\"".into())
    })?;
    let tls = crate::config::postgres_tls(&config.store.tls);
    // The files named by [store.tls] (or the URL) are read now, where they must
    // be; a problem with one is a configuration error naming it.
    for url in std::iter::once(&url).chain(&config.store.read_url) {
        crate::postgres::tls::check_files(url, &tls).map_err(crate::config::store_tls_problem)?;
    }
    let options = crate::postgres::PostgresStoreOptions {
        url,
        schema: config.store.schema.clone(),
        pool_size: config.store.pool_size,
        connect_timeout: config.store.connect_timeout,
        max_event_bytes: config.store.max_event_bytes,
        tls,
        read_url: config.store.read_url.clone(),
        read_max_lag: config.store.read_max_lag,
    };
    Ok(crate::postgres::PostgresStore::connect(&options)?)
}
