//! Reading an image through its layer chain.

use crate::error::{Error, Result, ResultExt};
use crate::hash::Hash;
use crate::manifest::{Image, Layer, MAX_CHAIN};
use crate::map::{self, Entry};
use crate::seal::Key;
use crate::store::Store;

/// What block `index` is through `chain` (top first): the topmost layer that maps it
/// decides; `None` means zero. Ignores the image size.
pub fn resolve_chain(pages: &dyn map::PageSource, chain: &[(Hash, Layer)], index: u64) -> Result<Option<Hash>> {
    Ok(resolve_chain_entry(pages, chain, index)?.and_then(|e| e.block()))
}

/// As [`resolve_chain`], the whole entry (a sealed block's masked plaintext hash too);
/// `None` when no layer maps it.
pub fn resolve_chain_entry(pages: &dyn map::PageSource, chain: &[(Hash, Layer)], index: u64) -> Result<Option<Entry>> {
    for (id, layer) in chain {
        if let Some(e) = map::lookup(pages, &layer.map, index).with_context(|| format!("layer {id}, block {index}"))? {
            return Ok(Some(e));
        }
    }
    Ok(None)
}

/// Refuses to make a child of capsule `parent` (commit, suspend, `import --parent`) when the
/// child's ancestry or one of its layer chains would be longer than [`MAX_CHAIN`]: readers
/// refuse such chains, so the child could be written but never read. Checked before anything
/// is written.
pub fn check_room_for_child(store: &Store, parent: &Hash) -> Result<()> {
    let manifest = store.manifest(parent)?;
    let mut generations = 1;
    let mut next = manifest.parent;
    while let Some(id) = next {
        generations += 1;
        if generations >= MAX_CHAIN {
            break;
        }
        next = store.manifest(&id).with_context(|| format!("ancestor {id} of capsule {}", manifest.name))?.parent;
    }
    let mut deepest = generations;
    for (what, image) in manifest.images() {
        deepest = deepest.max(ImageReader::open(store, image).with_context(|| format!("capsule {}: {what}", manifest.name))?.chain.len());
    }
    if deepest >= MAX_CHAIN {
        return Err(Error::new(
            crate::error::ErrorKind::TooLarge,
            format!(
                "capsule {} ({}) is {deepest} generations deep and a chain may have at most {MAX_CHAIN}: a child of it could \
                 never be read; `capsule flatten {}` makes it stand alone (same bytes, no ancestors)",
                manifest.name,
                parent.short(),
                manifest.name
            ),
        ));
    }
    Ok(())
}

/// The content hash of what `entry` holds: the plaintext hash of a sealed block (needs its
/// key), the name of a plain one; `None` for zero (or a sealed block without the key).
pub fn content_hash(entry: Option<Entry>, key: Option<&Key>) -> Option<Hash> {
    match entry? {
        Entry::Zero => None,
        Entry::Data(h) => Some(h),
        Entry::Sealed { name, masked_plain } => key.map(|k| k.plain_hash(&name, &masked_plain)),
    }
}

/// A block's plaintext from its stored content: a sealed one opened with `key`.
pub fn open_block(entry: &Entry, key: Option<&Key>, stored: Vec<u8>) -> Result<Vec<u8>> {
    match entry {
        Entry::Sealed { name, masked_plain } => match key {
            Some(k) => k.open(name, masked_plain, &stored),
            None => Err(Error::new(crate::ErrorKind::NoKey, format!("block {name} is sealed and no key was given"))),
        },
        _ => Ok(stored),
    }
}

/// The distinct blocks capsule `id`'s files read, in walk order: each image's blocks
/// resolved through its layer chain (the topmost layer mapping an index decides). Blocks of
/// lower layers that a higher one shadows are left out: a capsule runs offline without them,
/// while its closure ([`Store::closure`]) keeps every generation's (a restore of day 14 of a
/// daily chain need not fetch what days 1-13 overwrote).
pub fn live_blocks(store: &Store, id: &Hash) -> Result<Vec<Hash>> {
    let manifest = store.manifest(id)?;
    let (mut seen, mut out) = (std::collections::HashSet::new(), Vec::new());
    for (what, image) in manifest.images() {
        let reader = ImageReader::open(store, image).with_context(|| format!("capsule {}: {what}", manifest.name))?;
        let mut decided = std::collections::HashSet::new();
        for (lid, layer) in &reader.chain {
            map::walk(store, &layer.map, image.block_count(), &mut |_| Ok(()), &mut |index, entry| {
                if decided.insert(index) {
                    if let Some(h) = entry.block() {
                        if seen.insert(h) {
                            out.push(h);
                        }
                    }
                }
                Ok(())
            })
            .with_context(|| format!("capsule {}: {what}: layer {lid}", manifest.name))?;
        }
    }
    Ok(out)
}

/// An image opened for reading: its layer chain loaded, map pages fetched on demand.
#[derive(Debug)]
pub struct ImageReader<'s> {
    store: &'s Store,
    image: Image,
    /// Top first.
    chain: Vec<(Hash, Layer)>,
    /// Opens sealed blocks.
    key: Option<Key>,
}

