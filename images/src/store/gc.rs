//! gc: removes what no ref reaches, from block files and packs alike, and packs the
//! live block files.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use rustix::fs::{flock, FlockOperation};

use super::{GcStats, Store};
use crate::error::{Error, Result, ResultExt};
use crate::hash::Hash;
use crate::packed::{IndexEntry, Pack};

/// Packs smaller than this are merged by gc (and by `merge_small_packs`).
pub(crate) const SMALL_PACK: u64 = 64 << 20;

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
            let (objects, blocks) = self.closure(&id).with_context(|| format!("gc: ref {name} is damaged; nothing was removed"))?;
            live_objects.extend(objects);
            live_order.extend(blocks.into_iter().filter(|h| live_blocks.insert(*h)));
        }
        // Profiles of live capsules stay; their blocks are the capsules' own.
        let live_capsules: Vec<Hash> = live_objects.iter().copied().collect();
        for capsule in live_capsules {
            for (_, pid) in self.list_profiles(&capsule).unwrap_or_default() {
                live_objects.insert(pid);
            }
        }
        let mut stats = GcStats::default();
        // The block files that stay, for the packs' pass (listed once).
        let mut loose = HashSet::new();
        for (dir, live, removed) in [("blocks", &live_blocks, &mut stats.blocks_removed), ("objects", &live_objects, &mut stats.objects_removed)] {
            for (path, h) in self.list_dir_hashes(dir)? {
                if live.contains(&h) {
                    if dir == "blocks" {
                        loose.insert(h);
                    }
                    continue;
                }
                let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path).map_err(|e| Error::io(path.display(), e))?;
                *removed += 1;
                stats.bytes_freed += len;
            }
        }
        self.gc_packs(Some(FullGc { live: &live_blocks, loose: &loose }), &mut stats)?;
        stats.blocks_packed = self.pack_loose(live_order, true)?.blocks;
        stats.blocks_kept = live_blocks.iter().filter(|h| self.has_block(h)).count() as u64;
        Self::clear_tmp(&self.root)?;
        self.sync()?;
        Ok(stats)
    }

    /// gc's part in the packs: a pack holding a block no ref reaches (or a second copy of
    /// one) is written again without it, in its own order; packs under [`SMALL_PACK`]
    /// (one per import, pull or upload) are merged, so lookups and open files stay few.
    /// Each block copied is checked: a second copy goes only if a sound one stays, and a
    /// block with no sound copy keeps its damaged one as it is. The old packs go only once
    /// everything that replaces them is in place.
    pub(crate) fn gc_packs(&self, full: Option<FullGc<'_>>, stats: &mut GcStats) -> Result<()> {
        let is_live = |h: &Hash| full.as_ref().is_none_or(|f| f.live.contains(h));
        let (packs, _) = self.packs.all();
        let merge_small = packs.iter().filter(|p| p.bytes() < SMALL_PACK).count() > 1;
        // Where each block's kept copy is, and whether it was checked sound.
        let mut kept: HashMap<Hash, (Arc<Pack>, bool)> = HashMap::new();
        // Damaged copies of blocks that may have no sound one: written last if so.
        let mut damaged: Vec<(Hash, Vec<u8>)> = Vec::new();
        let mut before = 0u64;
        let mut merged = self.pack_batch();
        let mut replaced = Vec::new();
        // A pack is named by its index: a rewrite can land on the name of the pack it
        // replaces (the same blocks at the same offsets), which must then stay.
        let mut written = HashSet::new();
        // Block files beside packed copies (stored again after a read found the packed copy
        // damaged): in a full gc, such a copy is checked and goes if damaged.
        let no_files = HashSet::new();
        let loose = full.as_ref().map_or(&no_files, |f| f.loose);
        for pack in packs {
            let dead = pack.entries.iter().filter(|e| !is_live(&e.hash)).count();
            let copies = pack.entries.iter().filter(|e| kept.contains_key(&e.hash)).count();
            let into_merged = merge_small && pack.bytes() < SMALL_PACK;
            let damaged_beside_file = pack.entries.iter().any(|e| loose.contains(&e.hash) && pack.read_decoded(e).is_err());
            if dead == 0 && copies == 0 && !into_merged && !damaged_beside_file {
                for e in &pack.entries {
                    kept.insert(e.hash, (pack.clone(), false));
                }
                continue;
            }
            let mut entries: Vec<IndexEntry> = pack.entries.iter().filter(|e| is_live(&e.hash)).copied().collect();
            entries.sort_by_key(|e| e.offset);
            before += pack.bytes();
            stats.blocks_removed += dead as u64;
            let mut own = self.pack_batch();
            for e in &entries {
                if let Some((other, checked)) = kept.get_mut(&e.hash) {
                    if *checked || other.holds_sound(&e.hash) {
                        *checked = true;
                        continue;
                    }
                }
                let encoded = pack.read(e)?;
                if crate::block::decode(&e.hash, &encoded).is_err() {
                    tracing::warn!("gc: block {} in {} is damaged", e.hash, pack.path().display());
                    damaged.push((e.hash, encoded));
                    continue;
                }
                (if into_merged { &mut merged } else { &mut own }).add(&e.hash, &encoded)?;
                kept.insert(e.hash, (pack.clone(), true));
            }
            written.extend(own.finish_packs()?.1);
            replaced.push(pack);
        }
        for (h, encoded) in damaged {
            let sound_file = loose.contains(&h) && self.existing_block_sound(&h, &self.block_path(&h));
            if !kept.contains_key(&h) && !sound_file {
                merged.add(&h, &encoded)?;
            }
        }
        written.extend(merged.finish_packs()?.1);
        for pack in replaced {
            remove_unless_written(&pack, &written)?;
        }
        let after: u64 = written.iter().map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
        stats.bytes_freed += before.saturating_sub(after);
        self.packs.reload();
        Ok(())
    }
}

