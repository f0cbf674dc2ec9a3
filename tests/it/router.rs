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
    let dir = tempfile::tempdir()?;
    let mut toml =
        format!("listen = \"127.0.0.1:0\"\ntcp_listen = \"127.0.0.1:0\"\nregion = \"iad\"\npoll_ms = 100\ndrain_ms = 500\n{extra}\n");
    for (id, region, n) in nodes {
        toml.push_str(&format!(
            "[[nodes]]\nid = \"{id}\"\nregion = \"{region}\"\nhttp = \"{}\"\nadmin = \"{}\"\nquic = \"{}\"\n",
            n.jim, n.admin, n.quic
        ));
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
