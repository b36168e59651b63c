//! TLS towards Postgres, with libpq's meaning of `sslmode`.
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`, and leaves
//! verification to its connector. So the TLS settings are taken out of the
//! connection string here (`sslmode`, and libpq's `sslrootcert`, `sslcert`,
//! `sslkey` and `sslpassword`), merged with `[store.tls]`, and turned into one
//! OpenSSL connector that every connection weir opens uses: the pool's, the
//! notification listener's, and so migrations' and the command line's.
//!
//! | `sslmode` | TLS | the chain checked | the host name checked |
//! |---|---|---|---|
//! | `disable` | never | — | — |
//! | `prefer` (the default, as in libpq) | when the server offers it, else plain | no | no |
//! | `require` | always | no (yes with a CA file, as libpq does) | no |
//! | `verify-ca` | always | yes | no |
//! | `verify-full` | always | yes | yes |

use std::fmt;
use std::path::{Path, PathBuf};

use openssl::pkey::PKey;
use openssl::ssl::{SslConnector, SslConnectorBuilder, SslMethod, SslVerifyMode};
use openssl::x509::X509;
use openssl::x509::store::X509StoreBuilder;
use percent_encoding::percent_decode_str;
use postgres_openssl::MakeTlsConnector;

/// `[store.tls]`: files for TLS towards Postgres. Each may also come from the
/// connection string, under libpq's name; setting one in both places is refused.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PostgresTls {
    /// PEM file of the certificate authorities to trust (libpq's `sslrootcert`);
    /// without one, `verify-ca` and `verify-full` trust the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, with any intermediates (`sslcert`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate, PKCS#8 or traditional,
    /// optionally encrypted (`sslkey`).
    pub key_file: Option<PathBuf>,
    /// The password of an encrypted `key_file` (`sslpassword`).
    pub key_password: Option<String>,
}

// Written by hand so that a logged `PostgresTls` never shows the key's password.
impl fmt::Debug for PostgresTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresTls")
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

/// libpq's `sslmode`, less `allow` (plain first, TLS if refused), which
/// tokio-postgres cannot do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(
                    "sslmode=allow is not supported: use prefer (TLS when the server offers it) or disable"
                        .into(),
                );
            }
            other => {
                return Err(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn driver_mode(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

/// A connection string made ready: the driver's configuration without the TLS
/// settings it cannot read, and the connector that applies them.
#[derive(Clone)]
pub(crate) struct Prepared {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) connector: MakeTlsConnector,
    pub(crate) context: TlsContext,
}

/// What a connection error is explained with.
#[derive(Debug, Clone)]
pub(crate) struct TlsContext {
    pub(crate) mode: SslMode,
    /// Whether the server's chain is checked (`verify-*`, or `require` with a CA file).
    pub(crate) verifies_chain: bool,
    pub(crate) ca_file: Option<PathBuf>,
    /// The hosts of the connection string, for messages.
    pub(crate) hosts: String,
}

/// The TLS keys libpq reads from a connection string, as found there.
#[derive(Default)]
struct UrlTls {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
    sslpassword: Option<String>,
}

impl UrlTls {
    /// Takes `key` if it is a TLS key; `false` leaves it in the string.
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            "sslpassword" => &mut self.sslpassword,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// Reads a connection string (a `postgres://` URL or libpq `key=value` pairs)
/// and `[store.tls]`, and builds the connector for them. Errors name the setting
/// to change.
pub(crate) fn prepare(url: &str, files: &PostgresTls) -> Result<Prepared, String> {
    let (rest, found) = take_tls_keys(url)?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| format!("is not a valid Postgres connection string: {e}"))?;
    let mode = match &found.sslmode {
        Some(value) => SslMode::parse(value)?,
        None => SslMode::default(),
    };
    config.ssl_mode(mode.driver_mode());
    let merged = merge(files, &found)?;
    // `sslrootcert=system`, as in libpq 16: the system's authorities.
    let ca_file = merged.ca_file.filter(|path| path != Path::new("system"));
    // libpq: "if a root CA file exists, sslmode=require behaves as verify-ca".
    let verifies_chain = match mode {
        SslMode::VerifyCa | SslMode::VerifyFull => true,
        SslMode::Require => ca_file.is_some(),
        SslMode::Disable | SslMode::Prefer => false,
    };
    let connector = connector(
        mode,
        verifies_chain,
        ca_file.as_deref(),
        merged.cert_file.as_deref(),
        merged.key_file.as_deref(),
        merged.key_password.as_deref(),
    )?;
    let hosts = describe_hosts(&config);
    Ok(Prepared {
        config,
        connector,
        context: TlsContext {
            mode,
            verifies_chain,
            ca_file,
            hosts,
        },
    })
}

