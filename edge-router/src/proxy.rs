//! HTTP and WebSocket through the router, one request at a time, the way Fly's proxy does it: the
//! request goes to the node its client region picks; a response that asks for a replay
//! (`fly-replay`, or a body of type `application/vnd.fly.replay+json`) is not shown to the client
//! but the same request is sent again where the replay says, with `fly-replay-src`; a target that
//! cannot be reached in time makes the request fall back to the node that asked (with
//! `fly-replay-failed`) when the replay allows it, else the client gets a 502 or 504. A request
//! is replayed once at most, and only when its body is at most 1 MB. A WebSocket upgrade is
//! performed by whichever node finally answers 101, and the two upgraded streams are spliced.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use schema::fly_replay::{self, Fallback, Replay, MAX_REPLAY_BODY};
use tokio::net::{TcpListener, TcpStream};

use crate::config::RouterConfig;
use crate::route::{self, NodeSpec};
use crate::serve::{connect_answer, snapshot, Table};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// How long the first node (and a replay without its own `timeout`) has to answer a request's
/// head. Long enough for a slow handler; a WebSocket's life is not bounded by it.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// Longest JSON replay body the router reads.
const MAX_JSON_REPLAY: usize = 64 * 1024;

/// Serves HTTP and WebSocket on `listener`.
pub async fn serve_http(listener: TcpListener, table: Table, config: Arc<RouterConfig>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let (table, config) = (Arc::clone(&table), Arc::clone(&config));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, Arc::clone(&table), Arc::clone(&config), peer));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}

/// A request body: held whole when it can be replayed, else streamed through.
enum RequestBody {
    Whole(Bytes),
    Streaming(Body),
}

/// The request as the router keeps it to send it once or twice.
struct Held {
    parts: http::request::Parts,
    body: Option<Bytes>,
    streaming: Option<Body>,
}

impl Held {
    /// A copy to send, with `extra` headers set. A streamed body can be sent once only.
    fn copy(&mut self, extra: &[(HeaderName, String)]) -> Request<Body> {
        let body = match (&self.body, self.streaming.take()) {
            (Some(b), _) => full(b.clone()),
            (None, Some(s)) => s,
            (None, None) => empty(),
        };
        let mut req = Request::from_parts(self.parts.clone(), body);
        for (name, value) in extra {
            if let Ok(v) = HeaderValue::from_str(value) {
                req.headers_mut().insert(name.clone(), v);
            }
        }
        req
    }
}

async fn handle(
    mut req: Request<Incoming>,
    table: Table,
    config: Arc<RouterConfig>,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let lookup = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let query_region =
        req.uri().query().and_then(|q| q.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == "region")).map(|(_, v)| v);
    let wanted = route::client_regions(lookup, query_region, &config.region);
    let strict = route::forced(lookup);
    let nodes = snapshot(&table);
    let now = Instant::now();
    let first = route::choose(&nodes, &wanted, &config.fallback, strict, now, config.drain_after).cloned();
    if req.uri().path() == "/v1/connect" {
        return Ok(match first {
            Some(n) => {
                let fingerprint = nodes.iter().find(|(s, _)| s.id == n.id).and_then(|(_, h)| h.fingerprint.clone());
                json(StatusCode::OK, &connect_answer(&n, fingerprint))
            }
            None => error(StatusCode::SERVICE_UNAVAILABLE, "no healthy node for this region"),
        });
    }
    let Some(first) = first else { return Ok(error(StatusCode::SERVICE_UNAVAILABLE, "no healthy node")) };
    let client_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // Where the request came from, as Fly's proxy says it (the node trusts these only behind a
    // proxy); anything the client put there is replaced.
    parts.headers.insert("fly-client-ip", header_value(&peer.ip().to_string()));
    let forwarded = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    parts.headers.insert("x-forwarded-for", header_value(&forwarded));
    // A request that is itself a replay is never replayed again.
    let replayed_already = parts.headers.contains_key("fly-replay-src");
    let body = match take_body(body, MAX_REPLAY_BODY).await {
        Ok(b) => b,
        Err(e) => return Ok(error(StatusCode::BAD_REQUEST, &format!("reading the request body: {e}"))),
    };
    let mut held = match body {
        RequestBody::Whole(b) => Held { parts, body: Some(b), streaming: None },
        RequestBody::Streaming(s) => Held { parts, body: None, streaming: Some(s) },
    };
    let answer = match send(&first, held.copy(&[]), ANSWER_WITHIN).await {
        Ok(r) => r,
        Err(e) => return Ok(send_error(&first, &e)),
    };
    let answer = if replayed_already { Ok(answer) } else { replay_asked(answer).await };
    let response = match answer {
        Ok(response) => response,
        Err(Err(e)) => return Ok(error(StatusCode::BAD_GATEWAY, &format!("{} answered with a bad fly-replay: {e}", first.id))),
        Err(Ok(replay)) => match replay_request(&mut held, &replay, &first, &table, &config, &wanted).await {
            Ok(r) => r,
            Err(answer) => return Ok(answer),
        },
    };
    Ok(finish(response, client_upgrade))
}

