//! The copy-on-write layer of a writable mount: one sparse data file and one state file
//! per image, under `CACHE/cow/<capsule id>/`.
//!
//! ```text
//!  <key>.data   image-sized sparse file: block i at offset i * block_size when overlaid
//!  <key>.state  a 64-byte header, then one state byte per block:
//!               0 not overlaid, 1 data in <key>.data (durable), 2 zero,
//!               3 data written over "not overlaid", not yet known durable,
//!               4 data written over "zero", not yet known durable
//!    header     magic "CAPS-COW", version u32, block size u32, image size u64,
//!               boot id [16], reserved [8], BLAKE3 of the bytes before it (first 16)
//! ```
//!
//! Crash safety. A block's data is written before its state byte, so a killed mount never
//! marks a block it did not finish writing. A block that gains data (state 0 or 2 before)
//! is marked 3 or 4 at once: after a killed process, the kernel still holds the data, so
//! the next mount in the same boot (the header's boot id) reads 3 and 4 as data. Only a
//! barrier (`sync`: fdatasync of the data file, then the state bytes) turns them into 1;
//! after a power loss (another boot id) an unsynced 3 reads as 0 and a 4 as 2 again, the
//! content that was durable, never a block whose data never reached the disk (zeros in
//! place of the capsule's bytes). Data already durable (state 1) is rewritten in place:
//! bytes a write does not change are written unchanged. Writes that do not cover a whole
//! block are read-modify-write under a per-block lock.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// Block not overlaid: read it from the capsule.
pub const NONE: u8 = 0;
/// Block content is in the overlay's data file.
pub const DATA: u8 = 1;
/// Block is zero (written zeros or a punched hole).
pub const ZERO: u8 = 2;
/// Data over a block that was not overlaid, not yet synced (0 again after a power loss).
const DATA_OVER_NONE: u8 = 3;
/// Data over a zero block, not yet synced (2 again after a power loss).
const DATA_OVER_ZERO: u8 = 4;
const STRIPES: usize = 64;

const MAGIC: &[u8; 8] = b"CAPS-COW";
const VERSION: u32 = 1;
/// Bytes before the first state byte.
pub const HEADER_LEN: u64 = 64;
/// Unsynced blocks that make a write run the barrier itself.
const SYNC_AFTER_BLOCKS: usize = 8192;
/// Age of the oldest unsynced block that makes a write run the barrier itself.
const SYNC_AFTER: Duration = Duration::from_secs(5);

/// What a state file's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    block_size: u32,
    size: u64,
    boot_id: [u8; 16],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        h[16..24].copy_from_slice(&self.size.to_le_bytes());
        h[24..40].copy_from_slice(&self.boot_id);
        let sum = blake3::hash(&h[..48]);
        h[48..64].copy_from_slice(&sum.as_bytes()[..16]);
        h
    }

    /// Parses a header; `Ok(None)` when `bytes` do not start with the magic.
    fn decode(bytes: &[u8]) -> Result<Option<Self>, String> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Ok(None);
        }
        let h: &[u8; HEADER_LEN as usize] = bytes.get(..HEADER_LEN as usize).and_then(|b| b.try_into().ok()).ok_or("truncated header")?;
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if version != VERSION {
            return Err(format!("state format version {version}; this Capsule reads version {VERSION}"));
        }
        if blake3::hash(&h[..48]).as_bytes()[..16] != h[48..64] {
            return Err("header checksum mismatch (damaged)".into());
        }
        let mut boot_id = [0u8; 16];
        boot_id.copy_from_slice(&h[24..40]);
        Ok(Some(Self {
            block_size: u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
            size: u64::from_le_bytes(h[16..24].try_into().unwrap_or_default()),
            boot_id,
        }))
    }
}

/// This boot of the machine (data a killed process wrote is still in the kernel's cache
/// within one boot, not across one).
fn current_boot_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let mut id = [0u8; 16];
    id.copy_from_slice(&blake3::hash(text.trim().as_bytes()).as_bytes()[..16]);
    id
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {what}", path.display()))
}

/// The states of a state file as they stand now: unsynced blocks of an earlier boot are
/// reverted (3 -> 0, 4 -> 2). `Ok(None)` for a headerless file of the first format.
struct Loaded {
    header: Header,
    states: Vec<u8>,
    same_boot: bool,
}

