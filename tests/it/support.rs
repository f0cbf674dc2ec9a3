//! Customer service through its boundaries: the `/v1` API, the widget's session route, and J-IM
//! WebSocket sessions for visitors and agents, against a real node. The browser flows (widget and
//! console pages) are in `browser.rs`.

use std::time::Duration;

use serde_json::{json, Value};
use tests::{eventually, Client, TestNode, WsClient};

use crate::{bin, node};

const WAIT: Duration = Duration::from_secs(15);

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(n: &TestNode) -> Api {
        Api { http: reqwest::Client::new(), base: n.http() }
    }

    async fn call(&self, method: reqwest::Method, path: &str, token: Option<&str>, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? }))
    }

    async fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<Value> {
        let (status, v) = self.call(reqwest::Method::GET, path, token, None).await?;
        anyhow::ensure!(status == 200, "GET {path}: {status} {v}");
        Ok(v)
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> anyhow::Result<Value> {
        let (status, v) = self.call(reqwest::Method::POST, path, token, Some(body)).await?;
        anyhow::ensure!((200..300).contains(&status), "POST {path}: {status} {v}");
        Ok(v)
    }

    async fn inbox(&self, body: Value) -> anyhow::Result<Value> {
        self.post("/v1/inboxes", None, body).await
    }

    /// Creates an agent user with a limit and logs them in over WebSocket; returns the session and its token.
    async fn agent(&self, n: &TestNode, id: &str, limit: u32) -> anyhow::Result<(WsClient, String)> {
        self.post("/v1/users", None, json!({"id": id, "password": "pw", "role": "agent"})).await?;
        let (status, v) = self.call(reqwest::Method::PUT, &format!("/v1/agents/{id}"), None, Some(json!({"limit": limit}))).await?;
        anyhow::ensure!(status == 200, "PUT agent: {status} {v}");
        let mut ws = WsClient::connect(&format!("{}/?username={id}&password=pw", n.ws())).await?;
        let login = ws.recv_cmd(6).await?;
        let token = login["data"]["token"].as_str().unwrap_or_default().to_string();
        Ok((ws, token))
    }

    /// A widget session and the visitor's WebSocket logged in with its token.
    async fn visitor(&self, n: &TestNode, start: Value) -> anyhow::Result<(Value, WsClient)> {
        let session = self.post("/v1/widget/session", None, start).await?;
        let mut ws = WsClient::connect(&format!("{}/?token={}", n.ws(), session["token"].as_str().unwrap_or_default())).await?;
        let login = ws.recv_cmd(6).await?;
        anyhow::ensure!(login["code"] == 10007, "visitor login: {login}");
        Ok((session, ws))
    }

    async fn conversation(&self, id: &str) -> anyhow::Result<Value> {
        self.get(&format!("/v1/conversations/{id}"), None).await
    }
}

fn conv_id(session: &Value) -> String {
    session["conversation"]["id"].as_str().unwrap_or_default().to_string()
}

async fn say(ws: &mut WsClient, conversation: &str, text: &str) -> anyhow::Result<()> {
    let reply = ws.chat(json!({"chatType": 1, "groupId": conversation, "msgType": 0, "content": text})).await?;
    anyhow::ensure!(reply["code"] == 10000, "send: {reply}");
    Ok(())
}

async fn status_of(api: &Api, id: &str) -> Option<(String, Option<String>)> {
    let c = api.conversation(id).await.ok()?;
    Some((c["status"].as_str()?.to_string(), c["assignee"].as_str().map(str::to_string)))
}

