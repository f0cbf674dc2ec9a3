//! QUIC (quinn). ALPN `h3` is HTTP/3 (`h3.rs`). ALPN `kefu/1`: every bidirectional stream a client opens carries the J-IM
//! binary framing of the TCP port and is one session; the first is the control stream, and a
//! client may open more (logged in with its token) so that conversations do not block each
//! other. The server pushes on the streams the client opened. Connections migrate (quinn follows a
//! client whose address changes) and share one UDP socket, so the file limit does not bind them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Sink, StreamExt};
use quinn::crypto::rustls::QuicServerConfig;
use schema::Command;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::Core;
use crate::metrics::Transport;
use crate::session::{self, Inbound, Outgoing};
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
    // 0-RTT is accepted (QUIC requires exactly this value to enable it); what a client may do in
    // it is limited in `connection` to the resume step.
    tls.max_early_data_size = u32::MAX;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| anyhow::anyhow!("QUIC TLS config: {e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(settings.idle_timeout.try_into().map_err(|e| anyhow::anyhow!("idle timeout: {e}"))?))
        .max_concurrent_bidi_streams(MAX_STREAMS.into())
        // HTTP/3 needs at least three (control and QPACK streams); kefu/1 refuses them.
        .max_concurrent_uni_streams(8u32.into())
        // Small per-stream windows: a J-IM frame is at most 2 MiB, and idle connections are many.
        .stream_receive_window((256u32 * 1024).into())
        .receive_window((1024u32 * 1024).into())
        .send_window(1024 * 1024)
        // HTTP/3 datagrams (WebTransport) and typing indicators on kefu/1.
        .datagram_receive_buffer_size(Some(64 * 1024));
    config.transport_config(Arc::new(transport));
    config.migration(true);
    let socket = udp_socket(addr)?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no async runtime for QUIC"))?;
    Ok(quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, runtime)?)
}

/// Bytes of kernel receive buffer asked for the QUIC socket. Every connection shares this one
/// socket, so the default (~208 KiB) overflows during a burst of handshakes or heartbeats and
/// drops packets, which QUIC then resends after ever longer backoffs. It is kernel memory, used
/// only while packets wait.
pub const UDP_RECV_BUFFER: usize = 32 * 1024 * 1024;

fn udp_socket(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let got = enlarge_recv_buffer(&socket, UDP_RECV_BUFFER);
    if got < UDP_RECV_BUFFER {
        tracing::warn!(
            asked = UDP_RECV_BUFFER,
            got,
            "the QUIC socket's receive buffer is smaller than asked: bursts of packets may be dropped \
             (raise net.core.rmem_max, or run with CAP_NET_ADMIN)"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Asks for `bytes` of receive buffer on `socket` and returns what it got (the kernel's figure,
/// halved: Linux doubles the request to account for its own bookkeeping). SO_RCVBUF is capped at
/// net.core.rmem_max (4 MiB on some hosts); on Linux SO_RCVBUFFORCE passes that cap when the
/// process has CAP_NET_ADMIN (root in a Fly machine or a container), so it is tried first.
pub fn enlarge_recv_buffer(socket: &socket2::Socket, bytes: usize) -> usize {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // setsockopt reads exactly size_of::<c_int>() bytes from a live local; the descriptor is
        // owned by `socket` for the whole call.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let _ = socket.set_recv_buffer_size(bytes);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket.set_recv_buffer_size(bytes);
    let reported = socket.recv_buffer_size().unwrap_or(0);
    if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    }
}

/// Accepts QUIC connections until `shutdown`.
pub async fn serve_quic(
    core: Arc<Core>,
    endpoint: quinn::Endpoint,
    accepting: CancellationToken,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = accepting.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let Some(slot) = core.conns.admit(incoming.remote_address().ip()) else {
            incoming.refuse();
            continue;
        };
        let (core, shutdown, inner_tasks) = (Arc::clone(&core), shutdown.clone(), tasks.clone());
        tasks.spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = Box::pin(connection(core, incoming, inner_tasks)) => {}
            }
        });
    }
    // Sessions already open drain first; the endpoint closes with the rest of the node.
    shutdown.cancelled().await;
    endpoint.close(0u32.into(), b"shutting down");
}

