//! Wire format tests: round trips, layout, versions, splitting and reassembly.

use super::*;
use crate::allocation::tests::uniform_group;
use crate::allocation::{AllocationInput, allocate};
use crate::event::{Category, StreamName};
use proptest::prelude::*;
use std::sync::Arc;

fn source(text: &str) -> Source {
    text.parse().expect("test sources are valid")
}

fn issued() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
        .expect("valid timestamp")
        .with_timezone(&Utc)
}

fn small_decision(group: &str, epoch: u64, revision: u64) -> Decision {
    Decision {
        group: group.into(),
        epoch,
        revision,
        coordinator: "node-a".into(),
        issued_at: issued(),
        owners: [
            (
                "billing-1".to_owned(),
                [
                    source("category:invoices"),
                    source("stream:orders/order-42"),
                ]
                .into(),
            ),
            ("billing-2".to_owned(), [source("log")].into()),
        ]
        .into(),
        handovers: [(
            source("category:refunds"),
            Handover {
                from: "billing-1".into(),
                to: "billing-2".into(),
            },
        )]
        .into(),
        paused: false,
    }
}

/// A decision too big for 600 bytes: it travels in several parts.
fn split_decision(group: &str, epoch: u64, revision: u64) -> Decision {
    let mut decision = small_decision(group, epoch, revision);
    decision.owners.insert(
        "billing-3".to_owned(),
        (0..30)
            .map(|i| source(&format!("stream:orders/order-{i:03}")))
            .collect(),
    );
    decision
}

fn signals() -> Vec<Signal> {
    vec![
        Signal::Joined {
            group: "billing".into(),
            subscriber: "billing-3".into(),
            node: "node-c".into(),
        },
        Signal::Leaving {
            group: "billing".into(),
            subscriber: "billing-3".into(),
            node: "node-c".into(),
        },
        Signal::Released {
            group: "billing".into(),
            subscriber: "billing-1".into(),
            source: source("category:refunds"),
            cursor: Some(Cursor::new(981, 3)),
        },
        Signal::Released {
            group: "billing".into(),
            subscriber: "billing-1".into(),
            source: source("log"),
            cursor: None,
        },
        Signal::Lacking {
            group: "billing".into(),
            node: "node-c".into(),
            epoch: 3,
            revision: 18,
        },
    ]
}

fn part_of(bytes: &[u8]) -> DecisionPart {
    match decode_frame(bytes) {
        Ok(Frame::Decision(part)) => part,
        other => panic!("expected a decision part, got {other:?}"),
    }
}

#[test]
fn every_message_kind_round_trips() {
    let mut messages: Vec<BusMessage> = signals().into_iter().map(Into::into).collect();
    messages.push(small_decision("billing", 3, 17).into());
    let mut empty = small_decision("empty", 0, 0);
    empty.owners.clear();
    empty.handovers.clear();
    messages.push(empty.into());
    for message in messages {
        let bytes = encode(&message);
        assert_eq!(decode(&bytes), Ok(message.clone()), "{bytes:?}");
    }
}

#[test]
fn layout_is_as_documented() {
    let decision = encode(&small_decision("billing", 3, 17).into());
    let value: serde_json::Value = serde_json::from_slice(&decision).expect("JSON");
    assert_eq!(
        value,
        serde_json::json!({
            "v": 1, "kind": "decision", "group": "billing", "epoch": 3, "revision": 17,
            "coordinator": "node-a", "issued_at": "2026-11-22T10:00:00Z",
            "part": 1, "parts": 1,
            "owners": {
                "billing-1": ["category:invoices", "stream:orders/order-42"],
                "billing-2": ["log"],
            },
            "handovers": {"category:refunds": {"from": "billing-1", "to": "billing-2"}},
        })
    );
    let released = encode(&signals()[2].clone().into());
    assert_eq!(
        String::from_utf8(released).expect("UTF-8"),
        r#"{"v":1,"kind":"signal","signal":"released","group":"billing","subscriber":"billing-1","source":"category:refunds","cursor":"981:3"}"#
    );
    let joined = encode(&signals()[0].clone().into());
    assert_eq!(
        String::from_utf8(joined).expect("UTF-8"),
        r#"{"v":1,"kind":"signal","signal":"joined","group":"billing","subscriber":"billing-3","node":"node-c"}"#
    );
}

#[test]
fn unknown_fields_within_version_one_are_ignored() {
    let bytes = br#"{"v":1,"kind":"signal","signal":"joined","group":"g","subscriber":"s","node":"n","zone":"eu"}"#;
    assert_eq!(
        decode(bytes),
        Ok(BusMessage::Signal(Signal::Joined {
            group: "g".into(),
            subscriber: "s".into(),
            node: "n".into(),
        }))
    );
}

