//! [`NatsBus`]: the allocation bus on NATS JetStream, plus what the NATS sink
//! shares with it: [`connect`] (servers, authentication, TLS, reconnecting) and
//! [`subject_token`], which turns any name into one subject token.
//!
//! # Layout
//!
//! For `bus.namespace = N` (`NS` is `N` upper-cased, `G` the group name passed
//! through [`subject_token`]):
//!
//! | stream | subjects | kept |
//! |---|---|---|
//! | `NS_DECISIONS` | `N.decisions.G.EPOCH.REVISION.PARTS.PART`, `N.decisions.G.EPOCH.REVISION.delta` | one message per subject, file storage |
//! | `NS_SIGNALS` | `N.signals.G` (signals and digests) | `bus.signal_retention`, file storage |
//!
//! A decision's version and part numbers are part of its subjects. Publishing a
//! newer whole decision adds its parts beside the old ones and only then purges
//! the older versions (parts and deltas), so a group always has a complete
//! decision stored even if a publish fails half way; and a decision of 3 parts
//! followed by one of 2 leaves no third part behind to confuse readers. A delta
//! ([`super::chain`]) is stored only on top of the version this bus stored last.
//! Readers take the newest complete decision per group, so leftovers of a failed
//! purge do no harm either.
//!
//! A subscription is two ordered consumers: one delivering the last message of
//! every decision subject and then new ones, one delivering signals published
//! after it started. Ordered consumers recreate themselves from the last stream
//! sequence they delivered when the server restarts, so no decision is lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures::stream::PollNext;
use futures::{StreamExt, TryStreamExt};

use super::BusConfig;
use super::chain::{Chain, Publication};
use super::message::{BusMessage, Decision, DecisionReader, Digest, Frame, decode_frame, encode};
use super::{AllocationBus, BusMeter, BusSubscription, Error, Result};
use crate::connect::NatsOptions;
use crate::connect::nats_client::{
    connect, create_stream, look_up_stream, note_replicas, replicas_hint, subject_token,
};
use crate::metrics;
use feed::Feed;
use reconcile::reconcile;
use stored::{StoredVersion, delta_version};

/// How long a JetStream request (stream info, publish acknowledgement, purge)
/// may take before the server counts as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the readiness check waits for the server's answer to a ping.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`NatsBus::retained`] may take to read every retained decision.
const RETAINED_TIMEOUT: Duration = Duration::from_secs(15);

/// The payload limit assumed until the server says otherwise: NATS's default.
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// The allocation bus on NATS JetStream. Clones share one connection.
#[derive(Clone, Debug)]
pub struct NatsBus {
    jetstream: jetstream::Context,
    namespace: String,
    signal_retention: Duration,
    decisions_stream: String,
    signals_stream: String,
    /// Copies of each stream this bus creates.
    replicas: usize,
    meter: Arc<BusMeter>,
    /// Per group, the decision this bus wrote last and the deltas since its
    /// snapshot: what the next decision may be written as a change to.
    chains: Arc<Mutex<HashMap<String, Chain>>>,
}

impl NatsBus {
    /// Connects with `nats` and sets up `bus.namespace`'s streams.
    pub async fn connect(nats: &NatsOptions, bus: &BusConfig) -> Result<NatsBus> {
        let client = connect(nats, &format!("weir bus {}", bus.namespace)).await?;
        Self::from_client_replicated(client, bus, nats.replicas).await
    }

    /// [`NatsBus::from_client_replicated`] with one copy of each stream it creates.
    pub async fn from_client(client: Client, bus: &BusConfig) -> Result<NatsBus> {
        Self::from_client_replicated(client, bus, 1).await
    }

