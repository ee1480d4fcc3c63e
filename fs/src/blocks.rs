//! What the fetch engine gets from this crate: the machine's cache and the seeds as one
//! [`LocalBlocks`], and map pages fetched from the source when a read first needs them
//! ([`LazyPages`]), so a mount of a large sparse disk starts after a few round trips
//! instead of after fetching its whole map.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use capsule_fetch::{BlockSource, Engine, LocalBlocks, PathReply};
use capsule_images::envelope::ObjectKind;
use capsule_images::error::ResultExt;
use capsule_images::manifest::Layer;
use capsule_images::map::{Entry, MapPage, MapRoot, PageSource, Step, FANOUT_BITS};
use capsule_images::{Hash, Store};
use tracing::warn;

use crate::cache::BlockCache;
use crate::seed::Seeds;

/// The cache, then the seeds (a seed's block is cached when first used).
#[derive(Debug)]
pub struct CacheBlocks {
    cache: Arc<BlockCache>,
    seeds: Seeds,
    /// Blocks taken from seeds.
    pub seed_blocks: AtomicU64,
}

impl CacheBlocks {
    /// The cache with these seeds.
    pub fn new(cache: Arc<BlockCache>, seeds: Seeds) -> Self {
        Self { cache, seeds, seed_blocks: AtomicU64::new(0) }
    }
}

impl CacheBlocks {
    /// A block's plaintext from a seed by its plaintext hash (a sealed block's: its stored
    /// name is its ciphertext's hash, which no seed indexes).
    pub fn seed(&self, plain: &Hash) -> Option<Vec<u8>> {
        let raw = self.seeds.get(plain)?;
        self.seed_blocks.fetch_add(1, Ordering::Relaxed);
        Some(raw)
    }

    /// True if a seed was indexed with this plaintext hash.
    pub fn seed_has(&self, plain: &Hash) -> bool {
        self.seeds.contains(plain)
    }

    /// True if no seed was given.
    pub fn seeds_empty(&self) -> bool {
        self.seeds.is_empty()
    }
}

impl LocalBlocks for CacheBlocks {
    fn get(&self, hash: &Hash) -> Option<Vec<u8>> {
        if let Some(raw) = self.cache.get(hash) {
            return Some(raw);
        }
        let raw = self.seeds.get(hash)?;
        self.seed_blocks.fetch_add(1, Ordering::Relaxed);
        match capsule_images::block::encode(&raw) {
            Ok(encoded) => {
                if let Err(e) = self.cache.insert_verified(hash, &encoded) {
                    warn!("cannot cache seed block {hash}: {e}");
                }
            }
            Err(e) => warn!("cannot encode seed block {hash}: {e}"),
        }
        Some(raw)
    }

    fn contains(&self, hash: &Hash) -> bool {
        self.cache.contains(hash) || self.seeds.contains(hash)
    }

    fn insert_verified(&self, hash: &Hash, encoded: &[u8]) -> Result<(), String> {
        self.cache.insert_verified(hash, encoded).map_err(|e| e.to_string())
    }
}

/// Map pages from the store, else from the source (verified against their id and
/// checked before they are stored).
#[derive(Clone)]
pub struct LazyPages {
    cache: Arc<BlockCache>,
    source: Option<Arc<dyn BlockSource>>,
    /// Pages fetched.
    pub fetched: Arc<AtomicU64>,
}

impl std::fmt::Debug for LazyPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyPages").field("online", &self.source.is_some()).finish_non_exhaustive()
    }
}

impl LazyPages {
    /// Pages of the cache's store, fetched from `source` when missing.
    pub fn new(cache: Arc<BlockCache>, source: Option<Arc<dyn BlockSource>>) -> Self {
        Self { cache, source, fetched: Arc::new(AtomicU64::new(0)) }
    }

    fn store(&self) -> &Store {
        self.cache.store()
    }
}

impl PageSource for LazyPages {
    fn page(&self, id: &Hash) -> capsule_images::Result<Arc<MapPage>> {
        match self.store().page(id) {
            Err(e) if e.kind() == capsule_images::ErrorKind::NotFound => {
                let Some(source) = &self.source else { return Err(e) };
                let objects = source
                    .fetch_objects(&[*id])
                    .map_err(|f| capsule_images::Error::new(capsule_images::ErrorKind::Io, format!("fetching map page {id}: {f}")))?;
                let bytes = objects.into_iter().next().ok_or_else(|| capsule_images::Error::not_found(format!("the source sent no map page {id}")))?;
                self.fetched.fetch_add(1, Ordering::Relaxed);
                match self.store().put_encoded_object(ObjectKind::MapPage, id, &bytes) {
                    Ok(_) => self.store().page(id),
                    Err(e) if e.is_storage_full() => {
                        warn!("cannot cache map page {id}: {e}; keeping it in memory");
                        self.store().remember_page(id, &bytes)
                    }
                    Err(e) => Err(e),
                }
            }
            r => r,
        }
    }
}

impl LazyPages {
    /// What block `index` of an image is through `chain` (top first), as
    /// [`capsule_images::image::resolve_chain`]. Where the store lacks a page on the way
    /// and the source sends map paths, the missing part of the path comes in one request,
    /// with the block it leads to (offered to `engine`, which verifies it): the first read
    /// of a region costs one round trip, not one per tree level plus one for the block.
    pub fn resolve(&self, chain: &[(Hash, Layer)], index: u64, engine: Option<&Engine>) -> capsule_images::Result<Option<Hash>> {
        Ok(self.resolve_entry(chain, index, engine)?.and_then(|e| e.block()))
    }

