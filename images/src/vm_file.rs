//! `capsule.json`: the VM description a mount shows, written by the mount and read by
//! `capsule run` and the hypervisor glue (one type, so writer and readers agree).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
