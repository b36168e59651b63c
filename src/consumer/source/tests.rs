use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::consumer::processor::from_fn;
use crate::consumer::testing::append_order;
use crate::consumer::{CheckpointStore, MemoryCheckpointStore, MemoryDeadLetterStore};
use crate::store::MemoryStore;

/// The consumer's state on its board.
fn state(board: &Board, source: &Source) -> Option<ConsumerState> {
    board
        .states_now()
        .into_iter()
        .find(|(key, _)| &key.source == source)
        .map(|(_, state)| state)
}

#[tokio::test]
async fn a_consumer_fenced_just_before_it_is_stopped_reports_stopped() {
    let events = Arc::new(MemoryStore::new());
    let checkpoints = Arc::new(MemoryCheckpointStore::new());
    let board = Board::default();
    let context = Arc::new(ConsumerContext {
        group: "g".into(),
        owner: "a".into(),
        events: events.clone(),
        checkpoints: checkpoints.clone(),
        dead_letters: Arc::new(MemoryDeadLetterStore::new()),
        processor: Arc::new(from_fn(|_| async { Ok(()) })),
        settings: ConsumerSettings {
            poll_interval: Duration::from_millis(10),
            ..ConsumerSettings::default()
        },
        executor: Executor::Main,
        board: board.clone(),
        pause: Default::default(),
    });
    let orders: Source = "category:orders".parse().unwrap();
    let consumer = RunningConsumer::spawn(context, orders.clone());
    tokio::time::timeout(Duration::from_secs(30), async {
        while state(&board, &orders) != Some(ConsumerState::Running) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the consumer never ran");

    // Another owner claims the source; the consumer finds out at its next batch
    // and ends on its own, fenced, before anyone asks it to stop.
    checkpoints.claim("g", &orders, "b").await.unwrap();
    append_order(&events).await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while !consumer.is_fenced() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the consumer was never fenced");

    // The withdraw that follows stops it as it would a running one: it must not
    // stay fenced, or it would count as a source this node owns.
    assert_eq!(consumer.stop(Duration::from_secs(1)).await, None);
    assert_eq!(state(&board, &orders), Some(ConsumerState::Stopped));
}
