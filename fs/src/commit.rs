//! `capsule commit`: a mount's copy-on-write overlay becomes a child capsule holding only
//! the blocks that changed, ready for `capsule push`.

use capsule_images::envelope::{peek_kind, ObjectKind};
use capsule_images::map::{self, Entry};
use capsule_images::{Hash, Image, ImageReader, Layer, Slot, Store};

use crate::error::{Error, Result};
use crate::mount::{now_unix, MountInfo};
use crate::overlay::{Overlay, DATA};

/// What a commit made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CommitReport {
    /// The new capsule.
    pub id: Hash,
    /// Blocks the child maps over its parent.
    pub changed_blocks: u64,
    /// Of those, blocks of the guest RAM image (`memory.raw`).
    pub memory_blocks: u64,
    /// Bytes written to the store for them.
    pub stored_bytes: u64,
}

/// What happens to the machine state (RAM image and device state) of the child.
#[derive(Debug, Clone, Default)]
pub enum MachineState {
    /// As the mount has it: the parent's, plus whatever was written to `memory.raw`.
    #[default]
    Keep,
    /// A suspend: the RAM as written to `memory.raw` and this device-state file.
    Suspended(std::path::PathBuf),
    /// The guest powered off: the child is a capsule to boot, with no RAM or device state.
    PoweredOff,
}

/// Beyond the overlays: machine state and VM hints of the child.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// RAM and device state.
    pub state: MachineState,
    /// Hints to set on the child's VM description (how the state was saved).
    pub hints: std::collections::BTreeMap<String, String>,
    /// The key of an encrypted capsule: its child is sealed with it too.
    pub key: Option<capsule_images::Key>,
}

/// Makes the mount at `mountpoint` complete its capsule's metadata in the cache (a
/// remote mount fetches map pages only as reads need them, but a child must name a
/// parent whose whole map is here). Call before [`commit`] while the mount is up.
pub fn complete_metadata(mountpoint: &std::path::Path) -> Result<()> {
    let path = mountpoint.join(".capsule/metadata");
    std::fs::read(&path).map(|_| ()).map_err(|e| Error::io(format!("completing the capsule's metadata through {} (see the mount's log)", path.display()), e))
}

/// Commits the overlays of mount `info` as capsule `name` in `target`. The parent's
/// metadata is copied into `target` if it is not there (its blocks stay where they are:
/// on the server for a remote mount), so the child can be pushed.
pub fn commit(info: &MountInfo, target: &Store, name: &str, options: &CommitOptions) -> Result<CommitReport> {
    capsule_images::manifest::check_name(name)?;
    let cache = Store::open(&info.cache_store)?;
    if cache.root() != target.root() {
        copy_metadata(&cache, target, &info.capsule_id)?;
    }
    // A capsule as deep as a chain may go: the child sits on a flattened copy (same bytes).
    let base_id = capsule_images::flatten::base_for_child(target, &info.capsule_id)?;
    let mut base = target.manifest(&base_id)?;
    if let Some(s) = &base.sealing {
        let capsule = format!("{} ({})", base.name, base_id.short());
        let key = options.key.as_ref().ok_or_else(|| {
            Error::from(capsule_images::Error::new(
                capsule_images::ErrorKind::NoKey,
                format!("capsule {capsule} is encrypted with key {}; its child is sealed with it, and no key was given", s.key_id),
            ))
        })?;
        key.check_opens(s, &capsule)?;
    }
    // The child of a plain capsule stays plain, whatever key was given.
    let key = base.sealing.as_ref().and(options.key.as_ref());
    if let Some(k) = key {
        base.open(k)?;
    }
    let overlay_dir = info.overlay_dir.as_ref().ok_or_else(|| Error::new(crate::error::ErrorKind::ReadOnly, "the mount is read-only: nothing to commit"))?;
    let mut child = base.clone();
    child.name = name.to_string();
    child.parent = Some(base_id);
    child.created_unix = now_unix();
    let mut report = CommitReport { id: base_id, changed_blocks: 0, memory_blocks: 0, stored_bytes: 0 };
    // Thousands of 4 KiB RAM blocks: one syncfs before anything names them, not one
    // fsync each.
    let was_durable = target.set_durable(false);
    let result = commit_overlays(target, overlay_dir, &base, &mut child, options, key, &mut report);
    target.set_durable(was_durable);
    result?;
    target.sync_filesystem()?;
    child.vm.hints.extend(options.hints.clone());
    child.validate()?;
    if let Some(k) = key {
        child.seal(k)?;
    }
    let (id, _) = target.put_manifest(&child)?;
    target.set_ref(name, &id)?;
    report.id = id;
    Ok(report)
}

