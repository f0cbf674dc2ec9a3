//! The edge router (issue 11 §1, first part) in front of real nodes: `/v1/connect` by region and
//! load, HTTP, WebSocket and J-IM TCP through it, a node that stops being ready drained and
//! taken back, a region without a healthy node falling back to the next configured one.

use std::time::Duration;

use serde_json::{json, Value};
use tests::{eventually, Client, TcpClient, TestNode, WsClient};
use tokio::io::AsyncBufReadExt;

use crate::bin;

/// A running router and the ports it printed.
struct Router {
    http: String,
    tcp: std::net::SocketAddr,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

async fn router(nodes: &[(&str, &str, &TestNode)], extra: &str) -> anyhow::Result<Router> {
    let specs: Vec<_> = nodes.iter().map(|(id, region, n)| (id.to_string(), region.to_string(), n.jim, n.admin, Some(n.quic))).collect();
    router_for(&specs, extra).await
}

/// A router (region iad, polling every 100 ms, draining after 500 ms) in front of nodes given as
/// (id, region, http, admin, quic).
async fn router_for(
    nodes: &[(String, String, std::net::SocketAddr, std::net::SocketAddr, Option<std::net::SocketAddr>)],
    extra: &str,
) -> anyhow::Result<Router> {
    let dir = tempfile::tempdir()?;
    let mut toml =
        format!("listen = \"127.0.0.1:0\"\ntcp_listen = \"127.0.0.1:0\"\nregion = \"iad\"\npoll_ms = 100\ndrain_ms = 500\n{extra}\n");
    for (id, region, http, admin, quic) in nodes {
        toml.push_str(&format!("[[nodes]]\nid = \"{id}\"\nregion = \"{region}\"\nhttp = \"{http}\"\nadmin = \"{admin}\"\n"));
        if let Some(q) = quic {
            toml.push_str(&format!("quic = \"{q}\"\n"));
        }
    }
    let path = dir.path().join("router.toml");
    std::fs::write(&path, toml)?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_test-router"))
        .arg("--config")
        .arg(&path)
        .env("KEFU_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await??.unwrap_or_default();
    let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name)).map(str::to_string);
    let (http, tcp) = (field("http=").unwrap_or_default(), field("tcp=").unwrap_or_default().parse()?);
    Ok(Router { http: format!("http://{http}"), tcp, _child: child, _dir: dir })
}

/// Waits until the router's polls have a healthy node in each of `regions`.
async fn serving(r: &Router, regions: &[&str]) -> anyhow::Result<()> {
    for region in regions {
        eventually(Duration::from_secs(10), || async {
            connect(r, &format!("?region={region}"), &[]).await.filter(|v| v["region"] == *region)
        })
        .await?;
    }
    Ok(())
}