#[tokio::test]
async fn three_agents_of_limit_two_share_seven_visitors_and_the_oldest_queued_goes_next() -> anyhow::Result<()> {
    let n = node().await;
    let api = Api::new(&n);
    let inbox = api.inbox(json!({"name": "Shop"})).await?;
    let website = inbox["website_token"].as_str().unwrap_or_default().to_string();
    let mut agents = Vec::new();
    for id in ["ann", "ben", "cat"] {
        agents.push(api.agent(&n, id, 2).await?);
    }
    let mut visitors = Vec::new();
    for i in 0..7 {
        let (session, mut ws) = api.visitor(&n, json!({"inbox": website})).await?;
        assert_eq!(session["conversation"]["status"], "new");
        let id = conv_id(&session);
        say(&mut ws, &id, &format!("hello from visitor {i}")).await?;
        // One at a time, so the queue's order is the order they wrote in.
        eventually(WAIT, || async { status_of(&api, &id).await.filter(|(s, _)| s != "new") }).await?;
        visitors.push((id, ws, session["token"].as_str().unwrap_or_default().to_string()));
    }
    let loads = eventually(WAIT, || async {
        let agents = api.get("/v1/agents", None).await.ok()?;
        let loads: Vec<u64> = agents["agents"].as_array()?.iter().filter_map(|a| a["open"].as_u64()).collect();
        (loads == vec![2, 2, 2]).then_some(loads)
    })
    .await?;
    assert_eq!(loads.iter().sum::<u64>(), 6);
    let queued = api.get("/v1/conversations?status=queued", None).await?;
    let queued = queued["conversations"].as_array().cloned().unwrap_or_default();
    assert_eq!(queued.len(), 1, "{queued:?}");
    let (last_id, last_ws, last_token) = visitors.last_mut().unwrap();
    assert_eq!(queued[0]["id"].as_str(), Some(last_id.as_str()), "the newest waits");
    // The waiting visitor is told where it stands, over its session and on asking.
    let event = last_ws.recv_cmd(108).await?;
    let pos = if event["data"]["conversation"]["queuePosition"].is_null() { last_ws.recv_cmd(108).await? } else { event };
    assert_eq!(pos["data"]["conversation"]["queuePosition"], 1, "{pos}");
    let asked = api.get("/v1/widget/conversation", Some(last_token)).await?;
    assert_eq!((asked["status"].as_str(), asked["queuePosition"].as_u64()), (Some("queued"), Some(1)));
    assert!(asked.get("labels").is_none() && asked.get("events").is_none(), "a visitor sees no agent-side fields: {asked}");
    let (_, token) = &agents[0];

    // Ann resolves one of hers: the queued conversation goes to her at once.
    let mine = api.get("/v1/conversations?status=open&assignee=me", Some(token)).await?;
    let mine = mine["conversations"].as_array().cloned().unwrap_or_default();
    assert_eq!(mine.len(), 2);
    assert!(mine.iter().all(|c| c["assignee"] == "ann"));
    let first = mine[0]["id"].as_str().unwrap().to_string();
    let resolved = api.post(&format!("/v1/conversations/{first}/resolve"), Some(token), json!({})).await?;
    assert_eq!(resolved["status"], "resolved");
    let last = last_id.clone();
    let (status, assignee) = eventually(WAIT, || async { status_of(&api, &last).await.filter(|(s, _)| s == "open") }).await?;
    assert_eq!((status.as_str(), assignee.as_deref()), ("open", Some("ann")));
    // Ann now gets the visitor's messages live.
    say(last_ws, &last, "still there?").await?;
    let (ann, _) = &mut agents[0];
    let got = ann.recv_cmd(11).await?;
    assert_eq!(got["data"]["content"], "still there?");
    eventually(WAIT, || async {
        let c = api.conversation(&last).await.ok()?;
        c["events"].as_array()?.iter().any(|e| e["text"] == "assigned to ann").then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_transfer_note_reaches_agents_only_and_a_resolved_chat_is_rated_once() -> anyhow::Result<()> {
    let n = node().await;
    let api = Api::new(&n);
    let inbox = api.inbox(json!({"name": "Help"})).await?;
    let website = inbox["website_token"].as_str().unwrap().to_string();
    let (mut first, first_token) = api.agent(&n, "first", 5).await?;
    first.clear_backlog();
    let (session, mut visitor) = api.visitor(&n, json!({"inbox": website})).await?;
    let id = conv_id(&session);
    say(&mut visitor, &id, "my order is late").await?;
    eventually(WAIT, || async { status_of(&api, &id).await.filter(|(s, a)| s == "open" && a.as_deref() == Some("first")) }).await?;
    let (mut second, _) = api.agent(&n, "second", 5).await?;
    let moved = api
        .post(
            &format!("/v1/conversations/{id}/transfer"),
            Some(&first_token),
            json!({"agent": "second", "note": "VIP customer, refund approved"}),
        )
        .await?;
    assert_eq!(moved["assignee"], "second");
    let note = second.recv_cmd(108).await?;
    let note = if note["data"]["note"].is_null() { second.recv_cmd(108).await? } else { note };
    assert!(note.to_string().contains("VIP customer") || second.backlog().iter().any(|f| f.to_string().contains("VIP customer")));
    let reply = second.chat(json!({"chatType": 1, "groupId": id, "msgType": 0, "content": "I can help"})).await?;
    assert_eq!(reply["code"], 10000);
    // Everything the visitor was sent up to the agent's reply (its own message's echo included).
    loop {
        let got = visitor.recv_cmd(11).await?;
        assert!(!got.to_string().contains("VIP"));
        if got["data"]["content"] == "I can help" {
            break;
        }
    }
    assert!(!visitor.backlog().iter().any(|f| f.to_string().contains("VIP")), "the visitor never sees the note: {:?}", visitor.backlog());
    let view = api.conversation(&id).await?;
    let events = view["events"].as_array().unwrap();
    assert!(events.iter().any(|e| e["kind"] == "note" && e["text"] == "VIP customer, refund approved" && e["by"] == "first"), "{view}");
    assert!(events.iter().any(|e| e["text"] == "transferred to second by first"), "{view}");
    // The previous agent is out of the conversation.
    let sent = first.chat(json!({"chatType": 1, "groupId": id, "msgType": 0, "content": "me again"})).await?;
    assert_ne!(sent["code"], 10000, "{sent}");

    // A visitor may talk only in its conversation.
    let private = visitor.chat(json!({"chatType": 2, "to": "second", "msgType": 0, "content": "psst"})).await?;
    assert_eq!(private["code"], 11001, "{private}");

    // Rating: not before resolution, once after.
    let vt = session["token"].as_str().unwrap();
    let (early, _) = api.call(reqwest::Method::POST, "/v1/widget/csat", Some(vt), Some(json!({"rating": 5}))).await?;
    assert_eq!(early, 400);
    api.post(&format!("/v1/conversations/{id}/resolve"), None, json!({})).await?;
    let (bad, _) = api.call(reqwest::Method::POST, "/v1/widget/csat", Some(vt), Some(json!({"rating": 9}))).await?;
    assert_eq!(bad, 400);
    api.post("/v1/widget/csat", Some(vt), json!({"rating": 4, "comment": "quick"})).await?;
    let (again, _) = api.call(reqwest::Method::POST, "/v1/widget/csat", Some(vt), Some(json!({"rating": 1}))).await?;
    assert_eq!(again, 400, "rated once");
    let view = api.conversation(&id).await?;
    assert_eq!((view["csat"]["rating"].as_u64(), view["csat"]["comment"].as_str()), (Some(4), Some("quick")));
    // The visitor's next message reopens it with its last agent.
    say(&mut visitor, &id, "one more thing").await?;
    let (_, assignee) = eventually(WAIT, || async { status_of(&api, &id).await.filter(|(s, _)| s == "open") }).await?;
    assert_eq!(assignee.as_deref(), Some("second"));
    Ok(())
}

fn identifier_hash(secret: &str, id: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(id.as_bytes());
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_verified_visitor_is_the_same_visitor_on_every_device_and_a_forged_one_is_refused() -> anyhow::Result<()> {
    let n = node().await;
    let api = Api::new(&n);
    let inbox = api.inbox(json!({"name": "Bank", "hmac_required": true})).await?;
    let (website, secret) = (inbox["website_token"].as_str().unwrap(), inbox["hmac_secret"].as_str().unwrap());
    let user = json!({"id": "cust-42", "name": "Dana", "email": "dana@example.com", "identifier_hash": identifier_hash(secret, "cust-42")});
    let (phone, mut phone_ws) = api.visitor(&n, json!({"inbox": website, "user": user})).await?;
    say(&mut phone_ws, &conv_id(&phone), "from my phone").await?;
    let (laptop, mut laptop_ws) = api.visitor(&n, json!({"inbox": website, "user": user})).await?;
    assert_eq!(phone["visitor"], laptop["visitor"]);
    assert_eq!(conv_id(&phone), conv_id(&laptop));
    assert!(laptop.get("secret").is_none(), "a verified visitor needs no secret");
    // The second device sees the first one's message in the history.
    laptop_ws.send(json!({"cmd": 19, "type": 1, "groupId": conv_id(&laptop), "userId": laptop["visitor"]})).await?;
    let history = laptop_ws.recv_cmd(20).await?;
    assert!(history.to_string().contains("from my phone"), "{history}");
    let view = api.conversation(&conv_id(&phone)).await?;
    assert_eq!((view["verified"].as_bool(), view["visitorName"].as_str()), (Some(true), Some("Dana")));

    let forged = json!({"id": "cust-42", "identifier_hash": identifier_hash("guess", "cust-42")});
    let (status, body) =
        api.call(reqwest::Method::POST, "/v1/widget/session", None, Some(json!({"inbox": website, "user": forged}))).await?;
    assert_eq!(status, 403, "{body}");
    let (status, _) = api.call(reqwest::Method::POST, "/v1/widget/session", None, Some(json!({"inbox": "nope"}))).await?;
    assert_eq!(status, 404);
    // An anonymous visitor comes back with its id and secret, and only with both.
    let open = api.inbox(json!({"name": "Open"})).await?;
    let first = api.post("/v1/widget/session", None, json!({"inbox": open["website_token"]})).await?;
    let back = api
        .post("/v1/widget/session", None, json!({"inbox": open["website_token"], "visitor": first["visitor"], "secret": first["secret"]}))
        .await?;
    assert_eq!(back["visitor"], first["visitor"]);
    let stranger = api
        .post("/v1/widget/session", None, json!({"inbox": open["website_token"], "visitor": first["visitor"], "secret": "wrong"}))
        .await?;
    assert_ne!(stranger["visitor"], first["visitor"]);
    Ok(())
}

#[tokio::test]
async fn an_agent_gone_past_the_grace_period_loses_their_conversations_to_the_queue() -> anyhow::Result<()> {
    let n = TestNode::builder(bin()).arg("--reassign-after", 1).start().await?;
    let api = Api::new(&n);
    let inbox = api.inbox(json!({"name": "Night"})).await?;
    let (gone, _) = api.agent(&n, "gone", 2).await?;
    let (session, mut visitor) = api.visitor(&n, json!({"inbox": inbox["website_token"]})).await?;
    let id = conv_id(&session);
    say(&mut visitor, &id, "anyone?").await?;
    eventually(WAIT, || async { status_of(&api, &id).await.filter(|(_, a)| a.as_deref() == Some("gone")) }).await?;
    drop(gone);
    let (status, _) = eventually(WAIT, || async { status_of(&api, &id).await.filter(|(s, _)| s == "queued") }).await?;
    assert_eq!(status, "queued");
    let (_stays, _) = api.agent(&n, "stays", 2).await?;
    let (_, assignee) = eventually(WAIT, || async { status_of(&api, &id).await.filter(|(s, _)| s == "open") }).await?;
    assert_eq!(assignee.as_deref(), Some("stays"));
    Ok(())
}

#[tokio::test]
async fn inboxes_agents_and_conversations_replicate_and_route_across_regions() -> anyhow::Result<()> {
    let c = tests::cluster::Cluster::start(bin(), &[("iad-1", "iad"), ("fra-1", "fra")], &[]).await?;
    c.wait_ready(WAIT).await?;
    let (iad, fra) = (Api::new(c.node(0)), Api::new(c.node(1)));
    let inbox = iad.inbox(json!({"name": "Global"})).await?;
    let website = inbox["website_token"].as_str().unwrap().to_string();
    iad.post("/v1/users", None, json!({"id": "eve", "password": "pw", "role": "agent"})).await?;
    eventually(WAIT, || async { fra.get("/v1/users/eve", None).await.ok() }).await?;
    let (status, v) = iad.call(reqwest::Method::PUT, "/v1/agents/eve", None, Some(json!({"limit": 2}))).await?;
    anyhow::ensure!(status == 200, "{v}");
    // The agent works from Frankfurt, the visitor arrives in Frankfurt; the inbox and the agent
    // were made in Virginia.
    eventually(WAIT, || async { fra.get("/v1/agents", None).await.ok().filter(|a| a["agents"][0]["id"] == "eve") }).await?;
    let mut eve = WsClient::connect(&format!("{}/?username=eve&password=pw", c.node(1).ws())).await?;
    eve.recv_cmd(6).await?;
    let session = eventually(WAIT, || async { fra.post("/v1/widget/session", None, json!({"inbox": website})).await.ok() }).await?;
    let mut visitor = WsClient::connect(&format!("{}/?token={}", c.node(1).ws(), session["token"].as_str().unwrap())).await?;
    visitor.recv_cmd(6).await?;
    let id = conv_id(&session);
    say(&mut visitor, &id, "hello from Frankfurt").await?;
    eventually(WAIT, || async { status_of(&iad, &id).await.filter(|(s, a)| s == "open" && a.as_deref() == Some("eve")) }).await?;
    say(&mut visitor, &id, "are you there?").await?;
    let got = eve.recv_cmd(11).await?;
    assert_eq!(got["data"]["content"], "are you there?");
    // Changes asked at either node are made by the router's node, one writer for the record:
    // labels at one node, resolution at the other, the rating at the first; none is lost.
    let (status, v) =
        fra.call(reqwest::Method::PUT, &format!("/v1/conversations/{id}/labels"), None, Some(json!({"labels": ["vip"]}))).await?;
    anyhow::ensure!(status == 200, "{v}");
    iad.post(&format!("/v1/conversations/{id}/resolve"), None, json!({})).await?;
    fra.post("/v1/widget/csat", session["token"].as_str(), json!({"rating": 3})).await?;
    for api in [&iad, &fra] {
        let c = eventually(WAIT, || async { api.conversation(&id).await.ok().filter(|c| c["csat"]["rating"] == 3) }).await?;
        assert_eq!((c["status"].as_str(), c["labels"][0].as_str()), (Some("resolved"), Some("vip")), "{c}");
    }
    Ok(())
}

#[tokio::test]
async fn canned_replies_permissions_and_the_widget_preflight() -> anyhow::Result<()> {
    let n = node().await;
    let api = Api::new(&n);
    let (_ws, token) = api.agent(&n, "agt", 2).await?;
    // Admins (here: the dev profile's open API) set canned replies; agents read them.
    let (status, _) = api.call(reqwest::Method::PUT, "/v1/canned/thanks", None, Some(json!({"text": "Thanks for waiting!"}))).await?;
    assert_eq!(status, 200);
    let (status, _) = api.call(reqwest::Method::PUT, "/v1/canned/bad%20code", None, Some(json!({"text": "x"}))).await?;
    assert_eq!(status, 400);
    let (status, _) = api.call(reqwest::Method::PUT, "/v1/canned/mine", Some(&token), Some(json!({"text": "x"}))).await?;
    assert_eq!(status, 403, "an agent may not change canned replies");
    let list = api.get("/v1/canned", Some(&token)).await?;
    assert_eq!(list["canned"], json!([{"code": "thanks", "text": "Thanks for waiting!"}]));
    api.call(reqwest::Method::DELETE, "/v1/canned/thanks", None, None).await?;
    assert_eq!(api.get("/v1/canned", Some(&token)).await?["canned"], json!([]));
    // An agent changes only their own status; the secrets of an inbox are for admins.
    let (status, _) = api.call(reqwest::Method::PUT, "/v1/agents/agt", Some(&token), Some(json!({"limit": 50}))).await?;
    assert_eq!(status, 403);
    let (status, v) = api.call(reqwest::Method::PUT, "/v1/agents/agt", Some(&token), Some(json!({"status": "busy"}))).await?;
    assert_eq!((status, v["status"].as_str()), (200, Some("busy")));
    api.call(reqwest::Method::PUT, "/v1/agents/agt", None, Some(json!({"teams": ["billing"]}))).await?;
    let teams = api.get("/v1/teams", Some(&token)).await?;
    assert_eq!(teams["teams"], json!([{"name": "billing", "agents": ["agt"], "online": 0}]), "busy is not online");
    let inbox = api.inbox(json!({"name": "Secretive"})).await?;
    let seen = api.get(&format!("/v1/inboxes/{}", inbox["id"].as_str().unwrap()), Some(&token)).await?;
    assert!(seen.get("hmac_secret").is_none(), "{seen}");
    // A visitor's token opens nothing but the widget's routes.
    let session = api.post("/v1/widget/session", None, json!({"inbox": inbox["website_token"]})).await?;
    let vt = session["token"].as_str().unwrap();
    let (status, _) = api.call(reqwest::Method::GET, "/v1/conversations", Some(vt), None).await?;
    assert_eq!(status, 403);
    // Nobody can make a customer-service conversation's group before the node does.
    let squatted = "cs-0123456789abcdef01234567";
    let mut squatter = n.ws_login("squatter").await?;
    squatter.send(json!({"cmd": 7, "groupId": squatted})).await?;
    assert_eq!(squatter.recv_cmd(8).await?["code"], 10012, "join refused");
    let (status, _) = api.call(reqwest::Method::POST, "/v1/groups", None, Some(json!({"id": squatted, "access": "open"}))).await?;
    assert_eq!(status, 400);
    // A visitor does not look users up.
    let mut v = WsClient::connect(&format!("{}/?token={vt}", n.ws())).await?;
    v.recv_cmd(6).await?;
    v.send(json!({"cmd": 17, "userId": "agt", "type": 2})).await?;
    assert_eq!(v.recv_cmd(18).await?["code"], 11001);
    // The widget's routes answer a cross-origin preflight.
    let pre = api
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/v1/widget/session", api.base))
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .send()
        .await?;
    assert_eq!(pre.status(), 204);
    assert_eq!(pre.headers()["access-control-allow-origin"], "*");
    Ok(())
}

/// What a test receiver got: (headers, body).
type Got = std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>>;

/// A webhook receiver on `listener` that refuses the first `refuse` posts with a 500.
fn receiver(listener: tokio::net::TcpListener, refuse: usize) -> (Got, tokio::task::JoinHandle<()>) {
    let got: Got = Default::default();
    let seen = std::sync::Arc::clone(&got);
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let (seen, count) = (std::sync::Arc::clone(&seen), std::sync::Arc::clone(&count));
            async move {
                if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < refuse {
                    return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                seen.lock().unwrap().push((headers, body));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    (got, tokio::spawn(async move { drop(axum::serve(listener, app).await) }))
}

fn signed(secret: &str, headers: &axum::http::HeaderMap, body: &str) -> bool {
    use hmac::{Hmac, Mac};
    let ts = headers["x-kefu-timestamp"].to_str().unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    let want: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    headers["x-kefu-signature"].to_str().unwrap() == format!("sha256={want}")
}

fn events(got: &Got) -> Vec<Value> {
    got.lock().unwrap().iter().map(|(_, b)| serde_json::from_str(b).unwrap()).collect()
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_kept_across_a_restart() -> anyhow::Result<()> {
    let mut n = node().await;
    let api = Api::new(&n);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let inbox = api.inbox(json!({"name": "Hooked", "webhooks": [url]})).await?;
    let secret = inbox["webhook_secret"].as_str().unwrap().to_string();
    let (got, server) = receiver(listener, 1);
    let (_agent, token) = api.agent(&n, "hank", 2).await?;
    let (session, mut visitor) = api.visitor(&n, json!({"inbox": inbox["website_token"]})).await?;
    let id = conv_id(&session);
    say(&mut visitor, &id, "hello hooks").await?;
    eventually(WAIT, || async { status_of(&api, &id).await.filter(|(s, _)| s == "open") }).await?;
    api.post(&format!("/v1/conversations/{id}/resolve"), Some(&token), json!({})).await?;
    api.post("/v1/widget/csat", session["token"].as_str(), json!({"rating": 5})).await?;
    let wanted = ["message.created", "conversation.created", "conversation.assigned", "conversation.resolved", "csat.submitted"];
    eventually(WAIT, || async {
        let names: Vec<String> = events(&got).iter().filter_map(|e| e["event"].as_str().map(str::to_string)).collect();
        wanted.iter().all(|w| names.iter().any(|n| n == w)).then_some(())
    })
    .await?;
    for (headers, body) in got.lock().unwrap().iter() {
        assert!(signed(&secret, headers, body), "signature of {body}");
        let e: Value = serde_json::from_str(body)?;
        assert_eq!(headers["x-kefu-delivery"].to_str()?, e["delivery"].as_str().unwrap());
        assert_eq!(e["data"]["conversation"]["id"], id.as_str());
    }
    let created = events(&got).into_iter().find(|e| e["event"] == "message.created").unwrap();
    assert_eq!(
        (created["data"]["message"]["content"].as_str(), created["data"]["fromVisitor"].as_bool()),
        (Some("hello hooks"), Some(true))
    );

    // The receiver goes away; an event waits in the outbox through kill -9 and a restart.
    server.abort();
    let _ = server.await;
    let port = url.trim_start_matches("http://127.0.0.1:").trim_end_matches("/hook").parse::<u16>()?;
    say(&mut visitor, &id, "while the receiver is down").await?;
    n.kill().await?;
    n.restart().await?;
    let api = Api::new(&n);
    let listener = eventually(WAIT, || async { tokio::net::TcpListener::bind(("127.0.0.1", port)).await.ok() }).await?;
    let (got, _server) = receiver(listener, 0);
    let late = eventually(Duration::from_secs(40), || async {
        events(&got).into_iter().find(|e| e["data"]["message"]["content"] == "while the receiver is down")
    })
    .await?;
    assert_eq!(late["event"], "message.created");
    // A bad URL is refused when set.
    let (status, _) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/v1/inboxes/{}", inbox["id"].as_str().unwrap()),
            None,
            Some(json!({"webhooks": ["ftp://x"]})),
        )
        .await?;
    assert_eq!(status, 400);
    Ok(())
}

#[tokio::test]
async fn outside_business_hours_the_widget_offers_the_form_and_the_away_reply_comes_once() -> anyhow::Result<()> {
    let n = node().await;
    let api = Api::new(&n);
    // Open on no day at all: always closed.
    let inbox =
        api.inbox(json!({"name": "Closed", "away_message": "Back on Monday", "hours": {"time_zone": "Asia/Shanghai", "days": {}}})).await?;
    let (_agent, _) = api.agent(&n, "oscar", 2).await?;
    let (session, mut visitor) = api.visitor(&n, json!({"inbox": inbox["website_token"]})).await?;
    assert_eq!((session["open"].as_bool(), session["agentsOnline"].as_bool()), (Some(false), Some(true)));
    let id = conv_id(&session);
    say(&mut visitor, &id, "anyone?").await?;
    let away = loop {
        let m = visitor.recv_cmd(11).await?;
        if m["data"]["content"] == "Back on Monday" {
            break m;
        }
    };
    assert_eq!(away["data"]["from"], inbox["id"]);
    say(&mut visitor, &id, "hello again").await?;
    // The second message gets no second away reply: the next message the visitor sees is an agent's.
    eventually(WAIT, || async { status_of(&api, &id).await.filter(|(s, _)| s == "open") }).await?;
    api.post("/v1/messages", None, json!({"from": "oscar", "groupId": id, "content": "I am here anyway"})).await?;
    loop {
        let m = visitor.recv_cmd(11).await?;
        assert_ne!(m["data"]["content"], "Back on Monday", "the away reply came twice");
        if m["data"]["content"] == "I am here anyway" {
            break;
        }
    }
    // Hours are checked when set.
    let (status, body) = api
        .call(reqwest::Method::POST, "/v1/inboxes", None, Some(json!({"name": "x", "hours": {"time_zone": "Nowhere/Land", "days": {}}})))
        .await?;
    assert_eq!(status, 400, "{body}");
    Ok(())
}

#[tokio::test]
async fn an_inbox_with_its_own_agents_is_served_only_by_them() -> anyhow::Result<()> {
    let n = node().await;
    let api = Api::new(&n);
    let (_kim, _) = api.agent(&n, "kim", 5).await?;
    let (_lee, _) = api.agent(&n, "lee", 5).await?;
    let vip = api.inbox(json!({"name": "VIP", "agents": ["kim"]})).await?;
    let open = api.inbox(json!({"name": "Everyone"})).await?;
    // Kim is busier than Lee, yet the VIP inbox's conversations are Kim's.
    for i in 0..2 {
        let (session, mut v) = api.visitor(&n, json!({"inbox": vip["website_token"]})).await?;
        let id = conv_id(&session);
        say(&mut v, &id, &format!("vip {i}")).await?;
        let (_, who) = eventually(WAIT, || async { status_of(&api, &id).await.filter(|(s, _)| s == "open") }).await?;
        assert_eq!(who.as_deref(), Some("kim"));
    }
    let (session, mut v) = api.visitor(&n, json!({"inbox": open["website_token"]})).await?;
    let id = conv_id(&session);
    say(&mut v, &id, "anyone").await?;
    let (_, who) = eventually(WAIT, || async { status_of(&api, &id).await.filter(|(s, _)| s == "open") }).await?;
    assert_eq!(who.as_deref(), Some("lee"), "the other inbox goes to the freer agent");
    let (status, _) = api
        .call(reqwest::Method::PATCH, &format!("/v1/inboxes/{}", vip["id"].as_str().unwrap()), None, Some(json!({"agents": ["bad:id"]})))
        .await?;
    assert_eq!(status, 400);
    Ok(())
}
