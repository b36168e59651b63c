//! Bringing an existing stream of the bus up to what the bus needs: limits are
//! corrected in place; subjects, storage and retention cannot be, and replicas
//! and placement are the operator's.

use async_nats::jetstream::stream;

/// What to change in the stream `existing` so that it serves as `wanted`:
/// `None` if it already does; an explanation if it cannot be changed in place.
pub(super) fn reconcile(
    existing: &stream::Config,
    wanted: &stream::Config,
) -> Result<Option<stream::Config>, String> {
    let name = &wanted.name;
    if existing.subjects != wanted.subjects {
        return Err(format!(
            "stream {name} exists with subjects {:?}, not {:?}: it belongs to something else (namespaces that differ only in letter case share stream names); choose another bus.namespace or remove the stream with `nats stream rm {name}`",
            existing.subjects, wanted.subjects
        ));
    }
    if existing.storage != wanted.storage || existing.retention != wanted.retention {
        return Err(format!(
            "stream {name} exists with {:?} storage and {:?} retention, but the bus needs {:?} storage and {:?} retention, which JetStream cannot change in place: remove it with `nats stream rm {name}` and restart",
            existing.storage, existing.retention, wanted.storage, wanted.retention
        ));
    }
    // Everything else (replicas, placement, size limits) is the operator's to tune.
    // The server reports an unlimited count as -1 where a config asks with 0.
    let unlimited = |limit: i64| limit <= 0;
    let max_messages_per_subject = if unlimited(wanted.max_messages_per_subject)
        && unlimited(existing.max_messages_per_subject)
    {
        existing.max_messages_per_subject
    } else {
        wanted.max_messages_per_subject
    };
    let updated = stream::Config {
        max_messages_per_subject,
        max_age: wanted.max_age,
        discard: wanted.discard,
        ..existing.clone()
    };
    Ok((updated != *existing).then_some(updated))
}