#[test]
fn a_newer_version_is_unknown_version_not_malformed() {
    for bytes in [
        &br#"{"v":2,"kind":"decision","group":"g"}"#[..],
        br#"{"kind":{"nested":true},"v":2,"whatever":[1,2]}"#,
        br#"{"v":7}"#,
    ] {
        assert_eq!(
            decode(bytes),
            Err(DecodeError::UnknownVersion {
                found: bytes_version(bytes)
            })
        );
    }
    let message = DecodeError::UnknownVersion { found: 2 }.to_string();
    assert!(message.contains("upgrade"), "{message}");
}

fn bytes_version(bytes: &[u8]) -> u64 {
    let value: serde_json::Value = serde_json::from_slice(bytes).expect("JSON");
    value["v"].as_u64().expect("v")
}

#[test]
fn malformed_payloads_are_malformed() {
    for bytes in [
        &b""[..],
        b"not json",
        b"{\"v\":1,\"kind\":\"decision\"",
        b"[1,2,3]",
        b"{\"kind\":\"signal\"}",
        b"{\"v\":\"1\",\"kind\":\"signal\"}",
        b"{\"v\":1}",
        b"{\"v\":1,\"kind\":\"gossip\"}",
        b"{\"v\":1,\"kind\":\"signal\",\"signal\":\"waved\",\"group\":\"g\"}",
        br#"{"v":1,"kind":"signal","signal":"released","group":"g","subscriber":"s","source":"nowhere:x"}"#,
        br#"{"v":1,"kind":"signal","signal":"released","group":"g","subscriber":"s","source":"log","cursor":"x"}"#,
        br#"{"v":1,"kind":"decision","group":"g","epoch":1,"revision":1,"coordinator":"n","issued_at":"2026-11-22T10:00:00Z","part":3,"parts":2,"owners":{},"handovers":{}}"#,
        br#"{"v":1,"kind":"decision","group":"g","epoch":-1,"revision":1,"coordinator":"n","issued_at":"2026-11-22T10:00:00Z","part":1,"parts":1,"owners":{},"handovers":{}}"#,
    ] {
        assert!(
            matches!(decode(bytes), Err(DecodeError::Malformed(_))),
            "{:?} gave {:?}",
            String::from_utf8_lossy(bytes),
            decode(bytes)
        );
    }
}

#[test]
fn a_part_of_a_split_decision_is_not_a_whole_message() {
    let parts = encode_decision_parts(&split_decision("billing", 1, 1), 600);
    assert!(parts.len() > 1);
    assert!(matches!(
        decode(&parts[0]),
        Err(DecodeError::Partial { part: 1, .. })
    ));
}

#[test]
fn newer_compares_epoch_then_revision() {
    let d = |epoch, revision| small_decision("g", epoch, revision);
    assert!(d(1, 2).is_newer_than(&d(1, 1)));
    assert!(d(2, 0).is_newer_than(&d(1, 99)));
    assert!(!d(1, 99).is_newer_than(&d(2, 0)));
    assert!(!d(1, 1).is_newer_than(&d(1, 1)));
    assert!(!d(1, 1).is_newer_than(&d(1, 2)));
}

#[test]
fn owner_of_finds_owners_but_not_handovers() {
    let d = small_decision("g", 1, 1);
    assert_eq!(d.owner_of(&source("log")), Some("billing-2"));
    assert_eq!(
        d.owner_of(&source("stream:orders/order-42")),
        Some("billing-1")
    );
    assert_eq!(d.owner_of(&source("category:refunds")), None);
}

#[test]
fn from_allocation_carries_the_allocation() {
    let d = small_decision("g", 1, 1);
    let made = Decision::from_allocation("g", 4, 5, "node-b", &d.allocation());
    assert_eq!(
        (made.epoch, made.revision, made.coordinator.as_str()),
        (4, 5, "node-b")
    );
    assert_eq!(made.allocation(), d.allocation());
}

