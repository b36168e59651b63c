//! Ingest from NATS JetStream: one source per subject filter of the ingested
//! stream, which weir reads but never creates. A reader is an ordered push
//! consumer of its own (ephemeral, created by weir for each start, filtered to
//! its subject filter) that starts at the stream sequence after the one stored
//! in the store. It acknowledges nothing: JetStream keeps no position for it,
//! and the stored position is the only one.

use async_nats::jetstream::{self, consumer};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};

use super::message::Message;
use super::reader::{IngestBus, Transport};
use crate::connect::NatsOptions;
use crate::connect::nats_client::{connect, look_up_stream};
use crate::event::IngestSource;

/// A JetStream stream, as the ingest named `name` reads it.
pub struct NatsIngest {
    jetstream: jetstream::Context,
    stream: String,
    name: String,
}

impl NatsIngest {
    pub async fn connect(nats: &NatsOptions, stream: &str, name: &str) -> Result<Self, String> {
        let client = connect(nats, &format!("weir ingest {name}"))
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            jetstream: jetstream::new(client),
            stream: stream.to_owned(),
            name: name.to_owned(),
        })
    }
}

#[async_trait]
impl IngestBus for NatsIngest {
    async fn open(
        &self,
        source: &IngestSource,
        after: Option<u64>,
    ) -> Result<Box<dyn Transport>, String> {
        let stream = look_up_stream(&self.jetstream, &self.stream)
            .await
            .map_err(|e| format!("JetStream stream {:?}: {e}", self.stream))?;
        let deliver_policy = match after {
            None => consumer::DeliverPolicy::All,
            Some(sequence) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: sequence + 1,
            },
        };
        let consumer: consumer::Consumer<consumer::push::OrderedConfig> = stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.jetstream.client().new_inbox(),
                description: Some(format!("weir ingest {} of {}", self.name, source.key())),
                filter_subject: source.key().to_owned(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot create a consumer on {:?}: {e}", self.stream))?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| format!("cannot read from {:?}: {e}", self.stream))?;
        Ok(Box::new(NatsReader {
            messages,
            pending: Some(pending),
        }))
    }
}

struct NatsReader {
    messages: consumer::push::Ordered,
    /// Messages after the last one read, as the server last said.
    pending: Option<u64>,
}

impl NatsReader {
    fn owned(&mut self, message: &jetstream::Message) -> Result<Message, String> {
        let info = message.info().map_err(|e| e.to_string())?;
        self.pending = Some(info.pending);
        let headers = message
            .headers
            .iter()
            .flat_map(|headers| headers.iter())
            .filter_map(|(name, values)| {
                Some((name.to_string(), values.first()?.as_str().to_owned()))
            })
            .collect();
        Ok(Message {
            position: info.stream_sequence,
            subject: Some(message.subject.to_string()),
            headers,
            payload: message.payload.to_vec(),
            ..Message::default()
        })
    }
}

#[async_trait]
impl Transport for NatsReader {
    async fn next(&mut self, max: usize) -> Result<Vec<Message>, String> {
        let first = match self.messages.next().await {
            Some(Ok(message)) => message,
            Some(Err(error)) => return Err(error.to_string()),
            None => return Err("the consumer ended".into()),
        };
        let mut messages = vec![self.owned(&first)?];
        while messages.len() < max {
            match self.messages.next().now_or_never() {
                Some(Some(Ok(message))) => messages.push(self.owned(&message)?),
                _ => break,
            }
        }
        Ok(messages)
    }

    async fn lag(&mut self, _position: Option<u64>) -> Option<u64> {
        self.pending
    }
}
