//! [`connect`]: each authentication method against a private server that
//! demands it, and the first connection failing promptly with a reason an
//! operator can act on.

use std::net::TcpListener;
use std::time::Duration;

use weir::config::NatsOptions;
use weir::connect::ConnectError as Error;
use weir::connect::nats_client::connect;

use super::nats_config;
use crate::common::services::PrivateNats;

/// Connects with `config`, failing the test if that hangs.
async fn attempt(config: &NatsOptions) -> Result<async_nats::Client, Error> {
    tokio::time::timeout(Duration::from_secs(30), connect(config, "weir test"))
        .await
        .expect("connect gives up by itself")
}

async fn assert_refused(config: &NatsOptions) {
    let result = attempt(config).await;
    let error = result.expect_err("wrong credentials are refused");
    assert!(matches!(error, Error::Invalid(_)), "{error:?}");
    assert!(!error.is_retryable());
    let message = error.to_string();
    assert!(message.contains("refused the credentials"), "{message}");
}

async fn assert_works(config: &NatsOptions) {
    let client = attempt(config)
        .await
        .expect("the right credentials connect");
    client.flush().await.expect("the connection works");
}

#[tokio::test]
async fn user_and_password() {
    let Some(server) = PrivateNats::start_with(|_| {
        ["--user", "weir", "--pass", "s3cret"]
            .map(String::from)
            .to_vec()
    }) else {
        return;
    };
    let with = |user: &str, password: &str| NatsOptions {
        user: Some(user.into()),
        password: Some(password.into()),
        ..nats_config(&server.url())
    };
    assert_works(&with("weir", "s3cret")).await;
    assert_refused(&with("weir", "guess")).await;
    assert_refused(&nats_config(&server.url())).await;
}

#[tokio::test]
async fn token() {
    let Some(server) = PrivateNats::start_with(|_| ["--auth", "t0ken"].map(String::from).to_vec())
    else {
        return;
    };
    let with = |token: &str| NatsOptions {
        token: Some(token.into()),
        ..nats_config(&server.url())
    };
    assert_works(&with("t0ken")).await;
    assert_refused(&with("other")).await;
}

#[tokio::test]
async fn nkey() {
    let allowed = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let public_key = allowed.public_key();
    let Some(server) = PrivateNats::start_with(|dir| {
        let config = dir.join("auth.conf");
        std::fs::write(
            &config,
            format!("authorization {{ users = [ {{ nkey: \"{public_key}\" }} ] }}\n"),
        )
        .expect("write config");
        vec!["-c".into(), config.to_string_lossy().into_owned()]
    }) else {
        return;
    };
    let with = |key: &nkeys::KeyPair| NatsOptions {
        nkey_seed: Some(key.seed().expect("a seed")),
        ..nats_config(&server.url())
    };
    assert_works(&with(&allowed)).await;
    assert_refused(&with(&stranger)).await;

    let result = attempt(&NatsOptions {
        nkey_seed: Some("SUNOTASEED".into()),
        ..nats_config(&server.url())
    })
    .await;
    let message = result.expect_err("a broken seed").to_string();
    assert!(message.contains("nkey_seed"), "{message}");
}

#[tokio::test]
async fn a_missing_credentials_file_is_named() {
    let config = NatsOptions {
        credentials_file: Some("/nonexistent/weir.creds".into()),
        ..nats_config("nats://127.0.0.1:1")
    };
    let message = attempt(&config).await.expect_err("no file").to_string();
    assert!(message.contains("/nonexistent/weir.creds"), "{message}");
}

#[tokio::test]
async fn tls_required_of_a_plain_server_fails_with_a_tls_hint() {
    let Some(server) = PrivateNats::start() else {
        return;
    };
    let config = NatsOptions {
        tls: weir::config::NatsTls {
            required: true,
            ..Default::default()
        },
        ..nats_config(&server.url())
    };
    let result = attempt(&config).await;
    let message = result.expect_err("the server has no TLS").to_string();
    assert!(message.contains("TLS"), "{message}");
}

#[tokio::test]
async fn nobody_listening_is_unavailable_within_the_connect_timeout() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let config = nats_config(&format!("nats://127.0.0.1:{port}"));
    let result = attempt(&config).await;
    let error = result.expect_err("nothing listens");
    assert!(error.is_retryable(), "{error}");
    assert!(error.to_string().contains("127.0.0.1"), "{error}");
}

#[tokio::test]
async fn a_server_that_never_answers_does_not_hold_the_first_connect() {
    // Accepts connections (the kernel does, into the backlog) but never speaks.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("address").port();
    let config = NatsOptions {
        connect_timeout: Duration::from_secs(1),
        ..nats_config(&format!("nats://127.0.0.1:{port}"))
    };
    // `attempt` fails the test if connecting does not give up by itself.
    let error = attempt(&config).await.expect_err("no handshake");
    assert!(error.is_retryable(), "{error}");
    assert!(error.to_string().contains("handshake"), "{error}");
}

#[tokio::test]
async fn every_server_of_the_list_is_tried() {
    let Some(server) = PrivateNats::start() else {
        return;
    };
    let dead = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let config = nats_config(&format!("nats://127.0.0.1:{dead}, {}", server.url()));
    assert_works(&config).await;
}
