//! # capsule-fs
//!
//! `capsule mount` (to come): a fuser filesystem presenting a capsule's images as files, a
//! persistent content-addressed cache shared by all mounts, and a local copy-on-write
//! layer for writes. Errno mapping will live in one place here.
//!
//! What exists now is the interface this crate consumes: [`BlockSource`]. The mount asks a
//! source for the blocks it lacks; `capsule-net` implements it over QUIC and the local
//! store can implement it for seeds, so this crate never depends on quinn.

use std::fmt;

use capsule_images::Hash;

/// How soon a block is needed: a guest waiting on a read goes before any warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Urgency {
    /// Prefetch, warming, bulk copies.
    Background,
    /// A reader is blocked on it.
    Demand,
}

/// Why a fetch failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchErrorKind {
    /// The source does not have it (or will not say).
    NotFound,
    /// What arrived failed its hash: never handed to a reader.
    Corrupt,
    /// The source stayed unreachable past the stall timeout.
    Unavailable,
    /// The source refused our credentials.
    Denied,
}

/// A failed fetch, naming what failed.
#[derive(Debug, Clone)]
pub struct FetchError {
    /// Matchable kind.
    pub kind: FetchErrorKind,
    /// What and where.
    pub message: String,
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FetchError {}

/// Where missing blocks come from.
pub trait BlockSource: Send + Sync {
    /// Fetches the blocks named by `hashes`, returning each in its stored encoding
    /// (`capsule_images::block`), already verified against its hash, in request order.
    /// Concurrent callers asking for the same hash cause one transfer.
    fn fetch(&self, hashes: &[Hash], urgency: Urgency) -> Result<Vec<(Hash, Vec<u8>)>, FetchError>;
}
