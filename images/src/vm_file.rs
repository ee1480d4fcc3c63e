//! What a mount says about itself: `capsule.json` (the VM description, read by `capsule
//! run` and the hypervisor glue) and `.capsule/info.json` (the mount's own facts, read by
//! `commit`, `umount`, `takeover`, and carried from `run` to `suspend` in the run's record).
//! One type each, so the mount writing them and their readers agree.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Hash, Slot};

/// `.capsule/info.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// A file of the mount and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountedFile {
    /// File name in the mount.
    pub file: String,
    /// Bytes.
    pub size: u64,
}

/// A disk as the mount shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountedDisk {
    /// The disk's name in the manifest.
    pub name: String,
    /// File name in the mount.
    pub file: String,
    /// Bytes.
    pub size: u64,
}

/// `capsule.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFile {
    /// The capsule's name.
    pub capsule: String,
    /// Its id (hex).
    pub id: String,
    /// Its parent's id (hex).
    pub parent: Option<String>,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Preferred hypervisor.
    pub hypervisor: Option<String>,
    /// Hints (checked by whoever acts on them).
    #[serde(default)]
    pub hints: BTreeMap<String, String>,
    /// Disks in attachment order.
    pub disks: Vec<MountedDisk>,
    /// The guest RAM image, if the capsule has one.
    pub memory: Option<MountedFile>,
    /// A suspended machine: resume it from its device state.
    pub suspended: bool,
    /// The device state's file name.
    pub devstate: Option<String>,
    /// The kernel's file name (direct boot).
    pub kernel: Option<String>,
    /// The initrd's file name.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: Option<String>,
}
