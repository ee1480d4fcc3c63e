//! Capsule manifests and layers: the metadata objects above the block maps.
//!
//! ```text
//!  Manifest (id = BLAKE3 of its envelope)          Layer (id = BLAKE3 of its envelope)
//!  +--------------------------------------+        +-------------------------------+
//!  | name, created (unix s)               |        | block_size_log2               |
//!  | parent: capsule id | none            |        | parent: layer id | none       |
//!  | disks: [(name, Image)]               |  +---->| map: (height, root page id)   |
//!  | memory: Image | none                 |  |     | mapped: entries in the map    |
//!  | devstate: Image | none               |  |     +-------------------------------+
//!  | boot: (kernel, initrd?, cmdline)?    |  |        parent -> the layer below, same
//!  | vm: (cpus, memory MiB, hypervisor,   |  |        block size; block i is read from the
//!  |      hints)                          |  |        topmost layer that maps it, else 0
//!  +--------------------------------------+  |
//!  Image = (size, block_size_log2, top layer id | none) ---+
//! ```
//!
//! A derived capsule (an update, a suspended session) names its parent and its images'
//! top layers sit over the parent's, holding only the blocks that changed.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::block::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use crate::envelope::{self, ObjectKind};
use crate::error::{Error, ErrorKind, Result};
use crate::hash::Hash;
use crate::map::MapRoot;
use crate::seal::{Key, Sealing};

/// Longest layer chain accepted when resolving (guards against cycles and abuse).
pub const MAX_CHAIN: usize = 256;

/// A byte image (disk, memory image, device state, boot file) as a chain of layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Size in bytes.
    pub size: u64,
    /// Block size as a power of two (12 = 4 KiB .. 20 = 1 MiB).
    pub block_size_log2: u8,
    /// Topmost layer, `None` for an all-zero image.
    pub top: Option<Hash>,
}

impl Image {
    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        1u64 << self.block_size_log2
    }

    /// Number of blocks, the last one possibly partial.
    pub fn block_count(&self) -> u64 {
        self.size.div_ceil(self.block_size())
    }

    /// Checks the block size is in range and the size under [`MAX_IMAGE_SIZE`]: a capsule
    /// from elsewhere sizes overlays, maps and loops over blocks by it.
    pub fn validate(&self) -> Result<()> {
        check_block_size_log2(self.block_size_log2)?;
        if self.size > MAX_IMAGE_SIZE {
            return Err(Error::new(ErrorKind::TooLarge, format!("image of {} bytes exceeds the cap of {MAX_IMAGE_SIZE} (16 TiB)", self.size)));
        }
        Ok(())
    }
}

/// Largest image a capsule may hold (disk or RAM): 16 TiB.
pub const MAX_IMAGE_SIZE: u64 = 1 << 44;

/// Most RAM a capsule's VM may ask for, in MiB (the blank RAM image of a writable mount is
/// sized by it): 4 TiB.
pub const MAX_MEMORY_MIB: u64 = 4 << 20;

/// Checks `log2` names a block size from 4 KiB to 1 MiB.
pub fn check_block_size_log2(log2: u8) -> Result<()> {
    let min = MIN_BLOCK_SIZE.trailing_zeros();
    let max = MAX_BLOCK_SIZE.trailing_zeros();
    if u32::from(log2) < min || u32::from(log2) > max {
        return Err(Error::invalid(format!("block size 2^{log2} outside 4 KiB .. 1 MiB")));
    }
    Ok(())
}

/// One layer of an image: the blocks it changes over the layer below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Block size as a power of two; every layer of a chain has the same.
    pub block_size_log2: u8,
    /// The layer below, if any.
    pub parent: Option<Hash>,
    /// The block map.
    pub map: MapRoot,
    /// Number of entries in the map (blocks this layer sets, zeros included).
    pub mapped: u64,
}

/// A named disk of a capsule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// File-name-safe name, e.g. `root`.
    pub name: String,
    /// Its content.
    pub image: Image,
}

/// Kernel, initrd and command line for a direct-kernel boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFiles {
    /// The kernel image.
    pub kernel: Image,
    /// The initial ramdisk, if any.
    pub initrd: Option<Image>,
    /// Kernel command line.
    pub cmdline: String,
}