    /// A bus over an existing client. Creates the namespace's streams with
    /// `replicas` copies when they are missing and brings their retention
    /// settings up to date (never their replicas); fails if a stream of that
    /// name exists with other subjects or another storage type.
    pub async fn from_client_replicated(
        client: Client,
        bus: &BusConfig,
        replicas: usize,
    ) -> Result<NatsBus> {
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client);
        let namespace = bus.namespace.clone();
        let upper = namespace.to_uppercase();
        let this = NatsBus {
            jetstream,
            decisions_stream: format!("{upper}_DECISIONS"),
            signals_stream: format!("{upper}_SIGNALS"),
            namespace,
            signal_retention: bus.signal_retention,
            replicas,
            meter: BusMeter::new(),
            chains: Arc::default(),
        };
        this.ensure_streams().await?;
        Ok(this)
    }

    /// The names of the decisions stream and the signals stream.
    pub fn stream_names(&self) -> [&str; 2] {
        [&self.decisions_stream, &self.signals_stream]
    }

    /// Payloads dropped because they did not decode, over all subscriptions and
    /// [`NatsBus::retained`] calls.
    pub fn invalid_messages(&self) -> u64 {
        self.meter.invalid().load(Ordering::Relaxed)
    }

    /// The counter behind [`NatsBus::invalid_messages`].
    pub fn invalid_counter(&self) -> Arc<AtomicU64> {
        self.meter.invalid()
    }

    fn decisions_config(&self) -> stream::Config {
        stream::Config {
            name: self.decisions_stream.clone(),
            description: Some(format!(
                "weir allocation decisions of namespace {}",
                self.namespace
            )),
            subjects: vec![format!("{}.decisions.>", self.namespace)],
            max_messages_per_subject: 1,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    async fn ensure_streams(&self) -> Result<()> {
        self.ensure_stream(self.decisions_config()).await?;
        self.ensure_stream(self.signals_config()).await
    }

    fn signals_config(&self) -> stream::Config {
        stream::Config {
            name: self.signals_stream.clone(),
            description: Some(format!(
                "weir membership and handover signals of namespace {}",
                self.namespace
            )),
            subjects: vec![format!("{}.signals.>", self.namespace)],
            max_age: self.signal_retention,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    /// Creates the stream `wanted` describes, or updates an existing one's limits.
    async fn ensure_stream(&self, wanted: stream::Config) -> Result<()> {
        // Two nodes starting together may both find it missing; the loser of the
        // race finds it on its second look.
        for _ in 0..2 {
            match look_up_stream(&self.jetstream, &wanted.name).await {
                Ok(mut existing) => {
                    let info = existing
                        .info()
                        .await
                        .map_err(|e| request_error("read the stream", &wanted.name, e))?;
                    note_replicas(&wanted.name, info.config.num_replicas, self.replicas);
                    return match reconcile(&info.config, &wanted).map_err(Error::Backend)? {
                        None => Ok(()),
                        Some(updated) => {
                            self.jetstream
                                .update_stream(&updated)
                                .await
                                .map_err(|e| request_error("update the stream", &wanted.name, e))?;
                            tracing::info!(stream = %wanted.name, "updated the stream's limits to what the bus needs");
                            Ok(())
                        }
                    };
                }
                Err(error) if is_stream_not_found(&error) => {}
                Err(error) => return Err(request_error("look up the stream", &wanted.name, error)),
            }
            match create_stream(&self.jetstream, &wanted).await {
                Ok(_) => {
                    tracing::info!(stream = %wanted.name, subjects = ?wanted.subjects, "created the stream");
                    return Ok(());
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        jetstream::context::CreateStreamErrorKind::JetStream(ref e)
                            if e.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST
                    ) => {}
                Err(error) => {
                    let error = format!("{error}{}", replicas_hint(&error, self.replicas));
                    return Err(request_error("create the stream", &wanted.name, error));
                }
            }
        }
        Err(Error::Backend(format!(
            "stream {} is being created and deleted at the same time by someone else",
            wanted.name
        )))
    }

    fn max_payload(&self) -> usize {
        match self.jetstream.client().server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            limit => limit,
        }
    }

    fn group_prefix(&self, group: &str) -> String {
        format!("{}.decisions.{}", self.namespace, subject_token(group))
    }

    /// The decision versions stored for the group whose subjects start with
    /// `prefix`.
    async fn stored_versions(&self, prefix: &str) -> Result<BTreeMap<(u64, u64), StoredVersion>> {
        let stream = self
            .jetstream
            .get_stream_no_info(&self.decisions_stream)
            .await
            .map_err(|e| request_error("look up the stream", &self.decisions_stream, e))?;
        let mut subjects = stream
            .info_with_subjects(format!("{prefix}.>"))
            .await
            .map_err(|e| request_error("list the subjects of", &self.decisions_stream, e))?;
        let mut versions: BTreeMap<(u64, u64), StoredVersion> = BTreeMap::new();
        while let Some((subject, _)) = subjects
            .try_next()
            .await
            .map_err(|e| request_error("list the subjects of", &self.decisions_stream, e))?
        {
            let numbers: Option<Vec<u64>> = subject
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|rest| {
                    rest.split('.')
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .ok()
                });
            let (version, parts) = match numbers.as_deref() {
                Some(&[epoch, revision, parts, _part]) => ((epoch, revision), Some(parts)),
                _ => match delta_version(prefix, &subject) {
                    Some(version) => (version, None),
                    None => continue,
                },
            };
            let stored = versions.entry(version).or_default();
            match parts {
                Some(parts) => stored.parts = Some(parts),
                None => stored.delta = true,
            }
            stored.subjects.push(subject);
        }
        Ok(versions)
    }

    /// Stores `decision`, as a change where the chain allows and not `whole`.
    async fn publish_decision(&self, decision: &Decision, whole: bool) -> Result<()> {
        // Forgotten until this publication succeeds: after a failure the next one
        // is a snapshot, whatever the stream holds.
        let chain = self.chains().remove(&decision.group).filter(|_| !whole);
        let prefix = self.group_prefix(&decision.group);
        let mut stored = self.stored_versions(&prefix).await?;
        let version = decision.version();
        if let Some(newer) = self.readable_newer(decision, &mut stored).await? {
            // Like every bus: a stale decision changes nothing. The coordinator
            // sees the newer one on its subscription and moves its epoch above it.
            tracing::warn!(
                group = %decision.group, epoch = decision.epoch, revision = decision.revision,
                stored_epoch = newer.0, stored_revision = newer.1,
                "a newer decision is stored; this one is not"
            );
            return Ok(());
        }
        let stored_as_wanted = match whole {
            true => StoredVersion::is_snapshot,
            false => StoredVersion::is_whole,
        };
        if stored.get(&version).is_some_and(stored_as_wanted) {
            // Already stored whole: publishing it again changes nothing.
            if let Some(chain) = chain.filter(|chain| chain.decision.version() == version) {
                self.chains().insert(decision.group.clone(), chain);
            }
            return Ok(());
        }
        // A change is written only on top of the very decision this bus wrote last.
        let newest_stored = stored
            .iter()
            .rev()
            .find(|(_, stored)| stored.is_whole())
            .map(|(version, _)| *version);
        let chain = chain.filter(|chain| Some(chain.decision.version()) == newest_stored);
        let limit = self.max_payload();
        let publication = Chain::plan(chain.as_ref(), decision, limit);
        let payloads = publication.payloads();
        if let Some(size) = payloads.iter().map(Vec::len).find(|size| *size > limit) {
            return Err(Error::TooLarge { size, limit });
        }
        let parts = payloads.len();
        let mut acks = Vec::with_capacity(parts);
        let (epoch, revision) = version;
        for (part, payload) in (1..).zip(payloads) {
            let subject = match publication {
                Publication::Snapshot(_) => format!("{prefix}.{epoch}.{revision}.{parts}.{part}"),
                Publication::Delta(_) => format!("{prefix}.{epoch}.{revision}.delta"),
            };
            acks.push(self.send(subject, payload.clone()).await?);
        }
        for ack in acks {
            ack.await.map_err(|e| self.publish_error(e))?;
            metrics::bus_message(publication.kind(), "sent");
        }
        if let Publication::Snapshot(_) = publication {
            // Older versions, and this version's change if it was stored as one.
            let superseded: Vec<String> = stored
                .range(..=version)
                .flat_map(|(_, stored)| stored.subjects.iter())
                .filter(|subject| {
                    !subject.starts_with(&format!("{prefix}.{epoch}.{revision}.{parts}."))
                })
                .cloned()
                .collect();
            self.remove(&superseded).await;
        }
        let chain = Chain::after(chain, decision, &publication);
        self.chains().insert(decision.group.clone(), chain);
        Ok(())
    }

    fn chains(&self) -> std::sync::MutexGuard<'_, HashMap<String, Chain>> {
        // Nothing panics while the lock is held, so a poisoned map is still whole.
        self.chains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes the decision `digest` names again if the stream lost it (it was
    /// deleted and made again) and this bus wrote it.
    async fn restore(&self, digest: &Digest) -> Result<()> {
        let written = self.chains().get(&digest.group).cloned();
        let Some(chain) = written.filter(|chain| chain.decision.version() == digest.version())
        else {
            return Ok(());
        };
        let stored = self
            .stored_versions(&self.group_prefix(&digest.group))
            .await?;
        if stored
            .get(&digest.version())
            .is_some_and(StoredVersion::is_whole)
        {
            return Ok(());
        }
        tracing::warn!(group = %digest.group, "the stream lost the group's decision; publishing it again");
        self.chains().remove(&digest.group);
        self.publish_decision(&chain.decision, false).await
    }

    /// The newest readable stored version newer than `decision`, if any. Newer
    /// versions that do not read as a decision of the group (garbage, or a payload
    /// whose subject claims another version) are removed and counted as invalid:
    /// nothing unreadable may stop a leader from publishing.
    async fn readable_newer(
        &self,
        decision: &Decision,
        stored: &mut BTreeMap<(u64, u64), StoredVersion>,
    ) -> Result<Option<(u64, u64)>> {
        let newer: Vec<(u64, u64)> = stored
            .range((
                std::ops::Bound::Excluded(decision.version()),
                std::ops::Bound::Unbounded,
            ))
            .map(|(version, _)| *version)
            .collect();
        for version in newer.into_iter().rev() {
            let Some(found) = stored.remove(&version) else {
                continue;
            };
            if self.reads_as(&decision.group, version, &found).await? {
                return Ok(Some(version));
            }
            count_invalid(
                &self.meter.invalid(),
                &format!(
                    "decision subjects {:?} do not hold decision {}.{} of group {}; removed",
                    found.subjects, version.0, version.1, decision.group
                ),
            );
            self.remove(&found.subjects).await;
        }
        Ok(None)
    }

    /// Whether the first stored part of `found` is part of decision `version` of
    /// `group`.
    async fn reads_as(
        &self,
        group: &str,
        version: (u64, u64),
        found: &StoredVersion,
    ) -> Result<bool> {
        let stream = self
            .jetstream
            .get_stream_no_info(&self.decisions_stream)
            .await
            .map_err(|e| request_error("look up the stream", &self.decisions_stream, e))?;
        for subject in &found.subjects {
            let message = stream
                .get_last_raw_message_by_subject(subject)
                .await
                .map_err(|e| request_error("read a decision from", &self.decisions_stream, e))?;
            let readable = match decode_frame(&message.payload) {
                Ok(Frame::Decision(part)) => {
                    part.decision.group == group && part.decision.version() == version
                }
                Ok(Frame::Delta(delta)) => delta.group == group && delta.version() == version,
                _ => false,
            };
            if !readable {
                return Ok(false);
            }
        }
        Ok(!found.subjects.is_empty())
    }

    async fn send(
        &self,
        subject: String,
        payload: Vec<u8>,
    ) -> Result<jetstream::context::PublishAckFuture> {
        self.jetstream
            .publish(subject, payload.into())
            .await
            .map_err(|e| self.publish_error(e))
    }

    /// Deletes the messages of superseded decisions, one by one: purging by
    /// subject would be one request, but makes consumers of older servers stop
    /// delivering. Leftovers do no harm (readers keep the newest decision), so a
    /// failure is only worth a warning; the next decision removes them.
    async fn remove(&self, subjects: &[String]) {
        let stream = match self
            .jetstream
            .get_stream_no_info(&self.decisions_stream)
            .await
        {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "could not remove superseded decisions");
                return;
            }
        };
        for subject in subjects {
            let result = async {
                let message = stream.get_last_raw_message_by_subject(subject).await?;
                stream.delete_message(message.sequence).await?;
                Ok::<_, async_nats::Error>(())
            }
            .await;
            if let Err(error) = result {
                tracing::warn!(%error, subject, "could not remove a superseded decision part");
            }
        }
    }

    fn publish_error(&self, error: jetstream::context::PublishError) -> Error {
        use jetstream::context::PublishErrorKind;
        match error.kind() {
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => Error::Unavailable(
                format!("JetStream did not acknowledge a bus message ({error})"),
            ),
            PublishErrorKind::StreamNotFound => Error::Unavailable(format!(
                "no JetStream stream stores the bus's subjects ({error}): streams {} and {} are missing; restart the node to create them",
                self.decisions_stream, self.signals_stream
            )),
            _ => Error::Backend(format!("JetStream refused a bus message: {error}")),
        }
    }

    /// An ordered consumer of `stream` from `deliver`, with how many messages it
    /// has to deliver so far and its name.
    ///
    /// A push consumer: unlike the pull kind, it recreates itself as soon as
    /// the connection comes back, rather than after missing heartbeats for up to
    /// a minute.
    async fn ordered(
        &self,
        stream: &str,
        filter: String,
        deliver: consumer::DeliverPolicy,
    ) -> Result<(consumer::push::Ordered, u64, String)> {
        let consumer: consumer::Consumer<consumer::push::OrderedConfig> = self
            .jetstream
            .create_consumer_on_stream(
                consumer::push::OrderedConfig {
                    deliver_subject: self.jetstream.client().new_inbox(),
                    description: Some(format!("weir allocation bus {}", self.namespace)),
                    filter_subject: filter,
                    deliver_policy: deliver,
                    ..Default::default()
                },
                stream,
            )
            .await
            .map_err(|e| request_error("create a consumer on", stream, e))?;
        let pending = consumer.cached_info().num_pending;
        let name = consumer.cached_info().name.clone();
        let messages = consumer
            .messages()
            .await
            .map_err(|e| request_error("read from", stream, e))?;
        Ok((messages, pending, name))
    }

    async fn last_sequence(&self, stream: &str) -> Result<u64> {
        let info = self
            .jetstream
            .get_stream(stream)
            .await
            .map_err(|e| request_error("read the stream", stream, e))?;
        Ok(info.cached_info().state.last_sequence)
    }
}

