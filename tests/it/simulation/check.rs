//! What the simulation checks, from outside the nodes: every batch the simulated
//! sink received, every claim and every successful checkpoint save the stores
//! saw, and what the store holds.
//!
//! At every batch and every save:
//! - a source's events are emitted only by the process holding its claim, except
//!   for the one batch a process may have in flight when its claim is taken;
//! - a checkpoint never goes back.
//!
//! At the end ([`Ledger::verdict`]): every appended event emitted at least once,
//! each stream's events first emitted in order, no repeat when every move was
//! planned, and repeats after faults bounded by the checkpoint cadence.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use weir::consumer::{EventProcessor, ProcessError};
use weir::event::{Cursor, Source, StoredEvent};

#[derive(Default)]
struct State {
    /// The process holding each source's claim.
    holder: BTreeMap<Source, String>,
    /// Batches each process emitted for a source after its claim was taken.
    zombie_batches: BTreeMap<(Source, String), u32>,
    /// The last saved cursor of each source.
    saved: BTreeMap<Source, Cursor>,
    /// Per stream (category/stream), the positions emitted so far.
    emitted: BTreeMap<String, BTreeSet<u64>>,
    /// Emissions of an event already emitted, per source.
    repeats: BTreeMap<Source, u64>,
    /// Repeats an operator asked for, per source: resets to an earlier cursor.
    asked_repeats: BTreeMap<Source, u64>,
    /// How many times the store was replaced; claims and saves in an older
    /// store (a process's call still under way when it went) change nothing.
    generation: u32,
    violations: Vec<String>,
    trace: std::collections::VecDeque<String>,
    hasher: DefaultHasher,
    now_ms: u64,
}

/// Everything the simulation observes, shared by the sinks, the stores and the
/// driver.
#[derive(Clone)]
pub struct Ledger {
    state: Arc<Mutex<State>>,
    origin: tokio::time::Instant,
    /// How many trace lines to keep.
    tail: usize,
}

impl Ledger {
    /// A ledger keeping the last `tail` lines of the trace.
    pub fn new(tail: usize) -> Self {
        Self {
            state: Arc::default(),
            origin: tokio::time::Instant::now(),
            tail,
        }
    }

    /// Notes a step of the run in the trace (and its hash).
    pub fn step(&self, line: String) {
        let mut state = self.state.lock().unwrap();
        let elapsed = tokio::time::Instant::now().duration_since(self.origin);
        state.now_ms = u64::try_from(elapsed.as_millis()).unwrap_or_default();
        let line = format!("{:>7}ms {line}", state.now_ms);
        line.hash(&mut state.hasher);
        state.trace.push_back(line);
        if state.trace.len() > self.tail {
            state.trace.pop_front();
        }
    }

    /// Records a violation (once, however often it is seen again).
    pub fn violate(&self, violation: String) {
        if self.state.lock().unwrap().violations.contains(&violation) {
            return;
        }
        self.step(format!("VIOLATION {violation}"));
        self.state.lock().unwrap().violations.push(violation);
    }

    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    pub fn trace_hash(&self) -> u64 {
        self.state.lock().unwrap().hasher.finish()
    }

    pub fn trace_tail(&self) -> Vec<String> {
        self.state.lock().unwrap().trace.iter().cloned().collect()
    }

    /// `process` now holds the claim of `source`.
    pub fn claimed(&self, source: &Source, process: &str, generation: u32) {
        if self.old_store(generation, format!("{process} claims {source}")) {
            return;
        }
        self.step(format!("{process} claims {source}"));
        let mut state = self.state.lock().unwrap();
        state.holder.insert(source.clone(), process.to_owned());
        state
            .zombie_batches
            .remove(&(source.clone(), process.to_owned()));
    }

    /// `process` saved `cursor` for `source`.
    pub fn saved(&self, source: &Source, process: &str, cursor: Cursor, generation: u32) {
        if self.old_store(generation, format!("{process} saves {source} at {cursor}")) {
            return;
        }
        self.step(format!("{process} saves {source} at {cursor}"));
        let previous = {
            let mut state = self.state.lock().unwrap();
            state.saved.insert(source.clone(), cursor)
        };
        if previous.is_some_and(|previous| previous > cursor) {
            self.violate(format!(
                "the checkpoint of {source} went back from {} to {cursor} (saved by {process})",
                previous.unwrap_or(cursor)
            ));
        }
    }

    /// An operator reset the checkpoint of `source` to `cursor`, asking for
    /// `again` events to be processed again.
    pub fn reset(&self, source: &Source, cursor: Cursor, again: u64, generation: u32) {
        let what = format!("operator resets {source} to {cursor}: {again} events again");
        if self.old_store(generation, what.clone()) {
            return;
        }
        self.step(what);
        let mut state = self.state.lock().unwrap();
        state.saved.insert(source.clone(), cursor);
        *state.asked_repeats.entry(source.clone()).or_default() += again;
    }