/// The response to give the client; for a 101 the two upgraded streams are spliced.
fn finish(mut response: Response<Incoming>, client_upgrade: Option<hyper::upgrade::OnUpgrade>) -> Response<Body> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = client_upgrade {
            let node = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                let (Ok(client), Ok(node)) = tokio::join!(client, node) else { return };
                let (mut client, mut node) = (TokioIo::new(client), TokioIo::new(node));
                let _ = tokio::io::copy_bidirectional(&mut client, &mut node).await;
            });
        }
    }
    response.map(|b| b.map_err(BoxError::from).boxed())
}

/// Sends the request again where `replay` says (`from` asked for it); falls back as it allows.
async fn replay_request(
    held: &mut Held,
    replay: &Replay,
    from: &NodeSpec,
    table: &Table,
    config: &RouterConfig,
    wanted: &[String],
) -> Result<Response<Incoming>, Response<Body>> {
    if held.body.is_none() {
        return Err(error(
            StatusCode::BAD_GATEWAY,
            &format!("{} asked for a replay, but a request body over {MAX_REPLAY_BODY} bytes cannot be replayed", from.id),
        ));
    }
    if let Some(app) = &replay.app {
        return Err(error(StatusCode::BAD_GATEWAY, &format!("{} asked for a replay to app {app:?}; kefu-router serves one app", from.id)));
    }
    apply(&replay.transform, &mut held.parts);
    let nodes = snapshot(table);
    let now = Instant::now();
    let target = route::replay_target(&nodes, replay, &from.id, wanted, &config.fallback, now, config.drain_after).cloned();
    let within = replay.timeout.unwrap_or(ANSWER_WITHIN);
    let src = fly_replay::replay_src(&from.id, &from.region, micros_now(), replay.state.as_deref());
    let failure = match &target {
        Some(target) => match send(target, held.copy(&[(HeaderName::from_static("fly-replay-src"), src.clone())]), within).await {
            Ok(response) => return Ok(response),
            Err(e) => {
                tracing::info!(from = %from.id, target = %target.id, error = %e, "replay target failed");
                Failure { reason: e.reason(), target: Some(target.id.clone()), status: e.status() }
            }
        },
        None => Failure { reason: "no_target", target: None, status: StatusCode::SERVICE_UNAVAILABLE },
    };
    let Some(fallback) = replay.fallback else {
        return Err(error(failure.status, &format!("fly-replay from {} ({}): {}", from.id, replay.to_header(), failure.describe())));
    };
    // Re-delivered to the node that asked; with `prefer_self`, any other node when it cannot
    // be reached. The re-delivery is not replayed again, whatever it answers.
    let failed = [(HeaderName::from_static("fly-replay-failed"), failure.header(&from.id))];
    let mut last = match send(from, held.copy(&failed), ANSWER_WITHIN).await {
        Ok(response) => return Ok(response),
        Err(e) => e,
    };
    if fallback == Fallback::PreferSelf {
        let nodes = snapshot(table);
        let other = route::replay_target(
            &nodes,
            &Replay { elsewhere: true, ..Default::default() },
            &from.id,
            wanted,
            &config.fallback,
            Instant::now(),
            config.drain_after,
        )
        .cloned();
        if let Some(other) = other {
            match send(&other, held.copy(&failed), ANSWER_WITHIN).await {
                Ok(response) => return Ok(response),
                Err(e) => last = e,
            }
        }
    }
    Err(error(last.status(), &format!("fly-replay from {}: {}, and the fallback failed too: {last}", from.id, failure.describe())))
}