/// 1,000 subscribers over 100,000 stream sources, as `allocate` decides it
/// once a newcomer has joined (so there are handovers too).
fn large_decision(group: &str) -> Decision {
    let synthetic = uniform_group(1_001, 100_000);
    let orders = Category::new("orders").expect("valid");
    // One set shared by every member, as the allocator is fastest with.
    let shared: Arc<BTreeSet<Source>> = Arc::new(
        synthetic[0]
            .sources
            .iter()
            .map(|s| Source::Stream(orders.clone(), StreamName::new(s.as_str()).expect("valid")))
            .collect(),
    );
    let mut members: Vec<_> = synthetic
        .into_iter()
        .map(|m| crate::allocation::Member::new(m.id, m.node, Arc::clone(&shared)))
        .collect();
    let newcomer = members.pop().expect("1,001 members");
    let none = BTreeSet::new();
    let first = allocate(&AllocationInput {
        members: &members,
        required_tags: &none,
        current: &Allocation::default(),
        released: &BTreeSet::new(),
    });
    members.push(newcomer);
    let second = allocate(&AllocationInput {
        members: &members,
        required_tags: &none,
        current: &first,
        released: &BTreeSet::new(),
    });
    Decision {
        issued_at: issued(),
        ..Decision::from_allocation(group, 2, 41, "node-a", &second)
    }
}

/// A small deterministic shuffle, so the test needs no random source.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        items.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

#[test]
fn a_large_decision_splits_under_one_mebibyte_and_reassembles() {
    const MIB: usize = 1 << 20;
    let big = large_decision("orders");
    let other = Decision {
        group: "payments".into(),
        revision: 7,
        ..big.clone()
    };
    assert_eq!(big.handovers.len(), 99);
    let whole = encode(&big.clone().into());
    assert!(whole.len() > MIB, "only {} bytes", whole.len());

    let parts = encode_decision_parts(&big, MIB);
    let other_parts = encode_decision_parts(&other, MIB);
    assert!(parts.len() >= 2);
    for bytes in parts.iter().chain(&other_parts) {
        assert!(bytes.len() <= MIB, "a part has {} bytes", bytes.len());
    }
    // Parts are close to full: no more than one part more than needed.
    assert!(parts.len() <= whole.len().div_ceil(MIB) + 1);

    let mut mixed: Vec<&Vec<u8>> = parts.iter().chain(&other_parts).collect();
    shuffle(&mut mixed, 0x9e37_79b9_7f4a_7c15);
    let mut assembler = DecisionAssembler::new();
    let mut done = Vec::new();
    for bytes in mixed {
        done.extend(assembler.push(part_of(bytes)));
    }
    assert_eq!(done.len(), 2);
    let got_big = done.iter().find(|d| d.group == "orders").expect("orders");
    let got_other = done
        .iter()
        .find(|d| d.group == "payments")
        .expect("payments");
    assert_eq!(got_big, &big);
    assert_eq!(got_other, &other);
    assert_eq!(assembler.pending(), 0);
}

#[test]
fn one_subscribers_sources_are_split_across_parts_when_they_must() {
    let decision = Decision {
        owners: [(
            "only".to_owned(),
            (0..500)
                .map(|i| source(&format!("stream:orders/order-{i:05}")))
                .collect(),
        )]
        .into(),
        handovers: BTreeMap::new(),
        paused: false,
        ..small_decision("g", 1, 1)
    };
    let parts = encode_decision_parts(&decision, 2_000);
    assert!(parts.len() > 5);
    let mut assembler = DecisionAssembler::new();
    let mut done = None;
    for bytes in parts.iter().rev() {
        assert!(bytes.len() <= 2_000);
        assert!(done.is_none());
        done = assembler.push(part_of(bytes));
    }
    assert_eq!(done, Some(decision));
}

#[test]
fn a_decision_that_fits_is_one_part() {
    let decision = small_decision("g", 1, 1);
    let parts = encode_decision_parts(&decision, 1 << 20);
    assert_eq!(parts, vec![encode(&decision.clone().into())]);
    assert_eq!(decode(&parts[0]), Ok(BusMessage::Decision(decision)));
}

#[test]
fn older_incomplete_assemblies_are_dropped_when_a_newer_one_completes() {
    let old = split_decision("g", 1, 1);
    let new = split_decision("g", 1, 2);
    let old_parts = encode_decision_parts(&old, 600);
    let new_parts = encode_decision_parts(&new, 600);
    assert!(old_parts.len() > 1);
    let mut assembler = DecisionAssembler::new();
    assert_eq!(assembler.push(part_of(&old_parts[0])), None);
    let mut done = None;
    for bytes in &new_parts {
        done = assembler.push(part_of(bytes));
    }
    assert_eq!(done, Some(new.clone()));
    assert_eq!(assembler.pending(), 0);
    for bytes in &old_parts[1..] {
        assert_eq!(assembler.push(part_of(bytes)), None);
    }
    // A duplicate of the delivered decision is not delivered twice.
    for bytes in &new_parts {
        assert_eq!(assembler.push(part_of(bytes)), None);
    }
    assert_eq!(assembler.pending(), 0);
}

