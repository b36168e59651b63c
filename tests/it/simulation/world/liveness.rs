//! What must hold of the simulated fleet while it runs and once it has
//! settled, seen from outside its nodes: each node's status and consumers.

use std::collections::BTreeMap;

use weir::broker::BrokerStatus;
use weir::consumer::ConsumerState;
use weir::event::Source;

use super::{World, broker_settings, sources};

impl World {
    /// No observer lacks the coordinator's newest decision for longer than a
    /// refresh interval. Checked where nothing excuses a lack: no fault has been
    /// active, and one live process has led one term, for two refresh intervals
    /// (one for the lack to be reported, one to answer it).
    pub(super) fn check_decisions_held(&self) {
        let patience = broker_settings().refresh_interval * 2;
        let calm = self
            .calm_since
            .is_some_and(|since| since.elapsed() > patience);
        let led = self
            .led
            .as_ref()
            .is_some_and(|(_, _, since)| since.elapsed() > patience);
        if !calm || !led {
            return;
        }
        for process in self.slots.iter().filter_map(|slot| slot.main.as_ref()) {
            if let BrokerStatus::Errored(reason) = process.runtime.status().broker
                && reason.contains("lacked the coordinator's newest decision")
            {
                self.ledger.violate(format!(
                    "{} lacked the newest decision for longer than a refresh interval while the fleet was calm under a live leader: {reason}",
                    process.label
                ));
            }
        }
    }

    /// Why the fleet is not settled (every source consumed by exactly one
    /// process, balanced, every node healthy), if it is not.
    pub(super) fn unsettled(&self) -> Option<String> {
        if let Some(paused) = self.paused {
            return Some(format!(
                "no leader has taken the operator's paused={paused} yet"
            ));
        }
        let mut owners: BTreeMap<Source, Vec<String>> = BTreeMap::new();
        let mut counts = Vec::new();
        for process in self.slots.iter().filter_map(|slot| slot.main.as_ref()) {
            let status = process.runtime.status();
            if !status.is_healthy() {
                return Some(format!(
                    "{} is not healthy: {}",
                    process.label, status.broker
                ));
            }
            let running: Vec<Source> = status
                .consumers
                .iter()
                .filter(|c| matches!(c.state, ConsumerState::Running))
                .map(|c| c.key.source.clone())
                .collect();
            counts.push(running.len());
            for source in running {
                owners
                    .entry(source)
                    .or_default()
                    .push(process.label.clone());
            }
        }
        for source in sources(self.partitions) {
            match owners.get(&source).map(Vec::as_slice) {
                Some([_]) => {}
                other => return Some(format!("{source} is consumed by {other:?}")),
            }
        }
        let (least, most) = (counts.iter().min()?, counts.iter().max()?);
        (most - least > 1).then(|| format!("unbalanced: {counts:?}"))
    }
}
