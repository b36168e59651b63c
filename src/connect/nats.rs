//! The `[nats]` settings: how weir reaches NATS, for the NATS bus and the NATS
//! sink alike. They exist whatever features are compiled in, so that a config
//! file is read the same way by every build.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::default_connect_timeout;

/// `[nats]`: how to reach NATS, for the NATS bus and NATS sinks.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsOptions {
    /// One server URL or several separated by commas: `nats://host:4222`,
    /// `tls://host:4222`.
    #[serde(default = "default_nats_url")]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// An NKey seed (`SU...`) to sign the server's challenge with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_seed: Option<String>,
    /// A `.creds` file holding a user JWT and its NKey seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: NatsTls,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Copies JetStream keeps of each stream weir creates (the bus's and a
    /// sink's): 1 to [`MAX_REPLICAS`], and no more than the cluster has servers.
    /// Streams that exist already keep the replicas their operator gave them.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
}

/// The most copies JetStream keeps of a stream.
pub const MAX_REPLICAS: usize = 5;

fn default_replicas() -> usize {
    1
}

fn default_nats_url() -> String {
    "nats://127.0.0.1:4222".into()
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            url: default_nats_url(),
            user: None,
            password: None,
            token: None,
            nkey_seed: None,
            credentials_file: None,
            tls: NatsTls::default(),
            connect_timeout: default_connect_timeout(),
            replicas: default_replicas(),
        }
    }
}

/// `nats.url` with every server's credentials hidden, for anything that
/// prints it: `nats://user:password@host` shows as `nats://user:***@host`, and
/// a token (`nats://token@host`) as `nats://***@host`.
pub fn redacted_url(url: &str) -> String {
    url.split(',')
        .map(|server| {
            let (scheme, rest) = server
                .split_once("://")
                .map_or(("", server), |(scheme, rest)| (scheme, rest));
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let Some(at) = rest[..authority_end].rfind('@') else {
                return server.to_owned();
            };
            let hidden = match rest[..at].split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_owned(),
            };
            let scheme = if scheme.is_empty() {
                String::new()
            } else {
                format!("{scheme}://")
            };
            format!("{scheme}{hidden}{}", &rest[at..])
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = |value: &Option<String>| value.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsOptions")
            .field("url", &redacted_url(&self.url))
            .field("user", &self.user)
            .field("password", &secret(&self.password))
            .field("token", &secret(&self.token))
            .field("nkey_seed", &secret(&self.nkey_seed))
            .field("credentials_file", &self.credentials_file)
            .field("tls", &self.tls)
            .field("connect_timeout", &self.connect_timeout)
            .field("replicas", &self.replicas)
            .finish()
    }
}

/// `[nats.tls]`: TLS towards NATS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// Insist on TLS even for `nats://` URLs.
    #[serde(default)]
    pub required: bool,
    /// PEM file of the certificate authorities to trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and its key, for servers that verify clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::redacted_url;

    #[test]
    fn every_servers_credentials_are_hidden_and_the_rest_kept() {
        assert_eq!(
            redacted_url("nats://u:secret@h:4222, tls://token@h2:4222/x"),
            "nats://u:***@h:4222, tls://***@h2:4222/x"
        );
        for plain in ["nats://127.0.0.1:4222", "h:4222", "nats://h:4222/a@b"] {
            assert_eq!(redacted_url(plain), plain);
        }
        assert_eq!(redacted_url("u:p@h:4222"), "u:***@h:4222");
    }
}
