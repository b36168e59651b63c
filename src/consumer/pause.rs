//! [`PauseSwitch`]: whether an operator has paused a subscriber's group. Its
//! source consumers keep their claims and cursors but read nothing while it is
//! on, so resuming goes on exactly where they stopped.

use std::sync::Arc;

use tokio::sync::watch;

/// Shared by one subscriber's source consumers; off unless switched on.
#[derive(Debug, Clone)]
pub struct PauseSwitch {
    paused: Arc<watch::Sender<bool>>,
}

impl Default for PauseSwitch {
    fn default() -> Self {
        Self {
            paused: Arc::new(watch::channel(false).0),
        }
    }
}

impl PauseSwitch {
    /// Switches the pause on or off; consumers waiting for a resume wake.
    pub fn set(&self, paused: bool) {
        self.paused.send_if_modified(|current| {
            let changed = *current != paused;
            *current = paused;
            changed
        });
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Returns once the pause is off (at once if it is).
    pub async fn resumed(&self) {
        let mut paused = self.paused.subscribe();
        // The sender lives as long as `self`, so the wait ends only on a resume.
        let _ = paused.wait_for(|paused| !*paused).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_wait_for_the_resume_ends_when_switched_off() {
        let switch = PauseSwitch::default();
        tokio::time::timeout(Duration::from_secs(1), switch.resumed())
            .await
            .expect("not paused: returns at once");
        switch.set(true);
        assert!(switch.is_paused());
        let waiting = crate::ambient::spawn({
            let switch = switch.clone();
            async move { switch.resumed().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "resumed while still paused");
        switch.set(false);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the resume wakes the waiter")
            .unwrap();
    }
}
