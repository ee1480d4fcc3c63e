//! Flattening: a capsule made to stand alone, and the capsules built on it moved onto the
//! flattened copy, so that removing old generations frees what only they read.
//!
//! A child's layers sit on its parent's, so every generation of a daily chain reaches every
//! older layer and every block the later days overwrote: removing the old days' refs frees
//! nothing. Flattening capsule `C` writes `C'`: the same manifest with no parent, each image
//! one layer whose map is the chain's merged map (the topmost entry of each block; zeros
//! left out, as no layer below can show through). Blocks are never rewritten, so `C'` reads
//! exactly what `C` reads. Every capsule whose ancestry includes `C` is then rebased: its
//! layers above `C`'s are written again with their parents renamed (their maps unchanged),
//! its manifest names its rebased parent. All of this is new content-addressed objects;
//! refs move last, descendants first and `C`'s own last, each by compare-and-swap. Ids are
//! deterministic (nothing new but the parent links), so a flatten cut short is finished by
//! running it again: refs already moved read through `C'` and are left alone.
//!
//! ```text
//!  before:  d1 <- d2 <- ... <- d7 <- d8 <- d9 ... d14       refs: d8 .. d14
//!  after:                          d8' <- d9' ... d14'      d8': one merged layer per image
//!           gc: d1..d8's manifests and layers, and the blocks only they mapped, go
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::envelope::ObjectKind;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::hash::Hash;
use crate::image::ImageReader;
use crate::manifest::{Image, Layer, Profile, MAX_CHAIN};
use crate::map::{self, Entry};
use crate::store::Store;

/// What a flatten did to the store's refs.
#[derive(Debug, Clone, Serialize)]
pub struct FlattenReport {
    /// The ref flattened.
    pub name: String,
    /// The capsule it named, and names now (equal when it already stood alone).
    pub old_id: Hash,
    pub new_id: Hash,
    /// Refs moved onto the flattened capsule: (name, old id, new id).
    pub rebased: Vec<MovedRef>,
    /// Layers written (merged ones, and rebased ones above them).
    pub layers_written: u64,
    /// Map pages written for the merged layers (pages already stored are not counted).
    pub pages_written: u64,
}

/// One ref a flatten moved.
#[derive(Debug, Clone, Serialize)]
pub struct MovedRef {
    pub name: String,
    pub old_id: Hash,
    pub new_id: Hash,
}

/// Old capsule and layer ids and the ids of their rewritten equivalents (same bytes).
#[derive(Debug)]
struct Rewriter<'s> {
    store: &'s Store,
    capsules: HashMap<Hash, Hash>,
    /// An old layer and what replaces it as the layer below (`None`: an all-zero image).
    layers: HashMap<Hash, Option<Hash>>,
    layers_written: u64,
    pages_written: u64,
}

impl<'s> Rewriter<'s> {
    fn new(store: &'s Store) -> Self {
        Self { store, capsules: HashMap::new(), layers: HashMap::new(), layers_written: 0, pages_written: 0 }
    }

    /// The flattened copy of capsule `id` (written, named by no ref): no parent, one layer
    /// per image mapping every block as `id`'s chains do. A capsule that
    /// already stands alone is its own copy.
    fn flatten(&mut self, id: &Hash) -> Result<Hash> {
        let old = self.store.manifest(id)?;
        let mut m = old.clone();
        m.parent = None;
        for (slot, image) in old.slots() {
            let flat = self.flatten_image(image).with_context(|| format!("capsule {} ({}): {slot}", old.name, id.short()))?;
            if let Some(i) = m.image_mut(&slot) {
                *i = flat;
            }
        }
        let new = if m == old { *id } else { self.store.put_manifest(&m)?.0 };
        self.capsules.insert(*id, new);
        self.copy_profiles(id, &new)?;
        Ok(new)
    }

