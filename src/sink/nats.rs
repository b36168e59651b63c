//! [`NatsSink`]: publishes each event to a JetStream subject rendered from a
//! template (the sink's own, or a route's), and acknowledges a batch only once
//! JetStream has stored all of it.
//!
//! In weir's own format the body is the stored event as JSON, the same object
//! `weir read` prints. Headers carry what subscribers filter on without parsing
//! the body: `Nats-Msg-Id` (the event id, so JetStream drops a republished event
//! within the stream's duplicate window), `Weir-Event-Id` (the same id, under the
//! name the Kafka sink uses and ingest reads), `Weir-Event-Name`, `Weir-Category`,
//! `Weir-Stream`, `Weir-Position`, `Weir-Sequence` and
//! `Content-Type: application/json`. In the CloudEvents formats (see
//! [`super::cloudevents`]) those headers stay; binary mode adds `ce-` headers
//! (the NATS binding's binary mode, which only its working draft defines) and
//! sends the payload as the body, structured mode (the released binding) sends
//! the envelope with `Content-Type: application/cloudevents+json;
//! charset=UTF-8`.
//!
//! When consecutive events of one stream go to different subjects (routes), the
//! later one is published only once JetStream has acknowledged the earlier: a
//! stream's events are stored in order even across subjects.
//!
//! Publishes are pipelined: up to `max_in_flight` wait for their acknowledgement
//! at once. A batch's acknowledgements come back to one inbox subscription, an
//! event's index at the end of its reply subject, which costs far less per
//! event than a request each; a failure names the first event JetStream did not
//! store, so the consumer's checkpoint never passes it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap, HeaderName, HeaderValue, StatusCode};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::FuturesOrdered;

use super::cloudevents::{self, CloudEvents, Format};
use super::route::{Routed, Router, count_unrouted, unrouted};
use super::{SinkContext, SinkError, Template};
use crate::connect::NatsOptions;
use crate::connect::nats_client::{
    connect, create_stream, look_up_stream, note_replicas, replicas_hint, subject_token,
};
use crate::consumer::processor::KIND_TOO_LARGE;
use crate::consumer::{EventProcessor, ProcessError};
use crate::event::StoredEvent;
use crate::metrics;

/// How long JetStream may take to acknowledge a publish before the event counts
/// as not delivered.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

const EVENT_ID: HeaderName = HeaderName::from_static("Weir-Event-Id");
const EVENT_NAME: HeaderName = HeaderName::from_static("Weir-Event-Name");
const CATEGORY: HeaderName = HeaderName::from_static("Weir-Category");
const STREAM: HeaderName = HeaderName::from_static("Weir-Stream");
const POSITION: HeaderName = HeaderName::from_static("Weir-Position");
const SEQUENCE: HeaderName = HeaderName::from_static("Weir-Sequence");
const CONTENT_TYPE: HeaderName = HeaderName::from_static("Content-Type");
const CE_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");

/// Forwards events to NATS JetStream.
#[derive(Debug)]
pub struct NatsSink {
    client: Client,
    jetstream: jetstream::Context,
    router: Router<Template>,
    max_in_flight: usize,
    format: Format,
    cloudevents: CloudEvents,
    /// The group it forwards for, for its metrics.
    group: String,
}

/// Everything a [`NatsSink`] is built from but the connection.
#[derive(Debug, Clone, Copy)]
pub struct NatsSinkSettings<'a> {
    /// The subject template, e.g. `events.{category}.{stream}`.
    pub subject: &'a str,
    /// A JetStream stream to create when missing, capturing every subject the
    /// sink publishes to.
    pub stream: Option<&'a str>,
    pub max_in_flight: usize,
    pub format: Format,
    pub cloudevents_source: Option<&'a str>,
    /// The group, its partitions and its routes.
    pub context: SinkContext<'a>,
}

impl<'a> NatsSinkSettings<'a> {
    /// Publishing to `subject`, in weir's format, without routes.
    pub fn new(subject: &'a str) -> Self {
        Self {
            subject,
            stream: None,
            max_in_flight: super::default_max_in_flight(),
            format: Format::Weir,
            cloudevents_source: None,
            context: SinkContext::default(),
        }
    }
}

