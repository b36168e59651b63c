//! How a consumer reads, checkpoints and fails ([`ConsumerSettings`]), and where its
//! processor runs ([`Isolation`], carried out by an [`Executor`]).

use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::filter::EventFilter;
use super::policy::ErrorPolicy;
use super::processor::{EventProcessor, ProcessError};
use crate::event::StoredEvent;

/// Where a consumer's processor runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// On the node's async runtime, beside everything else: for processors that
    /// never block.
    #[default]
    Main,
    /// On one extra thread shared by every consumer that asks for it.
    SharedThread,
    /// On a thread of its own: for a processor that blocks, so it holds up
    /// nobody else.
    DedicatedThread,
}

/// A consumer's settings; immutable once given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerSettings {
    /// What to do when the processor fails.
    pub error_policy: ErrorPolicy,
    /// How often to look for new events when no append notification arrives.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    pub isolation: Isolation,
    /// Events read and handed to the processor at once.
    pub batch_size: usize,
    /// Read the next batch while the processor works on this one: a consumer
    /// then holds at most one batch beyond the one in its processor.
    pub read_ahead: bool,
    /// Store the checkpoint after this many events…
    pub checkpoint_every: u64,
    /// …or this long after the last store, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// Which events the processor is given; the others are passed over (the
    /// checkpoint moves past them) and counted. Configured as the subscription's
    /// `filter`, not under `consumer`.
    #[serde(skip)]
    pub filter: Option<EventFilter>,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            error_policy: ErrorPolicy::Continue,
            poll_interval: Duration::from_secs(1),
            isolation: Isolation::Main,
            batch_size: 100,
            read_ahead: true,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(5),
            filter: None,
        }
    }
}

impl ConsumerSettings {
    /// Every problem, as (key, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.poll_interval.is_zero() {
            problems.push(("poll_interval".into(), "must be longer than 0s".into()));
        }
        if self.checkpoint_interval.is_zero() {
            problems.push((
                "checkpoint_interval".into(),
                "must be longer than 0s".into(),
            ));
        }
        if !(1..=100_000).contains(&self.batch_size) {
            problems.push(("batch_size".into(), "must be from 1 to 100000".into()));
        }
        if self.checkpoint_every == 0 {
            problems.push(("checkpoint_every".into(), "must be at least 1".into()));
        }
        for (path, message) in self.error_policy.validate() {
            problems.push((format!("error_policy.{path}"), message));
        }
        if let Some(filter) = &self.filter {
            for (path, message) in filter.validate() {
                problems.push((format!("filter.{path}"), message));
            }
        }
        problems
    }
}

/// Runs processors where their [`Isolation`] says. Cloning shares the thread.
#[derive(Clone)]
pub enum Executor {
    Main,
    Thread(Arc<IsolatedThread>),
}

impl Executor {
    /// An executor for `isolation`; `shared` is the thread that `SharedThread`
    /// consumers share.
    pub fn for_isolation(
        isolation: Isolation,
        name: &str,
        shared: impl FnOnce() -> std::io::Result<Executor>,
    ) -> std::io::Result<Executor> {
        match isolation {
            Isolation::Main => Ok(Executor::Main),
            Isolation::SharedThread => shared(),
            Isolation::DedicatedThread => {
                Ok(Executor::Thread(Arc::new(IsolatedThread::start(name)?)))
            }
        }
    }

    /// Hands `batch[range]` to `processor`. A panicking processor is reported as an
    /// error of kind `panic`, so the error policy deals with it like any failure.
    pub async fn process(
        &self,
        processor: &Arc<dyn EventProcessor>,
        batch: &Arc<[StoredEvent]>,
        range: Range<usize>,
    ) -> Result<(), ProcessError> {
        match self {
            Executor::Main => guarded(processor.process(&batch[range])).await,
            Executor::Thread(thread) => {
                let processor = Arc::clone(processor);
                let batch = Arc::clone(batch);
                let work = async move { guarded(processor.process(&batch[range])).await };
                match thread.handle.spawn(work).await {
                    Ok(outcome) => outcome,
                    Err(error) => Err(ProcessError::new(
                        "cancelled",
                        format!("the processing thread stopped: {error}"),
                    )),
                }
            }
        }
    }
}

async fn guarded(
    processing: impl Future<Output = Result<(), ProcessError>>,
) -> Result<(), ProcessError> {
    AssertUnwindSafe(processing)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the processor panicked".to_owned());
            Err(ProcessError::new("panic", message))
        })
}

/// A thread running a single-threaded async runtime for processors. It ends once
/// the last executor sharing it is dropped.
pub struct IsolatedThread {
    handle: tokio::runtime::Handle,
    /// Dropping it ends the thread's runtime (and whatever still runs on it).
    _stop: oneshot::Sender<()>,
}

impl IsolatedThread {
    pub fn start(name: &str) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        // Not joined: a blocked processor could hold its thread for ever, and the
        // node must still be able to stop. The thread ends as soon as `stop` drops
        // and its processor returns.
        std::thread::Builder::new()
            .name(format!("weir-{name}"))
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::processor::from_fn;

    #[test]
    fn defaults_are_valid_and_documented() {
        let settings = ConsumerSettings::default();
        assert!(settings.validate().is_empty());
        assert_eq!(settings.error_policy, ErrorPolicy::Continue);
        assert_eq!(settings.poll_interval, Duration::from_secs(1));
        assert_eq!(settings.isolation, Isolation::Main);
    }

    #[test]
    fn bad_settings_are_all_reported() {
        let settings = ConsumerSettings {
            poll_interval: Duration::ZERO,
            batch_size: 0,
            checkpoint_every: 0,
            error_policy: ErrorPolicy::Exit { code: -1 },
            ..ConsumerSettings::default()
        };
        let keys: Vec<String> = settings.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "poll_interval",
                "batch_size",
                "checkpoint_every",
                "error_policy.code"
            ]
        );
    }

    #[tokio::test]
    async fn a_panicking_processor_is_an_error_of_kind_panic() {
        let processor: Arc<dyn EventProcessor> =
            Arc::new(from_fn(|_| async { panic!("bad state") }));
        let batch: Arc<[StoredEvent]> = Arc::from(crate::consumer::testing::events(1).await);
        for executor in [
            Executor::Main,
            Executor::Thread(Arc::new(IsolatedThread::start("test").unwrap())),
        ] {
            let error = executor
                .process(&processor, &batch, 0..1)
                .await
                .unwrap_err();
            assert_eq!(error.kind(), "panic");
            assert!(error.message().contains("bad state"), "{error}");
        }
        // Nothing to process, nothing to fail.
        Executor::Main
            .process(&processor, &batch, 0..0)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_dedicated_thread_runs_the_processor_off_the_main_runtime() {
        let main_thread = std::thread::current().id();
        let seen = Arc::new(std::sync::Mutex::new(None));
        let record = Arc::clone(&seen);
        let processor: Arc<dyn EventProcessor> = Arc::new(from_fn(move |_| {
            let record = Arc::clone(&record);
            async move {
                // Blocking here holds up only this thread.
                std::thread::sleep(Duration::from_millis(10));
                *record.lock().unwrap() = Some(std::thread::current().id());
                Ok(())
            }
        }));
        let executor =
            Executor::for_isolation(Isolation::DedicatedThread, "dedicated", || unreachable!())
                .unwrap();
        let batch: Arc<[StoredEvent]> = Arc::from(crate::consumer::testing::events(1).await);
        executor.process(&processor, &batch, 0..1).await.unwrap();
        let ran_on = seen.lock().unwrap().expect("processed");
        assert_ne!(ran_on, main_thread);
    }
}
