//! Offline delivery by cursor: every offline member of a group and every private recipient gets
//! each message once after reconnecting, and live pushes are not offered again.

use serde_json::json;
use tests::Client;

use crate::node;

#[tokio::test]
async fn every_offline_member_gets_each_message_exactly_once() -> anyhow::Result<()> {
    let n = node().await;
    // Register three members of group 100, then take two of them offline.
    for u in ["m1", "m2"] {
        let mut c = n.tcp_login(u).await?;
        c.send(json!({"cmd": 14})).await?;
        c.closed().await?;
    }
    let mut sender = n.tcp_login("sender").await?;
    for i in 0..5 {
        assert_eq!(sender.chat(json!({"chatType": 1, "groupId": "100", "content": format!("g{i}")})).await?["code"], 10000);
    }
    assert_eq!(
        sender.chat(json!({"chatType": 2, "to": "m1", "content": "private"})).await?["code"],
        10001,
        "recipient offline: J-IM's 10001, but stored"
    );

    for u in ["m1", "m2"] {
        let mut c = n.ws_login(u).await?;
        c.send(json!({"cmd": 19, "type": 0, "userId": u})).await?;
        let offline = c.recv_cmd(20).await?;
        assert_eq!(offline["code"], 10016);
        let group: Vec<&str> =
            offline["data"]["groups"]["100"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
        assert_eq!(group, ["g0", "g1", "g2", "g3", "g4"], "{u} gets every group message in order");
        let private = offline["data"]["friends"]["sender"].as_array().map(|a| a.len()).unwrap_or(0);
        assert_eq!(private, usize::from(u == "m1"));
        // Reading advanced the cursor: asking again offers nothing.
        c.send(json!({"cmd": 19, "type": 0, "userId": u})).await?;
        let again = c.recv_cmd(20).await?;
        assert_eq!(again["data"]["groups"], json!({}), "{u}: offline messages are delivered once");
        assert_eq!(again["data"]["friends"], json!({}));
    }

    // A message pushed live is not offered again as offline, on this connection or the next.
    let mut m2 = n.tcp_login("m2").await?;
    sender.chat(json!({"chatType": 1, "groupId": "100", "content": "live"})).await?;
    assert_eq!(m2.recv_cmd(11).await?["data"]["content"], "live");
    m2.send(json!({"cmd": 19, "type": 0})).await?;
    assert_eq!(m2.recv_cmd(20).await?["data"]["groups"], json!({}));
    m2.send(json!({"cmd": 14})).await?;
    m2.closed().await?;
    let mut m2 = tests::eventually(std::time::Duration::from_secs(5), || async {
        let mut c = n.tcp_login("m2").await.ok()?;
        c.send(json!({"cmd": 19, "type": 0})).await.ok()?;
        let r = c.recv_cmd(20).await.ok()?;
        (r["data"]["groups"] == json!({})).then_some(c)
    })
    .await?;
    m2.send(json!({"cmd": 13})).await?;
    m2.recv_cmd(13).await?;
    Ok(())
}
