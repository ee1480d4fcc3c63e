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
        rustix::fs::fallocate(&self.data, rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE, offset, len)
            .map_err(io::Error::from)
    }

    /// Makes every write so far durable.
    pub fn sync(&self) -> io::Result<()> {
        self.data.sync_data()?;
        self.state_file.sync_data()
    }

    /// Blocks that differ from the capsule: (index, DATA or ZERO).
    pub fn changed(&self) -> Vec<(u64, u8)> {
        self.states
            .read()
            .map(|s| s.iter().enumerate().filter(|(_, &st)| st != NONE).map(|(i, &st)| (i as u64, st)).collect())
            .unwrap_or_default()
    }
}