impl NatsSink {
    /// The same sink with `{partition}` in its templates counting in
    /// `partitions` partitions: those its group reads its categories as.
    #[must_use]
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.router = self
            .router
            .map(|template| template.with_partitions(partitions));
        self
    }

    /// Connects with `config` and builds the sink `settings` describe.
    pub async fn connect_with(
        config: &NatsOptions,
        settings: NatsSinkSettings<'_>,
    ) -> Result<NatsSink, SinkError> {
        let client = connect(config, "weir sink").await?;
        Self::from_client_with(client, settings, config.replicas).await
    }

    /// Connects with `config` and builds the sink; see [`NatsSink::from_client`].
    pub async fn connect(
        config: &NatsOptions,
        subject: &str,
        stream: Option<&str>,
        max_in_flight: usize,
    ) -> Result<NatsSink, SinkError> {
        let client = connect(config, "weir sink").await?;
        Self::from_client_replicated(client, subject, stream, max_in_flight, config.replicas).await
    }

    /// [`NatsSink::from_client_replicated`] with one copy of the stream it creates.
    pub async fn from_client(
        client: Client,
        subject: &str,
        stream: Option<&str>,
        max_in_flight: usize,
    ) -> Result<NatsSink, SinkError> {
        Self::from_client_replicated(client, subject, stream, max_in_flight, 1).await
    }

    /// A sink publishing to the subjects `subject` renders (`{category}`,
    /// `{stream}` and `{name}`, each encoded with [`subject_token`]), with up to
    /// `max_in_flight` publishes awaiting acknowledgement. If `stream` is set, a
    /// JetStream stream of that name capturing those subjects is created with
    /// `replicas` copies when missing; an existing one is left as it is.
    pub async fn from_client_replicated(
        client: Client,
        subject: &str,
        stream: Option<&str>,
        max_in_flight: usize,
        replicas: usize,
    ) -> Result<NatsSink, SinkError> {
        let settings = NatsSinkSettings {
            stream,
            max_in_flight,
            ..NatsSinkSettings::new(subject)
        };
        Self::from_client_with(client, settings, replicas).await
    }

    /// The sink `settings` describe, on `client`; a stream it creates has
    /// `replicas` copies.
    pub async fn from_client_with(
        client: Client,
        settings: NatsSinkSettings<'_>,
        replicas: usize,
    ) -> Result<NatsSink, SinkError> {
        if settings.max_in_flight == 0 {
            return Err(SinkError::Invalid(
                "max_in_flight must be at least 1".into(),
            ));
        }
        let mut routes = Vec::with_capacity(settings.context.routing.routes.len());
        for (index, route) in settings.context.routing.routes.iter().enumerate() {
            let Some(subject) = &route.subject else {
                return Err(SinkError::Invalid(format!(
                    "route {index} has no subject: a route of a NATS sink needs one"
                )));
            };
            routes.push((route.matches.clone(), Template::parse(subject)?));
        }
        let router = Router::new(
            routes,
            settings.context.routing.unmatched,
            Template::parse(settings.subject)?,
        )
        .map(|template| template.with_partitions(settings.context.partitions));
        let sink = NatsSink {
            jetstream: jetstream::new(client.clone()),
            client,
            router,
            max_in_flight: settings.max_in_flight,
            format: settings.format,
            cloudevents: CloudEvents::new(settings.cloudevents_source)?,
            group: settings.context.group.to_owned(),
        };
        if let Some(stream) = settings.stream {
            sink.ensure_stream(stream, replicas).await?;
        }
        Ok(sink)
    }

    /// The subject filter matching every subject the sink's own template
    /// renders: `events.{category}.{stream}` gives `events.*.*`.
    pub fn captured_subjects(&self) -> String {
        capture_filter(self.router.default_destination())
    }

    /// The subject filters a stream must list to capture everything the sink
    /// publishes, routes included; none covers another.
    pub fn captured_subject_filters(&self) -> Vec<String> {
        let filters: Vec<String> = self.router.destinations().map(capture_filter).collect();
        let mut kept: Vec<String> = Vec::new();
        for (index, filter) in filters.iter().enumerate() {
            let covered = filters.iter().enumerate().any(|(other, wider)| {
                other != index && covers(wider, filter) && (!covers(filter, wider) || other < index)
            });
            if !covered {
                kept.push(filter.clone());
            }
        }
        kept
    }

    async fn ensure_stream(&self, name: &str, replicas: usize) -> Result<(), SinkError> {
        let filters = self.captured_subject_filters();
        let subjects = filters.join(", ");
        match look_up_stream(&self.jetstream, name).await {
            Ok(mut existing) => {
                let info = existing.info().await.map_err(|error| {
                    SinkError::Unavailable(format!("cannot read stream {name}: {error}"))
                })?;
                note_replicas(name, info.config.num_replicas, replicas);
                if !filters.iter().all(|f| info.config.subjects.contains(f)) {
                    tracing::warn!(
                        stream = name, configured = ?info.config.subjects, sink = %subjects,
                        "the stream exists and is left as it is, but does not list the sink's subjects; publishes fail unless some stream captures them"
                    );
                }
                Ok(())
            }
            Err(error)
                if matches!(
                    error.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                let config = stream::Config {
                    name: name.to_owned(),
                    description: Some("events forwarded by weir".into()),
                    subjects: filters.clone(),
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                };
                match create_stream(&self.jetstream, &config).await {
                    Ok(_) => {
                        tracing::info!(stream = name, subjects = %subjects, "created the sink's stream");
                        Ok(())
                    }
                    // Another instance created it meanwhile.
                    Err(error)
                        if matches!(
                            error.kind(),
                            jetstream::context::CreateStreamErrorKind::JetStream(ref e)
                                if e.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST
                        ) =>
                    {
                        Ok(())
                    }
                    Err(error) => Err(SinkError::Invalid(format!(
                        "cannot create stream {name} for subjects {subjects}: {error}{}",
                        replicas_hint(&error, replicas)
                    ))),
                }
            }
            Err(error) => Err(SinkError::Unavailable(format!(
                "cannot look up stream {name}: {error}"
            ))),
        }
    }

    /// The headers the sink sends with `event`.
    pub fn headers(&self, event: &StoredEvent) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let id = event.id.hyphenated().to_string();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        headers.insert(EVENT_ID, id);
        headers.insert(EVENT_NAME, event.name.as_str());
        headers.insert(CATEGORY, event.category.as_str());
        headers.insert(STREAM, event.stream.as_str());
        headers.insert(POSITION, HeaderValue::from(event.position));
        headers.insert(SEQUENCE, HeaderValue::from(event.sequence));
        match self.format {
            Format::Weir => headers.insert(CONTENT_TYPE, cloudevents::JSON_CONTENT_TYPE),
            Format::CloudeventsStructured => {
                headers.insert(CONTENT_TYPE, cloudevents::STRUCTURED_CONTENT_TYPE);
            }
            Format::CloudeventsBinary => {
                headers.insert(CONTENT_TYPE, cloudevents::JSON_CONTENT_TYPE);
                headers.insert(CE_SPECVERSION, cloudevents::SPEC_VERSION);
                let attributes = self.cloudevents.attributes(event);
                for (name, value) in attributes.named() {
                    headers.insert(
                        format!("ce-{name}").as_str(),
                        cloudevents::header_value(value).as_ref(),
                    );
                }
            }
        }
        headers
    }

    /// The body the sink sends for `event`.
    pub fn body(&self, event: &StoredEvent) -> Result<Vec<u8>, String> {
        let mut buffer = Vec::with_capacity(512);
        match self.format {
            Format::Weir => serde_json::to_writer(&mut buffer, event),
            Format::CloudeventsBinary => serde_json::to_writer(&mut buffer, &event.payload),
            Format::CloudeventsStructured => self.cloudevents.envelope(event, &mut buffer),
        }
        .map_err(|error| format!("cannot encode the event: {error}"))?;
        Ok(buffer)
    }

    /// The subject `event` goes to, or why it goes to none.
    fn destination(&self, event: &StoredEvent) -> Routed<'_, Template> {
        self.router.route(event)
    }

    /// The subject `event` goes to when it goes anywhere (for errors): its
    /// route's, else the sink's own.
    fn subject(&self, event: &StoredEvent) -> String {
        let template = match self.destination(event) {
            Routed::To(template) => template,
            Routed::Skip | Routed::DeadLetter => self.router.default_destination(),
        };
        template.render(event, subject_token)
    }

    /// The error for `event` not stored, classified: what a retry may cure
    /// (no acknowledgement, no connection, no stream yet) is transient; what is
    /// about the event (cannot encode, too large, refused) is permanent.
    fn publish_failed(&self, event: &StoredEvent, why: Failure) -> ProcessError {
        if matches!(why, Failure::Unrouted) {
            return unrouted(event);
        }
        let subject = self.subject(event);
        let transient = matches!(
            why,
            Failure::NoStream | Failure::NotAcknowledged | Failure::Client(_)
        );
        let kind = match &why {
            Failure::NoStream => "no_stream",
            Failure::NotAcknowledged => "timeout",
            Failure::Client(_) => "connection",
            Failure::Encode(_) => "encode",
            Failure::TooLarge(..) => KIND_TOO_LARGE,
            Failure::Refused(_) => "publish",
            Failure::Unrouted => super::route::KIND_UNROUTED,
        };
        let message = match why {
            Failure::Encode(reason) => format!("cannot encode event {}: {reason}", event.id),
            Failure::TooLarge(size, limit) => format!(
                "event {} is {size} bytes encoded, more than the NATS server's max_payload of {limit} bytes",
                event.id
            ),
            Failure::NoStream => format!(
                "no JetStream stream captures subject {subject}: set the sink's stream, or create a stream for {}",
                self.captured_subject_filters().join(", ")
            ),
            Failure::NotAcknowledged => format!(
                "JetStream did not acknowledge event {} on {subject} within {}s; check that NATS and its JetStream are reachable",
                event.id,
                ACK_TIMEOUT.as_secs()
            ),
            Failure::Refused(reason) => {
                format!(
                    "JetStream refused event {} on {subject}: {reason}",
                    event.id
                )
            }
            Failure::Client(reason) => {
                format!("cannot publish event {} to {subject}: {reason}", event.id)
            }
            Failure::Unrouted => unrouted(event).message().to_owned(),
        };
        if transient {
            ProcessError::transient(kind, message)
        } else {
            ProcessError::permanent(kind, message)
        }
    }

    /// The subject and body of `event`; `None` when no route takes it, an error
    /// when it cannot be sent (`limit`: the server's `max_payload`, 0 for none).
    fn message(
        &self,
        event: &StoredEvent,
        limit: usize,
    ) -> Result<Option<(String, Vec<u8>)>, Failure> {
        let subject = match self.destination(event) {
            Routed::To(template) => template.render(event, subject_token),
            Routed::Skip => return Ok(None),
            Routed::DeadLetter => return Err(Failure::Unrouted),
        };
        let payload = self.body(event).map_err(Failure::Encode)?;
        if limit > 0 && payload.len() > limit {
            return Err(Failure::TooLarge(payload.len(), limit));
        }
        Ok(Some((subject, payload)))
    }

    /// Publishes `events` and waits for their acknowledgements; on failure,
    /// the index of the first event not stored and why. Events no route takes
    /// count as done once those before them are; the number of them before the
    /// failure (or in all) comes back with the outcome.
    async fn forward(&self, events: &[StoredEvent]) -> (usize, Result<(), (usize, Failure)>) {
        let inbox = self.client.new_inbox();
        let mut replies = match self.client.subscribe(format!("{inbox}.*")).await {
            Ok(replies) => replies,
            Err(error) => return (0, Err((0, Failure::Client(error.to_string())))),
        };
        let mut window = AckWindow::new(events.len());
        // Asked once a batch: the client hands out a copy of everything the
        // server said about itself.
        let limit = self.client.server_info().max_payload;
        // Per stream of the batch, the subject its last event went to and that
        // event's index.
        let mut last_sent: HashMap<(&str, &str), (String, usize)> = HashMap::new();
        let mut skipped = 0;
        let mut sent = 0;
        while sent < events.len() && window.failure.is_none() {
            if sent - window.acknowledged >= self.max_in_flight {
                if !window.receive(&mut replies).await {
                    break;
                }
                continue;
            }
            let event = &events[sent];
            let (subject, payload) = match self.message(event, limit) {
                Ok(Some(message)) => message,
                Ok(None) => {
                    window.pass(sent);
                    skipped += 1;
                    sent += 1;
                    continue;
                }
                Err(failure) => {
                    window.fail(sent, failure);
                    break;
                }
            };
            let stream = (event.category.as_str(), event.stream.as_str());
            // The stream's previous event went elsewhere: publish this one only
            // once that one is stored, or the two could be stored out of order.
            if let Some((previous, index)) = last_sent.get(&stream) {
                if *previous != subject && !window.wait_for(*index, &mut replies).await {
                    break;
                }
            }
            if let Err(error) = self
                .client
                .publish_with_reply_and_headers(
                    subject.clone(),
                    format!("{inbox}.{sent}"),
                    self.headers(event),
                    payload.into(),
                )
                .await
            {
                window.fail(sent, Failure::Client(error.to_string()));
                break;
            }
            last_sent.insert(stream, (subject, sent));
            sent += 1;
        }
        // Everything before the first failure must be acknowledged, or the
        // consumer would count events as delivered that are not stored.
        while window.first_unacknowledged < window.failure.as_ref().map_or(sent, |f| f.0) {
            if !window.receive(&mut replies).await {
                window.fail(window.first_unacknowledged, Failure::NotAcknowledged);
            }
        }
        match window.failure {
            Some(failure) => {
                let skipped_before = events[..failure.0]
                    .iter()
                    .filter(|e| matches!(self.destination(e), Routed::Skip))
                    .count();
                (skipped_before, Err(failure))
            }
            None => (skipped, Ok(())),
        }
    }
}

