//! A NATS client from [`NatsOptions`]: [`connect`] (servers, authentication,
//! TLS, reconnecting), and [`subject_token`], which turns any name into one
//! subject token.

use std::borrow::Cow;
use std::time::Duration;

use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event, ServerAddr, jetstream};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use super::ConnectError;
use super::nats::{NatsOptions, redacted_url};

/// Bytes kept unchanged by [`subject_token`]: letters, digits, `-` and `_`.
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// The token of the empty string: a `%` is otherwise always followed by two hex
/// digits, so a lone one cannot be the encoding of anything else.
const EMPTY_TOKEN: &str = "%";

/// The longest wait between two attempts to reconnect to NATS. async-nats's
/// own waits double up to 4 s: a server back after a 10 s outage was reached
/// again up to 4 s later, and sinks and the bus stood still meanwhile. At
/// 500 ms the client is back at most half a second after its server, for two
/// connection attempts a second while the server is away.
const RECONNECT_DELAY_MAX: Duration = Duration::from_millis(500);

/// How long to wait before the `attempts`th attempt to reconnect: none before
/// the first, then 10 ms doubling up to [`RECONNECT_DELAY_MAX`].
fn reconnect_delay(attempts: usize) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(2)).unwrap_or(u32::MAX);
    match attempts {
        0 | 1 => Duration::ZERO,
        _ => Duration::from_millis(10)
            .saturating_mul(2_u32.saturating_pow(doublings))
            .min(RECONNECT_DELAY_MAX),
    }
}

/// `value` as one valid NATS subject token: non-empty, without `.`, `*`, `>`,
/// whitespace or anything but ASCII letters, digits, `-`, `_` and `%`. Names made
/// of `[A-Za-z0-9_-]` stay as they are; any other byte is written `%XX` (the
/// empty string is `%`). [`decode_subject_token`] reverses it.
pub fn subject_token(value: &str) -> Cow<'_, str> {
    if value.is_empty() {
        return Cow::Borrowed(EMPTY_TOKEN);
    }
    utf8_percent_encode(value, ESCAPED).into()
}

/// The string `token` encodes, or `None` if [`subject_token`] never writes it.
pub fn decode_subject_token(token: &str) -> Option<String> {
    if token == EMPTY_TOKEN {
        return Some(String::new());
    }
    if token.is_empty() {
        return None;
    }
    let decoded = percent_decode_str(token).decode_utf8().ok()?;
    // One encoding per string: lower-case hex, needless escapes or stray `%`s
    // are not tokens of ours.
    (subject_token(&decoded) == token).then(|| decoded.into_owned())
}

