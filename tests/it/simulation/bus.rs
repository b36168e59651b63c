//! The simulation's allocation bus: one log of records shared by the fleet, and
//! a handle per node process that keeps, like the real backends, its own memory
//! of what it wrote (the chain its next change may refer to).
//!
//! The log stores decisions as the real buses do, so that what a node reads as
//! "the newest" is what it would read there:
//! - [`Flavour::Kafka`]: part records keyed `GROUP#PART`, changes keyed
//!   `GROUP#delta.E.R`, tombstones for superseded keys; a subscription reads the
//!   decisions from the start of the log, and compaction (a fault the world
//!   injects at random) keeps the last record per key and drops tombstones.
//! - [`Flavour::JetStream`]: one message per subject at all times (compaction on
//!   every write), and a change written only on top of the newest version the log
//!   holds whole.
//!
//! Signals and digests go to a second topic read only from where a subscription
//! started. A node's [`Link`] can cut it off (publishes fail, nothing is
//! delivered), freeze it (every call waits) or make its subscriptions lossy
//! (payloads dropped, duplicated or delivered late).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use weir::bus::chain::{Chain, Publication};
use weir::bus::{
    AllocationBus, BusMessage, BusMeter, BusSubscription, Decision, DecisionReader, Error, Frame,
    decode_frame, encode,
};

use super::check::Ledger;
use super::faults::Link;

const MAX_PAYLOAD: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Kafka,
    JetStream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topic {
    Decisions,
    Signals,
}

#[derive(Debug, Clone)]
struct Record {
    offset: u64,
    topic: Topic,
    key: String,
    payload: Option<Arc<[u8]>>,
}

/// The log every handle of one fleet shares.
pub struct SharedLog {
    flavour: Flavour,
    records: Mutex<Vec<Record>>,
    /// The next offset; changes wake subscriptions.
    end: watch::Sender<u64>,
}

impl SharedLog {
    pub fn new(flavour: Flavour) -> Arc<Self> {
        Arc::new(Self {
            flavour,
            records: Mutex::new(Vec::new()),
            end: watch::channel(0).0,
        })
    }

    fn append(&self, topic: Topic, key: String, payload: Option<Vec<u8>>) {
        let mut records = self.records.lock().unwrap();
        let offset = *self.end.borrow();
        if self.flavour == Flavour::JetStream && topic == Topic::Decisions {
            records.retain(|r| r.topic != Topic::Decisions || r.key != key);
        }
        if payload.is_some() || self.flavour == Flavour::Kafka {
            records.push(Record {
                offset,
                topic,
                key,
                payload: payload.map(Into::into),
            });
        }
        drop(records);
        self.end.send_replace(offset + 1);
    }

    /// Kafka's log compaction: the last record of every key stays, tombstones go.
    pub fn compact(&self) {
        let mut records = self.records.lock().unwrap();
        let mut last: BTreeMap<(bool, &str), u64> = BTreeMap::new();
        for record in records.iter() {
            last.insert(
                (record.topic == Topic::Decisions, record.key.as_str()),
                record.offset,
            );
        }
        let keep: BTreeSet<u64> = last.into_values().collect();
        records.retain(|r| {
            r.topic == Topic::Signals || (keep.contains(&r.offset) && r.payload.is_some())
        });
    }

    /// The first record at or after `offset` a reader of `signals_from` sees.
    fn next_after(&self, offset: u64, signals_from: u64) -> Option<Record> {
        let records = self.records.lock().unwrap();
        let start = records.partition_point(|r| r.offset < offset);
        records[start..]
            .iter()
            .find(|r| r.topic == Topic::Decisions || r.offset >= signals_from)
            .cloned()
    }

    fn decision_records(&self) -> Vec<Record> {
        let records = self.records.lock().unwrap();
        records
            .iter()
            .filter(|r| r.topic == Topic::Decisions)
            .cloned()
            .collect()
    }
}

/// What one handle knows it wrote of a group, as the Kafka bus keeps it.
#[derive(Default, Clone)]
struct Written {
    published: Option<(u64, u64)>,
    parts: u32,
    chain: Option<Chain>,
    delta_keys: BTreeSet<String>,
}

