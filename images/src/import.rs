//! Whole capsules from their parts: disks (raw, or qcow2 chains through [`crate::qcow2`]),
//! RAM, device state and boot files, each through [`crate::ingest`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result, ResultExt};
use crate::hash::Hash;
use crate::image::ImageReader;
use crate::manifest::{check_block_size_log2, check_disk_name, check_name, BootFiles, Disk, Image, Manifest};
use crate::store::Store;

pub use crate::ingest::{import_file, FileImport, ImportStats, NoProgress, Progress, DEFAULT_BLOCK_SIZE_LOG2};

/// Everything `capsule import` takes.
#[derive(Debug, Clone, Default)]
pub struct CapsuleSpec {
    /// Name for the new ref.
    pub name: String,
    /// (disk name, file) pairs; raw or qcow2 (with its backing chain).
    pub disks: Vec<(String, PathBuf)>,
    /// Guest RAM image.
    pub memory: Option<PathBuf>,
    /// Hypervisor device state.
    pub devstate: Option<PathBuf>,
    /// Kernel for direct boot.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Parent capsule (name or id): disks with the same name become layers over its.
    pub parent: Option<String>,
    /// Block size; default: the parent's, else [`DEFAULT_BLOCK_SIZE_LOG2`].
    pub block_size_log2: Option<u8>,
    /// VM description overrides.
    pub cpus: Option<u32>,
    /// Guest RAM in MiB.
    pub memory_mib: Option<u64>,
    /// Preferred hypervisor.
    pub hypervisor: Option<String>,
    /// Extra hints.
    pub hints: Vec<(String, String)>,
    /// What the disk files are (`None`: raw, and a file that looks like qcow2 is refused
    /// rather than guessed at).
    pub disk_format: Option<DiskFormat>,
    /// Backing files a qcow2 disk may name (each file of its chain below the top).
    pub backing_files: Vec<PathBuf>,
    /// Seal the capsule with this key (an encrypted capsule; see `seal`).
    pub key: Option<crate::seal::Key>,
}

/// The format of a disk file, as the user names it (never probed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// The bytes as they are.
    Raw,
    /// A qcow2 file; its backing chain only as far as `backing_files` allow.
    Qcow2,
}

/// What [`import_capsule`] made.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The new capsule's id.
    pub id: Hash,
    /// Per image (`disk root`, `memory`, ...): its counters.
    pub images: Vec<(String, ImportStats)>,
    /// Layers shared with what the store had already (qcow2 backing files imported before).
    pub shared_layers: u64,
    /// Manifest size in bytes.
    pub manifest_bytes: u64,
}

/// True if the file starts with the qcow2 magic.
pub fn is_qcow2(path: &Path) -> Result<bool> {
    let f = File::open(path).map_err(|e| Error::io(path.display(), e))?;
    let mut magic = [0u8; 4];
    match f.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(&magic == b"QFI\xfb"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io(path.display(), e)),
    }
}

