//! gc: removes what no ref reaches, from block files and packs alike, and packs the
//! live block files.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;

use rustix::fs::{flock, FlockOperation};

use super::{GcStats, Store};
use crate::error::{Error, Result, ResultExt};
use crate::hash::Hash;
use crate::packed::{IndexEntry, Pack, PackWriter, DIR, MAX_PACK_BYTES};

/// Packs smaller than this are merged by gc.
const SMALL_PACK: u64 = 64 << 20;

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
    /// one) is written again without it, in its own order; packs under [`SMALL_PACK`]
    /// (one per import or pull) are merged, so lookups and open files stay few. Old packs
    /// go only once what replaces them is in place.
    pub(crate) fn gc_packs(&self, live: &HashSet<Hash>, stats: &mut GcStats) -> Result<()> {
        let (packs, _) = self.packs.all();
        let dir = self.root().join(DIR);
        let merge_small = packs.iter().filter(|p| p.bytes() < SMALL_PACK).count() > 1;
        let mut seen = HashSet::new();
        let (mut before, mut after) = (0u64, 0u64);
        let mut merged: Option<PackWriter> = None;
        // Small packs whose blocks the merged pack takes: removed once it is in place.
        let mut merged_away = Vec::new();
        // A pack is named by its index: a rewrite can land on the name of the pack it
        // replaces (the same blocks at the same offsets), which must then stay.
        let mut written = HashSet::new();
        for pack in packs {
            let mut keep: Vec<IndexEntry> = pack.entries.iter().filter(|e| live.contains(&e.hash) && seen.insert(e.hash)).copied().collect();
            let dead = pack.entries.len() - keep.len();
            let into_merged = merge_small && pack.bytes() < SMALL_PACK;
            if dead == 0 && !into_merged {
                continue;
            }
            keep.sort_by_key(|e| e.offset);
            before += pack.bytes();
            stats.blocks_removed += dead as u64;
            let mut own = None;
            let w = if into_merged { &mut merged } else { &mut own };
            for e in &keep {
                if w.is_none() {
                    *w = Some(PackWriter::create(&self.tmp_path())?);
                }
                let out = w.as_mut().expect("just created");
                out.add(&e.hash, &pack.read(e)?)?;
                if out.len() >= MAX_PACK_BYTES {
                    let full = w.take().expect("present");
                    after += full.len();
                    written.insert(full.finish(&dir)?);
                }
            }
            if into_merged {
                merged_away.push(pack);
                continue;
            }
            if let Some(out) = own {
                after += out.len();
                written.insert(out.finish(&dir)?);
            }
            remove_unless_written(&pack, &written)?;
        }
        if let Some(out) = merged {
            after += out.len();
            written.insert(out.finish(&dir)?);
        }
        for pack in merged_away {
            remove_unless_written(&pack, &written)?;
        }
        stats.bytes_freed += before.saturating_sub(after);
        self.packs.reload();
        Ok(())
    }
}

fn remove_unless_written(pack: &Pack, written: &HashSet<PathBuf>) -> Result<()> {
    if written.contains(pack.path()) {
        return Ok(());
    }
    fs::remove_file(pack.path()).map_err(|e| Error::io(pack.path().display(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::PackWriter;

    fn block(b: u8) -> (Hash, Vec<u8>) {
        let raw = vec![b; 4096];
        (Hash::of(&raw), crate::block::encode_with_level(&raw, 1).unwrap())
    }

    fn pack(store: &Store, blocks: &[(Hash, Vec<u8>)]) -> PathBuf {
        let mut w = PackWriter::create(&store.tmp_path()).unwrap();
        for (h, b) in blocks {
            w.add(h, b).unwrap();
        }
        w.finish(&store.root().join(DIR)).unwrap()
    }

    fn import(store: &Store, dir: &std::path::Path, name: &str, seeds: &[u8]) {
        let disk = dir.join(format!("{name}.raw"));
        fs::write(&disk, seeds.iter().map(|&b| vec![b; 4096]).collect::<Vec<_>>().concat()).unwrap();
        let spec = crate::CapsuleSpec { name: name.into(), disks: vec![("root".into(), disk)], block_size_log2: Some(12), ..Default::default() };
        crate::import_capsule(store, &spec, &crate::NoProgress).unwrap();
    }

    #[test]
    fn small_packs_are_merged_and_a_rewrite_landing_on_its_own_name_keeps_it() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().join("s")).unwrap();
        import(&store, d.path(), "a", &[1, 2, 3]);
        import(&store, d.path(), "b", &[4, 5]);
        // A third pack with a copy of a's blocks and one block nothing names: merged, its
        // copies dropped; a's pack rewritten alone would be named as before.
        let a_pack = store.packs.all().0.iter().find(|p| p.entries.len() == 3).unwrap().path().to_path_buf();
        pack(&store, &[block(1), block(2), block(3), block(9)]);
        assert_eq!(store.packs.all().0.len(), 3);
        let stats = store.gc().unwrap();
        assert_eq!((stats.blocks_kept, stats.blocks_removed), (5, 4), "{stats:?}");
        let (packs, broken) = store.packs.all();
        assert!(broken.is_empty() && packs.len() == 1, "merged into one: {packs:?}");
        assert_ne!(packs[0].path(), a_pack);
        for b in 1..=5u8 {
            assert_eq!(store.get_block(&block(b).0).unwrap(), vec![b; 4096], "block {b}");
        }
        assert!(!store.has_block(&block(9).0));

        // Two small packs: merging leaves the first's blocks where they were, so the merged
        // pack takes the first's name; the first must stay, the second (dead) go.
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().join("s")).unwrap();
        let kept = pack(&store, &[block(1), block(2)]);
        pack(&store, &[block(9)]);
        let live: HashSet<Hash> = [block(1).0, block(2).0].into();
        let mut stats = GcStats::default();
        store.gc_packs(&live, &mut stats).unwrap();
        let (packs, _) = store.packs.all();
        assert_eq!(packs.len(), 1);
        assert_eq!(packs[0].path(), kept, "the merged pack is the first, byte for byte");
        assert_eq!(store.get_block(&block(2).0).unwrap(), vec![2u8; 4096]);
    }
}