/// One node process's handle on the shared log.
pub struct LogBus {
    log: Arc<SharedLog>,
    link: Arc<Link>,
    ledger: Ledger,
    process: String,
    written: Mutex<BTreeMap<String, Written>>,
    meter: Arc<BusMeter>,
    /// Seeds each subscription's loss pattern.
    seed: u64,
    subscriptions: Mutex<u64>,
}

impl LogBus {
    pub fn new(
        log: Arc<SharedLog>,
        link: Arc<Link>,
        seed: u64,
        ledger: Ledger,
        process: String,
    ) -> Self {
        Self {
            log,
            link,
            ledger,
            process,
            written: Mutex::new(BTreeMap::new()),
            meter: BusMeter::new(),
            seed,
            subscriptions: Mutex::new(0),
        }
    }

    async fn reach(&self) -> Result<(), Error> {
        self.link.wait_unfrozen().await;
        if self.link.state().bus_cut {
            return Err(Error::Unavailable("simulated: cut off from the bus".into()));
        }
        Ok(())
    }

    fn publish_decision(&self, decision: &Decision, whole: bool) {
        let group = decision.group.as_str();
        let mut written = self.written.lock().unwrap();
        let known = written.entry(group.to_owned()).or_default();
        if !whole && known.published == Some(decision.version()) {
            return;
        }
        let chain = known.chain.take().filter(|chain| {
            !whole
                && match self.log.flavour {
                    Flavour::Kafka => known.published == Some(chain.decision.version()),
                    Flavour::JetStream => {
                        self.newest_stored(group) == Some(chain.decision.version())
                    }
                }
        });
        let publication = Chain::plan(chain.as_ref(), decision, MAX_PAYLOAD);
        let (epoch, revision) = decision.version();
        let base = match (&publication, &chain) {
            (Publication::Delta(_), Some(chain)) => format!(" on {:?}", chain.decision.version()),
            _ => String::new(),
        };
        self.ledger.step(format!(
            "{} publishes {:?} as a {}{base}",
            self.process,
            decision.version(),
            publication.kind()
        ));
        match &publication {
            Publication::Delta(payload) => {
                let key = format!("{group}#delta.{epoch}.{revision}");
                self.log
                    .append(Topic::Decisions, key.clone(), Some(payload.clone()));
                known.delta_keys.insert(key);
            }
            Publication::Snapshot(parts) => {
                let count = u32::try_from(parts.len()).unwrap();
                for (part, payload) in (1..).zip(parts) {
                    let key = format!("{group}#{part}");
                    self.log
                        .append(Topic::Decisions, key, Some(payload.clone()));
                }
                for part in count + 1..=known.parts {
                    self.log
                        .append(Topic::Decisions, format!("{group}#{part}"), None);
                }
                for key in std::mem::take(&mut known.delta_keys) {
                    self.log.append(Topic::Decisions, key, None);
                }
                known.parts = count;
            }
        }
        known.published = Some(decision.version());
        known.chain = Some(Chain::after(chain, decision, &publication));
    }

    /// The newest version the log holds whole for `group` (JetStream's rule).
    fn newest_stored(&self, group: &str) -> Option<(u64, u64)> {
        self.read_log(|_| {})
            .into_iter()
            .find(|d| d.group == group)
            .map(|d| d.version())
    }

    /// Reads every decision record through a reader, noting what it sees.
    fn read_log(&self, mut note: impl FnMut(&Frame)) -> Vec<Decision> {
        let mut reader = DecisionReader::new();
        for record in self.log.decision_records() {
            let Some(payload) = record.payload else {
                continue;
            };
            if let Ok(frame @ (Frame::Decision(_) | Frame::Delta(_))) = decode_frame(&payload) {
                note(&frame);
                reader.push(frame);
            }
        }
        reader.into_decisions()
    }
}

