//! QUIC (quinn). ALPN `h3` is HTTP/3 (`h3.rs`). ALPN `kefu/1`: every bidirectional stream a client opens carries the J-IM
//! binary framing of the TCP port and is one session; the first is the control stream, and a
//! client may open more (logged in with its token) so that conversations do not block each
//! other. The server pushes on the streams the client opened. Connections migrate (quinn follows a
//! client whose address changes) and share one UDP socket, so the file limit does not bind them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::Core;
use crate::metrics::Transport;
use crate::tls::CertStore;

/// ALPN of kefu's QUIC protocol.
pub const ALPN_KEFU: &[u8] = b"kefu/1";
/// ALPN of HTTP/3.
pub const ALPN_H3: &[u8] = b"h3";
/// Streams a client may have open at once.
const MAX_STREAMS: u32 = 16;
/// How long a new connection may take to open its control stream.
const FIRST_STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// The QUIC endpoint's settings.
#[derive(Debug, Clone, Copy)]
pub struct QuicSettings {
    /// Close a connection after this long without packets (keep-alives count).
    pub idle_timeout: Duration,
}

/// Binds the QUIC endpoint.
pub fn endpoint(addr: SocketAddr, certs: &Arc<CertStore>, settings: QuicSettings) -> anyhow::Result<quinn::Endpoint> {
    let mut tls = certs.server_config_tls13(&[ALPN_KEFU, ALPN_H3]);
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| anyhow::anyhow!("QUIC TLS config: {e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(settings.idle_timeout.try_into().map_err(|e| anyhow::anyhow!("idle timeout: {e}"))?))
        .max_concurrent_bidi_streams(MAX_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        // Small per-stream windows: a J-IM frame is at most 2 MiB, and idle connections are many.
        .stream_receive_window((256u32 * 1024).into())
        .receive_window((1024u32 * 1024).into())
        .send_window(1024 * 1024);
    config.transport_config(Arc::new(transport));
    config.migration(true);
    let socket = udp_socket(addr)?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no async runtime for QUIC"))?;
    Ok(quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, runtime)?)
}

/// Bytes of kernel receive buffer asked for the QUIC socket. Every connection shares this one
/// socket, so the default (~208 KiB) overflows during a burst of handshakes and drops packets.
const UDP_RECV_BUFFER: usize = 8 * 1024 * 1024;

fn udp_socket(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // The kernel caps this at net.core.rmem_max; a smaller buffer is not an error.
    if let Err(e) = socket.set_recv_buffer_size(UDP_RECV_BUFFER) {
        tracing::warn!(error = %e, "could not enlarge the QUIC socket's receive buffer");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Accepts QUIC connections until `shutdown`.
pub async fn serve_quic(core: Arc<Core>, endpoint: quinn::Endpoint, shutdown: CancellationToken, tasks: TaskTracker) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let (core, shutdown, inner_tasks) = (Arc::clone(&core), shutdown.clone(), tasks.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = Box::pin(connection(core, incoming, inner_tasks)) => {}
            }
        });
    }
    endpoint.close(0u32.into(), b"shutting down");
}

async fn connection(core: Arc<Core>, incoming: quinn::Incoming, tasks: TaskTracker) {
    let peer = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => return tracing::debug!(error = %e, %peer, "quic handshake failed"),
    };
    let alpn = conn.handshake_data().and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok()).and_then(|d| d.protocol);
    if alpn.as_deref() == Some(ALPN_H3) {
        return super::h3::serve(core, conn, tasks).await;
    }
    // The first stream must come soon; later ones whenever the client likes.
    let mut first = true;
    loop {
        let accepted = if first {
            match tokio::time::timeout(FIRST_STREAM_TIMEOUT, conn.accept_bi()).await {
                Ok(accepted) => accepted,
                Err(_) => {
                    conn.close(1u32.into(), b"no control stream");
                    return;
                }
            }
        } else {
            conn.accept_bi().await
        };
        first = false;
        let (send, recv) = match accepted {
            Ok(pair) => pair,
            Err(_) => return,
        };
        let core = Arc::clone(&core);
        let peer = conn.remote_address();
        tasks.spawn(async move {
            super::tcp::serve_io_as(core, tokio::io::join(recv, send), peer, Transport::Quic).await;
        });
    }
}