    fn flatten_image(&mut self, image: Image) -> Result<Image> {
        let reader = ImageReader::open(self.store, image)?;
        let chain = reader.chain();
        let Some((top, top_layer)) = chain.first() else { return Ok(image) };
        if chain.len() == 1 && top_layer.parent.is_none() {
            return Ok(image);
        }
        if let Some(done) = self.layers.get(top) {
            return Ok(Image { top: *done, ..image });
        }
        // The chain's merged map: each block's topmost entry.
        let nblocks = image.block_count();
        let mut merged = BTreeMap::new();
        for (lid, layer) in chain {
            map::walk(self.store, &layer.map, nblocks, &mut |_| Ok(()), &mut |index, entry| {
                merged.entry(index).or_insert(entry);
                Ok(())
            })
            .with_context(|| format!("layer {lid}"))?;
        }
        // Blocks are not rewritten, so none need be here (a commit on a remote mount has
        // only its metadata): `capsule verify` is what finds a missing one.
        let entries: Vec<(u64, Entry)> = merged.into_iter().filter(|(_, e)| *e != Entry::Zero).collect();
        let mut pages = 0;
        let root = map::build(&entries, nblocks, &mut |page| {
            let (id, new) = self.store.put_object(ObjectKind::MapPage, page)?;
            pages += u64::from(new);
            Ok(id)
        })?;
        self.pages_written += pages;
        let top_new = if root.root.is_none() {
            None
        } else {
            let layer = Layer { block_size_log2: image.block_size_log2, parent: None, map: root, mapped: entries.len() as u64 };
            self.layers_written += 1;
            Some(self.store.put_object(ObjectKind::Layer, &layer)?.0)
        };
        self.layers.insert(*top, top_new);
        Ok(Image { top: top_new, ..image })
    }

    /// Capsule `id` moved onto the flattened capsules in its ancestry (its ancestors between
    /// rebased too); `id` itself when its ancestry holds none of them.
    fn rebase(&mut self, id: &Hash) -> Result<Hash> {
        let mut pending = Vec::new();
        let mut next = Some(*id);
        while let Some(c) = next {
            if self.capsules.contains_key(&c) {
                break;
            }
            if pending.len() >= MAX_CHAIN {
                return Err(Error::corrupt(format!("capsule {id}: ancestry longer than {MAX_CHAIN}")));
            }
            let m = self.store.manifest(&c).with_context(|| format!("ancestor {c} of capsule {id}"))?;
            next = m.parent;
            pending.push((c, m));
        }
        if next.is_none_or(|c| self.capsules[&c] == c) {
            // No rewritten ancestor: nothing changes (remembered, as siblings share ancestors).
            for (c, _) in pending {
                self.capsules.insert(c, c);
            }
            return Ok(*id);
        }
        for (c, mut m) in pending.into_iter().rev() {
            m.parent = m.parent.map(|p| self.capsules.get(&p).copied().unwrap_or(p));
            for (slot, image) in m.slots() {
                let top = self.rebase_layers(image.top).with_context(|| format!("capsule {} ({}): {slot}", m.name, c.short()))?;
                if let Some(i) = m.image_mut(&slot) {
                    i.top = top;
                }
            }
            let new = self.store.put_manifest(&m)?.0;
            self.capsules.insert(c, new);
            self.copy_profiles(&c, &new)?;
        }
        Ok(self.capsules[id])
    }

    /// The layers from `top` down to the first rewritten one, written again over its
    /// replacement; `top` itself when the chain holds no rewritten layer.
    fn rebase_layers(&mut self, top: Option<Hash>) -> Result<Option<Hash>> {
        let mut above = Vec::new();
        let mut next = top;
        let mut below = loop {
            let Some(lid) = next else { return Ok(top) };
            if let Some(r) = self.layers.get(&lid) {
                break *r;
            }
            if above.len() >= MAX_CHAIN {
                return Err(Error::corrupt(format!("layer chain from {lid} longer than {MAX_CHAIN}")));
            }
            let layer = self.store.layer(&lid)?;
            next = layer.parent;
            above.push((lid, layer));
        };
        for (old, mut layer) in above.into_iter().rev() {
            layer.parent = below;
            let (id, _) = self.store.put_object(ObjectKind::Layer, &layer)?;
            self.layers_written += 1;
            self.layers.insert(old, Some(id));
            below = Some(id);
        }
        Ok(below)
    }

