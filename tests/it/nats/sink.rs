//! [`NatsSink`] against the shared server: what arrives in the stream (subjects,
//! headers, bodies, order), deduplication of republished events, and a publish
//! nobody stores failing as a `publish` error rather than hanging.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use weir::connect::nats_client::subject_token;
use weir::consumer::EventProcessor;
use weir::event::{Category, EventName, NewEvent, StoredEvent, StreamName, WriteCondition};
use weir::sink::nats::NatsSinkSettings;
use weir::sink::{Format, NatsSink};
use weir::store::{EventStore, MemoryStore};

use super::{StreamCleanup, nats_url, shared_client};
use crate::common::cloudevents::Received;
use crate::common::unique_name;

/// Events of several streams, some with names that are not subject tokens,
/// interleaved as a category read returns them.
async fn events() -> Vec<StoredEvent> {
    let store = MemoryStore::new();
    let streams = [
        ("orders", "order-1"),
        ("odd.category *", "order.2 > x"),
        ("orders", "é/ü%"),
    ];
    for round in 0..3 {
        for (category, stream) in streams {
            store
                .append(
                    &Category::new(category).expect("valid"),
                    &StreamName::new(stream).expect("valid"),
                    WriteCondition::Any,
                    vec![
                        NewEvent::new(
                            EventName::new(if round == 1 { "Shipped.v2" } else { "Placed" })
                                .expect("valid"),
                            serde_json::json!({ "round": round, "stream": stream }),
                        )
                        .with_metadata(serde_json::json!({ "by": "test" })),
                    ],
                )
                .await
                .expect("append");
        }
    }
    store
        .read(&"log".parse().expect("source"), Default::default(), 100)
        .await
        .expect("read")
}

struct Fixture {
    client: async_nats::Client,
    stream: String,
    prefix: String,
    _cleanup: StreamCleanup,
}

async fn fixture() -> Option<Fixture> {
    let client = shared_client().await?;
    let stream = unique_name("WEIR_SINK").to_uppercase();
    let prefix = unique_name("weir_sink");
    Some(Fixture {
        client,
        _cleanup: StreamCleanup {
            url: nats_url(),
            streams: vec![stream.clone()],
        },
        stream,
        prefix,
    })
}

/// Every message in `stream`, oldest first.
async fn stored(client: &async_nats::Client, stream: &str) -> Vec<jetstream::Message> {
    let jetstream = jetstream::new(client.clone());
    let stream = jetstream
        .get_stream(stream)
        .await
        .expect("the stream exists");
    let count = stream.cached_info().state.messages;
    if count == 0 {
        return Vec::new();
    }
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .expect("consumer");
    let messages = consumer.messages().await.expect("messages");
    tokio::time::timeout(
        Duration::from_secs(10),
        messages
            .take(count as usize)
            .map(|m| m.expect("a message"))
            .collect(),
    )
    .await
    .expect("every message in time")
}

fn header<'a>(message: &'a jetstream::Message, name: &str) -> &'a str {
    // By name as text: looking a header up with a string misses the ones the
    // client knows by a constant, such as Nats-Msg-Id.
    let mut values = message
        .headers
        .iter()
        .flat_map(|headers| headers.iter())
        .filter(|(key, _)| AsRef::<str>::as_ref(key) == name)
        .flat_map(|(_, values)| values);
    let value = values.next().unwrap_or_else(|| panic!("no {name} header"));
    assert!(values.next().is_none(), "{name} appears more than once");
    value.as_str()
}

