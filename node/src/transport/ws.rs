//! WebSocket: J-IM JSON in TEXT or BINARY frames, TEXT frames out, login from the query string
//! right after the upgrade, any path, no subprotocol. Buffers are set deliberately:
//! tokio-tungstenite's defaults cost about 128 KiB per idle socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use schema::jim::{LoginReq, Request};
use schema::Status;

use crate::dispatch::Core;
use crate::metrics::Transport;
use crate::session::{self, Inbound, Outgoing};

/// Largest WebSocket message accepted (J-IM's `WsPacket.MAX_BODY_LENGTH`).
pub const MAX_MESSAGE: usize = 512 * 1024;
/// Bytes read from the socket at a time, and the read buffer every connection keeps: 1 KiB holds a
/// typical J-IM message whole, and at 4 KiB an idle connection cost 3.2 KB more (a message near
/// the 512 KiB limit takes more reads).
const READ_BUFFER: usize = 1024;

/// Completes the upgrade and runs the session. `query` is the request's query string.
pub fn upgrade(core: Arc<Core>, ws: WebSocketUpgrade, peer: SocketAddr, query: HashMap<String, String>) -> Response {
    let first = query_login(&query);
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .on_upgrade(move |socket| serve(core, socket, peer, first))
}

/// The demo page logs in with `?username=…&password=…` (or `token`). Empty values are dropped,
/// as J-IM's query parser drops them.
pub(crate) fn query_login(query: &HashMap<String, String>) -> Option<Box<Request>> {
    let get = |k: &str| query.get(k).filter(|v| !v.is_empty()).cloned();
    let user_id = get("username").or_else(|| get("userId"));
    let token = get("token");
    if user_id.is_none() && token.is_none() {
        return None;
    }
    Some(Box::new(Request::Login(LoginReq { user_id, password: get("password"), token, nick: get("nick") })))
}

async fn serve(core: Arc<Core>, socket: WebSocket, peer: SocketAddr, first: Option<Box<Request>>) {
    let (sink, stream) = socket.split();
    let inbound = futures_util::stream::unfold(Some(stream), |stream| async move {
        let mut stream = stream?;
        loop {
            let item = match stream.next().await? {
                Ok(Message::Text(t)) => Inbound::Request { cmd: None, syn_seq: 0, body: t.into() },
                Ok(Message::Binary(b)) => Inbound::Request { cmd: None, syn_seq: 0, body: b },
                // tungstenite answers pings itself.
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(Message::Close(_)) => return Some((Inbound::Close, None)),
                Err(e) => {
                    // axum hides tungstenite's error type; its capacity error reads
                    // "Space limit exceeded: Message too long: …".
                    if format!("{e:?} {e}").contains("Space limit exceeded") {
                        return Some((Inbound::ProtocolError(Status::FrameTooLarge), None));
                    }
                    return None;
                }
            };
            return Some((item, Some(stream)));
        }
    });
    let outbound = sink.with(|item: Outgoing| async move {
        Ok::<_, axum::Error>(match item {
            Outgoing::Frame { body, .. } => Message::Text(Utf8Bytes::try_from(body).unwrap_or_default()),
            Outgoing::Close(status) => {
                let code = match status {
                    Status::FrameTooLarge => 1009,
                    Status::ProtocolVersionMismatch | Status::UnsupportedCmd | Status::BadLength => 1002,
                    Status::SlowConsumer | Status::HeartbeatTimeout => 1008,
                    _ => 1000,
                };
                Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static("") }))
            }
        })
    });
    session::run(core, Transport::Ws, peer, Box::pin(inbound), Box::pin(outbound), first).await;
}
