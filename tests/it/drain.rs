//! A graceful stop (issue: production profile §7): on SIGTERM a node stops accepting, answers the
//! sends it has taken, closes its sessions with the close frame, says goodbye to its peers, and
//! exits within the drain timeout; nothing acknowledged is lost.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use tests::cluster::Cluster;
use tests::{eventually, Client, TestNode};

use crate::bin;

#[tokio::test]
async fn sigterm_under_load_answers_what_it_took_and_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let mut n = TestNode::builder(bin()).arg("--msg-rate", 100_000).arg("--msg-burst", 100_000).start().await?;
    let mut sender = n.tcp_login("drainer").await?;
    let _recipient = n.tcp_login("drained").await?;
    // Pipelined sends, not waiting for their replies: when the signal comes, some are committed,
    // some wait for their commit, and the rest are still unread in the socket.
    let total = 300;
    for k in 0..total {
        sender.send(json!({"cmd": 11, "chatType": 2, "to": "drained", "content": format!("d{k}"), "id": format!("d-{k}")})).await?;
    }
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(n.pid().unwrap() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    // Read every answer until the node closes the connection. Replies keep the order of the
    // requests, so the k-th answer is d-k's (a retryable answer carries no data to tell).
    let mut answers: HashMap<String, u64> = HashMap::new();
    let mut closed_with = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(15), sender.recv()).await {
            Ok(Ok(frame)) if frame["command"] == 12 => {
                let k = answers.len();
                if let Some(id) = frame["data"]["clientId"].as_str() {
                    assert_eq!(id, format!("d-{k}"), "answers in request order");
                }
                answers.insert(format!("d-{k}"), frame["code"].as_u64().unwrap_or(0));
            }
            Ok(Ok(frame)) if frame["command"] == 14 => closed_with = frame["code"].as_u64(),
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            Err(_) => anyhow::bail!("the node did not close the connection"),
        }
    }
    assert_eq!(closed_with, Some(10021), "the session closed with J-IM's close frame");
    assert!(answers.values().all(|c| [10000, 10001, 11007].contains(c)), "{answers:?}");
    assert!(n.wait_exit(Duration::from_secs(12)).await?, "exited cleanly within the drain timeout");
    // Every acknowledged send is stored; so is every send that got no answer at all.
    n.restart().await?;
    let http = reqwest::Client::new();
    let stored: serde_json::Value =
        http.get(format!("{}/v1/conversations/p:drained:drainer/messages?limit=100&after=0", n.http())).send().await?.json().await?;
    let mut have = std::collections::HashSet::new();
    let mut after = 0;
    let mut page = stored;
    loop {
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            break;
        }
        for m in &messages {
            have.insert(m["clientId"].as_str().unwrap_or_default().to_string());
            after = m["seq"].as_u64().unwrap_or(after);
        }
        page = http
            .get(format!("{}/v1/conversations/p:drained:drainer/messages?limit=100&after={after}", n.http()))
            .send()
            .await?
            .json()
            .await?;
    }
    let acked = answers.values().filter(|c| **c == 10000 || **c == 10001).count();
    assert!(acked > 0, "some sends were acknowledged: {answers:?}");
    for k in 0..total {
        let id = format!("d-{k}");
        match answers.get(&id) {
            Some(10000 | 10001) | None => assert!(have.contains(&id), "{id} ({:?}) is not stored", answers.get(&id)),
            Some(_) => {}
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_stopping_node_says_goodbye_and_its_users_are_offline_at_once() -> anyhow::Result<()> {
    // Peers would count a silent node down only after 30 s: the goodbye is what makes it quick.
    let mut c = Cluster::start(bin(), &crate::cluster::REGIONS[..2], &[("--peer-down-after", "30")]).await?;
    let _user = c.node(1).tcp_login("leaving").await?;
    let online = |c: &Cluster| {
        let url = format!("{}/v1/presence/leaving", c.node(0).http());
        async move { reqwest::get(url).await.ok()?.json::<serde_json::Value>().await.ok().map(|v| v["online"] == true) }
    };
    eventually(Duration::from_secs(10), || async { online(&c).await.filter(|o| *o) }).await?;
    assert!(c.node_mut(1).terminate().await?, "SIGTERM exits cleanly");
    eventually(Duration::from_secs(10), || async { online(&c).await.filter(|o| !*o) }).await?;
    Ok(())
}
