//! Unit tests of the NATS bus that need no server: reconciling stream settings.

use super::*;

fn config(name: &str, subjects: &[&str]) -> stream::Config {
    stream::Config {
        name: name.into(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        max_messages_per_subject: 1,
        ..Default::default()
    }
}

#[test]
fn a_matching_stream_is_left_alone_and_limits_are_updated() {
    let wanted = config("W_DECISIONS", &["w.decisions.>"]);
    assert_eq!(reconcile(&wanted, &wanted), Ok(None));
    let tuned = stream::Config {
        num_replicas: 3,
        max_messages_per_subject: 5,
        ..wanted.clone()
    };
    let updated = reconcile(&tuned, &wanted)
        .expect("can be updated")
        .expect("needs an update");
    assert_eq!(updated.max_messages_per_subject, 1);
    assert_eq!(updated.num_replicas, 3, "replicas are the operator's");
}

#[test]
fn a_stream_of_someone_else_is_refused_with_a_reason() {
    let wanted = config("W_DECISIONS", &["w.decisions.>"]);
    let other = config("W_DECISIONS", &["W.decisions.>"]);
    let reason = reconcile(&other, &wanted).expect_err("other subjects");
    assert!(reason.contains("namespace"), "{reason}");
    let memory = stream::Config {
        storage: stream::StorageType::Memory,
        ..wanted.clone()
    };
    let reason = reconcile(&memory, &wanted).expect_err("other storage");
    assert!(reason.contains("nats stream rm W_DECISIONS"), "{reason}");
}

#[test]
fn an_unlimited_count_reported_as_minus_one_needs_no_update() {
    // Asked with 0 (unlimited); the server reports unlimited as -1.
    let wanted = stream::Config {
        max_messages_per_subject: 0,
        ..config("W_SIGNALS", &["w.signals.>"])
    };
    let reported = stream::Config {
        max_messages_per_subject: -1,
        ..wanted.clone()
    };
    assert_eq!(reconcile(&reported, &wanted), Ok(None));
    // A real limit the bus needs is still brought back.
    let limited = stream::Config {
        max_messages_per_subject: 5,
        ..wanted.clone()
    };
    let updated = reconcile(&limited, &wanted).unwrap().unwrap();
    assert!(updated.max_messages_per_subject <= 0);
}
