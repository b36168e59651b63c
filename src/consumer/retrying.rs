//! A consumer's run of transient failures: how long it waits before trying the
//! same events again, and the `weir_consumers_retrying` gauge while the run lasts.

use std::time::Duration;

use crate::metrics as names;

/// The first wait after a transient processing failure; it doubles with each
/// failure in a row, up to [`TRANSIENT_MAX`].
const TRANSIENT_INITIAL: Duration = Duration::from_millis(100);
const TRANSIENT_MAX: Duration = Duration::from_secs(30);

/// The wait before trying again after `failures` transient failures in a row.
pub(crate) fn transient_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    TRANSIENT_INITIAL
        .saturating_mul(1 << doublings)
        .min(TRANSIENT_MAX)
}

/// A consumer's run of transient failures, counted in the
/// `weir_consumers_retrying` gauge while it lasts (also if the task is aborted).
pub(crate) struct Retrying {
    group: String,
    pub(crate) failures: u32,
}

impl Retrying {
    pub(crate) fn new(group: &str) -> Self {
        Self {
            group: group.to_owned(),
            failures: 0,
        }
    }

    /// Counts one more failure; `true` if it starts a run.
    pub(crate) fn failed(&mut self) -> bool {
        self.failures += 1;
        if self.failures == 1 {
            metrics::gauge!(names::CONSUMERS_RETRYING, "group" => self.group.clone())
                .increment(1.0);
        }
        self.failures == 1
    }

    /// Ends the run; `true` if there was one.
    pub(crate) fn recovered(&mut self) -> bool {
        let was = self.failures > 0;
        if was {
            metrics::gauge!(names::CONSUMERS_RETRYING, "group" => self.group.clone())
                .decrement(1.0);
        }
        self.failures = 0;
        was
    }
}

impl Drop for Retrying {
    fn drop(&mut self) {
        self.recovered();
    }
}
