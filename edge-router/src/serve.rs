//! The router's sockets: the health poller, the HTTP/WebSocket listener (`/v1/connect`, and
//! every other request spliced to the node its first request chose) and the J-IM TCP listener.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::RouterConfig;
use crate::route::{self, Health, NodeSpec};

/// The node table the poller writes and the listeners read.
pub type Table = Arc<Mutex<Vec<(NodeSpec, Health)>>>;

/// Longest request head the router reads before choosing a node.
const MAX_HEAD: usize = 16 * 1024;

/// A table with every configured node, none known healthy yet.
pub fn table(config: &RouterConfig) -> Table {
    Arc::new(Mutex::new(config.nodes.iter().map(|n| (n.clone(), Health::default())).collect()))
}

fn snapshot(table: &Table) -> Vec<(NodeSpec, Health)> {
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

/// A parsed request head: the path (with query) and the headers, names in lower case.
struct Head {
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn parse(raw: &[u8]) -> Option<Head> {
        let text = std::str::from_utf8(raw).ok()?;
        let mut lines = text.split("\r\n");
        let path = lines.next()?.split_whitespace().nth(1)?.to_string();
        let headers = lines
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Some(Head { path, headers })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn query(&self, key: &str) -> Option<&str> {
        let (_, query) = self.path.split_once('?')?;
        query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// The node for a request head, by the client's region.
fn pick(table: &Table, config: &RouterConfig, head: &Head) -> Option<NodeSpec> {
    let wanted = route::client_regions(|h| head.header(h), head.query("region"), &config.region);
    let strict = route::forced(|h| head.header(h));
    let nodes = snapshot(table);
    route::choose(&nodes, &wanted, &config.fallback, strict, Instant::now(), config.drain_after).cloned()
}

/// Serves HTTP and WebSocket on `listener`.
pub async fn serve_http(listener: TcpListener, table: Table, config: Arc<RouterConfig>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (table, config) = (Arc::clone(&table), Arc::clone(&config));
        tokio::spawn(async move {
            if let Err(e) = http_connection(stream, &table, &config).await {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}

async fn http_connection(mut client: TcpStream, table: &Table, config: &RouterConfig) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        anyhow::ensure!(head.len() < MAX_HEAD, "request head over {MAX_HEAD} bytes");
        let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await.context("no request head")??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let Some(parsed) = Head::parse(&head) else { return respond(&mut client, 400, &serde_json::json!({"error": "bad request"})).await };
    let node = pick(table, config, &parsed);
    if parsed.path == "/v1/connect" || parsed.path.starts_with("/v1/connect?") {
        let nodes = snapshot(table);
        return match node {
            Some(n) => {
                let fingerprint = nodes.iter().find(|(s, _)| s.id == n.id).and_then(|(_, h)| h.fingerprint.clone());
                respond(&mut client, 200, &connect_answer(&n, fingerprint)).await
            }
            None => respond(&mut client, 503, &serde_json::json!({"error": "no healthy node for this region"})).await,
        };
    }
    let Some(node) = node else { return respond(&mut client, 503, &serde_json::json!({"error": "no healthy node"})).await };
    let mut upstream = TcpStream::connect(&node.http).await.with_context(|| format!("connecting to {}", node.id))?;
    let _ = upstream.set_nodelay(true);
    upstream.write_all(&head).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
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

async fn respond(client: &mut TcpStream, status: u16, body: &serde_json::Value) -> anyhow::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Service Unavailable",
    };
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await?;
    client.write_all(body.as_bytes()).await?;
    client.shutdown().await?;
    Ok(())
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