/// Parses state file `bytes` (at `path`, for errors) for an image of `size` bytes in
/// blocks of `block_size` when given (`None`: take the header's word).
fn parse_states(path: &Path, bytes: &[u8], expect: Option<(u64, u64)>) -> io::Result<Loaded> {
    let header = match Header::decode(bytes).map_err(|e| invalid(path, format!("not a usable copy-on-write state file: {e}")))? {
        Some(h) => h,
        None => {
            // The first format: no header, one byte per block, only 0..=2.
            let Some((size, block_size)) = expect else { return Err(invalid(path, "no header (an overlay of an older Capsule)")) };
            let nblocks = size.div_ceil(block_size);
            if (bytes.len() as u64 != nblocks && !bytes.is_empty()) || bytes.iter().any(|&s| s > ZERO) {
                return Err(invalid(path, "not a copy-on-write state file (no header, and not the headerless first format)"));
            }
            let mut states = bytes.to_vec();
            states.resize(nblocks as usize, NONE);
            return Ok(Loaded { header: Header { block_size: block_size as u32, size, boot_id: [0; 16] }, states, same_boot: false });
        }
    };
    if let Some((size, block_size)) = expect {
        if header.size != size || u64::from(header.block_size) != block_size {
            return Err(invalid(
                path,
                format!("made for an image of {} bytes in {}-byte blocks, not {size} bytes in {block_size}-byte blocks", header.size, header.block_size),
            ));
        }
    }
    if header.block_size == 0 || !header.block_size.is_power_of_two() {
        return Err(invalid(path, format!("block size {} in the header", header.block_size)));
    }
    let nblocks = header.size.div_ceil(u64::from(header.block_size));
    let body = &bytes[HEADER_LEN as usize..];
    if body.len() as u64 != nblocks {
        return Err(invalid(path, format!("{} state bytes for {nblocks} blocks (truncated or damaged)", body.len())));
    }
    if let Some(at) = body.iter().position(|&s| s > DATA_OVER_ZERO) {
        return Err(invalid(path, format!("unknown state {} of block {at}", body[at])));
    }
    let same_boot = header.boot_id == current_boot_id();
    let mut states = body.to_vec();
    if !same_boot {
        for s in &mut states {
            *s = match *s {
                DATA_OVER_NONE => NONE,
                DATA_OVER_ZERO => ZERO,
                other => other,
            };
        }
    }
    Ok(Loaded { header, states, same_boot })
}

/// Checks a state file's bytes as `Overlay::open` would (for an image of `size` bytes in
/// `block_size`-byte blocks when given); returns the block states as they stand.
pub fn parse_state_file(bytes: &[u8], expect: Option<(u64, u64)>) -> io::Result<Vec<u8>> {
    Ok(parse_states(Path::new("<state file>"), bytes, expect)?.states)
}

/// What readers see of a raw state: data whether synced or not.
fn visible(s: u8) -> u8 {
    if s == DATA_OVER_NONE || s == DATA_OVER_ZERO {
        DATA
    } else {
        s
    }
}

/// Writes `bytes` as `path` atomically and durably.
fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("state.tmp");
    let mut f = File::create(&tmp)?;
    io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// In-memory states and the unsynced blocks (index -> write sequence number).
#[derive(Debug)]
struct Table {
    states: Vec<u8>,
    unsynced: HashMap<u64, u64>,
    oldest_unsynced: Option<Instant>,
}

/// One image's copy-on-write layer.
#[derive(Debug)]
pub struct Overlay {
    data: File,
    state_file: File,
    state_path: PathBuf,
    table: RwLock<Table>,
    block_size: u64,
    size: u64,
    stripes: Vec<Mutex<()>>,
    write_seq: AtomicU64,
    barrier: Mutex<()>,
    /// False for a reader beside a live mount (`open_read`): it changes nothing.
    writable: bool,
}

