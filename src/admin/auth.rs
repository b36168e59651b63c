//! Who may write through the admin API: a caller presenting one of the
//! configured bearer tokens, each with a name that the lifecycle record of the
//! write carries. With no token configured, writes are allowed only while the
//! listener is loopback only, so that nobody off the host can steer the fleet.

use std::net::SocketAddr;

use super::AdminError;

/// The name a write is recorded under when no token is configured and the
/// listener is loopback only.
pub const LOOPBACK: &str = "loopback";

/// The configured admin tokens and where the node listens.
#[derive(Clone)]
pub struct AdminAuth {
    /// (name, token)
    tokens: Vec<(String, String)>,
    loopback_only: bool,
}

impl std::fmt::Debug for AdminAuth {
    /// Names only: a logged `AdminAuth` must not show the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("AdminAuth")
            .field("tokens", &names)
            .field("loopback_only", &self.loopback_only)
            .finish()
    }
}

impl AdminAuth {
    /// `tokens` as (name, token); `listen` is where the HTTP endpoints are served.
    pub fn new(tokens: Vec<(String, String)>, listen: SocketAddr) -> Self {
        Self {
            tokens: tokens
                .into_iter()
                .filter(|(_, token)| !token.is_empty())
                .collect(),
            loopback_only: listen.ip().is_loopback(),
        }
    }

    /// The name of the token `authorization` (an `Authorization` header's value)
    /// presents, if writes are allowed with it. Without tokens, `host` (the
    /// `Host` header) must name this host too: a web page the operator's
    /// browser opens could otherwise reach the loopback listener through a DNS
    /// name it points at 127.0.0.1 (DNS rebinding), and write.
    pub fn check(
        &self,
        authorization: Option<&str>,
        host: Option<&str>,
    ) -> Result<String, AdminError> {
        if self.tokens.is_empty() {
            return if self.loopback_only {
                if !host.is_some_and(is_loopback_host) {
                    return Err(AdminError::Forbidden(format!(
                        "admin writes without a token are taken only for Host 127.0.0.1, [::1] or localhost, not {:?}: send them to the node's loopback address, or set http.admin_token",
                        host.unwrap_or("")
                    )));
                }
                Ok(LOOPBACK.to_owned())
            } else {
                Err(AdminError::Forbidden(
                    "admin writes are disabled: this node listens beyond loopback and has no admin token; set http.admin_token (or http.admin_token_file) on every node".into(),
                ))
            };
        }
        let presented = authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(AdminError::Unauthorized)?;
        self.tokens
            .iter()
            .find(|(_, token)| constant_time_eq(token.as_bytes(), presented.as_bytes()))
            .map(|(name, _)| name.clone())
            .ok_or(AdminError::Unauthorized)
    }
}

/// Whether a `Host` header names this host by a loopback address or
/// `localhost`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Compares without stopping at the first difference, so that response times
/// say nothing about how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(listen: &str) -> SocketAddr {
        listen.parse().unwrap()
    }

    #[test]
    fn without_tokens_only_a_loopback_listener_takes_writes() {
        let loopback = AdminAuth::new(vec![], at("127.0.0.1:9600"));
        assert_eq!(
            loopback.check(None, Some("127.0.0.1:9600")).unwrap(),
            LOOPBACK
        );
        let open = AdminAuth::new(vec![], at("0.0.0.0:9600"));
        assert!(matches!(
            open.check(None, Some("127.0.0.1:9600")),
            Err(AdminError::Forbidden(_))
        ));
    }

    #[test]
    fn without_tokens_a_write_must_name_this_host_against_dns_rebinding() {
        let loopback = AdminAuth::new(vec![], at("127.0.0.1:9600"));
        for host in [
            "127.0.0.1:9600",
            "localhost:9600",
            "LOCALHOST",
            "[::1]:9600",
            "127.0.0.1",
        ] {
            assert_eq!(
                loopback.check(None, Some(host)).unwrap(),
                LOOPBACK,
                "{host}"
            );
        }
        for host in [
            "evil.example:9600",
            "evil.example",
            "127.0.0.1.evil.example:9600",
            "localhost.evil.example",
            "10.0.0.5:9600",
            "",
        ] {
            assert!(
                matches!(
                    loopback.check(None, Some(host)),
                    Err(AdminError::Forbidden(_))
                ),
                "{host}"
            );
        }
        assert!(matches!(
            loopback.check(None, None),
            Err(AdminError::Forbidden(_))
        ));
    }

    #[test]
    fn with_tokens_a_write_needs_one_and_is_named_by_it() {
        let auth = AdminAuth::new(
            vec![
                ("ops".into(), "s3cret".into()),
                ("ci".into(), "other".into()),
            ],
            at("127.0.0.1:9600"),
        );
        assert!(matches!(
            auth.check(None, None),
            Err(AdminError::Unauthorized)
        ));
        assert!(matches!(
            auth.check(Some("Bearer wrong"), None),
            Err(AdminError::Unauthorized)
        ));
        assert!(matches!(
            auth.check(Some("s3cret"), None),
            Err(AdminError::Unauthorized)
        ));
        assert_eq!(auth.check(Some("Bearer s3cret"), None).unwrap(), "ops");
        assert_eq!(auth.check(Some("Bearer other"), None).unwrap(), "ci");
        assert!(!format!("{auth:?}").contains("s3cret"));
    }
}
