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

/// LRU bookkeeping: access sequence -> block, and block -> (sequence, file size).
#[derive(Debug, Default)]
struct Lru {
    next_seq: u64,
    by_seq: BTreeMap<u64, Hash>,
    by_hash: HashMap<Hash, (u64, u64)>,
    total: u64,
}

impl Lru {
    fn touch(&mut self, h: Hash, size: u64) {
        if let Some((seq, old)) = self.by_hash.remove(&h) {
            self.by_seq.remove(&seq);
            self.total -= old;
        }
        self.next_seq += 1;
        self.by_seq.insert(self.next_seq, h);
        self.by_hash.insert(h, (self.next_seq, size));
        self.total += size;
    }

    fn remove(&mut self, h: &Hash) {
        if let Some((seq, size)) = self.by_hash.remove(h) {
            self.by_seq.remove(&seq);
            self.total -= size;
        }
    }
}

/// A size-bounded, verified, persistent block cache.
#[derive(Debug)]
pub struct BlockCache {
    store: Store,
    max_bytes: u64,
    lru: Mutex<Lru>,
}

impl BlockCache {
    /// Opens the cache at `dir`; blocks already there count, oldest modification first.
    pub fn open(dir: &Path, max_bytes: u64) -> capsule_images::Result<Self> {
        let store = Store::open(dir)?;
        let mut found = Vec::new();
        for (path, h) in store.list_dir_hashes("blocks")? {
            if let Ok(meta) = std::fs::metadata(&path) {
                let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
                found.push((mtime, h, meta.len()));
            }
        }
        found.sort();
        let mut lru = Lru::default();
        for (_, h, size) in found {
            lru.touch(h, size);
        }
        let cache = Self { store, max_bytes, lru: Mutex::new(lru) };
        cache.evict();
        Ok(cache)
    }

    /// The store behind the cache (metadata lives there too).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Bytes of block files held.
    pub fn used_bytes(&self) -> u64 {
        self.lru.lock().map(|l| l.total).unwrap_or(0)
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
        let target = self.used_bytes().saturating_sub(bytes);
        let before = self.used_bytes();
        self.evict_to(target);
        before - self.used_bytes()
    }

    /// Removes least recently used blocks until the cache fits its bound.
    fn evict(&self) {
        self.evict_to(self.max_bytes);
    }

    fn evict_to(&self, limit: u64) {
        let Ok(mut lru) = self.lru.lock() else { return };
        while lru.total > limit {
            let Some((&seq, &h)) = lru.by_seq.iter().next() else { break };
            lru.by_seq.remove(&seq);
            if let Some((_, size)) = lru.by_hash.remove(&h) {
                lru.total -= size;
            }
            if let Err(e) = std::fs::remove_file(self.store.block_path(&h)) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!("cache: cannot evict block {h}: {e}");
                }
            }
        }
    }
}