/// Imports a capsule from its parts and points ref `spec.name` at it (last, atomically).
pub fn import_capsule(store: &Store, spec: &CapsuleSpec, progress: &dyn Progress) -> Result<ImportReport> {
    check_name(&spec.name)?;
    let mut parent = match &spec.parent {
        Some(p) => {
            // A parent as deep as a chain may go gets a flattened copy to sit on.
            let id = crate::flatten::base_for_child(store, &store.resolve(p).with_context(|| "--parent")?).with_context(|| "--parent")?;
            Some((id, store.manifest(&id).with_context(|| format!("parent capsule {p}"))?))
        }
        None => None,
    };
    if let Some((id, m)) = &parent {
        match (&m.sealing, &spec.key) {
            (None, None) => {}
            (Some(s), Some(k)) => k.check_opens(s, &format!("{} ({id})", m.name)).with_context(|| "--parent")?,
            (Some(s), None) => {
                return Err(Error::new(
                    crate::ErrorKind::NoKey,
                    format!("--parent: capsule {} is encrypted with key {}; its child must be too (--key)", m.name, s.key_id),
                ))
            }
            (None, Some(_)) => return Err(Error::invalid(format!("--parent: capsule {} is not encrypted; an encrypted capsule cannot sit on it", m.name))),
        }
    }
    if let (Some((_, m)), Some(k)) = (parent.as_mut(), &spec.key) {
        // The child inherits the parent's hidden fields (boot command line, VM hints).
        m.open(k).with_context(|| "--parent")?;
    }
    let parent_bs = parent.as_ref().and_then(|(_, m)| m.disks.first().map(|d| d.image.block_size_log2));
    let bs = spec.block_size_log2.or(parent_bs).unwrap_or(DEFAULT_BLOCK_SIZE_LOG2);
    check_block_size_log2(bs)?;

    let mut report = ImportReport { id: Hash([0; 32]), images: Vec::new(), shared_layers: 0, manifest_bytes: 0 };
    let mut import_one = |what: String, path: &Path, base: Option<Image>| -> Result<Image> {
        let reader =
            base.map(|b| ImageReader::open(store, b).map(|r| r.with_key(spec.key.clone()))).transpose().with_context(|| format!("{what}: parent image"))?;
        let size = std::fs::metadata(path).map_err(|e| Error::io(path.display(), e))?.len();
        // Only disks may be qcow2, and only when the user says so.
        let qcow2 = match (what.starts_with("disk "), spec.disk_format) {
            (false, _) | (true, Some(DiskFormat::Raw)) => false,
            (true, Some(DiskFormat::Qcow2)) => {
                if !is_qcow2(path)? {
                    return Err(Error::invalid(format!("{what}: {} is not a qcow2 file (no qcow2 magic), but --disk-format qcow2 says so", path.display())));
                }
                true
            }
            (true, None) if is_qcow2(path)? => {
                return Err(Error::invalid(format!(
                    "{what}: {} looks like qcow2; say --disk-format qcow2 to import it as one, or --disk-format raw for its bytes as they are",
                    path.display()
                )))
            }
            (true, None) => false,
        };
        progress.begin(&what, size);
        let result = if qcow2 {
            if spec.key.is_some() {
                return Err(Error::invalid(format!("{what}: {} is qcow2; encrypted capsules take raw disks (qemu-img convert it first)", path.display())));
            }
            if reader.is_some() {
                return Err(Error::invalid(format!("{what}: {} is qcow2; --parent takes raw images (a qcow2 chain brings its own parents)", path.display())));
            }
            crate::qcow2::check_chain(path, &spec.backing_files).with_context(|| what.clone())?;
            let (image, layers) = crate::qcow2::import_chain(store, path, bs, progress)?;
            let mut total = ImportStats { logical_bytes: image.size, blocks: image.block_count(), ..Default::default() };
            for l in &layers {
                total.add(&l.stats);
                total.metadata_bytes += l.stats.metadata_bytes;
                if l.shared {
                    report.shared_layers += 1;
                }
            }
            Ok((image, total))
        } else {
            let opts = FileImport { block_size_log2: bs, parent: reader.as_ref(), only: None, threads: 0, progress, key: spec.key.as_ref() };
            import_file(store, path, &opts)
        };
        progress.end();
        let (image, stats) = result.with_context(|| what.clone())?;
        report.images.push((what, stats));
        Ok(image)
    };

    let pm = parent.as_ref().map(|(_, m)| m);
    let mut disks: Vec<Disk> = pm.map(|m| m.disks.clone()).unwrap_or_default();
    for (name, path) in &spec.disks {
        check_disk_name(name)?;
        if spec.disks.iter().filter(|(n, _)| n == name).count() > 1 {
            return Err(Error::invalid(format!("disk name {name:?} given twice")));
        }
        let existing = disks.iter().position(|d| &d.name == name);
        let base = existing.map(|i| disks[i].image);
        let image = import_one(format!("disk {name}"), path, base)?;
        match existing {
            Some(i) => disks[i].image = image,
            None => disks.push(Disk { name: name.clone(), image }),
        }
    }
    if disks.is_empty() {
        return Err(Error::invalid("a capsule needs at least one disk (--disk PATH)"));
    }
    let memory = match &spec.memory {
        Some(p) => Some(import_one("memory".into(), p, pm.and_then(|m| m.memory).filter(|m| m.block_size_log2 == bs))?),
        None => None,
    };
    let devstate = spec.devstate.as_ref().map(|p| import_one("devstate".into(), p, None)).transpose()?;
    let boot = match (&spec.kernel, pm.and_then(|m| m.boot.clone())) {
        (Some(k), _) => Some(BootFiles {
            kernel: import_one("kernel".into(), k, None)?,
            initrd: spec.initrd.as_ref().map(|p| import_one("initrd".into(), p, None)).transpose()?,
            cmdline: spec.cmdline.clone().unwrap_or_default(),
        }),
        (None, Some(mut inherited)) => {
            if spec.initrd.is_some() {
                return Err(Error::invalid("--initrd needs --kernel"));
            }
            if let Some(c) = &spec.cmdline {
                inherited.cmdline = c.clone();
            }
            Some(inherited)
        }
        (None, None) => {
            if spec.initrd.is_some() || spec.cmdline.is_some() {
                return Err(Error::invalid("--initrd and --cmdline need --kernel"));
            }
            None
        }
    };
    let mut vm = pm.map(|m| m.vm.clone()).unwrap_or_default();
    if let Some(c) = spec.cpus {
        vm.cpus = c;
    }
    if let Some(mib) = spec.memory_mib {
        vm.memory_mib = mib;
    } else if let Some(m) = memory {
        vm.memory_mib = m.size >> 20;
    }
    if spec.hypervisor.is_some() {
        vm.hypervisor = spec.hypervisor.clone();
    }
    for (k, v) in &spec.hints {
        vm.hints.insert(k.clone(), v.clone());
    }
    let created_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut manifest =
        Manifest { name: spec.name.clone(), parent: parent.as_ref().map(|(id, _)| *id), created_unix, disks, memory, devstate, boot, vm, sealing: None };
    manifest.validate()?;
    if let Some(k) = &spec.key {
        manifest.seal(k)?;
    }
    let (id, _) = store.put_manifest(&manifest)?;
    report.manifest_bytes = store.object_size(&id)?;
    report.id = id;
    store.set_ref(&spec.name, &id)?;
    store.pack_named_capsule(&id);
    store.tidy_packs();
    Ok(report)
}