/// How to run the capsule: what a hypervisor needs beyond the files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Preferred hypervisor (`qemu`, `cloud-hypervisor`), if it matters.
    pub hypervisor: Option<String>,
    /// Free-form hints (machine type, QEMU version that saved the state, ...).
    pub hints: BTreeMap<String, String>,
}

impl Default for VmDescription {
    fn default() -> Self {
        Self { cpus: 1, memory_mib: 256, hypervisor: None, hints: BTreeMap::new() }
    }
}

/// A capsule: everything needed to run one virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The name given at import.
    pub name: String,
    /// The capsule this one derives from.
    pub parent: Option<Hash>,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Disks in attachment order.
    pub disks: Vec<Disk>,
    /// Guest RAM image (a suspended session).
    pub memory: Option<Image>,
    /// Hypervisor device state (e.g. a QEMU migration stream).
    pub devstate: Option<Image>,
    /// Direct-boot files.
    pub boot: Option<BootFiles>,
    /// The VM description.
    pub vm: VmDescription,
    /// How its blocks are sealed (an encrypted capsule, see `seal`), in the clear: which
    /// key opens it. Encoded after the rest, and only when set, so a plain capsule's
    /// manifest has the bytes (and id) it had before sealing existed.
    #[serde(skip)]
    pub sealing: Option<Sealing>,
}

/// The fields an encrypted capsule's manifest hides from the server: the boot command line
/// and the VM hints (a run's kernel command line among them).
#[derive(Debug, Serialize, Deserialize)]
struct HiddenFields {
    cmdline: Option<String>,
    hints: BTreeMap<String, String>,
    hypervisor: Option<String>,
}

impl Manifest {
    /// The manifest's envelope. A sealed manifest must be sealed ([`Manifest::seal`])
    /// first: its hidden fields are never written in the clear.
    pub fn encode(&self) -> Result<Vec<u8>> {
        match &self.sealing {
            None => envelope::encode(ObjectKind::Manifest, self),
            Some(s) => {
                if self.boot.as_ref().is_some_and(|b| !b.cmdline.is_empty()) || !self.vm.hints.is_empty() || self.vm.hypervisor.is_some() {
                    return Err(Error::invalid(format!("manifest of {}: encrypted, and its hidden fields are not sealed", self.name)));
                }
                envelope::encode(ObjectKind::Manifest, &(self, s))
            }
        }
    }

    /// Seals the manifest with `key`: its hidden fields (boot command line, VM hints and
    /// hypervisor) move into its sealing header, encrypted.
    pub fn seal(&mut self, key: &Key) -> Result<()> {
        let hidden = HiddenFields {
            cmdline: self.boot.as_mut().map(|b| std::mem::take(&mut b.cmdline)),
            hints: std::mem::take(&mut self.vm.hints),
            hypervisor: self.vm.hypervisor.take(),
        };
        let plain = postcard::to_stdvec(&hidden).map_err(|e| Error::invalid(format!("cannot encode manifest fields: {e}")))?;
        self.sealing = Some(Sealing { secrets: key.seal_secrets(&plain)?, ..key.sealing() });
        Ok(())
    }

    /// Opens a sealed manifest's hidden fields with `key` (which must be its key); a plain
    /// manifest is left as it is.
    pub fn open(&mut self, key: &Key) -> Result<()> {
        let Some(s) = &self.sealing else { return Ok(()) };
        let capsule = self.name.clone();
        key.check_opens(s, &capsule)?;
        if s.secrets.is_empty() {
            return Ok(());
        }
        let plain = key.open_secrets(&s.secrets, &capsule)?;
        let hidden: HiddenFields = postcard::from_bytes(&plain).map_err(|e| Error::corrupt(format!("capsule {capsule}: sealed manifest fields: {e}")))?;
        if let (Some(b), Some(c)) = (self.boot.as_mut(), hidden.cmdline) {
            b.cmdline = c;
        }
        self.vm.hints = hidden.hints;
        self.vm.hypervisor = hidden.hypervisor;
        Ok(())
    }

