//! `weir checkpoints` and `weir groups`: an operator's commands, sent to a running
//! node's admin API (writes go on to the leader). See docs/operating.md.

use chrono::{DateTime, Utc};

use super::CliError;
use super::client::{AdminClient, NodeArgs};
use crate::admin::fleet::{CheckpointLine, render_checkpoints};
use crate::admin::requests::InProgress;
use crate::admin::{GroupReport, GroupRequest, ResetReport, ResetRequest, ResetTarget};
use crate::config::Config;
use crate::event::{Cursor, Source};

#[derive(Debug, clap::Subcommand)]
pub enum Checkpoints {
    /// Every (group, source) with its owner, cursor, lag and state.
    List(ListArgs),
    /// Move a group's checkpoints while the fleet runs (try --dry-run first).
    Reset(ResetArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only this group's checkpoints.
    #[arg(long)]
    group: Option<String>,
    /// Print the JSON the node answered instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("target").required(true).multiple(false))]
pub struct ResetArgs {
    #[arg(long)]
    group: String,
    /// Only this source, or a category (or the log) with all its partitions;
    /// default: every source of the group.
    #[arg(long)]
    source: Option<Source>,
    /// Process everything again.
    #[arg(long, group = "target")]
    to_start: bool,
    /// Skip the backlog: start after the last event.
    #[arg(long, group = "target")]
    to_end: bool,
    /// Process again from the first event stored at or after this time (RFC 3339,
    /// e.g. 2026-12-01T00:00:00Z).
    #[arg(long, group = "target", value_name = "TIME")]
    to_time: Option<DateTime<Utc>>,
    /// Move to this cursor (TX:SEQUENCE, as `weir checkpoints list` shows).
    #[arg(long, group = "target", value_name = "CURSOR")]
    to_cursor: Option<Cursor>,
    /// Print what would change, per source, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// The reset's id (default: a new one, printed). Sending a reset again with
    /// the id of one sent before answers that one's outcome instead of running
    /// it twice: what to do after an interrupted command.
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
    /// How long to wait for a reset in progress before giving up (exit 75); it
    /// runs on, and `--request-id` fetches its outcome later.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    wait: std::time::Duration,
    /// Print the JSON the node answered instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum Groups {
    /// Stop a group reading: its owners keep their sources and checkpoints.
    Pause(GroupArgs),
    /// Let a paused group read again, from where it stopped.
    Resume(GroupArgs),
}

#[derive(Debug, clap::Args)]
pub struct GroupArgs {
    #[arg(long)]
    group: String,
    /// Take a group the fleet does not know yet (to pause it before it is
    /// deployed); without it an unknown group is refused, so a misspelt name
    /// pauses nothing.
    #[arg(long)]
    create: bool,
    #[command(flatten)]
    node: NodeArgs,
}

pub async fn checkpoints(config: &Config, command: Checkpoints) -> Result<(), CliError> {
    match command {
        Checkpoints::List(args) => {
            let client = AdminClient::new(config, &args.node)?;
            let path = match &args.group {
                Some(group) => format!("/admin/checkpoints?group={}", encode(group)),
                None => "/admin/checkpoints".to_owned(),
            };
            let lines: Vec<CheckpointLine> = client.get(&path).await?;
            print_answer(&lines, args.json, || render_checkpoints(&lines))
        }
        Checkpoints::Reset(args) => reset(config, args).await,
    }
}

async fn reset(config: &Config, args: ResetArgs) -> Result<(), CliError> {
    let target = match (args.to_start, args.to_end, args.to_time, args.to_cursor) {
        (true, ..) => ResetTarget::Start,
        (_, true, ..) => ResetTarget::End,
        (_, _, Some(time), _) => ResetTarget::Time { time },
        (_, _, _, Some(cursor)) => ResetTarget::Cursor { cursor },
        _ => {
            return Err(CliError::Usage(
                "give one of --to-start, --to-end, --to-time or --to-cursor".into(),
            ));
        }
    };
    let request_id = args
        .request_id
        .unwrap_or_else(|| crate::ambient::token().to_string());
    let request = ResetRequest {
        group: args.group,
        source: args.source,
        target,
        dry_run: args.dry_run,
        request_id: Some(request_id.clone()),
    };
    if !request.dry_run {
        eprintln!(
            "reset request {request_id}: if this command is interrupted, run it again with --request-id {request_id} for the outcome (the reset never runs twice)"
        );
    }
    let client = AdminClient::new(config, &args.node)?;
    let deadline = tokio::time::Instant::now() + args.wait;
    let report: ResetReport = loop {
        let (url, status, answer) = client.send("/admin/checkpoints/reset", &request).await?;
        if status != hyper::StatusCode::ACCEPTED {
            break super::client::decode(&url, status, &answer)?;
        }
        let message = serde_json::from_slice::<InProgress>(&answer).map_or_else(
            |_| String::from_utf8_lossy(&answer).into_owned(),
            |p| p.message,
        );
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::Retry(format!(
                "{url}: {message}; gave up waiting after --wait {}",
                humantime::format_duration(args.wait)
            )));
        }
        eprintln!("{url}: {message}");
        tokio::time::sleep(IN_PROGRESS_PAUSE).await;
    };
    print_answer(&report, args.json, || render_reset(&report))
}

/// The pause between asking again after a reset in progress.
const IN_PROGRESS_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

pub async fn groups(config: &Config, command: Groups) -> Result<(), CliError> {
    let (args, path) = match command {
        Groups::Pause(args) => (args, "/admin/groups/pause"),
        Groups::Resume(args) => (args, "/admin/groups/resume"),
    };
    let client = AdminClient::new(config, &args.node)?;
    let report: GroupReport = client
        .post(
            path,
            &GroupRequest {
                group: args.group,
                create: args.create,
            },
        )
        .await?;
    let state = if report.paused { "paused" } else { "resumed" };
    let changed = if report.changed {
        ""
    } else {
        " (it already was)"
    };
    println!("group {} {state}{changed}", report.group);
    Ok(())
}

/// `value` as JSON, or as the table `render` makes.
pub(super) fn print_answer<T: serde::Serialize>(
    value: &T,
    json: bool,
    render: impl FnOnce() -> String,
) -> Result<(), CliError> {
    if json {
        let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
        println!("{text}");
    } else {
        print!("{}", render());
    }
    Ok(())
}

fn render_reset(report: &ResetReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let what = if report.dry_run {
        "would move (dry run: nothing changed)"
    } else {
        "moved"
    };
    let _ = writeln!(out, "group {}: {what}", report.group);
    let _ = writeln!(
        out,
        "{:<28} {:<20} {:<20} {:>10} {:>10}",
        "source", "old cursor", "new cursor", "replayed", "skipped"
    );
    for line in &report.lines {
        let plus = if line.at_least { "+" } else { "" };
        let _ = writeln!(
            out,
            "{:<28} {:<20} {:<20} {:>10} {:>10}",
            line.source.to_string(),
            line.old.to_string(),
            line.new.to_string(),
            format!("{}{plus}", line.replayed),
            format!("{}{plus}", line.skipped),
        );
    }
    out
}

/// `text` safe in a query string.
pub(super) fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
