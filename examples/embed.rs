//! Embedding weir: register a processor with an `EventRuntime`, append events, and
//! watch them processed. Runs on the in-memory store; see docs/embedding.md for Postgres.
//!
//! ```sh
//! cargo run --example embed
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use weir::broker::{SingletonBroker, SubscriberSpec};
use weir::consumer::{ConsumerSettings, ProcessError, from_fn};
use weir::event::{Category, EventName, NewEvent, Source, StreamName, WriteCondition};
use weir::runtime::{ConsumerStores, EventRuntime};
use weir::store::{EventStore, MemoryStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = Arc::new(MemoryStore::new());

    // One process, no fleet: the singleton broker gives the subscriber every source
    // it asks for. In a fleet, use `DistributedBroker` instead.
    let runtime = EventRuntime::new(
        "example-node",
        Arc::new(SingletonBroker::new()),
        ConsumerStores::in_memory(store.clone()),
        ConsumerSettings::default(),
    );

    let processed = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&processed);
    let processor = from_fn(move |event| {
        let counter = Arc::clone(&counter);
        async move {
            let total = event.payload["total"]
                .as_f64()
                .ok_or_else(|| ProcessError::new("invalid-payload", "no total"))?;
            println!(
                "{} {}/{}: total {total}",
                event.name, event.category, event.stream
            );
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let orders: Source = "category:orders".parse()?;
    runtime.register_subscription_consumer(
        SubscriberSpec::new("order-totals", "order-totals-1", [orders]),
        Arc::new(processor),
        None,
    )?;
    runtime.start().await?;

    let category = Category::new("orders")?;
    for (stream, total) in [("order-1", 12.5), ("order-2", 30.0), ("order-1", 7.25)] {
        let event = NewEvent::new(EventName::new("OrderPlaced")?, json!({ "total": total }));
        store
            .append(
                &category,
                &StreamName::new(stream)?,
                WriteCondition::Any,
                vec![event],
            )
            .await?;
    }

    while processed.load(Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Withdraws the sources, stores the checkpoints and stops.
    runtime.stop().await;
    Ok(())
}
