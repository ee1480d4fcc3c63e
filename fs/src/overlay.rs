//! The copy-on-write layer of a writable mount: one sparse data file and one state byte
//! per block for each image, under `CACHE/cow/<capsule id>/`.
//!
//! ```text
//!  <key>.data   image-sized sparse file: block i at offset i * block_size when overlaid
//!  <key>.state  one byte per block: 0 = not overlaid, 1 = data in <key>.data, 2 = zero
//! ```
//!
//! Data is written before its state byte, so a killed mount never marks a block it did not
//! finish writing; `fsync` on a mounted file syncs both files. Writes that do not cover a
//! whole block are read-modify-write under a per-block lock.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, RwLock};

/// Block not overlaid: read it from the capsule.
pub const NONE: u8 = 0;
/// Block content is in the overlay's data file.
pub const DATA: u8 = 1;
/// Block is zero (written zeros or a punched hole).
pub const ZERO: u8 = 2;
const STRIPES: usize = 64;

/// One image's copy-on-write layer.
#[derive(Debug)]
pub struct Overlay {
    data: File,
    state_file: File,
    states: RwLock<Vec<u8>>,
    block_size: u64,
    size: u64,
    stripes: Vec<Mutex<()>>,
}

impl Overlay {
    /// Opens (creating if needed) the overlay `key` in `dir` for an image of `size` bytes.
    pub fn open(dir: &Path, key: &str, size: u64, block_size: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let nblocks = size.div_ceil(block_size);
        let open = |name: String| OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join(name));
        let data = open(format!("{key}.data"))?;
        if data.metadata()?.len() != size {
            data.set_len(size)?;
        }
        let state_file = open(format!("{key}.state"))?;
        let mut states = vec![NONE; nblocks as usize];
        let on_disk = state_file.metadata()?.len();
        if on_disk > 0 {
            let n = on_disk.min(nblocks) as usize;
            state_file.read_exact_at(&mut states[..n], 0)?;
            if states.iter().any(|&s| s > ZERO) {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{}: unknown block state", dir.join(format!("{key}.state")).display())));
            }
        }
        if on_disk != nblocks {
            state_file.set_len(nblocks)?;
        }
        Ok(Self { data, state_file, states: RwLock::new(states), block_size, size, stripes: (0..STRIPES).map(|_| Mutex::new(())).collect() })
    }

    /// State of block `i`.
    pub fn state(&self, i: u64) -> u8 {
        self.states.read().map(|s| s.get(i as usize).copied().unwrap_or(NONE)).unwrap_or(NONE)
    }

    /// Serialises read-modify-write of block `i`.
    pub fn lock_block(&self, i: u64) -> MutexGuard<'_, ()> {
        self.stripes[(i as usize) % STRIPES].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads overlaid block `i` (full block, zero-padded past the end of the image).
    pub fn read_block(&self, i: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; self.block_size as usize];
        if self.state(i) == DATA {
            let offset = i * self.block_size;
            let len = self.block_size.min(self.size.saturating_sub(offset)) as usize;
            self.data.read_exact_at(&mut buf[..len], offset)?;
        }
        Ok(buf)
    }

    fn set_state(&self, i: u64, s: u8) -> io::Result<()> {
        self.state_file.write_all_at(&[s], i)?;
        if let Ok(mut states) = self.states.write() {
            if let Some(slot) = states.get_mut(i as usize) {
                *slot = s;
            }
        }
        Ok(())
    }

    /// Stores the whole block `i` (data first, then its state).
    pub fn write_block(&self, i: u64, block: &[u8]) -> io::Result<()> {
        let offset = i * self.block_size;
        let len = self.block_size.min(self.size.saturating_sub(offset)) as usize;
        self.data.write_all_at(&block[..len], offset)?;
        self.set_state(i, DATA)
    }

    /// Marks block `i` zero and frees its space.
    pub fn zero_block(&self, i: u64) -> io::Result<()> {
        self.set_state(i, ZERO)?;
        let offset = i * self.block_size;
        let len = self.block_size.min(self.size.saturating_sub(offset));
        rustix::fs::fallocate(&self.data, rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE, offset, len).map_err(io::Error::from)
    }

    /// Makes every write so far durable.
    pub fn sync(&self) -> io::Result<()> {
        self.data.sync_data()?;
        self.state_file.sync_data()
    }

    /// Blocks that differ from the capsule: (index, DATA or ZERO).
    pub fn changed(&self) -> Vec<(u64, u8)> {
        self.states.read().map(|s| s.iter().enumerate().filter(|(_, &st)| st != NONE).map(|(i, &st)| (i as u64, st)).collect()).unwrap_or_default()
    }
}