/// Checks a connection string and `[store.tls]` without reading the files
/// they name: `sslmode`, the other keys, a certificate without its key, a
/// setting made twice. The files are read when the store is opened
/// ([`check_files`]): where a configuration is checked, they may not be
/// (a container's mounted secret, checked on a laptop).
pub fn check(url: &str, files: &PostgresTls) -> Result<(), String> {
    let (rest, found) = take_tls_keys(url)?;
    rest.parse::<tokio_postgres::Config>()
        .map_err(|e| format!("is not a valid Postgres connection string: {e}"))?;
    if let Some(value) = &found.sslmode {
        SslMode::parse(value)?;
    }
    merge(files, &found).map(drop)
}

/// Reads the files as a store that opens with them does, and checks that they
/// hold what they should (certificates, a key that `key_password` opens and
/// that belongs to the certificate); errors name the setting.
pub fn check_files(url: &str, files: &PostgresTls) -> Result<(), String> {
    prepare(url, files).map(drop)
}

fn merge(files: &PostgresTls, found: &UrlTls) -> Result<PostgresTls, String> {
    fn one<T: Clone>(
        table: &Option<T>,
        url: Option<T>,
        key: &str,
        libpq: &str,
    ) -> Result<Option<T>, String> {
        match (table, url) {
            (Some(_), Some(_)) => Err(format!(
                "sets {libpq} while [store.tls] sets {key}: keep one of them"
            )),
            (Some(value), None) => Ok(Some(value.clone())),
            (None, url) => Ok(url),
        }
    }
    let path = |value: &Option<String>| value.as_ref().map(PathBuf::from);
    let merged = PostgresTls {
        ca_file: one(
            &files.ca_file,
            path(&found.sslrootcert),
            "ca_file",
            "sslrootcert",
        )?,
        cert_file: one(
            &files.cert_file,
            path(&found.sslcert),
            "cert_file",
            "sslcert",
        )?,
        key_file: one(&files.key_file, path(&found.sslkey), "key_file", "sslkey")?,
        key_password: one(
            &files.key_password,
            found.sslpassword.clone(),
            "key_password",
            "sslpassword",
        )?,
    };
    if merged.cert_file.is_some() != merged.key_file.is_some() {
        return Err(
            "a client certificate needs its key: set both [store.tls] cert_file and key_file (or sslcert and sslkey), or neither"
                .into(),
        );
    }
    if merged.key_password.is_some() && merged.key_file.is_none() {
        return Err(
            "has a key password but no key: set [store.tls] key_file, or remove key_password"
                .into(),
        );
    }
    Ok(merged)
}

fn connector(
    mode: SslMode,
    verifies_chain: bool,
    ca_file: Option<&Path>,
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
    key_password: Option<&str>,
) -> Result<MakeTlsConnector, String> {
    let openssl = |what: &str, e: openssl::error::ErrorStack| format!("{what}: {e}");
    let mut builder = SslConnector::builder(SslMethod::tls_client())
        .map_err(|e| openssl("cannot set up OpenSSL", e))?;
    if verifies_chain {
        builder.set_verify(SslVerifyMode::PEER);
        if let Some(path) = ca_file {
            trust_only(&mut builder, path)?;
        }
    } else {
        builder.set_verify(SslVerifyMode::NONE);
    }
    if let (Some(cert), Some(key)) = (cert_file, key_file) {
        client_certificate(&mut builder, cert, key, key_password)?;
    }
    let mut connector = MakeTlsConnector::new(builder.build());
    let verify_host = mode == SslMode::VerifyFull;
    connector.set_callback(move |configuration, _host| {
        configuration.set_verify_hostname(verify_host);
        Ok(())
    });
    Ok(connector)
}

/// Trusts the authorities of `path` alone, not the system's as well: what libpq does.
fn trust_only(builder: &mut SslConnectorBuilder, path: &Path) -> Result<(), String> {
    let openssl = |what: &str, e: openssl::error::ErrorStack| format!("{what}: {e}");
    let pem = read("[store.tls] ca_file", path)?;
    let certificates = X509::stack_from_pem(&pem).map_err(|e| {
        format!(
            "[store.tls] ca_file {} holds no PEM certificate: {e}",
            path.display()
        )
    })?;
    if certificates.is_empty() {
        return Err(format!(
            "[store.tls] ca_file {} holds no PEM certificate",
            path.display()
        ));
    }
    let mut store = X509StoreBuilder::new().map_err(|e| openssl("OpenSSL", e))?;
    for certificate in certificates {
        store
            .add_cert(certificate)
            .map_err(|e| openssl("[store.tls] ca_file", e))?;
    }
    builder
        .set_verify_cert_store(store.build())
        .map_err(|e| openssl("OpenSSL", e))
}

