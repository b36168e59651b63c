//! Turns Postgres `NOTIFY` on append into [`AppendNotice`]s. One dedicated connection
//! per store LISTENs; if it drops, the listener reconnects with backoff and announces
//! [`AppendNotice::Any`], since notifications sent meanwhile are lost.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::errors::connect_failed;
use super::tls::Prepared;
use super::{classify, quote_identifier};
use crate::event::Category;
use crate::store::{AppendNotice, Error, Notifier, Result};

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The running listener; stops when dropped with its store.
pub(super) struct Listener {
    _task: AbortOnDropHandle<()>,
    stop: CancellationToken,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Messages = Pin<Box<dyn Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send>>;

/// A LISTENing connection. Polling `messages` drives the connection and yields its
/// notifications; `client` must live as long as it does.
struct Connected {
    _client: tokio_postgres::Client,
    messages: Messages,
}

impl Listener {
    /// LISTENs once before returning, so an error reaches the caller and no append
    /// after this returns goes unannounced; then keeps listening in the background.
    pub(super) async fn start(
        config: Prepared,
        channel: String,
        notifier: Notifier,
    ) -> Result<Self> {
        let connected = listen(&config, &channel).await?;
        let stop = CancellationToken::new();
        let task = crate::ambient::spawn(run(config, channel, notifier, connected, stop.clone()));
        Ok(Self {
            _task: AbortOnDropHandle::new(task),
            stop,
        })
    }
}

async fn listen(target: &Prepared, channel: &str) -> Result<Connected> {
    let (client, mut connection) = target
        .config
        .connect(target.connector.clone())
        .await
        .map_err(|e| connect_failed(e, &target.context))?;
    let mut messages: Messages = Box::pin(futures::stream::poll_fn(move |cx| {
        connection.poll_message(cx)
    }));
    let statement = format!("LISTEN {}", quote_identifier(channel));
    {
        let listening = client.batch_execute(&statement);
        tokio::pin!(listening);
        // The LISTEN completes only while the connection is polled.
        loop {
            tokio::select! {
                result = &mut listening => {
                    result.map_err(classify)?;
                    break;
                }
                message = messages.next() => match message {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(classify(error)),
                    None => return Err(Error::Unavailable("the connection closed during LISTEN".into())),
                }
            }
        }
    }
    Ok(Connected {
        _client: client,
        messages,
    })
}

async fn run(
    config: Prepared,
    channel: String,
    notifier: Notifier,
    mut connected: Connected,
    stop: CancellationToken,
) {
    loop {
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return,
                message = connected.messages.next() => message,
            };
            match message {
                Some(Ok(AsyncMessage::Notification(n))) => match Category::new(n.payload()) {
                    Ok(category) => notifier.notify(AppendNotice::Category(category)),
                    Err(_) => notifier.notify(AppendNotice::Any),
                },
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    tracing::debug!(%error, "notification connection failed");
                    break;
                }
                None => break,
            }
        }
        tracing::warn!("lost the event store's notification connection, reconnecting");
        let mut backoff = Duration::from_millis(100);
        let mut failures = 0u32;
        connected = loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            match listen(&config, &channel).await {
                Ok(connected) => {
                    if failures > 0 {
                        tracing::info!(
                            failures,
                            "restored the event store's notification connection"
                        );
                    }
                    break connected;
                }
                Err(error) => {
                    // The first failure as a warning; repeats at debug (the
                    // store's own warning and /readyz say that connections fail).
                    if failures == 0 {
                        tracing::warn!(%error, "cannot restore the notification connection; retrying quietly");
                    } else {
                        tracing::debug!(%error, "cannot restore the notification connection");
                    }
                    failures += 1;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        // Appends made while disconnected were announced to nobody.
        notifier.notify(AppendNotice::Any);
    }
}
