//! J-IM binary over TCP: the frame codec from `schema::frame` as a tokio codec.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::StreamExt;
use schema::frame::{self, FrameError};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite};

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

impl Encoder<Outgoing> for JimCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: Outgoing, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        if let Outgoing::Frame { command, syn_seq, body } = item {
            frame::encode(command, syn_seq, &body, dst);
        }
        Ok(())
    }
}

/// Runs a J-IM binary session on `stream`.
pub async fn serve(core: Arc<Core>, stream: TcpStream, peer: SocketAddr) {
    let (read, write) = stream.into_split();
    let reader = FramedRead::with_capacity(read, JimCodec, READ_BUFFER);
    let inbound = futures_util::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        match reader.next().await? {
            Ok(f) => Some((Inbound::Request { cmd: Some(f.cmd), syn_seq: f.syn_seq.unwrap_or(0), body: f.body }, Some(reader))),
            // A protocol error ends the stream after reporting it.
            Err(CodecError::Frame(e)) => Some((Inbound::ProtocolError(e.status()), None)),
            Err(CodecError::Io(_)) => None,
        }
    });
    let outbound = FramedWrite::new(write, JimCodec);
    session::run(core, Transport::Tcp, peer, Box::pin(inbound), outbound, None).await;
}
