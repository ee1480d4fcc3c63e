//! The engine: the scheduler driven by real time and a real source, with the readers
//! waiting on it. Each block is decoded and hashed once, on arrival, then goes to the
//! local cache (its stored encoding) and to its readers (its raw bytes, kept in memory
//! while they are likely to be read again).

use crate::decode_ahead::{decode_ahead_loop, DecodeAheadQueue};
use crate::verify::{verify_loop, VerifyQueue};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use capsule_images::Hash;
use tracing::{debug, warn};

use crate::sched::{Arrival, Rejection, SchedConfig, Scheduler};
pub use crate::stats::{EngineSnapshot, EngineStats};
use crate::{BatchRequest, BatchSink, BlockSource, FetchError, FetchErrorKind, LocalBlocks, Urgency};

/// How the engine behaves.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A wait fails when nothing arrived from the source for this long.
    pub stall_timeout: Duration,
    /// Scheduling.
    pub sched: SchedConfig,
    /// Bytes of decoded blocks kept in memory for readers.
    pub memory_bytes: u64,
    /// Names the source in errors (a URL).
    pub source_label: String,
    /// Threads that decode, hash and cache arriving blocks, so the source's receiving
    /// thread only receives. 0: on the source's thread (deterministic, for tests).
    pub verify_threads: usize,
}

impl EngineConfig {
    /// Verify threads for a real source: one per core, at most 4 (a block verifies at
    /// about 1 GB/s per core, so more only contend with the guest).
    pub fn verify_threads_for_machine() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4)
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            stall_timeout: Duration::from_secs(60),
            sched: SchedConfig::default(),
            memory_bytes: 64 << 20,
            source_label: "the source".into(),
            verify_threads: 0,
        }
    }
}

/// A block that arrived.
#[derive(Debug, Clone)]
struct Delivered {
    /// Its raw length.
    len: u64,
    /// `None`: in the local cache, not kept in memory (nobody was reading it).
    data: Option<Arc<Vec<u8>>>,
}

/// One block on its way: set once, when it arrives or fails.
#[derive(Debug, Default)]
struct Flight {
    result: OnceLock<Result<Delivered, FetchError>>,
    tag: u32,
    /// Its readers sleep here, so an arrival wakes only those who wait for that block: one
    /// condition for all flights woke every waiting reader (eight FUSE threads on a
    /// sequential read) at every arrival, readahead included.
    bell: (Mutex<()>, Condvar),
}

impl Flight {
    fn new(tag: u32) -> Self {
        Self { result: OnceLock::new(), tag, bell: (Mutex::new(()), Condvar::new()) }
    }

    fn settle(&self, result: Result<Delivered, FetchError>) {
        let _ = self.result.set(result);
        // Taken after the set: a reader checks the result under it, so none misses the ring.
        let _bell = self.bell.0.lock().unwrap_or_else(|p| p.into_inner());
        self.bell.1.notify_all();
    }

    /// Sleeps until the flight is settled or `deadline`.
    fn wait_until(&self, deadline: Instant) {
        let bell = self.bell.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if self.result.get().is_none() && deadline > now {
            let _ = self.bell.1.wait_timeout(bell, deadline - now);
        }
    }
}

#[derive(Debug)]
struct State {
    sched: Scheduler,
    flights: HashMap<Hash, Arc<Flight>>,
    /// When the source last delivered anything: waits time out after a stall, not after
    /// a fixed time, so a slow link that moves is never an error.
    last_progress: Instant,
}

#[derive(Clone)]
struct ByteWeight;

impl quick_cache::Weighter<Hash, Arc<Vec<u8>>> for ByteWeight {
    fn weight(&self, _key: &Hash, val: &Arc<Vec<u8>>) -> u64 {
        val.len().max(1) as u64
    }
}

/// The memory cache of decoded blocks. A block readahead brings waits in it for its first
/// read, but quick_cache's default keeps 97% for blocks read before and lets a new one go
/// once 3% of newer ones arrive (in one of its 8 shards of the default 64 MiB: 4 blocks of
/// 64 KiB): a sequential read past the cache's size found half its readahead evicted and
/// decoded it again from the disk. Half of 64 MiB for blocks not yet read holds four of
/// the mount's largest windows (8 MiB).
fn decoded_cache(bytes: u64) -> quick_cache::sync::Cache<Hash, Arc<Vec<u8>>, ByteWeight> {
    let bytes = bytes.max(1 << 20);
    let options = quick_cache::OptionsBuilder::new()
        .estimated_items_capacity((bytes / (64 << 10)).max(64) as usize)
        .weight_capacity(bytes)
        .hot_allocation(0.5)
        .build()
        .expect("estimated items and weight are set");
    quick_cache::sync::Cache::with_options(options, ByteWeight, Default::default(), Default::default())
}