/// A NATS client for `config`, named `client_name` in the server's connection
/// list.
///
/// Tries every server of the comma-separated `url` once, each within
/// `connect_timeout`: if none answers, fails with [`Error::Unavailable`] rather
/// than waiting. Once connected, the client reconnects by itself, for as long
/// as it lives, whenever its server goes away.
pub async fn connect(config: &NatsOptions, client_name: &str) -> Result<Client, ConnectError> {
    let servers = config
        .url
        .split(',')
        .map(str::trim)
        .map(|server| {
            server.parse::<ServerAddr>().map_err(|error| {
                ConnectError::Invalid(format!(
                    "nats.url: {:?} is not a NATS server URL ({error}); write nats://HOST:PORT or tls://HOST:PORT",
                    redacted_url(server)
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let options = connect_options(config, client_name).await?;
    // The client bounds only the TCP connect; a server that accepts but never
    // speaks NATS would hold the handshake forever.
    let patience = config
        .connect_timeout
        .saturating_mul(u32::try_from(servers.len()).unwrap_or(u32::MAX))
        .saturating_add(Duration::from_secs(1));
    match tokio::time::timeout(patience, options.connect(servers)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(error)) => Err(connect_error(config, &error)),
        Err(_) => Err(ConnectError::Unavailable(format!(
            "no NATS server at {} completed the handshake within {}",
            redacted_url(&config.url),
            humantime::format_duration(patience)
        ))),
    }
}

/// How many times [`look_up_stream`] and [`create_stream`] ask before they
/// give up.
const STREAM_REQUESTS: usize = 3;

/// JetStream stream `name`, asked again (up to [`STREAM_REQUESTS`] times in
/// all) when no answer comes: a clustered JetStream may leave a request
/// unanswered while it places a stream, say one that another node starting at
/// the same time creates, or elects a leader. A refusal (no such stream) is
/// final.
pub async fn look_up_stream(
    jetstream: &jetstream::Context,
    name: &str,
) -> Result<jetstream::stream::Stream, jetstream::context::GetStreamError> {
    let mut asked = 1;
    loop {
        match jetstream.get_stream(name).await {
            Err(error)
                if asked < STREAM_REQUESTS
                    && matches!(
                        error.kind(),
                        jetstream::context::GetStreamErrorKind::Request
                    ) =>
            {
                tracing::info!(stream = name, %error, "no answer about the stream; asking again");
                asked += 1;
            }
            result => return result,
        }
    }
}

/// Creates the stream `config` describes, asking again as [`look_up_stream`]
/// does when no answer comes (creating a stream just as it is again changes
/// nothing). A refusal is final, but for one: JetStream may answer a create
/// racing another node's create of the same stream with "subjects overlap";
/// if the stream of that name exists now, it is the one wanted.
pub async fn create_stream(
    jetstream: &jetstream::Context,
    config: &jetstream::stream::Config,
) -> Result<jetstream::stream::Stream, jetstream::context::CreateStreamError> {
    let mut asked = 1;
    loop {
        match jetstream.create_stream(config.clone()).await {
            Err(error)
                if matches!(
                    error.kind(),
                    jetstream::context::CreateStreamErrorKind::JetStream(ref e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP
                ) =>
            {
                return match look_up_stream(jetstream, &config.name).await {
                    Ok(created) => {
                        tracing::info!(stream = %config.name, "another node created the stream at the same time");
                        Ok(created)
                    }
                    Err(_) => Err(error),
                };
            }
            Err(error)
                if asked < STREAM_REQUESTS
                    && matches!(
                        error.kind(),
                        jetstream::context::CreateStreamErrorKind::TimedOut
                    ) =>
            {
                tracing::info!(stream = %config.name, %error, "no answer to creating the stream; asking again");
                asked += 1;
            }
            result => return result,
        }
    }
}

/// Logs that the existing JetStream stream `stream` keeps its `existing` replicas
/// although `nats.replicas` asks for `configured`: weir sets replicas only on the
/// streams it creates, and changing them is the operator's call.
pub fn note_replicas(stream: &str, existing: usize, configured: usize) {
    // The server reports a stream created with 0 replicas as having 1.
    if existing.max(1) != configured.max(1) {
        tracing::warn!(
            stream,
            replicas = existing,
            nats.replicas = configured,
            "the stream exists with other replicas than nats.replicas and is left so; change them with `nats stream edit {stream} --replicas {configured}`"
        );
    }
}

/// What to add to `error`, why a stream of `replicas` copies could not be
/// created: when JetStream refused it, the cluster may have too few servers.
pub fn replicas_hint(error: &jetstream::context::CreateStreamError, replicas: usize) -> String {
    let refused = matches!(
        error.kind(),
        jetstream::context::CreateStreamErrorKind::JetStream(_)
    );
    if refused && replicas > 1 {
        format!(
            " (nats.replicas = {replicas} needs a NATS cluster with at least {replicas} JetStream servers)"
        )
    } else {
        String::new()
    }
}

async fn connect_options(
    config: &NatsOptions,
    client_name: &str,
) -> Result<ConnectOptions, ConnectError> {
    let name = client_name.to_owned();
    let mut options = ConnectOptions::new()
        .name(client_name)
        .connection_timeout(config.connect_timeout)
        // Never give up: a bus or sink without a connection is useless, and the
        // server coming back must be enough for the node to recover.
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let name = name.clone();
            async move {
                match event {
                    Event::Connected => tracing::info!(client = %name, "connected to NATS"),
                    Event::Disconnected => {
                        tracing::warn!(client = %name, "lost the NATS connection; reconnecting")
                    }
                    other => {
                        tracing::warn!(client = %name, event = %other, "NATS connection event")
                    }
                }
            }
        });
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(seed) = &config.nkey_seed {
        options = options.nkey(seed.clone());
    }
    if let Some(path) = &config.credentials_file {
        options = options.credentials_file(path).await.map_err(|error| {
            ConnectError::Invalid(format!(
                "cannot use nats.credentials_file {}: {error}; give the path of a .creds file holding a user JWT and its NKey seed",
                path.display()
            ))
        })?;
    }
    let tls = &config.tls;
    if tls.required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

fn connect_error(config: &NatsOptions, error: &async_nats::ConnectError) -> ConnectError {
    let url = redacted_url(&config.url);
    let text = error.to_string();
    // A TLS handshake gone wrong surfaces as an I/O error; retrying will not
    // mend a server that speaks no TLS or a certificate nobody trusts.
    let tls_failed = [
        "corrupt message",
        "InvalidContentType",
        "certificate",
        "handshake",
    ]
    .iter()
    .any(|hint| text.contains(hint));
    match error.kind() {
        ConnectErrorKind::Io if tls_failed => ConnectError::Invalid(format!(
            "TLS towards NATS at {url} failed ({error}): the server may not speak TLS (unset nats.tls.required and use nats:// URLs) or its certificate is not signed by nats.tls.ca_file"
        )),
        ConnectErrorKind::AuthorizationViolation => ConnectError::Invalid(format!(
            "NATS at {url} refused the credentials ({error}): check nats.user and nats.password, nats.token, nats.nkey_seed or nats.credentials_file"
        )),
        ConnectErrorKind::Authentication => ConnectError::Invalid(format!(
            "cannot authenticate to NATS at {url} ({error}): nats.nkey_seed or the seed in nats.credentials_file is not a valid user NKey seed"
        )),
        ConnectErrorKind::Tls => ConnectError::Invalid(format!(
            "TLS towards NATS at {url} failed ({error}): check nats.tls (ca_file must hold the CA that signed the server's certificate) and the server's TLS settings"
        )),
        ConnectErrorKind::ServerParse => ConnectError::Invalid(format!(
            "nats.url {url:?} is not a list of NATS server URLs ({error})"
        )),
        ConnectErrorKind::Dns
        | ConnectErrorKind::TimedOut
        | ConnectErrorKind::Io
        | ConnectErrorKind::MaxReconnects => {
            ConnectError::Unavailable(format!("cannot connect to NATS at {url}: {error}"))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reconnecting_waits_at_most_half_a_second() {
        use super::{RECONNECT_DELAY_MAX, reconnect_delay};
        use std::time::Duration;
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(10));
        assert_eq!(reconnect_delay(3), Duration::from_millis(20));
        assert!((1..100).all(|n| reconnect_delay(n) <= reconnect_delay(n + 1)));
        assert_eq!(reconnect_delay(8), RECONNECT_DELAY_MAX);
        assert_eq!(reconnect_delay(usize::MAX), RECONNECT_DELAY_MAX);
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn common_names_stay_as_they_are() {
        for name in ["orders", "order-42", "billing_v2", "A-Z_0-9"] {
            assert!(matches!(subject_token(name), Cow::Borrowed(n) if n == name));
        }
    }

    #[test]
    fn separators_and_wildcards_are_escaped() {
        assert_eq!(subject_token("a.b"), "a%2Eb");
        assert_eq!(subject_token("*"), "%2A");
        assert_eq!(subject_token(">"), "%3E");
        assert_eq!(subject_token("a b/c"), "a%20b%2Fc");
        assert_eq!(subject_token("100%"), "100%25");
        assert_eq!(subject_token("é"), "%C3%A9");
        assert_eq!(subject_token(""), "%");
    }

    #[test]
    fn foreign_tokens_do_not_decode() {
        for token in ["", "%2e", "%4", "%zz", "a%", "%41", "a.b", "%C3", "%%"] {
            assert_eq!(decode_subject_token(token), None, "{token:?}");
        }
    }

    fn is_valid_token(token: &str) -> bool {
        !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_%".contains(&b))
    }

    proptest! {
        #[test]
        fn tokens_are_valid_and_decode_to_their_value(value in any::<String>()) {
            let token = subject_token(&value);
            prop_assert!(is_valid_token(&token), "{:?} -> {:?}", value, token);
            prop_assert_eq!(decode_subject_token(&token), Some(value));
        }

        #[test]
        fn tokens_of_awkward_names_round_trip(value in "[a-z.*> /%é\u{1F600}-]{0,12}") {
            let token = subject_token(&value);
            prop_assert!(is_valid_token(&token), "{:?} -> {:?}", value, token);
            prop_assert_eq!(decode_subject_token(&token), Some(value));
        }
    }
}
