//! Recall (cmd 15 → 16): the sender within the window; members are told; history shows it.

use serde_json::json;
use tests::{Client, TestNode};

use crate::{bin, node};

#[tokio::test]
async fn sender_recalls_within_window_and_members_are_told() -> anyhow::Result<()> {
    let n = node().await;
    let mut a = n.tcp_login("ra").await?;
    let mut b = n.ws_login("rb").await?;
    let sent = a.chat(json!({"chatType": 1, "groupId": "100", "content": "oops"})).await?;
    let id = sent["data"]["id"].as_str().unwrap().to_string();
    b.recv_cmd(11).await?;

    // Someone else's message: refused.
    b.send(json!({"cmd": 15, "id": id})).await?;
    assert_eq!(b.recv_cmd(16).await?["code"], 11001);

    a.send(json!({"cmd": 15, "id": id})).await?;
    let reply = a.recv_cmd(16).await?;
    assert_eq!(reply["code"], 10000);
    let notice = b.recv_cmd(16).await?;
    assert_eq!(notice["data"]["id"], id.as_str());
    assert_eq!(notice["data"]["recalledBy"], "ra");
    assert_eq!(notice["data"]["groupId"], "100");

    b.send(json!({"cmd": 19, "type": 1, "groupId": "100"})).await?;
    let history = b.recv_cmd(20).await?;
    let m = &history["data"]["groups"]["100"][0];
    assert_eq!((m["recalled"].as_bool(), m["content"].as_str()), (Some(true), Some("")));
    Ok(())
}

#[tokio::test]
async fn recall_after_the_window_is_refused() -> anyhow::Result<()> {
    let n = TestNode::builder(bin()).arg("--recall-window", 0).start().await?;
    let mut a = n.tcp_login("late").await?;
    // With a zero window a recall only succeeds within the millisecond of the send; each attempt
    // uses a fresh message, and within a few attempts one must be refused with 11003.
    for _ in 0..50 {
        let sent = a.chat(json!({"chatType": 2, "to": "x", "content": "old"})).await?;
        a.send(json!({"cmd": 15, "id": sent["data"]["id"]})).await?;
        let code = a.recv_cmd(16).await?["code"].as_u64();
        if code == Some(11003) {
            return Ok(());
        }
        assert_eq!(code, Some(10000));
    }
    anyhow::bail!("no recall was refused after the window")
}
