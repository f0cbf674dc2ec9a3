//! The HTTP APIs on the J-IM port: J-IM's `/api/...`, kefu's `/v1`, and the static page.

use serde_json::{json, Value};
use tests::Client;

use crate::node;

#[tokio::test]
async fn jim_api_send_online_close() -> anyhow::Result<()> {
    let n = node().await;
    let http = reqwest::Client::new();
    let mut bob = n.tcp_login("bob").await?;
    n.tcp_login("script").await?; // registers the sender
    let body = json!({"from":"script","to":"bob","cmd":11,"chatType":2,"msgType":0,"content":"from http"});
    let reply: Value = http.post(format!("{}/api/message/send", n.http())).body(body.to_string()).send().await?.json().await?;
    assert_eq!(reply["code"], 10000);
    assert_eq!(reply["command"], 12);
    let push = bob.recv_cmd(11).await?;
    assert_eq!((push["data"]["from"].as_str(), push["data"]["content"].as_str()), (Some("script"), Some("from http")));

    let online: Value = http.get(format!("{}/api/user/online?userid=bob", n.http())).send().await?.json().await?;
    assert_eq!(online, json!({"code":10019,"msg":"online 用户在线"}));
    let offline: Value = http.get(format!("{}/api/user/online?userid=nobody", n.http())).send().await?.json().await?;
    assert_eq!(offline, json!({"code":10001,"msg":"offline 用户不在线"}));
    let missing: Value = http.get(format!("{}/api/user/online", n.http())).send().await?.json().await?;
    assert_eq!(missing, json!({"code":10020,"msg":"Invalid verification! 不合法校验"}));

    let closed: Value = http.post(format!("{}/api/user/close?userid=bob", n.http())).send().await?.json().await?;
    assert_eq!(closed, json!({"code":10021,"msg":"close ok! 关闭成功"}));
    assert_eq!(bob.recv_cmd(14).await?["code"], 10021, "the kicked socket gets the close frame first");
    bob.closed().await?;
    let after: Value = http.get(format!("{}/api/user/online?userid=bob", n.http())).send().await?.json().await?;
    assert_eq!(after["code"], 10001);

    let bad = http.post(format!("{}/api/message/send", n.http())).body("{not json").send().await?;
    assert_eq!(bad.status(), 200);
    assert_eq!(bad.json::<Value>().await?["code"], 10002);
    Ok(())
}

#[tokio::test]
async fn v1_api_matches_its_openapi_document() -> anyhow::Result<()> {
    let n = node().await;
    let http = reqwest::Client::new();
    let doc: Value = http.get(format!("{}/v1/openapi.json", n.http())).send().await?.json().await?;
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/v1/messages",
        "/v1/conversations/{conversation}/messages",
        "/v1/users",
        "/v1/users/{user}",
        "/v1/users/{user}/ban",
        "/v1/users/{user}/unban",
        "/v1/users/{user}/logout",
        "/v1/groups",
        "/v1/groups/{group}",
        "/v1/groups/{group}/members/{user}",
        "/v1/presence",
        "/v1/presence/{user}",
        "/v1/inboxes",
        "/v1/inboxes/{inbox}",
        "/v1/agents",
        "/v1/teams",
        "/v1/agents/{user}",
        "/v1/conversations",
        "/v1/conversations/{conversation}",
        "/v1/conversations/{conversation}/assign",
        "/v1/conversations/{conversation}/transfer",
        "/v1/conversations/{conversation}/resolve",
        "/v1/conversations/{conversation}/snooze",
        "/v1/conversations/{conversation}/notes",
        "/v1/conversations/{conversation}/labels",
        "/v1/widget/session",
        "/v1/widget/conversation",
        "/v1/widget/csat",
        "/v1/widget/offline",
        "/v1/canned",
        "/v1/canned/{code}",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    for (path, method) in [("/v1/users", "post"), ("/v1/users", "get"), ("/v1/users/{user}", "patch"), ("/v1/users/{user}", "delete")] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} documented");
    }
    let mut ann = n.ws_login("ann").await?;
    let _ben = n.tcp_login("ben").await?;
    let sent =
        http.post(format!("{}/v1/messages", n.http())).json(&json!({"from":"ben","to":"ann","content":"v1 hi","id":"v1-1"})).send().await?;
    assert_eq!(sent.status(), 200);
    let sent: Value = sent.json().await?;
    assert_eq!(sent["code"], 10000);
    assert_eq!(ann.recv_cmd(11).await?["data"]["content"], "v1 hi");
    let group: Value = http
        .post(format!("{}/v1/messages", n.http()))
        .json(&json!({"from":"ben","groupId":"100","content":"to all"}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(group["data"]["conversation"], "g:100");
    let forbidden =
        http.post(format!("{}/v1/messages", n.http())).json(&json!({"from":"ben","groupId":"secret","content":"x"})).send().await?;
    assert_eq!(forbidden.status(), 403);

    let history: Value = http.get(format!("{}/v1/conversations/p:ann:ben/messages?limit=10", n.http())).send().await?.json().await?;
    assert_eq!(history["messages"][0]["content"], "v1 hi");
    assert_eq!(history["messages"][0]["seq"], 1);
    let after: Value = http.get(format!("{}/v1/conversations/p:ann:ben/messages?after=1", n.http())).send().await?.json().await?;
    assert_eq!(after["messages"], json!([]));
    assert_eq!(http.get(format!("{}/v1/conversations/bogus/messages", n.http())).send().await?.status(), 400);

    let user: Value = http.get(format!("{}/v1/users/ann", n.http())).send().await?.json().await?;
    assert_eq!((user["online"].as_bool(), user["groups"].clone()), (Some(true), json!(["100"])));
    assert_eq!(http.get(format!("{}/v1/users/ghost", n.http())).send().await?.status(), 404);
    let g: Value = http.get(format!("{}/v1/groups/100", n.http())).send().await?.json().await?;
    assert_eq!(g["members"].as_array().unwrap().len(), 2);
    let presence: Value = http.get(format!("{}/v1/presence", n.http())).send().await?.json().await?;
    assert_eq!(presence["online"], json!(["ann", "ben"]));
    let one: Value = http.get(format!("{}/v1/presence/ann", n.http())).send().await?.json().await?;
    assert_eq!(one, json!({"online": true, "otherNodes": [], "terminals": ["ws"], "userId": "ann"}));
    Ok(())
}

#[tokio::test]
async fn static_demo_page_and_404() -> anyhow::Result<()> {
    let n = node().await;
    let page = reqwest::get(format!("{}/", n.http())).await?;
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str()?.starts_with("text/html"));
    assert!(page.text().await?.contains("kefu demo chat"));
    assert_eq!(reqwest::get(format!("{}/nope", n.http())).await?.status(), 404);
    Ok(())
}
