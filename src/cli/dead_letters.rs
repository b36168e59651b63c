//! `weir dead-letters`: inspect the events consumers skipped. `list` prints dead
//! letters as JSON lines, oldest first, each with the `id` to page on with `--after`.

use std::sync::Arc;

use super::CliError;
use crate::config::{Config, StoreKind};
use crate::consumer::{DeadLetterStore, MemoryDeadLetterStore};
use crate::event::{NameKind, validate_name};

/// Dead letters fetched per query.
const PAGE_SIZE: usize = 1000;

#[derive(Debug, clap::Subcommand)]
pub enum DeadLetters {
    /// Print dead letters as JSON lines, oldest first.
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only this group's dead letters; default: every group's.
    #[arg(long)]
    group: Option<String>,
    /// Only dead letters with an id above this (as printed in the `id` field); 0
    /// lists from the oldest.
    #[arg(long, value_name = "ID", default_value_t = 0)]
    after: u64,
    /// Print at most this many dead letters (a whole number, at least 1).
    // Checked by weir rather than clap, so that any bad value, negative ones too, is a
    // usage error (64) with a message that says what to give.
    #[arg(
        long,
        value_name = "N",
        default_value = "100",
        allow_negative_numbers = true
    )]
    limit: String,
}

pub async fn run(config: &Config, command: DeadLetters) -> Result<(), CliError> {
    match command {
        DeadLetters::List(args) => list(config, args).await,
    }
}

fn parse_limit(text: &str) -> Result<usize, CliError> {
    match text.parse::<usize>() {
        Ok(limit) if limit > 0 => Ok(limit),
        _ => Err(CliError::Usage(format!(
            "--limit {text:?}: give how many dead letters to print, a whole number of at least 1"
        ))),
    }
}

async fn list(config: &Config, args: ListArgs) -> Result<(), CliError> {
    let limit = parse_limit(&args.limit)?;
    if let Some(group) = &args.group {
        validate_name(NameKind::Group, group)
            .map_err(|e| CliError::Input(format!("--group: {e}")))?;
    }
    let store = open(config).await?;
    let mut after = args.after;
    let mut remaining = limit;
    let mut buffer = Vec::new();
    while remaining > 0 {
        let wanted = PAGE_SIZE.min(remaining);
        let page = store.list(args.group.as_deref(), after, wanted).await?;
        if !super::print_json_lines(&page, &mut buffer)? {
            return Ok(());
        }
        remaining -= page.len();
        match page.last() {
            Some(last) if page.len() == wanted => after = last.id,
            _ => break,
        }
    }
    Ok(())
}

/// The configured store's dead letters, its schema checked. The memory store starts
/// empty in every process, so there it lists nothing.
async fn open(config: &Config) -> Result<Arc<dyn DeadLetterStore>, CliError> {
    match config.store.kind {
        StoreKind::Memory => Ok(Arc::new(MemoryDeadLetterStore::new())),
        #[cfg(feature = "postgres")]
        StoreKind::Postgres => {
            let store = super::open_postgres(config)?;
            store.check_schema().await?;
            Ok(Arc::new(crate::postgres::PostgresDeadLetterStore::new(
                Arc::new(store),
            )))
        }
        #[cfg(not(feature = "postgres"))]
        StoreKind::Postgres => Err(CliError::Usage(
            "this weir was built without the `postgres` feature".into(),
        )),
    }
}