#[tokio::test]
async fn a_batch_arrives_whole_with_subjects_headers_and_bodies() {
    let Some(f) = fixture().await else { return };
    let template = format!("{}.{{category}}.{{stream}}", f.prefix);
    let sink = NatsSink::from_client(f.client.clone(), &template, Some(&f.stream), 4)
        .await
        .expect("the sink creates its stream");
    assert_eq!(sink.captured_subjects(), format!("{}.*.*", f.prefix));
    let events = events().await;
    sink.process(&events).await.expect("every event is stored");

    let messages = stored(&f.client, &f.stream).await;
    assert_eq!(messages.len(), events.len());
    // One stream's events keep their order (JetStream keeps publish order, and
    // the sink publishes in the batch's order).
    for (message, event) in messages.iter().zip(&events) {
        assert_eq!(
            message.subject.as_str(),
            format!(
                "{}.{}.{}",
                f.prefix,
                subject_token(event.category.as_str()),
                subject_token(event.stream.as_str())
            )
        );
        let body: StoredEvent = serde_json::from_slice(&message.payload).expect("JSON event");
        assert_eq!(&body, event);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&message.payload).expect("JSON"),
            serde_json::to_value(event).expect("JSON"),
            "the body is what weir read prints"
        );
        assert_eq!(header(message, "Nats-Msg-Id"), event.id.to_string());
        assert_eq!(header(message, "Weir-Event-Name"), event.name.as_str());
        assert_eq!(header(message, "Weir-Category"), event.category.as_str());
        assert_eq!(header(message, "Weir-Stream"), event.stream.as_str());
        assert_eq!(header(message, "Weir-Position"), event.position.to_string());
        assert_eq!(header(message, "Weir-Sequence"), event.sequence.to_string());
        assert_eq!(header(message, "Content-Type"), "application/json");
    }
}