#[async_trait]
impl AllocationBus for LogBus {
    async fn publish(&self, message: &BusMessage) -> Result<(), Error> {
        self.reach().await?;
        match message {
            BusMessage::Decision(decision) => self.publish_decision(decision, false),
            BusMessage::Signal(signal) => {
                let key = signal.group().to_owned();
                self.log.append(Topic::Signals, key, Some(encode(message)));
            }
            BusMessage::Digest(digest) => {
                let key = digest.group.clone();
                self.log.append(Topic::Signals, key, Some(encode(message)));
            }
        }
        Ok(())
    }

    async fn publish_whole(&self, decision: &Decision) -> Result<(), Error> {
        self.reach().await?;
        self.publish_decision(decision, true);
        Ok(())
    }

    async fn subscribe(&self) -> Result<BusSubscription, Error> {
        self.reach().await?;
        let signals_from = *self.log.end.borrow();
        let number = {
            let mut count = self.subscriptions.lock().unwrap();
            *count += 1;
            *count
        };
        let reader = Reader {
            log: Arc::clone(&self.log),
            link: Arc::clone(&self.link),
            end: self.log.end.subscribe(),
            links: self.link.watch(),
            next: 0,
            signals_from,
            random: StdRng::seed_from_u64(self.seed ^ number.rotate_left(32)),
            held: Vec::new(),
        };
        let payloads = futures::stream::unfold(reader, |mut reader| async move {
            let payload = reader.next().await?;
            Some((payload, reader))
        });
        Ok(BusSubscription::new(
            payloads.boxed(),
            Arc::clone(&self.meter),
        ))
    }

    async fn retained(&self) -> Result<Vec<Decision>, Error> {
        self.reach().await?;
        let mut parts: BTreeMap<String, u32> = BTreeMap::new();
        let mut deltas: Vec<(String, String)> = Vec::new();
        let decisions = self.read_log(|frame| match frame {
            Frame::Decision(part) => {
                let most = parts.entry(part.decision.group.clone()).or_default();
                *most = (*most).max(part.parts);
            }
            Frame::Delta(delta) => deltas.push((
                delta.group.clone(),
                format!("{}#delta.{}.{}", delta.group, delta.epoch, delta.revision),
            )),
            _ => {}
        });
        // Like the Kafka bus, a handle learns from a read which keys to tombstone.
        let mut written = self.written.lock().unwrap();
        for (group, most) in parts {
            let known = written.entry(group).or_default();
            known.parts = known.parts.max(most);
        }
        for (group, key) in deltas {
            written.entry(group).or_default().delta_keys.insert(key);
        }
        Ok(decisions)
    }
}

/// One subscription's position in the log and its loss pattern.
struct Reader {
    log: Arc<SharedLog>,
    link: Arc<Link>,
    end: watch::Receiver<u64>,
    links: watch::Receiver<super::faults::LinkState>,
    next: u64,
    signals_from: u64,
    random: StdRng,
    /// Payloads held back to be delivered after a later one.
    held: Vec<Vec<u8>>,
}

impl Reader {
    async fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            let state = self.links.borrow_and_update().clone();
            if state.frozen || state.bus_cut {
                self.links.changed().await.ok()?;
                continue;
            }
            let Some(record) = self.log.next_after(self.next, self.signals_from) else {
                if !self.held.is_empty() {
                    return Some(self.held.remove(0));
                }
                self.end.borrow_and_update();
                tokio::select! {
                    biased;
                    changed = self.end.changed() => changed.ok()?,
                    changed = self.links.changed() => changed.ok()?,
                }
                continue;
            };
            self.next = record.offset + 1;
            let Some(payload) = record.payload else {
                continue;
            };
            let loss = self.link.state().loss;
            let draw: f64 = self.random.random();
            if draw < loss {
                continue;
            }
            if draw < loss * 2.0 {
                self.held.push(payload.to_vec());
                continue;
            }
            if draw < loss * 3.0 {
                self.held.push(payload.to_vec());
            }
            if !self.held.is_empty() && self.random.random::<bool>() {
                self.held.push(payload.to_vec());
                return Some(self.held.remove(0));
            }
            return Some(payload.to_vec());
        }
    }
}
