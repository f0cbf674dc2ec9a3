//! The router's node table and its health poller, `/v1/connect`'s answer, and the J-IM TCP
//! listener (HTTP and WebSocket are in `proxy`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::RouterConfig;
use crate::route::{self, Health, NodeSpec};

/// The node table the poller writes and the listeners read.
pub type Table = Arc<Mutex<Vec<(NodeSpec, Health)>>>;

/// A table with every configured node, none known healthy yet.
pub fn table(config: &RouterConfig) -> Table {
    Arc::new(Mutex::new(config.nodes.iter().map(|n| (n.clone(), Health::default())).collect()))
}

pub(crate) fn snapshot(table: &Table) -> Vec<(NodeSpec, Health)> {
    table.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Polls every node's `/readyz` and `/metrics` each `config.poll`, forever.
pub async fn poll(table: Table, config: Arc<RouterConfig>) {
    let mut every = tokio::time::interval(config.poll);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let nodes: Vec<NodeSpec> = snapshot(&table).into_iter().map(|(n, _)| n).collect();
        let checks = nodes.into_iter().map(|n| async move {
            let timeout = Duration::from_millis(900);
            let ready = matches!(get(&n.admin, "/readyz", timeout).await, Ok((200, _)));
            let metrics = if ready { get(&n.admin, "/metrics", timeout).await.ok().map(|(_, body)| body) } else { None };
            (n.id, ready, metrics)
        });
        let results = futures_util::future::join_all(checks).await;
        let now = Instant::now();
        let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
        for (id, ready, metrics) in results {
            let Some((_, health)) = table.iter_mut().find(|(n, _)| n.id == id) else { continue };
            if ready != health.ready {
                tracing::info!(node = %id, ready, "node health changed");
            }
            health.ready = ready;
            if ready {
                health.last_ready = Some(now);
            }
            if let Some(text) = metrics {
                health.connections = route::connections_in(&text);
                health.fingerprint = fingerprint_in(&text);
            }
        }
    }
}

/// The fingerprint a node publishes as `kefu_tls_fingerprint_info{sha256="…"} 1`.
fn fingerprint_in(metrics: &str) -> Option<String> {
    let line = metrics.lines().find(|l| l.starts_with("kefu_tls_fingerprint_info{"))?;
    let start = line.find("sha256=\"")? + 8;
    let end = start + line[start..].find('"')?;
    Some(line[start..end].to_string())
}

/// A tiny HTTP/1.0 GET (the admin port answers and closes): the status and the body.
async fn get(addr: &str, path: &str, within: Duration) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(within, async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut raw = Vec::new();
        s.take(4 * 1024 * 1024).read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw);
        let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no status line")?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        anyhow::Ok((status, body))
    })
    .await
    .context("timed out")?
}

/// `/v1/connect`'s answer for `node`.
pub fn connect_answer(node: &NodeSpec, fingerprint: Option<String>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "node": node.id,
        "region": node.region,
        "tcp": node.http,
        "ws": format!("ws://{}/", node.http),
        // TLS and QUIC share a port number on a node (8443 TCP and UDP by default).
        "wss": node.quic.as_ref().map(|q| format!("wss://{q}/")),
        "quic": node.quic,
        "alpn": ["kefu/1", "h3"],
    });
    if let Some(fp) = fingerprint {
        v["fingerprint"] = serde_json::Value::String(fp);
    }
    v
}

/// Splices J-IM binary TCP on `listener` to the least loaded node of the router's region (or
/// the nearest with one). A drained node keeps its connections; new ones go elsewhere.
pub async fn serve_tcp(listener: TcpListener, table: Table, config: Arc<RouterConfig>) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else { continue };
        let (table, config) = (Arc::clone(&table), Arc::clone(&config));
        tokio::spawn(async move {
            let nodes = snapshot(&table);
            let wanted = vec![config.region.clone()];
            let Some(node) = route::choose(&nodes, &wanted, &config.fallback, false, Instant::now(), config.drain_after).cloned() else {
                return;
            };
            let Ok(mut upstream) = TcpStream::connect(&node.http).await else { return };
            let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}
