//! Integration tests of the NATS JetStream backends against a real server: the
//! allocation bus ([`bus`]), connecting and authenticating ([`connect`]) and the
//! sink ([`sink`]); and a fleet of `weir` nodes on a cluster of three servers
//! with replicated streams, one of which is restarted ([`cluster`]). The shared server is `WEIR_TEST_NATS_URL`
//! (default `nats://127.0.0.1:4222`); tests that restart a server or need
//! special settings start a private `nats-server`
//! (`common::services::PrivateNats`). Every test uses namespaces and streams of
//! its own and removes them afterwards.

mod bus;
#[cfg(feature = "postgres")]
mod cluster;
mod connect;
mod sink;

use std::time::Duration;

use weir::config::NatsOptions;

use crate::common;
pub use crate::common::nats_url;

pub fn nats_config(url: &str) -> NatsOptions {
    NatsOptions {
        url: url.into(),
        connect_timeout: Duration::from_secs(3),
        ..NatsOptions::default()
    }
}

/// A client of the shared server; `None` (after noting the skip) if it is
/// unreachable and not required.
pub async fn shared_client() -> Option<async_nats::Client> {
    common::init_logging();
    match weir::connect::nats_client::connect(&nats_config(&nats_url()), "weir tests").await {
        Ok(client) => Some(client),
        Err(error) => {
            common::service_missing("NATS", error);
            None
        }
    }
}

/// Deletes JetStream streams when dropped, so a failing test cleans up too.
pub struct StreamCleanup {
    pub url: String,
    pub streams: Vec<String>,
}

impl Drop for StreamCleanup {
    fn drop(&mut self) {
        let url = self.url.clone();
        let streams = std::mem::take(&mut self.streams);
        common::clean_up_on_drop(async move {
            let Ok(client) =
                weir::connect::nats_client::connect(&nats_config(&url), "weir test cleanup").await
            else {
                return;
            };
            let jetstream = async_nats::jetstream::new(client);
            for stream in streams {
                let _ = jetstream.delete_stream(&stream).await;
            }
        });
    }
}
