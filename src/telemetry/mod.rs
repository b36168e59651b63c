//! Telemetry: what a node tells its operators.
//!
//! - [`install`]: the Prometheus recorder, installed once per process; its handle
//!   renders `/metrics`.
//! - [`http`]: the HTTP endpoints `/metrics`, `/livez`, `/readyz` and `/status`.
//! - [`status`]: what `/status` reports and `weir status` prints.
//! - [`logging`]: the `[log]` settings: level filter and pretty or JSON lines.

use std::sync::{Mutex, PoisonError};

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

pub mod http;
pub mod logging;
pub mod status;

static RECORDER: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Why the metrics recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot install the metrics recorder: {0}; was another metrics recorder installed in this process first?"
)]
pub struct InstallError(#[from] BuildError);

/// Installs the Prometheus recorder as the process's metrics recorder and describes
/// every metric; later calls return the same handle. Until this runs, recording a
/// metric costs next to nothing and goes nowhere.
pub fn install() -> Result<PrometheusHandle, InstallError> {
    // Held while installing, so that two callers never both try.
    let mut installed = RECORDER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(crate::metrics::DURATION_BUCKETS)?
        .install_recorder()?;
    crate::metrics::describe();
    *installed = Some(handle.clone());
    Ok(handle)
}