/// Whether `dir` has an overlay `key` (changed or not).
pub fn exists(dir: &Path, key: &str) -> bool {
    dir.join(format!("{key}.state")).exists()
}

/// Whether overlay `key` in `dir` holds any change (no overlay: none).
pub fn has_changes(dir: &Path, key: &str) -> io::Result<bool> {
    match std::fs::read(dir.join(format!("{key}.state"))) {
        Ok(states) => Ok(states.iter().any(|&s| s != NONE)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Overlay keys present in `dir`.
fn keys(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                if let Some(key) = e.file_name().to_str().and_then(|n| n.strip_suffix(".state")) {
                    out.push(key.to_string());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(out)
}

fn remove(dir: &Path, key: &str) -> io::Result<()> {
    for ext in ["data", "state"] {
        match std::fs::remove_file(dir.join(format!("{key}.{ext}"))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Before a VM runs from a writable mount. RAM left by an earlier run is garbage to a
/// cold boot: dropped. A suspended capsule must resume with exactly its saved disks and
/// RAM, so changes an earlier resume made are refused (they would be lost) unless
/// `discard` says to drop them. Returns the keys dropped.
pub fn prepare_for_run(dir: &Path, suspended: bool, discard: bool) -> std::result::Result<Vec<String>, String> {
    let io = |e: io::Error| format!("{}: {e}", dir.display());
    let keys = keys(dir).map_err(io)?;
    let mut dropped = Vec::new();
    for key in keys {
        let changed = has_changes(dir, &key).map_err(io)?;
        let drop = key == "memory" && !suspended || (suspended && changed && discard);
        if suspended && changed && !discard {
            return Err(format!(
                "{}: uncommitted changes ({key}) from an earlier run of this suspended capsule; resuming would lose them. \
                 Suspend or commit that run, or pass --discard-changes",
                dir.display()
            ));
        }
        if drop {
            remove(dir, &key).map_err(io)?;
            dropped.push(key);
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod run_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cold_boot_drops_old_ram_and_resume_guards_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mem = Overlay::open(dir.path(), "memory", 8192, 4096).unwrap();
        mem.write_block(1, &[7; 4096]).unwrap();
        let disk = Overlay::open(dir.path(), "disk-root", 8192, 4096).unwrap();
        disk.write_block(0, &[1; 4096]).unwrap();
        drop((mem, disk));
        // Resume: refused while changes exist, dropped when told.
        let err = prepare_for_run(dir.path(), true, false).unwrap_err();
        assert!(err.contains("--discard-changes"), "{err}");
        assert!(has_changes(dir.path(), "disk-root").unwrap());
        // Cold boot: RAM goes, the disk's changes stay.
        assert_eq!(prepare_for_run(dir.path(), false, false).unwrap(), vec!["memory".to_string()]);
        assert!(!dir.path().join("memory.state").exists());
        assert!(has_changes(dir.path(), "disk-root").unwrap());
        let mut dropped = prepare_for_run(dir.path(), true, true).unwrap();
        dropped.sort();
        assert_eq!(dropped, vec!["disk-root".to_string()]);
        assert!(!has_changes(dir.path(), "disk-root").unwrap());
    }
}
