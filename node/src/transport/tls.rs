//! TLS over TCP: the J-IM port's protocols inside TLS. ALPN `kefu-tcp/1` is the J-IM binary
//! protocol; `h2` and `http/1.1` are HTTPS and WSS; a client that offers no ALPN gets the same
//! first-byte sniffing as the plain port. A client that offers only protocols we do not speak is
//! refused in the handshake (`no_application_protocol`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::Core;
use crate::tls::{CertStore, ALPN_KEFU_TCP};

/// How long a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TLS connections until `shutdown`.
pub async fn serve_tls(
    core: Arc<Core>,
    listener: TcpListener,
    certs: Arc<CertStore>,
    accepting: CancellationToken,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let acceptor = TlsAcceptor::from(Arc::new(certs.server_config(&[ALPN_KEFU_TCP, b"h2", b"http/1.1"])));
    let router = super::http::router(Arc::clone(&core));
    while let Some((stream, peer)) = super::accept(&listener, &accepting).await {
        let Some(slot) = core.conns.admit(peer.ip()) else { continue };
        let (core, acceptor, router, shutdown) = (Arc::clone(&core), acceptor.clone(), router.clone(), shutdown.clone());
        tasks.spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = Box::pin(connection(core, acceptor, stream, peer, router)) => {}
            }
        });
    }
}

async fn connection(core: Arc<Core>, acceptor: TlsAcceptor, stream: TcpStream, peer: SocketAddr, router: axum::Router) {
    let _ = stream.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(error = %e, %peer, "tls handshake failed"),
        Err(_) => return tracing::debug!(%peer, "tls handshake timed out"),
    };
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    match alpn.as_deref() {
        Some(ALPN_KEFU_TCP) => super::tcp::serve_io(core, tls, peer).await,
        Some(_) => super::serve_http(core, tls, peer, router).await,
        None => {
            // No ALPN: sniff the first byte, as the plain port does, then hand it back.
            let mut tls = tls;
            let mut first = [0u8; 1];
            match tokio::time::timeout(super::FIRST_BYTE_TIMEOUT, tls.read(&mut first)).await {
                Ok(Ok(1)) => {}
                _ => return,
            }
            let stream = Rewind { first: Some(first[0]), inner: tls };
            if first[0] == schema::frame::VERSION {
                super::tcp::serve_io(core, stream, peer).await;
            } else {
                super::serve_http(core, stream, peer, router).await;
            }
        }
    }
}

/// A stream that yields one byte already read, then the rest of the inner stream.
struct Rewind<S> {
    first: Option<u8>,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Some(b) = self.first.take() {
            if buf.remaining() > 0 {
                buf.put_slice(&[b]);
                return Poll::Ready(Ok(()));
            }
            self.first = Some(b);
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
