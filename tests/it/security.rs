//! DESIGN §11: the sender is the authenticated user, membership is checked, the prod profile
//! refuses unknown users and wants the API key, and rate limits hold.

use serde_json::{json, Value};
use tests::{Client, TestNode};

use crate::{bin, node};

#[tokio::test]
async fn from_is_the_authenticated_user_and_membership_is_checked() -> anyhow::Result<()> {
    let n = node().await;
    let mut mallory = n.tcp_login("mallory").await?;
    let mut victim = n.tcp_login("victim").await?;
    mallory.chat(json!({"chatType": 2, "from": "ceo", "to": "victim", "content": "wire money"})).await?;
    assert_eq!(victim.recv_cmd(11).await?["data"]["from"], "mallory", "a client cannot send as someone else");

    // A group mallory is not in: no send, no history.
    victim.send(json!({"cmd": 7, "groupId": "private-room"})).await?;
    victim.recv_cmd(9).await?;
    assert_eq!(mallory.chat(json!({"chatType": 1, "groupId": "private-room", "content": "let me in"})).await?["code"], 11001);
    mallory.send(json!({"cmd": 19, "type": 1, "groupId": "private-room"})).await?;
    assert_eq!(mallory.recv_cmd(20).await?["code"], 11001);
    // Nor another user's offline messages.
    mallory.send(json!({"cmd": 19, "type": 0, "userId": "victim"})).await?;
    assert_eq!(mallory.recv_cmd(20).await?["code"], 10015);
    // Nor kick another user.
    mallory.send(json!({"cmd": 14, "userId": "victim"})).await?;
    assert_eq!(mallory.recv_cmd(14).await?["code"], 11001);
    victim.send(json!({"cmd": 13})).await?;
    victim.recv_cmd(13).await?;
    Ok(())
}

#[tokio::test]
async fn prod_refuses_unknown_users_and_requires_the_api_key() -> anyhow::Result<()> {
    let n = TestNode::builder(bin()).arg("--profile", "prod").arg("--api-key", "k3y").start().await?;
    let mut c = n.tcp().await?;
    c.send(json!({"cmd": 5, "userId": "stranger", "password": "pw"})).await?;
    assert_eq!(c.recv_cmd(6).await?["code"], 10008);
    c.closed().await?;
    let http = reqwest::Client::new();
    let body = json!({"from": "a", "to": "b", "cmd": 11, "chatType": 2, "content": "x"}).to_string();
    let denied = http.post(format!("{}/api/message/send", n.http())).body(body.clone()).send().await?;
    assert_eq!(denied.status(), 401);
    let wrong = http.post(format!("{}/api/message/send", n.http())).header("x-api-key", "nope").body(body.clone()).send().await?;
    assert_eq!(wrong.status(), 401);
    let ok: Value = http.post(format!("{}/api/message/send", n.http())).header("x-api-key", "k3y").body(body).send().await?.json().await?;
    assert_eq!(ok["command"], 12);
    assert_eq!(http.get(format!("{}/v1/presence", n.http())).send().await?.status(), 401);
    assert_eq!(http.get(format!("{}/v1/presence", n.http())).bearer_auth("k3y").send().await?.status(), 200);
    Ok(())
}

#[tokio::test]
async fn per_connection_rate_limit() -> anyhow::Result<()> {
    let n = TestNode::builder(bin()).arg("--msg-rate", 1).arg("--msg-burst", 3).start().await?;
    let mut c = n.tcp_login("chatty").await?;
    let mut codes = Vec::new();
    for i in 0..6 {
        codes.push(c.chat(json!({"chatType": 2, "to": "x", "content": format!("{i}")})).await?["code"].as_u64().unwrap_or(0));
    }
    assert_eq!(&codes[..3], &[10001, 10001, 10001]);
    assert!(codes[3..].contains(&11004), "{codes:?}");
    // Other commands are not limited.
    c.send(json!({"cmd": 13})).await?;
    c.recv_cmd(13).await?;
    Ok(())
}

#[tokio::test]
async fn failed_logins_are_throttled_per_ip() -> anyhow::Result<()> {
    let n = TestNode::builder(bin()).arg("--login-failures-per-minute", 2).start().await?;
    n.tcp_login("target").await?;
    for _ in 0..2 {
        let mut c = n.tcp().await?;
        c.send(json!({"cmd": 5, "userId": "target", "password": "guess"})).await?;
        assert_eq!(c.recv_cmd(6).await?["code"], 10008);
    }
    let mut c = n.tcp().await?;
    c.send(json!({"cmd": 5, "userId": "target", "password": "pw"})).await?;
    assert_eq!(c.recv_cmd(6).await?["code"], 11008, "even the right password waits out the window");
    Ok(())
}
