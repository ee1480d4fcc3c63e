//! # capsule-fetch
//!
//! The one path by which a block the machine lacks gets here. Consumers (the FUSE mount,
//! warm, prefetch) ask an [`Engine`] for blocks by hash; the engine keeps one flight per
//! hash, asks its [`BlockSource`] for batches, many in flight at once, demand before
//! readahead before background, decodes and verifies each block exactly once, hands it to
//! the waiting readers and to the local cache, and fails a wait that outlives its deadline.
//!
//! The interface a source implements ([`BlockSource`], [`BatchSink`]) and the one the
//! engine needs from the cache ([`LocalBlocks`]) live here, below both `capsule-fs` and
//! `capsule-net`, so neither depends on the other.
//!
//! Scheduling decisions are in [`sched`] (no I/O, no clock: time is an argument) and
//! readahead decisions in [`readahead`]; both are tested against a deterministic simulated
//! link in [`sim`].

mod decode_ahead;
pub mod engine;
pub mod readahead;
pub mod sched;
pub mod sim;
mod stats;
mod verify;

use std::sync::Arc;

use capsule_images::map::MapRoot;
pub use capsule_images::Hash;
pub use engine::{Engine, EngineConfig, EngineStats};

/// How soon a block is needed. Ordered: a waiting reader goes before readahead, readahead
/// before warm-ups and prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Urgency {
    /// Prefetch, warming, bulk copies.
    Background = 0,
    /// Ahead of a reader that reads sequentially.
    Readahead = 1,
    /// A reader is blocked on it.
    Demand = 2,
}

impl Urgency {
    /// The stream priority a request of this urgency asks the server for.
    pub fn priority(self) -> u8 {
        self as u8
    }
}

/// Why a fetch failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchErrorKind {
    /// The source does not have it (or will not say).
    NotFound,
    /// What arrived failed its hash: never handed to a reader.
    Corrupt,
    /// The source stayed unreachable, or silent, past the stall timeout.
    Unavailable,
    /// The source refused our credentials.
    Denied,
    /// There is no source (an offline mount) and the cache lacks the block.
    Offline,
}

/// A failed fetch, naming what failed and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    /// Matchable kind.
    pub kind: FetchErrorKind,
    /// What and where.
    pub message: String,
}

impl FetchError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: FetchErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// Worth asking again later (the link, not the request, failed).
    pub fn is_retryable(&self) -> bool {
        self.kind == FetchErrorKind::Unavailable
    }
}

/// What a source moved so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceCounters {
    /// Batch requests started.
    pub requests: u64,
    /// Blocks received (before verification).
    pub blocks: u64,
    /// Their encoded bytes.
    pub bytes: u64,
    /// Reconnections after a lost link.
    pub reconnects: u64,
    /// Metadata requests ([`BlockSource::fetch_objects`] calls, retries included, and
    /// [`BlockSource::fetch_path`] calls).
    pub object_requests: u64,
    /// [`BlockSource::fetch_path`] calls (map pages with the block they lead to).
    pub path_requests: u64,
    /// Bytes on the wire, received (0 if the source cannot tell).
    #[serde(rename = "wire_received_bytes")]
    pub wire_received: u64,
    /// UDP datagrams received (0 if the source cannot tell).
    #[serde(default)]
    pub wire_received_datagrams: u64,
}

/// One request for blocks, as the engine hands it to a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRequest {
    /// The engine's name for this batch, echoed in every [`BatchSink`] call.
    pub id: u64,
    /// Blocks wanted, in the order the source should send them.
    pub hashes: Vec<Hash>,
    /// The most urgent of its blocks.
    pub urgency: Urgency,
}

/// Where a source delivers a batch: a block at a time as it arrives, then its end.
pub trait BatchSink: Send + Sync {
    /// One block in its stored encoding, not yet verified (the engine verifies it).
    fn block(&self, batch: u64, hash: Hash, encoded: Vec<u8>);
    /// The batch is over; blocks it did not deliver are the engine's to retry or fail.
    /// Called exactly once per started batch, unless the batch was cancelled.
    fn end(&self, batch: u64, result: Result<(), FetchError>);
}

/// Where missing blocks come from (a capsule server, a simulated link in tests).
pub trait BlockSource: Send + Sync {
    /// Starts fetching a batch without blocking; delivers into `sink`.
    fn start(&self, batch: BatchRequest, sink: Arc<dyn BatchSink>);
    /// Abandons a batch (it stalled); its sink gets no more calls for it.
    fn cancel(&self, batch: u64);
    /// Fetches metadata objects (map pages) by id, blocking, within the source's own
    /// stall timeout; each returned in its stored bytes, not yet verified.
    fn fetch_objects(&self, ids: &[Hash]) -> Result<Vec<Vec<u8>>, FetchError>;
    /// What it moved so far.
    fn counters(&self) -> SourceCounters;
    /// The network's round trip to the source without queueing, as the transport measured
    /// it (QUIC's, from the handshake and idle moments), if it can tell. The scheduler
    /// sizes background windows from it: its own samples hold a block's transfer and
    /// whatever queue traffic built.
    fn path_rtt(&self) -> Option<std::time::Duration> {
        None
    }
    /// The map pages from `root` down to block `index` and, with `with_block`, the block
    /// there, in one request (pages checked against their ids; the caller checks the
    /// chain). Once the leaf names the block, `needed` says whether to take it: a block
    /// already here is not read off the wire. `None`: this source cannot; the caller
    /// fetches page by page.
    fn fetch_path(&self, root: &MapRoot, index: u64, with_block: bool, needed: &(dyn Fn(&Hash) -> bool + Sync)) -> Option<Result<PathReply, FetchError>> {
        let _ = (root, index, with_block, needed);
        None
    }
}

/// What [`BlockSource::fetch_path`] brings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathReply {
    /// (id, stored bytes) of each page on the path, top first.
    pub pages: Vec<(Hash, Vec<u8>)>,
    /// The block the path ends at, in its stored encoding, unverified.
    pub block: Option<(Hash, Vec<u8>)>,
}

/// What the engine needs from the machine's cache: verified reads, and a place for blocks
/// it verified.
pub trait LocalBlocks: Send + Sync {
    /// The block's raw bytes if held locally and verified against `hash`.
    fn get(&self, hash: &Hash) -> Option<Vec<u8>>;
    /// True if held locally (not verified: [`LocalBlocks::get`] verifies).
    fn contains(&self, hash: &Hash) -> bool;
    /// Keeps a block whose encoding the engine verified against `hash`. A failure (full
    /// disk) must not fail the read: the engine serves the block from memory.
    fn insert_verified(&self, hash: &Hash, encoded: &[u8]) -> Result<(), String>;
}
