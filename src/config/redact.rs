//! Redaction for printing: passwords and other secrets are hidden in the effective
//! configuration (`weir config check` prints it), in `Debug` output and in anything that shows
//! a store URL.

use std::fmt;

use super::{Config, StoreConfig, is_secret_property};

impl Config {
    /// The effective configuration as TOML, with passwords redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut printable = self.clone();
        printable.node.id = Some(self.node_id());
        printable.store.url = printable.store.url.as_deref().map(redact_url);
        printable.store.read_url = printable.store.read_url.as_deref().map(redact_url);
        if printable.store.tls.key_password.is_some() {
            printable.store.tls.key_password = Some("<redacted>".into());
        }
        let nats = &mut printable.nats;
        nats.url = crate::connect::nats::redacted_url(&nats.url);
        for secret in [&mut nats.password, &mut nats.token, &mut nats.nkey_seed] {
            if secret.is_some() {
                *secret = Some("<redacted>".into());
            }
        }
        let http = &mut printable.http;
        if http.admin_token.is_some() {
            http.admin_token = Some("<redacted>".into());
        }
        for token in http.admin_tokens.values_mut() {
            *token = "<redacted>".into();
        }
        for (key, value) in printable.kafka.properties.iter_mut() {
            if is_secret_property(key) {
                *value = "<redacted>".into();
            }
        }
        toml::to_string_pretty(&printable)
            .unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

// Written by hand so that a logged `HttpConfig` never shows the admin tokens.
impl fmt::Debug for super::HttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&String> = self.admin_tokens.keys().collect();
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("admin_token_file", &self.admin_token_file)
            .field("admin_tokens", &names)
            .finish()
    }
}

// Written by hand so that a logged or panicking `StoreConfig` never shows the password.
impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("kind", &self.kind)
            .field("url", &self.url.as_deref().map(redact_url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_event_bytes", &self.max_event_bytes)
            .field("read_url", &self.read_url.as_deref().map(redact_url))
            .field("read_max_lag", &self.read_max_lag)
            .field("tls", &self.tls)
            .finish()
    }
}

// Written by hand so that a logged `StoreTls` never shows the key's password.
impl fmt::Debug for super::StoreTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreTls")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field(
                "key_password",
                &self.key_password.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Whether a connection-string key holds a secret: libpq's `password`, and
/// `sslpassword`, the password of the client key.
fn is_secret_key(key: &str) -> bool {
    key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("sslpassword")
}

/// Hides the password in a Postgres connection string, for anything that prints
/// configuration: the user-info password and `password=` query parameters of a URL
/// (multi-host URLs too), and the `password` value of the libpq `key=value` form
/// (spaces around `=` and quoted values included); `sslpassword` likewise.
pub fn redact_url(url: &str) -> String {
    if url.contains("://") {
        redact_uri(url)
    } else {
        redact_key_values(url)
    }
}

fn redact_uri(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = url[..scheme_end].to_owned();
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    let Some((path, query)) = tail.split_once('?') else {
        out.push_str(tail);
        return out;
    };
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query, None),
    };
    out.push_str(path);
    out.push('?');
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((key, _)) if is_secret_key(key) => format!("{key}=***"),
            _ => param.to_owned(),
        })
        .collect();
    out.push_str(&params.join("&"));
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

/// Reads `key = value` pairs as libpq does (values optionally single-quoted, with
/// backslash escapes) and prints them back with the password hidden.
fn redact_key_values(text: &str) -> String {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            pairs.push(key);
            continue;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            value.push('\'');
            while let Some(c) = chars.next() {
                value.push(c);
                match c {
                    '\\' => value.extend(chars.next()),
                    '\'' => break,
                    _ => {}
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        if is_secret_key(&key) {
            value = "***".into();
        }
        pairs.push(format!("{key}={value}"));
    }
    pairs.join(" ")
}
