//! The thin layer between frames and QUIC streams.

use crate::error::{Error, ErrorKind, Result};
use crate::frame::{self, Decoder, Frame};

/// Reads frames from a QUIC receive stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    dec: Decoder,
    /// Most bytes taken from the stream at once: bounds what a peer makes us buffer
    /// beyond the current frame.
    read_cap: usize,
    /// Largest frame payload accepted now (below the codec's caps), if limited.
    limit: Option<usize>,
}

/// Read buffer of an unrestricted reader.
const READ_BUF: usize = 256 << 10;
/// Read buffer of a limited reader: what an unauthorized stream may make the server hold
/// beyond the frame itself.
const LIMITED_READ_BUF: usize = 16 << 10;
/// Frame header plus checksum around a payload.
const FRAMING: usize = 16;

pub(crate) fn conn_err(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Unavailable, format!("connection: {e}"))
}

impl FrameReader {
    /// Wraps a receive stream.
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self { recv, dec: Decoder::new(), read_cap: READ_BUF, limit: None }
    }

    /// A reader that accepts frames of at most `limit` payload bytes and reads through a
    /// small buffer: for a server stream before its request is authorized.
    pub fn limited(recv: quinn::RecvStream, limit: usize) -> Self {
        Self { recv, dec: Decoder::new(), read_cap: LIMITED_READ_BUF, limit: Some(limit) }
    }

    /// The stream is authorized: frames up to `limit` bytes, the full read buffer.
    pub fn authorized(&mut self, limit: usize) {
        self.limit = Some(limit);
        self.read_cap = self.read_cap.max(READ_BUF);
    }

    /// The next frame, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return Ok(Some(f));
            }
            let want = self.dec.wanted()?.min(self.read_cap);
            // A chunk as quinn holds it: one copy fewer than reading into a buffer.
            match self.recv.read_chunk(want, true).await.map_err(conn_err)? {
                Some(chunk) => {
                    self.dec.push(&chunk.bytes)?;
                    // Once the frame header is in, its declared size is known: refuse it
                    // before buffering a payload beyond the current limit.
                    if let (Some(limit), Some(total)) = (self.limit, self.dec.frame_len()?) {
                        if total > limit + FRAMING {
                            return Err(Error::protocol(format!("frame of {} bytes exceeds the {limit} accepted here", total - FRAMING)));
                        }
                    }
                }
                None if self.dec.buffered() == 0 => return Ok(None),
                None => return Err(Error::protocol(format!("stream ended inside a frame ({} bytes buffered)", self.dec.buffered()))),
            }
        }
    }

    /// The next frame, which must exist.
    pub async fn expect(&mut self) -> Result<Frame> {
        self.next().await?.ok_or_else(|| Error::protocol("stream ended early"))
    }

    /// Stops the peer from sending more on this stream.
    pub fn stop(&mut self) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(1));
    }
}

/// Writes one frame.
pub async fn write_frame(send: &mut quinn::SendStream, f: &Frame) -> Result<()> {
    let bytes = frame::encode(f)?;
    send.write_all(&bytes).await.map_err(conn_err)
}

/// Writes a block frame, handing the block's bytes to quinn without copying them.
pub async fn write_block(send: &mut quinn::SendStream, hash: capsule_images::Hash, encoded: Vec<u8>) -> Result<()> {
    write_block_parts(send, frame::block_parts(&hash, encoded)?).await
}

/// Writes a block frame [`frame::block_parts`] built.
pub async fn write_block_parts(send: &mut quinn::SendStream, parts: [Vec<u8>; 3]) -> Result<()> {
    send.write_all_chunks(&mut parts.map(bytes::Bytes::from)).await.map_err(conn_err)
}

/// Writes a postcard control message as a frame.
pub async fn write_control<T: serde::Serialize>(send: &mut quinn::SendStream, response: bool, value: &T) -> Result<()> {
    let bytes = frame::control(response, value)?;
    send.write_all(&bytes).await.map_err(conn_err)
}
