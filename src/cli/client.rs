//! How the CLI talks to a running node: one plain HTTP/1.1 request at a time
//! (`weir status` and the admin commands). Admin writes that reach a node which
//! does not lead are answered 503 with the leader's address; the client sends
//! them on to it.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use super::CliError;
use crate::admin::http::ErrorBody;
use crate::config::Config;

/// How long to wait for a node's answer to a read.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a write follows "not the leader" to the leader.
const LEADER_HOPS: usize = 3;

/// Which node to ask, and with which token.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// A node's HTTP address, e.g. `http://10.0.0.5:9600` (default: http.advertise,
    /// or http.listen).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// The admin token for writes (default: http.admin_token of the configuration).
    #[arg(long, env = "WEIR_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// A node's admin API.
pub struct AdminClient {
    base: url::Url,
    token: Option<String>,
}

impl AdminClient {
    pub fn new(config: &Config, args: &NodeArgs) -> Result<Self, CliError> {
        let base = args.url.clone().unwrap_or_else(|| config.http.admin_url());
        let token = match &args.token {
            Some(token) => Some(token.clone()),
            None => config
                .http
                .admin_tokens()
                .map_err(|error| {
                    CliError::Usage(format!("cannot read http.admin_token_file: {error}"))
                })?
                .into_iter()
                .next()
                .map(|(_, token)| token),
        };
        Ok(Self {
            base: base_url(&base)?,
            token,
        })
    }

    /// GETs `path` (with its query) from the node.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let url = join(&self.base, path)?;
        let (status, body) =
            tokio::time::timeout(READ_TIMEOUT, request(Method::GET, &url, None, Bytes::new()))
                .await
                .map_err(|_| {
                    CliError::Unreachable(format!(
                        "{url} did not answer within {}s",
                        READ_TIMEOUT.as_secs()
                    ))
                })??;
        decode(&url, status, &body)
    }

    /// POSTs `body` to `path` on the leader, following a non-leader's answer.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        let payload = Bytes::from(serde_json::to_vec(body).map_err(std::io::Error::other)?);
        let mut base = self.base.clone();
        for _ in 0..=LEADER_HOPS {
            let url = join(&base, path)?;
            let (status, answer) =
                request(Method::POST, &url, self.token.as_deref(), payload.clone()).await?;
            if status == StatusCode::SERVICE_UNAVAILABLE {
                if let Ok(ErrorBody {
                    leader_url: Some(leader),
                    ..
                }) = serde_json::from_slice::<ErrorBody>(&answer)
                {
                    let leader = base_url(&leader)?;
                    if leader != base {
                        eprintln!("{url} does not lead; sending to the leader at {leader}");
                        base = leader;
                        continue;
                    }
                }
            }
            return decode(&url, status, &answer);
        }
        Err(CliError::Unreachable(format!(
            "the leader kept moving while sending {path}; try again"
        )))
    }
}

/// `base` as a URL; it may be given without a scheme.
pub fn base_url(base: &str) -> Result<url::Url, CliError> {
    let with_scheme = if base.contains("://") {
        base.to_owned()
    } else {
        format!("http://{base}")
    };
    let url = url::Url::parse(&with_scheme)
        .map_err(|error| CliError::Usage(format!("invalid --url {base:?}: {error}")))?;
    if url.scheme() != "http" {
        return Err(CliError::Usage(format!(
            "invalid --url {base:?}: weir serves plain http; give http://HOST:PORT"
        )));
    }
    Ok(url)
}

/// `base` with `path` (and its query) in place of its own.
pub fn join(base: &url::Url, path: &str) -> Result<url::Url, CliError> {
    base.join(path)
        .map_err(|error| CliError::Usage(format!("invalid path {path:?}: {error}")))
}

fn decode<T: DeserializeOwned>(
    url: &url::Url,
    status: StatusCode,
    body: &[u8],
) -> Result<T, CliError> {
    if !status.is_success() {
        let message = serde_json::from_slice::<ErrorBody>(body)
            .map(|error| error.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned());
        return Err(CliError::Refused(format!(
            "{url} answered {status}: {message}"
        )));
    }
    serde_json::from_slice(body).map_err(|error| {
        CliError::Unreachable(format!(
            "{url} did not answer as a weir node does ({error}): is --url a weir node's address?"
        ))
    })
}

/// One request over HTTP/1.1; the status and the body.
pub async fn request(
    method: Method,
    url: &url::Url,
    token: Option<&str>,
    body: Bytes,
) -> Result<(StatusCode, Bytes), CliError> {
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
    let path_and_query = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, url.authority())
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::CONNECTION, "close");
    if let Some(token) = token {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = builder
        .body(Full::new(body))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    // Owns the sender, so that the connection closes once the answer is read.
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        Ok((status, body))
    };
    let (answer, ()) = tokio::join!(exchange, driver);
    answer
}
