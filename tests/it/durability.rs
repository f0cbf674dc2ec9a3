//! An acknowledged message survives kill -9: the node is killed while clients are still sending,
//! and after a restart every message that got a success reply is in history, once, in seq order.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};
use tests::Client;
use tokio::sync::Mutex;

use crate::node;

#[tokio::test]
async fn acknowledged_messages_survive_sigkill() -> anyhow::Result<()> {
    let mut n = node().await;
    const SENDERS: usize = 16;
    const KILL_AFTER: usize = 400;
    let acked: Arc<Mutex<Vec<(String, String, u64)>>> = Arc::default();
    let (enough_tx, mut enough_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let mut c = n.tcp_login(&format!("dur{s}")).await?;
        let acked = Arc::clone(&acked);
        let enough = enough_tx.clone();
        tasks.push(tokio::spawn(async move {
            // Bounded: at most 1000 sends per client; the kill normally ends it much earlier.
            for i in 0..1000 {
                let to = format!("sink{}", s % 4);
                if c.send(json!({"cmd": 11, "chatType": 2, "to": to, "content": format!("m{s}-{i}")})).await.is_err() {
                    return;
                }
                let Ok(reply) = c.recv_cmd(12).await else { return };
                if reply["code"] == 10000 || reply["code"] == 10001 {
                    let conv = reply["data"]["conversation"].as_str().unwrap_or_default().to_string();
                    let mut a = acked.lock().await;
                    a.push((
                        conv,
                        reply["data"]["id"].as_str().unwrap_or_default().to_string(),
                        reply["data"]["seq"].as_u64().unwrap_or(0),
                    ));
                    if a.len() >= KILL_AFTER {
                        let _ = enough.try_send(());
                    }
                }
            }
        }));
    }
    tokio::time::timeout(std::time::Duration::from_secs(60), enough_rx.recv()).await?;
    n.kill().await?;
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().await.clone();
    assert!(acked.len() >= KILL_AFTER);

    n.restart().await?;
    let http = reqwest::Client::new();
    let mut by_conv: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for (conv, id, seq) in acked {
        by_conv.entry(conv).or_default().push((id, seq));
    }
    for (conv, expected) in by_conv {
        // Pages of at most 100 (the default history cap).
        let mut messages: Vec<Value> = Vec::new();
        loop {
            let after = messages.last().and_then(|m| m["seq"].as_u64()).unwrap_or(0);
            let url = format!("{}/v1/conversations/{conv}/messages?after={after}&limit=100", n.http());
            let page: Value = http.get(url).send().await?.json().await?;
            let page = page["messages"].as_array().cloned().unwrap_or_default();
            if page.is_empty() {
                break;
            }
            messages.extend(page);
        }
        let seqs: Vec<u64> = messages.iter().map(|m| m["seq"].as_u64().unwrap_or(0)).collect();
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "{conv}: one gap-free seq order, no duplicates");
        for (id, seq) in expected {
            let m = messages.iter().find(|m| m["id"] == id.as_str());
            assert!(m.is_some_and(|m| m["seq"] == seq), "{conv}: acknowledged message {id} (seq {seq}) lost after kill -9");
        }
    }
    Ok(())
}
