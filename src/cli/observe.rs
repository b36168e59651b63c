//! What `weir run` does for observability: installs the metrics recorder, gives
//! every metric its first value for this node's role, groups and sinks, and serves
//! the HTTP endpoints on `http.listen`.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::admin::{Admin, AdminAuth};
use crate::broker::lease::LeaseStore;
use crate::bus::AllocationBus;
use crate::config::{Config, SinkConfig};
use crate::metrics::{NodeMetrics, register_node};
use crate::runtime::EventRuntime;
use crate::store::EventStore;
use crate::telemetry::http::HttpServer;
use crate::telemetry::status::NodeProbe;

/// The services a node's readiness depends on.
pub(super) struct Observed {
    pub events: Arc<dyn EventStore>,
    pub bus: Arc<dyn AllocationBus>,
    pub leases: Arc<dyn LeaseStore>,
}

/// Who may write through the admin API, from `[http]`.
pub(super) fn admin_auth(config: &Config) -> Result<AdminAuth, CliError> {
    let tokens = config
        .http
        .admin_tokens()
        .map_err(|error| CliError::Usage(format!("cannot read http.admin_token_file: {error}")))?;
    let listen = config
        .http
        .listen
        .parse()
        .map_err(|error| CliError::Usage(format!("http.listen: {error}")))?;
    Ok(AdminAuth::new(tokens, listen))
}

/// The HTTP endpoints, and the task that keeps this node's report for the
/// fleet's status.
pub(super) struct Served {
    http: HttpServer,
    reporter: Option<(CancellationToken, JoinHandle<()>)>,
}

impl Served {
    pub(super) async fn stop(self) {
        if let Some((cancel, task)) = self.reporter {
            cancel.cancel();
            let _ = task.await;
        }
        self.http.stop().await;
    }
}

/// Binds `http.listen` first, so that a taken address stops the node before it
/// joins the fleet, then registers the metrics and serves the endpoints, with
/// the admin API if the node has one.
pub(super) async fn start(
    config: &Config,
    runtime: Arc<EventRuntime>,
    observed: Observed,
    admin: Option<Arc<Admin>>,
) -> Result<Served, CliError> {
    let listener = crate::telemetry::http::bind(&config.http.listen)
        .await
        .map_err(|error| CliError::Usage(error.to_string()))?;
    let metrics =
        crate::telemetry::install().map_err(|error| CliError::Usage(error.to_string()))?;
    register_node(&node_metrics(config));
    let probe = NodeProbe {
        runtime,
        events: observed.events,
        bus: observed.bus,
        leases: Some(observed.leases),
    };
    let routes = admin.as_ref().map_or_else(axum::Router::new, |admin| {
        crate::admin::http::router(Arc::clone(admin))
    });
    let http = HttpServer::start_with(listener, probe.clone(), metrics, routes)
        .map_err(|error| CliError::Usage(error.to_string()))?;
    let reporter = admin.map(|admin| {
        let cancel = CancellationToken::new();
        let task = crate::ambient::spawn(crate::admin::fleet::report_periodically(
            admin,
            probe,
            Some(config.http.admin_url()),
            config.broker.heartbeat_interval,
            cancel.clone(),
        ));
        (cancel, task)
    });
    Ok(Served { http, reporter })
}

/// What this node exports, from its configuration.
fn node_metrics(config: &Config) -> NodeMetrics {
    let role = config.node.role;
    let groups = if role.observes() {
        config
            .subscriptions
            .iter()
            .map(|s| {
                let labels: std::collections::BTreeSet<String> = s
                    .allocated_sources()
                    .iter()
                    .map(crate::event::Source::metric_label)
                    .collect();
                let labels = labels.into_iter().collect();
                (s.group.clone(), labels)
            })
            .collect()
    } else {
        Vec::new()
    };
    let coordinated_groups = if role.coordinates() {
        config
            .subscriptions
            .iter()
            .map(|s| s.group.clone())
            .collect()
    } else {
        Vec::new()
    };
    let mut sinks: Vec<&'static str> = Vec::new();
    if role.observes() {
        for subscription in &config.subscriptions {
            let sink = sink_label(&subscription.sink);
            if !sinks.contains(&sink) {
                sinks.push(sink);
            }
        }
    }
    NodeMetrics {
        role: role.as_str(),
        groups,
        coordinated_groups,
        sinks,
    }
}

/// The `sink` label a sink's metrics carry.
fn sink_label(sink: &SinkConfig) -> &'static str {
    match sink {
        SinkConfig::Stdout => "stdout",
        SinkConfig::Nats { .. } => "nats",
        SinkConfig::Kafka { .. } => "kafka",
    }
}