/// Presents `cert` with its `key`, decrypted with `key_password`.
fn client_certificate(
    builder: &mut SslConnectorBuilder,
    cert: &Path,
    key: &Path,
    key_password: Option<&str>,
) -> Result<(), String> {
    builder.set_certificate_chain_file(cert).map_err(|e| {
        format!(
            "[store.tls] cert_file {} is not a readable PEM certificate: {e}",
            cert.display()
        )
    })?;
    let pem = read("[store.tls] key_file", key)?;
    // With a passphrase always, even an empty one: without, OpenSSL would ask
    // for it on the terminal.
    let private = PKey::private_key_from_pem_passphrase(&pem, key_password.unwrap_or("").as_bytes())
        .map_err(|e| match key_password {
            None => format!(
                "[store.tls] key_file {} cannot be read ({e}): if it is encrypted, set [store.tls] key_password",
                key.display()
            ),
            Some(_) => format!(
                "[store.tls] key_file {} cannot be read ({e}): check that it is a PEM private key and that [store.tls] key_password is its password",
                key.display()
            ),
        })?;
    builder
        .set_private_key(&private)
        .map_err(|e| format!("[store.tls] key_file: {e}"))?;
    builder.check_private_key().map_err(|e| {
        format!(
            "[store.tls] key_file {} is not the key of cert_file {}: {e}",
            key.display(),
            cert.display()
        )
    })
}

fn read(setting: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{setting} {} cannot be read: {e}", path.display()))
}

fn describe_hosts(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            }
        })
        .collect();
    if hosts.is_empty() {
        "the server".into()
    } else {
        hosts.join(",")
    }
}

/// Explains a failed connection attempt when TLS, or its absence, is the
/// cause: what went wrong and which setting to change. `None` for other errors.
pub(crate) fn explain(error: &tokio_postgres::Error, context: &TlsContext) -> Option<String> {
    let hosts = &context.hosts;
    let mode = context.mode.as_str();
    if let Some(db) = error.as_db_error() {
        // pg_hba.conf has only `hostssl` lines for this client.
        if db.code() == &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            && db.message().contains("no encryption")
        {
            return Some(format!(
                "{hosts} accepts only TLS connections from here ({}), and sslmode={mode} connected without: set sslmode=verify-full (with [store.tls] ca_file) or require in [store] url",
                db.message()
            ));
        }
        return None;
    }
    let text = full_text(error);
    if !text.contains("TLS") && !text.contains("SSL") && !text.contains("certificate") {
        return None;
    }
    if text.contains("server does not support TLS") {
        return Some(format!(
            "{hosts} does not accept TLS connections, and sslmode={mode} insists on TLS: turn on ssl on the server, or set sslmode=prefer or disable in [store] url"
        ));
    }
    let ca = match &context.ca_file {
        Some(path) => format!("[store.tls] ca_file ({})", path.display()),
        None => "the system's certificate authorities (no [store.tls] ca_file is set)".into(),
    };
    if text.contains("hostname mismatch") || text.contains("IP address mismatch") {
        return Some(format!(
            "the certificate of {hosts} does not name the host weir connected to (sslmode={mode} checks it): connect by a name the certificate holds (in [store] url), or set sslmode=verify-ca to check only the chain; {text}"
        ));
    }
    if context.verifies_chain && text.contains("certificate verify failed") {
        return Some(format!(
            "the certificate of {hosts} is not signed by {ca} (sslmode={mode} checks the chain): set [store.tls] ca_file to the authority that signed the server's certificate; {text}"
        ));
    }
    Some(format!(
        "the TLS handshake with {hosts} failed (sslmode={mode}): check sslmode in [store] url and the [store.tls] files; {text}"
    ))
}

/// The error and every cause below it, as one line.
fn full_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// Splits libpq's TLS keys off a connection string, leaving the rest for the driver.
fn take_tls_keys(url: &str) -> Result<(String, UrlTls), String> {
    let mut found = UrlTls::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), found));
        };
        let mut kept = Vec::new();
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let decode = |s: &str| {
                percent_decode_str(s)
                    .decode_utf8()
                    .map(|v| v.into_owned())
                    .map_err(|e| format!("is not a valid Postgres connection string: {e}"))
            };
            if !found.take(&decode(key)?, decode(value)?) {
                kept.push(param);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, found));
    }
    let mut kept = Vec::new();
    for (key, raw, value) in key_values(url)? {
        if !found.take(&key, value) {
            kept.push(format!("{key}={raw}"));
        }
    }
    Ok((kept.join(" "), found))
}

