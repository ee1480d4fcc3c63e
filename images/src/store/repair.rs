//! Setting damaged copies aside (`capsule verify --repair`). A copy that fails its hash
//! still counts as the block's copy in a new process (only a read in the same process
//! marks it), so a push or pull of that block skips it and verify names it forever.
//! Moved out of `blocks/` and the packs into `damaged/` (kept, never deleted: evidence,
//! and the only bytes there are), the block is missing, and the next push, pull or upload
//! of a capsule that holds it stores a sound copy.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};
use serde::Serialize;

use super::Store;
use crate::error::{Error, ErrorKind, Result};
use crate::hash::Hash;

/// Where damaged copies go, under the store's root.
pub const DAMAGED_DIR: &str = "damaged";

/// A copy of a block whose bytes fail its hash: a block file, or a record in a pack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DamagedCopy {
    pub hash: Hash,
    /// The block file, or the pack holding the record.
    pub path: PathBuf,
    pub packed: bool,
}

/// What [`Store::set_aside_damaged`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SetAside {
    /// Copies moved into `damaged/`.
    pub copies: u64,
    /// Packs written again without their damaged records.
    pub packs_rewritten: u64,
    /// Blocks with no copy left in the store: a push or pull of a capsule holding them
    /// stores them again.
    pub now_missing: Vec<Hash>,
    /// The directory holding the copies set aside.
    pub dir: PathBuf,
}

/// Whether a read's error says the bytes are bad (not that they could not be read: a
/// copy the disk would not give back now is left where it is).
pub(crate) fn is_damage(e: &Error) -> bool {
    e.kind() != ErrorKind::Io
}

impl Store {
    /// Moves `copies` (from a verify of the store's files) into `damaged/`, each checked
    /// again first: a block file is renamed; a pack is written again without its damaged
    /// records, which go to files of their own, and only then removed. Waits for other
    /// users of the store, as gc does.
    pub fn set_aside_damaged(&self, copies: &[DamagedCopy]) -> Result<SetAside> {
        if flock(&self.lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            tracing::warn!("store {}: waiting for its other users (a server, a push) to close it", self.root.display());
            flock(&self.lock, FlockOperation::LockExclusive).map_err(|e| Error::io("store lock", e.into()))?;
        }
        let result = self.set_aside_locked(copies);
        let _ = flock(&self.lock, FlockOperation::LockShared);
        result
    }

    fn set_aside_locked(&self, copies: &[DamagedCopy]) -> Result<SetAside> {
        let dir = self.root.join(DAMAGED_DIR);
        fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
        let mut done = SetAside { dir: dir.clone(), ..SetAside::default() };
        let mut by_pack: BTreeMap<&Path, HashSet<Hash>> = BTreeMap::new();
        for c in copies {
            if c.packed {
                by_pack.entry(&c.path).or_default().insert(c.hash);
            } else if self.block_file_damaged(&c.hash, &c.path) {
                let to = dir.join(format!("{}.file", c.hash));
                fs::rename(&c.path, &to).map_err(|e| Error::io(format!("rename {} -> {}", c.path.display(), to.display()), e))?;
                done.copies += 1;
            }
        }
        let (packs, _) = self.packs.all();
        for pack in packs.iter().filter(|p| by_pack.contains_key(p.path())) {
            let listed = &by_pack[pack.path()];
            let mut entries = pack.entries.clone();
            entries.sort_by_key(|e| e.offset);
            let mut batch = self.pack_batch();
            let mut aside = Vec::new();
            for e in &entries {
                let encoded = pack.read(e)?;
                match crate::block::decode(&e.hash, &encoded) {
                    Ok(_) => {
                        batch.add(&e.hash, &encoded)?;
                    }
                    Err(err) if listed.contains(&e.hash) && is_damage(&err) => aside.push((e.hash, encoded)),
                    // Damaged since the verify: left for the next one to name.
                    Err(_) => {
                        batch.add(&e.hash, &encoded)?;
                    }
                }
            }
            if aside.is_empty() {
                continue;
            }
            let pack_name = pack.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            for (h, encoded) in &aside {
                super::write_file_synced(&dir.join(format!("{h}.{pack_name}")), encoded)?;
            }
            super::sync_dir(&dir)?;
            let (_, written) = batch.finish_packs()?;
            if !written.iter().any(|p| p == pack.path()) {
                fs::remove_file(pack.path()).map_err(|e| Error::io(pack.path().display(), e))?;
            }
            done.copies += aside.len() as u64;
            done.packs_rewritten += 1;
        }
        self.packs.reload();
        let mut missing: Vec<Hash> = copies.iter().map(|c| c.hash).filter(|h| !self.has_block(h)).collect();
        missing.sort();
        missing.dedup();
        done.now_missing = missing;
        self.sync()?;
        Ok(done)
    }

    /// Whether the block file at `path` still reads and fails its hash.
    fn block_file_damaged(&self, h: &Hash, path: &Path) -> bool {
        path.starts_with(self.root.join("blocks")) && fs::read(path).is_ok_and(|encoded| crate::block::decode(h, &encoded).is_err_and(|e| is_damage(&e)))
    }
}