#[test]
fn pending_assemblies_are_bounded() {
    let mut assembler = DecisionAssembler::new();
    for revision in 0..20 {
        let parts = encode_decision_parts(&split_decision("g", 1, revision), 600);
        assert_eq!(assembler.push(part_of(&parts[0])), None);
    }
    assert_eq!(assembler.pending(), MAX_PENDING_PER_GROUP);
}

fn arbitrary_source() -> impl Strategy<Value = Source> {
    prop_oneof![
        1 => Just(Source::Log),
        3 => "[a-z]{1,6}".prop_map(|c| Source::Category(Category::new(c).expect("valid"))),
        6 => ("[a-z]{1,4}", "[a-z0-9é-]{1,12}").prop_map(|(c, s)| {
            Source::Stream(Category::new(c).expect("valid"), StreamName::new(s).expect("valid"))
        }),
    ]
}

fn arbitrary_decision() -> impl Strategy<Value = Decision> {
    let id = "[a-z\"\\\\]{1,8}";
    (
        "[a-z]{1,10}",
        any::<u64>(),
        any::<u64>(),
        proptest::collection::btree_map(
            id,
            proptest::collection::btree_set(arbitrary_source(), 0..30),
            0..8,
        ),
        proptest::collection::btree_map(
            arbitrary_source(),
            (id, id).prop_map(|(from, to)| Handover { from, to }),
            0..10,
        ),
    )
        .prop_map(|(group, epoch, revision, owners, handovers)| Decision {
            group,
            epoch,
            revision,
            coordinator: "node-a".into(),
            issued_at: issued(),
            owners,
            handovers,
            paused: false,
        })
}

proptest! {
    #[test]
    fn split_then_reassemble_is_the_identity(
        decision in arbitrary_decision(),
        max_bytes in 0usize..3_000,
        seed in any::<u64>(),
    ) {
        let mut parts = encode_decision_parts(&decision, max_bytes);
        let whole_len = encode(&decision.clone().into()).len();
        if whole_len <= max_bytes {
            prop_assert_eq!(parts.len(), 1);
        }
        for bytes in &parts {
            let part = part_of(bytes);
            prop_assert_eq!(part.parts as usize, parts.len());
            let items = part.decision.owners.values().map(|s| s.len().max(1)).sum::<usize>()
                + part.decision.handovers.len();
            // Over the limit only when one source or handover alone is too big.
            prop_assert!(bytes.len() <= max_bytes || items <= 1, "{} > {}", bytes.len(), max_bytes);
        }
        shuffle(&mut parts, seed | 1);
        let mut assembler = DecisionAssembler::new();
        let mut done = Vec::new();
        for bytes in &parts {
            done.extend(assembler.push(part_of(bytes)));
        }
        prop_assert_eq!(done, vec![decision]);
    }
}

fn moved(decision: &Decision, revision: u64) -> Decision {
    let mut next = decision.clone();
    next.revision = revision;
    next.issued_at = issued() + chrono::Duration::seconds(1);
    let invoice = source("category:invoices");
    next.owners.get_mut("billing-1").unwrap().remove(&invoice);
    next.owners.get_mut("billing-2").unwrap().insert(invoice);
    next.owners.insert("billing-9".into(), BTreeSet::new());
    next.handovers.clear();
    next.handovers.insert(
        source("stream:orders/order-42"),
        Handover {
            from: "billing-1".into(),
            to: "billing-2".into(),
        },
    );
    next
}

#[test]
fn a_delta_turns_its_base_into_the_next_decision_and_nothing_else() {
    let base = split_decision("billing", 3, 17);
    let mut next = moved(&base, 18).with_paused(true);
    next.owners.remove("billing-3");
    let delta = Delta::between(&base, &next).expect("newer");
    let bytes = encode_delta(&delta);
    assert!(bytes.len() < 700, "{}", String::from_utf8_lossy(&bytes));
    let Ok(Frame::Delta(read)) = decode_frame(&bytes) else {
        panic!("not a delta: {}", String::from_utf8_lossy(&bytes));
    };
    assert_eq!(read, delta);
    let mut applied = base.clone();
    assert!(read.apply(&mut applied));
    assert_eq!(applied, next);
    assert_eq!(read.digest, next.digest());
    // Not to another base, nor twice.
    assert!(!read.apply(&mut applied));
    let mut other = small_decision("billing", 3, 16);
    assert!(!read.apply(&mut other));
    assert_eq!(other, small_decision("billing", 3, 16));
    assert_eq!(Delta::between(&next, &base), None, "not newer");
    assert!(matches!(
        decode(&bytes),
        Err(DecodeError::Delta { revision: 18, .. })
    ));
}

