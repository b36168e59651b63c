//! One stream's side of a NATS bus subscription: an ordered consumer that is made
//! again whenever it stops delivering or the client reconnects.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures::StreamExt;
use futures::stream::BoxStream;

use super::{NatsBus, Result};

/// How often a subscription checks whether the client reconnected, which means
/// the server may have lost its consumers.
const RECONNECT_CHECK: Duration = Duration::from_secs(1);

/// One stream's side of a subscription: an ordered consumer, made again from
/// the last message delivered whenever it stops delivering (the server
/// restarted, heartbeats went missing) or the client reconnected.
pub(super) struct Feed {
    bus: NatsBus,
    stream: String,
    filter: String,
    /// Where the first consumer starts.
    first: consumer::DeliverPolicy,
    /// Messages up to this stream sequence are never delivered.
    after: u64,
    last_delivered: Option<u64>,
    messages: Option<consumer::push::Ordered>,
    /// The client's connection count when `messages` was made.
    connects: u64,
}

impl Feed {
    /// A feed of `stream`'s messages on `filter`, from `first` on, never one at
    /// or below stream sequence `after`.
    pub(super) fn new(
        bus: &NatsBus,
        stream: &str,
        filter: String,
        first: consumer::DeliverPolicy,
        after: u64,
    ) -> Self {
        Self {
            bus: bus.clone(),
            stream: stream.to_owned(),
            filter,
            first,
            after,
            last_delivered: None,
            messages: None,
            connects: 0,
        }
    }

    /// The feed as a stream of payloads, its first consumer made.
    pub(super) async fn opened(mut self) -> Result<BoxStream<'static, Vec<u8>>> {
        self.connects = self.connects();
        self.messages = Some(self.try_open().await?);
        Ok(futures::stream::unfold(self, |mut feed| async move {
            let payload = feed.next().await?;
            Some((payload, feed))
        })
        .boxed())
    }

    fn connects(&self) -> u64 {
        self.bus
            .jetstream
            .client()
            .statistics()
            .connects
            .load(Ordering::Relaxed)
    }

    async fn next(&mut self) -> Option<Vec<u8>> {
        let mut reconnect_check = tokio::time::interval(RECONNECT_CHECK);
        loop {
            let Some(messages) = self.messages.as_mut() else {
                self.open().await;
                continue;
            };
            tokio::select! {
                message = messages.next() => match message {
                    // The client has closed for good.
                    None => return None,
                    Some(Ok(message)) => {
                        let Ok(sequence) = message.info().map(|info| info.stream_sequence) else {
                            continue;
                        };
                        if sequence <= self.after || self.last_delivered.is_some_and(|last| sequence <= last) {
                            continue;
                        }
                        self.last_delivered = Some(sequence);
                        return Some(message.message.payload.to_vec());
                    }
                    Some(Err(error)) => {
                        tracing::info!(%error, stream = %self.stream, "allocation bus consumer stopped delivering; making it again");
                        self.messages = None;
                    }
                },
                _ = reconnect_check.tick() => {
                    if self.connects() != self.connects {
                        tracing::info!(stream = %self.stream, "reconnected to NATS; making the allocation bus consumer again");
                        self.messages = None;
                    }
                }
            }
        }
    }

    /// Makes the consumer, trying again until the server answers.
    async fn open(&mut self) {
        loop {
            self.connects = self.connects();
            match self.try_open().await {
                Ok(messages) => {
                    self.messages = Some(messages);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, stream = %self.stream, "cannot make the allocation bus consumer; trying again");
                    tokio::time::sleep(RECONNECT_CHECK).await;
                }
            }
        }
    }

    async fn try_open(&mut self) -> Result<consumer::push::Ordered> {
        let last_sequence = match self.bus.last_sequence(&self.stream).await {
            Ok(sequence) => sequence,
            Err(error) => {
                // The server may have come back without its streams.
                self.bus.ensure_streams().await?;
                return Err(error);
            }
        };
        if self.after.max(self.last_delivered.unwrap_or(0)) > last_sequence {
            tracing::warn!(stream = %self.stream, "the stream is newer than this subscription (it was deleted and made again); reading it from the start");
            self.after = 0;
            self.last_delivered = None;
            self.first = consumer::DeliverPolicy::All;
        }
        let deliver = match self.last_delivered {
            Some(last) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: last + 1,
            },
            None => self.first,
        };
        let (messages, _, _) = self
            .bus
            .ordered(&self.stream, self.filter.clone(), deliver)
            .await?;
        Ok(messages)
    }
}