async fn connect(r: &Router, query: &str, headers: &[(&str, &str)]) -> Option<Value> {
    let mut req = reqwest::Client::new().get(format!("{}/v1/connect{query}", r.http));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

#[tokio::test]
async fn connect_proxies_and_draining_follow_the_nodes_health() -> anyhow::Result<()> {
    let iad = TestNode::start(bin()).await?;
    let fra = TestNode::start(bin()).await?;
    let r = router(&[("iad-1", "iad", &iad), ("fra-1", "fra", &fra)], "fallback = [\"fra\"]").await?;
    // Once the first polls are in: the router's region by default, a hint picks another.
    let default = eventually(Duration::from_secs(10), || async { connect(&r, "", &[]).await }).await?;
    assert_eq!((default["node"].as_str(), default["region"].as_str()), (Some("iad-1"), Some("iad")));
    assert_eq!(default["tcp"], iad.jim.to_string());
    assert_eq!(default["quic"], iad.quic.to_string());
    assert_eq!(default["fingerprint"], iad.fingerprint, "the fingerprint the node publishes");
    let fra_pick = eventually(Duration::from_secs(10), || async { connect(&r, "?region=fra", &[]).await }).await?;
    assert_eq!(fra_pick["node"], "fra-1");
    let by_header = connect(&r, "", &[("fly-region", "fra")]).await.unwrap();
    assert_eq!(by_header["node"], "fra-1");
    // HTTP, WebSocket and J-IM TCP through the router reach the nodes.
    let page = reqwest::get(format!("{}/", r.http)).await?;
    assert!(page.text().await?.contains("kefu demo chat"));
    let mut ws = WsClient::connect(&format!("ws://{}/?username=viaws&password=pw", r.http.trim_start_matches("http://"))).await?;
    assert_eq!(ws.recv_cmd(6).await?["code"], 10007);
    let mut tcp = TcpClient::connect(r.tcp).await?;
    tcp.login("viatcp", "pw").await?;
    let sent = tcp.chat(json!({"chatType": 2, "to": "viaws", "content": "through the router"})).await?;
    assert_eq!(sent["code"], 10000, "both landed on iad: {sent}");
    assert_eq!(ws.recv_cmd(11).await?["data"]["content"], "through the router");
    // iad stops: drained within the drain time, and its region falls back to fra.
    drop(iad);
    let fallback = eventually(Duration::from_secs(10), || async { connect(&r, "", &[]).await.filter(|v| v["node"] == "fra-1") }).await?;
    assert_eq!(fallback["region"], "fra");
    let mut again = TcpClient::connect(r.tcp).await?;
    again.login("aftertheloss", "pw").await?;
    // A forced region with no healthy node is not served elsewhere.
    assert!(connect(&r, "", &[("fly-force-region", "iad")]).await.is_none());
    Ok(())
}

#[tokio::test]
async fn behind_fly_a_write_for_another_regions_conversation_is_sent_back_with_fly_replay() -> anyhow::Result<()> {
    let c = tests::cluster::Cluster::start(bin(), &crate::cluster::REGIONS[..2], &[("--replay-writes", "true")]).await?;
    // A private conversation that fra sequences, sent to iad.
    let (a, b) = (0..100)
        .map(|i| (format!("rp-a{i}"), format!("rp-b{i}")))
        .find(|(a, b)| c.owner_of(schema::ConversationId::private(a, b).as_str()) == 1)
        .unwrap();
    let http = reqwest::Client::new();
    let body = json!({"from": a, "to": b, "content": "replay me", "id": "rp-1"});
    let first = http.post(format!("{}/v1/messages", c.node(0).http())).json(&body).send().await?;
    assert_eq!(first.status(), 409);
    let header = first.headers()["fly-replay"].to_str()?.to_string();
    let replay = schema::fly_replay::Replay::parse(&header)?;
    assert_eq!(replay.regions, ["fra"], "{header}");
    // The J-IM API too.
    let jim = json!({"cmd": 11, "chatType": 2, "from": a, "to": b, "content": "replay me too"});
    let api = http.post(format!("{}/api/message/send", c.node(0).http())).body(jim.to_string()).send().await?;
    assert!(api.headers().contains_key("fly-replay"));
    // Replayed (it carries fly-replay-src), it is served where it lands, even at iad.
    let src = schema::fly_replay::replay_src("iad-1", "iad", 1, None);
    let served = http.post(format!("{}/v1/messages", c.node(0).http())).header("fly-replay-src", src).json(&body).send().await?;
    assert_eq!(served.status(), 200);
    assert!(served.headers().get("fly-replay").is_none());
    // And at fra, its home, a write is served without a replay.
    let home =
        http.post(format!("{}/v1/messages", c.node(1).http())).json(&json!({"from": a, "to": b, "content": "at home"})).send().await?;
    assert_eq!(home.status(), 200);
    Ok(())
}

// -- fly-replay against small test backends ----------------------------------------------------

/// What a test backend answers to a request.
#[derive(Clone)]
enum Answer {
    /// `served by <id>` (a WebSocket upgrade is accepted and says `hello from <id>`).
    Serve,
    /// 409 with this `fly-replay` header — unless the request comes back with
    /// `fly-replay-failed`, which it then serves (as a kefu node does).
    Replay(&'static str),
    /// 200 with this JSON body of type `application/vnd.fly.replay+json`.
    Json(&'static str),
    /// Never answers.
    Stall,
}

/// A request a backend saw.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: axum::http::HeaderMap,
    body_len: usize,
}

struct BackendState {
    id: String,
    answer: std::sync::Mutex<Answer>,
    seen: std::sync::Mutex<Vec<Seen>>,
}

/// A tiny HTTP service standing in for a node: an app port that answers as told and records
/// what it saw, and an admin port with `/readyz` and `/metrics`. With `dead_app`, nothing
/// listens on its app port while the admin port says it is ready.
struct Backend {
    state: std::sync::Arc<BackendState>,
    http: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Backend {
    async fn start(id: &str, connections: u64, dead_app: bool) -> anyhow::Result<Backend> {
        use axum::routing::get;
        let state = std::sync::Arc::new(BackendState {
            id: id.to_string(),
            answer: std::sync::Mutex::new(Answer::Serve),
            seen: Default::default(),
        });
        let app_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http = app_listener.local_addr()?;
        if dead_app {
            drop(app_listener);
        } else {
            let app = axum::Router::new().route("/ws", get(backend_ws)).fallback(backend_any).with_state(state.clone());
            tokio::spawn(async move { axum::serve(app_listener, app).await });
        }
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let admin = admin_listener.local_addr()?;
        let metrics = format!("kefu_connections{{transport=\"tcp\"}} {connections}\n");
        let admin_app =
            axum::Router::new().route("/readyz", get(|| async { "ready" })).route("/metrics", get(move || async move { metrics }));
        tokio::spawn(async move { axum::serve(admin_listener, admin_app).await });
        Ok(Backend { state, http, admin })
    }

    fn spec(&self, region: &str) -> (String, String, std::net::SocketAddr, std::net::SocketAddr, Option<std::net::SocketAddr>) {
        (self.state.id.clone(), region.to_string(), self.http, self.admin, None)
    }

    fn answer(&self, a: Answer) {
        *self.state.answer.lock().unwrap() = a;
    }

    fn seen(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.state.seen.lock().unwrap())
    }
}

/// The answer for a request, recording it.
async fn backend_answer(
    state: &BackendState,
    uri: &axum::http::Uri,
    headers: &axum::http::HeaderMap,
    body_len: usize,
) -> Option<axum::response::Response> {
    use axum::response::IntoResponse;
    let path = uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
    state.seen.lock().unwrap().push(Seen { path, headers: headers.clone(), body_len });
    let answer = state.answer.lock().unwrap().clone();
    match answer {
        Answer::Serve => None,
        Answer::Replay(_) if headers.contains_key("fly-replay-failed") => None,
        Answer::Replay(h) => {
            Some((axum::http::StatusCode::CONFLICT, [("fly-replay", h)], format!("replay from {}", state.id)).into_response())
        }
        Answer::Json(body) => Some(([("content-type", "application/vnd.fly.replay+json")], body).into_response()),
        Answer::Stall => std::future::pending().await,
    }
}

async fn backend_any(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<BackendState>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match backend_answer(&state, &uri, &headers, body.len()).await {
        Some(r) => r,
        None => format!("served by {}", state.id).into_response(),
    }
}

async fn backend_ws(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<BackendState>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    ws: axum::extract::WebSocketUpgrade,
) -> axum::response::Response {
    if let Some(r) = backend_answer(&state, &uri, &headers, 0).await {
        return r;
    }
    let id = state.id.clone();
    ws.on_upgrade(move |mut socket| async move {
        let _ = socket.send(axum::extract::ws::Message::Text(format!("hello from {id}").into())).await;
        while let Some(Ok(_)) = socket.recv().await {}
    })
}

/// Four backends behind a router in iad: iad-1 (the least loaded, so every request lands there
/// first), iad-2, fra-1, sin-1, and ord-1 whose app port is dead.
struct ReplayBench {
    iad1: Backend,
    iad2: Backend,
    fra1: Backend,
    sin1: Backend,
    ord1: Backend,
    r: Router,
}

impl ReplayBench {
    async fn start() -> anyhow::Result<ReplayBench> {
        let iad1 = Backend::start("iad-1", 0, false).await?;
        let iad2 = Backend::start("iad-2", 5, false).await?;
        let fra1 = Backend::start("fra-1", 0, false).await?;
        let sin1 = Backend::start("sin-1", 0, false).await?;
        let ord1 = Backend::start("ord-1", 0, true).await?;
        let specs = [iad1.spec("iad"), iad2.spec("iad"), fra1.spec("fra"), sin1.spec("sin"), ord1.spec("ord")];
        let r = router_for(&specs, "").await?;
        // Every backend in the table and ready.
        serving(&r, &["iad", "fra", "sin", "ord"]).await?;
        Ok(ReplayBench { iad1, iad2, fra1, sin1, ord1, r })
    }

    /// POSTs `body` to `path` through the router: status, the `fly-replay` header if any, body.
    async fn post(&self, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, Option<String>, String)> {
        self.post_with(path, body, &[]).await
    }

    async fn post_with(&self, path: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> anyhow::Result<(u16, Option<String>, String)> {
        let mut req = reqwest::Client::new().post(format!("{}{path}", self.r.http)).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let replay = resp.headers().get("fly-replay").map(|v| v.to_str().unwrap_or_default().to_string());
        Ok((status, replay, resp.text().await?))
    }

    fn clear(&self) {
        for b in [&self.iad1, &self.iad2, &self.fra1, &self.sin1, &self.ord1] {
            b.answer(Answer::Serve);
            b.seen();
        }
    }
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn fly_replay_region_instance_elsewhere_state_and_json_follow_flys_rules() -> anyhow::Result<()> {
    let b = ReplayBench::start().await?;
    // region + state: replayed to fra, with the source header; the client sees fra's answer.
    b.iad1.answer(Answer::Replay("region=fra;state=s1"));
    let (status, replay, text) = b.post("/v1/messages?x=1", b"hello".to_vec()).await?;
    assert_eq!((status, replay, text.as_str()), (200, None, "served by fra-1"));
    let asked = b.iad1.seen();
    assert_eq!(asked.len(), 1);
    assert!(header(&asked[0], "fly-replay-src").is_none());
    let got = b.fra1.seen();
    assert_eq!((got.len(), got[0].path.as_str(), got[0].body_len), (1, "/v1/messages?x=1", 5), "the same request, body and all");
    let src = header(&got[0], "fly-replay-src").unwrap();
    let fields: Vec<&str> = src.split(';').collect();
    assert_eq!((fields[0], fields[1], fields[3]), ("instance=iad-1", "region=iad", "state=s1"), "{src}");
    let t: u64 = fields[2].strip_prefix("t=").unwrap().parse()?;
    let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
    assert!(t <= now_us && now_us - t < 60_000_000, "t is µs since the epoch: {t}");
    assert_eq!(header(&got[0], "fly-client-ip"), Some("127.0.0.1"));
    b.clear();

    // A quoted preference list: the first region with a healthy node.
    b.iad1.answer(Answer::Replay("region=\"lhr,sin,fra\""));
    assert_eq!(b.post("/", vec![]).await?.2, "served by sin-1");
    b.clear();

    // A replayed request that is answered with fly-replay again: that answer goes to the client.
    b.iad1.answer(Answer::Replay("region=fra"));
    b.fra1.answer(Answer::Replay("region=sin"));
    let (status, replay, _) = b.post("/", vec![]).await?;
    assert_eq!((status, replay.as_deref()), (409, Some("region=sin")));
    assert!(b.sin1.seen().is_empty(), "never replayed twice");
    b.clear();

    // A request that already carries fly-replay-src is not replayed at all.
    b.iad1.answer(Answer::Replay("region=fra"));
    let (status, replay, _) = b.post_with("/", vec![], &[("fly-replay-src", "instance=x;region=lhr;t=1")]).await?;
    assert_eq!((status, replay.as_deref()), (409, Some("region=fra")));
    assert!(b.fra1.seen().is_empty());
    b.clear();

    // instance: that node; prefer_instance: that node if it serves, else the region.
    b.iad1.answer(Answer::Replay("instance=sin-1"));
    assert_eq!(b.post("/", vec![]).await?.2, "served by sin-1");
    b.iad1.answer(Answer::Replay("prefer_instance=fra-1;region=sin"));
    assert_eq!(b.post("/", vec![]).await?.2, "served by fra-1");
    b.iad1.answer(Answer::Replay("prefer_instance=gone-9;region=sin"));
    assert_eq!(b.post("/", vec![]).await?.2, "served by sin-1");
    // An instance that is not in the table, without a fallback: an error, not another node.
    b.iad1.answer(Answer::Replay("instance=gone-9"));
    let (status, _, text) = b.post("/", vec![]).await?;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("no healthy node matches the replay"), "{text}");
    b.clear();

    // elsewhere: the client's region, but not the node that answered.
    b.iad1.answer(Answer::Replay("elsewhere=true"));
    assert_eq!(b.post("/", vec![]).await?.2, "served by iad-2");
    b.iad1.answer(Answer::Replay("region=iad;elsewhere=true"));
    assert_eq!(b.post("/", vec![]).await?.2, "served by iad-2");
    b.clear();

    // The JSON form, with a transform of the replayed request.
    b.iad1.answer(Answer::Json(
        r#"{"region": "fra", "state": "j1", "transform": {"path": "/moved?y=2", "delete_headers": ["x-drop"], "set_headers": [{"name": "x-set", "value": "yes"}]}}"#,
    ));
    let (status, _, text) = b.post_with("/v1/messages", b"json".to_vec(), &[("x-drop", "1")]).await?;
    assert_eq!((status, text.as_str()), (200, "served by fra-1"));
    let got = b.fra1.seen();
    assert_eq!(got[0].path, "/moved?y=2");
    assert_eq!((header(&got[0], "x-set"), header(&got[0], "x-drop")), (Some("yes"), None));
    assert!(header(&got[0], "fly-replay-src").unwrap().ends_with(";state=j1"));
    b.clear();

    // A replay header that does not parse is the node's error, shown as a 502.
    b.iad1.answer(Answer::Replay("colour=blue"));
    let (status, _, text) = b.post("/", vec![]).await?;
    assert_eq!(status, 502);
    assert!(text.contains("unknown fly-replay field"), "{text}");
    Ok(())
}

#[tokio::test]
async fn fly_replay_timeout_fallback_body_limit_and_websocket() -> anyhow::Result<()> {
    let b = ReplayBench::start().await?;
    // A target that does not answer in time: with prefer_self the request comes back to the
    // node that asked, carrying fly-replay-failed.
    b.fra1.answer(Answer::Stall);
    b.iad1.answer(Answer::Replay("region=fra;timeout=300ms;fallback=prefer_self"));
    let (status, _, text) = b.post("/", b"again".to_vec()).await?;
    assert_eq!((status, text.as_str()), (200, "served by iad-1"));
    let asked = b.iad1.seen();
    assert_eq!(asked.len(), 2);
    let failed = header(&asked[1], "fly-replay-failed").unwrap();
    assert!(failed.starts_with("reason=timeout;instance=iad-1;target=fra-1"), "{failed}");
    assert_eq!(asked[1].body_len, 5);
    // Without a fallback the client gets the timeout.
    b.iad1.answer(Answer::Replay("region=fra;timeout=300ms"));
    let (status, _, text) = b.post("/", vec![]).await?;
    assert_eq!(status, 504, "{text}");
    b.clear();

    // An unreachable target with force_self: back to exactly the asking node.
    b.iad1.answer(Answer::Replay("region=ord;fallback=force_self"));
    assert_eq!(b.post("/", vec![]).await?.2, "served by iad-1");
    let asked = b.iad1.seen();
    assert!(header(&asked[1], "fly-replay-failed").unwrap().starts_with("reason=unreachable"));
    // A region with no node at all, with prefer_self: also back home.
    b.iad1.answer(Answer::Replay("region=lhr;fallback=prefer_self"));
    assert_eq!(b.post("/", vec![]).await?.2, "served by iad-1");
    assert!(header(&b.iad1.seen()[1], "fly-replay-failed").unwrap().starts_with("reason=no_target"));
    b.clear();

    // Bodies: 1,000,000 bytes are replayed; one byte more is not (an error, and fra sees nothing).
    b.iad1.answer(Answer::Replay("region=fra"));
    let (status, _, text) = b.post("/upload", vec![7u8; 1_000_000]).await?;
    assert_eq!((status, text.as_str()), (200, "served by fra-1"));
    assert_eq!(b.fra1.seen()[0].body_len, 1_000_000);
    let (status, _, text) = b.post("/upload", vec![7u8; 1_000_001]).await?;
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("cannot be replayed"), "{text}");
    assert_eq!(b.iad1.seen().last().unwrap().body_len, 1_000_001, "the node got the whole body, streamed");
    assert!(b.fra1.seen().is_empty());
    b.clear();

    // A WebSocket upgrade that iad-1 replays to sin: only sin-1 upgrades.
    b.iad1.answer(Answer::Replay("region=sin"));
    let url = format!("ws://{}/ws", b.r.http.trim_start_matches("http://"));
    let (mut ws, response) = tokio_tungstenite::connect_async(&url).await?;
    assert_eq!(response.status(), 101);
    let first = tokio::time::timeout(Duration::from_secs(10), futures_util::StreamExt::next(&mut ws)).await?.unwrap()?;
    assert_eq!(first.into_text()?.as_str(), "hello from sin-1");
    assert_eq!(b.iad1.seen().len(), 1, "iad-1 saw the upgrade request and answered with the replay");
    let at_sin = b.sin1.seen();
    assert!(header(&at_sin[0], "fly-replay-src").unwrap().starts_with("instance=iad-1;region=iad;"));
    // And without a replay, the first node upgrades.
    b.iad1.answer(Answer::Serve);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
    let first = tokio::time::timeout(Duration::from_secs(10), futures_util::StreamExt::next(&mut ws)).await?.unwrap()?;
    assert_eq!(first.into_text()?.as_str(), "hello from iad-1");
    Ok(())
}

#[tokio::test]
async fn a_write_sent_to_the_wrong_region_through_the_router_is_replayed_to_its_owner() -> anyhow::Result<()> {
    let c = tests::cluster::Cluster::start(bin(), &crate::cluster::REGIONS[..2], &[("--replay-writes", "true")]).await?;
    let specs: Vec<_> = c
        .nodes
        .iter()
        .map(|n| {
            let t = n.node.as_ref().unwrap();
            (n.id.clone(), n.region.clone(), t.jim, t.admin, Some(t.quic))
        })
        .collect();
    let r = router_for(&specs, "").await?;
    serving(&r, &["iad", "fra"]).await?;
    let (a, b) = (0..100)
        .map(|i| (format!("rr-a{i}"), format!("rr-b{i}")))
        .find(|(a, b)| c.owner_of(schema::ConversationId::private(a, b).as_str()) == 1)
        .unwrap();
    // The client is in iad; the conversation is fra's: iad answers with fly-replay, the router
    // replays it to fra, and the client gets fra's success.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/messages", r.http))
        .json(&json!({"from": a, "to": b, "content": "via the owner", "id": "rr-1"}))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("fly-replay").is_none());
    let sent: Value = resp.json().await?;
    // Committed (b is offline: 10001, stored for later) at seq 1.
    assert_eq!((sent["code"].as_u64(), sent["data"]["seq"].as_u64()), (Some(10001), Some(1)), "{sent}");
    // Both nodes hold it once.
    let conversation = schema::ConversationId::private(&a, &b);
    for i in 0..2 {
        let held = eventually(Duration::from_secs(10), || async {
            let m = c.messages(i, conversation.as_str()).await.ok()?;
            (m.len() == 1).then_some(m)
        })
        .await?;
        assert_eq!(held[0]["content"], "via the owner");
    }
    Ok(())
}