    /// The profiles of `old` named for `new` too: same blocks, so they still apply.
    fn copy_profiles(&self, old: &Hash, new: &Hash) -> Result<()> {
        if old == new {
            return Ok(());
        }
        for (name, pid) in self.store.list_profiles(old)? {
            let p = self.store.profile(&pid).with_context(|| format!("profile {name} of capsule {old}"))?;
            self.store.put_profile(&Profile { capsule: *new, name, blocks: p.blocks })?;
        }
        Ok(())
    }
}

/// Flattens the capsule ref `name` names (see the module docs) and moves every ref built on
/// it onto the flattened copy: descendants first, `name` (and any ref naming the same
/// capsule) last, each by compare-and-swap. A ref another writer moved meanwhile fails the
/// flatten naming it; what moved before stays moved (every ref names the same bytes as
/// before), and running the flatten again finishes it.
pub fn flatten_ref(store: &Store, name: &str) -> Result<FlattenReport> {
    let old = store.read_ref(name)?.ok_or_else(|| Error::not_found(format!("no capsule named {name:?} in store {}", store.root().display())))?;
    let mut rw = Rewriter::new(store);
    let new = rw.flatten(&old)?;
    let mut report = FlattenReport { name: name.to_string(), old_id: old, new_id: new, rebased: Vec::new(), layers_written: 0, pages_written: 0 };
    if new == old {
        return Ok(report);
    }
    let mut own = Vec::new();
    for (n, id) in store.list_refs()? {
        if id == old {
            own.push(MovedRef { name: n, old_id: old, new_id: new });
            continue;
        }
        let moved = rw.rebase(&id).with_context(|| format!("rebasing ref {n} onto the flattened {name}"))?;
        if moved != id {
            report.rebased.push(MovedRef { name: n, old_id: id, new_id: moved });
        }
    }
    // Everything the refs will name is durable before the first of them moves.
    store.sync()?;
    for r in report.rebased.iter().chain(&own) {
        store.cas_ref(&r.name, Some(&r.old_id), &r.new_id).with_context(|| format!("flattening {name}: ref {}", r.name))?;
    }
    report.rebased.extend(own.into_iter().filter(|r| r.name != name));
    report.layers_written = rw.layers_written;
    report.pages_written = rw.pages_written;
    Ok(report)
}

/// The refs to flatten once the refs `removed` named are gone, so that what only the removed
/// capsules read becomes unreachable: each remaining ref whose ancestry reaches a removed
/// capsule before any capsule a remaining ref names (the oldest kept generation of a chain).
/// Oldest first. Refs further up such a chain are rebased by the flatten, not flattened.
pub fn refs_reaching(store: &Store, removed: &HashSet<Hash>) -> Result<Vec<String>> {
    let refs = store.list_refs()?;
    let kept: HashSet<Hash> = refs.iter().map(|(_, id)| *id).collect();
    let mut out = Vec::new();
    for (n, id) in &refs {
        // (generations from the root, name): oldest first below.
        let mut ancestry = Vec::new();
        let mut next = Some(*id);
        while let Some(c) = next {
            if ancestry.len() > MAX_CHAIN {
                return Err(Error::corrupt(format!("ref {n}: ancestry longer than {MAX_CHAIN}")));
            }
            ancestry.push(c);
            next = store.manifest(&c).with_context(|| format!("ancestor {c} of ref {n}"))?.parent;
        }
        if ancestry[1..].iter().find(|a| kept.contains(*a) || removed.contains(*a)).is_some_and(|a| !kept.contains(a)) {
            out.push((ancestry.len(), n.clone()));
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, n)| n).collect())
}

