//! Writes decision payloads straight into byte buffers: every source is turned
//! into its canonical text and escaped once, with no per-source strings, maps or
//! size probes, which is what made encoding a large decision slower than
//! computing it. The bytes are exactly those serde would write for
//! [`super::DecisionOut`], so readers see no difference.

use std::fmt::Write as _;

use serde::Serialize;

use super::{Decision, WIRE_VERSION};
use crate::allocation::Handover;
use crate::event::Source;

/// Appends `text` as a JSON string.
pub(super) fn write_str(out: &mut Vec<u8>, text: &str) {
    let plain = text
        .bytes()
        .all(|byte| byte >= 0x20 && byte != b'"' && byte != b'\\');
    if plain {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        write_json(out, text);
    }
}

/// Appends `value` as serde_json writes it.
pub(super) fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Every type written here is made of strings, integers, timestamps and maps
    // with string keys, which serde_json always serialises.
    serde_json::to_writer(out, value).expect("bus messages always serialise to JSON");
}

/// Turns sources into JSON strings, reusing one text buffer for all of them.
#[derive(Default)]
pub(super) struct SourceWriter {
    text: String,
}

impl SourceWriter {
    pub(super) fn write(&mut self, out: &mut Vec<u8>, source: &Source) {
        self.text.clear();
        // Writing to a String cannot fail.
        let _ = write!(self.text, "{source}");
        write_str(out, &self.text);
    }

    /// The canonical text of `source`, valid until the next call.
    pub(super) fn text(&mut self, source: &Source) -> &str {
        self.text.clear();
        let _ = write!(self.text, "{source}");
        &self.text
    }
}

/// The start of a decision payload, before its owners and handovers:
/// `{"v":1,"kind":"decision",…,"part":P,"parts":N` and `"paused":true` if so.
fn header(out: &mut Vec<u8>, decision: &Decision, part: u32, parts: u32) {
    out.extend_from_slice(b"{\"v\":");
    out.extend_from_slice(WIRE_VERSION.to_string().as_bytes());
    out.extend_from_slice(b",\"kind\":\"decision\",\"group\":");
    write_str(out, &decision.group);
    let _ = write!(
        Bytes(out),
        ",\"epoch\":{},\"revision\":{},\"coordinator\":",
        decision.epoch,
        decision.revision
    );
    write_str(out, &decision.coordinator);
    out.extend_from_slice(b",\"issued_at\":");
    write_json(out, &decision.issued_at);
    let _ = write!(Bytes(out), ",\"part\":{part},\"parts\":{parts}");
    if decision.paused {
        out.extend_from_slice(b",\"paused\":true");
    }
}

/// `fmt::Write` over a byte buffer, for numbers.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

/// What one part carries: the inside of its `owners` and `handovers` objects.
#[derive(Default)]
struct Body {
    owners: Vec<u8>,
    handovers: Vec<u8>,
    /// Whether the last subscriber's source list is still open (no `]` yet).
    open: bool,
}

impl Body {
    fn is_empty(&self) -> bool {
        self.owners.is_empty() && self.handovers.is_empty()
    }

    /// Bytes of `{owners}` and `{handovers}`, with the open list closed.
    fn bytes(&self) -> usize {
        4 + self.owners.len() + self.handovers.len() + usize::from(self.open)
    }

    fn close(&mut self) {
        if std::mem::take(&mut self.open) {
            self.owners.push(b']');
        }
    }

    fn owners_comma(&self) -> usize {
        usize::from(!self.owners.is_empty())
    }

    fn push_owner(&mut self, bytes: &[u8]) {
        if !self.owners.is_empty() {
            self.owners.push(b',');
        }
        self.owners.extend_from_slice(bytes);
    }
}

/// A subscriber's whole entry, `"id":["a","b"]`, with where each source starts.
struct Entry {
    bytes: Vec<u8>,
    /// Length of `"id":[`.
    key: usize,
    /// Start of each source, and the end of the last one.
    bounds: Vec<usize>,
}

impl Entry {
    fn new(
        sources: &mut SourceWriter,
        id: &str,
        owned: &std::collections::BTreeSet<Source>,
    ) -> Self {
        let mut bytes = Vec::with_capacity(id.len() + 4 + owned.len() * 32);
        let mut bounds = Vec::with_capacity(owned.len() + 1);
        write_str(&mut bytes, id);
        bytes.extend_from_slice(b":[");
        let key = bytes.len();
        for (i, source) in owned.iter().enumerate() {
            if i > 0 {
                bytes.push(b',');
            }
            bounds.push(bytes.len());
            sources.write(&mut bytes, source);
        }
        bounds.push(bytes.len());
        bytes.push(b']');
        Self { bytes, key, bounds }
    }
}

