//! The envelope around every encoded metadata object (manifests, layers, map pages).
//!
//! ```text
//!  offset 0       4          6       7        8            12           12+len        20+len
//!         +-------+----------+-------+--------+------------+------------+-------------+
//!         | magic | version  | kind  | flags  | payload    | payload    | checksum    |
//!         | CAPS  | u16 = 1  | u8    | u8 = 0 | len u32    | (postcard) | u64         |
//!         +-------+----------+-------+--------+------------+------------+-------------+
//!  integers little-endian; checksum = first 8 bytes of BLAKE3(bytes 0 .. 12+len)
//! ```
//!
//! An object's id is the BLAKE3 hash of the whole envelope, so a capsule id verifies
//! everything below it. The checksum still matters: it tells a damaged object from a
//! wrong id before anything is decoded. The payload length is checked against the
//! cap of its kind before any allocation.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::hash::Hash;

/// Magic at the start of every envelope.
pub const MAGIC: &[u8; 4] = b"CAPS";
/// Current envelope version.
pub const VERSION: u16 = 1;
const HEADER_LEN: usize = 12;
const CHECKSUM_LEN: usize = 8;

/// What an envelope holds; each kind has its own size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    /// A capsule manifest.
    Manifest = 1,
    /// A layer of a block map chain.
    Layer = 2,
    /// A page of a layer's block map.
    MapPage = 3,
    /// A working-set profile: blocks in first-touch order.
    Profile = 4,
}

impl ObjectKind {
    /// Largest payload accepted for this kind.
    pub const fn max_payload(self) -> usize {
        match self {
            // Names, boot cmdline, a handful of images: a few KiB in practice.
            ObjectKind::Manifest => 1 << 20,
            ObjectKind::Layer => 4 << 10,
            // 1024 entries of at most 3 + 1 + 32 bytes each, with room to spare.
            // A full leaf of sealed entries (1024 x 68 bytes).
            ObjectKind::MapPage => 128 << 10,
            // 32 K block hashes: the first 2 GiB touched at 64 KiB blocks.
            ObjectKind::Profile => 1 << 20,
        }
    }

    /// The kind with this wire/disk code.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Manifest),
            2 => Some(Self::Layer),
            3 => Some(Self::MapPage),
            4 => Some(Self::Profile),
            _ => None,
        }
    }

    /// Lower-case name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Manifest => "manifest",
            ObjectKind::Layer => "layer",
            ObjectKind::MapPage => "map page",
            ObjectKind::Profile => "profile",
        }
    }
}

/// Encodes `value` as an envelope of `kind`. Fails only if the payload exceeds the cap.
pub fn encode<T: Serialize>(kind: ObjectKind, value: &T) -> Result<Vec<u8>> {
    let payload = postcard::to_stdvec(value).map_err(|e| Error::invalid(format!("cannot encode {}: {e}", kind.name())))?;
    if payload.len() > kind.max_payload() {
        return Err(Error::new(ErrorKind::TooLarge, format!("{} of {} bytes exceeds the cap of {}", kind.name(), payload.len(), kind.max_payload())));
    }
    let len = u32::try_from(payload.len()).map_err(|_| Error::new(ErrorKind::TooLarge, "payload over 4 GiB"))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload);
    let sum = checksum(&out);
    out.extend_from_slice(&sum);
    Ok(out)
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let full = blake3::hash(bytes);
    let mut sum = [0u8; CHECKSUM_LEN];
    sum.copy_from_slice(&full.as_bytes()[..CHECKSUM_LEN]);
    sum
}

/// Checks magic, version, kind, length cap and checksum; returns the payload slice.
pub fn open(kind: ObjectKind, bytes: &[u8]) -> Result<&[u8]> {
    let what = kind.name();
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(Error::corrupt(format!("{what} truncated: {} bytes, header needs {}", bytes.len(), HEADER_LEN + CHECKSUM_LEN)));
    }
    if &bytes[0..4] != MAGIC {
        return Err(Error::corrupt(format!("{what}: bad magic {:02x?} (expected \"CAPS\")", &bytes[0..4])));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(Error::corrupt(format!("{what}: unsupported envelope version {version} (this build reads {VERSION})")));
    }
    match ObjectKind::from_u8(bytes[6]) {
        Some(k) if k == kind => {}
        Some(other) => return Err(Error::corrupt(format!("expected a {what}, found a {}", other.name()))),
        None => return Err(Error::corrupt(format!("{what}: unknown object kind {}", bytes[6]))),
    }
    let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if len > kind.max_payload() {
        return Err(Error::new(ErrorKind::TooLarge, format!("{what} declares {len} payload bytes, cap is {}", kind.max_payload())));
    }
    if bytes.len() != HEADER_LEN + len + CHECKSUM_LEN {
        return Err(Error::corrupt(format!("{what}: {} bytes on hand but header declares {}", bytes.len(), HEADER_LEN + len + CHECKSUM_LEN)));
    }
    let body_end = HEADER_LEN + len;
    if checksum(&bytes[..body_end]) != bytes[body_end..] {
        return Err(Error::corrupt(format!("{what}: checksum mismatch")));
    }
    Ok(&bytes[HEADER_LEN..body_end])
}

