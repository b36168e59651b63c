//! The broker's timing settings (`[broker]` in config), with the defaults a fleet
//! starts from. Pure data and validation; the coordinator and observer read them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often nodes talk and how long they wait for each other.
///
/// The defaults suit a fleet on one network: a dead subscriber's sources move after
/// about 6 s, a dead coordinator is replaced after about 10 s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSettings {
    /// How often a node heartbeats its subscribers.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A subscriber whose last heartbeat is older than this is dead.
    #[serde(with = "humantime_serde")]
    pub member_timeout: Duration,
    /// How often the coordinator republishes every group's decision, so an observer
    /// that missed a message converges.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// How long a coordinator's lease lasts without renewal; it renews every third.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How long a moving source waits for its old owner's `released` before it is
    /// given to the new owner anyway.
    #[serde(with = "humantime_serde")]
    pub handover_timeout: Duration,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(2),
            member_timeout: Duration::from_secs(6),
            refresh_interval: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(10),
            handover_timeout: Duration::from_secs(10),
        }
    }
}

impl BrokerSettings {
    /// Every problem, as (key within `[broker]`, message).
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("member_timeout", self.member_timeout),
            ("refresh_interval", self.refresh_interval),
            ("lease_ttl", self.lease_ttl),
            ("handover_timeout", self.handover_timeout),
        ] {
            if value.is_zero() {
                problems.push((key, "must be longer than 0s".to_owned()));
            }
        }
        // One late heartbeat must not make a live subscriber look dead.
        if self.member_timeout < self.heartbeat_interval * 2 {
            problems.push((
                "member_timeout",
                format!(
                    "{} is less than two heartbeat intervals ({}): a single late heartbeat would declare a live subscriber dead; use at least {}",
                    humantime::format_duration(self.member_timeout),
                    humantime::format_duration(self.heartbeat_interval),
                    humantime::format_duration(self.heartbeat_interval * 2),
                ),
            ));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let settings = BrokerSettings::default();
        assert!(settings.validate().is_empty());
        assert_eq!(settings.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(settings.member_timeout, Duration::from_secs(6));
        assert_eq!(settings.refresh_interval, Duration::from_secs(5));
        assert_eq!(settings.lease_ttl, Duration::from_secs(10));
        assert_eq!(settings.handover_timeout, Duration::from_secs(10));
    }

    #[test]
    fn zero_durations_and_a_tight_member_timeout_are_problems() {
        let settings = BrokerSettings {
            lease_ttl: Duration::ZERO,
            member_timeout: Duration::from_secs(3),
            ..BrokerSettings::default()
        };
        let keys: Vec<&str> = settings.validate().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["lease_ttl", "member_timeout"]);
        let message = &settings.validate()[1].1;
        assert!(message.contains("at least 4s"), "{message}");
    }
}