/// Encodes `decision` as payloads of at most `max_bytes` (see
/// [`super::encode_decision_parts`]): one if the whole fits, otherwise parts
/// filled greedily in order, a subscriber going whole into a fresh part rather
/// than being split unless no part could hold it whole.
pub(super) fn encode_parts(decision: &Decision, max_bytes: usize) -> Vec<Vec<u8>> {
    let mut sources = SourceWriter::default();
    let entries: Vec<Entry> = decision
        .owners
        .iter()
        .map(|(id, owned)| Entry::new(&mut sources, id, owned))
        .collect();
    let handovers: Vec<Vec<u8>> = decision
        .handovers
        .iter()
        .map(|(source, moving)| {
            let mut bytes = Vec::new();
            sources.write(&mut bytes, source);
            bytes.push(b':');
            write_json::<Handover>(&mut bytes, moving);
            bytes
        })
        .collect();
    let mut probe = Vec::with_capacity(256);
    header(&mut probe, decision, 1, 1);
    let joined = |items: usize, bytes: usize| bytes + items.saturating_sub(1);
    // `,"owners":{` `},"handovers":{` `}}` around the entries.
    let whole = probe.len()
        + 28
        + joined(entries.len(), entries.iter().map(|e| e.bytes.len()).sum())
        + joined(handovers.len(), handovers.iter().map(Vec::len).sum());
    // The header with the widest part numbers, `,"owners":`, `,"handovers":`, `}`.
    probe.clear();
    header(&mut probe, decision, u32::MAX, u32::MAX);
    let budget = if whole <= max_bytes {
        usize::MAX
    } else {
        max_bytes.saturating_sub(probe.len() + 10 + 13 + 1)
    };
    let mut bodies = vec![Body::default()];
    for entry in &entries {
        place_entry(&mut bodies, entry, budget);
    }
    for handover in &handovers {
        let body = with_room(&mut bodies, budget, |body| {
            usize::from(!body.handovers.is_empty()) + handover.len()
        });
        if !body.handovers.is_empty() {
            body.handovers.push(b',');
        }
        body.handovers.extend_from_slice(handover);
    }
    let parts = u32::try_from(bodies.len()).unwrap_or(u32::MAX);
    bodies
        .into_iter()
        .zip(1..=parts)
        .map(|(mut body, part)| {
            body.close();
            let mut out = Vec::with_capacity(probe.len() + body.bytes() + 24);
            header(&mut out, decision, part, parts);
            out.extend_from_slice(b",\"owners\":{");
            out.extend_from_slice(&body.owners);
            out.extend_from_slice(b"},\"handovers\":{");
            out.extend_from_slice(&body.handovers);
            out.extend_from_slice(b"}}");
            out
        })
        .collect()
}

/// The last body, or a fresh one if adding what `cost` says would take the last
/// over `budget`. A body is never left empty.
fn with_room(bodies: &mut Vec<Body>, budget: usize, cost: impl Fn(&Body) -> usize) -> &mut Body {
    let last = bodies.last_mut().expect("bodies is non-empty");
    if last.bytes().saturating_add(cost(last)) > budget && !last.is_empty() {
        last.close();
        bodies.push(Body::default());
    }
    bodies.last_mut().expect("bodies is non-empty")
}

/// Adds one subscriber's entry: whole where it fits, source by source otherwise.
fn place_entry(bodies: &mut Vec<Body>, entry: &Entry, budget: usize) {
    let whole = entry.bytes.len();
    let last = bodies.last_mut().expect("bodies is non-empty");
    last.close();
    if (last.bytes() + last.owners_comma()).saturating_add(whole) <= budget {
        last.push_owner(&entry.bytes);
        return;
    }
    if !last.is_empty() && 4 + whole <= budget {
        // Whole in a fresh part rather than split: fewer subscribers straddle parts.
        let mut fresh = Body::default();
        fresh.push_owner(&entry.bytes);
        bodies.push(fresh);
        return;
    }
    let key = &entry.bytes[..entry.key];
    if entry.bounds.len() == 1 {
        let body = with_room(bodies, budget, |body| body.owners_comma() + whole);
        body.push_owner(&entry.bytes);
        return;
    }
    for window in entry.bounds.windows(2) {
        let source = &entry.bytes[window[0]..window[1]];
        let source = source.strip_suffix(b",").unwrap_or(source);
        let body = with_room(bodies, budget, |body| match body.open {
            true => 1 + source.len(),
            false => body.owners_comma() + key.len() + 1 + source.len(),
        });
        if body.open {
            body.owners.push(b',');
        } else {
            body.push_owner(key);
            body.open = true;
        }
        body.owners.extend_from_slice(source);
    }
    bodies.last_mut().expect("bodies is non-empty").close();
}