/// Why a replay did not reach its target.
struct Failure {
    reason: &'static str,
    target: Option<String>,
    status: StatusCode,
}

impl Failure {
    fn describe(&self) -> String {
        match &self.target {
            Some(t) => format!("target {t}: {}", self.reason),
            None => "no healthy node matches the replay".to_string(),
        }
    }

    /// The `fly-replay-failed` header of the fallback re-delivery.
    fn header(&self, from: &str) -> String {
        let mut out = format!("reason={};instance={from}", self.reason);
        if let Some(t) = &self.target {
            out.push_str(";target=");
            out.push_str(t);
        }
        out
    }
}

fn apply(transform: &fly_replay::Transform, parts: &mut http::request::Parts) {
    if let Some(path) = &transform.path {
        match path.parse() {
            Ok(uri) => parts.uri = uri,
            Err(e) => tracing::warn!(path, error = %e, "fly-replay transform path ignored"),
        }
    }
    for name in &transform.delete_headers {
        parts.headers.remove(name.as_str());
    }
    for set in &transform.set_headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(set.name.as_str()), HeaderValue::from_str(&set.value)) {
            parts.headers.insert(name, value);
        }
    }
}

/// `Ok`: the response to pass on. `Err(Ok)`: the node asked for this replay. `Err(Err)`: it
/// asked in a form that does not parse.
async fn replay_asked(response: Response<Incoming>) -> Result<Response<Incoming>, Result<Replay, String>> {
    if let Some(value) = response.headers().get("fly-replay") {
        let text = value.to_str().map_err(|_| Err("fly-replay is not text".to_string()))?;
        return Err(Replay::parse(text).map_err(|e| e.to_string()));
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim().starts_with(fly_replay::JSON_CONTENT_TYPE));
    if !is_json {
        return Ok(response);
    }
    let body = http_body_util::Limited::new(response.into_body(), MAX_JSON_REPLAY)
        .collect()
        .await
        .map_err(|e| Err(format!("reading the replay body: {e}")))?
        .to_bytes();
    Err(Replay::from_json(&body).map_err(|e| e.to_string()))
}

/// Reads the body up to `limit` bytes; a longer one is passed on as a stream (and cannot be
/// replayed).
async fn take_body(mut body: Incoming, limit: usize) -> Result<RequestBody, hyper::Error> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        buf.extend_from_slice(&data);
        if buf.len() > limit {
            let prefix = futures_util::stream::once(std::future::ready(Ok::<_, BoxError>(Frame::data(buf.freeze()))));
            let rest = TryStreamExt::map_err(BodyStream::new(body), BoxError::from);
            return Ok(RequestBody::Streaming(BodyExt::boxed(StreamBody::new(prefix.chain(rest)))));
        }
    }
    Ok(RequestBody::Whole(buf.freeze()))
}

/// Why a node did not answer.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Http(hyper::Error),
}

impl SendError {
    fn reason(&self) -> &'static str {
        match self {
            SendError::Timeout(_) => "timeout",
            SendError::Connect(_) => "unreachable",
            SendError::Http(_) => "error",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            SendError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// One request to `node` on a connection of its own; the response head within `within`.
async fn send(node: &NodeSpec, req: Request<Body>, within: Duration) -> Result<Response<Incoming>, SendError> {
    let attempt = async {
        let stream = TcpStream::connect(&node.http).await.map_err(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(SendError::Http)?;
        let id = node.id.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(node = %id, error = %e, "upstream connection ended");
            }
        });
        sender.send_request(req).await.map_err(SendError::Http)
    };
    tokio::time::timeout(within, attempt).await.unwrap_or(Err(SendError::Timeout(within)))
}

fn send_error(node: &NodeSpec, e: &SendError) -> Response<Body> {
    error(e.status(), &format!("node {}: {e}", node.id))
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    has(header::CONNECTION, "upgrade") && headers.contains_key(header::UPGRADE)
}

fn micros_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn header_value(v: &str) -> HeaderValue {
    HeaderValue::from_str(v).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A body of these bytes.
fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    full(Bytes::new())
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An error the router itself gives, as JSON naming what failed.
fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}
