//! Logging: the `[log]` settings turned into a `tracing` subscriber writing to
//! stderr, as pretty lines for a person or JSON lines for a log pipeline.
//!
//! The filter comes from, strongest first: the `--log` flag (or `WEIR_LOG`),
//! `RUST_LOG`, then `log.level`. Unless the filter names `tokio_postgres` itself,
//! that crate is held at `warn`: at `info` it repeats every server notice, such as
//! the ones a migration prints for each table that already exists.
//!
//! Writing a log line never fails and never blocks the node for long: when stderr is
//! a closed pipe (`weir run 2>&1 | head`), lines are dropped. The formatter's own
//! report of a failed write would go to stderr through a printing macro that panics
//! on a closed pipe, in whichever task logged, so that report is switched off.

use std::io::IsTerminal;

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per record, coloured at a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, with every field at the top level.
    Json,
}

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid log filter {filter:?} from {origin}: {reason}; write e.g. `info` or `info,weir=debug`"
)]
pub struct LoggingError {
    pub filter: String,
    pub origin: &'static str,
    pub reason: String,
}

/// The filter to log with and where it came from: the flag, else `RUST_LOG`, else
/// the configured level; empty values count as unset.
pub fn choose_filter<'a>(
    flag: Option<&'a str>,
    rust_log: Option<&'a str>,
    level: &'a str,
) -> (&'a str, &'static str) {
    let set = |value: Option<&'a str>| value.filter(|v| !v.trim().is_empty());
    if let Some(flag) = set(flag) {
        (flag, "--log")
    } else if let Some(rust_log) = set(rust_log) {
        (rust_log, "RUST_LOG")
    } else {
        (level, "log.level")
    }
}

/// Parses `filter`, holding `tokio_postgres` at `warn` unless the filter names it.
pub fn parse_filter(filter: &str, origin: &'static str) -> Result<EnvFilter, LoggingError> {
    let directives = if filter.contains("tokio_postgres") {
        filter.to_owned()
    } else {
        format!("{filter},tokio_postgres=warn")
    };
    EnvFilter::try_new(&directives).map_err(|error| LoggingError {
        filter: filter.to_owned(),
        origin,
        reason: error.to_string(),
    })
}

/// Starts logging to stderr for the whole process. `flag` is the `--log` value.
pub fn init(format: LogFormat, level: &str, flag: Option<&str>) -> Result<(), LoggingError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, origin) = choose_filter(flag, rust_log.as_deref(), level);
    let filter = parse_filter(filter, origin)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // On by default, it reports a failed write with `eprintln!`, which panics
        // when stderr is a closed pipe: that killed the signal task and the
        // consumers of a node whose stderr reader had gone.
        .log_internal_errors(false);
    // Ignored when a subscriber is already set (a test that embeds weir).
    let _ = match format {
        LogFormat::Pretty => builder
            // Colour codes only for a person at a terminal, never in log files.
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_beats_rust_log_which_beats_the_configured_level() {
        assert_eq!(
            choose_filter(Some("debug"), Some("trace"), "info"),
            ("debug", "--log")
        );
        assert_eq!(
            choose_filter(None, Some("trace"), "info"),
            ("trace", "RUST_LOG")
        );
        assert_eq!(choose_filter(None, None, "warn"), ("warn", "log.level"));
        assert_eq!(
            choose_filter(Some(" "), Some(""), "warn"),
            ("warn", "log.level")
        );
    }

    #[test]
    fn tokio_postgres_is_quiet_unless_named() {
        let quiet = parse_filter("info", "log.level").unwrap().to_string();
        assert!(quiet.contains("tokio_postgres=warn"), "{quiet}");
        let named = parse_filter("info,tokio_postgres=debug", "log.level")
            .unwrap()
            .to_string();
        assert!(!named.contains("tokio_postgres=warn"), "{named}");
        let error = parse_filter("[", "RUST_LOG").unwrap_err();
        assert_eq!(error.origin, "RUST_LOG");
        assert!(error.to_string().contains("RUST_LOG"), "{error}");
    }
}
