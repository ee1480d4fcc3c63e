//! The threaded engine with an in-process source whose batches run on their own threads.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsule_fetch::{BatchRequest, BatchSink, BlockSource, Engine, EngineConfig, FetchError, FetchErrorKind, Hash, LocalBlocks, SourceCounters, Urgency};
use capsule_images::block;

#[derive(Default)]
struct MemCache {
    blocks: Mutex<HashMap<Hash, Vec<u8>>>,
    inserts: AtomicU64,
    /// Blocks read back (and decoded) from here.
    gets: AtomicU64,
}

impl LocalBlocks for MemCache {
    fn get(&self, hash: &Hash) -> Option<Vec<u8>> {
        let encoded = self.blocks.lock().unwrap().get(hash).cloned()?;
        self.gets.fetch_add(1, Ordering::SeqCst);
        block::decode(hash, &encoded).ok()
    }
    fn contains(&self, hash: &Hash) -> bool {
        self.blocks.lock().unwrap().contains_key(hash)
    }
    fn insert_verified(&self, hash: &Hash, encoded: &[u8]) -> Result<(), String> {
        self.inserts.fetch_add(1, Ordering::SeqCst);
        self.blocks.lock().unwrap().insert(*hash, encoded.to_vec());
        Ok(())
    }
}

#[derive(Default)]
struct ThreadSource {
    blocks: HashMap<Hash, Vec<u8>>,
    latency: Duration,
    missing: HashSet<Hash>,
    corrupt_once: Mutex<HashSet<Hash>>,
    silent: bool,
    asked: Mutex<HashMap<Hash, u64>>,
    requests: AtomicU64,
}

impl BlockSource for ThreadSource {
    fn start(&self, batch: BatchRequest, sink: Arc<dyn BatchSink>) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        for h in &batch.hashes {
            *self.asked.lock().unwrap().entry(*h).or_default() += 1;
        }
        if self.silent {
            return;
        }
        let mut out = Vec::new();
        let mut result = Ok(());
        for h in &batch.hashes {
            if self.missing.contains(h) {
                result = Err(FetchError::new(FetchErrorKind::NotFound, format!("no block {h}")));
                break;
            }
            let mut encoded = self.blocks[h].clone();
            if self.corrupt_once.lock().unwrap().remove(h) {
                let last = encoded.len() - 1;
                encoded[last] ^= 0xff;
            }
            out.push((*h, encoded));
        }
        let latency = self.latency;
        std::thread::spawn(move || {
            std::thread::sleep(latency);
            for (h, e) in out {
                sink.block(batch.id, h, e);
            }
            sink.end(batch.id, result);
        });
    }
    fn cancel(&self, _batch: u64) {}
    fn fetch_objects(&self, _ids: &[Hash]) -> Result<Vec<Vec<u8>>, FetchError> {
        Err(FetchError::new(FetchErrorKind::NotFound, "no objects here"))
    }
    fn counters(&self) -> SourceCounters {
        SourceCounters { requests: self.requests.load(Ordering::SeqCst), ..Default::default() }
    }
}

type ByHash = HashMap<Hash, Vec<u8>>;

/// `n` blocks: (hashes, raw by hash, encoded by hash).
fn blocks(n: usize) -> (Vec<Hash>, ByHash, ByHash) {
    let mut raw = HashMap::new();
    let mut enc = HashMap::new();
    let mut hs = Vec::new();
    for i in 0..n {
        let data: Vec<u8> = (0..65536u32).map(|j| (j.wrapping_mul(i as u32 + 7) >> 3) as u8).collect();
        let h = Hash::of(&data);
        enc.insert(h, block::encode(&data).unwrap());
        raw.insert(h, data);
        hs.push(h);
    }
    (hs, raw, enc)
}

fn engine_with(source: ThreadSource, stall: Duration, verify_threads: usize) -> (Arc<Engine>, Arc<ThreadSource>, Arc<MemCache>) {
    let source = Arc::new(source);
    let cache = Arc::new(MemCache::default());
    let cfg = EngineConfig { stall_timeout: stall, source_label: "test source".into(), verify_threads, ..EngineConfig::default() };
    let e = Engine::new(cache.clone(), Some(source.clone() as Arc<dyn BlockSource>), cfg);
    (e, source, cache)
}

#[test]
fn concurrent_readers_share_one_fetch_and_each_block_is_verified_once() {
    // Verified where they arrive, and on verify threads.
    for verify_threads in [0, 2] {
        concurrent_readers(verify_threads);
    }
}

