//! What the decisions stream holds of one group, by version: the subjects of a
//! decision's parts, or of the change it was written as, or both while a whole
//! republish replaces a change.

/// The parts of one decision version found in the stream, or its delta.
#[derive(Default)]
pub(super) struct StoredVersion {
    /// How many parts the decision has, if it is stored as a snapshot.
    pub(super) parts: Option<u64>,
    /// Whether it is stored as a change.
    pub(super) delta: bool,
    pub(super) subjects: Vec<String>,
}

impl StoredVersion {
    /// Stored so that a reader can rebuild it: every part, or a change.
    pub(super) fn is_whole(&self) -> bool {
        self.delta || self.is_snapshot()
    }

    /// Stored as every part of a snapshot.
    pub(super) fn is_snapshot(&self) -> bool {
        let snapshot_parts = self.subjects.len() as u64 - u64::from(self.delta);
        self.parts.is_some_and(|parts| parts == snapshot_parts)
    }
}

/// The version of the delta stored at `subject` (`PREFIX.EPOCH.REVISION.delta`).
pub(super) fn delta_version(prefix: &str, subject: &str) -> Option<(u64, u64)> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (epoch, rest) = rest.split_once('.')?;
    let revision = rest.strip_suffix(".delta")?;
    Some((epoch.parse().ok()?, revision.parse().ok()?))
}
