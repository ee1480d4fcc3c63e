//! Setting damaged copies aside (`capsule verify --repair`). A copy that fails its hash
//! still counts as the block's copy in a new process (only a read in the same process
//! marks it), so a push or pull of that block skips it and verify names it forever.
//! Moved out of `blocks/` and the packs into `damaged/` (kept, never deleted: evidence,
//! and the only bytes there are), the block is missing, and the next push, pull or upload
//! of a capsule that holds it stores a sound copy.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};
use serde::Serialize;

use super::gc::remove_unless_written;
use super::Store;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::hash::Hash;
use crate::packed::Pack;

/// Where damaged copies go, under the store's root.
pub const DAMAGED_DIR: &str = "damaged";

/// What [`Store::set_aside_damaged`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SetAside {
    /// Copies moved into `damaged/`.
    pub copies: u64,
    /// Packs written again without their damaged records.
    pub packs_rewritten: u64,
    /// Packs holding a listed block that could not be read (left as they are; a later
    /// repair tries again), each with the error.
    pub unreadable: Vec<String>,
    /// Blocks with no copy left in the store: a push or pull of a capsule holding them
    /// stores them again.
    pub now_missing: Vec<Hash>,
    /// The directory holding the copies set aside.
    pub dir: PathBuf,
}

/// Whether a read's error says the bytes are bad (not that they could not be read, or
/// were gone: a copy the disk would not give back now is left where it is).
pub(crate) fn is_damage(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::TooLarge)
}

impl Store {
    /// Moves the damaged copies of `blocks` (those a verify of the store's files found
    /// damaged) into `damaged/`, each checked again first: its block file is renamed; a
    /// pack holding a damaged copy of one of them (wherever it is now: the store's packs
    /// may have been merged since the verify) is written again without it, the damaged
    /// records going to files of their own, and only then removed. Waits for other users
    /// of the store, as gc does.
    pub fn set_aside_damaged(&self, blocks: &[Hash]) -> Result<SetAside> {
        if flock(&self.lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            tracing::warn!("store {}: waiting for its other users (a server, a push) to close it", self.root.display());
            flock(&self.lock, FlockOperation::LockExclusive).map_err(|e| Error::io("store lock", e.into()))?;
        }
        let result = self.set_aside_locked(blocks);
        let _ = flock(&self.lock, FlockOperation::LockShared);
        result
    }

    fn set_aside_locked(&self, blocks: &[Hash]) -> Result<SetAside> {
        let dir = self.root.join(DAMAGED_DIR);
        fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
        super::sync_dir(&self.root)?;
        let mut done = SetAside { dir: dir.clone(), ..SetAside::default() };
        let listed: HashSet<Hash> = blocks.iter().copied().collect();
        for h in &listed {
            let path = self.block_path(h);
            if block_file_damaged(h, &path) {
                let to = unused_name(&dir, &format!("{h}.file"));
                fs::rename(&path, &to).map_err(|e| Error::io(format!("rename {} -> {}", path.display(), to.display()), e))?;
                done.copies += 1;
            }
        }
        self.packs.reload();
        let (packs, _) = self.packs.all();
        for pack in &packs {
            match self.rewrite_without_damaged(pack, &listed, &dir)? {
                Rewrite::Untouched => {}
                Rewrite::SetAside(n) => {
                    done.copies += n;
                    done.packs_rewritten += 1;
                }
                Rewrite::Unreadable(e) => done.unreadable.push(format!("{}: {e}", pack.path().display())),
            }
        }
        self.packs.reload();
        let mut missing: Vec<Hash> = listed.into_iter().filter(|h| !self.has_block(h)).collect();
        missing.sort();
        done.now_missing = missing;
        self.sync()?;
        Ok(done)
    }

    /// Writes `pack` again without its damaged copies of the blocks in `listed` (each
    /// kept in `dir` first), then removes it. A pack that cannot be read whole is left
    /// as it is; an error is a failure to write.
    fn rewrite_without_damaged(&self, pack: &Pack, listed: &HashSet<Hash>, dir: &Path) -> Result<Rewrite> {
        let mut damaged = HashSet::new();
        for h in listed {
            if let Some(e) = pack.find(h) {
                match pack.read_decoded(&e) {
                    Ok(_) => {}
                    Err(err) if is_damage(&err) => {
                        damaged.insert(*h);
                    }
                    Err(err) => return Ok(Rewrite::Unreadable(err)),
                }
            }
        }
        if damaged.is_empty() {
            return Ok(Rewrite::Untouched);
        }
        let mut entries = pack.entries.clone();
        entries.sort_by_key(|e| e.offset);
        let mut batch = self.pack_batch();
        // The damaged records are few: kept in memory until the pack has been read to its
        // end, so a record the disk will not give back leaves it as it is (the dropped
        // batch removes its file).
        let mut aside = Vec::new();
        for e in &entries {
            let encoded = match pack.read(e) {
                Ok(encoded) => encoded,
                Err(err) => return Ok(Rewrite::Unreadable(err)),
            };
            if damaged.contains(&e.hash) {
                aside.push((e.hash, encoded));
            } else {
                batch.add(&e.hash, &encoded).with_context(|| format!("writing {} again without its damaged blocks", pack.path().display()))?;
            }
        }
        let pack_name = pack.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for (hash, encoded) in &aside {
            super::write_file_synced(&unused_name(dir, &format!("{hash}.{pack_name}")), encoded)?;
        }
        super::sync_dir(dir)?;
        let (_, written) = batch.finish_packs().with_context(|| format!("writing {} again without its damaged blocks", pack.path().display()))?;
        remove_unless_written(pack, &written.into_iter().collect())?;
        Ok(Rewrite::SetAside(damaged.len() as u64))
    }
}

/// Whether the block file at `path` still reads and fails its hash.
fn block_file_damaged(h: &Hash, path: &Path) -> bool {
    fs::read(path).is_ok_and(|encoded| crate::block::decode(h, &encoded).is_err_and(|e| is_damage(&e)))
}

/// What became of one pack.
enum Rewrite {
    /// No damaged copy of a listed block.
    Untouched,
    /// Written again without this many damaged copies.
    SetAside(u64),
    /// Left as it is: a record could not be read.
    Unreadable(Error),
}

/// `dir/name`, or with a number added if that is taken: copies set aside by an earlier
/// repair stay.
fn unused_name(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(name);
    if !first.exists() {
        return first;
    }
    (1u32..).map(|n| dir.join(format!("{name}.{n}"))).find(|p| !p.exists()).expect("a free name")
}