fn concurrent_readers(verify_threads: usize) {
    let (hs, raw, enc) = blocks(16);
    let (e, src, cache) =
        engine_with(ThreadSource { blocks: enc, latency: Duration::from_millis(50), ..Default::default() }, Duration::from_secs(10), verify_threads);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let got = e.get(&hs, &[], Urgency::Demand, 0).unwrap();
                for (h, b) in hs.iter().zip(got) {
                    assert_eq!(*b, raw[h]);
                }
            });
        }
    });
    assert!(src.asked.lock().unwrap().values().all(|&n| n == 1), "each block asked once: {:?}", src.asked.lock().unwrap().values().collect::<Vec<_>>());
    let snap = e.snapshot();
    assert_eq!(snap.verified_blocks, 16, "decoded and hashed once each");
    // Blocks readers wait for reach the cache just after the readers have them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.inserts.load(Ordering::SeqCst) < 16 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(cache.inserts.load(Ordering::SeqCst), 16, "cached once each");
    assert_eq!(snap.demand_blocks, 16);
    assert_eq!(e.fetched_by_tag(0), 16);
}

#[test]
fn a_source_that_never_answers_fails_the_read_after_the_stall_timeout() {
    // Verified where they arrive, and on verify threads.
    for verify_threads in [0, 2] {
        a_source_that_never_answers_fails_the_read_after_the_stall_timeout_with(verify_threads);
    }
}

fn a_source_that_never_answers_fails_the_read_after_the_stall_timeout_with(verify_threads: usize) {
    let (hs, _, enc) = blocks(1);
    let (e, _, _) = engine_with(ThreadSource { blocks: enc, silent: true, ..Default::default() }, Duration::from_millis(300), verify_threads);
    let t = Instant::now();
    let err = e.get(&hs, &[], Urgency::Demand, 0).unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.kind, FetchErrorKind::Unavailable);
    assert!(err.message.contains("stall timeout") && err.message.contains("test source"), "{err}");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn without_a_source_a_missing_block_fails_at_once() {
    let (hs, _, _) = blocks(1);
    let e = Engine::new(Arc::new(MemCache::default()), None, EngineConfig::default());
    let t = Instant::now();
    assert_eq!(e.get(&hs, &[], Urgency::Demand, 0).unwrap_err().kind, FetchErrorKind::Offline);
    assert!(t.elapsed() < Duration::from_millis(100));
}

#[test]
fn a_sequential_read_past_the_memory_cache_finds_its_readahead_in_memory() {
    // 4 MiB of memory (64 blocks), a window of 16 blocks, 400 blocks read once each: every
    // block the window brought must still be in memory when its read comes, not decoded
    // again from the cache (quick_cache's default kept 3% for blocks not yet read).
    let (hs, raw, enc) = blocks(400);
    let source = Arc::new(ThreadSource { blocks: enc, ..Default::default() });
    let cache = Arc::new(MemCache::default());
    let cfg = EngineConfig { memory_bytes: 4 << 20, source_label: "test source".into(), verify_threads: 0, ..EngineConfig::default() };
    let e = Engine::new(cache.clone(), Some(source.clone() as Arc<dyn BlockSource>), cfg);
    const WINDOW: usize = 16;
    e.want(&hs[..WINDOW], Urgency::Readahead, 0);
    for (i, h) in hs.iter().enumerate() {
        if i % (WINDOW / 2) == 0 && i + WINDOW < hs.len() {
            // Wait for the window to land, then top it up as the mount does.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !hs[i..i + WINDOW].iter().all(|h| e.is_local(h)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            e.want(&hs[i + WINDOW..(i + WINDOW * 3 / 2).min(hs.len())], Urgency::Readahead, 0);
        }
        let got = e.get(std::slice::from_ref(h), &[], Urgency::Demand, 0).unwrap();
        assert_eq!(*got[0], raw[h]);
    }
    assert_eq!(cache.gets.load(Ordering::SeqCst), 0, "blocks read back from the cache (decoded twice)");
}

#[test]
fn a_missing_readahead_block_never_fails_a_read() {
    // Verified where they arrive, and on verify threads.
    for verify_threads in [0, 2] {
        a_missing_readahead_block_never_fails_a_read_with(verify_threads);
    }
}

fn a_missing_readahead_block_never_fails_a_read_with(verify_threads: usize) {
    let (hs, raw, enc) = blocks(4);
    let mut src = ThreadSource { blocks: enc, latency: Duration::from_millis(10), ..Default::default() };
    src.missing.insert(hs[1]);
    let (e, _, _) = engine_with(src, Duration::from_secs(10), verify_threads);
    // The missing block rides along with the demand one, in the same request.
    let got = e.get(&hs[..1], &hs[1..], Urgency::Demand, 0).unwrap();
    assert_eq!(*got[0], raw[&hs[0]]);
    e.want(&hs[1..], Urgency::Readahead, 0);
    let got = e.get(&hs[2..3], &[], Urgency::Demand, 0).unwrap();
    assert_eq!(*got[0], raw[&hs[2]]);
}

