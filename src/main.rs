//! The `weir` binary: parse the command line, load the configuration, start
//! logging as `[log]` says, run the subcommand.

#![forbid(unsafe_code)]

use std::io::Write;

use clap::Parser;

/// Reports `error` on stderr; a closed stderr must not turn an exit into a panic.
fn report(error: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "weir: {error}");
}

#[tokio::main]
async fn main() {
    let cli = weir::cli::Cli::parse();
    let config = cli.load_config().unwrap_or_else(|error| {
        report(error);
        std::process::exit(weir::config::EXIT_INVALID_CONFIG);
    });
    let log = &config.log;
    if let Err(error) = weir::telemetry::logging::init(log.format, &log.level, cli.log.as_deref()) {
        report(error);
        std::process::exit(weir::config::EXIT_INVALID_CONFIG);
    }
    if let Err(error) = weir::cli::run_with_config(cli, config).await {
        report(&error);
        std::process::exit(error.exit_code());
    }
}
