//! The `weir` binary: parse the command line, start logging, run the subcommand.

#![forbid(unsafe_code)]

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    let cli = weir::cli::Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!("weir: invalid --log filter {:?}: {e}", cli.log);
        std::process::exit(weir::config::EXIT_INVALID_CONFIG);
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(error) = weir::cli::run(cli).await {
        eprintln!("weir: {error}");
        std::process::exit(error.exit_code());
    }
}