/// Why an event was not stored.
#[derive(Debug)]
enum Failure {
    NoStream,
    NotAcknowledged,
    Refused(String),
    Client(String),
    Encode(String),
    /// The encoded event's size and the server's `max_payload`.
    TooLarge(usize, usize),
    /// No route matches and unmatched events are dead letters.
    Unrouted,
}

/// The part of a JetStream publish acknowledgement the sink reads.
#[derive(serde::Deserialize)]
struct Acknowledgement {
    #[serde(default)]
    error: Option<AcknowledgementError>,
}

#[derive(serde::Deserialize)]
struct AcknowledgementError {
    #[serde(default)]
    description: String,
}

/// Which events of a batch JetStream has acknowledged.
struct AckWindow {
    acknowledged_events: Vec<bool>,
    acknowledged: usize,
    /// Every event before this one is acknowledged.
    first_unacknowledged: usize,
    /// The lowest index known not to be stored.
    failure: Option<(usize, Failure)>,
}

impl AckWindow {
    fn new(events: usize) -> Self {
        Self {
            acknowledged_events: vec![false; events],
            acknowledged: 0,
            first_unacknowledged: 0,
            failure: None,
        }
    }

    /// Counts the event at `index` as done without publishing it.
    fn pass(&mut self, index: usize) {
        self.acknowledged_events[index] = true;
        self.acknowledged += 1;
        self.advance();
    }

