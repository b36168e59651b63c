//! Error policies: what a consumer does when its processor fails on an event.
//!
//! | policy | what happens to the event | to the consumer |
//! |---|---|---|
//! | `Continue` | skipped, kept as a dead letter with the error | goes on |
//! | `Retry` | tried again after an exponential backoff with jitter, up to `max_attempts` tries in all; then `then` decides | waits |
//! | `Stop` | left unprocessed | this source's consumer stops and reports itself unhealthy |
//! | `Exit` | left unprocessed | the runtime stops gracefully and the process exits with `code` |
//! | `Raise` | left unprocessed | the runtime stops gracefully and returns the error |
//! | `ByKind` | whatever the policy for the error's kind says (`default` otherwise) | |
//!
//! In config (serde), a policy is a table tagged by `policy`; a retry's fields
//! default to `initial = "100ms"`, `max = "30s"`, `multiplier = 2.0`,
//! `max_attempts = 5`, `then = { policy = "continue" }`:
//!
//! ```toml
//! error_policy = { policy = "retry", initial = "100ms", max = "10s", max_attempts = 8,
//!                  then = { policy = "stop" } }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::processor::ProcessError;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case", try_from = "RawPolicy")]
pub enum ErrorPolicy {
    /// Skip the event, keeping it as a dead letter.
    #[default]
    Continue,
    /// Try the event again, waiting `initial`, then `multiplier` times longer each
    /// time up to `max`, for `max_attempts` tries in all (counting the first);
    /// then apply `then`.
    Retry {
        #[serde(with = "humantime_serde")]
        initial: Duration,
        #[serde(with = "humantime_serde")]
        max: Duration,
        multiplier: f64,
        max_attempts: u32,
        then: Box<ErrorPolicy>,
    },
    /// Stop consuming this source.
    Stop,
    /// Stop the runtime; the process exits with `code`.
    Exit { code: i32 },
    /// Stop the runtime and hand it the error.
    Raise,
    /// Choose by the error's kind.
    ByKind {
        kinds: BTreeMap<String, ErrorPolicy>,
        default: Box<ErrorPolicy>,
    },
}

/// A policy table as written, before it is checked against its `policy`: serde
/// cannot reject unknown keys of an internally tagged enum's unit variants.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    policy: PolicyName,
    #[serde(default, with = "humantime_serde")]
    initial: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max: Option<Duration>,
    multiplier: Option<f64>,
    max_attempts: Option<u32>,
    then: Option<Box<RawPolicy>>,
    code: Option<i32>,
    kinds: Option<BTreeMap<String, RawPolicy>>,
    default: Option<Box<RawPolicy>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PolicyName {
    Continue,
    Retry,
    Stop,
    Exit,
    Raise,
    ByKind,
}

impl PolicyName {
    fn as_str(self) -> &'static str {
        match self {
            PolicyName::Continue => "continue",
            PolicyName::Retry => "retry",
            PolicyName::Stop => "stop",
            PolicyName::Exit => "exit",
            PolicyName::Raise => "raise",
            PolicyName::ByKind => "by_kind",
        }
    }
}

impl TryFrom<RawPolicy> for ErrorPolicy {
    type Error = String;

    fn try_from(raw: RawPolicy) -> Result<Self, String> {
        let name = raw.policy;
        let given = [
            ("initial", raw.initial.is_some()),
            ("max", raw.max.is_some()),
            ("multiplier", raw.multiplier.is_some()),
            ("max_attempts", raw.max_attempts.is_some()),
            ("then", raw.then.is_some()),
            ("code", raw.code.is_some()),
            ("kinds", raw.kinds.is_some()),
            ("default", raw.default.is_some()),
        ];
        let allowed: &[&str] = match name {
            PolicyName::Retry => &["initial", "max", "multiplier", "max_attempts", "then"],
            PolicyName::Exit => &["code"],
            PolicyName::ByKind => &["kinds", "default"],
            PolicyName::Continue | PolicyName::Stop | PolicyName::Raise => &[],
        };
        let stray: Vec<&str> = given
            .iter()
            .filter(|(key, present)| *present && !allowed.contains(key))
            .map(|(key, _)| *key)
            .collect();
        if !stray.is_empty() {
            let allowed = if allowed.is_empty() {
                "none".to_owned()
            } else {
                allowed.join(", ")
            };
            return Err(format!(
                "`{}` does not apply to policy {} (its keys: {allowed})",
                stray.join("`, `"),
                name.as_str()
            ));
        }
        let nested = |raw: Option<Box<RawPolicy>>,
                      fallback: ErrorPolicy|
         -> Result<Box<ErrorPolicy>, String> {
            raw.map_or(Ok(fallback), |raw| ErrorPolicy::try_from(*raw))
                .map(Box::new)
        };
        Ok(match name {
            PolicyName::Continue => ErrorPolicy::Continue,
            PolicyName::Stop => ErrorPolicy::Stop,
            PolicyName::Raise => ErrorPolicy::Raise,
            PolicyName::Exit => ErrorPolicy::Exit {
                code: raw.code.ok_or("policy exit needs a `code`")?,
            },
            PolicyName::Retry => ErrorPolicy::Retry {
                initial: raw.initial.unwrap_or(Duration::from_millis(100)),
                max: raw.max.unwrap_or(Duration::from_secs(30)),
                multiplier: raw.multiplier.unwrap_or(2.0),
                max_attempts: raw.max_attempts.unwrap_or(5),
                then: nested(raw.then, ErrorPolicy::Continue)?,
            },
            PolicyName::ByKind => ErrorPolicy::ByKind {
                kinds: raw
                    .kinds
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(kind, raw)| Ok((kind, ErrorPolicy::try_from(raw)?)))
                    .collect::<Result<_, String>>()?,
                default: nested(raw.default, ErrorPolicy::Continue)?,
            },
        })
    }
}

