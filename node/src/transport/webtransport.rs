//! WebTransport sessions at `/wt` on the HTTP/3 port: one bidirectional stream per session
//! carries the J-IM JSON dialect as on WebSocket, one JSON text per line (`\n`-delimited, at most
//! 512 KiB a line). `?username=…&password=…` (or `?token=…`) logs in as the WebSocket URL does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use h3_webtransport::server::{AcceptedBi, WebTransportSession};
use schema::Status;
use tokio_util::codec::{FramedRead, FramedWrite, LinesCodec, LinesCodecError};

use crate::dispatch::Core;
use crate::metrics::Transport;
use crate::session::{self, Inbound, Outgoing};

/// Path of WebTransport sessions.
pub const PATH: &str = "/wt";

/// Serves one WebTransport session: its first bidirectional stream is the J-IM session.
pub async fn serve(
    core: Arc<Core>,
    session: WebTransportSession<h3_quinn::Connection, Bytes>,
    query: HashMap<String, String>,
    peer: SocketAddr,
) {
    let stream = loop {
        match session.accept_bi().await {
            Ok(Some(AcceptedBi::BidiStream(_, stream))) => break stream,
            // A plain HTTP/3 request inside the session is not something this endpoint serves.
            Ok(Some(AcceptedBi::Request(..))) => continue,
            Ok(None) | Err(_) => return,
        }
    };
    let (read, write) = tokio::io::split(stream);
    let inbound = FramedRead::new(read, LinesCodec::new_with_max_length(super::ws::MAX_MESSAGE)).filter_map(|line| async move {
        match line {
            Ok(line) if line.trim().is_empty() => None,
            Ok(line) => Some(Inbound::Request { cmd: None, syn_seq: 0, body: Bytes::from(line) }),
            Err(LinesCodecError::MaxLineLengthExceeded) => Some(Inbound::ProtocolError(Status::FrameTooLarge)),
            Err(LinesCodecError::Io(_)) => None,
        }
    });
    let outbound = FramedWrite::new(write, LinesCodec::new()).with(|item: Outgoing| async move {
        Ok::<_, LinesCodecError>(match item {
            Outgoing::Frame { body, .. } => String::from_utf8_lossy(&body).into_owned(),
            // The session ends when the stream does; there is no close frame to send.
            Outgoing::Close(_) => String::new(),
        })
    });
    let first = super::ws::query_login(&query);
    session::run(core, Transport::Ws, peer, Box::pin(inbound), Box::pin(outbound), first).await;
    // Keep the session alive until the J-IM session is over.
    drop(session);
}
