//! The node's HTTP endpoints, served with axum:
//!
//! - `/metrics`: every metric in the Prometheus text format;
//! - `/livez`: 200 while the process runs; it checks nothing else, so a database
//!   outage never gets a node restarted;
//! - `/readyz`: 200 when the store, the bus and the lease store answer and the
//!   broker does what its role asks; otherwise 503 with every reason as JSON;
//! - `/status`: the node as JSON ([`NodeStatus`](super::status::NodeStatus)).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::status::NodeProbe;

/// How often histograms are folded into their buckets when nobody scrapes, and
/// readiness is recorded as `weir_ready`.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

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

#[derive(Clone)]
struct AppState {
    probe: NodeProbe,
    metrics: PrometheusHandle,
}

/// The endpoints' routes.
pub fn router(probe: NodeProbe, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .route("/status", get(status))
        .with_state(AppState { probe, metrics })
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

async fn readiness(State(state): State<AppState>) -> Response {
    let readiness = state.probe.readiness().await;
    record_readiness(readiness.ready);
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
        let app = router(probe.clone(), metrics.clone()).merge(more);
        let shutdown = stop.clone();
        let task = crate::ambient::spawn(async move {
            let upkeep = async {
                let mut timer = tokio::time::interval(UPKEEP_INTERVAL);
                loop {
                    timer.tick().await;
                    metrics.run_upkeep();
                    // Readiness as a metric, for alerts that cannot probe /readyz.
                    record_readiness(probe.readiness().await.ready);
                }
            };
            let serve =
                axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
            tokio::select! {
                served = serve => {
                    if let Err(error) = served {
                        tracing::error!(%error, "the HTTP endpoints stopped");
                    }
                }
                () = upkeep => {}
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