/// What a consumer does about one failure.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Try the event again after this long.
    RetryAfter(Duration),
    /// Record a dead letter and go on with the next event.
    Skip,
    Stop,
    Exit(i32),
    Raise,
}

impl ErrorPolicy {
    /// A retry policy with the usual shape: doubling from `initial` up to `max`.
    pub fn retry(
        initial: Duration,
        max: Duration,
        max_attempts: u32,
        then: ErrorPolicy,
    ) -> ErrorPolicy {
        ErrorPolicy::Retry {
            initial,
            max,
            multiplier: 2.0,
            max_attempts,
            then: Box::new(then),
        }
    }

    /// What to do about `error` after the event has been tried `attempts` times
    /// (at least 1).
    pub fn decide(&self, error: &ProcessError, attempts: u32) -> Action {
        match self {
            ErrorPolicy::Continue => Action::Skip,
            ErrorPolicy::Stop => Action::Stop,
            ErrorPolicy::Exit { code } => Action::Exit(*code),
            ErrorPolicy::Raise => Action::Raise,
            ErrorPolicy::ByKind { kinds, default } => kinds
                .get(error.kind())
                .unwrap_or(default)
                .decide(error, attempts),
            ErrorPolicy::Retry {
                initial,
                max,
                multiplier,
                max_attempts,
                then,
            } => {
                if attempts >= *max_attempts {
                    return then.decide(error, attempts);
                }
                Action::RetryAfter(backoff(*initial, *max, *multiplier, attempts))
            }
        }
    }

    /// Every problem with this policy, as (path below the policy, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        self.collect_problems("", &mut problems);
        problems
    }

    fn collect_problems(&self, path: &str, problems: &mut Vec<(String, String)>) {
        let at = |field: &str| {
            if path.is_empty() {
                field.to_owned()
            } else {
                format!("{path}.{field}")
            }
        };
        match self {
            ErrorPolicy::Retry {
                initial,
                max,
                multiplier,
                max_attempts,
                then,
            } => {
                if initial.is_zero() {
                    problems.push((at("initial"), "must be longer than 0s".into()));
                }
                if max < initial {
                    problems.push((at("max"), "must be at least `initial`".into()));
                }
                if !(multiplier.is_finite() && *multiplier >= 1.0) {
                    problems.push((at("multiplier"), "must be a number of at least 1".into()));
                }
                if *max_attempts < 1 {
                    problems.push((
                        at("max_attempts"),
                        "must be at least 1 (it counts the first try)".into(),
                    ));
                }
                then.collect_problems(&at("then"), problems);
            }
            ErrorPolicy::Exit { code } => {
                if !(0..=255).contains(code) {
                    problems.push((at("code"), "must be an exit code from 0 to 255".into()));
                }
            }
            ErrorPolicy::ByKind { kinds, default } => {
                for (kind, policy) in kinds {
                    policy.collect_problems(&at(&format!("kinds.{kind}")), problems);
                }
                default.collect_problems(&at("default"), problems);
            }
            ErrorPolicy::Continue | ErrorPolicy::Stop | ErrorPolicy::Raise => {}
        }
    }
}

