//! What `.capsule/stats.json` and `.capsule/metadata` read: a mount's counters, and the
//! map completed on demand (before a commit or suspend).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tracing::error;

use super::*;

/// `.capsule/stats.json`: a mount's counters (what `capsule status --json` prints of a
/// mount, and what `status --watch` samples).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountStats {
    pub capsule: String,
    pub id: String,
    pub source: String,
    /// `remote` or `local`.
    pub link: String,
    pub blocks_fetched: u64,
    pub bytes_fetched: u64,
    pub reconnects: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub reads_in_flight: u64,
    pub read_errors: u64,
    pub bytes_written: u64,
    pub seed_blocks: u64,
    pub fetch: FetchStats,
    pub cache_bytes: u64,
    pub cache_unpinned_bytes: u64,
    pub files: BTreeMap<String, FileStats>,
}

/// The fetch engine's part of [`MountStats`]: the engine's own view, and the map pages
/// the mount fetched.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchStats {
    #[serde(flatten)]
    pub engine: capsule_fetch::engine::EngineSnapshot,
    pub map_pages_fetched: u64,
}

/// One image file of [`MountStats`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileStats {
    pub blocks: u64,
    pub block_size: u64,
    pub resident_blocks: u64,
    pub resident_pct: f64,
    pub dirty_blocks: u64,
    pub fetched_blocks: u64,
    pub fetched_bytes: u64,
}

impl CapsuleFs {
    /// `.capsule/stats.json`.
    pub fn mount_stats(&self) -> MountStats {
        const STATS_SAMPLE: u64 = 1 << 16;
        let s = &self.stats;
        let snap = self.engine.snapshot();
        let mut files = BTreeMap::new();
        for (tag, node) in self.nodes.iter().enumerate() {
            if let Content::Image { image, chain, overlay, .. } = &node.content {
                let n = image.block_count();
                // A lookup per block costs minutes on a huge image (a capsule from elsewhere
                // chooses the size): beyond STATS_SAMPLE blocks, evenly spaced samples.
                let step = n.div_ceil(STATS_SAMPLE).max(1);
                let (mut resident, mut looked) = (0u64, 0u64);
                for i in (0..n).step_by(step as usize) {
                    // The store's pages only: counting must not fetch a map.
                    let local = overlay.as_ref().is_some_and(|o| o.state(i) != crate::overlay::NONE)
                        || match capsule_images::image::resolve_chain(self.cache.store(), chain, i) {
                            Ok(None) => true,
                            Ok(Some(h)) => self.cache.contains(&h),
                            Err(_) => false,
                        };
                    resident += u64::from(local);
                    looked += 1;
                }
                if step > 1 {
                    resident = (resident as f64 * n as f64 / looked.max(1) as f64).round() as u64;
                }
                let dirty = overlay.as_ref().map_or(0, |o| o.changed_count());
                let fetched = self.engine.fetched_by_tag(tag as u32);
                files.insert(
                    node.name.clone(),
                    FileStats {
                        blocks: n,
                        block_size: image.block_size(),
                        resident_blocks: resident,
                        resident_pct: if n == 0 { 100.0 } else { resident as f64 * 100.0 / n as f64 },
                        dirty_blocks: dirty as u64,
                        fetched_blocks: fetched,
                        fetched_bytes: fetched * image.block_size(),
                    },
                );
            }
        }
        MountStats {
            capsule: self.info.name.clone(),
            id: self.info.capsule_id.to_hex(),
            source: self.info.source.clone(),
            link: if self.engine.is_online() { "remote" } else { "local" }.to_string(),
            blocks_fetched: snap.source.blocks,
            bytes_fetched: snap.source.bytes,
            reconnects: snap.source.reconnects,
            cache_hits: snap.local_hits,
            cache_misses: snap.misses,
            reads_in_flight: s.reads_in_flight.load(Ordering::Relaxed),
            read_errors: s.read_errors.load(Ordering::Relaxed),
            bytes_written: s.bytes_written.load(Ordering::Relaxed),
            seed_blocks: self.local.seed_blocks.load(Ordering::Relaxed),
            fetch: FetchStats { engine: snap, map_pages_fetched: self.pages.fetched.load(Ordering::Relaxed) },
            cache_bytes: self.cache.used_bytes(),
            cache_unpinned_bytes: self.cache.unpinned_bytes(),
            files,
        }
    }

    /// Fetches the map pages of the capsule and its ancestors that the cache lacks.
    fn complete_metadata(&self) -> Result<u64> {
        let store = self.cache.store();
        let mut roots = Vec::new();
        let mut next = Some(self.info.capsule_id);
        let mut generations = 0;
        while let Some(id) = next {
            generations += 1;
            if generations > capsule_images::manifest::MAX_CHAIN {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("capsule {}: ancestry longer than {}", self.info.capsule_id, capsule_images::manifest::MAX_CHAIN),
                ));
            }
            let m = store.manifest(&id)?;
            for (_, image) in m.images() {
                let reader = capsule_images::ImageReader::open(store, image)?;
                roots.extend(reader.chain().iter().filter_map(|(_, l)| l.map.root));
            }
            next = m.parent;
        }
        Ok(self.pages.complete(roots)?)
    }

    /// What a handle of `.capsule/stats.json` or `.capsule/metadata` reads: one document
    /// per handle, however many reads it takes (opening `metadata` completes the map).
    pub(super) fn snapshot_bytes(&self, ino: u64) -> Result<Vec<u8>> {
        if ino == STATS {
            return Ok(serde_json::to_vec_pretty(&self.mount_stats()).unwrap_or_default());
        }
        match self.complete_metadata() {
            Ok(pages) => Ok(serde_json::to_vec(&serde_json::json!({"complete": true, "pages_fetched": pages})).unwrap_or_default()),
            Err(e) => {
                error!("completing the metadata of {}: {}", self.info.capsule_id, e.report());
                Err(e)
            }
        }
    }
}