    /// A manifest from its envelope (sealing header included), not yet validated.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let payload = envelope::open(ObjectKind::Manifest, bytes)?;
        let undecodable = |e: postcard::Error| Error::corrupt(format!("manifest: undecodable payload: {e}"));
        let (mut m, rest): (Manifest, _) = postcard::take_from_bytes(payload).map_err(undecodable)?;
        if !rest.is_empty() {
            let (sealing, rest): (Sealing, _) = postcard::take_from_bytes(rest).map_err(undecodable)?;
            if !rest.is_empty() {
                return Err(Error::corrupt(format!("manifest: {} trailing bytes after payload", rest.len())));
            }
            m.sealing = Some(sealing);
        }
        Ok(m)
    }

    /// As [`Manifest::decode`], after checking the bytes hash to `id`.
    pub fn decode_verified(id: &Hash, bytes: &[u8]) -> Result<Self> {
        let actual = Hash::of(bytes);
        if actual != *id {
            return Err(Error::corrupt(format!("manifest {id}: content hashes to {actual}")));
        }
        Self::decode(bytes).map_err(|e| e.context(format!("manifest {id}")))
    }
}

/// Block size of the guest RAM image a running capsule gets when it has none: the page
/// size, so a resume fetches the pages the guest touches and a suspend stores the pages it
/// dirtied, not 64 KiB around each.
pub const MEMORY_BLOCK_SIZE_LOG2: u8 = 12;

impl Manifest {
    /// The guest RAM image, or for a capsule that never ran, an all-zero one of the VM's
    /// memory size: where a running guest's RAM lives so a suspend can keep it.
    pub fn memory_or_blank(&self) -> Image {
        self.memory.unwrap_or(Image { size: self.vm.memory_mib << 20, block_size_log2: MEMORY_BLOCK_SIZE_LOG2, top: None })
    }

    /// Every image of the capsule with a display name: `disk root`, `memory`, ... (see
    /// [`Manifest::slots`]).
    pub fn images(&self) -> Vec<(String, Image)> {
        self.slots().into_iter().map(|(slot, image)| (slot.to_string(), image)).collect()
    }

    /// Checks names and block sizes; decoders call this after decoding.
    pub fn validate(&self) -> Result<()> {
        check_name(&self.name)?;
        let mut seen = std::collections::BTreeSet::new();
        for d in &self.disks {
            check_disk_name(&d.name)?;
            if !seen.insert(&d.name) {
                return Err(Error::corrupt(format!("disk name {:?} appears twice", d.name)));
            }
        }
        for (what, image) in self.images() {
            image.validate().map_err(|e| e.context(what))?;
        }
        if self.vm.memory_mib > MAX_MEMORY_MIB {
            return Err(Error::new(ErrorKind::TooLarge, format!("VM memory of {} MiB exceeds the cap of {MAX_MEMORY_MIB} MiB", self.vm.memory_mib)));
        }
        Ok(())
    }
}

/// Checks a capsule or ref name: `[A-Za-z0-9._-]` segments separated by `/`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name.split('/').all(|seg| !seg.is_empty() && !seg.starts_with('.') && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!("invalid capsule name {name:?}: use letters, digits, '.', '_', '-' in '/'-separated parts not starting with '.'")))
    }
}

