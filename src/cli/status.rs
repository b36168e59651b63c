//! `weir status`: asks a running node for its `/status` and prints it as a table
//! (or as the JSON itself with `--json`). The node's address defaults to
//! `http.listen`, so with the node's own configuration no flag is needed.
//! `--fleet` asks the node for the whole fleet instead (`/admin/fleet`): every
//! node with its role and readiness, the leader, and every checkpoint.

use std::time::Duration;

use hyper::Method;
use hyper::body::Bytes;

use super::CliError;
use super::client::{AdminClient, NodeArgs, base_url, join, request};
use crate::admin::fleet::{FleetStatus, render_fleet};
use crate::config::Config;
use crate::telemetry::status::{NodeStatus, render_table};

/// How long to wait for the node's answer.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node's HTTP address, e.g. `http://10.0.0.5:9600` (default: http.listen).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Print the JSON the node answered instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The whole fleet, as the node knows it from the store: every node, the
    /// leader, and every group's checkpoints with owner, state and lag.
    #[arg(long)]
    pub fleet: bool,
}

pub async fn run(config: &Config, args: Args) -> Result<(), CliError> {
    let base = args
        .url
        .clone()
        .unwrap_or_else(|| default_url(&config.http.listen));
    if args.fleet {
        let node = NodeArgs {
            url: Some(base),
            token: None,
            token_name: None,
            timeout: None,
        };
        let fleet: FleetStatus = AdminClient::new(config, &node)?.get("/admin/fleet").await?;
        return super::operate::print_answer(&fleet, args.json, || render_fleet(&fleet));
    }
    let url = status_url(&base)?;
    let body = tokio::time::timeout(TIMEOUT, get(&url))
        .await
        .map_err(|_| {
            CliError::Unreachable(format!(
                "{url} did not answer within {}s",
                TIMEOUT.as_secs()
            ))
        })??;
    let status: NodeStatus = serde_json::from_slice(&body).map_err(|error| {
        CliError::Unreachable(format!(
            "{url} did not answer with a weir node's status ({error}): is --url a weir node's http.listen?"
        ))
    })?;
    if args.json {
        let text = serde_json::to_string_pretty(&status).map_err(std::io::Error::other)?;
        println!("{text}");
    } else {
        print!("{}", render_table(&status));
    }
    Ok(())
}

/// The URL of a node listening on `listen`: a wildcard address is reached on
/// this host's loopback.
fn default_url(listen: &str) -> String {
    format!("http://{}", crate::config::reachable(listen))
}

/// `base` with the path `/status`; `base` may be given without a scheme.
fn status_url(base: &str) -> Result<url::Url, CliError> {
    join(&base_url(base)?, "/status")
}

/// One GET; the body if the answer is 200.
async fn get(url: &url::Url) -> Result<Bytes, CliError> {
    let (code, body) = request(Method::GET, url, None, Bytes::new()).await?;
    if !code.is_success() {
        return Err(CliError::Unreachable(format!(
            "{url} answered {code}: {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_reaches_a_wildcard_listener_on_loopback() {
        assert_eq!(default_url("0.0.0.0:9600"), "http://127.0.0.1:9600");
        assert_eq!(default_url("[::]:9600"), "http://[::1]:9600");
        assert_eq!(default_url("10.1.2.3:80"), "http://10.1.2.3:80");
    }

    #[test]
    fn urls_get_the_status_path_and_need_plain_http() {
        assert_eq!(
            status_url("127.0.0.1:9600").unwrap().as_str(),
            "http://127.0.0.1:9600/status"
        );
        assert_eq!(
            status_url("http://node-2:9600/").unwrap().as_str(),
            "http://node-2:9600/status"
        );
        assert!(status_url("https://node-2:9600").is_err());
    }
}
