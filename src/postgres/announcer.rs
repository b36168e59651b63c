//! Sends the `NOTIFY` that wakes readers, after the append has committed.
//!
//! Notifying inside the append's transaction would take Postgres's database-wide
//! notify lock, held through the commit's WAL flush, and serialise every append (it
//! cost about 40 % of append throughput when measured). Instead each store keeps one
//! notify in flight at a time, carrying every category appended since the last one,
//! so under load one small transaction announces many appends. An append returns once
//! a notify sent after its commit has completed, so a process that appends and exits
//! still wakes its readers. A crash between commit and notify loses that wake-up;
//! readers still poll.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};

use deadpool_postgres::Pool;
use tokio::sync::{Notify, watch};
use tokio_util::task::AbortOnDropHandle;

use crate::event::Category;

const NOTIFY_SQL: &str = "SELECT pg_notify($1, c) FROM unnest($2::text[]) AS c";

pub(super) struct Announcer {
    shared: Arc<Shared>,
    pool: Pool,
    channel: String,
    task: OnceLock<AbortOnDropHandle<()>>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Notify,
    /// The newest ticket whose notify has been sent (or has failed and been logged).
    sent: watch::Sender<u64>,
}

#[derive(Default)]
struct Queue {
    categories: BTreeSet<String>,
    /// The newest ticket handed out.
    last_ticket: u64,
}

impl Announcer {
    pub(super) fn new(pool: Pool, channel: String) -> Self {
        Self {
            shared: Arc::new(Shared {
                queue: Mutex::default(),
                wake: Notify::new(),
                sent: watch::Sender::new(0),
            }),
            pool,
            channel,
            task: OnceLock::new(),
        }
    }

    /// Announces an append to `category` and returns once the notify carrying it has
    /// been sent. A failed notify is logged, not returned: the append itself committed.
    pub(super) async fn announce(&self, category: &Category) {
        let ticket = {
            let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.categories.insert(category.to_string());
            queue.last_ticket += 1;
            queue.last_ticket
        };
        let mut sent = self.shared.sent.subscribe();
        self.task.get_or_init(|| {
            AbortOnDropHandle::new(crate::ambient::spawn(send(
                self.shared.clone(),
                self.pool.clone(),
                self.channel.clone(),
            )))
        });
        // Stores a permit if the task is busy, so nothing queued is forgotten.
        self.shared.wake.notify_one();
        // The sender lives in `shared`, which outlives this call.
        let _ = sent.wait_for(|&done| done >= ticket).await;
    }
}

async fn send(shared: Arc<Shared>, pool: Pool, channel: String) {
    loop {
        shared.wake.notified().await;
        let (categories, ticket) = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            let categories: Vec<String> =
                std::mem::take(&mut queue.categories).into_iter().collect();
            (categories, queue.last_ticket)
        };
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
        shared.sent.send_replace(ticket);
    }
}
