//! The local store: a directory of content-addressed blocks and objects plus named refs.
//!
//! ```text
//!  STORE/
//!    format               "capsule-store 1"
//!    lock                 flock: shared while a process uses the store, exclusive for gc
//!    blocks/ab/<hash>     one encoded block (see `block`), named by BLAKE3 of its raw bytes
//!    packed/<name>.pack   blocks a capsule names, packed in its walk order (see `packed`)
//!    objects/ab/<hash>    one envelope (manifest, layer, map page), named by BLAKE3 of itself
//!    refs/<name>          "<capsule id hex>\n"; names may contain '/' (nested directories)
//!    tmp/                 files being written; emptied when no other process holds the lock
//! ```
//!
//! Every write goes to `tmp/`, is fsynced, then renamed to its content name, so a crash
//! never leaves a partial file under a valid name. Every read is verified against its name.
//! Refs are written last, so a capsule interrupted mid-import is never listed.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind as IoKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{flock, FlockOperation};
use serde::Serialize;

use crate::block;
use crate::envelope::{self, ObjectKind};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::hash::Hash;
use crate::manifest::{check_name, Layer, Manifest};
use crate::map::{Entry, MapPage, PageSource};

mod gc;
pub mod repair;

pub(crate) use gc::SMALL_PACK;

/// Version 2 may hold packed blocks, which version 1 never looks for; a version 1 store
/// is opened as it is and becomes version 2 with its first pack.
const FORMAT_LINE: &str = "capsule-store 2\n";
const FORMAT_LINE_V1: &str = "capsule-store 1\n";
const PAGE_CACHE_ENTRIES: usize = 4096;

/// A local capsule store. Cheap to share between threads.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    pages: quick_cache::sync::Cache<Hash, Arc<MapPage>>,
    /// fsync every block and object before it is renamed into place (see `set_durable`).
    durable: std::sync::atomic::AtomicBool,
    /// Whether a block file already present counts without a look (see `set_trust_existing`).
    trust_existing: std::sync::atomic::AtomicBool,
    /// zstd level of blocks this handle writes (see `set_compression_level`).
    level: std::sync::atomic::AtomicI32,
    lock: File,
    pub(crate) packs: Arc<crate::packed::Packs>,
}

/// What [`Store::put_block`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutBlock {
    /// How the block is mapped: `Zero` for all-zero blocks, which are not stored.
    pub entry: Entry,
    /// Bytes written to disk (0 when zero or already present).
    pub stored_bytes: u64,
    /// False if the block was already in the store (or is zero).
    pub new: bool,
}

/// What [`Store::gc`] removed and kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GcStats {
    /// Blocks kept (reachable from a ref).
    pub blocks_kept: u64,
    /// Blocks removed.
    pub blocks_removed: u64,
    /// Metadata objects removed.
    pub objects_removed: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Live block files moved into packs.
    pub blocks_packed: u64,
}