    fn advance(&mut self) {
        while self
            .acknowledged_events
            .get(self.first_unacknowledged)
            .is_some_and(|done| *done)
        {
            self.first_unacknowledged += 1;
        }
    }

    /// Takes acknowledgements until every event up to `index` is stored;
    /// `false` if one failed or none came in time (then `failure` says which).
    async fn wait_for(&mut self, index: usize, replies: &mut async_nats::Subscriber) -> bool {
        while self.first_unacknowledged <= index {
            if self
                .failure
                .as_ref()
                .is_some_and(|(failed, _)| *failed <= index)
            {
                return false;
            }
            if !self.receive(replies).await {
                self.fail(self.first_unacknowledged, Failure::NotAcknowledged);
                return false;
            }
        }
        true
    }

    fn fail(&mut self, index: usize, why: Failure) {
        if self
            .failure
            .as_ref()
            .is_none_or(|(failed, _)| index < *failed)
        {
            self.failure = Some((index, why));
        }
    }

    /// Takes the next acknowledgement; `false` if none came within
    /// [`ACK_TIMEOUT`] or the client closed.
    async fn receive(&mut self, replies: &mut async_nats::Subscriber) -> bool {
        let Ok(Some(reply)) = tokio::time::timeout(ACK_TIMEOUT, replies.next()).await else {
            return false;
        };
        let Some(index) = reply
            .subject
            .rsplit_once('.')
            .and_then(|(_, index)| index.parse::<usize>().ok())
            .filter(|index| *index < self.acknowledged_events.len())
        else {
            return true;
        };
        if reply.status == Some(StatusCode::NO_RESPONDERS) {
            self.fail(index, Failure::NoStream);
            return true;
        }
        match serde_json::from_slice::<Acknowledgement>(&reply.payload) {
            Ok(Acknowledgement { error: None }) => {
                if !std::mem::replace(&mut self.acknowledged_events[index], true) {
                    self.acknowledged += 1;
                }
                self.advance();
            }
            Ok(Acknowledgement { error: Some(error) }) => {
                self.fail(index, Failure::Refused(error.description));
            }
            Err(error) => self.fail(
                index,
                Failure::Refused(format!(
                    "unreadable acknowledgement ({error}): {}",
                    String::from_utf8_lossy(&reply.payload)
                )),
            ),
        }
        true
    }
}