/// Hands a source's deliveries to the engine without keeping it alive: at once, or
/// through the verify queue when the engine has verify threads.
struct Sink {
    engine: Weak<Engine>,
    queue: Option<Arc<VerifyQueue>>,
}

impl BatchSink for Sink {
    fn block(&self, batch: u64, hash: Hash, encoded: Vec<u8>) {
        match &self.queue {
            Some(q) if q.workers.load(Ordering::Relaxed) > 0 => q.push_block(batch, hash, encoded),
            _ => {
                if let Some(e) = self.engine.upgrade() {
                    e.on_block(batch, hash, encoded);
                }
            }
        }
    }

    fn end(&self, batch: u64, result: Result<(), FetchError>) {
        match &self.queue {
            Some(q) if q.workers.load(Ordering::Relaxed) > 0 => {
                if let Some(result) = q.push_end(batch, result) {
                    if let Some(e) = self.engine.upgrade() {
                        e.on_end(batch, result);
                    }
                }
            }
            _ => {
                if let Some(e) = self.engine.upgrade() {
                    e.on_end(batch, result);
                }
            }
        }
    }
}

/// The fetch engine. See the crate documentation.
pub struct Engine {
    cfg: EngineConfig,
    source: Option<Arc<dyn BlockSource>>,
    local: Arc<dyn LocalBlocks>,
    decoded: quick_cache::sync::Cache<Hash, Arc<Vec<u8>>, ByteWeight>,
    /// Blocks handed to their readers and not yet in the local cache: found here, so a
    /// reader who comes between (after `decoded` dropped them) does not fetch them again.
    unwritten: Mutex<HashMap<Hash, Arc<Vec<u8>>>>,
    state: Mutex<State>,
    /// Wakes the timer thread early.
    timer: Condvar,
    stats: EngineStats,
    tags: Mutex<HashMap<u32, u64>>,
    sink: Arc<dyn BatchSink>,
    verify: Option<Arc<VerifyQueue>>,
    /// `None` without verify threads (the deterministic tests): readers decode their own.
    decode_ahead: Option<Arc<DecodeAheadQueue>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(q) = &self.verify {
            q.close();
        }
        if let Some(q) = &self.decode_ahead {
            q.close();
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("source", &self.cfg.source_label).finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine over `local` (the cache) and `source` (`None`: offline, the cache only).
    pub fn new(local: Arc<dyn LocalBlocks>, source: Option<Arc<dyn BlockSource>>, cfg: EngineConfig) -> Arc<Self> {
        let verify = (source.is_some() && cfg.verify_threads > 0).then(|| Arc::new(VerifyQueue::default()));
        let engine = Arc::new_cyclic(|me: &Weak<Engine>| Self {
            decoded: decoded_cache(cfg.memory_bytes),
            unwritten: Mutex::new(HashMap::new()),
            state: Mutex::new(State { sched: Scheduler::new(cfg.sched.clone()), flights: HashMap::new(), last_progress: Instant::now() }),
            timer: Condvar::new(),
            stats: EngineStats::default(),
            tags: Mutex::new(HashMap::new()),
            sink: Arc::new(Sink { engine: me.clone(), queue: verify.clone() }),
            verify: verify.clone(),
            decode_ahead: (cfg.verify_threads > 0).then(|| Arc::new(DecodeAheadQueue::default())),
            cfg,
            source,
            local,
        });
        if engine.source.is_some() {
            let weak = Arc::downgrade(&engine);
            let spawned = std::thread::Builder::new().name("capsule-fetch-timer".into()).spawn(move || timer_loop(&weak));
            if let Err(e) = spawned {
                warn!("fetch engine: no timer thread ({e}): stalled batches are not abandoned");
            }
        }
        if let Some(queue) = &engine.decode_ahead {
            // As many as verify threads: a warm reader has no arrivals to verify.
            for i in 0..engine.cfg.verify_threads {
                let (weak, worker_queue) = (Arc::downgrade(&engine), queue.clone());
                if let Err(e) = std::thread::Builder::new().name(format!("capsule-decode-{i}")).spawn(move || decode_ahead_loop(&worker_queue, &weak)) {
                    warn!("fetch engine: cannot start a decode-ahead thread: {e}");
                }
            }
        }
        if let Some(queue) = verify {
            for i in 0..engine.cfg.verify_threads {
                let (weak, worker_queue) = (Arc::downgrade(&engine), queue.clone());
                let spawned = std::thread::Builder::new().name(format!("capsule-verify-{i}")).spawn(move || verify_loop(&worker_queue, &weak));
                match spawned {
                    Ok(_) => {
                        queue.workers.fetch_add(1, Ordering::Relaxed);
                    }
                    // With none, deliveries are verified where they arrive.
                    Err(e) => warn!("fetch engine: cannot start a verify thread: {e}"),
                }
            }
        }
        engine
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True if the engine can fetch (it has a source).
    pub fn is_online(&self) -> bool {
        self.source.is_some()
    }

    /// The measured round trip, if any.
    pub fn rtt(&self) -> Option<Duration> {
        self.lock().sched.estimator().rtt()
    }

    /// What the link allows a readahead window ([`crate::readahead::Budget::for_link`]),
    /// under one lock: this runs on every read a stream continues.
    pub fn readahead_budget(&self, max_window: u64, block_size: u64) -> crate::readahead::Budget {
        crate::readahead::Budget::for_link(self.lock().sched.estimator(), max_window, block_size)
    }

    /// The measured bandwidth in bytes per second, if any.
    pub fn bandwidth(&self) -> Option<f64> {
        self.lock().sched.estimator().bandwidth()
    }

    /// The link's capacity (bytes/s): the best rate measured over a second or more.
    pub fn capacity(&self) -> Option<f64> {
        self.lock().sched.estimator().capacity()
    }

    /// Mean encoded size of the blocks fetched so far, if any were.
    pub fn block_bytes(&self) -> Option<f64> {
        self.lock().sched.estimator().block_bytes()
    }

    /// A block from memory or the local cache, without fetching.
    pub fn local(&self, hash: &Hash) -> Option<Arc<Vec<u8>>> {
        if let Some(b) = self.decoded.get(hash) {
            return Some(b);
        }
        if let Some(b) = self.unwritten_get(hash) {
            return Some(b);
        }
        self.load_local(hash)
    }

    /// A block read from the local cache (decoded and verified there), kept in memory.
    fn load_local(&self, hash: &Hash) -> Option<Arc<Vec<u8>>> {
        let raw = Arc::new(self.local.get(hash)?);
        self.decoded.insert(*hash, raw.clone());
        Some(raw)
    }

    /// Names blocks a sequential reader will read next: those the local cache holds are
    /// decoded and verified on other threads into memory before the reader asks (see
    /// [`crate::decode_ahead`]). Blocks not held locally are left alone: fetching is
    /// readahead's call.
    pub fn decode_ahead(&self, hashes: &[Hash]) {
        if let Some(q) = &self.decode_ahead {
            q.push(hashes.iter().filter(|h| !self.decoded.contains_key(*h)).copied());
        }
    }

    /// Decodes a block of the local cache into memory, unless it is in memory already or
    /// the cache lacks it (or holds it damaged: its reader fetches it).
    pub(crate) fn decode_into_memory(&self, hash: &Hash) {
        if self.decoded.contains_key(hash) || self.unwritten_get(hash).is_some() {
            return;
        }
        if self.load_local(hash).is_some() {
            self.stats.decoded_ahead.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes a block that came outside a batch (with the map pages that lead to it, for a
    /// demand read): verified and kept as a demand fetch would be. A block that fails its
    /// hash is dropped and counted, and the reader fetches it as usual.
    pub fn offer(&self, hash: &Hash, encoded: &[u8]) -> bool {
        if self.is_local(hash) {
            return true;
        }
        match capsule_images::block::decode(hash, encoded) {
            Ok(raw) => {
                self.stats.verified_blocks.fetch_add(1, Ordering::Relaxed);
                self.count_fetched(Urgency::Demand, encoded.len() as u64);
                self.decoded.insert(*hash, Arc::new(raw));
                self.write_local(hash, encoded);
                true
            }
            Err(e) => {
                self.stats.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
                warn!("block {hash} from {} failed verification: {e}", self.cfg.source_label);
                false
            }
        }
    }

    /// A wanted block of `bytes` (encoded) arrived at `urgency`.
    fn count_fetched(&self, urgency: Urgency, bytes: u64) {
        self.stats.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
        let blocks = match urgency {
            Urgency::Demand => {
                self.stats.demand_bytes.fetch_add(bytes, Ordering::Relaxed);
                &self.stats.demand_blocks
            }
            Urgency::Readahead => &self.stats.readahead_blocks,
            Urgency::Background => &self.stats.background_blocks,
        };
        blocks.fetch_add(1, Ordering::Relaxed);
    }

    /// True if the block is here (memory or the local cache), unverified.
    pub fn is_local(&self, hash: &Hash) -> bool {
        self.decoded.get(hash).is_some() || self.unwritten_get(hash).is_some() || self.local.contains(hash)
    }

    fn unwritten_get(&self, hash: &Hash) -> Option<Arc<Vec<u8>>> {
        self.unwritten.lock().unwrap_or_else(|p| p.into_inner()).get(hash).cloned()
    }

    /// Blocks `wait` (raw, verified, in order), fetching the missing ones at `urgency`;
    /// `also` go in the same request but are not waited for. `tag` attributes fetched
    /// blocks (a file of a mount) in [`Engine::fetched_by_tag`].
    pub fn get(&self, wait: &[Hash], also: &[Hash], urgency: Urgency, tag: u32) -> Result<Vec<Arc<Vec<u8>>>, FetchError> {
        self.get_with(wait, urgency, also, urgency, tag)
    }

    /// As [`Engine::get`], with `also` asked at its own urgency (readahead beside a
    /// demand read). `also` is queued after `wait`, so it never goes first.
    pub fn get_with(&self, wait: &[Hash], urgency: Urgency, also: &[Hash], also_urgency: Urgency, tag: u32) -> Result<Vec<Arc<Vec<u8>>>, FetchError> {
        let mut out: Vec<Option<Arc<Vec<u8>>>> = Vec::with_capacity(wait.len());
        let mut missing = Vec::new();
        for (i, h) in wait.iter().enumerate() {
            let got = self.local(h);
            if got.is_none() {
                missing.push(i);
            }
            out.push(got);
        }
        self.stats.local_hits.fetch_add((wait.len() - missing.len()) as u64, Ordering::Relaxed);
        if missing.is_empty() && also.is_empty() {
            return Ok(out.into_iter().flatten().collect());
        }
        let extra: Vec<Hash> = also.iter().filter(|h| !self.is_local(h)).copied().collect();
        if !missing.is_empty() && self.source.is_none() {
            let h = wait[missing[0]];
            return Err(FetchError::new(FetchErrorKind::Offline, format!("block {h} is not in the cache and the mount is offline")));
        }
        self.stats.misses.fetch_add(missing.len() as u64, Ordering::Relaxed);
        let mut waiting: Vec<(usize, Arc<Flight>)> = Vec::new();
        let mut reread = Vec::new();
        let batches = {
            let mut st = self.lock();
            for &i in &missing {
                let h = wait[i];
                match self.join_or_lead(&mut st, h, urgency, tag) {
                    Some(f) => waiting.push((i, f)),
                    None => reread.push(i),
                }
            }
            for h in extra {
                let _ = self.join_or_lead(&mut st, h, also_urgency, tag);
            }
            self.poll(&mut st)
        };
        self.start(batches);
        for i in reread {
            // Arrived between our first look and taking the lock.
            out[i] =
                Some(self.local(&wait[i]).ok_or_else(|| FetchError::new(FetchErrorKind::NotFound, format!("block {} left the cache as it arrived", wait[i])))?);
        }
        let flights: Vec<Arc<Flight>> = waiting.iter().map(|(_, f)| f.clone()).collect();
        self.wait_all(&flights, wait_hashes(&waiting, wait))?;
        for (i, f) in waiting {
            let h = wait[i];
            let block = match f.result.get() {
                Some(Ok(Delivered { data: Some(b), .. })) => b.clone(),
                Some(Ok(Delivered { data: None, .. })) => {
                    self.local(&h).ok_or_else(|| FetchError::new(FetchErrorKind::NotFound, format!("block {h} left the cache as it arrived")))?
                }
                Some(Err(e)) => return Err(e.clone()),
                None => return Err(FetchError::new(FetchErrorKind::Unavailable, format!("block {h}: wait ended early"))),
            };
            out[i] = Some(block);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Asks for blocks without waiting (readahead, background); those already here or
    /// on their way are skipped.
    pub fn want(&self, hashes: &[Hash], urgency: Urgency, tag: u32) {
        if self.source.is_none() {
            return;
        }
        let fresh: Vec<Hash> = hashes.iter().filter(|h| !self.is_local(h)).copied().collect();
        if fresh.is_empty() {
            return;
        }
        let batches = {
            let mut st = self.lock();
            for h in fresh {
                let _ = self.join_or_lead(&mut st, h, urgency, tag);
            }
            self.poll(&mut st)
        };
        self.start(batches);
    }

    /// Fetches every block of `hashes` the cache lacks at `urgency`, keeping a bounded
    /// number in flight; `progress` gets each block's raw size as it lands. Returns the
    /// encoded bytes fetched. The first block that fails fails the whole call.
    pub fn fetch_all(&self, hashes: &[Hash], urgency: Urgency, progress: &(dyn Fn(u64) + Sync)) -> Result<u64, FetchError> {
        // Enough to keep any window full, few enough to bound memory.
        const OUTSTANDING: usize = 8192;
        let before = self.stats.fetched_bytes.load(Ordering::Relaxed);
        let mut pending: std::collections::VecDeque<(Hash, Arc<Flight>)> = std::collections::VecDeque::new();
        let mut next = 0;
        while next < hashes.len() || !pending.is_empty() {
            if next < hashes.len() && pending.len() < OUTSTANDING {
                let end = (next + OUTSTANDING - pending.len()).min(hashes.len());
                let chunk: Vec<Hash> = hashes[next..end].iter().filter(|h| !self.is_local(h)).copied().collect();
                next = end;
                if !chunk.is_empty() {
                    let Some(_) = &self.source else {
                        return Err(FetchError::new(FetchErrorKind::Offline, format!("block {} is not in the cache and there is no source", chunk[0])));
                    };
                    let batches = {
                        let mut st = self.lock();
                        for h in chunk {
                            if let Some(f) = self.join_or_lead(&mut st, h, urgency, u32::MAX) {
                                pending.push_back((h, f));
                            }
                        }
                        self.poll(&mut st)
                    };
                    self.start(batches);
                }
                continue;
            }
            let Some((h, f)) = pending.pop_front() else { break };
            self.wait_all(std::slice::from_ref(&f), vec![h])?;
            match f.result.get() {
                Some(Ok(d)) => progress(d.len),
                Some(Err(e)) => return Err(e.clone()),
                None => {}
            }
        }
        Ok(self.stats.fetched_bytes.load(Ordering::Relaxed) - before)
    }

    /// Joins the flight of `h` (raising its urgency) or starts one. `None`: no need, it
    /// arrived meanwhile.
    fn join_or_lead(&self, st: &mut State, h: Hash, urgency: Urgency, tag: u32) -> Option<Arc<Flight>> {
        if let Some(f) = st.flights.get(&h) {
            let f = f.clone();
            st.sched.want(h, urgency);
            return Some(f);
        }
        // Demand and readahead deliveries reach memory before they leave the flight table.
        // (Not `local.contains`: a seed that changed since it was indexed is listed there
        // but cannot serve the block.)
        if self.decoded.get(&h).is_some() || self.unwritten_get(&h).is_some() {
            return None;
        }
        let f = Arc::new(Flight::new(tag));
        st.flights.insert(h, f.clone());
        st.sched.want(h, urgency);
        Some(f)
    }

    fn wait_all(&self, flights: &[Arc<Flight>], hashes: Vec<Hash>) -> Result<(), FetchError> {
        let started = Instant::now();
        for f in flights {
            while f.result.get().is_none() {
                // The stall timeout runs from the last progress of any fetch: a reader waits
                // as long as blocks keep arriving.
                let deadline = started.max(self.lock().last_progress) + self.cfg.stall_timeout;
                if Instant::now() < deadline {
                    f.wait_until(deadline);
                    continue;
                }
                let mut st = self.lock();
                if f.result.get().is_some() {
                    break;
                }
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                let pending: Vec<&Hash> = hashes.iter().zip(flights).filter(|(_, f)| f.result.get().is_none()).map(|(h, _)| h).collect();
                for h in &pending {
                    // Stop asking while nobody waits; a later reader joins the flight and
                    // wants it again.
                    st.sched.give_up(h);
                }
                let why = st.sched.last_error().map(|e| format!(": {e}")).unwrap_or_default();
                return Err(FetchError::new(
                    FetchErrorKind::Unavailable,
                    format!(
                        "{} block(s) (first {}) not received from {} within the stall timeout of {:.0} s{why}",
                        pending.len(),
                        pending.first().map(|h| h.to_hex()).unwrap_or_default(),
                        self.cfg.source_label,
                        self.cfg.stall_timeout.as_secs_f64()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn poll(&self, st: &mut State) -> Vec<BatchRequest> {
        let now = Instant::now();
        if let Some(rtt) = self.source.as_ref().and_then(|s| s.path_rtt()) {
            st.sched.on_path_rtt(rtt);
        }
        let mut out = Vec::new();
        while let Some(b) = st.sched.poll_batch(now) {
            out.push(b);
        }
        out
    }

    fn start(&self, batches: Vec<BatchRequest>) {
        let Some(source) = &self.source else { return };
        if batches.is_empty() {
            return;
        }
        for b in batches {
            debug!(batch = b.id, blocks = b.hashes.len(), urgency = ?b.urgency, "fetch batch");
            source.start(b, self.sink.clone());
        }
        self.timer.notify_one();
    }

    fn complete(&self, st: &mut State, h: &Hash, result: Result<Delivered, FetchError>) {
        if let Some(f) = st.flights.remove(h) {
            if result.is_ok() && f.tag != u32::MAX {
                *self.tags.lock().unwrap_or_else(|p| p.into_inner()).entry(f.tag).or_default() += 1;
            }
            f.settle(result);
        }
    }

    pub(crate) fn on_block(&self, batch: u64, hash: Hash, encoded: Vec<u8>) {
        self.stats.verified_blocks.fetch_add(1, Ordering::Relaxed);
        let decoded = capsule_images::block::decode(&hash, &encoded);
        let now = Instant::now();
        // Blocks a reader waits for (or will soon) reach memory before their flight ends
        // and the disk after, so the reader does not wait for the write; others reach the
        // disk first, so a reader who finds no flight finds the block.
        let mut write_after = false;
        let batches = match decoded {
            Ok(raw) => {
                write_after = self.lock().sched.urgency_of(&hash).is_some_and(|u| u > Urgency::Background);
                if !write_after {
                    self.write_local(&hash, &encoded);
                }
                let raw = Arc::new(raw);
                let mut st = self.lock();
                st.last_progress = now;
                match st.sched.on_block(now, batch, &hash, encoded.len() as u64) {
                    Arrival::Wanted(urgency) => {
                        self.count_fetched(urgency, encoded.len() as u64);
                        // Background blocks nobody reads yet stay on disk only.
                        let keep = urgency > Urgency::Background;
                        if keep {
                            self.decoded.insert(hash, raw.clone());
                        }
                        if write_after {
                            self.unwritten.lock().unwrap_or_else(|p| p.into_inner()).insert(hash, raw.clone());
                        }
                        self.complete(&mut st, &hash, Ok(Delivered { len: raw.len() as u64, data: keep.then_some(raw) }));
                    }
                    Arrival::Unwanted => {
                        self.stats.unwanted_blocks.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.poll(&mut st)
            }
            Err(e) => {
                self.stats.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
                warn!("block {hash} from {} failed verification: {e}", self.cfg.source_label);
                let mut st = self.lock();
                match st.sched.on_corrupt(now, batch, &hash, &e.to_string()) {
                    Rejection::Retried => {}
                    Rejection::Failed(err) => {
                        self.complete(&mut st, &hash, Err(FetchError::new(err.kind, format!("{} (from {})", err.message, self.cfg.source_label))))
                    }
                    Rejection::Dropped => self.complete(
                        &mut st,
                        &hash,
                        Err(FetchError::new(FetchErrorKind::Corrupt, format!("block {hash} from {} is corrupt: {e}", self.cfg.source_label))),
                    ),
                }
                self.poll(&mut st)
            }
        };
        self.start(batches);
        if write_after {
            self.write_local(&hash, &encoded);
            self.unwritten.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
        }
    }

    fn write_local(&self, hash: &Hash, encoded: &[u8]) {
        if let Err(e) = self.local.insert_verified(hash, encoded) {
            warn!("cannot cache block {hash}: {e}; serving it from memory");
        }
    }

    pub(crate) fn on_end(&self, batch: u64, result: Result<(), FetchError>) {
        let now = Instant::now();
        if let Err(e) = &result {
            debug!(batch, "batch failed: {e}");
        }
        let batches = {
            let mut st = self.lock();
            for (h, e) in st.sched.on_end(now, batch, result) {
                self.complete(&mut st, &h, Err(e));
            }
            self.poll(&mut st)
        };
        self.timer.notify_one();
        self.start(batches);
    }

    fn tick(&self) -> Duration {
        let now = Instant::now();
        let (cancelled, batches, next) = {
            let mut st = self.lock();
            let (cancelled, failed) = st.sched.expire(now);
            for (h, e) in failed {
                self.complete(&mut st, &h, Err(FetchError::new(e.kind, format!("{} from {}: {}", h, self.cfg.source_label, e.message))));
            }
            let batches = self.poll(&mut st);
            (cancelled, batches, st.sched.next_deadline())
        };
        if let Some(source) = &self.source {
            for id in cancelled {
                warn!(batch = id, "abandoning a batch {} did not answer", self.cfg.source_label);
                source.cancel(id);
                if let Some(q) = &self.verify {
                    q.forget(id);
                }
            }
        }
        self.start(batches);
        next.map_or(Duration::from_secs(1), |t| t.saturating_duration_since(Instant::now())).clamp(Duration::from_millis(1), Duration::from_secs(1))
    }

    /// Blocks fetched for each tag so far.
    pub fn fetched_by_tag(&self, tag: u32) -> u64 {
        self.tags.lock().map(|t| t.get(&tag).copied().unwrap_or(0)).unwrap_or(0)
    }

    /// The counters and measurements now.
    pub fn snapshot(&self) -> EngineSnapshot {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (rtt, window_rtt, bw, window, batches, wanted) = {
            let st = self.lock();
            (
                st.sched.estimator().rtt(),
                st.sched.estimator().window_rtt(),
                st.sched.estimator().bandwidth(),
                st.sched.window(),
                st.sched.batches_in_flight(),
                st.sched.wanted(),
            )
        };
        EngineSnapshot {
            demand_blocks: l(&s.demand_blocks),
            readahead_blocks: l(&s.readahead_blocks),
            background_blocks: l(&s.background_blocks),
            fetched_bytes: l(&s.fetched_bytes),
            demand_bytes: l(&s.demand_bytes),
            unwanted_blocks: l(&s.unwanted_blocks),
            corrupt_blocks: l(&s.corrupt_blocks),
            verified_blocks: l(&s.verified_blocks),
            local_hits: l(&s.local_hits),
            misses: l(&s.misses),
            timeouts: l(&s.timeouts),
            decoded_ahead: l(&s.decoded_ahead),
            rtt_ms: rtt.map(|r| r.as_secs_f64() * 1e3),
            window_rtt_ms: window_rtt.map(|r| r.as_secs_f64() * 1e3),
            bandwidth: bw,
            window_bytes: window,
            batches_in_flight: batches as u64,
            wanted_blocks: wanted as u64,
            source: self.source.as_ref().map(|s| s.counters()).unwrap_or_default(),
        }
    }

    /// The source, if any (for its own counters and metadata fetches).
    pub fn source(&self) -> Option<&Arc<dyn BlockSource>> {
        self.source.as_ref()
    }
}

fn wait_hashes(waiting: &[(usize, Arc<Flight>)], wait: &[Hash]) -> Vec<Hash> {
    waiting.iter().map(|(i, _)| wait[*i]).collect()
}

fn timer_loop(weak: &Weak<Engine>) {
    loop {
        let Some(engine) = weak.upgrade() else { return };
        let sleep = engine.tick();
        let st = engine.lock();
        // Woken early when a batch starts or ends (a new deadline).
        let _ = engine.timer.wait_timeout(st, sleep);
    }
}
