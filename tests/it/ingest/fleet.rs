//! Ingest sources over a fleet of `weir run` nodes: four NATS subject filters
//! shared out by the coordinator between two nodes, each source owned once,
//! and moved to the survivor when a node leaves, with nothing lost or repeated.

use std::collections::BTreeSet;

use super::nats::Fixture;
use super::*;
use crate::common::heavy_turn;
use crate::common::nodes::{WeirNodes, owned_in};

/// The ingest sources `/status` shows `node` owning.
async fn ingest_sources(nodes: &WeirNodes, node: &str) -> Vec<String> {
    let status = nodes.status(node).await.expect("the node's status");
    owned_in(&status)
        .into_iter()
        .filter(|s| s.starts_with("ingest:"))
        .collect()
}

/// Waits until the nodes' owned ingest sources are `counts`, each source once.
async fn wait_for_shares(nodes: &WeirNodes, ids: &[&str], counts: &[usize]) -> Vec<Vec<String>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut shares = Vec::new();
        for id in ids {
            shares.push(ingest_sources(nodes, id).await);
        }
        let all: BTreeSet<&String> = shares.iter().flatten().collect();
        let sizes: Vec<usize> = shares.iter().map(Vec::len).collect();
        if sizes == counts && all.len() == counts.iter().sum::<usize>() {
            return shares;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sources were not shared out as {counts:?}: {shares:?}\n{}",
            nodes.logs(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_shares_ingest_sources_and_moves_them_on_a_planned_leave() {
    let (Some(fixture), Some(db)) = (Fixture::start().await, TestPostgres::start().await) else {
        return;
    };
    let _turn = heavy_turn().await;
    let namespace = unique_name("ingestfleet");
    let dir = tempfile::tempdir().unwrap();
    let subjects: Vec<String> = (0..4)
        .map(|p| format!("\"{}.p{p}.>\"", fixture.prefix))
        .collect();
    let config = format!(
        r#"
[node]
shutdown_grace = "3s"

[store]
kind = "postgres"
url = "{url}"
schema = "{schema}"
pool_size = 4

[bus]
kind = "nats"
namespace = "{namespace}"

[nats]
url = "{nats}"

[broker]
heartbeat_interval = "250ms"
member_timeout = "1500ms"
refresh_interval = "1s"
lease_ttl = "2s"
handover_timeout = "3s"

[[ingest]]
name = "orders-in"
from = {{ kind = "nats", stream = "{stream}", subjects = [{subjects}] }}
into = {{ category = "orders", stream = "{{subject.2}}" }}
"#,
        url = db.url,
        schema = db.schema,
        nats = nats_url(),
        stream = fixture.stream,
        subjects = subjects.join(", "),
    );
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, config).unwrap();
    let mut nodes = WeirNodes::new(dir.path(), path);
    nodes
        .start(&["node-1", "node-2"], "full")
        .await
        .expect("start two nodes");
    wait_for_shares(&nodes, &["node-1", "node-2"], &[2, 2]).await;

    let fixture = &fixture;
    let publish = |from: usize, to: usize| async move {
        for n in from..to {
            let key = format!("k{}", n % 20);
            let subject = format!("{}.p{}.{key}", fixture.prefix, n % 4);
            fixture
                .publish(subject, payload(&key, n), &[("Weir-Event-Name", "Placed")])
                .await;
        }
    };
    publish(0, 300).await;
    wait_for_count(db.store.as_ref(), "orders", 300).await;
    // A planned leave while messages arrive: the survivor takes every source
    // over from the positions the leaver stored.
    let (_, stopped) = tokio::join!(publish(300, 600), nodes.stop(&["node-1"]));
    stopped.expect("node-1 stops gracefully");
    wait_for_shares(&nodes, &["node-2"], &[4]).await;
    let events = wait_for_count(db.store.as_ref(), "orders", 600).await;
    assert_exactly_once_in_order(&events, 600);
    nodes
        .stop(&["node-2"])
        .await
        .expect("node-2 stops gracefully");
}