async fn connection(core: Arc<Core>, incoming: quinn::Incoming, tasks: TaskTracker) {
    let peer = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => return tracing::debug!(error = %e, %peer, "quic connection refused"),
    };
    // Take the connection before the handshake completes, so a resuming client's 0-RTT login is
    // read at once; `confirmed` turns true when the handshake is done (and drops on failure).
    let (conn, handshake) = match connecting.into_0rtt() {
        Ok(pair) => pair,
        Err(connecting) => match connecting.await {
            Ok(conn) => return Box::pin(established(core, conn, None, tasks)).await,
            Err(e) => return tracing::debug!(error = %e, %peer, "quic handshake failed"),
        },
    };
    let (confirm, confirmed) = tokio::sync::watch::channel(false);
    let watched = conn.clone();
    tasks.spawn(async move {
        // On a server the future's value means nothing; it completes when the handshake does
        // (or fails, in which case the connection is closed and there is nothing to release).
        handshake.await;
        if watched.close_reason().is_none() {
            let _ = confirm.send(true);
        }
    });
    established(core, conn, Some(confirmed), tasks).await;
}

async fn established(core: Arc<Core>, conn: quinn::Connection, confirmed: Option<tokio::sync::watch::Receiver<bool>>, tasks: TaskTracker) {
    let alpn_of = |conn: &quinn::Connection| {
        conn.handshake_data().and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok()).and_then(|d| d.protocol)
    };
    let mut alpn = alpn_of(&conn);
    if alpn.is_none() {
        // Not known yet this early: wait for the handshake.
        if let Some(mut confirmed) = confirmed.clone() {
            if confirmed.wait_for(|c| *c).await.is_err() {
                return;
            }
        }
        alpn = alpn_of(&conn);
    }
    if alpn.as_deref() == Some(ALPN_H3) {
        // HTTP/3 requests are not replay-safe in general: serve them after the handshake.
        if let Some(mut confirmed) = confirmed {
            if confirmed.wait_for(|c| *c).await.is_err() {
                return;
            }
        }
        // Boxed: HTTP/3's state is large, and inline it would make every kefu/1 connection's
        // future as big (about 14 KB each).
        return Box::pin(super::h3::serve(core, conn, tasks)).await;
    }
    // kefu/1 has no use for unidirectional streams: stop each one as it arrives.
    let uni = conn.clone();
    tasks.spawn(async move {
        while let Ok(mut recv) = uni.accept_uni().await {
            let _ = recv.stop(0u32.into());
        }
    });
    // The first stream must come soon; later ones whenever the client likes.
    let mut first = true;
    let mut stream_index = 0u32;
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
        let recv = EarlyGate::wrap(super::tcp::inbound(recv), confirmed.clone(), &core);
        // The first stream is the control stream: typing indicators travel as datagrams on it,
        // both ways, when the client negotiated them.
        let datagrams = (stream_index == 0 && conn.max_datagram_size().is_some()).then(|| conn.clone());
        stream_index += 1;
        tasks.spawn(async move {
            match datagrams {
                Some(conn) => {
                    // When the control stream ends the session ends, whatever datagrams do.
                    let control = recv.chain(futures_util::stream::once(async { Inbound::Close }));
                    let inbound = futures_util::stream::select(Box::pin(control), Box::pin(datagram_typing(conn.clone())));
                    let outbound = DatagramTyping { conn, inner: super::tcp::frame_sink(send) };
                    session::run(core, Transport::Quic, peer, Box::pin(inbound), outbound, None).await;
                }
                None => session::run(core, Transport::Quic, peer, Box::pin(recv), super::tcp::frame_sink(send), None).await,
            }
        });
    }
}

/// Typing indicators (cmd 100/101) a client sends as datagrams, each one J-IM frame. Datagrams
/// may be lost or reordered, which suits a typing hint and nothing else: other commands in a
/// datagram are ignored.
fn datagram_typing(conn: quinn::Connection) -> impl futures_util::Stream<Item = Inbound> + Send {
    futures_util::stream::unfold(conn, |conn| async move {
        loop {
            let datagram = conn.read_datagram().await.ok()?;
            let mut buf = bytes::BytesMut::from(&datagram[..]);
            if let Ok(Some(frame)) = schema::frame::decode(&mut buf, MAX_DATAGRAM_FRAME) {
                if matches!(frame.cmd, Command::TypingStart | Command::TypingStop) {
                    let item = Inbound::Request { cmd: Some(frame.cmd), syn_seq: 0, body: frame.body };
                    return Some((item, conn));
                }
            }
        }
    })
}

