//! J-IM binary over TCP (and TLS, and QUIC streams): frames from `schema::frame` read from and
//! written to a byte stream.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use schema::frame;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::net::TcpStream;

use futures_util::Sink;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::dispatch::Core;
use crate::metrics::Transport;
use crate::session::{self, Inbound, Outgoing};

/// Bytes read at a time into the stack while no partial frame is buffered; only what a read
/// leaves undecoded is copied to the heap, so a connection between frames holds no read buffer.
const READ_CHUNK: usize = 2 * 1024;
/// Bytes read at a time into a partial frame's buffer.
const READ_MORE: usize = 8 * 1024;

/// A J-IM binary session on a plain TCP stream. Plain functions down to the session's own future,
/// so no layer keeps a copy of its arguments in the connection's task.
pub fn serve(core: Arc<Core>, stream: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> + Send {
    let (read, write) = stream.into_split();
    serve_halves(core, read, write, peer, Transport::Tcp)
}

/// A J-IM binary session on any byte stream (TLS, a QUIC stream).
pub fn serve_io<S: AsyncRead + AsyncWrite + Send + 'static>(
    core: Arc<Core>,
    stream: S,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    serve_io_as(core, stream, peer, Transport::Tcp)
}

/// [`serve_io`], counted under another transport.
pub fn serve_io_as<S: AsyncRead + AsyncWrite + Send + 'static>(
    core: Arc<Core>,
    stream: S,
    peer: SocketAddr,
    transport: Transport,
) -> impl Future<Output = ()> + Send {
    let (read, write) = tokio::io::split(stream);
    serve_halves(core, read, write, peer, transport)
}

fn serve_halves<R, W>(core: Arc<Core>, read: R, write: W, peer: SocketAddr, transport: Transport) -> impl Future<Output = ()> + Send
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    session::run(core, transport, peer, inbound(read), frame_sink(write), None)
}

/// The requests framed on a byte stream; a protocol error ends it after reporting it.
pub fn inbound<R: AsyncRead + Send + Unpin + 'static>(read: R) -> impl futures_util::Stream<Item = Inbound> + Send + Unpin {
    FrameReader { read, buf: BytesMut::new(), done: false }
}

/// Decodes J-IM frames from a byte stream. The buffer exists only while a frame is incomplete or
/// several arrived together; an idle connection keeps none (tokio-util's FramedRead keeps its
/// whole capacity).
struct FrameReader<R> {
    read: R,
    buf: BytesMut,
    /// The stream ended or could not be decoded.
    done: bool,
}

impl<R> FrameReader<R> {
    /// The next frame already buffered, if whole.
    fn decoded(&mut self) -> Option<Inbound> {
        match frame::decode(&mut self.buf, frame::MAX_BODY) {
            Ok(Some(f)) => {
                if self.buf.is_empty() {
                    // The frames decoded share the allocation; drop this handle on it.
                    self.buf = BytesMut::new();
                }
                Some(Inbound::Request { cmd: Some(f.cmd), syn_seq: f.syn_seq.unwrap_or(0), body: f.body })
            }
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                self.buf = BytesMut::new();
                Some(Inbound::ProtocolError(e.status()))
            }
        }
    }
}

impl<R: AsyncRead + Unpin> futures_util::Stream for FrameReader<R> {
    type Item = Inbound;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Inbound>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(item) = this.decoded() {
                return Poll::Ready(Some(item));
            }
            let read = if this.buf.is_empty() {
                let mut chunk = [0u8; READ_CHUNK];
                let mut rb = ReadBuf::new(&mut chunk);
                let res = ready!(Pin::new(&mut this.read).poll_read(cx, &mut rb));
                res.map(|()| {
                    this.buf.extend_from_slice(rb.filled());
                    rb.filled().len()
                })
            } else {
                this.buf.reserve(READ_MORE);
                ready!(tokio_util::io::poll_read_buf(Pin::new(&mut this.read), cx, &mut this.buf))
            };
            match read {
                Ok(n) if n > 0 => {}
                // The end of the stream (a partial frame left in it is dropped), or a socket error.
                _ => {
                    this.done = true;
                    this.buf = BytesMut::new();
                }
            }
        }
    }
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