#[tokio::test]
async fn republished_events_are_stored_once() {
    let Some(f) = fixture().await else { return };
    let template = format!("{}.{{name}}", f.prefix);
    let sink = NatsSink::from_client(f.client.clone(), &template, Some(&f.stream), 2)
        .await
        .expect("sink");
    let events = events().await;
    sink.process(&events[..5]).await.expect("first delivery");
    // A consumer that crashed before its checkpoint hands the events over again,
    // with more after them.
    sink.process(&events).await.expect("redelivery");
    let messages = stored(&f.client, &f.stream).await;
    let ids: Vec<String> = messages
        .iter()
        .map(|m| header(m, "Nats-Msg-Id").to_owned())
        .collect();
    let expected: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn an_existing_stream_is_left_as_it_is() {
    let Some(f) = fixture().await else { return };
    let jetstream = jetstream::new(f.client.clone());
    let subjects = vec![format!("{}.>", f.prefix)];
    jetstream
        .create_stream(jetstream::stream::Config {
            name: f.stream.clone(),
            subjects: subjects.clone(),
            max_messages: 1_000,
            ..Default::default()
        })
        .await
        .expect("create");
    let sink = NatsSink::from_client(
        f.client.clone(),
        &format!("{}.x.{{category}}", f.prefix),
        Some(&f.stream),
        8,
    )
    .await
    .expect("sink");
    let config = jetstream
        .get_stream(&f.stream)
        .await
        .expect("stream")
        .cached_info()
        .config
        .clone();
    assert_eq!((config.subjects, config.max_messages), (subjects, 1_000));
    sink.process(&events().await).await.expect("stored");
}

#[tokio::test]
async fn a_subject_no_stream_captures_fails_transiently_at_the_first_event() {
    let Some(f) = fixture().await else { return };
    let sink = NatsSink::from_client(
        f.client.clone(),
        &format!("{}.nowhere.{{category}}", f.prefix),
        None,
        8,
    )
    .await
    .expect("sink");
    let events = events().await;
    let error = tokio::time::timeout(Duration::from_secs(30), sink.process(&events))
        .await
        .expect("the failure is reported, not waited out")
        .expect_err("nothing stores the subject");
    // Not the event's fault: the consumer waits for a stream rather than
    // dropping events as dead letters.
    assert_eq!(error.kind(), "no_stream");
    assert!(error.is_transient(), "{error}");
    assert_eq!(error.index(), Some(0));
    assert!(error.message().contains("stream"), "{error}");
}

#[tokio::test]
async fn an_event_over_the_servers_max_payload_fails_permanently_as_too_large() {
    let Some(f) = fixture().await else { return };
    let jetstream = jetstream::new(f.client.clone());
    jetstream
        .create_stream(jetstream::stream::Config {
            name: f.stream.clone(),
            subjects: vec![format!("{}.>", f.prefix)],
            ..Default::default()
        })
        .await
        .expect("create");
    let limit = f.client.server_info().max_payload;
    let store = MemoryStore::new().with_max_event_bytes(limit * 2);
    let mut batch = events().await;
    batch.truncate(1);
    batch.extend(
        store
            .append(
                &Category::new("orders").expect("valid"),
                &StreamName::new("order-big").expect("valid"),
                WriteCondition::Any,
                vec![NewEvent::new(
                    EventName::new("Huge").expect("valid"),
                    serde_json::json!({ "blob": "x".repeat(limit) }),
                )],
            )
            .await
            .expect("append"),
    );
    let sink = NatsSink::from_client(
        f.client.clone(),
        &format!("{}.{{category}}", f.prefix),
        None,
        8,
    )
    .await
    .expect("sink");
    let error = sink.process(&batch).await.expect_err("too large");
    assert_eq!((error.kind(), error.index()), ("too_large", Some(1)));
    assert!(!error.is_transient(), "{error}");
    assert!(error.message().contains("max_payload"), "{error}");
    // The event before it is stored.
    let messages = stored(&f.client, &f.stream).await;
    assert_eq!(header(&messages[0], "Nats-Msg-Id"), batch[0].id.to_string());
}

#[tokio::test]
async fn a_failure_part_way_names_the_first_event_not_stored() {
    let Some(f) = fixture().await else { return };
    let events = events().await;
    // The stream captures only the first category's subjects; the second event
    // of the batch belongs to another category.
    let jetstream = jetstream::new(f.client.clone());
    jetstream
        .create_stream(jetstream::stream::Config {
            name: f.stream.clone(),
            subjects: vec![format!(
                "{}.{}",
                f.prefix,
                subject_token(events[0].category.as_str())
            )],
            ..Default::default()
        })
        .await
        .expect("create");
    let sink = NatsSink::from_client(
        f.client.clone(),
        &format!("{}.{{category}}", f.prefix),
        None,
        8,
    )
    .await
    .expect("sink");
    assert_ne!(events[1].category, events[0].category);
    let error = sink.process(&events).await.expect_err("the second event");
    assert_eq!((error.kind(), error.index()), ("no_stream", Some(1)));
    // The event before the failure is stored. Later ones of its category may be
    // too; the consumer hands them over again and deduplication drops them.
    let messages = stored(&f.client, &f.stream).await;
    assert_eq!(
        header(&messages[0], "Nats-Msg-Id"),
        events[0].id.to_string()
    );
}

/// What a stored message looks like to the CloudEvents SDK.
fn received(message: &jetstream::Message) -> Received {
    let headers = message
        .headers
        .iter()
        .flat_map(|headers| headers.iter())
        .flat_map(|(key, values)| {
            let key: &str = key.as_ref();
            values
                .iter()
                .map(move |value| (key.to_owned(), value.as_str().as_bytes().to_vec()))
        })
        .collect();
    Received::nats(headers, message.payload.to_vec())
}

/// The default CloudEvents source of each stream of [`events`], percent-encoded.
fn default_source(event: &StoredEvent) -> &'static str {
    match (event.category.as_str(), event.stream.as_str()) {
        ("orders", "order-1") => "weir://orders/order-1",
        ("odd.category *", _) => "weir://odd.category%20%2A/order.2%20%3E%20x",
        ("orders", _) => "weir://orders/%C3%A9%2F%C3%BC%25",
        other => panic!("no such stream {other:?}"),
    }
}

