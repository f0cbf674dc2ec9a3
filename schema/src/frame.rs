//! The J-IM TCP frame: `version(1)=0x01 | mask(1) | [synSeq(4) if mask & 0x20] | cmd(1) |
//! length(4, big-endian, signed) | body`. Used by plain TCP, TLS and the QUIC control stream.
//!
//! Input accepts any mask and honours only HAS_SYNSEQ; output sets J-IM's cosmetic
//! encrypt/compress/4-byte-length flags, giving mask 0xD1 (0xF1 with a synSeq), as J-IM does.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{Command, Status};

/// The only protocol version byte.
pub const VERSION: u8 = 0x01;
/// Mask bit: a 4-byte synSeq follows the mask.
pub const HAS_SYNSEQ: u8 = 0x20;
/// Mask the server sends without a synSeq.
pub const MASK_OUT: u8 = 0xD1;
/// Mask the server sends with a synSeq.
pub const MASK_OUT_SYNSEQ: u8 = 0xF1;
/// Largest body accepted on TCP and QUIC (2 MiB).
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The synSeq, when the mask carried one.
    pub syn_seq: Option<i32>,
    /// The command.
    pub cmd: Command,
    /// The JSON body (not yet parsed).
    pub body: Bytes,
}

/// A frame that cannot be decoded. Each is a protocol error: the connection closes after the
/// error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first byte is not 0x01.
    #[error("protocol version {0:#04x} is not 0x01")]
    BadVersion(u8),
    /// The cmd byte is not a known command.
    #[error("cmd {0} is not supported")]
    UnknownCmd(u8),
    /// The length field is negative.
    #[error("negative body length {0}")]
    NegativeLength(i32),
    /// The length field is over the limit.
    #[error("body of {0} bytes is over the limit")]
    TooLarge(usize),
}

impl FrameError {
    /// The status sent in the final error frame.
    pub fn status(self) -> Status {
        match self {
            FrameError::BadVersion(_) => Status::ProtocolVersionMismatch,
            FrameError::UnknownCmd(_) => Status::UnsupportedCmd,
            FrameError::NegativeLength(_) => Status::BadLength,
            FrameError::TooLarge(_) => Status::FrameTooLarge,
        }
    }
}

/// Decodes one frame from the front of `buf`, consuming it. `Ok(None)` means more bytes are
/// needed (nothing is consumed). Header errors are reported as soon as the header byte that
/// causes them has arrived, so a bad client is refused without waiting for its body.
pub fn decode(buf: &mut BytesMut, max_body: usize) -> Result<Option<Frame>, FrameError> {
    let Some(&version) = buf.first() else { return Ok(None) };
    if version != VERSION {
        return Err(FrameError::BadVersion(version));
    }
    let Some(&mask) = buf.get(1) else { return Ok(None) };
    let has_syn = mask & HAS_SYNSEQ != 0;
    let cmd_at = if has_syn { 6 } else { 2 };
    let Some(&cmd_byte) = buf.get(cmd_at) else { return Ok(None) };
    let cmd = Command::from_code(i64::from(cmd_byte)).ok_or(FrameError::UnknownCmd(cmd_byte))?;
    let header = cmd_at + 5;
    if buf.len() < header {
        return Ok(None);
    }
    let len_bytes = [buf[cmd_at + 1], buf[cmd_at + 2], buf[cmd_at + 3], buf[cmd_at + 4]];
    let len = i32::from_be_bytes(len_bytes);
    let len = usize::try_from(len).map_err(|_| FrameError::NegativeLength(len))?;
    if len > max_body {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < header + len {
        buf.reserve(header + len - buf.len());
        return Ok(None);
    }
    let syn_seq = has_syn.then(|| i32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]));
    buf.advance(header);
    let body = buf.split_to(len).freeze();
    Ok(Some(Frame { syn_seq, cmd, body }))
}

/// Appends one frame to `out`, with J-IM's output mask. A `syn_seq` of 0 or less is left out,
/// as J-IM leaves it out.
pub fn encode(cmd: u8, syn_seq: i32, body: &[u8], out: &mut BytesMut) {
    out.reserve(11 + body.len());
    out.put_u8(VERSION);
    if syn_seq > 0 {
        out.put_u8(MASK_OUT_SYNSEQ);
        out.put_i32(syn_seq);
    } else {
        out.put_u8(MASK_OUT);
    }
    out.put_u8(cmd);
    // Bodies are bounded far below i32::MAX by the limits above and by the JSON we build.
    out.put_i32(i32::try_from(body.len()).unwrap_or(i32::MAX));
    out.put_slice(body);
}

/// Encodes a frame the way a client would (mask 0x00, or 0x20 with a synSeq). Used by the
/// examples, the load generator and the tests.
pub fn encode_request(cmd: u8, syn_seq: Option<i32>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(11 + body.len());
    out.push(VERSION);
    match syn_seq {
        Some(seq) => {
            out.push(HAS_SYNSEQ);
            out.extend_from_slice(&seq.to_be_bytes());
        }
        None => out.push(0),
    }
    out.push(cmd);
    out.extend_from_slice(&i32::try_from(body.len()).unwrap_or(i32::MAX).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests;
