//! The node's HTTP endpoints, served with axum:
//!
//! - `/metrics`: every metric in the Prometheus text format;
//! - `/livez`: 200 while the process runs; it checks nothing else, so a database
//!   outage never gets a node restarted;
//! - `/readyz`: 200 when the store, the bus and the lease store answer and the
//!   broker does what its role asks; otherwise 503 with every reason as JSON.
//!   It answers within [`FRESH_WAIT`]: what a check of its own finds by then,
//!   or else what a background check found at most [`READINESS_INTERVAL`] and
//!   a check ago (its `age_ms` says how long), so a service that hangs never
//!   makes a probe time out; a check older than [`READINESS_STALE`] counts as
//!   not ready;
//! - `/status`: the node as JSON ([`NodeStatus`](super::status::NodeStatus)).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::status::{NodeProbe, Readiness};

/// How often histograms are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// How often the background check finds whether the node is ready (and records
/// it as `weir_ready`).
pub const READINESS_INTERVAL: Duration = Duration::from_secs(1);

/// How long `/readyz` waits for a check of its own before it answers what the
/// background check found: services that answer at once give a fresh answer,
/// one that hangs never holds up a probe.
pub const FRESH_WAIT: Duration = Duration::from_millis(50);

/// A readiness found longer ago than this is not trusted: the check itself is
/// stuck (each service gets [`CHECK_TIMEOUT`](super::status::CHECK_TIMEOUT)).
pub const READINESS_STALE: Duration = Duration::from_secs(10);

/// Why the HTTP endpoints could not be served.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "cannot serve the HTTP endpoints on {address}: the address is in use; set http.listen (or --listen) to a free address"
    )]
    AddressInUse { address: String },
    #[error(
        "cannot serve the HTTP endpoints on {address}: {source}; set http.listen (or --listen) to an address of this host"
    )]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Recorder(#[from] super::InstallError),
}

/// Binds `address`, reporting an address in use as such.
pub async fn bind(address: &str) -> Result<TcpListener, HttpError> {
    TcpListener::bind(address).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            HttpError::AddressInUse {
                address: address.to_owned(),
            }
        } else {
            HttpError::Bind {
                address: address.to_owned(),
                source,
            }
        }
    })
}

/// What the background check found last, and when.
type Checked = Arc<Mutex<Option<(Readiness, Instant)>>>;

#[derive(Clone)]
struct AppState {
    probe: NodeProbe,
    metrics: PrometheusHandle,
    checked: Checked,
}

/// The endpoints' routes.
pub fn router(probe: NodeProbe, metrics: PrometheusHandle) -> Router {
    routes(probe, metrics, Checked::default())
}

fn routes(probe: NodeProbe, metrics: PrometheusHandle, checked: Checked) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .route("/status", get(status))
        .with_state(AppState {
            probe,
            metrics,
            checked,
        })
}

/// Checks readiness and keeps what it found.
async fn check(probe: &NodeProbe, checked: &Checked) -> Readiness {
    let readiness = probe.readiness().await;
    record_readiness(readiness.ready);
    *checked.lock().unwrap_or_else(PoisonError::into_inner) =
        Some((readiness.clone(), Instant::now()));
    readiness
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// A check of its own that answers within [`FRESH_WAIT`]; otherwise what the
/// background check found (only before its first check does a request wait for
/// a whole check).
async fn readiness(State(state): State<AppState>) -> Response {
    let fresh = tokio::time::timeout(FRESH_WAIT, check(&state.probe, &state.checked)).await;
    let found = state
        .checked
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let (mut readiness, age) = match (fresh, found) {
        (Ok(readiness), _) => (readiness, Duration::ZERO),
        (Err(_), Some((readiness, at))) => (readiness, at.elapsed()),
        (Err(_), None) => (check(&state.probe, &state.checked).await, Duration::ZERO),
    };
    if age > READINESS_STALE {
        readiness.ready = false;
        readiness.reasons.push(format!(
            "readiness was last checked {}s ago: the check itself is stuck",
            age.as_secs()
        ));
    }
    readiness.age_ms = Some(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
    let code = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(readiness)).into_response()
}

fn record_readiness(ready: bool) {
    ::metrics::gauge!(crate::metrics::READY).set(if ready { 1.0 } else { 0.0 });
}

async fn status(State(state): State<AppState>) -> Response {
    Json(state.probe.status().await).into_response()
}

/// The endpoints, served in the background until [`HttpServer::stop`].
pub struct HttpServer {
    address: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Serves the endpoints on `listener`, and keeps the metrics' histograms
    /// folded while nobody scrapes.
    pub fn start(
        listener: TcpListener,
        probe: NodeProbe,
        metrics: PrometheusHandle,
    ) -> Result<Self, HttpError> {
        Self::start_with(listener, probe, metrics, Router::new())
    }

    /// Serves the endpoints and `more` routes beside them (the admin API).
    pub fn start_with(
        listener: TcpListener,
        probe: NodeProbe,
        metrics: PrometheusHandle,
        more: Router,
    ) -> Result<Self, HttpError> {
        let address = listener.local_addr().map_err(|source| HttpError::Bind {
            address: "the bound listener".into(),
            source,
        })?;
        let stop = CancellationToken::new();
        let checked = Checked::default();
        let app = routes(probe.clone(), metrics.clone(), Arc::clone(&checked)).merge(more);
        let shutdown = stop.clone();
        let task = crate::ambient::spawn(async move {
            let upkeep = async {
                let mut timer = tokio::time::interval(UPKEEP_INTERVAL);
                loop {
                    timer.tick().await;
                    metrics.run_upkeep();
                }
            };
            // Readiness for /readyz and as a metric (for alerts that cannot
            // probe /readyz), found apart from any request.
            let readiness = async {
                let mut timer = tokio::time::interval(READINESS_INTERVAL);
                timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    timer.tick().await;
                    check(&probe, &checked).await;
                }
            };
            let upkeep = async { tokio::join!(upkeep, readiness) };
            let serve =
                axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
            tokio::select! {
                served = serve => {
                    if let Err(error) = served {
                        tracing::error!(%error, "the HTTP endpoints stopped");
                    }
                }
                _ = upkeep => {}
            }
        });
        tracing::info!(%address, "serving /metrics, /livez, /readyz and /status");
        Ok(Self {
            address,
            stop,
            task,
        })
    }

    /// Where the endpoints are served (the port chosen, if 0 was asked for).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops serving; requests in flight finish first.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for HttpServer {
    /// A server dropped without stopping stops serving too.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