    /// The store was replaced by an empty one: forgets its claims and
    /// checkpoints, and says how many events of each stream were emitted (the
    /// rest went with the store).
    pub fn forget_store(&self) -> BTreeMap<String, u64> {
        let mut state = self.state.lock().unwrap();
        state.generation += 1;
        state.holder.clear();
        state.zombie_batches.clear();
        state.saved.clear();
        state
            .emitted
            .iter()
            .map(|(stream, positions)| (stream.clone(), positions.len() as u64))
            .collect()
    }

    /// Whether `generation` is a replaced store's; if so, traces `what` as such.
    fn old_store(&self, generation: u32, what: String) -> bool {
        let current = self.state.lock().unwrap().generation;
        if generation == current {
            return false;
        }
        self.step(format!("{what} (in the replaced store {generation})"));
        true
    }

    /// `process`, consuming `sources`, emitted `events` (one batch of one
    /// source).
    fn emitted(&self, process: &str, sources: &[Source], events: &[StoredEvent]) {
        let Some(first) = events.first() else {
            return;
        };
        let source = sources
            .iter()
            .find(|source| source.holds(first))
            .cloned()
            .expect("every simulated event belongs to one source");
        let last = events.last().unwrap_or(first);
        self.step(format!(
            "{process} emits {} events of {source}, {} to {}",
            events.len(),
            first.cursor,
            last.cursor
        ));
        let mut violations = Vec::new();
        {
            let mut state = self.state.lock().unwrap();
            let holder = state.holder.get(&source).cloned();
            if holder.as_deref() != Some(process) {
                let key = (source.clone(), process.to_owned());
                let batches = state.zombie_batches.entry(key).or_default();
                *batches += 1;
                if *batches > 1 {
                    violations.push(format!(
                        "{process} emitted {batches} batches of {source} after its claim was taken (by {holder:?})"
                    ));
                }
            }
            for event in events {
                let stream = format!("{}/{}", event.category, event.stream);
                let positions = state.emitted.entry(stream.clone()).or_default();
                if !positions.insert(event.position) {
                    *state.repeats.entry(source.clone()).or_default() += 1;
                    continue;
                }
                let expected = positions.len() as u64 - 1;
                if event.position != expected {
                    violations.push(format!(
                        "{process} emitted {stream} position {} before position {expected}",
                        event.position
                    ));
                }
            }
        }
        for violation in violations {
            self.violate(violation);
        }
    }

    /// Whether every one of `appended` (per stream, how many) was emitted.
    pub fn all_emitted(&self, appended: &BTreeMap<String, u64>) -> bool {
        let state = self.state.lock().unwrap();
        appended.iter().all(|(stream, count)| {
            state.emitted.get(stream).map_or(0, BTreeSet::len) as u64 == *count
        })
    }

    /// The final checks: nothing lost, repeats within `bound` per source (0 when
    /// every move was planned).
    pub fn verdict(&self, appended: &BTreeMap<String, u64>, repeat_bound: u64) {
        if !self.all_emitted(appended) {
            let state = self.state.lock().unwrap();
            let missing: Vec<String> = appended
                .iter()
                .filter_map(|(stream, count)| {
                    let emitted = state.emitted.get(stream).map_or(0, BTreeSet::len) as u64;
                    (emitted != *count).then(|| format!("{stream}: {emitted} of {count}"))
                })
                .collect();
            drop(state);
            self.violate(format!("events never emitted: {}", missing.join(", ")));
        }
        let (repeats, asked) = {
            let state = self.state.lock().unwrap();
            (state.repeats.clone(), state.asked_repeats.clone())
        };
        for (source, count) in repeats {
            let bound = repeat_bound + asked.get(&source).copied().unwrap_or_default();
            if count > bound {
                self.violate(format!(
                    "{count} events of {source} emitted twice, more than the bound of {bound} ({repeat_bound} for faults, the rest asked for by resets)"
                ));
            }
        }
    }

    pub fn repeats(&self) -> u64 {
        self.state.lock().unwrap().repeats.values().sum()
    }
}

/// The simulated sink: records each batch as its process emitted it.
pub struct Sink {
    pub process: String,
    /// The sources its process consumes (the partition layout it started with).
    pub sources: Vec<Source>,
    pub ledger: Ledger,
}

#[async_trait]
impl EventProcessor for Sink {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        // Work takes a moment, so that moves meet batches in flight.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        self.ledger.emitted(&self.process, &self.sources, events);
        Ok(())
    }
}
