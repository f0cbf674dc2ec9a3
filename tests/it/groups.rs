//! Groups with access rules (issue: production profile §3): closed groups made through the admin
//! API are for their members only; a removed member stops receiving at once, on every node; a
//! member who leaves (cmd 106 or the API) is announced to the others with J-IM's exit notice.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tests::cluster::Cluster;
use tests::{eventually, Client, TcpClient, TestNode};

use crate::bin;

async fn create_group(http: &reqwest::Client, base: &str, body: Value) -> anyhow::Result<StatusCode> {
    Ok(http.post(format!("{base}/v1/groups")).json(&body).send().await?.status())
}

/// Sends a private marker to `to` and returns every push `to` got before it: a way to show that
/// something did not arrive without waiting a fixed time.
async fn pushes_before_marker(from: &mut TcpClient, to: &mut TcpClient, to_id: &str, marker: &str) -> anyhow::Result<Vec<Value>> {
    from.chat(json!({"chatType": 2, "to": to_id, "content": marker})).await?;
    let mut seen = Vec::new();
    loop {
        let push = tokio::time::timeout(Duration::from_secs(10), to.recv_cmd(11)).await??;
        if push["data"]["content"] == marker {
            return Ok(seen);
        }
        seen.push(push);
    }
}

/// Sends `body` until the answer has `code` (a membership still on its way to this node), within
/// a deadline.
async fn chat_until(client: &mut TcpClient, body: Value, code: u64) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = client.chat(body.clone()).await?;
        if reply["code"] == code {
            return Ok(reply);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "still {reply} instead of {code}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_closed_group_is_for_its_members_only() -> anyhow::Result<()> {
    let n = TestNode::start(bin()).await?;
    let http = reqwest::Client::new();
    let mut agent = n.tcp_login("agent1").await?;
    let mut visitor = n.tcp_login("visitor1").await?;
    let mut outsider = n.tcp_login("outsider").await?;
    let body = json!({"id": "case-1", "name": "Case 1", "access": "closed", "members": ["agent1", "visitor1"]});
    assert_eq!(create_group(&http, &n.http(), body.clone()).await?, StatusCode::CREATED);
    assert_eq!(create_group(&http, &n.http(), body).await?, StatusCode::CONFLICT);
    assert_eq!(create_group(&http, &n.http(), json!({"id": "x", "access": "secret"})).await?, StatusCode::BAD_REQUEST);
    let info: Value = http.get(format!("{}/v1/groups/case-1", n.http())).send().await?.json().await?;
    assert_eq!(info["access"], "closed");
    assert_eq!(info["members"].as_array().unwrap().len(), 2);
    // Members talk.
    let sent = visitor.chat(json!({"chatType": 1, "groupId": "case-1", "content": "my order is late"})).await?;
    assert_eq!(sent["code"], 10000, "{sent}");
    assert_eq!(agent.recv_cmd(11).await?["data"]["content"], "my order is late");
    // An outsider who knows the id cannot join, send, read, type or receipt in it.
    outsider.send(json!({"cmd": 7, "groupId": "case-1"})).await?;
    let join = outsider.recv_cmd(8).await?;
    assert_eq!(join["code"], 10012, "J-IM's join-failed code: {join}");
    let send = outsider.chat(json!({"chatType": 1, "groupId": "case-1", "content": "let me in"})).await?;
    assert_eq!(send["code"], 11001);
    outsider.send(json!({"cmd": 19, "type": 1, "userId": "outsider", "groupId": "case-1"})).await?;
    assert_eq!(outsider.recv_cmd(20).await?["code"], 11001);
    outsider.send(json!({"cmd": 100, "groupId": "case-1"})).await?;
    assert_eq!(outsider.recv_cmd(100).await?["code"], 11001);
    outsider.send(json!({"cmd": 103, "groupId": "case-1", "seq": 1})).await?;
    assert_eq!(outsider.recv_cmd(103).await?["code"], 11001);
    let members: Value = http.get(format!("{}/v1/groups/case-1", n.http())).send().await?.json().await?;
    assert_eq!(members["members"].as_array().unwrap().len(), 2, "the refused join changed nothing");
    // Nor may an agent who is not a member recall in it (agents recall others' messages only
    // where they are members).
    let snoop = json!({"id": "snoop", "password": "pw", "role": "agent"});
    assert_eq!(http.post(format!("{}/v1/users", n.http())).json(&snoop).send().await?.status(), StatusCode::CREATED);
    let mut snoop = n.tcp_login("snoop").await?;
    snoop.send(json!({"cmd": 15, "id": sent["data"]["id"]})).await?;
    assert_eq!(snoop.recv_cmd(16).await?["code"], 11001);
    // An open group still takes anyone, as in J-IM.
    assert_eq!(create_group(&http, &n.http(), json!({"id": "lobby"})).await?, StatusCode::CREATED);
    outsider.send(json!({"cmd": 7, "groupId": "lobby"})).await?;
    // (Join notices of the default group "100", which everyone here is in, come first.)
    while outsider.recv_cmd(9).await?["group"] != "lobby" {}
    // Added through the API, the outsider is a member.
    let added = http.put(format!("{}/v1/groups/case-1/members/outsider", n.http())).send().await?;
    assert_eq!(added.status(), StatusCode::NO_CONTENT);
    chat_until(&mut outsider, json!({"chatType": 1, "groupId": "case-1", "content": "joined"}), 10000).await?;
    Ok(())
}

