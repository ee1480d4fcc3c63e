//! Walks over a capsule's metadata wherever it is stored (the local store, a server's
//! object store): every object and block a capsule reaches, ancestors included.

use std::collections::HashSet;

use crate::envelope::{self, ObjectKind};
use crate::error::{Error, Result, ResultExt};
use crate::hash::Hash;
use crate::manifest::{Layer, Manifest};
use crate::map::{self, PageSource};
use crate::store::Store;

/// Where a capsule's metadata objects are read from: the local store, or a server's object
/// store. Map pages come through [`PageSource`] so each source can cache them its own way.
pub trait ObjectSource: PageSource {
    /// An object's encoded bytes (verified by the caller).
    fn object_bytes(&self, id: &Hash) -> Result<Vec<u8>>;
}

impl ObjectSource for Store {
    fn object_bytes(&self, id: &Hash) -> Result<Vec<u8>> {
        self.read_object(id)
    }
}

/// Calls `on_object` for every metadata object and `on_block` for every block reachable from
/// capsule `id` in `src` (its ancestors included). Objects may be visited more than once.
pub fn walk_capsule(
    src: &dyn ObjectSource,
    id: &Hash,
    on_object: &mut dyn FnMut(&Hash) -> Result<()>,
    on_block: &mut dyn FnMut(&str, u64, &Hash) -> Result<()>,
) -> Result<()> {
    let mut seen_layers = HashSet::new();
    let mut next = Some(*id);
    let mut depth = 0;
    while let Some(cid) = next {
        depth += 1;
        if depth > crate::manifest::MAX_CHAIN {
            return Err(Error::corrupt(format!("capsule {id}: ancestry longer than {}", crate::manifest::MAX_CHAIN)));
        }
        on_object(&cid)?;
        let bytes = src.object_bytes(&cid).with_context(|| format!("capsule {cid}"))?;
        let m = Manifest::decode_verified(&cid, &bytes)?;
        m.validate().with_context(|| format!("manifest {cid}"))?;
        for (what, image) in m.images() {
            let mut layer_id = image.top;
            while let Some(lid) = layer_id {
                if !seen_layers.insert(lid) {
                    break;
                }
                on_object(&lid)?;
                let bytes = src.object_bytes(&lid).with_context(|| format!("capsule {} ({cid}): {what}", m.name))?;
                let layer: Layer = envelope::decode_verified(ObjectKind::Layer, &lid, &bytes)?;
                crate::manifest::check_block_size_log2(layer.block_size_log2).with_context(|| format!("layer {lid}"))?;
                let label = format!("capsule {} ({}): {what}", m.name, cid.short());
                map::walk(src, &layer.map, image.block_count(), on_object, &mut |index, entry| match entry.block() {
                    Some(h) => on_block(&label, index, &h),
                    None => Ok(()),
                })
                .with_context(|| format!("{label}: layer {lid}"))?;
                layer_id = layer.parent;
            }
        }
        next = m.parent;
    }
    Ok(())
}
