//! # capsule-fs
//!
//! `capsule mount`: a fuser filesystem presenting a capsule's images as files
//! ([`mount`]), a persistent content-addressed cache shared by all mounts ([`cache`]), a
//! local copy-on-write layer for writes ([`overlay`]) that [`commit`] turns into a child
//! capsule. Errors become errnos in one place ([`error::errno`]).
//!
//! The mount asks a [`BlockSource`] for the blocks it lacks; `capsule-net` implements it
//! over QUIC, so this crate never depends on quinn.

pub mod cache;
pub mod commit;
pub mod error;
pub mod mount;
pub mod overlay;
pub mod pins;
pub mod seed;

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

/// What a source moved so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceCounters {
    /// Blocks transferred (each once, however many readers waited for it).
    pub blocks: u64,
    /// Their encoded bytes.
    pub bytes: u64,
    /// Reconnections after a lost link.
    pub reconnects: u64,
}

/// Where missing blocks come from.
pub trait BlockSource: Send + Sync {
    /// Counters for `.capsule/stats.json`.
    fn counters(&self) -> SourceCounters {
        SourceCounters::default()
    }

    /// Fetches the blocks named by `hashes`, returning each in its stored encoding
    /// (`capsule_images::block`), already verified against its hash, in request order.
    /// Concurrent callers asking for the same hash cause one transfer.
    fn fetch(&self, hashes: &[Hash], urgency: Urgency) -> Result<Vec<(Hash, Vec<u8>)>, FetchError>;
}