#[tokio::test]
async fn cloudevents_in_both_modes_read_back_with_the_sdk_attribute_for_attribute() {
    let Some(f) = fixture().await else { return };
    let events = events().await;
    for format in [Format::CloudeventsBinary, Format::CloudeventsStructured] {
        let prefix = format!(
            "{}_{}",
            f.prefix,
            if format == Format::CloudeventsBinary {
                "b"
            } else {
                "s"
            }
        );
        let stream = format!("{}_{}", f.stream, prefix.len());
        let _cleanup = StreamCleanup {
            url: nats_url(),
            streams: vec![stream.clone()],
        };
        let subject = format!("{prefix}.{{category}}.{{stream}}");
        let sink = NatsSink::from_client_with(
            f.client.clone(),
            NatsSinkSettings {
                stream: Some(&stream),
                format,
                ..NatsSinkSettings::new(&subject)
            },
            1,
        )
        .await
        .expect("the sink creates its stream");
        sink.process(&events).await.expect("every event is stored");
        let messages = stored(&f.client, &stream).await;
        assert_eq!(messages.len(), events.len());
        for (message, event) in messages.iter().zip(&events) {
            // weir's own headers stay in every format.
            assert_eq!(header(message, "Nats-Msg-Id"), event.id.to_string());
            assert_eq!(header(message, "Weir-Event-Name"), event.name.as_str());
            assert_eq!(header(message, "Weir-Category"), event.category.as_str());
            assert_eq!(header(message, "Weir-Stream"), event.stream.as_str());
            assert_eq!(header(message, "Weir-Position"), event.position.to_string());
            assert_eq!(header(message, "Weir-Sequence"), event.sequence.to_string());
            if format == Format::CloudeventsBinary {
                assert_eq!(header(message, "ce-specversion"), "1.0");
                assert_eq!(header(message, "ce-id"), event.id.to_string());
                assert_eq!(header(message, "Content-Type"), "application/json");
                let body: serde_json::Value =
                    serde_json::from_slice(&message.payload).expect("JSON");
                assert_eq!(body, event.payload, "the payload is the body");
            } else {
                assert_eq!(
                    header(message, "Content-Type"),
                    "application/cloudevents+json; charset=UTF-8"
                );
                let ce_headers = message
                    .headers
                    .iter()
                    .flat_map(|headers| headers.iter())
                    .filter(|(key, _)| AsRef::<str>::as_ref(*key).starts_with("ce-"))
                    .count();
                assert_eq!(ce_headers, 0, "structured mode sends no ce- headers");
            }
            let read = received(message).to_event();
            crate::common::cloudevents::check(&read, event, default_source(event));
        }
    }
}

/// `routes` parsed from `[[routes]]` tables.
fn routing(toml_text: &str, unmatched: weir::sink::Unmatched) -> weir::sink::Routing {
    #[derive(serde::Deserialize)]
    struct Holder {
        routes: Vec<weir::sink::RouteConfig>,
    }
    weir::sink::Routing {
        routes: toml::from_str::<Holder>(toml_text).expect("routes").routes,
        unmatched,
    }
}

/// A sink publishing to `subject` (and `routing`'s subjects), creating
/// `stream` if given and missing.
async fn routed_sink(
    f: &Fixture,
    subject: &str,
    stream: Option<&str>,
    routing: &weir::sink::Routing,
) -> NatsSink {
    NatsSink::from_client_with(
        f.client.clone(),
        NatsSinkSettings {
            stream,
            context: weir::sink::SinkContext {
                routing,
                ..Default::default()
            },
            ..NatsSinkSettings::new(subject)
        },
        1,
    )
    .await
    .expect("the sink is built")
}

/// Appends `(stream, name)` events one at a time to category `orders`, and
/// reads them back as the log orders them.
async fn appended(events: &[(&str, &str)]) -> Vec<StoredEvent> {
    let store = MemoryStore::new();
    for (stream, name) in events {
        store
            .append(
                &Category::new("orders").expect("valid"),
                &StreamName::new(*stream).expect("valid"),
                WriteCondition::Any,
                vec![NewEvent::new(
                    EventName::new(*name).expect("valid"),
                    serde_json::json!({}),
                )],
            )
            .await
            .expect("append");
    }
    store
        .read(&"log".parse().expect("source"), Default::default(), 100)
        .await
        .expect("read")
}