#[tokio::test]
async fn a_removed_member_stops_receiving_at_once_and_leaving_is_announced() -> anyhow::Result<()> {
    let n = TestNode::start(bin()).await?;
    let http = reqwest::Client::new();
    let mut agent = n.tcp_login("ag").await?;
    let mut visitor = n.tcp_login("vi").await?;
    let mut third = n.tcp_login("th").await?;
    let body = json!({"id": "case-2", "access": "closed", "members": ["ag", "vi", "th"]});
    assert_eq!(create_group(&http, &n.http(), body).await?, StatusCode::CREATED);
    // Removed through the API: the others are told, and the removed member gets nothing more.
    let removed = http.delete(format!("{}/v1/groups/case-2/members/th", n.http())).send().await?;
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    let notice = agent.recv_cmd(10).await?;
    assert_eq!((notice["data"]["group"].as_str(), notice["data"]["user"]["userId"].as_str()), (Some("case-2"), Some("th")));
    assert_eq!(http.delete(format!("{}/v1/groups/case-2/members/th", n.http())).send().await?.status(), StatusCode::NOT_FOUND);
    let sent = agent.chat(json!({"chatType": 1, "groupId": "case-2", "content": "after the removal"})).await?;
    assert_eq!(sent["code"], 10000);
    assert_eq!(visitor.recv_cmd(11).await?["data"]["content"], "after the removal");
    let leaked = pushes_before_marker(&mut agent, &mut third, "th", "marker").await?;
    assert!(leaked.iter().all(|p| p["data"]["groupId"] != "case-2"), "pushed to a removed member: {leaked:?}");
    let send = third.chat(json!({"chatType": 1, "groupId": "case-2", "content": "still here?"})).await?;
    assert_eq!(send["code"], 11001);
    // Nor is it offered offline when they come back.
    drop(third);
    let mut back = n.tcp().await?;
    back.login("th", "pw").await?;
    back.send(json!({"cmd": 19, "type": 0, "userId": "th"})).await?;
    let offline = back.recv_cmd(20).await?;
    assert!(offline["data"]["groups"].get("case-2").is_none(), "offline messages of a group left: {offline}");
    // Leaving with cmd 106: a reply for the leaver, the exit notice for the others.
    visitor.send(json!({"cmd": 106, "groupId": "case-2"})).await?;
    assert_eq!(visitor.recv_cmd(107).await?["code"], 10000);
    // (th's logout above told the default group "100", which the agent is in too.)
    loop {
        let notice = agent.recv_cmd(10).await?;
        if notice["data"]["group"] == "case-2" {
            assert_eq!(notice["data"]["user"]["userId"], "vi");
            break;
        }
    }
    visitor.send(json!({"cmd": 106, "groupId": "case-2"})).await?;
    assert_eq!(visitor.recv_cmd(107).await?["code"], 11002, "not a member any more");
    Ok(())
}

#[tokio::test]
async fn closed_groups_hold_at_every_node() -> anyhow::Result<()> {
    let c = Cluster::start(bin(), &crate::cluster::REGIONS, &[]).await?;
    let http = reqwest::Client::new();
    let mut agent = c.node(0).tcp_login("xag").await?;
    let mut visitor = c.node(1).tcp_login("xvi").await?;
    let mut outsider = c.node(2).tcp_login("xout").await?;
    let body = json!({"id": "case-3", "access": "closed", "members": ["xag", "xvi"]});
    assert_eq!(create_group(&http, &c.node(0).http(), body).await?, StatusCode::CREATED);
    // At the other nodes, once the definition has arrived, a join is refused there too.
    eventually(Duration::from_secs(10), || async {
        let g: Value = http.get(format!("{}/v1/groups/case-3", c.node(2).http())).send().await.ok()?.json().await.ok()?;
        (g["access"] == "closed").then_some(())
    })
    .await?;
    outsider.send(json!({"cmd": 7, "groupId": "case-3"})).await?;
    assert_eq!(outsider.recv_cmd(8).await?["code"], 10012);
    // The visitor at fra is a member there as soon as the membership arrives.
    let sent = chat_until(&mut visitor, json!({"chatType": 1, "groupId": "case-3", "content": "hello from fra"}), 10000).await?;
    assert_eq!(sent["data"]["conversation"], "g:case-3");
    assert_eq!(agent.recv_cmd(11).await?["data"]["content"], "hello from fra");
    // Removed at iad, the visitor at fra stops receiving and cannot send.
    let removed = http.delete(format!("{}/v1/groups/case-3/members/xvi", c.node(0).http())).send().await?;
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    chat_until(&mut visitor, json!({"chatType": 1, "groupId": "case-3", "content": "am I out?"}), 11001).await?;
    agent.chat(json!({"chatType": 1, "groupId": "case-3", "content": "only for members"})).await?;
    let leaked = pushes_before_marker(&mut agent, &mut visitor, "xvi", "marker").await?;
    assert!(leaked.iter().all(|p| p["data"]["content"] != "only for members"), "pushed to a removed member: {leaked:?}");
    Ok(())
}
