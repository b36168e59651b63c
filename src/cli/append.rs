//! `weir append`: one event from flags, or a batch of JSON lines from stdin, appended
//! to one stream in one transaction; prints the stored events as JSON lines.

use std::io::{BufRead, Write};

use serde::Deserialize;
use serde_json::Value;

use super::CliError;
use crate::config::Config;
use crate::event::{Category, EventName, IdempotencyKey, NewEvent, StreamName, WriteCondition};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    category: String,
    #[arg(long)]
    stream: String,
    /// The event name; with stdin, the default for lines that name none.
    #[arg(long)]
    name: Option<String>,
    /// The payload (JSON) of a single event; without it, events are read from stdin,
    /// one JSON object per line: {"name": .., "payload": .., "metadata": ..,
    /// "idempotency_key": ..}.
    #[arg(long, value_name = "JSON")]
    payload: Option<String>,
    /// Metadata (JSON object) of the single event given with --payload.
    #[arg(long, value_name = "JSON", requires = "payload")]
    metadata: Option<String>,
    /// Append only if the stream's last event is at this position.
    #[arg(long, value_name = "N", conflicts_with = "expect_empty")]
    expect_position: Option<u64>,
    /// Append only if the stream has no event yet.
    #[arg(long)]
    expect_empty: bool,
    /// Idempotency key of the single event given with --payload.
    #[arg(long, value_name = "KEY", requires = "payload")]
    idempotency_key: Option<String>,
}

/// One line of stdin.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    name: Option<EventName>,
    payload: Value,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    idempotency_key: Option<IdempotencyKey>,
}

pub async fn run(config: &Config, args: Args) -> Result<(), CliError> {
    let category = Category::new(args.category.as_str()).map_err(input)?;
    let stream = StreamName::new(args.stream.as_str()).map_err(input)?;
    let default_name = args
        .name
        .as_deref()
        .map(EventName::new)
        .transpose()
        .map_err(input)?;
    let condition = match (args.expect_position, args.expect_empty) {
        (Some(position), _) => WriteCondition::PositionIs(position),
        (None, true) => WriteCondition::StreamIsEmpty,
        (None, false) => WriteCondition::Any,
    };
    let events = match &args.payload {
        Some(payload) => {
            let name = default_name
                .ok_or_else(|| CliError::Usage("--name is required with --payload".into()))?;
            let mut event = NewEvent::new(name, parse_json("--payload", payload)?);
            if let Some(metadata) = &args.metadata {
                event = event.with_metadata(parse_json("--metadata", metadata)?);
            }
            if let Some(key) = &args.idempotency_key {
                event =
                    event.with_idempotency_key(IdempotencyKey::new(key.as_str()).map_err(input)?);
            }
            vec![event]
        }
        None => read_lines(
            std::io::stdin().lock(),
            default_name.as_ref(),
            line_limit(config.store.max_event_bytes),
        )?,
    };

    let store = super::open_store(config).await?;
    let stored = store.append(&category, &stream, condition, events).await?;
    let mut out = std::io::stdout().lock();
    for event in &stored {
        serde_json::to_writer(&mut out, event).map_err(std::io::Error::other)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn input(error: impl std::fmt::Display) -> CliError {
    CliError::Input(error.to_string())
}

fn parse_json(flag: &str, text: &str) -> Result<Value, CliError> {
    serde_json::from_str(text).map_err(|e| CliError::Input(format!("{flag} is not JSON: {e}")))
}

/// Room on a stdin line for what does not count against `store.max_event_bytes`:
/// the JSON keys, the name and the idempotency key.
const LINE_OVERHEAD: usize = 64 * 1024;

/// The longest stdin line read, for events of at most `max_event_bytes`.
fn line_limit(max_event_bytes: usize) -> usize {
    max_event_bytes.saturating_add(LINE_OVERHEAD)
}

/// Reads every line before appending anything, so one bad line appends nothing. A
/// line longer than `limit` bytes is refused as soon as that many are read, so a
/// huge line is never held in memory whole.
fn read_lines(
    mut input: impl BufRead,
    default_name: Option<&EventName>,
    limit: usize,
) -> Result<Vec<NewEvent>, CliError> {
    let mut events = Vec::new();
    let mut buffer = Vec::new();
    for number in 1.. {
        buffer.clear();
        let read =
            std::io::Read::take(&mut input, limit as u64 + 1).read_until(b'\n', &mut buffer)?;
        if read == 0 {
            break;
        }
        if buffer.last() != Some(&b'\n') && buffer.len() > limit {
            return Err(CliError::Input(format!(
                "stdin line {number} is longer than {limit} bytes, more than an event of store.max_event_bytes can take; nothing was appended"
            )));
        }
        let line = std::str::from_utf8(&buffer)
            .map_err(|e| CliError::Input(format!("stdin line {number}: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(line)
            .map_err(|e| CliError::Input(format!("stdin line {number}: {e}")))?;
        let name = line.name.or_else(|| default_name.cloned()).ok_or_else(|| {
            CliError::Input(format!(
                "stdin line {number}: no \"name\", and no --name to default to"
            ))
        })?;
        let mut event = NewEvent::new(name, line.payload);
        if let Some(metadata) = line.metadata {
            event = event.with_metadata(metadata);
        }
        event.idempotency_key = line.idempotency_key;
        events.push(event);
    }
    if events.is_empty() {
        return Err(CliError::Input(
            "no events on stdin: give --payload, or JSON lines on stdin".into(),
        ));
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_take_the_default_name_and_report_the_bad_line() {
        let name = EventName::new("Default").unwrap();
        let events = read_lines(
            "{\"payload\":1}\n\n{\"name\":\"X\",\"payload\":{},\"idempotency_key\":\"k\"}\n"
                .as_bytes(),
            Some(&name),
            1000,
        )
        .unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].name.as_str(), "Default");
        assert_eq!(events[1].name.as_str(), "X");
        assert_eq!(events[1].idempotency_key.as_ref().unwrap().as_str(), "k");

        let err =
            read_lines("{\"payload\":1}\nnot json\n".as_bytes(), Some(&name), 1000).unwrap_err();
        assert!(err.to_string().starts_with("stdin line 2:"), "{err}");
        let err = read_lines("{\"payload\":1}\n".as_bytes(), None, 1000).unwrap_err();
        assert!(err.to_string().contains("no --name"), "{err}");
        let err = read_lines("{\"name\":\"\",\"payload\":1}\n".as_bytes(), None, 1000).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        assert!(read_lines("".as_bytes(), Some(&name), 1000).is_err());
    }

    #[test]
    fn a_line_longer_than_the_limit_is_refused_without_reading_it_whole() {
        let name = EventName::new("Default").unwrap();
        let long = format!(
            "{{\"payload\":\"{}\"}}\n{{\"payload\":1}}\n",
            "x".repeat(5000)
        );
        let mut input = std::io::Cursor::new(long.into_bytes());
        let err = read_lines(&mut input, Some(&name), 1000).unwrap_err();
        assert!(
            err.to_string()
                .contains("stdin line 1 is longer than 1000 bytes"),
            "{err}"
        );
        // It stopped reading just past the limit.
        assert_eq!(input.position(), 1001);
        // A line of exactly the limit is fine.
        let line = format!("{{\"payload\":\"{}\"}}", "x".repeat(986));
        assert_eq!(line.len(), 1000);
        let events = read_lines(format!("{line}\n").as_bytes(), Some(&name), 1000).unwrap();
        assert_eq!(events.len(), 1);
    }
}
