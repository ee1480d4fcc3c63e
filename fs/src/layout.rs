//! What a mount shows: the file of each image slot, the VM description (`capsule.json`)
//! and `.capsule/info.json`.

use std::path::PathBuf;

use capsule_images::vm_file::{MountedDisk, MountedFile, VmFile};
use capsule_images::{Hash, Image, Manifest, Slot};
use serde::{Deserialize, Serialize};

/// What `.capsule/info.json` says about a mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountInfo {
    /// The mounted capsule.
    pub capsule_id: Hash,
    /// Its name.
    pub name: String,
    /// Store holding its metadata and cached blocks.
    pub cache_store: PathBuf,
    /// Copy-on-write overlays of this capsule (absent for read-only mounts).
    pub overlay_dir: Option<PathBuf>,
    /// Where blocks come from (`local` or a capsule:// URL).
    pub source: String,
    /// The serving process.
    pub pid: u32,
    /// (file name, slot) of each image file.
    pub files: Vec<(String, Slot)>,
    /// The kernel readahead the mount asked for (0: a RAM fault reads one page).
    #[serde(default)]
    pub kernel_readahead: Option<u32>,
}

/// (file name, slot, image) of each image file. A writable mount always has
/// `memory.raw`, blank if the capsule never ran, so a guest's RAM can live there.
pub fn image_files(m: &Manifest, writable: bool) -> Vec<(String, Slot, Image)> {
    let (memory_name, devstate_name) = state_file_names(m);
    let mut slots = m.slots();
    if m.memory.is_none() && writable && m.vm.memory_mib > 0 {
        let at = slots.iter().position(|(s, _)| !matches!(s, Slot::Disk(_))).unwrap_or(slots.len());
        slots.insert(at, (Slot::Memory, m.memory_or_blank()));
    }
    slots
        .into_iter()
        .map(|(slot, image)| {
            let name = match slot {
                Slot::Memory => memory_name.to_string(),
                Slot::Devstate => devstate_name.to_string(),
                _ => slot.file_name(),
            };
            (name, slot, image)
        })
        .collect()
}

/// File names of the RAM image and device state: a Cloud Hypervisor snapshot's own names
/// (`memory-ranges`, `state.json`), so the mount is a snapshot directory; else QEMU's.
fn state_file_names(m: &Manifest) -> (&'static str, &'static str) {
    if m.vm.hints.contains_key(capsule_images::manifest::HINT_CHV_CONFIG) {
        ("memory-ranges", "state.json")
    } else {
        ("memory.raw", "devstate.bin") // Slot::Memory / Slot::Devstate file_name()
    }
}

/// The VM description as `capsule.json` shows it.
pub fn vm_json(id: &Hash, m: &Manifest) -> VmFile {
    let (memory_name, devstate_name) = state_file_names(m);
    VmFile {
        capsule: m.name.clone(),
        id: id.to_hex(),
        parent: m.parent.map(|p| p.to_hex()),
        cpus: m.vm.cpus,
        memory_mib: m.vm.memory_mib,
        hypervisor: m.vm.hypervisor.clone(),
        hints: m.vm.hints.clone(),
        disks: m.disks.iter().map(|d| MountedDisk { name: d.name.clone(), file: Slot::Disk(d.name.clone()).file_name(), size: d.image.size }).collect(),
        memory: m.memory.map(|i| MountedFile { file: memory_name.into(), size: i.size }),
        suspended: m.devstate.is_some(),
        devstate: m.devstate.map(|_| devstate_name.into()),
        kernel: m.boot.as_ref().map(|_| Slot::Kernel.file_name()),
        initrd: m.boot.as_ref().and_then(|b| b.initrd).map(|_| Slot::Initrd.file_name()),
        cmdline: m.boot.as_ref().map(|b| b.cmdline.clone()),
    }
}
