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
    /// Without --token: which configured token to send, by its name in
    /// http.admin_tokens (needed when several are configured besides none as
    /// http.admin_token, since writes are recorded under the token's name).
    #[arg(long, value_name = "NAME")]
    pub token_name: Option<String>,
    /// How long to wait for a node's answer to a write (default: the
    /// configuration's broker.handover_timeout and a minute, past the longest a
    /// leader waits before answering a reset "in progress"). A write that
    /// outlasts it may go on, or stop where it got to: check before sending it
    /// again.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

/// How much longer than the handover timeout the CLI waits for a write's answer.
const WRITE_MARGIN: Duration = Duration::from_secs(60);

/// A node's admin API.
pub struct AdminClient {
    base: url::Url,
    /// The token writes send, or why none could be chosen (reads need none).
    token: Result<Option<String>, String>,
    /// How long a write's request may take.
    write_timeout: Duration,
}

impl AdminClient {
    pub fn new(config: &Config, args: &NodeArgs) -> Result<Self, CliError> {
        let base = args.url.clone().unwrap_or_else(|| config.http.admin_url());
        let token = match &args.token {
            Some(token) => Ok(Some(token.clone())),
            None => {
                let tokens = config.http.admin_tokens().map_err(|error| {
                    CliError::Usage(format!("cannot read http.admin_token_file: {error}"))
                })?;
                default_token(tokens, args.token_name.as_deref()).map_err(|e| e.to_string())
            }
        };
        Ok(Self {
            base: base_url(&base)?,
            token,
            write_timeout: args
                .timeout
                .unwrap_or(config.broker.handover_timeout + WRITE_MARGIN),
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
        let (url, status, answer) = self.send(path, body).await?;
        decode(&url, status, &answer)
    }

    /// POSTs `body` to `path` on the leader, following a non-leader's answer;
    /// where it was answered, the status and the body.
    pub async fn send<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(url::Url, StatusCode, Bytes), CliError> {
        let token = self.token.clone().map_err(CliError::Usage)?;
        let payload = Bytes::from(serde_json::to_vec(body).map_err(std::io::Error::other)?);
        let mut base = self.base.clone();
        for _ in 0..=LEADER_HOPS {
            let url = join(&base, path)?;
            let sent = request(Method::POST, &url, token.as_deref(), payload.clone());
            let (status, answer) = tokio::time::timeout(self.write_timeout, sent)
                .await
                .map_err(|_| {
                    CliError::Retry(format!(
                        "{url} did not answer within {}: the write may still be under way, or have stopped where it got to; check (`weir checkpoints list`, `weir dead-letters list`) before sending it again",
                        humantime::format_duration(self.write_timeout)
                    ))
                })??;
            if status == StatusCode::SERVICE_UNAVAILABLE {
                if let Ok(ErrorBody {
                    leader_url: Some(leader),
                    ..
                }) = serde_json::from_slice::<ErrorBody>(&answer)
                {
                    let leader = base_url(&leader)?;
                    if leader != base {
                        if !may_follow(&self.base, &leader) {
                            return Err(CliError::Retry(format!(
                                "{url} does not lead; it names the leader's admin address {leader}, which this command does not send the token to from {}: if that is the leader's address, run the command again with --url {leader} (a node listening beyond loopback should set http.advertise)",
                                self.base
                            )));
                        }
                        eprintln!("{url} does not lead; sending to the leader at {leader}");
                        base = leader;
                        continue;
                    }
                }
            }
            return Ok((url, status, answer));
        }
        Err(CliError::Unreachable(format!(
            "the leader kept moving while sending {path}; try again"
        )))
    }
}

/// The configured token a write sends when none is given: the one named
/// `name`; else `http.admin_token` (named `admin`); else the only one. With
/// several and no name, the caller must choose: writes are recorded under the
/// token's name, and a guess would record the wrong operator.
fn default_token(
    tokens: Vec<(String, String)>,
    name: Option<&str>,
) -> Result<Option<String>, CliError> {
    let names = || {
        let names: Vec<&str> = tokens.iter().map(|(name, _)| name.as_str()).collect();
        names.join(", ")
    };
    if let Some(name) = name {
        return match tokens.iter().find(|(named, _)| named == name) {
            Some((_, token)) => Ok(Some(token.clone())),
            None => Err(CliError::Usage(format!(
                "--token-name {name}: no admin token has that name (configured: {})",
                names()
            ))),
        };
    }
    if let Some((_, token)) = tokens.iter().find(|(name, _)| name == "admin") {
        return Ok(Some(token.clone()));
    }
    match tokens.as_slice() {
        [] => Ok(None),
        [(_, token)] => Ok(Some(token.clone())),
        _ => Err(CliError::Usage(format!(
            "several admin tokens are configured ({}) and none as http.admin_token: choose with --token-name NAME (writes are recorded under its name), or give --token",
            names()
        ))),
    }
}

/// Whether a write sent to `target` may follow "not the leader" to `leader`,
/// with its token: on `target`'s own host, or from a target beyond loopback to
/// a leader beyond loopback. A loopback or wildcard leader address seen from a
/// remote target is the advertised address of a node that did not set
/// `http.advertise`: following it would hand the token to whatever listens on
/// this host.
pub fn may_follow(target: &url::Url, leader: &url::Url) -> bool {
    if target.host() == leader.host() {
        return true;
    }
    !is_local(target) && !is_local(leader)
}

/// A loopback or wildcard host: this host, wherever the URL is used.
fn is_local(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback() || ip.is_unspecified(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback() || ip.is_unspecified(),
        Some(url::Host::Domain(name)) => {
            name.eq_ignore_ascii_case("localhost")
                || name.to_ascii_lowercase().ends_with(".localhost")
        }
        None => true,
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

pub fn decode<T: DeserializeOwned>(
    url: &url::Url,
    status: StatusCode,
    body: &[u8],
) -> Result<T, CliError> {
    if !status.is_success() || status == StatusCode::ACCEPTED {
        let message = serde_json::from_slice::<ErrorBody>(body)
            .map(|error| error.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned());
        return Err(refusal(
            status,
            format!("{url} answered {status}: {message}"),
        ));
    }
    serde_json::from_slice(body).map_err(|error| {
        CliError::Unreachable(format!(
            "{url} did not answer as a weir node does ({error}): is --url a weir node's address?"
        ))
    })
}

/// A refusal as the error whose exit code says what to do next: 75 try again
/// later (no leader yet, in progress, a concurrent reset), 77 not allowed (the
/// token), 65 a request that will never be taken as it is (bad request,
/// nothing to act on), 1 anything else.
fn refusal(status: StatusCode, message: String) -> CliError {
    match status {
        StatusCode::ACCEPTED | StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE => {
            CliError::Retry(message)
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => CliError::Denied(message),
        StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND => CliError::Input(message),
        _ => CliError::Refused(message),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> url::Url {
        base_url(text).unwrap()
    }

    #[test]
    fn the_default_token_is_the_admin_token_or_the_one_named() {
        let tokens = |names: &[&str]| -> Vec<(String, String)> {
            names
                .iter()
                .map(|name| ((*name).to_owned(), format!("{name}-secret")))
                .collect()
        };
        let chosen = |names: &[&str], name: Option<&str>| default_token(tokens(names), name);
        assert_eq!(chosen(&[], None).unwrap(), None);
        assert_eq!(chosen(&["ci"], None).unwrap().as_deref(), Some("ci-secret"));
        // Named tokens come first, in name order: the first is not the default.
        assert_eq!(
            chosen(&["alice", "ci", "admin"], None).unwrap().as_deref(),
            Some("admin-secret")
        );
        assert!(matches!(
            chosen(&["alice", "ci"], None),
            Err(CliError::Usage(_))
        ));
        assert_eq!(
            chosen(&["alice", "ci"], Some("ci")).unwrap().as_deref(),
            Some("ci-secret")
        );
        assert!(matches!(
            chosen(&["alice"], Some("bob")),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn a_write_follows_the_leader_only_where_the_token_stays_with_the_fleet() {
        let follow = |target: &str, leader: &str| may_follow(&url(target), &url(leader));
        // One host, other ports: a fleet on one machine.
        assert!(follow("http://127.0.0.1:9601", "http://127.0.0.1:9602"));
        assert!(follow("http://10.0.0.5:9600", "http://10.0.0.5:9700"));
        // Host to host across the fleet.
        assert!(follow("http://10.0.0.5:9600", "http://10.0.0.6:9600"));
        assert!(follow("http://node-1:9600", "http://node-2.example:9600"));
        // A remote node that advertises loopback (a wildcard listener without
        // http.advertise) would send the token to this host.
        assert!(!follow("http://10.0.0.5:9600", "http://127.0.0.1:9600"));
        assert!(!follow("http://node-1:9600", "http://localhost:9600"));
        assert!(!follow("http://10.0.0.5:9600", "http://0.0.0.0:9600"));
        assert!(!follow("http://node-1:9600", "http://[::1]:9600"));
        // From loopback, only to this host.
        assert!(!follow("http://127.0.0.1:9600", "http://10.0.0.6:9600"));
    }
}
