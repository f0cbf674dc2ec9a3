//! Several nodes in several regions as one service (issue 5): cross-node chat and presence,
//! roaming, the owner killed under load, a partition healed under load, a new node catching up.
//! Every cluster is real node processes on loopback, linked through the harness's UDP relays.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use tests::cluster::Cluster;
use tests::{eventually, Client};

use crate::bin;

const REGIONS: [(&str, &str); 3] = [("iad-1", "iad"), ("fra-1", "fra"), ("sin-1", "sin")];

async fn three() -> Cluster {
    Cluster::start(bin(), &REGIONS, &[]).await.expect("cluster starts")
}

/// The users `node` reports online, through `/v1/presence`.
async fn online_at(c: &Cluster, i: usize) -> HashSet<String> {
    let Ok(r) = reqwest::get(format!("{}/v1/presence", c.node(i).http())).await else { return HashSet::new() };
    let Ok(v) = r.json::<Value>().await else { return HashSet::new() };
    v["online"].as_array().map(|a| a.iter().filter_map(|u| u.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

#[tokio::test]
async fn cross_node_chat_presence_typing_and_recall() -> anyhow::Result<()> {
    let c = three().await;
    let mut alice = c.node(0).tcp_login("alice").await?;
    let mut bob = c.node(1).ws_login("bob").await?;
    let mut carol = c.node(2).tcp_login("carol").await?;

    // Presence converges on every node within 2 s.
    let everyone: HashSet<String> = ["alice", "bob", "carol"].map(String::from).into();
    for i in 0..3 {
        eventually(Duration::from_secs(2), || async { (online_at(&c, i).await == everyone).then_some(()) }).await?;
    }
    // cmd 17 at iad sees bob (at fra) online.
    alice.send(json!({"cmd": 17, "userId": "bob", "type": 0})).await?;
    assert_eq!(alice.recv_cmd(18).await?["data"]["status"], "online");

    // Private chat across nodes, both ways.
    let ack = alice.chat(json!({"chatType": 2, "to": "bob", "content": "hello from iad", "id": "a1"})).await?;
    assert_eq!(ack["code"], 10000, "bob is online at another node: {ack}");
    let got = bob.recv_cmd(11).await?;
    assert_eq!((got["data"]["content"].as_str(), got["data"]["from"].as_str()), (Some("hello from iad"), Some("alice")));
    let ack = bob.chat(json!({"chatType": 2, "to": "alice", "content": "hi from fra"})).await?;
    assert_eq!(ack["code"], 10000);
    assert_eq!(alice.recv_cmd(11).await?["data"]["content"], "hi from fra");

    // Group chat: every member, wherever connected, gets it once; the sender's echo too.
    let ack = carol.chat(json!({"chatType": 1, "groupId": "100", "content": "group from sin"})).await?;
    assert_eq!(ack["code"], 10000);
    let seq = ack["data"]["seq"].as_u64().unwrap();
    let got = [alice.recv_cmd(11).await?, bob.recv_cmd(11).await?, carol.recv_cmd(11).await?];
    for m in got {
        assert_eq!((m["data"]["content"].as_str(), m["data"]["seq"].as_u64()), (Some("group from sin"), Some(seq)), "{m}");
    }

    // Typing and a read receipt cross nodes.
    alice.send(json!({"cmd": 100, "chatType": 2, "to": "bob"})).await?;
    assert_eq!(bob.recv_cmd(100).await?["data"]["from"], "alice");
    bob.send(json!({"cmd": 103, "chatType": 2, "to": "alice", "seq": 1})).await?;
    assert_eq!(alice.recv_cmd(103).await?["data"]["from"], "bob");

    // Recall at iad of a group message: the members at fra and sin are told.
    let sent = alice.chat(json!({"chatType": 1, "groupId": "100", "content": "oops"})).await?;
    let id = sent["data"]["id"].as_str().unwrap().to_string();
    assert_eq!(bob.recv_cmd(11).await?["data"]["content"], "oops");
    assert_eq!(carol.recv_cmd(11).await?["data"]["content"], "oops");
    // The message must reach iad's replica before iad can recall it (it may be owned elsewhere).
    eventually(Duration::from_secs(5), || async {
        let ms = c.messages(0, "g:100").await.ok()?;
        ms.iter().any(|m| m["id"] == id.as_str()).then_some(())
    })
    .await?;
    alice.send(json!({"cmd": 15, "id": id})).await?;
    assert_eq!(alice.recv_cmd(16).await?["code"], 10000);
    assert_eq!(bob.recv_cmd(16).await?["data"]["id"], id.as_str());
    assert_eq!(carol.recv_cmd(16).await?["data"]["id"], id.as_str());
    // ... and the recall replicates: every node's copy is recalled.
    for i in 0..3 {
        eventually(Duration::from_secs(5), || async {
            let ms = c.messages(i, "g:100").await.ok()?;
            ms.iter().any(|m| m["id"] == id.as_str() && m["recalled"] == true).then_some(())
        })
        .await?;
    }

    // Some of those sends were sequenced by a node other than the sender's (forwarded).
    let mut forwarded = 0.0;
    for i in 0..3 {
        forwarded += c.metric(i, "kefu_mesh_forwarded_total").await?;
    }
    assert!(forwarded > 0.0, "no send was forwarded to its owner");

    // bob leaves: the others see it within 2 s.
    bob.send(json!({"cmd": 14})).await?;
    for i in [0, 2] {
        eventually(Duration::from_secs(2), || async { (!online_at(&c, i).await.contains("bob")).then_some(()) }).await?;
    }
    Ok(())
}
