//! What a mount shows: the file of each image slot (named by the capsule's
//! [`MountLayout`]), the VM description (`capsule.json`) and `.capsule/info.json`.

use std::path::Path;

use capsule_images::vm_file::{MountedDisk, MountedFile, VmFile};
use capsule_images::{Hash, Image, Manifest, MountLayout, Slot};

pub use capsule_images::MountInfo;

use crate::error::{Error, ErrorKind, Result};

/// (file name, slot, image) of each image file. A writable mount always has a RAM image,
/// blank if the capsule never ran, so a guest's RAM can live there.
pub fn image_files(m: &Manifest, writable: bool, layout: &MountLayout) -> Vec<(String, Slot, Image)> {
    let mut slots = m.slots();
    if m.memory.is_none() && writable && m.vm.memory_mib > 0 {
        let at = slots.iter().position(|(s, _)| !matches!(s, Slot::Disk(_))).unwrap_or(slots.len());
        slots.insert(at, (Slot::Memory, m.memory_or_blank()));
    }
    slots.into_iter().map(|(slot, image)| (layout.file_name(&slot), slot, image)).collect()
}

/// The VM description as `capsule.json` shows it.
pub fn vm_json(id: &Hash, m: &Manifest, layout: &MountLayout) -> VmFile {
    VmFile {
        capsule: m.name.clone(),
        id: id.to_hex(),
        parent: m.parent.map(|p| p.to_hex()),
        cpus: m.vm.cpus,
        memory_mib: m.vm.memory_mib,
        hypervisor: m.vm.hypervisor.clone(),
        hints: m.vm.hints.clone(),
        disks: m.disks.iter().map(|d| MountedDisk { name: d.name.clone(), file: layout.file_name(&Slot::Disk(d.name.clone())), size: d.image.size }).collect(),
        memory: m.memory.map(|i| MountedFile { file: layout.file_name(&Slot::Memory), size: i.size }),
        suspended: m.devstate.is_some(),
        devstate: m.devstate.map(|_| layout.file_name(&Slot::Devstate)),
        kernel: m.boot.as_ref().map(|_| layout.file_name(&Slot::Kernel)),
        initrd: m.boot.as_ref().and_then(|b| b.initrd).map(|_| layout.file_name(&Slot::Initrd)),
        cmdline: m.boot.as_ref().map(|b| b.cmdline.clone()),
    }
}

/// Largest `info.json` read back (a few hundred bytes per file of the mount).
const MAX_INFO: u64 = 1 << 20;

/// What the mount at `mountpoint` says about itself (`.capsule/info.json`): the one reader
/// of it, for whoever acts on a mount from outside (commit, umount, takeover, run).
pub fn read_info(mountpoint: &Path) -> Result<MountInfo> {
    let path = mountpoint.join(".capsule/info.json");
    let not_a_mount = |e: std::io::Error| Error::io(format!("{} is not a capsule mount (reading {})", mountpoint.display(), path.display()), e);
    let len = std::fs::metadata(&path).map_err(not_a_mount)?.len();
    if len > MAX_INFO {
        return Err(Error::new(ErrorKind::Invalid, format!("{}: {len} bytes, more than the {MAX_INFO} a mount writes", path.display())));
    }
    let bytes = std::fs::read(&path).map_err(not_a_mount)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::caused_by(ErrorKind::Invalid, format!("{}: not what a capsule mount writes", path.display()), e))
}