impl<'s> ImageReader<'s> {
    /// Loads the layer chain of `image` (layers only; no map page is read yet).
    pub fn open(store: &'s Store, image: Image) -> Result<Self> {
        image.validate()?;
        let mut chain = Vec::new();
        let mut next = image.top;
        while let Some(id) = next {
            if chain.len() >= MAX_CHAIN {
                return Err(Error::corrupt(format!("layer chain from {} longer than {MAX_CHAIN}", image.top.map(|h| h.short()).unwrap_or_default())));
            }
            let layer = store.layer(&id).with_context(|| format!("layer {id}"))?;
            if layer.block_size_log2 != image.block_size_log2 {
                return Err(Error::corrupt(format!("layer {id} has block size 2^{} but its image uses 2^{}", layer.block_size_log2, image.block_size_log2)));
            }
            next = layer.parent;
            chain.push((id, layer));
        }
        Ok(Self { store, image, chain, key: None })
    }

    /// Reads sealed blocks with `key`.
    pub fn with_key(mut self, key: Option<Key>) -> Self {
        self.key = key;
        self
    }

    /// The entry of block `index` from the topmost layer mapping it, ignoring the image size.
    pub fn entry_in_chain(&self, index: u64) -> Result<Option<Entry>> {
        resolve_chain_entry(self.store, &self.chain, index)
    }

    /// The plaintext hash of block `index` (ignoring the image size), `None` for zero; a
    /// sealed block's needs the key (an import over a sealed parent has it).
    pub fn content_hash_in_chain(&self, index: u64) -> Result<Option<Hash>> {
        let entry = self.entry_in_chain(index)?;
        if matches!(entry, Some(Entry::Sealed { .. })) && self.key.is_none() {
            return Err(Error::new(crate::ErrorKind::NoKey, format!("block {index} is sealed and no key was given")));
        }
        Ok(content_hash(entry, self.key.as_ref()))
    }

    /// The image this reads.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The layers, top first.
    pub fn chain(&self) -> &[(Hash, Layer)] {
        &self.chain
    }

