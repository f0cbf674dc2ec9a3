//! J-IM binary over TCP: the frame codec from `schema::frame` as a tokio codec.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::StreamExt;
use schema::frame::{self, FrameError};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::net::TcpStream;

use futures_util::Sink;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, FramedRead};

use crate::dispatch::Core;
use crate::metrics::Transport;
use crate::session::{self, Inbound, Outgoing};

/// Initial read buffer per connection; it grows only while a large frame is arriving.
const READ_BUFFER: usize = 256;

/// The J-IM frame codec.
pub struct JimCodec;

/// A decode failure.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes are not a J-IM frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Decoder for JimCodec {
    type Item = frame::Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<frame::Frame>, CodecError> {
        Ok(frame::decode(src, frame::MAX_BODY)?)
    }
}

/// Runs a J-IM binary session on a plain TCP stream.
pub async fn serve(core: Arc<Core>, stream: TcpStream, peer: SocketAddr) {
    let (read, write) = stream.into_split();
    serve_halves(core, read, write, peer, Transport::Tcp).await;
}

/// Runs a J-IM binary session on any byte stream (TLS, a QUIC stream).
pub async fn serve_io<S: AsyncRead + AsyncWrite + Send + 'static>(core: Arc<Core>, stream: S, peer: SocketAddr) {
    serve_io_as(core, stream, peer, Transport::Tcp).await;
}

/// [`serve_io`], counted under another transport.
pub async fn serve_io_as<S: AsyncRead + AsyncWrite + Send + 'static>(core: Arc<Core>, stream: S, peer: SocketAddr, transport: Transport) {
    let (read, write) = tokio::io::split(stream);
    serve_halves(core, read, write, peer, transport).await;
}

async fn serve_halves<R, W>(core: Arc<Core>, read: R, write: W, peer: SocketAddr, transport: Transport)
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    session::run(core, transport, peer, Box::pin(inbound(read)), frame_sink(write), None).await;
}

/// The requests framed on a byte stream; a protocol error ends it after reporting it.
pub fn inbound<R: AsyncRead + Send + Unpin + 'static>(read: R) -> impl futures_util::Stream<Item = Inbound> + Send {
    let reader = FramedRead::with_capacity(read, JimCodec, READ_BUFFER);
    futures_util::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        match reader.next().await? {
            Ok(f) => Some((Inbound::Request { cmd: Some(f.cmd), syn_seq: f.syn_seq.unwrap_or(0), body: f.body }, Some(reader))),
            Err(CodecError::Frame(e)) => Some((Inbound::ProtocolError(e.status()), None)),
            Err(CodecError::Io(_)) => None,
        }
    })
}

/// The frame writer for a byte stream.
pub fn frame_sink<W: AsyncWrite + Send + Unpin + 'static>(write: W) -> impl Sink<Outgoing, Error = std::io::Error> + Send + Unpin {
    FrameSink { write, buf: BytesMut::new() }
}

/// Writes frames: `start_send` encodes into a buffer, `poll_flush` writes it, so frames fed
/// together leave in one syscall. The buffer starts empty and is given back after a large burst,
/// so an idle connection holds no write buffer (tokio-util's FramedWrite keeps 8 KiB).
struct FrameSink<W> {
    write: W,
    buf: BytesMut,
}

/// Buffered bytes above which `poll_ready` flushes before taking more.
const FLUSH_AT: usize = 64 * 1024;
/// Capacity kept after a flush; a larger buffer is released.
const KEEP_CAPACITY: usize = 4 * 1024;

impl<W: AsyncWrite + Unpin> Sink<Outgoing> for FrameSink<W> {
    type Error = std::io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        if self.buf.len() >= FLUSH_AT {
            return self.poll_flush(cx);
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, item: Outgoing) -> Result<(), std::io::Error> {
        if let Outgoing::Frame { command, syn_seq, body } = item {
            frame::encode(command, syn_seq, &body, &mut self.buf);
        }
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        let this = &mut *self;
        while !this.buf.is_empty() {
            let n = ready!(Pin::new(&mut this.write).poll_write(cx, &this.buf))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            bytes::Buf::advance(&mut this.buf, n);
        }
        if this.buf.capacity() > KEEP_CAPACITY {
            this.buf = BytesMut::new();
        }
        Pin::new(&mut this.write).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.write).poll_shutdown(cx)
    }
}
