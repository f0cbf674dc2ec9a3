//! Transports: each accepts connections, frames bytes and hands typed items to the session loop.
//! None of them holds command logic, SQL or presence.
//!
//! The J-IM port is sniffed on the first byte, as J-IM does: 0x01 is the binary protocol,
//! anything else is HTTP, and an HTTP request with `Sec-WebSocket-Key` becomes a WebSocket.
//! The TLS port (`tls.rs`) does the same inside TLS, with ALPN choosing when the client offers it.

pub mod h3;
pub mod http;
pub mod quic;
pub mod support_http;
pub mod tcp;
pub mod tls;
pub mod webtransport;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::Core;

/// How long a new connection may stay silent before its first byte.
pub(crate) const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts on the J-IM port until `accepting` is cancelled; connections run until `shutdown` is.
/// Every connection task is tracked.
pub async fn serve_jim(
    core: Arc<Core>,
    listener: TcpListener,
    accepting: CancellationToken,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let router = http::router(Arc::clone(&core));
    while let Some((stream, peer)) = accept(&listener, &accepting).await {
        // Over the per-IP cap the connection is closed at once (before any byte is read).
        let Some(slot) = core.conns.admit(peer.ip()) else { continue };
        let core = Arc::clone(&core);
        let router = router.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = sniff(core, stream, peer, router) => {}
            }
        });
    }
}

/// The next connection, or `None` once `shutdown` is cancelled. Accept errors (out of file
/// descriptors and the like) are logged and retried after a short pause rather than spun on.
pub(crate) async fn accept(listener: &TcpListener, shutdown: &CancellationToken) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn sniff(core: Arc<Core>, stream: TcpStream, peer: SocketAddr, router: axum::Router) {
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    match tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    // A J-IM session runs inline: the task is one allocation, and the session's state shares it
    // with the sniffing above (an async fn keeps one of its states at a time). HTTP is boxed so
    // that a J-IM connection's task is not as large as hyper's connection state.
    if first[0] == schema::frame::VERSION {
        tcp::serve(core, stream, peer).await;
        return;
    }
    Box::pin(serve_http(core, stream, peer, router)).await;
}

/// Serves HTTP/1.1 or HTTP/2 (and WebSocket upgrades) on any byte stream.
pub(crate) async fn serve_http<S>(core: Arc<Core>, stream: S, peer: SocketAddr, router: axum::Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let service = http::service(router, core, peer);
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await {
        tracing::debug!(error = %e, %peer, "http connection ended with an error");
    }
}