/// Checks a disk name: one path segment usable as a file name.
pub fn check_disk_name(name: &str) -> Result<()> {
    if name.contains('/') {
        return Err(Error::invalid(format!("invalid disk name {name:?}: no '/' allowed")));
    }
    check_name(name).map_err(|_| Error::invalid(format!("invalid disk name {name:?}: use letters, digits, '.', '_', '-'")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let image = Image { size: 1 << 30, block_size_log2: 16, top: Some(Hash([3; 32])) };
        Manifest {
            name: "demo/guest".into(),
            parent: Some(Hash([1; 32])),
            created_unix: 1_790_000_000,
            disks: vec![Disk { name: "root".into(), image }],
            memory: Some(image),
            devstate: None,
            boot: Some(BootFiles { kernel: image, initrd: None, cmdline: "console=ttyS0".into() }),
            vm: VmDescription::default(),
            sealing: None,
        }
    }

    #[test]
    fn sealing_round_trips_and_leaves_plain_manifests_as_they_were() {
        let plain = sample();
        let bytes = plain.encode().unwrap();
        assert_eq!(bytes, envelope::encode(ObjectKind::Manifest, &plain).unwrap());
        assert_eq!(Manifest::decode(&bytes).unwrap(), plain);
        let key = Key::from_secrets([1; 32], None);
        let mut sealed = plain.clone();
        sealed.vm.hints.insert("qemu.append".into(), "gtoken=SECRETMARKER".into());
        let opened = sealed.clone();
        assert!(Manifest { sealing: Some(key.sealing()), ..sealed.clone() }.encode().is_err(), "hidden fields written in the clear");
        sealed.seal(&key).unwrap();
        let bytes = sealed.encode().unwrap();
        assert!(!bytes.windows(12).any(|w| w == b"SECRETMARKER") && !bytes.windows(13).any(|w| w == b"console=ttyS0"));
        let mut back = Manifest::decode(&bytes).unwrap();
        assert_eq!(back, sealed);
        assert_eq!(back.open(&Key::from_secrets([2; 32], None)).unwrap_err().kind(), ErrorKind::NoKey);
        back.open(&key).unwrap();
        assert_eq!(Manifest { sealing: None, ..back }, opened);
        let mut longer = envelope::open(ObjectKind::Manifest, &bytes).unwrap().to_vec();
        longer.push(0);
        let bytes = envelope::encode(ObjectKind::Manifest, &RawBytes(longer)).unwrap();
        assert!(Manifest::decode(&bytes).is_err());
    }

    /// Serializes as its bytes, with no length prefix (postcard tuples of u8).
    struct RawBytes(Vec<u8>);
    impl Serialize for RawBytes {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            use serde::ser::SerializeTuple;
            let mut t = s.serialize_tuple(self.0.len())?;
            for b in &self.0 {
                t.serialize_element(b)?;
            }
            t.end()
        }
    }

    #[test]
    fn manifest_round_trip_and_small() {
        let m = sample();
        let bytes = envelope::encode(ObjectKind::Manifest, &m).unwrap();
        assert!(bytes.len() < 512, "manifest is {} bytes", bytes.len());
        let back: Manifest = envelope::decode(ObjectKind::Manifest, &bytes).unwrap();
        assert_eq!(back, m);
        // Canonical: same value, same bytes, same id.
        assert_eq!(envelope::encode(ObjectKind::Manifest, &back).unwrap(), bytes);
    }

    #[test]
    fn names() {
        assert!(check_name("a/b-1.2_x").is_ok());
        for bad in ["", "a//b", "../x", "a/.b", "a b", "a\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_disk_name("a/b").is_err());
    }

    #[test]
    fn duplicate_disks_refused() {
        let mut m = sample();
        m.disks.push(m.disks[0].clone());
        assert!(m.validate().is_err());
    }
}

/// Most blocks a profile lists (its envelope stays under 1 MiB).
pub const MAX_PROFILE_BLOCKS: usize = 32_000;

/// A working-set profile: the blocks a run of the capsule touched, in first-touch order,
/// across all its images. Kept beside the capsule (`STORE/profiles/<capsule id>/<name>`)
/// and pushed and pulled with it, so the next machine can fetch them ahead of need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The capsule it was recorded on.
    pub capsule: Hash,
    /// Its name (`boot`, ...).
    pub name: String,
    /// Block hashes, first touch first; zero blocks are never listed.
    pub blocks: Vec<Hash>,
}

#[cfg(test)]
mod size_cap_tests {
    use super::*;

    #[test]
    fn images_and_ram_beyond_their_caps_are_refused() {
        let ok = Image { size: MAX_IMAGE_SIZE, block_size_log2: 16, top: None };
        assert!(ok.validate().is_ok());
        let big = Image { size: MAX_IMAGE_SIZE + 1, ..ok };
        assert_eq!(big.validate().unwrap_err().kind(), ErrorKind::TooLarge);
    }
}
