//! `weir dead-letters`: the events consumers skipped. `list` prints dead letters
//! as JSON lines, oldest first, each with the `id` to page on with `--after`;
//! `retry` and `purge` go through a running node's admin API to the leader.

use std::sync::Arc;

use super::CliError;
use crate::config::{Config, StoreKind};
use crate::consumer::replay::{DeadLetterRequest, Selection};
use crate::consumer::{DeadLetterStore, MemoryDeadLetterStore};
use crate::event::{NameKind, validate_name};

/// Dead letters fetched per query.
const PAGE_SIZE: usize = 1000;

#[derive(Debug, clap::Subcommand)]
pub enum DeadLetters {
    /// Print dead letters as JSON lines, oldest first.
    List(ListArgs),
    /// Process dead letters again through the group's processor or sink, oldest
    /// first and in stream order; those that go through are removed.
    Retry(ChooseArgs),
    /// Forget dead letters without processing them.
    Purge(ChooseArgs),
}

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("chosen").required(true).multiple(false))]
pub struct ChooseArgs {
    #[arg(long)]
    group: String,
    /// These dead letters (ids as `list` prints them); repeat or separate with commas.
    #[arg(
        long = "id",
        value_name = "ID",
        value_delimiter = ',',
        group = "chosen"
    )]
    ids: Vec<u64>,
    /// Every dead letter of the group.
    #[arg(long, group = "chosen")]
    all: bool,
    /// Print what would happen to each and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the JSON the node answered instead of a summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    node: super::client::NodeArgs,
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
        DeadLetters::Retry(args) => choose(config, args, "retry").await,
        DeadLetters::Purge(args) => choose(config, args, "purge").await,
    }
}

/// Sends a retry or purge of the chosen dead letters to the leader.
async fn choose(config: &Config, args: ChooseArgs, what: &str) -> Result<(), CliError> {
    let request = DeadLetterRequest {
        group: args.group,
        selection: if args.all {
            Selection::All
        } else {
            Selection::Ids(args.ids)
        },
        dry_run: args.dry_run,
    };
    let client = super::client::AdminClient::new(config, &args.node)?;
    let report: serde_json::Value = client
        .post(&format!("/admin/dead-letters/{what}"), &request)
        .await?;
    super::operate::print_answer(&report, args.json, || summary(&report))
}

/// One line per dead letter, then the counts.
fn summary(report: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    // A purge's letters carry no outcome of their own.
    let purged = if report["dry_run"] == true {
        "would purge"
    } else {
        "purged"
    };
    for letter in report["letters"].as_array().into_iter().flatten() {
        let outcome = letter["outcome"].as_str().unwrap_or(purged);
        let _ = writeln!(
            out,
            "{:>8}  {:<12}  {}  {}",
            letter["id"],
            outcome,
            letter["event_id"].as_str().unwrap_or("-"),
            letter["error"].as_str().unwrap_or(""),
        );
    }
    let counts: Vec<String> = [
        "chosen",
        "would_retry",
        "retried",
        "failed",
        "held_back",
        "not_tried",
        "events_missing",
        "removed",
        "letters_omitted",
    ]
    .iter()
    .filter_map(|key| report[*key].as_u64().map(|n| format!("{key} {n}")))
    .collect();
    let dry = if report["dry_run"] == true {
        " (dry run: nothing changed)"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "group {}: {}{dry}",
        report["group"].as_str().unwrap_or("?"),
        counts.join(", ")
    );
    out
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

#[cfg(test)]
mod tests {
    use super::summary;

    #[test]
    fn a_purge_dry_run_says_what_it_would_purge() {
        let report = |dry_run: bool| {
            serde_json::json!({
                "group": "g", "dry_run": dry_run, "chosen": 1, "removed": 0,
                "letters": [{"id": 7, "event_id": "e", "error": "no"}],
            })
        };
        let dry = summary(&report(true));
        assert!(dry.contains("would purge"), "{dry}");
        assert!(dry.contains("(dry run: nothing changed)"), "{dry}");
        let real = summary(&report(false));
        assert!(real.contains("purged") && !real.contains("would"), "{real}");
    }
}
