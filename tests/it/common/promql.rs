//! The metric names weir promises, and the tools to hold dashboards and alerts to
//! them: which weir metrics a PromQL expression (or a `/metrics` body) mentions, and
//! how the metrics on the dashboards compare with what a node exports.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use regex::Regex;

/// Metrics a node exports only once they are first used, each with why; a fresh
/// node's `/metrics` lacks them, so coverage checks add them to what it exports.
/// None now: even the error counter starts at 0 for its known kinds.
pub const EXPORTED_ON_FIRST_USE: &[(&str, &str)] = &[];

/// Metrics a node exports that no dashboard shows, each with why. A later test
/// compares a running node's `/metrics` with the dashboards through
/// [`compare_with_export`], which does not count these as missing.
pub const DELIBERATELY_LEFT_OUT: &[(&str, &str)] = &[];

/// Every metric a weir node exports: the catalogue in `weir::metrics`.
/// The dashboards and alert rules may use these and Prometheus' own `up`, nothing
/// else.
pub fn known_metrics() -> BTreeSet<String> {
    weir::metrics::CATALOG
        .iter()
        .map(|metric| metric.name.to_owned())
        .collect()
}

/// The series suffixes of a histogram (or summary) that name the metric itself.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// A histogram's series name (`weir_x_seconds_bucket`) as the metric it belongs to
/// (`weir_x_seconds`). weir names counters `_total`, so no other weir metric ends
/// in these suffixes.
pub fn histogram_metric(series: &str) -> &str {
    HISTOGRAM_SUFFIXES
        .iter()
        .find_map(|suffix| series.strip_suffix(suffix))
        .unwrap_or(series)
}

/// Skips what cannot name a metric (quoted strings, such as label values and
/// regexes, and `#` comments) and captures every `weir_` name in between.
static WEIR_NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`|#[^\n]*|\b(weir_[A-Za-z0-9_:]*[A-Za-z0-9])\b"#,
    )
    .expect("the metric name pattern is valid")
});

/// The weir metrics `text` mentions, with histogram series mapped to their
/// histogram. `text` is a PromQL expression, a Grafana query such as
/// `label_values(weir_build_info, instance)`, or a `/metrics` body (whose `# HELP`
/// and `# TYPE` lines are comments). Names inside strings do not count: in
/// `up{job="weir_nodes"}` no weir metric is mentioned.
pub fn metric_names(text: &str) -> BTreeSet<String> {
    WEIR_NAME
        .captures_iter(text)
        .filter_map(|captures| captures.get(1))
        .map(|name| histogram_metric(name.as_str()).to_owned())
        .collect()
}

/// How the weir metrics on the dashboards and those a node exports differ.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Exported, but on no dashboard and not deliberately left out.
    pub not_on_dashboards: BTreeSet<String>,
    /// On a dashboard, but not exported: its panels stay empty.
    pub not_exported: BTreeSet<String>,
}

impl Coverage {
    pub fn is_complete(&self) -> bool {
        self.not_on_dashboards.is_empty() && self.not_exported.is_empty()
    }
}

/// Compares the metrics a node `exported` with those `on_dashboards`. A metric
/// named in `left_out` (name, reason) is never missing from the dashboards.
pub fn compare_with_export(
    exported: &BTreeSet<String>,
    on_dashboards: &BTreeSet<String>,
    left_out: &[(&str, &str)],
) -> Coverage {
    let left_out: BTreeSet<&str> = left_out.iter().map(|(name, _)| *name).collect();
    Coverage {
        not_on_dashboards: exported
            .iter()
            .filter(|name| !on_dashboards.contains(*name) && !left_out.contains(name.as_str()))
            .cloned()
            .collect(),
        not_exported: on_dashboards.difference(exported).cloned().collect(),
    }
}
