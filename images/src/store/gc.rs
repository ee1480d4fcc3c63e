//! gc: removes what no ref reaches, from block files and packs alike, and packs the
//! live block files.

use std::collections::HashSet;
use std::fs;

use rustix::fs::{flock, FlockOperation};

use super::{GcStats, Store};
use crate::error::{Error, Result, ResultExt};
use crate::hash::Hash;
use crate::packed::{IndexEntry, PackWriter, DIR};

impl Store {
    /// Removes every block and object no ref reaches. Waits for other users of the store.
    pub fn gc(&self) -> Result<GcStats> {
        flock(&self.lock, FlockOperation::LockExclusive).map_err(|e| Error::io("store lock", e.into()))?;
        let result = self.gc_locked();
        let _ = flock(&self.lock, FlockOperation::LockShared);
        result
    }

    fn gc_locked(&self) -> Result<GcStats> {
        let mut live_objects = HashSet::new();
        let mut live_blocks = HashSet::new();
        // Live blocks in walk order, for packing the loose ones.
        let mut live_order = Vec::new();
        for (name, id) in self.list_refs()? {
            self.walk_capsule(
                &id,
                &mut |h| {
                    live_objects.insert(*h);
                    Ok(())
                },
                &mut |_, _, h| {
                    if live_blocks.insert(*h) {
                        live_order.push(*h);
                    }
                    Ok(())
                },
            )
            .with_context(|| format!("gc: ref {name} is damaged; nothing was removed"))?;
        }
        // Profiles of live capsules stay; their blocks are the capsules' own.
        let live_capsules: Vec<Hash> = live_objects.iter().copied().collect();
        for capsule in live_capsules {
            for (_, pid) in self.list_profiles(&capsule).unwrap_or_default() {
                live_objects.insert(pid);
            }
        }
        let mut stats = GcStats::default();
        for (dir, live, removed) in [("blocks", &live_blocks, &mut stats.blocks_removed), ("objects", &live_objects, &mut stats.objects_removed)] {
            for (path, h) in self.list_dir_hashes(dir)? {
                if live.contains(&h) {
                    continue;
                }
                let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path).map_err(|e| Error::io(path.display(), e))?;
                *removed += 1;
                stats.bytes_freed += len;
            }
        }
        self.gc_packs(&live_blocks, &mut stats)?;
        stats.blocks_packed = self.pack_loose(live_order, true)?.blocks;
        stats.blocks_kept = live_blocks.iter().filter(|h| self.has_block(h)).count() as u64;
        Self::clear_tmp(&self.root)?;
        self.sync()?;
        Ok(stats)
    }

    /// gc's part in the packs: a pack holding a block no ref reaches (or a second copy of
    /// one) is written again without it, in its own order, and the old pack removed.
    pub(crate) fn gc_packs(&self, live: &HashSet<Hash>, stats: &mut crate::store::GcStats) -> Result<()> {
        let (packs, _) = self.packs.all();
        let dir = self.root().join(DIR);
        let mut seen = HashSet::new();
        for pack in packs {
            let mut keep: Vec<IndexEntry> = pack.entries.iter().filter(|e| live.contains(&e.hash) && seen.insert(e.hash)).copied().collect();
            let dead = pack.entries.len() - keep.len();
            if dead == 0 {
                continue;
            }
            let before = pack.bytes();
            let mut after = 0;
            if !keep.is_empty() {
                keep.sort_by_key(|e| e.offset);
                let mut w = PackWriter::create(&self.tmp_path())?;
                for e in &keep {
                    w.add(&e.hash, &pack.read(e)?)?;
                }
                after = w.len();
                w.finish(&dir)?;
            }
            fs::remove_file(pack.path()).map_err(|e| Error::io(pack.path().display(), e))?;
            stats.blocks_removed += dead as u64;
            stats.bytes_freed += before.saturating_sub(after);
        }
        self.packs.reload();
        Ok(())
    }
}
