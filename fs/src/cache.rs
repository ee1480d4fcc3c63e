//! The machine's block cache, shared by all mounts: blocks in pack files (`pack`),
//! verified on every read, bounded by size with LRU eviction; metadata in an
//! `images::Store` beside them.
//!
//! Metadata objects (manifests, layers, map pages) live in the same store and are never
//! evicted; unsaved writes live in the copy-on-write overlays, outside the block files, so
//! eviction can never lose them. A block the cache holds is served only after its hash
//! verifies; a damaged one is dropped and fetched again.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use capsule_images::{Hash, Store};
use tracing::warn;

use crate::pack::PackCache;

/// Where the blocks are.
#[derive(Debug)]
enum Blocks {
    /// A cache: pack files, evictable, bounded.
    Packs(Box<PackCache>),
    /// A local store (`over_store`): its blocks may be their only copy, so nothing is ever
    /// evicted or deleted, and writes stay durable. Sizes of the blocks seen, for stats.
    Store(Mutex<HashMap<Hash, u64>>),
}

/// A size-bounded, verified, persistent block cache.
#[derive(Debug)]
pub struct BlockCache {
    store: Store,
    max_bytes: u64,
    blocks: Blocks,
}

impl BlockCache {
    /// Opens the cache at `dir`: its packs indexed, block files an earlier version left
    /// moved into packs.
    pub fn open(dir: &Path, max_bytes: u64) -> capsule_images::Result<Self> {
        let store = Store::open(dir)?;
        // Metadata only now; a cached object is verified on every read.
        store.set_durable(false);
        store.set_trust_existing(true);
        let packs = PackCache::open(dir, max_bytes)?;
        for (path, h) in store.list_dir_hashes("blocks")? {
            if let Ok(encoded) = std::fs::read(&path) {
                if !packs.contains(&h) {
                    if let Err(e) = packs.insert(&h, &encoded) {
                        warn!("cache: cannot move block {h} into a pack: {}", e.report());
                        continue;
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        let cache = Self { store, max_bytes, blocks: Blocks::Packs(Box::new(packs)) };
        cache.evict();
        Ok(cache)
    }

    /// A mount's view of the local store at `dir` (a mount of a local capsule): blocks are
    /// read verified as from a cache, but none is ever evicted or deleted, on a full disk
    /// or a damaged read alike, and the store's writes keep their fsyncs.
    pub fn over_store(dir: &Path) -> capsule_images::Result<Self> {
        let store = Store::open(dir)?;
        Ok(Self { store, max_bytes: u64::MAX, blocks: Blocks::Store(Mutex::new(HashMap::new())) })
    }

    /// The store behind the cache (metadata lives there too).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Bytes of blocks held (pack files, or the store's blocks seen).
    pub fn used_bytes(&self) -> u64 {
        match &self.blocks {
            Blocks::Packs(p) => p.used_bytes(),
            Blocks::Store(seen) => seen.lock().map(|s| s.values().sum()).unwrap_or(0),
        }
    }

    /// Bytes of unpinned blocks held (what `--cache-size` bounds).
    pub fn unpinned_bytes(&self) -> u64 {
        match &self.blocks {
            Blocks::Packs(p) => p.unpinned_bytes(),
            Blocks::Store(_) => self.used_bytes(),
        }
    }

    /// True if the block is present (unverified).
    pub fn contains(&self, h: &Hash) -> bool {
        match &self.blocks {
            Blocks::Packs(p) => p.contains(h),
            Blocks::Store(seen) => seen.lock().map(|s| s.contains_key(h)).unwrap_or(false) || self.store.has_block(h),
        }
    }

    /// The block's raw bytes if the cache holds a copy that verifies.
    pub fn get(&self, h: &Hash) -> Option<Vec<u8>> {
        match &self.blocks {
            Blocks::Packs(p) => {
                let encoded = p.get_encoded(h)?;
                match capsule_images::block::decode(h, &encoded) {
                    Ok(raw) => Some(raw),
                    Err(e) => {
                        warn!("cache: dropping damaged block {h}: {}", e.report());
                        p.drop_damaged(h);
                        None
                    }
                }
            }
            // The encoded length is the stored size: no second stat per read.
            Blocks::Store(seen) => match self.store.read_verified_block(h) {
                Ok((data, size)) => {
                    if let Ok(mut s) = seen.lock() {
                        s.insert(*h, size);
                    }
                    Some(data)
                }
                Err(e) if e.kind() == capsule_images::ErrorKind::NotFound => None,
                Err(e) => {
                    warn!("store: block {h} does not verify; fetching it again: {e}");
                    None
                }
            },
        }
    }

    /// Keeps an encoded block the caller verified against `h`, then evicts down to the bound.
    pub fn insert_verified(&self, h: &Hash, encoded: &[u8]) -> capsule_images::Result<()> {
        match &self.blocks {
            Blocks::Packs(p) => p.insert(h, encoded),
            Blocks::Store(seen) => {
                self.store.put_verified_block(h, encoded)?;
                if let Ok(mut s) = seen.lock() {
                    s.insert(*h, encoded.len() as u64);
                }
                Ok(())
            }
        }
    }

    /// Forgets blocks in packs other processes evicted since the last look, so a read
    /// that must prove a block is on disk is not served through a descriptor of a pack
    /// file that is gone.
    pub fn rescan(&self) {
        if let Blocks::Packs(p) = &self.blocks {
            p.rescan_now();
        }
    }

    /// Evicts least recently used blocks worth at least `bytes` (a full disk needs room
    /// for unsaved writes more than it needs cached blocks). Returns what was freed.
    pub fn free(&self, bytes: u64) -> u64 {
        let before = self.used_bytes();
        self.evict_to(self.unpinned_bytes().saturating_sub(bytes));
        before.saturating_sub(self.used_bytes())
    }

    /// Removes least recently used blocks until the cache fits its bound.
    fn evict(&self) {
        self.evict_to(self.max_bytes);
    }

    /// Evicts least recently used unpinned blocks until unpinned bytes fit `limit`.
    fn evict_to(&self, limit: u64) {
        if let Blocks::Packs(p) = &self.blocks {
            p.evict_to(limit);
        }
    }
}
