//! What an operator does to the simulated fleet through its leader: pause and
//! resume the group, reset a checkpoint, change the partition count, replace
//! the store.

use std::sync::Arc;

use weir::broker::control::{ControlHandle, Held, HoldWork};
use weir::consumer::CheckpointStore;
use weir::event::Cursor;
use weir::store::EventStore;

use super::{GROUP, NODES, World, broker_settings, sources};

impl World {
    /// The processes that believe they lead, as an operator would try them:
    /// the one holding the lease's epoch first (the leader the lease store
    /// names), then any other (a paused leader that has not noticed yet).
    fn leaders(&self) -> Vec<(String, ControlHandle)> {
        let epoch = self.leader.as_ref().map(|(_, epoch)| *epoch);
        let mut leaders: Vec<(bool, String, ControlHandle)> = self
            .slots
            .iter()
            .filter_map(|slot| {
                let process = slot.main.as_ref()?;
                let control = process.control.as_ref()?;
                let leading = control.leading()?;
                Some((
                    Some(leading) != epoch,
                    process.label.clone(),
                    control.clone(),
                ))
            })
            .collect();
        leaders.sort_by_key(|(other, _, _)| *other);
        leaders
            .into_iter()
            .map(|(_, label, control)| (label, control))
            .collect()
    }

    /// Asks whichever process leads to pause or resume the group, as wanted;
    /// nothing if none leads, or the leader does not answer (it may be frozen)
    /// within a refresh interval: the next tick asks again.
    pub(super) async fn operate(&mut self) {
        let Some(paused) = self.paused else {
            return;
        };
        for (label, control) in self.leaders() {
            let asked = control.set_paused(GROUP, paused);
            let refresh = broker_settings().refresh_interval;
            let answer = tokio::time::timeout(refresh, asked).await;
            self.ledger
                .step(format!("{label} asked to set paused={paused}: {answer:?}"));
            if let Ok(Ok(_)) = answer {
                self.paused = None;
                return;
            }
        }
    }

    /// Starts an operator's reset of `source`'s checkpoint through whichever
    /// node leads; the driver goes on while the hold lasts.
    pub(super) fn reset(&mut self, source: usize, to_start: bool) {
        let sources = sources(self.partitions);
        let source = sources[source % sources.len()].clone();
        let Some((_, control)) = self.leaders().into_iter().next() else {
            self.ledger
                .step(format!("reset of {source} refused: nobody leads"));
            return;
        };
        let checkpoints = Arc::clone(&self.checkpoints);
        let events = Arc::clone(&self.events);
        let ledger = self.ledger.clone();
        let generation = self.generation;
        let work: HoldWork = Box::new(move |held: Held| {
            Box::pin(async move {
                for source in &held.sources {
                    let claimed = checkpoints
                        .claim_granted(GROUP, source, "operator", held.grant)
                        .await;
                    let (claim, cursor) = claimed.map_err(|e| e.to_string())?;
                    ledger.claimed(source, "operator", generation);
                    let to = if to_start { Cursor::START } else { cursor };
                    // What the owner will process again: every event so far.
                    let again = match to_start {
                        true => events.read(source, to, usize::MAX).await,
                        false => Ok(Vec::new()),
                    };
                    let again = again.map_err(|e| e.to_string())?.len() as u64;
                    checkpoints
                        .save(&claim, to)
                        .await
                        .map_err(|e| e.to_string())?;
                    ledger.reset(source, to, again, generation);
                }
                Ok(serde_json::Value::Null)
            })
        });
        let ledger = self.ledger.clone();
        self.operations.spawn(async move {
            let outcome = control.hold(GROUP, Some(source.clone()), work).await;
            ledger.step(format!("reset of {source}: {outcome:?}"));
        });
    }

    /// Starts a change of the partition count: every process stops gracefully
    /// (each once it thaws, if frozen), and none starts until all have stopped.
    pub(super) fn repartition(&mut self, partitions: u32) {
        self.partitions = partitions;
        self.repartitioning = true;
        for slot in &mut self.slots {
            for process in [slot.main.take(), slot.twin.take()].into_iter().flatten() {
                let stop = process.link.process().clone();
                self.stopping
                    .spawn(stop.run(async move { process.runtime.stop().await }));
            }
        }
    }

    /// Once every process of the old partition count has stopped, starts the
    /// fleet with the new one.
    pub(super) async fn restart_repartitioned(&mut self) {
        if !self.repartitioning {
            return;
        }
        while self.stopping.try_join_next().is_some() {}
        if !self.stopping.is_empty() {
            return;
        }
        self.repartitioning = false;
        self.replace_store_if_asked();
        self.ledger.step(format!(
            "every process stopped: starting with {} partitions",
            self.partitions
        ));
        for slot in 0..NODES {
            if self.slots[slot].main.is_none() {
                self.start(slot, false).await;
            }
        }
    }

    /// Replaces every store with a new, empty one, if a store reset waits for
    /// it; the bus keeps its decisions. Events the old store held and no
    /// process emitted went with it: the ledger forgets them, and the stores'
    /// state (claims, checkpoints).
    pub(super) fn replace_store_if_asked(&mut self) {
        if !std::mem::take(&mut self.store_reset) {
            return;
        }
        self.events = Arc::new(weir::store::MemoryStore::new());
        self.checkpoints = Arc::new(weir::consumer::MemoryCheckpointStore::new());
        self.dead_letters = Arc::new(weir::consumer::MemoryDeadLetterStore::new());
        self.membership = Arc::new(weir::broker::membership::MemoryMembershipStore::new());
        self.leases = Arc::new(weir::broker::lease::MemoryLeaseStore::new());
        self.fleet_store = Arc::new(weir::broker::control::MemoryFleetStore::new());
        self.generation += 1;
        let emitted = self.ledger.forget_store();
        for (stream, appended) in &mut self.appended {
            *appended = emitted.get(stream).copied().unwrap_or_default();
        }
        self.ledger.step(format!(
            "the store was replaced by an empty one (generation {})",
            self.generation
        ));
    }
}