/// Whether `error` says that the stream does not exist.
fn is_stream_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// A failed JetStream request: unreachable servers are worth retrying, refusals
/// are not.
fn request_error(what: &str, stream: &str, error: impl std::fmt::Display) -> Error {
    let text = error.to_string();
    let unreachable = [
        "timed out",
        "no responders",
        "jetstream unavailable",
        "request error",
        "broken pipe",
    ];
    if unreachable.iter().any(|hint| text.contains(hint)) {
        Error::Unavailable(format!("cannot {what} {stream}: {text}"))
    } else {
        Error::Backend(format!("cannot {what} {stream}: {text}"))
    }
}

impl NatsBus {
    async fn publish_once(&self, message: &BusMessage) -> Result<()> {
        match message {
            BusMessage::Decision(decision) => self.publish_decision(decision, false).await,
            BusMessage::Signal(_) | BusMessage::Digest(_) => {
                let (kind, group) = match message {
                    BusMessage::Digest(digest) => ("digest", digest.group.as_str()),
                    BusMessage::Signal(signal) => ("signal", signal.group()),
                    BusMessage::Decision(_) => unreachable!("matched above"),
                };
                let payload = encode(message);
                let limit = self.max_payload();
                if payload.len() > limit {
                    return Err(Error::TooLarge {
                        size: payload.len(),
                        limit,
                    });
                }
                // Digests travel with the signals: news for those listening now.
                let subject = format!("{}.signals.{}", self.namespace, subject_token(group));
                self.send(subject, payload)
                    .await?
                    .await
                    .map_err(|e| self.publish_error(e))?;
                metrics::bus_message(kind, "sent");
                if let BusMessage::Digest(digest) = message {
                    self.restore(digest).await?;
                }
                Ok(())
            }
        }
    }

