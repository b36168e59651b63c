//! The audit record of an admin write: an `AdminWrite` lifecycle event naming
//! what was asked, of which group, by which token, aimed at what (a reset's
//! target and sources, the dead letters chosen), as a dry run or not, and, once
//! it ended, its outcome and counts.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::lifecycle::LifecycleEvent;

/// One admin write as it is logged and recorded.
#[derive(Debug, Clone)]
pub(crate) struct Audit {
    pub what: String,
    pub group: String,
    pub token: String,
    pub dry_run: bool,
    pub request_id: Option<String>,
    pub target: Option<String>,
    pub sources: Vec<String>,
}

impl Audit {
    pub fn new(what: &str, group: &str, token: &str, dry_run: bool) -> Self {
        Self {
            what: format!("{what} of group {group}"),
            group: group.to_owned(),
            token: token.to_owned(),
            dry_run,
            request_id: None,
            target: None,
            sources: Vec::new(),
        }
    }

    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// The record with `outcome` (`started`, `done`, or what went wrong) and,
    /// from `answer` (the write's JSON answer, if it has one), the sources it
    /// moved and what it counted.
    pub fn event(&self, outcome: &str, answer: Option<&Value>) -> LifecycleEvent {
        let answered = answer.map(sources_of).unwrap_or_default();
        LifecycleEvent::AdminWrite {
            what: self.what.clone(),
            group: Some(self.group.clone()),
            token: Some(self.token.clone()),
            dry_run: self.dry_run,
            outcome: outcome.to_owned(),
            request_id: self.request_id.clone(),
            target: self.target.clone(),
            sources: if answered.is_empty() {
                self.sources.clone()
            } else {
                answered
            },
            counts: answer.map(counts_of).unwrap_or_default(),
        }
    }
}

/// The sources of a reset's answer, one per line.
fn sources_of(answer: &Value) -> Vec<String> {
    lines(answer)
        .filter_map(|line| line["source"].as_str().map(str::to_owned))
        .collect()
}

/// An answer's counts: its top-level whole numbers (a dead-letter report's
/// `chosen`, `retried`, `removed` ...), and for a reset the checkpoints and the
/// events replayed and skipped in all.
fn counts_of(answer: &Value) -> BTreeMap<String, u64> {
    let mut counts: BTreeMap<String, u64> = answer
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(key, value)| value.as_u64().map(|n| (key.clone(), n)))
        .collect();
    if answer.get("lines").is_some() {
        let sum = |field: &str| lines(answer).filter_map(|l| l[field].as_u64()).sum();
        counts.insert("checkpoints".to_owned(), lines(answer).count() as u64);
        counts.insert("replayed".to_owned(), sum("replayed"));
        counts.insert("skipped".to_owned(), sum("skipped"));
    }
    counts
}

fn lines(answer: &Value) -> impl Iterator<Item = &Value> {
    answer
        .get("lines")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// Which dead letters a request chooses, as the record says it.
pub(crate) fn selection(selection: &crate::consumer::Selection) -> String {
    /// Ids named in full; beyond, only how many.
    const NAMED: usize = 20;
    match selection {
        crate::consumer::Selection::All => "all".to_owned(),
        crate::consumer::Selection::Ids(ids) => {
            let named: Vec<String> = ids.iter().take(NAMED).map(u64::to_string).collect();
            let more = if ids.len() > NAMED {
                format!(" ... ({} in all)", ids.len())
            } else {
                String::new()
            };
            format!("ids {}{more}", named.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_is_recorded_with_its_target_sources_and_counts() {
        let audit = Audit::new("reset checkpoints", "g", "ops", false).target("start");
        let answer = serde_json::json!({
            "group": "g", "dry_run": false,
            "lines": [
                {"source": "category:a@0/2", "replayed": 3, "skipped": 0},
                {"source": "category:a@1/2", "replayed": 4, "skipped": 0},
            ],
        });
        let LifecycleEvent::AdminWrite {
            target,
            sources,
            counts,
            dry_run,
            ..
        } = audit.event("done", Some(&answer))
        else {
            panic!("not an admin write");
        };
        assert_eq!(target.as_deref(), Some("start"));
        assert!(!dry_run);
        assert_eq!(sources, ["category:a@0/2", "category:a@1/2"]);
        assert_eq!(
            counts,
            BTreeMap::from([
                ("checkpoints".to_owned(), 2),
                ("replayed".to_owned(), 7),
                ("skipped".to_owned(), 0)
            ])
        );
        let ids = crate::consumer::Selection::Ids((1..=25).collect());
        assert_eq!(
            selection(&ids),
            "ids 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20 ... (25 in all)"
        );
    }
}
