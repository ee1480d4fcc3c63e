//! The engine's counters, and the snapshot of them `.capsule/stats.json` shows.

use std::sync::atomic::AtomicU64;

use crate::SourceCounters;

/// Live counters.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Blocks fetched because a reader waited for them.
    pub demand_blocks: AtomicU64,
    /// Blocks fetched ahead of sequential readers.
    pub readahead_blocks: AtomicU64,
    /// Blocks fetched by prefetch and warming.
    pub background_blocks: AtomicU64,
    /// Encoded bytes of the blocks above.
    pub fetched_bytes: AtomicU64,
    /// Encoded bytes fetched at demand urgency.
    pub demand_bytes: AtomicU64,
    /// Blocks that arrived when nobody wanted them any more (wasted transfers).
    pub unwanted_blocks: AtomicU64,
    /// Blocks that failed verification.
    pub corrupt_blocks: AtomicU64,
    /// Blocks decoded and hashed on arrival (one per arrival: never twice).
    pub verified_blocks: AtomicU64,
    /// Reads served from memory or the local cache.
    pub local_hits: AtomicU64,
    /// Reads that had to wait for the source.
    pub misses: AtomicU64,
    /// Waits that ran out of time.
    pub timeouts: AtomicU64,
    /// Blocks of the local cache decoded ahead of a sequential reader.
    pub decoded_ahead: AtomicU64,
}

/// A point-in-time view of the engine, for `.capsule/stats.json` (its `fetch` object).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineSnapshot {
    /// See [`EngineStats`].
    pub demand_blocks: u64,
    /// See [`EngineStats`].
    pub readahead_blocks: u64,
    /// See [`EngineStats`].
    pub background_blocks: u64,
    /// See [`EngineStats`].
    pub fetched_bytes: u64,
    /// See [`EngineStats`].
    pub demand_bytes: u64,
    /// See [`EngineStats`].
    pub unwanted_blocks: u64,
    /// See [`EngineStats`].
    pub corrupt_blocks: u64,
    /// See [`EngineStats`].
    pub verified_blocks: u64,
    /// See [`EngineStats`].
    pub local_hits: u64,
    /// See [`EngineStats`].
    pub misses: u64,
    /// See [`EngineStats`].
    pub timeouts: u64,
    /// See [`EngineStats`].
    #[serde(default)]
    pub decoded_ahead: u64,
    /// Measured round trip, milliseconds (the smallest recent request to first block).
    pub rtt_ms: Option<f64>,
    /// The round trip the background window covers, milliseconds: the transport's path
    /// round trip, or the smallest sample since the start.
    pub window_rtt_ms: Option<f64>,
    /// Measured bandwidth, bytes per second.
    #[serde(rename = "bandwidth_bytes_per_s")]
    pub bandwidth: Option<f64>,
    /// Bytes readahead and background may have in flight.
    pub window_bytes: u64,
    /// Batches in flight.
    pub batches_in_flight: u64,
    /// Blocks wanted and not here yet.
    pub wanted_blocks: u64,
    /// The source's own counters.
    #[serde(flatten)]
    pub source: SourceCounters,
}