impl Store {
    /// `$CAPSULE_STORE`, else `$XDG_DATA_HOME/capsule`, else `~/.local/share/capsule`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("CAPSULE_STORE") {
            return dir.into();
        }
        if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
            return Path::new(&dir).join("capsule");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
        Path::new(&home).join(".local/share/capsule")
    }

    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let format_path = root.join("format");
        match fs::read_to_string(&format_path) {
            Ok(s) if s == FORMAT_LINE || s == FORMAT_LINE_V1 => {}
            Ok(s) => return Err(Error::corrupt(format!("{}: not a capsule store of this version (format file says {:?})", root.display(), s.trim()))),
            Err(e) if e.kind() == IoKind::NotFound => Self::create_layout(&root)?,
            Err(e) => return Err(Error::io(format_path.display(), e)),
        }
        let lock_path = root.join("lock");
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| Error::io(lock_path.display(), e))?;
        // Alone with the store: leftovers in tmp/ are from a crashed writer.
        if flock(&lock, FlockOperation::NonBlockingLockExclusive).is_ok() {
            Self::clear_tmp(&root)?;
        }
        flock(&lock, FlockOperation::LockShared).map_err(|e| Error::io(lock_path.display(), e.into()))?;
        Ok(Self {
            packs: Arc::new(crate::packed::Packs::new(&root)),
            root,
            pages: quick_cache::sync::Cache::new(PAGE_CACHE_ENTRIES),
            durable: std::sync::atomic::AtomicBool::new(true),
            trust_existing: std::sync::atomic::AtomicBool::new(false),
            level: std::sync::atomic::AtomicI32::new(block::DEFAULT_LEVEL),
            lock,
        })
    }

    fn create_layout(root: &Path) -> Result<()> {
        let mk = |p: PathBuf| fs::create_dir_all(&p).map_err(|e| Error::io(p.display(), e));
        // Fan-out directories (blocks/ab/) appear on first write: a fresh cache or store
        // costs no 512 mkdirs.
        mk(root.join("blocks"))?;
        mk(root.join("objects"))?;
        mk(root.join("refs"))?;
        mk(root.join("tmp"))?;
        let p = root.join("format");
        write_file_synced(&p, FORMAT_LINE.as_bytes())
    }

    fn clear_tmp(root: &Path) -> Result<()> {
        let tmp = root.join("tmp");
        let entries = fs::read_dir(&tmp).map_err(|e| Error::io(tmp.display(), e))?;
        for entry in entries.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        Ok(())
    }

    /// With `false`, blocks are written without an fsync each (objects and refs still are). Right for a
    /// cache (every block is verified when read, so one torn by a crash is fetched again)
    /// and for a batch that ends with `sync_filesystem` before anything names its blocks.
    /// Returns the previous setting, for a batch to restore.
    pub fn set_durable(&self, durable: bool) -> bool {
        self.durable.swap(durable, Ordering::Relaxed)
    }

    /// zstd level for the blocks this handle stores from raw bytes from now on (1 to
    /// [`block::MAX_LEVEL`]); blocks already stored keep theirs.
    pub fn set_compression_level(&self, level: i32) {
        self.level.store(level.clamp(1, block::MAX_LEVEL), Ordering::Relaxed);
    }

    /// With `true`, a block file already present is taken as the block without reading it
    /// (a dedup hit). Right only for a cache, which verifies every block it serves. A
    /// store's dedup hit reads and verifies the file first: a file renamed into place by a
    /// non-durable batch that a power loss interrupted may be torn, and a new capsule
    /// must not name it; a bad one is written again.
    pub fn set_trust_existing(&self, trust: bool) {
        self.trust_existing.store(trust, Ordering::Relaxed);
    }

    /// Flushes everything written to the store's filesystem (one `syncfs`), ending a
    /// non-durable batch.
    pub fn sync_filesystem(&self) -> Result<()> {
        let dir = File::open(&self.root).map_err(|e| Error::io(self.root.display(), e))?;
        rustix::fs::syncfs(&dir).map_err(|e| Error::io(format!("syncfs {}", self.root.display()), e.into()))
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn fanout_path(&self, dir: &str, h: &Hash) -> PathBuf {
        let hex = h.to_hex();
        self.root.join(dir).join(&hex[..2]).join(hex)
    }

    /// Path of a block's file (it may not exist).
    pub fn block_path(&self, h: &Hash) -> PathBuf {
        self.fanout_path("blocks", h)
    }

    fn object_path(&self, h: &Hash) -> PathBuf {
        self.fanout_path("objects", h)
    }

    /// Writes `bytes` to `dest` atomically; false if `dest` already existed.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<bool> {
        self.write_atomic_with(dest, bytes, true)
    }

    /// A block: fsynced only while the store is durable. A block file already there counts
    /// only if it verifies (unless the store trusts existing files).
    fn write_block_file(&self, h: &Hash, dest: &Path, bytes: &[u8]) -> Result<bool> {
        if self.packs.contains(h) {
            return Ok(false);
        }
        let sync = self.durable.load(Ordering::Relaxed);
        if !dest.exists() {
            return self.write_atomic_with(dest, bytes, sync);
        }
        if self.trust_existing.load(Ordering::Relaxed) || self.existing_block_sound(h, dest) {
            return Ok(false);
        }
        tracing::warn!("store {}: block file {h} is damaged (torn by a crash?); writing it again", self.root.display());
        self.replace_with(dest, bytes, sync)?;
        Ok(true)
    }

    fn existing_block_sound(&self, h: &Hash, path: &Path) -> bool {
        fs::read(path).ok().is_some_and(|encoded| block::decode(h, &encoded).is_ok())
    }

    fn write_atomic_with(&self, dest: &Path, bytes: &[u8], sync: bool) -> Result<bool> {
        if dest.exists() {
            return Ok(false);
        }
        self.replace_with(dest, bytes, sync)?;
        Ok(true)
    }

    /// Writes `bytes` to a temporary file and renames it to `dest`, over whatever is there.
    fn replace_with(&self, dest: &Path, bytes: &[u8], sync: bool) -> Result<()> {
        let tmp = unique_tmp(&self.root);
        if sync {
            write_file_synced(&tmp, bytes)?;
        } else {
            fs::write(&tmp, bytes).map_err(|e| Error::io(tmp.display(), e))?;
        }
        let renamed = match fs::rename(&tmp, dest) {
            Err(e) if e.kind() == IoKind::NotFound => match dest.parent() {
                Some(dir) => fs::create_dir_all(dir).and_then(|_| fs::rename(&tmp, dest)),
                None => Err(e),
            },
            r => r,
        };
        renamed.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(format!("rename {} -> {}", tmp.display(), dest.display()), e)
        })
    }

    /// True if the block is present (not verified).
    pub fn has_block(&self, h: &Hash) -> bool {
        self.packs.contains(h) || self.block_path(h).exists() || self.packs.contains_now(h)
    }

    /// The blocks among `hashes` the store lacks, in their order: [`Self::has_block`] for
    /// many, with one look at `packed/` for all of them instead of one per missing block.
    pub fn missing_blocks(&self, hashes: impl IntoIterator<Item = Hash>) -> Vec<Hash> {
        self.packs.refresh_now();
        hashes.into_iter().filter(|h| !self.packs.contains(h) && !self.block_path(h).exists()).collect()
    }

    /// A dedup hit: the block is packed (packs are fsynced whole), or its file is there
    /// and sound (or trusted).
    fn already_stored(&self, h: &Hash, path: &Path) -> bool {
        self.packs.contains(h) || (path.exists() && (self.trust_existing.load(Ordering::Relaxed) || self.existing_block_sound(h, path)))
    }

    /// Stores one block of raw bytes unless it is zero or already present.
    pub fn put_block(&self, raw: &[u8]) -> Result<PutBlock> {
        if block::is_zero(raw) {
            return Ok(PutBlock { entry: Entry::Zero, stored_bytes: 0, new: false });
        }
        self.put_hashed_block(&Hash::of(raw), raw)
    }

    /// Stores a non-zero block whose hash the caller computed already.
    pub fn put_hashed_block(&self, h: &Hash, raw: &[u8]) -> Result<PutBlock> {
        let path = self.block_path(h);
        if self.already_stored(h, &path) {
            return Ok(PutBlock { entry: Entry::Data(*h), stored_bytes: 0, new: false });
        }
        let encoded = block::encode_with_level(raw, self.level.load(Ordering::Relaxed))?;
        let new = self.write_block_file(h, &path, &encoded).with_context(|| format!("storing block {h}"))?;
        Ok(PutBlock { entry: Entry::Data(*h), stored_bytes: if new { encoded.len() as u64 } else { 0 }, new })
    }

    /// zstd level of the blocks this handle stores.
    pub fn compression_level(&self) -> i32 {
        self.level.load(Ordering::Relaxed)
    }

    /// Stores a non-zero block sealed by `key` (see [`crate::seal`]): its ciphertext under
    /// the ciphertext's hash, uncompressed (the plaintext was compressed before sealing).
    pub fn put_sealed_block(&self, key: &crate::seal::Key, plain: &Hash, raw: &[u8]) -> Result<PutBlock> {
        let sealed = key.seal(plain, raw, self.level.load(Ordering::Relaxed))?;
        let h = sealed.name;
        let path = self.block_path(&h);
        if self.already_stored(&h, &path) {
            return Ok(PutBlock { entry: sealed.entry, stored_bytes: 0, new: false });
        }
        let encoded = block::encode_with_level(&sealed.ciphertext, 0)?;
        let new = self.write_block_file(&h, &path, &encoded).with_context(|| format!("storing sealed block {h}"))?;
        Ok(PutBlock { entry: sealed.entry, stored_bytes: if new { encoded.len() as u64 } else { 0 }, new })
    }

    /// Stores a block, sealed if `key` is given; zero blocks are mapped, not stored.
    pub fn put_block_with(&self, key: Option<&crate::seal::Key>, raw: &[u8]) -> Result<PutBlock> {
        match key {
            _ if block::is_zero(raw) => Ok(PutBlock { entry: Entry::Zero, stored_bytes: 0, new: false }),
            Some(k) => self.put_sealed_block(k, &Hash::of(raw), raw),
            None => self.put_hashed_block(&Hash::of(raw), raw),
        }
    }

    /// Stores a block received in its encoded form after verifying it against `h`.
    pub fn put_encoded_block(&self, h: &Hash, encoded: &[u8]) -> Result<bool> {
        block::decode(h, encoded)?;
        self.write_block_file(h, &self.block_path(h), encoded)
    }

    /// Stores an encoded block the caller has already decoded and checked against `h`
    /// (the network client verifies every block it receives); saves a second decode.
    pub fn put_verified_block(&self, h: &Hash, encoded: &[u8]) -> Result<bool> {
        self.write_block_file(h, &self.block_path(h), encoded)
    }

    /// The block's stored encoding (compressed or raw), not decoded.
    pub fn read_encoded_block(&self, h: &Hash) -> Result<Vec<u8>> {
        if let Some(found) = self.packs.read(h) {
            return found;
        }
        let path = self.block_path(h);
        match fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == IoKind::NotFound => {
                // Packed by another process since this one last looked (the look costs a
                // stat unless packed/ changed: a client asking for absent blocks makes
                // no listing each).
                self.packs.refresh_now();
                self.packs.read(h).unwrap_or_else(|| Err(Error::not_found(format!("block {h} is not in store {}", self.root.display()))))
            }
            Err(e) => Err(Error::io(path.display(), e)),
        }
    }

    /// The block's raw bytes, verified against `h`.
    pub fn get_block(&self, h: &Hash) -> Result<Vec<u8>> {
        self.read_verified_block(h).map(|(raw, _)| raw)
    }

    /// The block's raw bytes, verified against `h`, and its stored length. A packed copy
    /// that does not verify is noted and passed over for the next copy (another pack, its
    /// file); with none sound, the first copy's error, naming where it is.
    pub fn read_verified_block(&self, h: &Hash) -> Result<(Vec<u8>, u64)> {
        self.read_sound_copy(h).map(|(encoded, raw)| (raw, encoded.len() as u64))
    }

    /// The block's stored encoding from a copy that verifies against `h` (see
    /// [`Self::read_verified_block`]): for a server asked again for a block it sent.
    pub fn read_verified_encoded_block(&self, h: &Hash) -> Result<Vec<u8>> {
        self.read_sound_copy(h).map(|(encoded, _)| encoded)
    }

    /// A copy of `h` that decodes to it: its encoding and its raw bytes. Copies found
    /// damaged before are read again last (one may have been restored in place).
    fn read_sound_copy(&self, h: &Hash) -> Result<(Vec<u8>, Vec<u8>)> {
        self.read_sound_copy_once(h).or_else(|e| self.packs.recheck_damaged(h).ok_or(e))
    }

    fn read_sound_copy_once(&self, h: &Hash) -> Result<(Vec<u8>, Vec<u8>)> {
        let mut first_damage: Option<Error> = None;
        // A second round, of the packs only, if another process may have packed the block
        // since this one last looked (a cold miss of a cache opened its file twice).
        for round in 0..2 {
            while let Some((pack, e)) = self.packs.lookup(h) {
                match pack.read_checked(&e) {
                    Ok(found) => return Ok(found),
                    Err(err) => {
                        tracing::warn!("store {}: block {h} in {} is damaged; reading another copy: {err}", self.root.display(), pack.path().display());
                        pack.mark_damaged(h);
                        first_damage.get_or_insert(err.context(pack.path().display()));
                    }
                }
            }
            if round == 1 {
                break;
            }
            let path = self.block_path(h);
            match fs::read(&path) {
                Ok(encoded) => {
                    return match block::decode(h, &encoded) {
                        Ok(raw) => Ok((encoded, raw)),
                        Err(err) => Err(first_damage.unwrap_or_else(|| err.context(path.display()))),
                    };
                }
                Err(err) if err.kind() != IoKind::NotFound => return Err(first_damage.unwrap_or_else(|| Error::io(path.display(), err))),
                Err(_) if first_damage.is_none() => self.packs.refresh_now(),
                Err(_) => break,
            }
        }
        Err(first_damage.unwrap_or_else(|| Error::not_found(format!("block {h} is not in store {}", self.root.display()))))
    }

    /// Bytes the block takes on disk (its stored encoding).
    pub fn block_stored_size(&self, h: &Hash) -> Result<u64> {
        if let Some((_, len)) = self.packs.locate(h) {
            return Ok(u64::from(len));
        }
        let path = self.block_path(h);
        fs::metadata(&path).map(|m| m.len()).map_err(|e| Error::io(path.display(), e))
    }

    /// Stores a manifest (with its sealing header); returns its id and whether it was new.
    pub fn put_manifest(&self, manifest: &Manifest) -> Result<(Hash, bool)> {
        let bytes = manifest.encode()?;
        let id = Hash::of(&bytes);
        let new = self.write_atomic(&self.object_path(&id), &bytes).with_context(|| format!("storing manifest {id}"))?;
        Ok((id, new))
    }

    /// Encodes and stores an object; returns its id and whether it was new.
    pub fn put_object<T: Serialize>(&self, kind: ObjectKind, value: &T) -> Result<(Hash, bool)> {
        let bytes = envelope::encode(kind, value)?;
        let id = Hash::of(&bytes);
        let new = self.write_atomic(&self.object_path(&id), &bytes).with_context(|| format!("storing {} {id}", kind.name()))?;
        Ok((id, new))
    }

    /// Stores an encoded object received from elsewhere after checking its envelope and id.
    pub fn put_encoded_object(&self, kind: ObjectKind, id: &Hash, bytes: &[u8]) -> Result<bool> {
        if Hash::of(bytes) != *id {
            return Err(Error::corrupt(format!("{} {id}: content does not hash to its id", kind.name())));
        }
        envelope::open(kind, bytes)?;
        self.write_atomic(&self.object_path(id), bytes)
    }

    /// An object's encoded bytes (not verified).
    pub fn read_object(&self, id: &Hash) -> Result<Vec<u8>> {
        let path = self.object_path(id);
        fs::read(&path).map_err(|e| match e.kind() {
            IoKind::NotFound => Error::not_found(format!("object {id} is not in store {}", self.root.display())),
            _ => Error::io(path.display(), e),
        })
    }

    /// True if the object is present.
    pub fn has_object(&self, id: &Hash) -> bool {
        self.object_path(id).exists()
    }

    /// Size of an object's file.
    pub fn object_size(&self, id: &Hash) -> Result<u64> {
        let path = self.object_path(id);
        fs::metadata(&path).map(|m| m.len()).map_err(|e| Error::io(path.display(), e))
    }

    /// The manifest of capsule `id`, verified against the id.
    pub fn manifest(&self, id: &Hash) -> Result<Manifest> {
        let bytes = self.read_object(id).with_context(|| format!("capsule {id}"))?;
        let m = Manifest::decode_verified(id, &bytes)?;
        m.validate().with_context(|| format!("manifest {id}"))?;
        Ok(m)
    }

    /// The layer `id`, verified.
    pub fn layer(&self, id: &Hash) -> Result<Layer> {
        let bytes = self.read_object(id)?;
        let layer: Layer = envelope::decode_verified(ObjectKind::Layer, id, &bytes)?;
        crate::manifest::check_block_size_log2(layer.block_size_log2).with_context(|| format!("layer {id}"))?;
        Ok(layer)
    }

    // ---- refs ----

    fn ref_path(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join("refs").join(name))
    }

    /// The capsule id a ref names, or `None`.
    pub fn read_ref(&self, name: &str) -> Result<Option<Hash>> {
        let path = self.ref_path(name)?;
        match fs::read_to_string(&path) {
            Ok(s) => s.parse().map(Some).map_err(|e: Error| e.context(format!("ref {name} ({})", path.display()))),
            Err(e) if e.kind() == IoKind::NotFound || e.kind() == IoKind::NotADirectory => Ok(None),
            Err(e) if path.is_dir() => Err(Error::invalid(format!("{name:?} is a ref prefix, not a ref: {e}"))),
            Err(e) => Err(Error::io(path.display(), e)),
        }
    }

    /// Points `name` at `id`, whatever it pointed at before.
    pub fn set_ref(&self, name: &str, id: &Hash) -> Result<()> {
        let _guard = self.ref_lock()?;
        self.write_ref(name, id)
    }

    /// Points `name` at `new` only if it currently names `expected` (`None`: absent).
    pub fn cas_ref(&self, name: &str, expected: Option<&Hash>, new: &Hash) -> Result<()> {
        let _guard = self.ref_lock()?;
        let current = self.read_ref(name)?;
        if current.as_ref() != expected {
            let show = |h: Option<&Hash>| h.map_or("nothing".to_string(), Hash::short);
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("ref {name} names {} but {} was expected: another writer moved it", show(current.as_ref()), show(expected)),
            ));
        }
        self.write_ref(name, new)
    }

    fn ref_lock(&self) -> Result<File> {
        let path = self.root.join("refs.lock");
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| Error::io(path.display(), e))?;
        flock(&f, FlockOperation::LockExclusive).map_err(|e| Error::io(path.display(), e.into()))?;
        Ok(f)
    }

    fn write_ref(&self, name: &str, id: &Hash) -> Result<()> {
        let path = self.ref_path(name)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent.display(), e))?;
        }
        // Everything the ref reaches must be durable before the ref is.
        self.sync()?;
        let tmp = unique_tmp(&self.root);
        write_file_synced(&tmp, format!("{id}\n").as_bytes())?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(format!("ref {name}"), e))?;
        sync_dir(path.parent().unwrap_or(&self.root))
    }

    /// Removes a ref; its blocks go at the next `gc`.
    pub fn delete_ref(&self, name: &str) -> Result<bool> {
        let _guard = self.ref_lock()?;
        let path = self.ref_path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == IoKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(path.display(), e)),
        }
    }

    /// All refs, sorted by name.
    pub fn list_refs(&self) -> Result<Vec<(String, Hash)>> {
        fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
            let entries = fs::read_dir(dir).map_err(|e| Error::io(dir.display(), e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(dir.display(), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let full = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
                let ty = entry.file_type().map_err(|e| Error::io(entry.path().display(), e))?;
                if ty.is_dir() {
                    walk(&entry.path(), &full, out)?;
                } else if ty.is_file() {
                    out.push((full, entry.path()));
                }
            }
            Ok(())
        }
        let mut files = Vec::new();
        walk(&self.root.join("refs"), "", &mut files)?;
        let mut out = Vec::new();
        for (name, path) in files {
            let s = fs::read_to_string(&path).map_err(|e| Error::io(path.display(), e))?;
            let id = s.parse().map_err(|e: Error| e.context(format!("ref {name}")))?;
            out.push((name, id));
        }
        out.sort();
        Ok(out)
    }

    /// Resolves a ref name, or a full capsule id, to a capsule id.
    pub fn resolve(&self, name_or_id: &str) -> Result<Hash> {
        if let Ok(id) = name_or_id.parse::<Hash>() {
            if self.has_object(&id) {
                return Ok(id);
            }
        }
        self.read_ref(name_or_id)?.ok_or_else(|| Error::not_found(format!("no capsule named {name_or_id:?} in store {}", self.root.display())))
    }

    /// Flushes everything written so far to stable storage.
    pub fn sync(&self) -> Result<()> {
        rustix::fs::syncfs(&self.lock).map_err(|e| Error::io(format!("syncfs {}", self.root.display()), e.into()))
    }

    // ---- profiles ----

    fn profile_path(&self, capsule: &Hash, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        if name.contains('/') {
            return Err(Error::invalid(format!("invalid profile name {name:?}: no '/' allowed")));
        }
        Ok(self.root.join("profiles").join(capsule.to_hex()).join(name))
    }

    /// Stores `profile` and names it for its capsule; returns the profile object's id.
    pub fn put_profile(&self, profile: &crate::manifest::Profile) -> Result<Hash> {
        if profile.blocks.len() > crate::manifest::MAX_PROFILE_BLOCKS {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("profile {} lists {} blocks, cap {}", profile.name, profile.blocks.len(), crate::manifest::MAX_PROFILE_BLOCKS),
            ));
        }
        let (id, _) = self.put_object(ObjectKind::Profile, profile)?;
        self.set_profile(&profile.capsule, &profile.name, &id)?;
        Ok(id)
    }

    /// Names profile object `id` as `name` of `capsule` (the object must be here).
    pub fn set_profile(&self, capsule: &Hash, name: &str, id: &Hash) -> Result<()> {
        let p = self.profile(id)?;
        if p.capsule != *capsule || p.name != name {
            return Err(Error::invalid(format!("profile {id} is {:?} of capsule {}, not {name:?} of {capsule}", p.name, p.capsule)));
        }
        let path = self.profile_path(capsule, name)?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        }
        let tmp = unique_tmp(&self.root);
        write_file_synced(&tmp, format!("{id}\n").as_bytes())?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(path.display(), e))
    }

    /// The profile object `id`, verified.
    pub fn profile(&self, id: &Hash) -> Result<crate::manifest::Profile> {
        let bytes = self.read_object(id)?;
        envelope::decode_verified(ObjectKind::Profile, id, &bytes)
    }

    /// Profiles of `capsule`: (name, object id), sorted.
    pub fn list_profiles(&self, capsule: &Hash) -> Result<Vec<(String, Hash)>> {
        let dir = self.root.join("profiles").join(capsule.to_hex());
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == IoKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(dir.display(), e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let text = fs::read_to_string(entry.path()).map_err(|e| Error::io(entry.path().display(), e))?;
            out.push((name.clone(), text.parse().map_err(|e: Error| e.context(format!("profile {name} of {capsule}")))?));
        }
        out.sort();
        Ok(out)
    }

    // ---- reachability ----

    /// Calls `on_object` for every metadata object and `on_block` for every block reachable
    /// from capsule `id` (its ancestors included). Objects may be visited more than once.
    pub fn walk_capsule(
        &self,
        id: &Hash,
        on_object: &mut dyn FnMut(&Hash) -> Result<()>,
        on_block: &mut dyn FnMut(&str, u64, &Hash) -> Result<()>,
    ) -> Result<()> {
        walk_capsule(self, id, on_object, on_block)
    }

    /// Everything capsule `id` reaches (ancestors included): metadata objects and blocks,
    /// each once, in walk order.
    pub fn closure(&self, id: &Hash) -> Result<(Vec<Hash>, Vec<Hash>)> {
        let (mut objects, mut blocks) = (Vec::new(), Vec::new());
        let (mut seen_o, mut seen_b) = (HashSet::new(), HashSet::new());
        self.walk_capsule(
            id,
            &mut |h| {
                if seen_o.insert(*h) {
                    objects.push(*h);
                }
                Ok(())
            },
            &mut |_, _, h| {
                if seen_b.insert(*h) {
                    blocks.push(*h);
                }
                Ok(())
            },
        )?;
        Ok((objects, blocks))
    }

    /// Where capsule `id` first uses block `h`, for an error naming it: "LABEL: block
    /// INDEX (HASH)", or the hash alone if the walk does not reach it.
    pub fn block_place(&self, id: &Hash, h: &Hash) -> String {
        let mut place = None;
        let _ = self.walk_capsule(id, &mut |_| Ok(()), &mut |label, index, b| {
            if place.is_none() && b == h {
                place = Some(format!("{label}: block {index} ({h})"));
            }
            Ok(())
        });
        place.unwrap_or_else(|| format!("block {h}"))
    }

    /// Every file under `blocks/` or `objects/` with the hash its name claims.
    pub fn list_dir_hashes(&self, dir: &str) -> Result<Vec<(PathBuf, Hash)>> {
        let mut out = Vec::new();
        let top = self.root.join(dir);
        for sub in fs::read_dir(&top).map_err(|e| Error::io(top.display(), e))?.flatten() {
            for f in fs::read_dir(sub.path()).map_err(|e| Error::io(sub.path().display(), e))?.flatten() {
                if let Ok(h) = f.file_name().to_string_lossy().parse::<Hash>() {
                    out.push((f.path(), h));
                }
            }
        }
        Ok(out)
    }
}

