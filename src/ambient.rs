//! What weir reads from its surroundings rather than from its inputs: the wall
//! clock, random tokens and ids, and backoff jitter; and where its tasks run.
//! Everything that a node does with them goes through here, so that a
//! deterministic simulation (built with the `testing` feature) can replace all of
//! it for its thread: time then follows tokio's paused clock from a fixed origin,
//! every random draw comes from one seeded generator, so one seed replays one run
//! exactly, and every task a node starts belongs to that node's simulated
//! process, which the simulation can freeze as a whole (a process paused by the
//! operating system or a long garbage-collection stop: its timers fire, late).

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

/// Starts a task of this node (in place of `tokio::spawn`): in a simulation it
/// belongs to the process of the task that starts it.
pub fn spawn<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(in_this_process(task))
}

/// Starts a task of this node in `set` (in place of `JoinSet::spawn`).
pub fn spawn_into<F>(set: &mut tokio::task::JoinSet<F::Output>, task: F) -> tokio::task::AbortHandle
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    set.spawn(in_this_process(task))
}

#[cfg(not(any(test, feature = "testing")))]
fn in_this_process<F: Future>(task: F) -> F {
    task
}

#[cfg(any(test, feature = "testing"))]
fn in_this_process<F: Future>(task: F) -> impl Future<Output = F::Output> {
    match process::current() {
        Some(process) => futures::future::Either::Left(process.run(task)),
        None => futures::future::Either::Right(task),
    }
}

#[cfg(any(test, feature = "testing"))]
pub use process::Process;
#[cfg(any(test, feature = "testing"))]
pub use simulated::{Simulation, simulate};

#[cfg(any(test, feature = "testing"))]
mod process {
    use std::future::Future;
    use std::sync::{Arc, Mutex, PoisonError};
    use std::task::{Poll, Waker};

    tokio::task_local! {
        static PROCESS: Process;
    }

    /// A simulated process: every task started from within [`Process::run`]
    /// (through [`super::spawn`]) belongs to it, and none of them is polled
    /// while it is frozen. Timers and wake-ups that fall due meanwhile take
    /// effect when it thaws.
    #[derive(Clone, Default)]
    pub struct Process(Arc<Mutex<Freezer>>);

    #[derive(Default)]
    struct Freezer {
        frozen: bool,
        /// The tasks that were woken while frozen.
        woken: Vec<Waker>,
    }

    pub(super) fn current() -> Option<Process> {
        PROCESS.try_with(Process::clone).ok()
    }

    impl Process {
        pub fn new() -> Self {
            Self::default()
        }

        fn freezer(&self) -> std::sync::MutexGuard<'_, Freezer> {
            self.0.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// Stops polling the process's tasks until [`Process::thaw`].
        pub fn freeze(&self) {
            self.freezer().frozen = true;
        }

        /// Polls the process's tasks again, those woken meanwhile first.
        pub fn thaw(&self) {
            let woken = {
                let mut freezer = self.freezer();
                freezer.frozen = false;
                std::mem::take(&mut freezer.woken)
            };
            woken.into_iter().for_each(Waker::wake);
        }

        pub fn is_frozen(&self) -> bool {
            self.freezer().frozen
        }

        /// Runs `task` as part of this process: it, and every task it starts,
        /// waits while the process is frozen.
        pub fn run<F: Future>(&self, task: F) -> impl Future<Output = F::Output> + use<F> {
            let process = self.clone();
            PROCESS.scope(self.clone(), async move {
                let mut task = std::pin::pin!(task);
                std::future::poll_fn(|context| {
                    {
                        let mut freezer = process.freezer();
                        if freezer.frozen {
                            freezer.woken.push(context.waker().clone());
                            return Poll::Pending;
                        }
                    }
                    task.as_mut().poll(context)
                })
                .await
            })
        }
    }
}

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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;

    /// Counts ticks every 10 ms in a task started by a task of the process.
    async fn start_ticking(process: &Process) -> Arc<AtomicU32> {
        let ticks = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&ticks);
        process
            .run(async move {
                spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                });
            })
            .await;
        ticks
    }

    #[tokio::test(start_paused = true)]
    async fn a_frozen_process_runs_none_of_its_tasks_until_it_thaws() {
        let process = Process::new();
        let ticks = start_ticking(&process).await;
        tokio::time::sleep(Duration::from_millis(55)).await;
        let before = ticks.load(Ordering::SeqCst);
        assert_eq!(before, 5, "the task runs while the process does");

        process.freeze();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            ticks.load(Ordering::SeqCst),
            before,
            "a frozen process's tasks wait"
        );

        process.thaw();
        tokio::task::yield_now().await;
        let after = ticks.load(Ordering::SeqCst);
        assert_eq!(
            after,
            before + 1,
            "the timer that fell due fires once, late"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(ticks.load(Ordering::SeqCst) > after, "and it runs on");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_started_outside_every_process_is_never_frozen() {
        let process = Process::new();
        let ticks = start_ticking(&Process::new()).await;
        let outside = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&outside);
        spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        process.freeze();
        tokio::time::sleep(Duration::from_millis(55)).await;
        assert_eq!(outside.load(Ordering::SeqCst), 5);
        assert_eq!(ticks.load(Ordering::SeqCst), 5, "another process runs on");
    }
}