/// The capsule a new child of `parent` should sit on: `parent` itself, or when the child's
/// ancestry or a layer chain would pass [`MAX_CHAIN`] (readers refuse such chains), a
/// flattened copy of it (same bytes, named by no ref; only its map pages and layers are new).
pub fn base_for_child(store: &Store, parent: &Hash) -> Result<Hash> {
    match crate::image::check_room_for_child(store, parent) {
        Ok(()) => Ok(*parent),
        Err(e) if e.kind() == ErrorKind::TooLarge => {
            tracing::info!("capsule {} is {MAX_CHAIN} generations deep: its child sits on a flattened copy", parent.short());
            Rewriter::new(store).flatten(parent)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::NoProgress;

    /// Every ref's disk, read block by block.
    fn contents(store: &Store) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for (n, id) in store.list_refs().unwrap() {
            let image = store.manifest(&id).unwrap().disks[0].image;
            let reader = ImageReader::open(store, image).unwrap();
            out.insert(n, (0..image.block_count()).flat_map(|b| reader.read_block(b).unwrap()).collect());
        }
        out
    }

    /// A daily chain day0 <- day1 <- day2 <- day3 (each day rewrites a block, one turns a
    /// block to zeros) and a branch off day1: dropping day0 and day1 and flattening day2
    /// leaves every remaining ref reading what it read, and gc then frees the blocks only
    /// the dropped days mapped; a second flatten changes nothing.
    #[test]
    fn flattening_the_oldest_kept_day_frees_what_only_dropped_days_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let disk = dir.path().join("d.raw");
        let block = |b: u8| vec![b; 4096];
        let import = |name: &str, parent: Option<&str>, blocks: [u8; 4]| {
            std::fs::write(&disk, blocks.map(block).concat()).unwrap();
            let spec = crate::CapsuleSpec {
                name: name.into(),
                disks: vec![("root".into(), disk.clone())],
                parent: parent.map(Into::into),
                block_size_log2: Some(12),
                ..Default::default()
            };
            crate::import_capsule(&store, &spec, &NoProgress).unwrap().id
        };
        import("day0", None, [1, 2, 3, 4]);
        let day1 = import("day1", Some("day0"), [5, 2, 3, 4]);
        import("day2", Some("day1"), [5, 6, 0, 4]);
        import("day3", Some("day2"), [5, 6, 7, 4]);
        import("branch", Some("day1"), [5, 2, 3, 8]);
        let day3 = store.resolve("day3").unwrap();
        store.put_profile(&Profile { capsule: day3, name: "boot".into(), blocks: vec![Hash::of(&block(7))] }).unwrap();
        store.delete_ref("day0").unwrap();
        store.delete_ref("day1").unwrap();
        let before = contents(&store);
        assert_eq!(store.gc().unwrap().blocks_removed, 0, "the chain keeps every block before a flatten");

        let removed: HashSet<Hash> = [day1, store.manifest(&day1).unwrap().parent.unwrap()].into();
        assert_eq!(refs_reaching(&store, &removed).unwrap(), vec!["branch".to_string(), "day2".to_string()]);
        let report = flatten_ref(&store, "day2").unwrap();
        assert_ne!(report.old_id, report.new_id);
        assert_eq!(report.rebased.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["day3"]);
        assert_eq!(contents(&store), before, "a flatten changed what a ref reads");
        let day3_new = store.resolve("day3").unwrap();
        assert_eq!(store.manifest(&day3_new).unwrap().parent, Some(report.new_id));
        assert_eq!(store.list_profiles(&day3_new).unwrap().len(), 1, "day3's profile follows it");
        // The branch still reads day1 and day0 through its chain: flatten it too.
        flatten_ref(&store, "branch").unwrap();
        assert_eq!(contents(&store), before);
        let gc = store.gc().unwrap();
        // Block 1 (day0's, which day1 overwrote) goes; 3, which day2 zeroed, stays: the branch reads it.
        assert_eq!(gc.blocks_removed, 1, "{gc:?}");
        assert!(!store.has_block(&Hash::of(&block(1))) && store.has_block(&Hash::of(&block(3))));
        assert_eq!(contents(&store), before, "gc removed something a ref reads");
        for (n, id) in store.list_refs().unwrap() {
            let r = crate::verify_capsule(&store, &n, &id);
            assert!(r.ok(), "{n}: {:?}", r.problems);
        }
        let again = flatten_ref(&store, "day2").unwrap();
        assert_eq!((again.old_id, again.rebased.len()), (again.new_id, 0), "a second flatten changed something");
    }
}