fn commit_overlays(
    target: &Store,
    overlay_dir: &std::path::Path,
    base: &capsule_images::Manifest,
    child: &mut capsule_images::Manifest,
    options: &CommitOptions,
    key: Option<&capsule_images::Key>,
    report: &mut CommitReport,
) -> Result<()> {
    let seal = key;
    let mut commit_image = |slot: &Slot, image: &mut Image| -> Result<u64> {
        let key = slot.key();
        if !crate::overlay::exists(overlay_dir, &key) {
            return Ok(0);
        }
        let overlay = Overlay::open_read(overlay_dir, &key, image.size, image.block_size()).map_err(|e| Error::io(overlay_dir.display(), e))?;
        let reader = ImageReader::open(target, *image)?.with_key(seal.cloned());
        let mut entries = Vec::new();
        for (i, state) in overlay.changed() {
            let data = if state == DATA {
                Some(overlay.read_block(i).map_err(|e| Error::io(format!("overlay {key}"), e))?).filter(|d| !capsule_images::block::is_zero(d))
            } else {
                None
            };
            // Compared by plaintext hash: a sealed parent's entries name ciphertexts.
            let new_hash = data.as_deref().map(Hash::of);
            if new_hash == reader.content_hash_in_chain(i)? {
                continue;
            }
            let new = match (data, new_hash) {
                (Some(d), Some(h)) => {
                    let put = match seal {
                        Some(k) => target.put_sealed_block(k, &h, &d)?,
                        None => target.put_hashed_block(&h, &d)?,
                    };
                    report.stored_bytes += put.stored_bytes;
                    put.entry
                }
                _ => Entry::Zero,
            };
            entries.push((i, new));
        }
        if entries.is_empty() {
            return Ok(0);
        }
        report.changed_blocks += entries.len() as u64;
        let root = map::build(&entries, image.block_count(), &mut |page| Ok(target.put_object(ObjectKind::MapPage, page)?.0))?;
        let layer = Layer { block_size_log2: image.block_size_log2, parent: image.top, map: root, mapped: entries.len() as u64 };
        image.top = Some(target.put_object(ObjectKind::Layer, &layer)?.0);
        Ok(entries.len() as u64)
    };
    // Disks and boot files: each image's overlay, if written, becomes a layer. Memory and
    // device state depend on how the machine stopped (below).
    for (slot, _) in child.slots() {
        if matches!(slot, Slot::Disk(_) | Slot::Kernel | Slot::Initrd) {
            if let Some(image) = child.image_mut(&slot) {
                commit_image(&slot, image)?;
            }
        }
    }
    let mut memory_blocks = 0;
    match &options.state {
        MachineState::PoweredOff => {
            child.memory = None;
            child.devstate = None;
        }
        MachineState::Keep | MachineState::Suspended(_) => {
            // RAM a writable mount served as `memory.raw` (blank if the capsule never ran);
            // a blank one nothing wrote to stays out of the child.
            let mut memory = base.memory_or_blank();
            if crate::overlay::exists(overlay_dir, &Slot::Memory.key()) {
                memory_blocks = commit_image(&Slot::Memory, &mut memory)?;
            }
            if base.memory.is_some() || memory_blocks > 0 {
                child.memory = Some(memory);
            }
            if let MachineState::Suspended(path) = &options.state {
                let opts = capsule_images::import::FileImport {
                    block_size_log2: capsule_images::DEFAULT_BLOCK_SIZE_LOG2,
                    parent: None,
                    only: None,
                    threads: 1,
                    progress: &capsule_images::NoProgress,
                    key: seal,
                };
                let (image, stats) = capsule_images::import::import_file(target, path, &opts)?;
                child.devstate = Some(image);
                report.stored_bytes += stats.stored_bytes;
            } else if let Some(d) = child.devstate.as_mut() {
                commit_image(&Slot::Devstate, d)?;
            }
        }
    }
    report.memory_blocks = memory_blocks;
    Ok(())
}

/// Copies every metadata object capsule `id` reaches from `from` into `to`.
fn copy_metadata(from: &Store, to: &Store, id: &Hash) -> Result<()> {
    let (objects, _) = from.closure(id)?;
    for h in objects {
        if !to.has_object(&h) {
            let bytes = from.read_object(&h)?;
            let kind = peek_kind(&bytes).unwrap_or(ObjectKind::MapPage);
            to.put_encoded_object(kind, &h, &bytes)?;
        }
    }
    Ok(())
}