#[tokio::test]
async fn routes_pick_each_events_subject_and_the_stream_captures_them_all() {
    let Some(f) = fixture().await else { return };
    let prefix = &f.prefix;
    let routes = routing(
        &format!(
            r#"
            [[routes]]
            match = {{ names = ["Placed"] }}
            subject = "{prefix}.placed.{{stream}}"
            [[routes]]
            match = {{ names = ["Pa*"], category = "ord*" }}
            subject = "{prefix}.paid"
            "#
        ),
        weir::sink::Unmatched::Skip,
    );
    let subject = format!("{prefix}.other.{{name}}");
    let sink = routed_sink(&f, &subject, Some(&f.stream), &routes).await;
    // The sink's own subject is not among them: unmatched events are skipped.
    assert_eq!(
        sink.captured_subject_filters(),
        [format!("{prefix}.placed.*"), format!("{prefix}.paid")]
    );
    let events = appended(&[
        ("o-1", "Placed"),
        ("o-1", "Noted"),
        ("o-1", "Paid"),
        ("o-2", "Placed"),
        ("o-1", "Placed"),
    ])
    .await;
    sink.process(&events)
        .await
        .expect("every routed event is stored");
    let messages = stored(&f.client, &f.stream).await;
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            format!("{prefix}.placed.o-1"),
            format!("{prefix}.paid"),
            format!("{prefix}.placed.o-2"),
            format!("{prefix}.placed.o-1"),
        ]
    );
    let ids: Vec<&str> = messages.iter().map(|m| header(m, "Nats-Msg-Id")).collect();
    let expected: Vec<String> = [0, 2, 3, 4]
        .iter()
        .map(|i| events[*i].id.to_string())
        .collect();
    assert_eq!(ids, expected, "the skipped event is not sent");

    // Under unmatched = "dead_letter" the same batch stops at the unmatched
    // event, with every event before it stored, for the consumer to keep it
    // as a dead letter whatever its policy.
    let dead = routing(
        &format!(
            "[[routes]]\nmatch = {{ names = [\"Placed\"] }}\nsubject = \"{prefix}.placed.{{stream}}\""
        ),
        weir::sink::Unmatched::DeadLetter,
    );
    let sink = routed_sink(&f, &subject, None, &dead).await;
    let error = sink
        .process(&events)
        .await
        .expect_err("event 1 matches no route");
    assert_eq!(error.index(), Some(1));
    assert_eq!(error.kind(), "unrouted");
    assert!(error.is_dead_letter(), "{error}");
    assert!(!error.is_transient(), "{error}");
}

#[tokio::test]
async fn a_streams_next_event_for_another_subject_waits_until_the_one_before_is_stored() {
    let Some(f) = fixture().await else { return };
    let prefix = &f.prefix;
    // The stream captures `PREFIX.*.*` only.
    let captured = format!("{prefix}.{{category}}.{{stream}}");
    NatsSink::from_client(f.client.clone(), &captured, Some(&f.stream), 8)
        .await
        .expect("the stream is created");
    // Paid events go to a subject no stream captures: their publish fails
    // (no responders), as it does while a destination's stream is missing.
    let routes = routing(
        &format!("[[routes]]\nmatch = {{ names = [\"Paid\"] }}\nsubject = \"{prefix}.uncaptured\""),
        weir::sink::Unmatched::Default,
    );
    // The existing stream is left as it is.
    let sink = routed_sink(&f, &captured, Some(&f.stream), &routes).await;
    let events = appended(&[
        ("a", "Placed"),
        ("b", "Placed"),
        ("a", "Paid"),
        ("b", "Placed"),
        ("a", "Shipped"),
        ("b", "Placed"),
    ])
    .await;
    let error = tokio::time::timeout(Duration::from_secs(30), sink.process(&events))
        .await
        .expect("the failure is reported")
        .expect_err("a's Paid is not stored");
    assert_eq!(error.kind(), "no_stream");
    assert!(error.is_transient(), "{error}");
    assert_eq!(error.index(), Some(2));
    let stored_ids: Vec<String> = stored(&f.client, &f.stream)
        .await
        .iter()
        .map(|m| header(m, "Nats-Msg-Id").to_owned())
        .collect();
    assert!(stored_ids.contains(&events[0].id.to_string()));
    assert!(stored_ids.contains(&events[1].id.to_string()));
    // a's Shipped follows a's Paid to another subject: it waited for Paid's
    // acknowledgement, which never came, so it was never published. (b's
    // events may have been: they are another stream's.)
    assert!(
        !stored_ids.contains(&events[4].id.to_string()),
        "a's Shipped was stored before a's Paid"
    );
}
