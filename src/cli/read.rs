//! `weir read`: print a source's events after a cursor as JSON lines, each with its
//! `cursor`; with `--follow`, keep printing new events as they commit until stopped.

use std::time::Duration;

use super::CliError;
use crate::config::Config;
use crate::event::{Cursor, Source};

/// Events fetched per query.
const PAGE_SIZE: usize = 1000;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// `log`, `category:NAME` or `stream:CATEGORY/STREAM`.
    #[arg(long)]
    source: String,
    /// Start after this cursor (as printed in the `cursor` field); default: the beginning.
    #[arg(long, value_name = "CURSOR")]
    after: Option<String>,
    /// Print at most this many events.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Keep waiting for new events until interrupted.
    #[arg(long)]
    follow: bool,
    /// With --follow: how often to look for new events when no notification arrives.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
}

pub async fn run(config: &Config, args: Args) -> Result<(), CliError> {
    let source: Source = args
        .source
        .parse()
        .map_err(|e| CliError::Input(format!("--source: {e}")))?;
    let mut cursor = match &args.after {
        Some(text) => text
            .parse::<Cursor>()
            .map_err(|e| CliError::Input(format!("--after: {e}")))?,
        None => Cursor::START,
    };
    let shutdown = super::signal::shutdown_token(super::signal::STOP_MARGIN)?;
    let store = super::open_store(config).await?;
    // Watch before the first read, so nothing appended after it goes unannounced.
    let mut watcher = if args.follow {
        Some(store.watch().await?)
    } else {
        None
    };
    let mut remaining = args.limit.unwrap_or(usize::MAX);
    let mut buffer = Vec::new();

    while remaining > 0 && !shutdown.is_cancelled() {
        let page = store
            .read(&source, cursor, PAGE_SIZE.min(remaining))
            .await?;
        if !super::print_json_lines(&page, &mut buffer)? {
            return Ok(());
        }
        remaining -= page.len();
        if let Some(last) = page.last() {
            cursor = last.cursor;
        }
        if page.len() == PAGE_SIZE || remaining == 0 {
            continue;
        }
        let Some(watcher) = watcher.as_mut() else {
            break;
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = watcher.wait(&source, args.poll_interval) => {}
        }
    }
    Ok(())
}
