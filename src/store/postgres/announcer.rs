//! Sends the `NOTIFY` that wakes readers, after the append has committed.
//!
//! Notifying inside the append's transaction would take Postgres's database-wide
//! notify lock, held through the commit's WAL flush, and serialise every append (it
//! cost about 40 % of append throughput when measured). Instead each store keeps one
//! notify in flight at a time, carrying every category appended since the last one, so
//! under load one small transaction announces many appends. A crash between an
//! append's commit and its notify loses that wake-up; readers still poll.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

use crate::event::Category;

const NOTIFY_SQL: &str = "SELECT pg_notify($1, c) FROM unnest($2::text[]) AS c";

pub(super) struct Announcer {
    shared: Arc<Shared>,
    pool: Pool,
    channel: String,
    task: OnceLock<AbortOnDropHandle<()>>,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<BTreeSet<String>>,
    wake: Notify,
}

impl Announcer {
    pub(super) fn new(pool: Pool, channel: String) -> Self {
        Self {
            shared: Arc::default(),
            pool,
            channel,
            task: OnceLock::new(),
        }
    }

    /// Queues a notify for `category`; returns at once. Must be called within a Tokio
    /// runtime (the first call starts the sending task).
    pub(super) fn announce(&self, category: &Category) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(category.to_string());
        // Stores a permit if the task is busy, so nothing queued is forgotten.
        self.shared.wake.notify_one();
        self.task.get_or_init(|| {
            AbortOnDropHandle::new(tokio::spawn(send(
                self.shared.clone(),
                self.pool.clone(),
                self.channel.clone(),
            )))
        });
    }
}

async fn send(shared: Arc<Shared>, pool: Pool, channel: String) {
    loop {
        shared.wake.notified().await;
        let categories: Vec<String> =
            std::mem::take(&mut *shared.pending.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        if categories.is_empty() {
            continue;
        }
        let sent = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            let statement = client
                .prepare_cached(NOTIFY_SQL)
                .await
                .map_err(|e| e.to_string())?;
            client
                .execute(&statement, &[&channel, &categories])
                .await
                .map_err(|e| e.to_string())
        };
        if let Err(error) = sent.await {
            tracing::warn!(%error, "could not announce appends; readers will find them by polling");
        }
    }
}
