//! The mesh's correctness rules (issue 9): nodes agree on the node list before they sequence,
//! replicas deliver in seq order without holes, and a session's sends keep their order. Real
//! node processes on loopback, linked through the harness's relays.

use std::time::Duration;

use serde_json::json;
use tests::cluster::Cluster;
use tests::{eventually, Client};

use crate::bin;

#[tokio::test]
async fn nodes_with_different_node_lists_refuse_each_other_and_sequence_nothing() -> anyhow::Result<()> {
    let mut c = Cluster::configure(bin(), &[("iad-1", "iad"), ("fra-1", "fra")], &[]).await?;
    // fra-1 is told iad-1 is in sin: the two would place some conversations differently.
    c.misconfigure(1, 0, "sin");
    c.launch(0).await?;
    c.launch(1).await?;
    for i in 0..2 {
        eventually(Duration::from_secs(10), || async {
            (c.metric(i, "kefu_mesh_node_list_mismatches_total").await.ok()? >= 1.0).then_some(())
        })
        .await?;
    }
    let mut senders = [c.node(0).tcp_login("lx").await?, c.node(1).tcp_login("ly").await?];
    // Each node's catch-up gives up on its unreachable peer after the down timeout (3 s); the
    // disagreement must keep it unready and unable to sequence past that.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let mut answered = 0;
    // A send every 100 ms (a pace, not a wait), until 5 s have passed.
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..100 {
        if std::time::Instant::now() >= until {
            break;
        }
        pace.tick().await;
        for (i, s) in senders.iter_mut().enumerate() {
            assert!(!c.is_ready(i).await, "node {i} is ready while its peer has another node list");
            let ack = s.chat(json!({"chatType": 1, "groupId": "100", "content": format!("from {i}")})).await?;
            assert_eq!(ack["code"], 11007, "node {i} took a send while the node lists differ: {ack}");
            answered += 1;
        }
    }
    assert!(answered >= 20, "only {answered} sends were tried");
    for i in 0..2 {
        assert!(c.messages(i, "g:100").await?.is_empty(), "node {i} stored a message");
    }
    Ok(())
}
