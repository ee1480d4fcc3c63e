//! Stored (and later transmitted) form of one data block.
//!
//! ```text
//!  offset 0       4        5          6          8           12
//!         +-------+--------+----------+----------+-----------+---------------------+
//!         | magic | version| encoding | reserved | raw len   | payload             |
//!         | CBLK  | u8 = 1 | 0 raw    | u16 = 0  | u32 LE    | raw bytes, or a     |
//!         |       |        | 1 zstd   |          | <= 1 MiB  | zstd frame          |
//!         +-------+--------+----------+----------+-----------+---------------------+
//! ```
//!
//! The checksum of a block is its name: the BLAKE3 hash of the raw bytes, checked on
//! every decode. Blocks are zstd-compressed only when that saves space. The raw length
//! is capped before decompressing so a hostile frame cannot make us allocate more.

use crate::error::{Error, ErrorKind, Result};
use crate::hash::Hash;

const MAGIC: &[u8; 4] = b"CBLK";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 12;
/// Largest block size a capsule may use.
pub const MAX_BLOCK_SIZE: usize = 1 << 20;
/// Smallest block size a capsule may use.
pub const MIN_BLOCK_SIZE: usize = 4 << 10;
/// Largest content a stored block may hold: a plaintext block, or a sealed one's
/// ciphertext (its header and tag over [`MAX_BLOCK_SIZE`]; see `seal`).
pub const MAX_STORED_SIZE: usize = MAX_BLOCK_SIZE + crate::seal::SEAL_OVERHEAD;
/// zstd level of blocks written by commits, suspends and imports unless told otherwise:
/// fast enough not to slow a suspend.
pub const DEFAULT_LEVEL: i32 = 3;
/// Highest zstd level offered (20-22 need far more memory for the same block sizes).
pub const MAX_LEVEL: i32 = 19;

/// How a block's payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The raw bytes.
    Raw = 0,
    /// One zstd frame.
    Zstd = 1,
}

thread_local! {
    // One zstd context per thread, reused: a context made per block cost 3% of a cold
    // sequential read's CPU (ZSTD_createDCtx), and a level-19 one far more per import.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// `raw` compressed at zstd `level` with this thread's context (`None`: zstd failed).
pub(crate) fn zstd_compress(raw: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        slot.as_mut()?.1.compress(raw).ok()
    })
}

/// One zstd frame decompressed with this thread's context, into at most `capacity` bytes.
pub(crate) fn zstd_decompress(payload: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|slot| {
        let mut slot = slot.borrow_mut();
        let context = match slot.as_mut() {
            Some(context) => context,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        context.decompress(payload, capacity)
    })
}

/// True if every byte is zero (such blocks are never stored).
pub fn is_zero(data: &[u8]) -> bool {
    // Word-sized compares with early exit: this runs on every imported block.
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    words.map(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])).all(|w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Encodes raw block bytes, compressing when it saves space.
pub fn encode(raw: &[u8]) -> Result<Vec<u8>> {
    encode_with_level(raw, DEFAULT_LEVEL)
}

/// As [`encode`] at zstd `level` (at most [`MAX_LEVEL`]; 0 stores it as it is): a publisher preparing a
/// capsule for slow links trades import time for fewer bytes on every client's link
/// (level 19 stores a Debian disk's 64 KiB blocks in about 13% fewer bytes than level 3,
/// and decompresses as fast).
pub fn encode_with_level(raw: &[u8], level: i32) -> Result<Vec<u8>> {
    if raw.len() > MAX_STORED_SIZE {
        return Err(Error::new(ErrorKind::TooLarge, format!("block of {} bytes exceeds {MAX_STORED_SIZE}", raw.len())));
    }
    // Level 0: stored as it is (ciphertext, which does not compress).
    let compressed = (level > 0).then(|| zstd_compress(raw, level.min(MAX_LEVEL))).flatten().filter(|c| c.len() + 16 < raw.len());
    let (encoding, payload) = match &compressed {
        Some(c) => (Encoding::Zstd, c.as_slice()),
        None => (Encoding::Raw, raw),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(encoding as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&u32::try_from(raw.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decodes an encoded block and checks it hashes to `expected`.
pub fn decode(expected: &Hash, encoded: &[u8]) -> Result<Vec<u8>> {
    let bad = |why: String| Error::corrupt(format!("block {expected}: {why}"));
    if encoded.len() < HEADER_LEN {
        return Err(bad(format!("truncated to {} bytes", encoded.len())));
    }
    if &encoded[0..4] != MAGIC {
        return Err(bad("bad magic".into()));
    }
    if encoded[4] != VERSION {
        return Err(bad(format!("unsupported block version {}", encoded[4])));
    }
    let raw_len = u32::from_le_bytes([encoded[8], encoded[9], encoded[10], encoded[11]]) as usize;
    if raw_len > MAX_STORED_SIZE {
        return Err(Error::new(ErrorKind::TooLarge, format!("block {expected}: declares {raw_len} bytes, cap {MAX_STORED_SIZE}")));
    }
    let payload = &encoded[HEADER_LEN..];
    let raw = match encoded[5] {
        0 => payload.to_vec(),
        1 => zstd_decompress(payload, raw_len).map_err(|e| bad(format!("zstd: {e}")))?,
        other => return Err(bad(format!("unknown encoding {other}"))),
    };
    if raw.len() != raw_len {
        return Err(bad(format!("{} bytes, header says {raw_len}", raw.len())));
    }
    let actual = Hash::of(&raw);
    if actual != *expected {
        return Err(bad(format!("content hashes to {actual}")));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..9000), repeat in 1usize..4) {
            let data: Vec<u8> = data.iter().copied().cycle().take(data.len() * repeat).collect();
            let enc = encode(&data).unwrap();
            prop_assert_eq!(decode(&Hash::of(&data), &enc).unwrap(), data);
        }

        #[test]
        fn flipped_bit_never_decodes(data in proptest::collection::vec(any::<u8>(), 1..3000), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut enc = encode(&data).unwrap();
            let i = pos.index(enc.len());
            enc[i] ^= 1 << bit;
            // Either refused, or (reserved bytes) decodes to exactly the original.
            if let Ok(back) = decode(&Hash::of(&data), &enc) { prop_assert_eq!(back, data) }
        }
    }

    #[test]
    fn compressible_blocks_are_compressed() {
        let data = vec![7u8; 65536];
        let enc = encode(&data).unwrap();
        assert!(enc.len() < 1000);
        assert_eq!(enc[5], Encoding::Zstd as u8);
    }

    #[test]
    fn a_threads_reused_zstd_contexts_follow_the_level_asked() {
        // One context per thread, remade when the level changes: each block must come out
        // at its own level and decode on the same thread.
        let data: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 27) as u8).collect();
        let mut sizes = Vec::new();
        for level in [1, MAX_LEVEL, 1, MAX_LEVEL] {
            let enc = encode_with_level(&data, level).unwrap();
            assert_eq!(decode(&Hash::of(&data), &enc).unwrap(), data);
            sizes.push(enc.len());
        }
        assert_eq!(sizes[0], sizes[2], "level 1 twice: the same bytes");
        assert_eq!(sizes[1], sizes[3], "level 19 twice: the same bytes");
        assert!(sizes[1] < sizes[0], "level 19 ({}) smaller than level 1 ({})", sizes[1], sizes[0]);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn huge_declared_length_is_capped() {
        let mut enc = encode(&[1, 2, 3]).unwrap();
        enc[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&Hash::of(&[1, 2, 3]), &enc).unwrap_err().kind(), ErrorKind::TooLarge);
    }
}