/// Whether subject filter `wider` (tokens and `*`, no `>`) matches every
/// subject `narrower` does.
fn covers(wider: &str, narrower: &str) -> bool {
    let (wide, narrow): (Vec<&str>, Vec<&str>) =
        (wider.split('.').collect(), narrower.split('.').collect());
    wide.len() == narrow.len() && wide.iter().zip(&narrow).all(|(w, n)| *w == "*" || w == n)
}

/// A token holding a placeholder anywhere becomes a whole-token wildcard, since
/// an encoded value never contains a `.`.
fn capture_filter(template: &Template) -> String {
    template
        .with_placeholders_as("\0")
        .split('.')
        .map(|token| if token.contains('\0') { "*" } else { token })
        .collect::<Vec<_>>()
        .join(".")
}

#[async_trait]
impl EventProcessor for NatsSink {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        let started = Instant::now();
        let (skipped, outcome) = self.forward(events).await;
        count_unrouted(&self.group, skipped as u64);
        outcome.map_err(|(index, why)| self.publish_failed(&events[index], why).at(index))?;
        metrics::sink_batch("nats", events.len() - skipped, started.elapsed());
        Ok(())
    }
}

/// Publishes `messages` (headers, if any, and payload) to `subject` as plainly
/// as a client can, through the JetStream context with up to `max_in_flight`
/// acknowledgements outstanding, and says how long JetStream took to store them
/// all: the yardstick for the sink's throughput. [`NatsSink::headers`] gives the
/// headers the sink would send with an event.
pub async fn raw_publish_baseline(
    client: Client,
    subject: &str,
    messages: Vec<(Option<HeaderMap>, Vec<u8>)>,
    max_in_flight: usize,
) -> Result<Duration, jetstream::context::PublishError> {
    let max_in_flight = max_in_flight.max(1);
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        .max_ack_inflight(max_in_flight)
        .build(client);
    let started = Instant::now();
    let mut in_flight = FuturesOrdered::new();
    for (headers, payload) in messages {
        if in_flight.len() >= max_in_flight {
            if let Some(done) = in_flight.next().await {
                done?;
            }
        }
        let ack = match headers {
            Some(headers) => {
                jetstream
                    .publish_with_headers(subject.to_owned(), headers, payload.into())
                    .await?
            }
            None => {
                jetstream
                    .publish(subject.to_owned(), payload.into())
                    .await?
            }
        };
        in_flight.push_back(ack.into_future());
    }
    while let Some(done) = in_flight.next().await {
        done?;
    }
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_another_covers_is_left_out() {
        assert!(covers("a.*.*", "a.b.*"));
        assert!(covers("a.*.*", "a.*.*"));
        assert!(!covers("a.b.*", "a.*.*"));
        assert!(!covers("a.*", "a.*.*"));
    }

    #[test]
    fn the_stream_captures_every_rendered_subject() {
        for (template, filter) in [
            ("events.{category}.{stream}", "events.*.*"),
            ("all-events", "all-events"),
            ("ev.{category}_v1.x{name}y", "ev.*.*"),
            ("{category}", "*"),
        ] {
            let template = Template::parse(template).expect("valid template");
            assert_eq!(capture_filter(&template), filter);
        }
    }
}
