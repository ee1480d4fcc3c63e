//! The image slots of a capsule, listed once: each has a key (overlay files, a mount's
//! `info.json`), a label for people, a file name, and a place in the manifest. Mount,
//! commit, export and status walk [`Manifest::slots`] instead of spelling keys that must
//! agree. A hypervisor that expects other file names gets them through a [`MountLayout`],
//! which its glue (`capsule-vmm-glue`) makes: this crate knows no hypervisor.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::manifest::{Image, Manifest};

/// One image of a capsule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Slot {
    /// A disk, by its name in the manifest.
    Disk(String),
    /// Guest RAM.
    Memory,
    /// Hypervisor device state.
    Devstate,
    /// Direct-boot kernel.
    Kernel,
    /// Its initial ramdisk.
    Initrd,
}

impl Slot {
    /// The slot's key: `disk-NAME`, `memory`, `devstate`, `kernel`, `initrd` (file names
    /// of overlays; disk names cannot contain '/').
    pub fn key(&self) -> String {
        match self {
            Slot::Disk(name) => format!("disk-{name}"),
            Slot::Memory => "memory".into(),
            Slot::Devstate => "devstate".into(),
            Slot::Kernel => "kernel".into(),
            Slot::Initrd => "initrd".into(),
        }
    }

    /// The slot a key names.
    pub fn from_key(key: &str) -> Option<Slot> {
        Some(match key {
            "memory" => Slot::Memory,
            "devstate" => Slot::Devstate,
            "kernel" => Slot::Kernel,
            "initrd" => Slot::Initrd,
            _ => Slot::Disk(key.strip_prefix("disk-").filter(|n| !n.is_empty())?.to_string()),
        })
    }

    /// The slot's own file name (a mount's, `capsule export`'s): `NAME.raw`, `memory.raw`,
    /// `devstate.bin`, `vmlinuz`, `initrd.img`.
    pub fn file_name(&self) -> String {
        match self {
            Slot::Disk(name) => format!("{name}.raw"),
            Slot::Memory => "memory.raw".into(),
            Slot::Devstate => "devstate.bin".into(),
            Slot::Kernel => "vmlinuz".into(),
            Slot::Initrd => "initrd.img".into(),
        }
    }
}

impl fmt::Display for Slot {
    /// For people: `disk root`, `memory`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Slot::Disk(name) => write!(f, "disk {name}"),
            other => f.write_str(&other.key()),
        }
    }
}

impl From<Slot> for String {
    fn from(s: Slot) -> String {
        s.key()
    }
}

impl TryFrom<String> for Slot {
    type Error = String;
    fn try_from(key: String) -> Result<Slot, String> {
        Slot::from_key(&key).ok_or_else(|| format!("not an image slot: {key:?}"))
    }
}

/// How a mount shows a capsule where its hypervisor wants more than each slot under its
/// own file name: other names for some slots, and small files made for the mount point
/// (a hypervisor config naming the mount's files). Made by the hypervisor glue from the
/// capsule's manifest ([`LayoutFn`]); the mount only shows what it says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountLayout {
    /// Slots shown under another name than [`Slot::file_name`].
    pub renamed: std::collections::BTreeMap<Slot, String>,
    /// (file name, bytes) of further files, after the image files.
    pub extra: Vec<(String, Vec<u8>)>,
}

impl MountLayout {
    /// The file name `slot` is shown under.
    pub fn file_name(&self, slot: &Slot) -> String {
        self.renamed.get(slot).cloned().unwrap_or_else(|| slot.file_name())
    }
}

/// Makes the [`MountLayout`] of a capsule (its manifest, opened if sealed) mounted at a path.
pub type LayoutFn = fn(&Manifest, &std::path::Path) -> MountLayout;

impl Manifest {
    /// Every image the capsule has, by slot, in order: disks, memory, devstate, kernel, initrd.
    pub fn slots(&self) -> Vec<(Slot, Image)> {
        let mut out: Vec<(Slot, Image)> = self.disks.iter().map(|d| (Slot::Disk(d.name.clone()), d.image)).collect();
        out.extend(self.memory.map(|i| (Slot::Memory, i)));
        out.extend(self.devstate.map(|i| (Slot::Devstate, i)));
        if let Some(b) = &self.boot {
            out.push((Slot::Kernel, b.kernel));
            out.extend(b.initrd.map(|i| (Slot::Initrd, i)));
        }
        out
    }

    /// The image in `slot`, if the capsule has one there.
    pub fn image_mut(&mut self, slot: &Slot) -> Option<&mut Image> {
        match slot {
            Slot::Disk(name) => self.disks.iter_mut().find(|d| d.name == *name).map(|d| &mut d.image),
            Slot::Memory => self.memory.as_mut(),
            Slot::Devstate => self.devstate.as_mut(),
            Slot::Kernel => self.boot.as_mut().map(|b| &mut b.kernel),
            Slot::Initrd => self.boot.as_mut().and_then(|b| b.initrd.as_mut()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_round_trip_and_strangers_are_refused() {
        for s in [Slot::Disk("root".into()), Slot::Disk("disk-x".into()), Slot::Memory, Slot::Devstate, Slot::Kernel, Slot::Initrd] {
            assert_eq!(Slot::from_key(&s.key()), Some(s.clone()));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<Slot>(&json).unwrap(), s);
        }
        assert_eq!(Slot::from_key("disk-"), None);
        assert_eq!(Slot::from_key("swap"), None);
        assert!(serde_json::from_str::<Slot>("\"swap\"").is_err());
        assert_eq!(Slot::Disk("root".into()).to_string(), "disk root");
    }
}
