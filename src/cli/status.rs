//! `weir status`: asks a running node for its `/status` and prints it as a table
//! (or as the JSON itself with `--json`). The node's address defaults to
//! `http.listen`, so with the node's own configuration no flag is needed.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::CliError;
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
}

pub async fn run(config: &Config, args: Args) -> Result<(), CliError> {
    let base = args.url.unwrap_or_else(|| default_url(&config.http.listen));
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
    let address = match listen.parse::<std::net::SocketAddr>() {
        Ok(address) if address.ip().is_unspecified() => {
            let loopback: std::net::IpAddr = if address.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(loopback, address.port()).to_string()
        }
        _ => listen.to_owned(),
    };
    format!("http://{address}")
}

/// `base` with the path `/status`; `base` may be given without a scheme.
fn status_url(base: &str) -> Result<url::Url, CliError> {
    let with_scheme = if base.contains("://") {
        base.to_owned()
    } else {
        format!("http://{base}")
    };
    let mut url = url::Url::parse(&with_scheme)
        .map_err(|error| CliError::Usage(format!("invalid --url {base:?}: {error}")))?;
    if url.scheme() != "http" {
        return Err(CliError::Usage(format!(
            "invalid --url {base:?}: weir serves plain http; give http://HOST:PORT"
        )));
    }
    url.set_path("/status");
    Ok(url)
}

/// One GET over HTTP/1.1; the body if the answer is 200.
async fn get(url: &url::Url) -> Result<Bytes, CliError> {
    let host = url.host_str().unwrap_or("127.0.0.1");
    let port = url.port_or_known_default().unwrap_or(80);
    let unreachable = move |error: &dyn std::fmt::Display| {
        CliError::Unreachable(format!(
            "cannot reach a weir node at {url}: {error}; is `weir run` running, and is --url (or http.listen) its address?"
        ))
    };
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| unreachable(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(&e))?;
    // The connection is driven beside the request and ends with it.
    let driver = async move {
        let _ = connection.await;
    };
    let request = hyper::Request::get(url.path())
        .header(hyper::header::HOST, url.authority())
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| CliError::Usage(e.to_string()))?;
    // Owns the sender, so that the connection closes once the answer is read.
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(&e))?;
        let code = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        if !code.is_success() {
            return Err(CliError::Unreachable(format!(
                "{url} answered {code}: {}",
                String::from_utf8_lossy(&body).trim()
            )));
        }
        Ok(body)
    };
    let (body, ()) = tokio::join!(exchange, driver);
    body
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