    /// Whether a stream of the bus is gone, e.g. deleted by hand or lost with a
    /// server's storage.
    async fn streams_missing(&self) -> bool {
        for name in [&self.decisions_stream, &self.signals_stream] {
            if let Err(error) = self.jetstream.get_stream(name).await {
                if is_stream_not_found(&error) {
                    return true;
                }
            }
        }
        false
    }
}

#[async_trait]
impl AllocationBus for NatsBus {
    /// The client's connection state, then one round trip (a ping): cheap enough
    /// to poll, and it fails while the server is unreachable.
    async fn check(&self) -> Result<()> {
        let client = self.jetstream.client();
        if client.connection_state() != async_nats::connection::State::Connected {
            return Err(Error::Unavailable(format!(
                "not connected to NATS ({:?}); the client keeps reconnecting",
                client.connection_state()
            )));
        }
        tokio::time::timeout(CHECK_TIMEOUT, client.flush())
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "NATS did not answer a ping within {} s",
                    CHECK_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|error| Error::Unavailable(format!("NATS did not answer a ping: {error}")))
    }

    async fn publish(&self, message: &BusMessage) -> Result<()> {
        match self.publish_once(message).await {
            Err(error) if self.streams_missing().await => {
                tracing::warn!(%error, "the allocation bus's streams are gone; making them again");
                self.ensure_streams().await?;
                self.publish_once(message).await
            }
            result => result,
        }
    }

    async fn publish_whole(&self, decision: &Decision) -> Result<()> {
        self.publish_decision(decision, true).await
    }

    async fn subscribe(&self) -> Result<BusSubscription> {
        let decisions = Feed::new(
            self,
            &self.decisions_stream,
            format!("{}.decisions.>", self.namespace),
            consumer::DeliverPolicy::LastPerSubject,
            0,
        );
        // Signals from before the subscription are not delivered, also not if
        // the consumer has to start over after a server restart.
        let signals_after = self.last_sequence(&self.signals_stream).await?;
        let signals = Feed::new(
            self,
            &self.signals_stream,
            format!("{}.signals.>", self.namespace),
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: signals_after + 1,
            },
            signals_after,
        );
        // The first consumers are made here, so that failing to is the
        // caller's to see; later ones by the feeds themselves.
        let (decisions, signals) = (decisions.opened().await?, signals.opened().await?);
        // Retained decisions first, as far as they are there to be read.
        let payloads =
            futures::stream::select_with_strategy(decisions, signals, |_: &mut ()| PollNext::Left);
        Ok(BusSubscription::new(
            payloads.boxed(),
            Arc::clone(&self.meter),
        ))
    }

    async fn retained(&self) -> Result<Vec<Decision>> {
        let (mut messages, mut pending, name) = self
            .ordered(
                &self.decisions_stream,
                format!("{}.decisions.>", self.namespace),
                consumer::DeliverPolicy::LastPerSubject,
            )
            .await?;
        let mut reader = DecisionReader::new();
        let reading = async {
            while pending > 0 {
                let Some(message) = messages.next().await else {
                    return Err(Error::Closed);
                };
                let message = match message {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::debug!(%error, "reading retained decisions; carrying on");
                        continue;
                    }
                };
                pending = message.info().map(|info| info.pending).unwrap_or(0);
                match decode_frame(&message.payload) {
                    // The reader keeps the newest decision of every group.
                    Ok(frame @ (Frame::Decision(_) | Frame::Delta(_))) => {
                        reader.push(frame);
                    }
                    Ok(Frame::Signal(_) | Frame::Digest(_)) => {
                        count_invalid(&self.meter.invalid(), "a signal among decisions")
                    }
                    Err(error) => count_invalid(&self.meter.invalid(), &error.to_string()),
                }
            }
            Ok(())
        };
        let read = tokio::time::timeout(RETAINED_TIMEOUT, reading).await;
        drop(messages);
        if let Err(error) = self
            .jetstream
            .delete_consumer_from_stream(&name, &self.decisions_stream)
            .await
        {
            tracing::debug!(%error, consumer = %name, "could not delete a consumer; the server drops it once idle");
        }
        match read {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "reading the retained decisions from {} took longer than {}",
                    self.decisions_stream,
                    humantime::format_duration(RETAINED_TIMEOUT)
                )));
            }
        }
        Ok(reader.into_decisions())
    }
}

/// Counts a payload read outside a subscription (retained reads, publishing) that
/// cannot be read. Only for the bus's own count: the node's metric is the
/// subscriptions' to count, which see the same payload.
fn count_invalid(invalid: &AtomicU64, why: &str) {
    invalid.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        error = why,
        "dropped an allocation bus message that cannot be read"
    );
}

mod feed;
mod reconcile;
mod stored;

#[cfg(test)]
mod tests;