/// What a full gc knows when it reaches the packs.
pub(crate) struct FullGc<'a> {
    /// Blocks some ref reaches.
    pub live: &'a HashSet<Hash>,
    /// Block files that stay.
    pub loose: &'a HashSet<Hash>,
}

/// Removes `pack` unless a rewrite landed on its name (the same blocks at the same offsets).
pub(super) fn remove_unless_written(pack: &Pack, written: &HashSet<PathBuf>) -> Result<()> {
    if written.contains(pack.path()) {
        return Ok(());
    }
    fs::remove_file(pack.path()).map_err(|e| Error::io(pack.path().display(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::{PackWriter, DIR};

    fn block(b: u8) -> (Hash, Vec<u8>) {
        let raw = vec![b; 4096];
        (Hash::of(&raw), crate::block::encode_with_level(&raw, 1).unwrap())
    }

    fn pack(store: &Store, blocks: &[(Hash, Vec<u8>)]) -> PathBuf {
        let mut w = PackWriter::create(&crate::store::unique_tmp(store.root())).unwrap();
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
        // One block no ref reaches; the copies of a's blocks are not blocks removed.
        assert_eq!((stats.blocks_kept, stats.blocks_removed), (5, 1), "{stats:?}");
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
        store.gc_packs(Some(FullGc { live: &live, loose: &HashSet::new() }), &mut stats).unwrap();
        let (packs, _) = store.packs.all();
        assert_eq!(packs.len(), 1);
        assert_eq!(packs[0].path(), kept, "the merged pack is the first, byte for byte");
        assert_eq!(store.get_block(&block(2).0).unwrap(), vec![2u8; 4096]);
    }

    #[test]
    fn gc_keeps_a_second_copy_when_the_first_is_damaged() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().join("s")).unwrap();
        import(&store, d.path(), "a", &[1, 2]);
        // A second pack holding another copy of block 1 and a block no ref reaches.
        pack(&store, &[block(1), block(9)]);
        // Damage block 1 in whichever pack gc meets first (packs are listed by name).
        let (packs, _) = store.packs.all();
        let first = &packs[0];
        let e = first.entries.iter().find(|e| e.hash == block(1).0).unwrap();
        let mut bytes = fs::read(first.path()).unwrap();
        bytes[e.offset as usize + 10] ^= 0x55;
        fs::write(first.path(), &bytes).unwrap();
        // gc waits for every other handle on the store: none may stay open.
        drop((packs, store));
        let store = Store::open(d.path().join("s")).unwrap();
        store.gc().unwrap();
        let (packs, _) = store.packs.all();
        let sound_copies = packs.iter().filter(|p| p.holds_sound(&block(1).0)).count();
        assert_eq!(sound_copies, 1, "the sound copy of block 1 must survive gc");
        assert!(!store.has_block(&block(9).0));
        assert_eq!(store.get_block(&block(2).0).unwrap(), vec![2u8; 4096]);
    }
}
