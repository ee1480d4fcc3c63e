//! Block maps: which block index of an image a layer maps, and to what.
//!
//! A layer's map is a small radix tree of content-addressed pages, 1024 slots each, so
//! opening a capsule reads only the manifest and the pages actually touched; a 100 GiB
//! disk at 4 KiB blocks (26 M blocks) is a tree of height 3.
//!
//! ```text
//!   height 2:           [Node: (slot, page id) ...]          slot = index >> 10 & 1023
//!                        /            \
//!   leaves:  [Leaf: (slot, Zero|Data(hash)) ...]   ...      slot = index & 1023
//! ```
//!
//! Each page is a postcard-encoded [`MapPage`] inside an envelope (see `envelope`).
//! Slots are strictly increasing and only present slots are stored, so a sparse layer
//! (an update that touches 100 blocks) costs a few pages whatever the disk size.

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::hash::Hash;

/// Bits of block index resolved per tree level.
pub const FANOUT_BITS: u32 = 10;
/// Slots per page.
pub const FANOUT: u64 = 1 << FANOUT_BITS;
/// Deepest tree accepted (1024^6 blocks, far beyond any disk).
pub const MAX_HEIGHT: u8 = 6;

/// What a layer says about one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Entry {
    /// The block is all zeros (never stored, never sent).
    Zero,
    /// The block has this content hash.
    Data(Hash),
    /// The block is sealed (see `seal`): stored under `name`, the hash of its ciphertext;
    /// `masked_plain` is its plaintext hash masked with a pad only its owner's key makes.
    Sealed {
        /// The stored block's name.
        name: Hash,
        /// The plaintext hash, masked.
        masked_plain: Hash,
    },
}

impl Entry {
    /// The stored block it names, `None` for zero.
    pub fn block(&self) -> Option<Hash> {
        match self {
            Entry::Zero => None,
            Entry::Data(h) | Entry::Sealed { name: h, .. } => Some(*h),
        }
    }
}

/// One page of a block map tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapPage {
    /// Bottom level: slot -> entry.
    Leaf(Vec<(u16, Entry)>),
    /// Upper level: slot -> child page id.
    Node(Vec<(u16, Hash)>),
}

impl MapPage {
    /// Checks the invariants a decoder cannot: slot bounds, order, non-emptiness.
    pub fn validate(&self) -> Result<()> {
        fn check<T>(slots: &[(u16, T)]) -> Result<()> {
            if slots.is_empty() {
                return Err(Error::corrupt("map page has no slots"));
            }
            if slots.len() as u64 > FANOUT {
                return Err(Error::corrupt(format!("map page has {} slots, max {FANOUT}", slots.len())));
            }
            let mut prev: Option<u16> = None;
            for (slot, _) in slots {
                if u64::from(*slot) >= FANOUT || prev.is_some_and(|p| p >= *slot) {
                    return Err(Error::corrupt(format!("map page slot {slot} out of order or range")));
                }
                prev = Some(*slot);
            }
            Ok(())
        }
        match self {
            MapPage::Leaf(s) => check(s),
            MapPage::Node(s) => check(s),
        }
    }
}

/// Where a map's tree starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRoot {
    /// Levels in the tree, leaves included (1 = a single leaf page).
    pub height: u8,
    /// Root page, or `None` for a layer that maps nothing.
    pub root: Option<Hash>,
}

/// Tree height needed to address `nblocks` blocks.
pub fn height_for(nblocks: u64) -> u8 {
    let last = nblocks.saturating_sub(1);
    let mut h = 1u8;
    while h < MAX_HEIGHT && last >> (FANOUT_BITS * u32::from(h)) != 0 {
        h += 1;
    }
    h
}

/// Something that returns decoded, verified map pages by id.
pub trait PageSource {
    /// The page named `id`.
    fn page(&self, id: &Hash) -> Result<Arc<MapPage>>;
}