    /// As [`LazyPages::resolve`], the whole entry (a sealed block's masked plaintext hash
    /// too); `None` when no layer maps it.
    pub fn resolve_entry(&self, chain: &[(Hash, Layer)], index: u64, engine: Option<&Engine>) -> capsule_images::Result<Option<Entry>> {
        for (id, layer) in chain {
            // The store's pages first (one walk on the read path); a missing page sends
            // for the rest of the path, then the walk goes again, page by page if need be.
            let entry = match capsule_images::map::lookup(self.store(), &layer.map, index) {
                Err(e) if e.kind() == capsule_images::ErrorKind::NotFound && self.source.is_some() => {
                    if let (Some(source), Some((sub_root, sub_index))) = (&self.source, self.first_missing(&layer.map, index)?) {
                        if let Some(Ok(reply)) = source.fetch_path(&sub_root, sub_index, engine.is_some(), &|h| engine.is_some_and(|e| !e.is_local(h))) {
                            self.keep_path(&sub_root, sub_index, reply, engine);
                        }
                    }
                    capsule_images::map::lookup(self, &layer.map, index)
                }
                r => r,
            };
            if let Some(e) = entry.with_context(|| format!("layer {id}, block {index}"))? {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    /// The highest page on the way to block `index` that the store lacks, as the root of
    /// its subtree, with the index within that subtree; `None` if every page is here.
    fn first_missing(&self, root: &MapRoot, index: u64) -> capsule_images::Result<Option<(MapRoot, u64)>> {
        let Some(mut page_id) = root.root else { return Ok(None) };
        for level in (0..u32::from(root.height)).rev() {
            // The store's page cache first: no file lookup per level on the read path.
            let page = match self.store().page(&page_id) {
                Err(e) if e.kind() == capsule_images::ErrorKind::NotFound => {
                    let bits = FANOUT_BITS * (level + 1);
                    let sub_index = if bits < 64 { index & ((1u64 << bits) - 1) } else { index };
                    return Ok(Some((MapRoot { height: (level + 1) as u8, root: Some(page_id) }, sub_index)));
                }
                r => r?,
            };
            match page.step(index, level) {
                Step::Page(child) => page_id = child,
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Stores the pages of a path reply that are the ones the lookup needs (each names
    /// the next; anything else is dropped) and offers the block it leads to.
    fn keep_path(&self, root: &MapRoot, index: u64, reply: PathReply, engine: Option<&Engine>) {
        let mut expected = root.root;
        let mut level = u32::from(root.height);
        let mut entry = None;
        for (id, bytes) in reply.pages {
            if expected != Some(id) || level == 0 {
                warn!("map path from the source strays at page {id}; fetching page by page");
                return;
            }
            level -= 1;
            if let Err(e) = self.store().put_encoded_object(ObjectKind::MapPage, &id, &bytes) {
                warn!("map page {id} from the source: {e}");
                return;
            }
            self.fetched.fetch_add(1, Ordering::Relaxed);
            let page = match self.store().page(&id) {
                Ok(p) => p,
                Err(e) => {
                    warn!("map page {id} from the source: {e}");
                    return;
                }
            };
            expected = match page.step(index, level) {
                Step::Page(child) => Some(child),
                Step::Entry(e) => {
                    entry = Some(e);
                    None
                }
                Step::Unmapped => None,
                Step::WrongType => return,
            };
        }
        if let (Some(engine), Some((hash, encoded)), Some(want)) = (engine, reply.block, entry.and_then(|e| e.block())) {
            if hash == want {
                engine.offer(&hash, &encoded);
            }
        }
    }

    /// Fetches every map page below `roots` that the store lacks, a tree level at a time
    /// (one request per level, not per page). Returns how many pages travelled. A commit
    /// needs this: the child names its parent, whose whole map must be here to push it.
    pub fn complete(&self, roots: Vec<Hash>) -> capsule_images::Result<u64> {
        const CHUNK: usize = 1024;
        let mut fetched = 0;
        let mut frontier = roots;
        let mut seen = std::collections::HashSet::new();
        while !frontier.is_empty() {
            frontier.retain(|h| seen.insert(*h));
            let missing: Vec<Hash> = frontier.iter().filter(|h| !self.store().has_object(h)).copied().collect();
            if let Some(source) = &self.source {
                for chunk in missing.chunks(CHUNK) {
                    let objects = source
                        .fetch_objects(chunk)
                        .map_err(|f| capsule_images::Error::new(capsule_images::ErrorKind::Io, format!("fetching map pages: {f}")))?;
                    if objects.len() != chunk.len() {
                        return Err(capsule_images::Error::corrupt(format!("asked for {} map pages, got {}", chunk.len(), objects.len())));
                    }
                    for (id, bytes) in chunk.iter().zip(objects) {
                        self.store().put_encoded_object(ObjectKind::MapPage, id, &bytes)?;
                        fetched += 1;
                    }
                }
            }
            let mut next = Vec::new();
            for id in &frontier {
                if let MapPage::Node(children) = &*self.store().page(id)? {
                    next.extend(children.iter().map(|(_, c)| *c));
                }
            }
            frontier = next;
        }
        self.fetched.fetch_add(fetched, Ordering::Relaxed);
        Ok(fetched)
    }
}
