//! What a mount shows: the file of each image slot, the VM description (`capsule.json`)
//! and `.capsule/info.json`.

use std::path::PathBuf;

use capsule_images::{Hash, Image, Manifest};
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
    /// (file name, overlay key) of each image file.
    pub files: Vec<(String, String)>,
    /// The kernel readahead the mount asked for (0: a RAM fault reads one page).
    #[serde(default)]
    pub kernel_readahead: Option<u32>,
}

/// (file name, overlay key, image) of each image file. A writable mount always has
/// `memory.raw`, blank if the capsule never ran, so a guest's RAM can live there.
pub fn image_files(m: &Manifest, writable: bool) -> Vec<(String, String, Image)> {
    let mut out: Vec<(String, String, Image)> = m.disks.iter().map(|d| (format!("{}.raw", d.name), format!("disk-{}", d.name), d.image)).collect();
    let (memory_name, devstate_name) = state_file_names(m);
    if m.memory.is_some() || (writable && m.vm.memory_mib > 0) {
        out.push((memory_name.into(), "memory".into(), m.memory_or_blank()));
    }
    if let Some(i) = m.devstate {
        out.push((devstate_name.into(), "devstate".into(), i));
    }
    if let Some(b) = &m.boot {
        out.push(("vmlinuz".into(), "kernel".into(), b.kernel));
        if let Some(i) = b.initrd {
            out.push(("initrd.img".into(), "initrd".into(), i));
        }
    }
    out
}

/// File names of the RAM image and device state: a Cloud Hypervisor snapshot's own names
/// (`memory-ranges`, `state.json`), so the mount is a snapshot directory; else QEMU's.
fn state_file_names(m: &Manifest) -> (&'static str, &'static str) {
    if m.vm.hints.contains_key(capsule_images::manifest::HINT_CHV_CONFIG) {
        ("memory-ranges", "state.json")
    } else {
        ("memory.raw", "devstate.bin")
    }
}

/// The VM description as `capsule.json` shows it.
pub fn vm_json(id: &Hash, m: &Manifest) -> serde_json::Value {
    serde_json::json!({
        "capsule": m.name, "id": id.to_hex(), "parent": m.parent.map(|p| p.to_hex()),
        "cpus": m.vm.cpus, "memory_mib": m.vm.memory_mib, "hypervisor": m.vm.hypervisor, "hints": m.vm.hints,
        "disks": m.disks.iter().map(|d| serde_json::json!({"name": d.name, "file": format!("{}.raw", d.name), "size": d.image.size})).collect::<Vec<_>>(),
        "memory": m.memory.map(|i| serde_json::json!({"file": state_file_names(m).0, "size": i.size})),
        "suspended": m.devstate.is_some(),
        "devstate": m.devstate.map(|_| state_file_names(m).1),
        "kernel": m.boot.as_ref().map(|_| "vmlinuz"),
        "initrd": m.boot.as_ref().and_then(|b| b.initrd).map(|_| "initrd.img"),
        "cmdline": m.boot.as_ref().map(|b| b.cmdline.clone()),
    })
}