/// Builds the tree for `entries` (sorted by strictly increasing index, all `< nblocks`),
/// storing each page through `put`, which returns the page's id.
pub fn build(entries: &[(u64, Entry)], nblocks: u64, put: &mut dyn FnMut(&MapPage) -> Result<Hash>) -> Result<MapRoot> {
    let height = height_for(nblocks);
    if let Some(w) = entries.windows(2).find(|w| w[0].0 >= w[1].0) {
        return Err(Error::invalid(format!("map entries not strictly increasing at block {}", w[1].0)));
    }
    if let Some((last, _)) = entries.last() {
        if *last >= nblocks {
            return Err(Error::invalid(format!("map entry for block {last} beyond {nblocks} blocks")));
        }
    }
    if entries.is_empty() {
        return Ok(MapRoot { height, root: None });
    }
    // Level 0: group entries into leaves keyed by index >> 10.
    let mut level: Vec<(u64, Hash)> = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let key = entries[i].0 >> FANOUT_BITS;
        let mut slots = Vec::new();
        while i < entries.len() && entries[i].0 >> FANOUT_BITS == key {
            slots.push((slot_at(entries[i].0, 0), entries[i].1));
            i += 1;
        }
        level.push((key, put(&MapPage::Leaf(slots))?));
    }
    for _ in 1..height {
        let mut next = Vec::new();
        let mut i = 0;
        while i < level.len() {
            let key = level[i].0 >> FANOUT_BITS;
            let mut slots = Vec::new();
            while i < level.len() && level[i].0 >> FANOUT_BITS == key {
                slots.push((slot_at(level[i].0, 0), level[i].1));
                i += 1;
            }
            next.push((key, put(&MapPage::Node(slots))?));
        }
        level = next;
    }
    debug_assert_eq!(level.len(), 1);
    Ok(MapRoot { height, root: Some(level[0].1) })
}

/// The slot block `index` takes in a page at `level` of the tree (0: a leaf).
fn slot_at(index: u64, level: u32) -> u16 {
    // Masked to 10 bits, so it always fits.
    if FANOUT_BITS * level >= 64 {
        return 0;
    }
    ((index >> (FANOUT_BITS * level)) & (FANOUT - 1)) as u16
}

impl MapPage {
    /// What this page, read as the page at `level` (a node above 0, a leaf at 0), says
    /// on the way to block `index`.
    pub fn step(&self, index: u64, level: u32) -> Step {
        let slot = slot_at(index, level);
        let found = match (self, level) {
            (MapPage::Node(slots), l) if l > 0 => slots.binary_search_by_key(&slot, |s| s.0).ok().map(|i| Step::Page(slots[i].1)),
            (MapPage::Leaf(slots), 0) => slots.binary_search_by_key(&slot, |s| s.0).ok().map(|i| Step::Entry(slots[i].1)),
            _ => return Step::WrongType,
        };
        found.unwrap_or(Step::Unmapped)
    }
}

/// One step of a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The child page to read next.
    Page(Hash),
    /// The leaf's entry for the block.
    Entry(Entry),
    /// The page maps nothing there.
    Unmapped,
    /// A leaf above level 0 or a node at it: a damaged or hostile map.
    WrongType,
}

/// What the map says about block `index`: `None` when it does not map it.
pub fn lookup(src: &dyn PageSource, root: &MapRoot, index: u64) -> Result<Option<Entry>> {
    let Some(mut page_id) = root.root else { return Ok(None) };
    let bits = FANOUT_BITS * u32::from(root.height);
    if bits < 64 && index >> bits != 0 {
        return Ok(None);
    }
    for level in (0..u32::from(root.height)).rev() {
        let page = src.page(&page_id)?;
        match page.step(index, level) {
            Step::Entry(e) => return Ok(Some(e)),
            Step::Page(child) => page_id = child,
            Step::Unmapped => return Ok(None),
            Step::WrongType => return Err(Error::corrupt(format!("map page {page_id} has the wrong type for tree level {level}"))),
        }
    }
    Err(Error::corrupt("map tree of height 0"))
}

/// Most pages a map over `nblocks` blocks can have: one leaf per 1024 blocks, one node per
/// 1024 pages of the level below. A walk visiting more is walking a hostile map (pages
/// naming the same child over and over would otherwise make 2^60 steps).
pub fn max_pages(nblocks: u64) -> u64 {
    let mut level = nblocks.max(1);
    let mut total = 0;
    loop {
        level = level.div_ceil(1 << FANOUT_BITS);
        total += level;
        if level == 1 {
            return total;
        }
    }
}

