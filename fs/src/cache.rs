//! The machine's block cache: an `images::Store` (content-addressed, verified on every
//! read, atomic writes) shared by all mounts, bounded by size with LRU eviction.
//!
//! Metadata objects (manifests, layers, map pages) live in the same store and are never
//! evicted; unsaved writes live in the copy-on-write overlays, outside the block files, so
//! eviction can never lose them. A block the cache holds is served only after its hash
//! verifies; a damaged one is dropped and fetched again.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use capsule_images::{Hash, Store};
use tracing::warn;

/// LRU bookkeeping: access sequence -> block, and block -> (sequence, file size), with
/// the pins, so that the bound applies to unpinned blocks only.
#[derive(Debug)]
struct Lru {
    next_seq: u64,
    by_seq: BTreeMap<u64, Hash>,
    by_hash: HashMap<Hash, (u64, u64)>,
    total: u64,
    pinned_total: u64,
    pins: crate::pins::PinSet,
}

impl Lru {
    fn touch(&mut self, h: Hash, size: u64) {
        self.remove(&h);
        self.next_seq += 1;
        self.by_seq.insert(self.next_seq, h);
        self.by_hash.insert(h, (self.next_seq, size));
        self.total += size;
        if self.pins.contains(&h) {
            self.pinned_total += size;
        }
    }

    fn remove(&mut self, h: &Hash) {
        if let Some((seq, size)) = self.by_hash.remove(h) {
            self.by_seq.remove(&seq);
            self.total -= size;
            if self.pins.contains(h) {
                self.pinned_total -= size;
            }
        }
    }

    /// Re-reads the pins if they changed, and recounts the pinned bytes.
    fn refresh_pins(&mut self) {
        if self.pins.refresh() {
            self.pinned_total = self.by_hash.iter().filter(|(h, _)| self.pins.contains(h)).map(|(_, e)| e.1).sum();
        }
    }
}

/// A size-bounded, verified, persistent block cache.
#[derive(Debug)]
pub struct BlockCache {
    store: Store,
    max_bytes: u64,
    lru: Mutex<Lru>,
    /// False over a local store (`over_store`): its blocks may be their only copy, so
    /// nothing is ever evicted or deleted, and writes stay durable.
    evictable: bool,
}

impl BlockCache {
    /// Opens the cache at `dir`; blocks already there count, oldest modification first.
    pub fn open(dir: &Path, max_bytes: u64) -> capsule_images::Result<Self> {
        let store = Store::open(dir)?;
        // A cached block is verified on every read: one torn by a crash is fetched again,
        // so the cache skips a per-block fsync (it dominated cold reads).
        store.set_durable(false);
        store.set_trust_existing(true);
        let mut found = Vec::new();
        for (path, h) in store.list_dir_hashes("blocks")? {
            if let Ok(meta) = std::fs::metadata(&path) {
                let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
                found.push((mtime, h, meta.len()));
            }
        }
        found.sort();
        let mut pins = crate::pins::PinSet::new(dir);
        pins.refresh();
        let mut lru = Lru { next_seq: 0, by_seq: BTreeMap::new(), by_hash: HashMap::new(), total: 0, pinned_total: 0, pins };
        for (_, h, size) in found {
            lru.touch(h, size);
        }
        let cache = Self { store, max_bytes, lru: Mutex::new(lru), evictable: true };
        cache.evict();
        Ok(cache)
    }

    /// A mount's view of the local store at `dir` (a mount of a local capsule): blocks are
    /// read verified as from a cache, but none is ever evicted or deleted, on a full disk
    /// or a damaged read alike, and the store's writes keep their fsyncs.
    pub fn over_store(dir: &Path) -> capsule_images::Result<Self> {
        let store = Store::open(dir)?;
        let mut pins = crate::pins::PinSet::new(dir);
        pins.refresh();
        let lru = Lru { next_seq: 0, by_seq: BTreeMap::new(), by_hash: HashMap::new(), total: 0, pinned_total: 0, pins };
        Ok(Self { store, max_bytes: u64::MAX, lru: Mutex::new(lru), evictable: false })
    }

    /// The store behind the cache (metadata lives there too).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Bytes of block files held.
    pub fn used_bytes(&self) -> u64 {
        self.lru.lock().map(|l| l.total).unwrap_or(0)
    }

    /// Bytes of unpinned block files held (what `--cache-size` bounds).
    pub fn unpinned_bytes(&self) -> u64 {
        self.lru.lock().map(|l| l.total - l.pinned_total).unwrap_or(0)
    }

    /// True if the block is present (unverified).
    pub fn contains(&self, h: &Hash) -> bool {
        self.lru.lock().map(|l| l.by_hash.contains_key(h)).unwrap_or(false) || self.store.has_block(h)
    }

    /// The block's raw bytes if the cache holds a copy that verifies.
    pub fn get(&self, h: &Hash) -> Option<Vec<u8>> {
        match self.store.get_block(h) {
            Ok(data) => {
                let size = self.store.block_stored_size(h).unwrap_or(data.len() as u64);
                if let Ok(mut lru) = self.lru.lock() {
                    lru.touch(*h, size);
                }
                Some(data)
            }
            Err(e) if e.kind() == capsule_images::ErrorKind::NotFound => None,
            Err(e) if !self.evictable => {
                warn!("store: damaged block {h} (kept for inspection; `capsule verify` names its capsules): {e}");
                None
            }
            Err(e) => {
                warn!("cache: dropping damaged block {h}: {e}");
                let _ = std::fs::remove_file(self.store.block_path(h));
                if let Ok(mut lru) = self.lru.lock() {
                    lru.remove(h);
                }
                None
            }
        }
    }

    /// Keeps an encoded block the caller verified against `h`, then evicts down to the bound.
    pub fn insert_verified(&self, h: &Hash, encoded: &[u8]) -> capsule_images::Result<()> {
        self.store.put_verified_block(h, encoded)?;
        if let Ok(mut lru) = self.lru.lock() {
            lru.touch(*h, encoded.len() as u64);
        }
        self.evict();
        Ok(())
    }

    /// Evicts least recently used blocks worth at least `bytes` (a full disk needs room
    /// for unsaved writes more than it needs cached blocks). Returns what was freed.
    pub fn free(&self, bytes: u64) -> u64 {
        let before = self.used_bytes();
        self.evict_to(self.unpinned_bytes().saturating_sub(bytes));
        before - self.used_bytes()
    }

    /// Removes least recently used blocks until the cache fits its bound.
    fn evict(&self) {
        self.evict_to(self.max_bytes);
    }

    /// Evicts least recently used unpinned blocks until unpinned bytes fit `limit`.
    fn evict_to(&self, limit: u64) {
        if !self.evictable {
            return;
        }
        let Ok(mut lru) = self.lru.lock() else { return };
        lru.refresh_pins();
        if lru.total - lru.pinned_total <= limit {
            return;
        }
        let victims: Vec<(u64, Hash)> = {
            let mut over = lru.total - lru.pinned_total - limit;
            let mut v = Vec::new();
            for (&seq, h) in &lru.by_seq {
                if over == 0 {
                    break;
                }
                if lru.pins.contains(h) {
                    continue;
                }
                let size = lru.by_hash.get(h).map_or(0, |e| e.1);
                over = over.saturating_sub(size);
                v.push((seq, *h));
            }
            v
        };
        for (_, h) in victims {
            lru.remove(&h);
            if let Err(e) = std::fs::remove_file(self.store.block_path(&h)) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!("cache: cannot evict block {h}: {e}");
                }
            }
        }
    }
}
