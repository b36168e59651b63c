//! `weir run`: start a node in its configured role and stop cleanly on a signal.
//! For now the node opens its store and waits; the broker, consumers and sinks join
//! it in later releases.

use super::CliError;
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(config: &Config, _args: Args) -> Result<(), CliError> {
    let shutdown = super::signal::shutdown_token()?;
    let _store = super::open_store(config).await?;
    tracing::info!(
        node = %config.node_id(),
        role = %config.node.role,
        store = ?config.store.kind,
        "weir node started; stop it with Ctrl-C or SIGTERM"
    );
    shutdown.cancelled().await;
    tracing::info!(node = %config.node_id(), "weir node stopped");
    Ok(())
}