/// Visits every page (pre-order) and every entry (in index order) of a map over an image of
/// `nblocks` blocks. Bounded: a tree higher than such an image needs, an entry past its
/// end, or more page visits than [`max_pages`] is a corrupt map, reported before the walk
/// goes further.
pub fn walk(
    src: &dyn PageSource,
    root: &MapRoot,
    nblocks: u64,
    on_page: &mut dyn FnMut(&Hash) -> Result<()>,
    on_entry: &mut dyn FnMut(u64, Entry) -> Result<()>,
) -> Result<()> {
    struct Bounds {
        nblocks: u64,
        pages_left: u64,
    }
    fn visit(
        src: &dyn PageSource,
        id: &Hash,
        level: u32,
        base: u64,
        bounds: &mut Bounds,
        on_page: &mut dyn FnMut(&Hash) -> Result<()>,
        on_entry: &mut dyn FnMut(u64, Entry) -> Result<()>,
    ) -> Result<()> {
        if bounds.pages_left == 0 {
            return Err(Error::corrupt(format!("map page {id}: the map has more pages than an image of {} blocks can have", bounds.nblocks)));
        }
        bounds.pages_left -= 1;
        on_page(id)?;
        let page = src.page(id)?;
        match (&*page, level) {
            (MapPage::Leaf(slots), 0) => {
                for (slot, entry) in slots {
                    let index = base | u64::from(*slot);
                    if index >= bounds.nblocks {
                        return Err(Error::corrupt(format!("map page {id} maps block {index}, past the image's {} blocks", bounds.nblocks)));
                    }
                    on_entry(index, *entry)?;
                }
            }
            (MapPage::Node(slots), l) if l > 0 => {
                for (slot, child) in slots {
                    let child_base = base | (u64::from(*slot) << (FANOUT_BITS * l));
                    if child_base >= bounds.nblocks {
                        return Err(Error::corrupt(format!(
                            "map page {id} names a subtree from block {child_base}, past the image's {} blocks",
                            bounds.nblocks
                        )));
                    }
                    visit(src, child, l - 1, child_base, bounds, on_page, on_entry)?;
                }
            }
            _ => return Err(Error::corrupt(format!("map page {id} has the wrong type for tree level {level}"))),
        }
        Ok(())
    }
    match root.root {
        None => Ok(()),
        Some(id) => {
            if root.height == 0 || root.height > MAX_HEIGHT || root.height > height_for(nblocks) {
                return Err(Error::corrupt(format!("map tree height {} out of range for an image of {nblocks} blocks", root.height)));
            }
            let mut bounds = Bounds { nblocks, pages_left: max_pages(nblocks) };
            visit(src, &id, u32::from(root.height) - 1, 0, &mut bounds, on_page, on_entry)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::envelope::{self, ObjectKind};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Mutex;

    /// Pages kept in memory, encoded as they would be on disk.
    #[derive(Default)]
    pub(crate) struct MemPages(pub Mutex<HashMap<Hash, Vec<u8>>>);

    impl MemPages {
        pub(crate) fn put(&self, page: &MapPage) -> Result<Hash> {
            let bytes = envelope::encode(ObjectKind::MapPage, page)?;
            let id = Hash::of(&bytes);
            self.0.lock().unwrap().insert(id, bytes);
            Ok(id)
        }
    }

    impl PageSource for MemPages {
        fn page(&self, id: &Hash) -> Result<Arc<MapPage>> {
            let map = self.0.lock().unwrap();
            let bytes = map.get(id).ok_or_else(|| Error::not_found(format!("page {id}")))?;
            let page: MapPage = envelope::decode_verified(ObjectKind::MapPage, id, bytes)?;
            page.validate()?;
            Ok(Arc::new(page))
        }
    }

    fn arb_entries(max_blocks: u64) -> impl Strategy<Value = (u64, BTreeMap<u64, Entry>)> {
        (1..max_blocks).prop_flat_map(|n| {
            let entry = prop_oneof![Just(Entry::Zero), any::<[u8; 32]>().prop_map(|b| Entry::Data(Hash(b)))];
            (Just(n), proptest::collection::btree_map(0..n, entry, 0..300))
        })
    }

    proptest! {
        #[test]
        fn build_then_lookup_matches_model((n, model) in arb_entries(3_000_000), probes in proptest::collection::vec(any::<u64>(), 50)) {
            let pages = MemPages::default();
            let entries: Vec<_> = model.iter().map(|(k, v)| (*k, *v)).collect();
            let root = build(&entries, n, &mut |p| pages.put(p)).unwrap();
            prop_assert_eq!(root.height, height_for(n));
            for (k, v) in &model {
                prop_assert_eq!(lookup(&pages, &root, *k).unwrap(), Some(*v));
            }
            for p in probes {
                prop_assert_eq!(lookup(&pages, &root, p % (n * 2)).unwrap(), model.get(&(p % (n * 2))).copied());
            }
            let mut seen = Vec::new();
            walk(&pages, &root, n, &mut |_| Ok(()), &mut |i, e| { seen.push((i, e)); Ok(()) }).unwrap();
            prop_assert_eq!(seen, entries);
        }
    }

    #[test]
    fn a_map_whose_pages_all_name_one_child_is_refused_before_it_explodes() {
        // A leaf with one entry, then five levels of nodes whose 1024 slots all name the
        // level below: six pages, 2^50 leaf visits if walked naively.
        let pages = MemPages::default();
        let mut id = pages.put(&MapPage::Leaf(vec![(0, Entry::Zero)])).unwrap();
        for _ in 1..MAX_HEIGHT {
            id = pages.put(&MapPage::Node((0..1024u16).map(|slot| (slot, id)).collect())).unwrap();
        }
        let root = MapRoot { height: MAX_HEIGHT, root: Some(id) };
        let nblocks = 1u64 << 40;
        let (mut visited, mut entries) = (0u64, 0u64);
        let err = walk(
            &pages,
            &root,
            nblocks,
            &mut |_| {
                visited += 1;
                Ok(())
            },
            &mut |_, _| {
                entries += 1;
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt, "{err}");
        assert!(visited <= max_pages(nblocks), "{visited}");
        // A small image: the tree is higher than it can need.
        let err = walk(&pages, &root, 1 << 20, &mut |_| Ok(()), &mut |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("height"), "{err}");
    }

    #[test]
    fn max_pages_counts_every_level() {
        assert_eq!(max_pages(1), 1);
        assert_eq!(max_pages(1024), 1);
        assert_eq!(max_pages(1025), 3);
        assert_eq!(max_pages(1 << 20), 1024 + 1);
    }

    #[test]
    fn heights() {
        assert_eq!(height_for(1), 1);
        assert_eq!(height_for(1024), 1);
        assert_eq!(height_for(1025), 2);
        assert_eq!(height_for(1 << 20), 2);
        assert_eq!(height_for((1 << 20) + 1), 3);
        // 100 GiB at 4 KiB blocks.
        assert_eq!(height_for(100 << 18), 3);
    }

    #[test]
    fn largest_leaf_fits_the_page_cap() {
        let slots = (0..FANOUT).map(|i| (i as u16, Entry::Data(Hash([0xff; 32])))).collect();
        assert!(envelope::encode(ObjectKind::MapPage, &MapPage::Leaf(slots)).is_ok());
        let sealed = Entry::Sealed { name: Hash([0xff; 32]), masked_plain: Hash([0xff; 32]) };
        let slots = (0..FANOUT).map(|i| (i as u16, sealed)).collect();
        assert!(envelope::encode(ObjectKind::MapPage, &MapPage::Leaf(slots)).is_ok());
        let slots = (0..FANOUT).map(|i| (i as u16, Hash([0xff; 32]))).collect();
        assert!(envelope::encode(ObjectKind::MapPage, &MapPage::Node(slots)).is_ok());
    }

    #[test]
    fn invalid_pages_are_refused() {
        assert!(MapPage::Leaf(vec![]).validate().is_err());
        assert!(MapPage::Leaf(vec![(3, Entry::Zero), (3, Entry::Zero)]).validate().is_err());
        assert!(MapPage::Node(vec![(1024, Hash([0; 32]))]).validate().is_err());
    }

    #[test]
    fn unsorted_entries_are_refused() {
        let pages = MemPages::default();
        let err = build(&[(5, Entry::Zero), (2, Entry::Zero)], 10, &mut |p| pages.put(p)).unwrap_err();
        assert!(err.to_string().contains("not strictly increasing"));
    }
}