/// Largest frame taken from a datagram.
const MAX_DATAGRAM_FRAME: usize = 1200;

/// Sends typing pushes as datagrams (falling back to the stream when one does not fit), and
/// everything else on the control stream.
struct DatagramTyping<S> {
    conn: quinn::Connection,
    inner: S,
}

impl<S: Sink<Outgoing, Error = std::io::Error> + Unpin> Sink<Outgoing> for DatagramTyping<S> {
    type Error = std::io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Pin::new(&mut self.inner).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Outgoing) -> Result<(), std::io::Error> {
        if let Outgoing::Frame { command, syn_seq, body } = &item {
            if *command == Command::TypingStart.code() || *command == Command::TypingStop.code() {
                let mut frame = bytes::BytesMut::new();
                schema::frame::encode(*command, *syn_seq, body, &mut frame);
                if self.conn.send_datagram(frame.freeze()).is_ok() {
                    return Ok(());
                }
            }
        }
        Pin::new(&mut self.inner).start_send(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Holds back every request that is not part of resuming (login or auth, heartbeat) until the
/// handshake is confirmed: 0-RTT data can be replayed by an attacker, so a chat sent in it must
/// not take effect before the client is known to be live.
struct EarlyGate;

impl EarlyGate {
    fn wrap(
        inner: impl futures_util::Stream<Item = Inbound> + Send + 'static,
        confirmed: Option<tokio::sync::watch::Receiver<bool>>,
        core: &Arc<Core>,
    ) -> std::pin::Pin<Box<dyn futures_util::Stream<Item = Inbound> + Send>> {
        let Some(confirmed) = confirmed else { return Box::pin(inner) };
        let core = Arc::clone(core);
        Box::pin(futures_util::stream::unfold((Box::pin(inner), confirmed, core), |(mut inner, mut confirmed, core)| async move {
            let item = inner.next().await?;
            let resume_step =
                matches!(&item, Inbound::Request { cmd: Some(Command::LoginReq | Command::AuthReq | Command::HeartbeatReq), .. });
            if !resume_step && !*confirmed.borrow() {
                core.metrics.early_data_held.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // The handshake failed: whatever came early is dropped with the connection.
                confirmed.wait_for(|c| *c).await.ok()?;
            }
            Some((item, (inner, confirmed, core)))
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[test]
    fn the_receive_buffer_passes_rmem_max_when_the_process_may_and_reports_what_it_got() {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(212_992);
        let asked = cap * 2;
        let got = enlarge_recv_buffer(&socket, asked);
        #[cfg(target_os = "linux")]
        {
            assert_eq!(got * 2, socket.recv_buffer_size().unwrap(), "the kernel's own figure, halved");
            // The effective uid is the second field of the Uid line.
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            let root = uid_line.split_whitespace().nth(2) == Some("0");
            if root {
                assert_eq!(got, asked, "root may pass net.core.rmem_max ({cap})");
            } else {
                assert_eq!(got, cap, "capped at net.core.rmem_max");
            }
        }
    }

    fn request(cmd: Command) -> Inbound {
        Inbound::Request { cmd: Some(cmd), syn_seq: 0, body: bytes::Bytes::from_static(b"{}") }
    }

    #[tokio::test]
    async fn early_data_lets_only_the_resume_step_through() {
        let dir = std::env::temp_dir().join(format!("kefu-quic-gate-{}", std::process::id()));
        let core = crate::start(crate::Config::for_tests(&dir)).await.unwrap();
        let items = futures_util::stream::iter(vec![request(Command::LoginReq), request(Command::ChatReq), request(Command::HeartbeatReq)]);
        let (confirm, confirmed) = tokio::sync::watch::channel(false);
        let mut gated = EarlyGate::wrap(items, Some(confirmed), core.core());
        assert!(matches!(gated.next().await, Some(Inbound::Request { cmd: Some(Command::LoginReq), .. })), "login passes in 0-RTT");
        assert!(gated.next().now_or_never().is_none(), "a chat waits for the handshake");
        confirm.send(true).unwrap();
        assert!(matches!(gated.next().await, Some(Inbound::Request { cmd: Some(Command::ChatReq), .. })));
        assert!(matches!(gated.next().await, Some(Inbound::Request { cmd: Some(Command::HeartbeatReq), .. })));
        assert_eq!(core.core().metrics.early_data_held.load(std::sync::atomic::Ordering::Relaxed), 1);
        core.shutdown().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