/// The wait before try `attempts + 1`: `initial × multiplier^(attempts − 1)`, at most
/// `max`, of which a random half is taken off ("equal jitter"), so that consumers
/// failing together do not retry together yet each still waits at least half.
fn backoff(initial: Duration, max: Duration, multiplier: f64, attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(1_000) as i32;
    let growth = multiplier.max(1.0).powi(exponent);
    let full = (initial.as_secs_f64() * growth).min(max.as_secs_f64());
    let half = if full.is_finite() { full / 2.0 } else { 0.0 };
    Duration::try_from_secs_f64(half + half * crate::ambient::fraction()).unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(kind: &str) -> ProcessError {
        ProcessError::new(kind, "boom")
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn simple_policies_decide_at_once() {
        assert_eq!(ErrorPolicy::default(), ErrorPolicy::Continue);
        assert_eq!(ErrorPolicy::Continue.decide(&error("x"), 1), Action::Skip);
        assert_eq!(ErrorPolicy::Stop.decide(&error("x"), 1), Action::Stop);
        assert_eq!(
            ErrorPolicy::Exit { code: 3 }.decide(&error("x"), 1),
            Action::Exit(3)
        );
        assert_eq!(ErrorPolicy::Raise.decide(&error("x"), 7), Action::Raise);
    }

    #[test]
    fn retry_backs_off_exponentially_with_jitter_then_hands_over() {
        let policy = ErrorPolicy::Retry {
            initial: 100 * MS,
            max: 1000 * MS,
            multiplier: 3.0,
            max_attempts: 4,
            then: Box::new(ErrorPolicy::Stop),
        };
        // Full waits 100, 300, 900 ms; each is jittered into [half, full].
        for (attempts, full) in [(1, 100), (2, 300), (3, 900)] {
            for _ in 0..50 {
                let Action::RetryAfter(wait) = policy.decide(&error("x"), attempts) else {
                    panic!("attempt {attempts} should be retried");
                };
                assert!(
                    wait >= full * MS / 2 && wait <= full * MS,
                    "{attempts}: {wait:?}"
                );
            }
        }
        assert_eq!(policy.decide(&error("x"), 4), Action::Stop);
        assert_eq!(policy.decide(&error("x"), 9), Action::Stop);
        // The cap holds however many tries.
        let capped = ErrorPolicy::retry(100 * MS, 250 * MS, 100, ErrorPolicy::Continue);
        for attempts in [5, 50, 99] {
            let Action::RetryAfter(wait) = capped.decide(&error("x"), attempts) else {
                panic!("should retry");
            };
            assert!(wait <= 250 * MS && wait >= 125 * MS, "{wait:?}");
        }
    }

    #[test]
    fn by_kind_maps_kinds_and_falls_back_to_the_default() {
        let policy = ErrorPolicy::ByKind {
            kinds: [
                ("poison".to_owned(), ErrorPolicy::Continue),
                ("fatal".to_owned(), ErrorPolicy::Exit { code: 70 }),
            ]
            .into(),
            default: Box::new(ErrorPolicy::retry(MS, MS, 2, ErrorPolicy::Raise)),
        };
        assert_eq!(policy.decide(&error("poison"), 1), Action::Skip);
        assert_eq!(policy.decide(&error("fatal"), 1), Action::Exit(70));
        assert!(matches!(
            policy.decide(&error("timeout"), 1),
            Action::RetryAfter(_)
        ));
        assert_eq!(policy.decide(&error("timeout"), 2), Action::Raise);
    }

    #[test]
    fn policies_read_from_config_tables() {
        let text = r#"
            policy = "by_kind"
            default = { policy = "retry", initial = "100ms", max = "10s", multiplier = 2.0, max_attempts = 5, then = { policy = "continue" } }
            [kinds]
            poison = { policy = "continue" }
            fatal = { policy = "exit", code = 70 }
        "#;
        let policy: ErrorPolicy = toml::from_str(text).unwrap();
        let ErrorPolicy::ByKind { kinds, default } = &policy else {
            panic!("{policy:?}");
        };
        assert_eq!(kinds["fatal"], ErrorPolicy::Exit { code: 70 });
        assert_eq!(
            **default,
            ErrorPolicy::Retry {
                initial: 100 * MS,
                max: Duration::from_secs(10),
                multiplier: 2.0,
                max_attempts: 5,
                then: Box::new(ErrorPolicy::Continue),
            }
        );
        assert!(policy.validate().is_empty());
        let unknown: Result<ErrorPolicy, _> = toml::from_str("policy = \"ignore\"");
        assert!(unknown.is_err());
        let stray = toml::from_str::<ErrorPolicy>("policy = \"stop\"\ncode = 1").unwrap_err();
        assert!(
            stray.to_string().contains("`code` does not apply"),
            "{stray}"
        );
        let typo = toml::from_str::<ErrorPolicy>("policy = \"retry\"\nmax_attempt = 1");
        assert!(typo.is_err(), "unknown keys are rejected");
        assert!(toml::from_str::<ErrorPolicy>("policy = \"exit\"").is_err());
        // A bare retry takes the documented defaults.
        let bare: ErrorPolicy = toml::from_str("policy = \"retry\"").unwrap();
        assert_eq!(
            bare,
            ErrorPolicy::Retry {
                initial: 100 * MS,
                max: Duration::from_secs(30),
                multiplier: 2.0,
                max_attempts: 5,
                then: Box::new(ErrorPolicy::Continue),
            }
        );
        // What serialises reads back.
        let written = toml::to_string(&policy).unwrap();
        assert_eq!(toml::from_str::<ErrorPolicy>(&written).unwrap(), policy);
    }

    #[test]
    fn validation_names_every_problem_with_its_path() {
        let policy = ErrorPolicy::ByKind {
            kinds: [(
                "a".to_owned(),
                ErrorPolicy::Retry {
                    initial: Duration::ZERO,
                    max: Duration::ZERO,
                    multiplier: 0.5,
                    max_attempts: 0,
                    then: Box::new(ErrorPolicy::Exit { code: 300 }),
                },
            )]
            .into(),
            default: Box::new(ErrorPolicy::Continue),
        };
        let paths: Vec<String> = policy.validate().into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            paths,
            [
                "kinds.a.initial",
                "kinds.a.multiplier",
                "kinds.a.max_attempts",
                "kinds.a.then.code"
            ]
        );
    }
}