/// [`open`] then postcard-decode; trailing bytes are an error (canonical encoding).
pub fn decode<T: DeserializeOwned>(kind: ObjectKind, bytes: &[u8]) -> Result<T> {
    let payload = open(kind, bytes)?;
    let (value, rest) = postcard::take_from_bytes(payload).map_err(|e| Error::corrupt(format!("{}: undecodable payload: {e}", kind.name())))?;
    if !rest.is_empty() {
        return Err(Error::corrupt(format!("{}: {} trailing bytes after payload", kind.name(), rest.len())));
    }
    Ok(value)
}

/// The kind an encoded envelope claims (unverified), if its header is readable.
pub fn peek_kind(bytes: &[u8]) -> Option<ObjectKind> {
    if bytes.len() < HEADER_LEN || &bytes[0..4] != MAGIC {
        return None;
    }
    ObjectKind::from_u8(bytes[6])
}

/// Decodes and also checks that the bytes hash to `id`.
pub fn decode_verified<T: DeserializeOwned>(kind: ObjectKind, id: &Hash, bytes: &[u8]) -> Result<T> {
    let actual = Hash::of(bytes);
    if actual != *id {
        return Err(Error::corrupt(format!("{} {id}: content hashes to {actual}", kind.name())));
    }
    decode(kind, bytes).map_err(|e| e.context(format!("{} {id}", kind.name())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Inputs kept under the layer cap (at most 50 * (5 + 1 + 16 * 4) + 1 = 3501 bytes of
        /// postcard, cap 4096): every one must encode and come back.
        #[test]
        fn round_trip(v in proptest::collection::vec((any::<u32>(), "\\PC{0,16}"), 0..50)) {
            let bytes = encode(ObjectKind::Layer, &v).unwrap();
            let back: Vec<(u32, String)> = decode(ObjectKind::Layer, &bytes).unwrap();
            prop_assert_eq!(back, v);
        }

        /// Over the cap by any amount: refused as too large, whatever the bytes.
        #[test]
        fn over_the_cap_is_too_large(extra in 1usize..5000, fill in any::<u8>()) {
            let v = vec![fill; ObjectKind::Layer.max_payload() + extra];
            prop_assert_eq!(encode(ObjectKind::Layer, &v).unwrap_err().kind(), ErrorKind::TooLarge);
        }

        #[test]
        fn any_single_byte_flip_is_caught(v in proptest::collection::vec(any::<u8>(), 1..200), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = encode(ObjectKind::MapPage, &v).unwrap();
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(decode::<Vec<u8>>(ObjectKind::MapPage, &bytes).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode::<Vec<u64>>(ObjectKind::Manifest, &bytes);
        }

        #[test]
        fn truncation_is_an_error(v in proptest::collection::vec(any::<u8>(), 0..100), cut in any::<prop::sample::Index>()) {
            let bytes = encode(ObjectKind::MapPage, &v).unwrap();
            let n = cut.index(bytes.len());
            prop_assert!(decode::<Vec<u8>>(ObjectKind::MapPage, &bytes[..n]).is_err());
        }
    }

    #[test]
    fn oversized_declared_length_is_refused_before_allocating() {
        let mut bytes = encode(ObjectKind::Layer, &7u32).unwrap();
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode::<u32>(ObjectKind::Layer, &bytes).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge);
    }

    #[test]
    fn a_payload_of_exactly_the_cap_encodes_and_one_byte_more_does_not() {
        // postcard: a Vec<u8> of n < 16384 bytes is a 2-byte length and the bytes.
        let cap = ObjectKind::Layer.max_payload();
        let fits = vec![7u8; cap - 2];
        let bytes = encode(ObjectKind::Layer, &fits).unwrap();
        assert_eq!(bytes.len(), HEADER_LEN + cap + CHECKSUM_LEN);
        assert_eq!(decode::<Vec<u8>>(ObjectKind::Layer, &bytes).unwrap(), fits);
        assert_eq!(encode(ObjectKind::Layer, &vec![7u8; cap - 1]).unwrap_err().kind(), ErrorKind::TooLarge);
    }

    #[test]
    fn oversized_payload_is_refused_when_encoding() {
        let big = vec![0u8; ObjectKind::Layer.max_payload() + 1];
        assert_eq!(encode(ObjectKind::Layer, &big).unwrap_err().kind(), ErrorKind::TooLarge);
    }

    #[test]
    fn wrong_kind_is_named() {
        let bytes = encode(ObjectKind::Layer, &1u8).unwrap();
        let err = decode::<u8>(ObjectKind::Manifest, &bytes).unwrap_err();
        assert!(err.to_string().contains("found a layer"), "{err}");
    }
}