#[test]
fn digests_tell_content_apart_and_round_trip() {
    let d = small_decision("billing", 3, 17);
    assert_eq!(d.digest(), d.clone().digest());
    let mut renamed = d.clone();
    renamed.coordinator = "node-b".into();
    renamed.issued_at = issued() + chrono::Duration::hours(1);
    assert_eq!(renamed.digest(), d.digest(), "who and when are not content");
    for other in [
        d.clone().with_paused(true),
        moved(&d, 17),
        small_decision("payments", 3, 17),
    ] {
        assert_ne!(other.digest(), d.digest(), "{other:?}");
    }
    let digest = Digest::of(&d);
    let bytes = encode(&BusMessage::Digest(digest.clone()));
    assert!(bytes.len() < 200);
    assert_eq!(decode(&bytes), Ok(BusMessage::Digest(digest.clone())));
    assert!(!digest.is_lacked_by(Some(((3, 17), d.digest()))));
    assert!(digest.is_lacked_by(Some(((3, 17), ContentDigest(1)))));
    assert!(digest.is_lacked_by(Some(((3, 16), d.digest()))));
    assert!(digest.is_lacked_by(None));
    assert!(!digest.is_lacked_by(Some(((4, 0), ContentDigest(1)))));
}

#[test]
fn a_reader_applies_changes_it_holds_the_base_of_and_names_those_it_cannot() {
    let base = small_decision("billing", 3, 17);
    let next = moved(&base, 18);
    let after = moved(&next, 19).with_paused(true);
    let frame = |bytes: Vec<u8>| decode_frame(&bytes).expect("readable");
    let mut reader = DecisionReader::new();
    // Without the base: the digest of what the change makes, for a fetch.
    let change = frame(encode_delta(&Delta::between(&base, &next).unwrap()));
    assert_eq!(
        reader.push(change.clone()),
        Some(BusMessage::Digest(Digest::of(&next)))
    );
    reader.push(frame(encode(&base.clone().into())));
    assert_eq!(
        reader.push(change.clone()),
        Some(BusMessage::Decision(next.clone()))
    );
    // A redelivery, and the whole decision once it is older, yield nothing.
    assert_eq!(reader.push(change), None);
    assert_eq!(reader.push(frame(encode(&base.clone().into()))), None);
    // A fetched decision becomes the base.
    let mut late = DecisionReader::new();
    late.adopt(&next);
    let last = frame(encode_delta(&Delta::between(&next, &after).unwrap()));
    assert_eq!(late.push(last), Some(BusMessage::Decision(after.clone())));
    assert_eq!(late.into_decisions(), vec![after]);
}

#[test]
fn names_that_need_escaping_are_written_as_serde_writes_them() {
    let mut d = small_decision("bill\"ing\n", 1, 1);
    let sources = d.owners.remove("billing-1").unwrap();
    d.owners.insert("sub\\\"1\u{7}é".into(), sources);
    let expected = serde_json::to_value(&d.owners).unwrap();
    let bytes = encode(&d.clone().into());
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(value["owners"], expected);
    assert_eq!(value["group"], "bill\"ing\n");
    assert_eq!(decode(&bytes), Ok(BusMessage::Decision(d)));
}

#[test]
fn a_decision_exactly_at_the_limit_is_one_part_and_one_byte_over_is_split() {
    let d = split_decision("billing", 3, 17);
    let whole = encode(&d.clone().into()).len();
    assert_eq!(
        encode_decision_parts(&d, whole),
        vec![encode(&d.clone().into())]
    );
    let parts = encode_decision_parts(&d, whole - 1);
    assert!(parts.len() > 1);
    assert!(parts.iter().all(|part| part.len() < whole), "{parts:?}");
}

#[test]
fn a_change_is_written_only_against_a_decision_of_its_own_term() {
    use crate::bus::chain::{Chain, Publication};
    let limit = 1 << 20;
    let first = split_decision("billing", 1, 4);
    let chain = Chain::after(None, &first, &Chain::plan(None, &first, limit));
    let same_term = moved(&first, 5);
    assert!(matches!(
        Chain::plan(Some(&chain), &same_term, limit),
        Publication::Delta(_)
    ));
    // The same change two terms later: whatever another leader published in
    // between, this chain cannot be its base.
    let next_term = Decision {
        epoch: 3,
        revision: 1,
        ..same_term
    };
    assert!(matches!(
        Chain::plan(Some(&chain), &next_term, limit),
        Publication::Snapshot(_)
    ));
}