pub use crate::walk::{walk_capsule, ObjectSource};

impl PageSource for Store {
    fn page(&self, id: &Hash) -> Result<Arc<MapPage>> {
        if let Some(p) = self.pages.get(id) {
            return Ok(p);
        }
        let bytes = self.read_object(id)?;
        self.remember_page(id, &bytes)
    }
}

impl Store {
    /// A map page's encoded bytes, verified against `id` and checked, kept in memory only
    /// (a cache whose disk is full still serves the reads that need the page).
    pub fn remember_page(&self, id: &Hash, bytes: &[u8]) -> Result<Arc<MapPage>> {
        let page: MapPage = envelope::decode_verified(ObjectKind::MapPage, id, bytes)?;
        page.validate().with_context(|| format!("map page {id}"))?;
        let page = Arc::new(page);
        self.pages.insert(*id, page.clone());
        Ok(page)
    }
}

/// A new file name under the store's `tmp/`, unique across processes and handles.
pub(crate) fn unique_tmp(root: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    root.join("tmp").join(format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// Marks the store at `root` as one that may hold packs (see [`FORMAT_LINE`]).
pub(crate) fn mark_packed_format(root: &Path) -> Result<()> {
    let p = root.join("format");
    if fs::read_to_string(&p).is_ok_and(|s| s == FORMAT_LINE) {
        return Ok(());
    }
    let tmp = unique_tmp(root);
    write_file_synced(&tmp, FORMAT_LINE.as_bytes())?;
    fs::rename(&tmp, &p).map_err(|e| Error::io(format!("rename {} -> {}", tmp.display(), p.display()), e))?;
    sync_dir(root)
}

fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path.display(), e))?;
    f.write_all(bytes).map_err(|e| Error::io(path.display(), e))?;
    f.sync_all().map_err(|e| Error::io(path.display(), e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir.display(), e))
}

#[cfg(test)]
mod tests;