/// libpq's `key = value` pairs: each key, its value as written, and its value
/// unquoted.
fn key_values(text: &str) -> Result<Vec<(String, String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            return Err(format!(
                "is not a valid Postgres connection string: {key:?} has no value"
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut raw = String::new();
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            raw.push('\'');
            loop {
                match chars.next() {
                    Some('\\') => {
                        raw.push('\\');
                        if let Some(c) = chars.next() {
                            raw.push(c);
                            value.push(c);
                        }
                    }
                    Some('\'') => {
                        raw.push('\'');
                        break;
                    }
                    Some(c) => {
                        raw.push(c);
                        value.push(c);
                    }
                    None => {
                        return Err(format!(
                            "is not a valid Postgres connection string: the value of {key} has no closing quote"
                        ));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    raw.push(c);
                    if let Some(next) = chars.next() {
                        raw.push(next);
                        value.push(next);
                    }
                } else {
                    raw.push(c);
                    value.push(c);
                }
            }
        }
        pairs.push((key, raw, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, UrlTls) {
        take_tls_keys(url).unwrap()
    }

    #[test]
    fn url_keys_are_taken_and_the_rest_kept() {
        let (rest, found) = split(
            "postgres://u:p@db.example.com:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(
            rest,
            "postgres://u:p@db.example.com:5432/app?application_name=x"
        );
        assert_eq!(found.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(found.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        let (rest, _) = split("postgresql://h/db?sslmode=require");
        assert_eq!(rest, "postgresql://h/db");
        let (rest, found) = split("postgres://h/db");
        assert_eq!(rest, "postgres://h/db");
        assert!(found.sslmode.is_none());
    }

    #[test]
    fn key_value_keys_are_taken_and_the_rest_kept() {
        let (rest, found) = split(
            "host=db port=5432 sslmode = verify-ca password='it\\'s' sslkey='/k ey.pem' sslpassword=s\\ cret",
        );
        assert_eq!(rest, "host=db port=5432 password='it\\'s'");
        assert_eq!(found.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(found.sslkey.as_deref(), Some("/k ey.pem"));
        assert_eq!(found.sslpassword.as_deref(), Some("s cret"));
    }

    #[test]
    fn modes_follow_libpq() {
        let none = PostgresTls::default();
        let mode =
            |url: &str| prepare(url, &none).map(|p| (p.context.mode, p.context.verifies_chain));
        assert_eq!(mode("postgres://h/db"), Ok((SslMode::Prefer, false)));
        assert_eq!(
            mode("postgres://h/db?sslmode=disable"),
            Ok((SslMode::Disable, false))
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=require"),
            Ok((SslMode::Require, false))
        );
        assert_eq!(
            mode("host=h sslmode=verify-ca"),
            Ok((SslMode::VerifyCa, true))
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=verify-full"),
            Ok((SslMode::VerifyFull, true))
        );
        assert!(
            mode("postgres://h/db?sslmode=allow")
                .unwrap_err()
                .contains("prefer")
        );
        assert!(
            mode("postgres://h/db?sslmode=strict")
                .unwrap_err()
                .contains("verify-full")
        );
        let prepared = prepare("postgres://h/db?sslmode=verify-full", &none).unwrap();
        assert_eq!(
            prepared.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn a_setting_in_both_places_is_refused() {
        let files = PostgresTls {
            ca_file: Some("/a.pem".into()),
            ..PostgresTls::default()
        };
        let error = merge(
            &files,
            &UrlTls {
                sslrootcert: Some("/b.pem".into()),
                ..UrlTls::default()
            },
        )
        .unwrap_err();
        assert!(
            error.contains("sslrootcert") && error.contains("ca_file"),
            "{error}"
        );
        let error = merge(
            &PostgresTls {
                cert_file: Some("/c.pem".into()),
                ..PostgresTls::default()
            },
            &UrlTls::default(),
        )
        .unwrap_err();
        assert!(error.contains("key_file"), "{error}");
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let files = PostgresTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..PostgresTls::default()
        };
        let error = prepare("postgres://h/db?sslmode=verify-full", &files)
            .err()
            .unwrap();
        assert!(
            error.contains("[store.tls] ca_file /nonexistent/ca.pem"),
            "{error}"
        );
    }

    #[test]
    fn debug_hides_the_key_password() {
        let files = PostgresTls {
            key_password: Some("hunter2".into()),
            ..PostgresTls::default()
        };
        assert!(!format!("{files:?}").contains("hunter2"));
    }
}