impl Overlay {
    /// Opens (creating if needed) the overlay `key` in `dir` for an image of `size` bytes.
    /// A state file of the first (headerless) format is converted; a damaged one, one of
    /// another version or one made for another image size is refused, naming the file.
    pub fn open(dir: &Path, key: &str, size: u64, block_size: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let nblocks = size.div_ceil(block_size);
        let data_path = dir.join(format!("{key}.data"));
        let state_path = dir.join(format!("{key}.state"));
        let data = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&data_path)?;
        if data.metadata()?.len() != size {
            data.set_len(size)?;
        }
        let boot_id = current_boot_id();
        let fresh = Header { block_size: u32::try_from(block_size).map_err(|_| invalid(&state_path, "block size"))?, size, boot_id };
        let states = match std::fs::read(&state_path) {
            Ok(bytes) => {
                let loaded = parse_states(&state_path, &bytes, Some((size, block_size)))?;
                let mut states = loaded.states;
                // Unsynced data from a killed process of this boot: the kernel has it, so
                // make it durable and mark it so; then the header takes this boot's id.
                let unsynced = states.iter().any(|&s| s == DATA_OVER_NONE || s == DATA_OVER_ZERO);
                if unsynced || !loaded.same_boot || loaded.header != fresh {
                    data.sync_data()?;
                    for s in &mut states {
                        *s = visible(*s);
                    }
                    let mut bytes = fresh.encode().to_vec();
                    bytes.extend_from_slice(&states);
                    replace_file(&state_path, &bytes)?;
                }
                states
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut bytes = fresh.encode().to_vec();
                bytes.resize((HEADER_LEN + nblocks) as usize, NONE);
                replace_file(&state_path, &bytes)?;
                vec![NONE; nblocks as usize]
            }
            Err(e) => return Err(e),
        };
        let state_file = OpenOptions::new().read(true).write(true).open(&state_path)?;
        Ok(Self {
            data,
            state_file,
            state_path,
            table: RwLock::new(Table { states, unsynced: HashMap::new(), oldest_unsynced: None }),
            block_size,
            size,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            write_seq: AtomicU64::new(0),
            barrier: Mutex::new(()),
            writable: true,
        })
    }

    /// Opens overlay `key` to read it, changing nothing (a mount may be writing it):
    /// what it holds now, unsynced data of this boot included.
    pub fn open_read(dir: &Path, key: &str, size: u64, block_size: u64) -> io::Result<Self> {
        let state_path = dir.join(format!("{key}.state"));
        let bytes = std::fs::read(&state_path)?;
        let states = parse_states(&state_path, &bytes, Some((size, block_size)))?.states;
        Ok(Self {
            data: File::open(dir.join(format!("{key}.data")))?,
            state_file: File::open(&state_path)?,
            state_path,
            table: RwLock::new(Table { states, unsynced: HashMap::new(), oldest_unsynced: None }),
            block_size,
            size,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            write_seq: AtomicU64::new(0),
            barrier: Mutex::new(()),
            writable: false,
        })
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn table_mut(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// State of block `i` (`NONE`, `DATA` or `ZERO`).
    pub fn state(&self, i: u64) -> u8 {
        visible(self.table().states.get(i as usize).copied().unwrap_or(NONE))
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

    /// Writes state `s` of block `i` to the file and the table (the caller holds the table).
    fn put_state(&self, table: &mut Table, i: u64, s: u8) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{}: opened to read only", self.state_path.display())));
        }
        let slot = table.states.get_mut(i as usize).ok_or_else(|| invalid(&self.state_path, format!("block {i} out of range")))?;
        if *slot != s {
            self.state_file.write_all_at(&[s], HEADER_LEN + i)?;
            *slot = s;
        }
        Ok(())
    }

    /// Stores the whole block `i`: its data first, then its state (unsynced data until the
    /// next barrier, unless the block held durable data already).
    pub fn write_block(&self, i: u64, block: &[u8]) -> io::Result<()> {
        let offset = i * self.block_size;
        let len = self.block_size.min(self.size.saturating_sub(offset)) as usize;
        let data = block.get(..len).ok_or_else(|| invalid(&self.state_path, format!("block {i}: {} bytes, need {len}", block.len())))?;
        self.data.write_all_at(data, offset)?;
        let due = {
            let mut table = self.table_mut();
            let before = table.states.get(i as usize).copied().unwrap_or(NONE);
            let after = match before {
                NONE => DATA_OVER_NONE,
                ZERO => DATA_OVER_ZERO,
                other => other,
            };
            self.put_state(&mut table, i, after)?;
            if after != DATA {
                // Numbered after its data was written: a barrier that saw this number
                // synced the data before it.
                let seq = self.write_seq.fetch_add(1, Ordering::SeqCst) + 1;
                table.unsynced.insert(i, seq);
                table.oldest_unsynced.get_or_insert_with(Instant::now);
            }
            table.unsynced.len() >= SYNC_AFTER_BLOCKS || table.oldest_unsynced.is_some_and(|t| t.elapsed() >= SYNC_AFTER)
        };
        if due {
            // Someone else's barrier running covers us soon enough.
            if let Ok(_guard) = self.barrier.try_lock() {
                self.barrier_locked()?;
            }
        }
        Ok(())
    }

    /// Marks block `i` zero and frees its space.
    pub fn zero_block(&self, i: u64) -> io::Result<()> {
        {
            let mut table = self.table_mut();
            self.put_state(&mut table, i, ZERO)?;
            table.unsynced.remove(&i);
        }
        let offset = i * self.block_size;
        let len = self.block_size.min(self.size.saturating_sub(offset));
        rustix::fs::fallocate(&self.data, rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE, offset, len).map_err(io::Error::from)
    }

    /// Makes every write so far durable: the data, then the states that name it.
    pub fn sync(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _guard = self.barrier.lock().unwrap_or_else(|p| p.into_inner());
        self.barrier_locked()
    }

    fn barrier_locked(&self) -> io::Result<()> {
        let seen = self.write_seq.load(Ordering::SeqCst);
        self.data.sync_data()?;
        {
            let mut table = self.table_mut();
            let mut done: Vec<u64> = table.unsynced.iter().filter(|&(_, &seq)| seq <= seen).map(|(&i, _)| i).collect();
            done.sort_unstable();
            for &i in &done {
                table.unsynced.remove(&i);
                if let Some(&s) = table.states.get(i as usize) {
                    if s == DATA_OVER_NONE || s == DATA_OVER_ZERO {
                        self.put_state(&mut table, i, DATA)?;
                    }
                }
            }
            table.oldest_unsynced = if table.unsynced.is_empty() { None } else { Some(Instant::now()) };
        }
        self.state_file.sync_data()
    }

    /// How many blocks differ from the capsule.
    pub fn changed_count(&self) -> usize {
        self.table().states.iter().filter(|&&s| s != NONE).count()
    }

    /// Blocks that differ from the capsule: (index, DATA or ZERO).
    pub fn changed(&self) -> Vec<(u64, u8)> {
        self.table().states.iter().enumerate().filter(|(_, &st)| st != NONE).map(|(i, &st)| (i as u64, visible(st))).collect()
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if !self.writable {
            return;
        }
        if let Err(e) = self.sync() {
            tracing::error!("{}: syncing the overlay at unmount: {e}", self.state_path.display());
        }
    }
}