#[test]
fn a_corrupt_block_is_never_served_and_is_asked_again() {
    // Verified where they arrive, and on verify threads.
    for verify_threads in [0, 2] {
        a_corrupt_block_is_never_served_and_is_asked_again_with(verify_threads);
    }
}

fn a_corrupt_block_is_never_served_and_is_asked_again_with(verify_threads: usize) {
    let (hs, raw, enc) = blocks(2);
    let src = ThreadSource { blocks: enc, latency: Duration::from_millis(10), ..Default::default() };
    src.corrupt_once.lock().unwrap().insert(hs[0]);
    let (e, src, _) = engine_with(src, Duration::from_secs(10), verify_threads);
    let got = e.get(&hs, &[], Urgency::Demand, 0).unwrap();
    assert_eq!(*got[0], raw[&hs[0]], "the good copy");
    assert_eq!(src.asked.lock().unwrap()[&hs[0]], 2);
    assert_eq!(e.snapshot().corrupt_blocks, 1);
}

#[test]
fn fetch_all_fetches_what_the_cache_lacks() {
    // Verified where they arrive, and on verify threads.
    for verify_threads in [0, 2] {
        fetch_all_fetches_what_the_cache_lacks_with(verify_threads);
    }
}

fn fetch_all_fetches_what_the_cache_lacks_with(verify_threads: usize) {
    let (hs, _, enc) = blocks(40);
    let (e, src, cache) =
        engine_with(ThreadSource { blocks: enc.clone(), latency: Duration::from_millis(5), ..Default::default() }, Duration::from_secs(10), verify_threads);
    cache.insert_verified(&hs[0], &enc[&hs[0]]).unwrap();
    let landed = AtomicU64::new(0);
    let bytes = e
        .fetch_all(&hs, Urgency::Background, &|n| {
            landed.fetch_add(n, Ordering::SeqCst);
        })
        .unwrap();
    let expected: u64 = hs[1..].iter().map(|h| enc[h].len() as u64).sum();
    assert_eq!(bytes, expected);
    assert!(!src.asked.lock().unwrap().contains_key(&hs[0]), "a cached block does not travel");
    assert!(hs.iter().all(|h| cache.contains(h)));
    assert_eq!(e.snapshot().background_blocks, 39);
}

#[test]
fn blocks_named_ahead_are_decoded_into_memory_and_a_damaged_one_is_never_served() {
    // Offline, as a warm mount's reader may be: only the local cache has blocks.
    let (hs, raw, enc) = blocks(32);
    let cache = Arc::new(MemCache::default());
    for h in &hs {
        cache.blocks.lock().unwrap().insert(*h, enc[h].clone());
    }
    let damaged = Hash::of(b"a block whose stored bytes were altered");
    cache.blocks.lock().unwrap().insert(damaged, enc[&hs[0]].clone());
    let cfg = EngineConfig { source_label: "test source".into(), verify_threads: 2, ..EngineConfig::default() };
    let e = Engine::new(cache.clone(), None, cfg);
    let mut named = hs.clone();
    named.push(damaged);
    e.decode_ahead(&named);
    let deadline = Instant::now() + Duration::from_secs(10);
    // A block is counted after its cache read: wait for both (a damaged block counted by
    // mistake would show as one more).
    while (cache.gets.load(Ordering::SeqCst) < named.len() as u64 || e.snapshot().decoded_ahead < hs.len() as u64) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(e.snapshot().decoded_ahead, hs.len() as u64, "every sound block decoded ahead, the damaged one not");
    let read_back = cache.gets.load(Ordering::SeqCst);
    for h in &hs {
        let got = e.get(std::slice::from_ref(h), &[], Urgency::Demand, 0).unwrap();
        assert_eq!(*got[0], raw[h]);
    }
    assert_eq!(cache.gets.load(Ordering::SeqCst), read_back, "the reader decoded blocks again instead of finding them in memory");
    assert!(e.get(&[damaged], &[], Urgency::Demand, 0).is_err(), "a damaged block must fail its read, never serve other bytes");
    // Named again, blocks in memory are not decoded again.
    e.decode_ahead(&hs);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(e.snapshot().decoded_ahead, hs.len() as u64);
}