    /// The store behind it.
    pub fn store(&self) -> &'s Store {
        self.store
    }

    /// The content hash of block `index` from the topmost layer mapping it, ignoring the
    /// image size; `None` means zero.
    pub fn resolve_in_chain(&self, index: u64) -> Result<Option<Hash>> {
        resolve_chain(self.store, &self.chain, index)
    }

    /// The content hash of block `index`, `None` for zero (or past the end).
    pub fn resolve(&self, index: u64) -> Result<Option<Hash>> {
        if index >= self.image.block_count() {
            return Ok(None);
        }
        self.resolve_in_chain(index)
    }

    /// Block `index` as the guest sees it: `block_size` bytes (zero-padded past the end).
    pub fn read_block(&self, index: u64) -> Result<Vec<u8>> {
        let entry = if index < self.image.block_count() { self.entry_in_chain(index)? } else { None };
        match entry.and_then(|e| e.block().map(|h| (e, h))) {
            None => Ok(vec![0; self.image.block_size() as usize]),
            Some((entry, h)) => {
                let stored = self.store.get_block(&h).with_context(|| format!("block {index}"))?;
                let data = open_block(&entry, self.key.as_ref(), stored).with_context(|| format!("block {index}"))?;
                if data.len() as u64 != self.image.block_size() {
                    return Err(Error::corrupt(format!("block {index} ({h}) is {} bytes, image block size is {}", data.len(), self.image.block_size())));
                }
                Ok(data)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::{import_file, FileImport, NoProgress};
    use proptest::prelude::*;

    /// A version of the image: each block either zero, or filled with a small seed value.
    fn arb_versions() -> impl Strategy<Value = (u64, Vec<Vec<u8>>)> {
        (1u64..40).prop_flat_map(|nblocks| {
            let version = proptest::collection::vec(0u8..4, nblocks as usize);
            (Just(nblocks), proptest::collection::vec(version, 1..5))
        })
    }

    fn write_version(path: &std::path::Path, seeds: &[u8], bs: usize, tail_cut: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (i, s) in seeds.iter().enumerate() {
            let fill = if *s == 0 { 0 } else { s.wrapping_mul(31).wrapping_add(i as u8 % 3) };
            bytes.extend(std::iter::repeat_n(fill, bs));
        }
        bytes.truncate(bytes.len() - tail_cut.min(bytes.len() - 1));
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    /// A chain grows to MAX_CHAIN generations, every one readable; the next child sits on a
    /// flattened copy of its parent (no ancestors, one layer per image) and reads right.
    #[test]
    fn a_child_beyond_the_longest_chain_sits_on_a_flattened_parent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        store.set_durable(false);
        let disk = dir.path().join("d.raw");
        let spec = |i: usize| crate::CapsuleSpec {
            name: format!("c{i}"),
            disks: vec![("root".into(), disk.clone())],
            parent: (i > 0).then(|| format!("c{}", i - 1)),
            block_size_log2: Some(12),
            ..Default::default()
        };
        // Block i % 3 changes each generation: the chain's blocks overlap and shadow.
        let content = |i: usize| {
            let mut bytes = vec![0u8; 3 * 4096];
            for g in 0..=i {
                bytes[(g % 3) * 4096..][..4096].copy_from_slice(&(g as u32).to_le_bytes().repeat(1024));
            }
            bytes
        };
        for i in 0..MAX_CHAIN {
            std::fs::write(&disk, content(i)).unwrap();
            crate::import_capsule(&store, &spec(i), &NoProgress).unwrap();
        }
        let last = store.resolve(&format!("c{}", MAX_CHAIN - 1)).unwrap();
        let report = crate::verify_capsule(&store, "last", &last);
        assert!(report.ok() && report.blocks_checked > 0, "{:?}", report.problems);
        assert_eq!(check_room_for_child(&store, &last).unwrap_err().kind(), crate::ErrorKind::TooLarge);
        std::fs::write(&disk, content(MAX_CHAIN)).unwrap();
        crate::import_capsule(&store, &spec(MAX_CHAIN), &NoProgress).unwrap();
        let child = store.resolve(&format!("c{MAX_CHAIN}")).unwrap();
        let base = store.manifest(&child).unwrap().parent.unwrap();
        assert_ne!(base, last, "the child sits on a flattened copy");
        assert_eq!(store.manifest(&base).unwrap().parent, None);
        check_room_for_child(&store, &child).unwrap();
        for (id, i) in [(child, MAX_CHAIN), (base, MAX_CHAIN - 1), (last, MAX_CHAIN - 1)] {
            let reader = ImageReader::open(&store, store.manifest(&id).unwrap().disks[0].image).unwrap();
            let bytes: Vec<u8> = (0..3).flat_map(|b| reader.read_block(b).unwrap()).collect();
            assert!(bytes == content(i), "capsule {id} reads wrong");
        }
        assert_eq!(store.read_ref(&format!("c{}", MAX_CHAIN - 1)).unwrap(), Some(last), "the parent's ref stays");
    }

    /// A child's live blocks are what its files read: the blocks it overwrote in its parent
    /// are in its closure but not live; zero blocks are neither.
    #[test]
    fn live_blocks_leave_out_what_a_child_shadows() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let disk = dir.path().join("d.raw");
        let block = |b: u8| vec![b; 4096];
        let spec = |name: &str, parent: Option<&str>| crate::CapsuleSpec {
            name: name.into(),
            disks: vec![("root".into(), disk.clone())],
            parent: parent.map(Into::into),
            block_size_log2: Some(12),
            ..Default::default()
        };
        std::fs::write(&disk, [block(1), block(2), block(3), block(0)].concat()).unwrap();
        crate::import_capsule(&store, &spec("base", None), &NoProgress).unwrap();
        std::fs::write(&disk, [block(4), block(2), block(0), block(5)].concat()).unwrap();
        crate::import_capsule(&store, &spec("child", Some("base")), &NoProgress).unwrap();
        let h = |b: u8| Hash::of(&block(b));
        let child = store.resolve("child").unwrap();
        let live: std::collections::HashSet<Hash> = live_blocks(&store, &child).unwrap().into_iter().collect();
        assert_eq!(live, [h(4), h(2), h(5)].into_iter().collect());
        let (_, closure) = store.closure(&child).unwrap();
        assert_eq!(closure.len(), 5, "the closure keeps the shadowed blocks 1 and 3");
        let base = store.resolve("base").unwrap();
        assert_eq!(live_blocks(&store, &base).unwrap().len(), 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Each version imported over the previous one reads back exactly, block by block,
        /// and each layer maps exactly the blocks that changed.
        #[test]
        fn layer_chain_resolution_matches_every_version((_n, versions) in arb_versions(), tail_cut in 0usize..4096) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path().join("store")).unwrap();
            let bs = 4096usize;
            let mut below: Option<Image> = None;
            let mut prev_bytes: Option<Vec<u8>> = None;
            for (v, seeds) in versions.iter().enumerate() {
                let path = dir.path().join(format!("v{v}.raw"));
                let bytes = write_version(&path, seeds, bs, tail_cut);
                let parent = below.map(|b| ImageReader::open(&store, b).unwrap());
                let opts = FileImport { block_size_log2: 12, parent: parent.as_ref(), only: None, threads: 2, progress: &NoProgress, key: None };
                let (image, stats) = import_file(&store, &path, &opts).unwrap();
                let changed = bytes.chunks(bs).enumerate().filter(|(i, chunk)| {
                    match &prev_bytes {
                        Some(p) => p.chunks(bs).nth(*i).map(|c| c != *chunk).unwrap_or(true),
                        None => chunk.iter().any(|&b| b != 0),
                    }
                }).count() as u64;
                prop_assert_eq!(stats.mapped_blocks, changed);
                let reader = ImageReader::open(&store, image).unwrap();
                for (i, chunk) in bytes.chunks(bs).enumerate() {
                    let block = reader.read_block(i as u64).unwrap();
                    prop_assert_eq!(&block[..chunk.len()], chunk);
                }
                below = Some(image);
                prev_bytes = Some(bytes);
            }
        }
    }
}