/// Whether `dir` has an overlay `key` (changed or not).
pub fn exists(dir: &Path, key: &str) -> bool {
    dir.join(format!("{key}.state")).exists()
}

/// Whether overlay `key` in `dir` holds any change (no overlay: none).
pub fn has_changes(dir: &Path, key: &str) -> io::Result<bool> {
    let path = dir.join(format!("{key}.state"));
    match std::fs::read(&path) {
        Ok(bytes) => match Header::decode(&bytes).map_err(|e| invalid(&path, e))? {
            // The headerless first format: state bytes only.
            None => Ok(bytes.iter().any(|&s| s != NONE)),
            Some(_) => Ok(parse_states(&path, &bytes, None)?.states.iter().any(|&s| s != NONE)),
        },
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
    for ext in ["data", "state", "state.tmp"] {
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
        let drop = capsule_images::Slot::from_key(&key) == Some(capsule_images::Slot::Memory) && !suspended || (suspended && changed && discard);
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

#[cfg(test)]
mod crash_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn raw_state(dir: &Path, key: &str, i: u64) -> u8 {
        std::fs::read(dir.join(format!("{key}.state"))).unwrap()[(HEADER_LEN + i) as usize]
    }

    /// What a power loss looks like to the next open: the header names another boot.
    fn pretend_reboot(dir: &Path, key: &str) {
        let path = dir.join(format!("{key}.state"));
        let mut bytes = std::fs::read(&path).unwrap();
        let mut header = Header::decode(&bytes).unwrap().unwrap();
        header.boot_id = [0xee; 16];
        bytes[..HEADER_LEN as usize].copy_from_slice(&header.encode());
        std::fs::write(&path, bytes).unwrap();
    }

    #[test]
    fn unsynced_data_counts_within_a_boot_and_reverts_after_a_power_loss() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::open(dir.path(), "disk", 4 * 4096, 4096).unwrap();
        o.write_block(0, &[1; 4096]).unwrap();
        o.zero_block(1).unwrap();
        o.sync().unwrap();
        assert_eq!(raw_state(dir.path(), "disk", 0), DATA, "a barrier marks synced data durable");
        // Gaining data: marked unsynced until the next barrier.
        o.write_block(2, &[2; 4096]).unwrap();
        o.write_block(1, &[3; 4096]).unwrap();
        o.write_block(0, &[4; 4096]).unwrap();
        assert_eq!((raw_state(dir.path(), "disk", 2), raw_state(dir.path(), "disk", 1)), (DATA_OVER_NONE, DATA_OVER_ZERO));
        assert_eq!(raw_state(dir.path(), "disk", 0), DATA, "durable data is rewritten in place");
        assert_eq!((o.state(2), o.state(1)), (DATA, DATA));
        std::mem::forget(o); // killed: no barrier at drop

        // A killed process, same boot: the kernel has the data; the open makes it durable.
        std::fs::copy(dir.path().join("disk.state"), dir.path().join("saved")).unwrap();
        let o = Overlay::open(dir.path(), "disk", 4 * 4096, 4096).unwrap();
        assert_eq!(o.read_block(2).unwrap(), vec![2; 4096]);
        assert_eq!(o.read_block(1).unwrap(), vec![3; 4096]);
        assert_eq!(raw_state(dir.path(), "disk", 2), DATA);
        drop(o);

        // A power loss before any barrier: the blocks are what was durable, never zeros in
        // place of the capsule's bytes.
        std::fs::copy(dir.path().join("saved"), dir.path().join("disk.state")).unwrap();
        pretend_reboot(dir.path(), "disk");
        let o = Overlay::open(dir.path(), "disk", 4 * 4096, 4096).unwrap();
        assert_eq!(o.state(2), NONE, "unsynced data over the capsule reverts to the capsule");
        assert_eq!(o.state(1), ZERO, "unsynced data over zeros reverts to zeros");
        assert_eq!(o.state(0), DATA);
        assert_eq!(o.changed(), vec![(0, DATA), (1, ZERO)]);
    }

    #[test]
    fn a_damaged_foreign_or_mismatched_state_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        drop(Overlay::open(dir.path(), "disk", 8192, 4096).unwrap());
        let path = dir.path().join("disk.state");
        let good = std::fs::read(&path).unwrap();
        let try_open = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            Overlay::open(dir.path(), "disk", 8192, 4096).unwrap_err().to_string()
        };
        let mut bad = good.clone();
        bad[17] ^= 1;
        let err = try_open(&bad);
        assert!(err.contains("disk.state") && err.contains("checksum"), "{err}");
        let mut newer = good.clone();
        newer[8] = 9;
        assert!(try_open(&newer).contains("version 9"));
        let mut unknown = good.clone();
        unknown[HEADER_LEN as usize] = 7;
        assert!(try_open(&unknown).contains("unknown state 7 of block 0"));
        assert!(try_open(&good[..good.len() - 1]).contains("truncated"));
        assert!(try_open(b"\x00\x09").contains("not a copy-on-write state file"));
        std::fs::write(&path, &good).unwrap();
        let err = Overlay::open(dir.path(), "disk", 3 * 4096, 4096).unwrap_err().to_string();
        assert!(err.contains("made for an image of 8192 bytes"), "{err}");
        assert!(Overlay::open(dir.path(), "disk", 8192, 4096).is_ok());
    }

    #[test]
    fn a_headerless_state_file_of_the_first_format_is_converted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("disk.data"), [5u8; 3 * 4096]).unwrap();
        std::fs::write(dir.path().join("disk.state"), [DATA, NONE, ZERO]).unwrap();
        assert!(has_changes(dir.path(), "disk").unwrap());
        let o = Overlay::open(dir.path(), "disk", 3 * 4096, 4096).unwrap();
        assert_eq!(o.changed(), vec![(0, DATA), (2, ZERO)]);
        assert_eq!(o.read_block(0).unwrap(), vec![5; 4096]);
        drop(o);
        let bytes = std::fs::read(dir.path().join("disk.state")).unwrap();
        assert_eq!(&bytes[..8], MAGIC);
        assert!(has_changes(dir.path(), "disk").unwrap());
    }
}
