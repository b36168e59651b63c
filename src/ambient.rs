//! What weir reads from its surroundings rather than from its inputs: the wall
//! clock, random tokens and ids, and backoff jitter. Everything that a node does
//! with them goes through here, so that a deterministic simulation (built with
//! the `testing` feature) can replace all of it for its thread: time then
//! follows tokio's paused clock from a fixed origin, and every random draw comes
//! from one seeded generator, so one seed replays one run exactly.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The wall clock.
pub fn now() -> DateTime<Utc> {
    #[cfg(any(test, feature = "testing"))]
    if let Some(now) = simulated::now() {
        return now;
    }
    Utc::now()
}

/// A random token (UUID v4): claim tokens, incarnations.
pub fn token() -> Uuid {
    #[cfg(any(test, feature = "testing"))]
    if let Some(bytes) = simulated::bytes() {
        return uuid::Builder::from_random_bytes(bytes).into_uuid();
    }
    Uuid::new_v4()
}

/// A new event id (UUID v7: its time first, so ids sort by creation).
pub fn event_id() -> Uuid {
    #[cfg(any(test, feature = "testing"))]
    if let Some(bytes) = simulated::bytes() {
        let millis = u64::try_from(now().timestamp_millis()).unwrap_or_default();
        let mut random = [0; 10];
        random.copy_from_slice(&bytes[..10]);
        return uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
    }
    Uuid::now_v7()
}

/// A number drawn evenly from `[0, 1)`: the jitter of backoffs.
pub fn fraction() -> f64 {
    #[cfg(any(test, feature = "testing"))]
    if let Some(bytes) = simulated::bytes() {
        let mut high = [0; 8];
        high.copy_from_slice(&bytes[..8]);
        return (u64::from_le_bytes(high) >> 11) as f64 / (1u64 << 53) as f64;
    }
    rand::random::<f64>()
}

#[cfg(any(test, feature = "testing"))]
pub use simulated::{Simulation, simulate};

#[cfg(any(test, feature = "testing"))]
mod simulated {
    use std::cell::RefCell;

    use chrono::{DateTime, Utc};
    use rand::rngs::StdRng;
    use rand::{RngCore, SeedableRng};

    struct World {
        origin: DateTime<Utc>,
        start: tokio::time::Instant,
        random: StdRng,
    }

    thread_local! {
        static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
    }

    /// While alive, this thread's clock and random draws are simulated.
    #[must_use = "the simulation ends when this is dropped"]
    pub struct Simulation(());

    impl Drop for Simulation {
        fn drop(&mut self) {
            WORLD.with(|world| world.borrow_mut().take());
        }
    }

    /// Simulates this thread's surroundings until the guard is dropped: the wall
    /// clock reads `origin` plus tokio's time elapsed since now (paused, in a
    /// simulation), and random draws come from a generator seeded with `seed`.
    /// Call it inside the simulation's runtime.
    pub fn simulate(seed: u64, origin: DateTime<Utc>) -> Simulation {
        WORLD.with(|world| {
            *world.borrow_mut() = Some(World {
                origin,
                start: tokio::time::Instant::now(),
                random: StdRng::seed_from_u64(seed),
            });
        });
        Simulation(())
    }

    pub(super) fn now() -> Option<DateTime<Utc>> {
        WORLD.with(|world| {
            let world = world.borrow();
            let world = world.as_ref()?;
            let elapsed = tokio::time::Instant::now().duration_since(world.start);
            Some(world.origin + chrono::Duration::from_std(elapsed).unwrap_or_default())
        })
    }

    pub(super) fn bytes() -> Option<[u8; 16]> {
        WORLD.with(|world| {
            let mut world = world.borrow_mut();
            let world = world.as_mut()?;
            let mut bytes = [0; 16];
            world.random.fill_bytes(&mut bytes);
            Some(bytes)
        })
    }
}
