//! The cache's blocks in pack files: each block appended to a large file with a small
//! header, instead of a file of its own. Creating an inode per block cost a cold read
//! more CPU than receiving, decrypting and hashing the block (ext4 scans for a free
//! inode, the more so the more files were recently deleted).
//!
//! `CACHE/packs/<writer>.pack`: a file header (magic, version), then records
//! (magic, encoded length, block hash, checksum of those; then the block's stored
//! encoding). Each process appends to packs of its own and indexes everyone's in memory,
//! scanning packs it does not know (or that grew) at most once a second when it misses a
//! block, so blocks another mount cached are found. Nothing is fsynced: a record torn by
//! a crash ends its pack's scan, and every block is verified against its hash when read,
//! so a damaged record is dropped and the block fetched again, never served.
//!
//! Eviction is by whole packs, least recently read first. A writer holds `flock(LOCK_EX)`
//! on the pack it appends to; an evictor takes the same lock without waiting on its
//! victim and leaves a pack it cannot lock, so no process loses records another is still
//! appending. Locked, the victim is scanned to its end, its pinned blocks are verified,
//! copied into the evictor's own pack and fdatasynced, and only then is it unlinked; if a
//! copy fails the pack stays.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use capsule_images::{Error, Hash, Result};
use rustix::fs::{flock, FlockOperation};
use tracing::warn;

use crate::pins::PinSet;

mod evict;

/// A pack file starts with this and [`PACK_VERSION`]; other files are not ours.
const PACK_MAGIC: &[u8; 8] = b"CAPSPACK";
const PACK_VERSION: u32 = 1;
const FILE_HEADER: u64 = 16;
const RECORD_MAGIC: &[u8; 4] = b"BLK1";
/// magic 4, length 4, hash 32, checksum 8.
const RECORD_HEADER: u64 = 48;
/// The longest record a scan accepts: a stored block and its encoding header.
const MAX_RECORD: u64 = capsule_images::block::MAX_STORED_SIZE as u64 + 64;
/// Bounds on one pack's size: small bounds keep eviction fine-grained under a small
/// `--cache-size`, large ones keep the number of open files low.
const MIN_PACK: u64 = 1 << 20;
const MAX_PACK: u64 = 64 << 20;
/// How often a miss looks for packs other processes wrote.
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// A pack file shorter than its header this long after its last change was left by a
/// process that died (or failed) between creating it and writing the header.
const STALE_SHORT_PACK: Duration = Duration::from_secs(60);

fn record_header(h: &Hash, len: u32) -> [u8; RECORD_HEADER as usize] {
    let mut b = [0u8; RECORD_HEADER as usize];
    b[..4].copy_from_slice(RECORD_MAGIC);
    b[4..8].copy_from_slice(&len.to_le_bytes());
    b[8..40].copy_from_slice(&h.0);
    let check = crate::pins::checksum(&b[..40]);
    b[40..48].copy_from_slice(&check);
    b
}

/// A record header's block and length, if it is one (magic, checksum, length cap).
fn parse_record_header(b: &[u8; RECORD_HEADER as usize]) -> Option<(Hash, u32)> {
    if &b[..4] != RECORD_MAGIC || crate::pins::checksum(&b[..40]) != b[40..48] {
        return None;
    }
    let len = u32::from_le_bytes(b[4..8].try_into().ok()?);
    if u64::from(len) > MAX_RECORD {
        return None;
    }
    let mut h = [0u8; 32];
    h.copy_from_slice(&b[8..40]);
    Some((Hash(h), len))
}

fn file_header() -> [u8; FILE_HEADER as usize] {
    let mut b = [0u8; FILE_HEADER as usize];
    b[..8].copy_from_slice(PACK_MAGIC);
    b[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    b
}

/// Where a block is: its encoding's offset and length in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    pack: u32,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct Pack {
    name: String,
    file: Arc<File>,
    /// Bytes scanned (or written) and valid: the records end here.
    valid: u64,
    last_use: u64,
    /// Blocks recorded in it (an index entry may point elsewhere: a duplicate).
    blocks: Vec<Hash>,
}

#[derive(Debug)]
struct State {
    index: HashMap<Hash, Loc>,
    packs: HashMap<u32, Pack>,
    names: HashMap<String, u32>,
    next_id: u32,
    /// The pack this process appends to.
    active: Option<u32>,
    seq: u64,
    /// Bytes of all known packs.
    total: u64,
    /// Bytes of the records of pinned blocks.
    pinned_total: u64,
    pins: PinSet,
    last_rescan: Instant,
}

impl State {
    fn record_bytes(loc: &Loc) -> u64 {
        RECORD_HEADER + u64::from(loc.len)
    }

    fn add(&mut self, h: Hash, loc: Loc) {
        if self.index.contains_key(&h) {
            return;
        }
        if self.pins.contains(&h) {
            self.pinned_total += Self::record_bytes(&loc);
        }
        self.index.insert(h, loc);
    }

    fn remove_entry(&mut self, h: &Hash) {
        if let Some(loc) = self.index.remove(h) {
            if self.pins.contains(h) {
                self.pinned_total -= Self::record_bytes(&loc);
            }
        }
    }

    /// Forgets a pack and the blocks found in it.
    fn drop_pack(&mut self, id: u32) -> Option<Pack> {
        let pack = self.packs.remove(&id)?;
        self.names.remove(&pack.name);
        self.total -= pack.valid;
        for h in &pack.blocks {
            if self.index.get(h).is_some_and(|l| l.pack == id) {
                self.remove_entry(h);
            }
        }
        if self.active == Some(id) {
            self.active = None;
        }
        Some(pack)
    }

    fn refresh_pins(&mut self) {
        if self.pins.refresh() {
            self.pinned_total = self.index.iter().filter(|(h, _)| self.pins.contains(h)).map(|(_, l)| Self::record_bytes(l)).sum();
        }
    }
}

/// Writes a record's header and the block behind it at `at`, in one system call as a rule
/// (no copy of the block into a record buffer).
fn write_record(file: &File, header: &[u8], data: &[u8], at: u64) -> std::io::Result<()> {
    use std::io::IoSlice;
    let total = header.len() + data.len();
    let mut done = 0;
    while done < total {
        let bufs = if done < header.len() {
            [IoSlice::new(&header[done..]), IoSlice::new(data)]
        } else {
            [IoSlice::new(&[]), IoSlice::new(&data[done - header.len()..])]
        };
        let n = rustix::io::pwritev(file, &bufs, at + done as u64)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}

/// Bytes of pinned blocks' records that pack `id` holds.
fn pinned_in(st: &State, id: u32, pack: &Pack) -> u64 {
    pack.blocks.iter().filter(|h| st.pins.contains(h)).filter_map(|h| st.index.get(h).filter(|l| l.pack == id)).map(State::record_bytes).sum()
}

/// The records of `file` from `from` to its end (or to the first that is not whole and
/// sound), and where they end.
fn scan(file: &File, from: u64, len: u64) -> (Vec<(Hash, u64, u32)>, u64) {
    let mut out = Vec::new();
    let mut at = from;
    let mut header = [0u8; RECORD_HEADER as usize];
    while at + RECORD_HEADER <= len {
        if file.read_exact_at(&mut header, at).is_err() {
            break;
        }
        let Some((h, n)) = parse_record_header(&header) else { break };
        let end = at + RECORD_HEADER + u64::from(n);
        if end > len {
            break;
        }
        out.push((h, at + RECORD_HEADER, n));
        at = end;
    }
    (out, at)
}

/// Evictable, size-bounded block storage in pack files. See the module documentation.
#[derive(Debug)]
pub struct PackCache {
    dir: PathBuf,
    max_bytes: u64,
    pack_bytes: u64,
    writer: String,
    counter: AtomicU64,
    state: Mutex<State>,
    /// Tests: appends fail as on a full disk.
    #[cfg(test)]
    fail_appends: std::sync::atomic::AtomicBool,
}

impl PackCache {
    /// Opens (creating) `CACHE/packs` and indexes the packs there, oldest first.
    pub fn open(cache_dir: &Path, max_bytes: u64) -> Result<Self> {
        capsule_images::packed::raise_open_file_limit();
        let dir = cache_dir.join("packs");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
        let mut pins = PinSet::new(cache_dir);
        pins.refresh();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let cache = Self {
            dir,
            max_bytes,
            pack_bytes: (max_bytes / 8).clamp(MIN_PACK, MAX_PACK),
            writer: format!("{}-{nanos:x}", std::process::id()),
            counter: AtomicU64::new(0),
            #[cfg(test)]
            fail_appends: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State {
                index: HashMap::new(),
                packs: HashMap::new(),
                names: HashMap::new(),
                next_id: 0,
                active: None,
                seq: 0,
                total: 0,
                pinned_total: 0,
                pins,
                last_rescan: Instant::now(),
            }),
        };
        {
            let mut st = cache.lock();
            cache.rescan(&mut st);
        }
        Ok(cache)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Indexes packs not known yet, and what known ones gained, oldest first; forgets packs
    /// another process evicted.
    fn rescan(&self, st: &mut State) {
        st.last_rescan = Instant::now();
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut seen = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".pack") {
                continue;
            }
            let mtime = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            seen.push((mtime, name));
        }
        seen.sort();
        let present: std::collections::HashSet<&String> = seen.iter().map(|(_, n)| n).collect();
        let gone: Vec<u32> = st.names.iter().filter(|(n, _)| !present.contains(n)).map(|(_, &id)| id).collect();
        for id in gone {
            st.drop_pack(id);
        }
        for (mtime, name) in seen {
            match st.names.get(&name).copied() {
                Some(id) if st.active == Some(id) => {}
                Some(id) => {
                    let Some(pack) = st.packs.get(&id) else { continue };
                    let len = pack.file.metadata().map_or(0, |m| m.len());
                    if len > pack.valid {
                        let (found, valid) = scan(&pack.file, pack.valid, len);
                        self.take_found(st, id, found, valid);
                    }
                }
                None => self.index_new_pack(st, &name, mtime),
            }
        }
    }

    fn index_new_pack(&self, st: &mut State, name: &str, mtime: std::time::SystemTime) {
        let path = self.dir.join(name);
        let Ok(file) = File::open(&path) else { return };
        let len = file.metadata().map_or(0, |m| m.len());
        let mut header = [0u8; FILE_HEADER as usize];
        // Too short: being created (a later scan looks again), or left by a writer that
        // died before its header: gone once no one has it locked a minute on.
        if len < FILE_HEADER || file.read_exact_at(&mut header, 0).is_err() {
            let stale = mtime.elapsed().is_ok_and(|age| age >= STALE_SHORT_PACK);
            if stale && len < FILE_HEADER && flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() {
                let _ = std::fs::remove_file(&path);
            }
            return;
        }
        if header[..12] != file_header()[..12] {
            warn!("cache: {} is not a pack this version reads; ignoring it", path.display());
            // Known, so it is not read again; it counts toward nothing.
            let id = st.next_id;
            st.next_id += 1;
            st.names.insert(name.to_string(), id);
            st.packs.insert(id, Pack { name: name.to_string(), file: Arc::new(file), valid: 0, last_use: 0, blocks: Vec::new() });
            return;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.seq += 1;
        st.names.insert(name.to_string(), id);
        st.total += FILE_HEADER;
        st.packs.insert(id, Pack { name: name.to_string(), file: Arc::new(file), valid: FILE_HEADER, last_use: st.seq, blocks: Vec::new() });
        let (found, valid) = scan(&st.packs[&id].file, FILE_HEADER, len);
        self.take_found(st, id, found, valid);
    }

    fn take_found(&self, st: &mut State, id: u32, found: Vec<(Hash, u64, u32)>, valid: u64) {
        let Some(pack) = st.packs.get_mut(&id) else { return };
        st.total += valid - pack.valid;
        pack.valid = valid;
        pack.blocks.extend(found.iter().map(|f| f.0));
        for (h, offset, len) in found {
            st.add(h, Loc { pack: id, offset, len });
        }
    }

    fn maybe_rescan(&self, st: &mut State) -> bool {
        if st.last_rescan.elapsed() < RESCAN_EVERY {
            return false;
        }
        self.rescan(st);
        true
    }

    /// True if a pack holds the block (not verified).
    pub fn contains(&self, h: &Hash) -> bool {
        let mut st = self.lock();
        st.index.contains_key(h) || (self.maybe_rescan(&mut st) && st.index.contains_key(h))
    }

    /// The block's stored encoding if a pack holds it (not verified: the caller decodes
    /// it against `h` and calls [`PackCache::drop_damaged`] if that fails).
    pub fn get_encoded(&self, h: &Hash) -> Option<Vec<u8>> {
        let (loc, file) = {
            let mut st = self.lock();
            if !st.index.contains_key(h) && !self.maybe_rescan(&mut st) {
                return None;
            }
            let loc = *st.index.get(h)?;
            st.seq += 1;
            let seq = st.seq;
            let pack = st.packs.get_mut(&loc.pack)?;
            pack.last_use = seq;
            (loc, pack.file.clone())
        };
        let mut buf = vec![0u8; loc.len as usize];
        match file.read_exact_at(&mut buf, loc.offset) {
            Ok(()) => Some(buf),
            Err(e) => {
                warn!("cache: cannot read block {h} from its pack: {e}");
                self.forget(h, loc);
                None
            }
        }
    }

    /// A block read from a pack failed its hash: it is not served from there again.
    pub fn drop_damaged(&self, h: &Hash) {
        let mut st = self.lock();
        st.remove_entry(h);
    }

    fn forget(&self, h: &Hash, loc: Loc) {
        let mut st = self.lock();
        if st.index.get(h) == Some(&loc) {
            st.remove_entry(h);
        }
    }

    /// Appends an encoded block the caller verified against `h`, then evicts down to the
    /// bound.
    pub fn insert(&self, h: &Hash, encoded: &[u8]) -> Result<()> {
        let mut st = self.lock();
        if let Some(loc) = st.index.get(h).copied() {
            st.seq += 1;
            let seq = st.seq;
            if let Some(p) = st.packs.get_mut(&loc.pack) {
                p.last_use = seq;
            }
            return Ok(());
        }
        self.append(&mut st, h, encoded)?;
        self.evict_locked(&mut st, self.max_bytes);
        Ok(())
    }

    fn append(&self, st: &mut State, h: &Hash, encoded: &[u8]) -> Result<Loc> {
        #[cfg(test)]
        if self.fail_appends.load(Ordering::Relaxed) {
            return Err(Error::io(self.dir.display(), std::io::Error::from_raw_os_error(28)));
        }
        let len = u32::try_from(encoded.len()).ok().filter(|&n| u64::from(n) <= MAX_RECORD).ok_or_else(|| {
            Error::new(capsule_images::ErrorKind::TooLarge, format!("block {h}: {} bytes exceed a pack record's {MAX_RECORD}", encoded.len()))
        })?;
        let need = RECORD_HEADER + u64::from(len);
        let full = st.active.and_then(|id| st.packs.get(&id)).is_some_and(|p| p.valid > FILE_HEADER && p.valid + need > self.pack_bytes);
        if full {
            self.retire_active(st);
        }
        let id = match st.active {
            Some(id) => id,
            None => self.new_pack(st)?,
        };
        let (file, at) = {
            let p = &st.packs[&id];
            (p.file.clone(), p.valid)
        };
        if let Err(e) = write_record(&file, &record_header(h, len), encoded, at) {
            // Whatever part landed is past `valid`: the next record overwrites it.
            return Err(Error::io(self.dir.join(&st.packs[&id].name).display(), e));
        }
        st.seq += 1;
        let seq = st.seq;
        let p = st.packs.get_mut(&id).expect("the active pack is known");
        p.valid += need;
        p.last_use = seq;
        p.blocks.push(*h);
        st.total += need;
        let loc = Loc { pack: id, offset: at + RECORD_HEADER, len };
        st.add(*h, loc);
        Ok(loc)
    }

    /// Stops appending to the active pack and lets other processes evict it.
    fn retire_active(&self, st: &mut State) {
        if let Some(p) = st.active.take().and_then(|id| st.packs.get(&id)) {
            let _ = flock(&*p.file, FlockOperation::Unlock);
        }
    }

    fn new_pack(&self, st: &mut State) -> Result<u32> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{n}.pack", self.writer);
        let path = self.dir.join(&name);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(|e| Error::io(path.display(), e))?;
        // Locked before it has a header, so no evictor ever holds it unlocked and in use.
        let ready = flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(std::io::Error::from).and_then(|()| file.write_all_at(&file_header(), 0));
        if let Err(e) = ready {
            let _ = std::fs::remove_file(&path);
            return Err(Error::io(path.display(), e));
        }
        let id = st.next_id;
        st.next_id += 1;
        st.seq += 1;
        st.names.insert(name.clone(), id);
        st.packs.insert(id, Pack { name, file: Arc::new(file), valid: FILE_HEADER, last_use: st.seq, blocks: Vec::new() });
        st.total += FILE_HEADER;
        st.active = Some(id);
        Ok(id)
    }

    /// Bytes of pack files held.
    pub fn used_bytes(&self) -> u64 {
        self.lock().total
    }

    /// Bytes held beyond the pinned blocks' records (what the bound applies to).
    pub fn unpinned_bytes(&self) -> u64 {
        let st = self.lock();
        st.total - st.pinned_total
    }

    /// Evicts least recently used packs until unpinned bytes fit `limit`.
    pub fn evict_to(&self, limit: u64) {
        let mut st = self.lock();
        self.evict_locked(&mut st, limit);
    }

    /// Forgets packs other processes evicted and indexes what they added now, so no read
    /// is served from a pack file that is gone (a reader's descriptor outlives the file).
    pub fn rescan_now(&self) {
        let mut st = self.lock();
        self.rescan(&mut st);
    }

    /// Blocks indexed (for tests and status).
    pub fn len(&self) -> usize {
        self.lock().index.len()
    }

    /// True if no block is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cache::BlockCache;

    fn block(seed: u8, len: usize) -> (Hash, Vec<u8>, Vec<u8>) {
        // Incompressible, so sizes on disk are what the bound expects.
        let mut raw = vec![0u8; len];
        blake3::Hasher::new().update(&[seed]).finalize_xof().fill(&mut raw);
        let encoded = capsule_images::block::encode(&raw).unwrap();
        (Hash::of(&raw), raw, encoded)
    }

    fn pack_files(cache: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(cache.join("packs")).unwrap().flatten().map(|e| e.path()).collect();
        v.sort();
        v
    }

    #[test]
    fn blocks_survive_a_reopen_and_a_torn_tail_loses_only_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let blocks: Vec<_> = (0..5).map(|i| block(i, 65536)).collect();
        {
            let c = BlockCache::open(dir.path(), u64::MAX).unwrap();
            for (h, _, e) in &blocks {
                c.insert_verified(h, e).unwrap();
            }
        }
        let c = BlockCache::open(dir.path(), u64::MAX).unwrap();
        for (h, raw, _) in &blocks {
            assert_eq!(c.get(h).as_deref(), Some(raw.as_slice()));
        }
        drop(c);
        // A crash mid-append: the last record cut short.
        let pack = &pack_files(dir.path())[0];
        let len = std::fs::metadata(pack).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(pack).unwrap().set_len(len - 100).unwrap();
        let c = BlockCache::open(dir.path(), u64::MAX).unwrap();
        for (h, raw, _) in &blocks[..4] {
            assert_eq!(c.get(h).as_deref(), Some(raw.as_slice()));
        }
        assert!(!c.contains(&blocks[4].0) && c.get(&blocks[4].0).is_none());
        // Appends after a torn pack go to a new pack and are found.
        c.insert_verified(&blocks[4].0, &blocks[4].2).unwrap();
        assert_eq!(c.get(&blocks[4].0).as_deref(), Some(blocks[4].1.as_slice()));
    }

    #[test]
    fn a_damaged_record_is_never_served_and_a_bad_header_ends_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let blocks: Vec<_> = (0..3).map(|i| block(i, 65536)).collect();
        {
            let c = BlockCache::open(dir.path(), u64::MAX).unwrap();
            for (h, _, e) in &blocks {
                c.insert_verified(h, e).unwrap();
            }
        }
        let pack = pack_files(dir.path())[0].clone();
        let mut bytes = std::fs::read(&pack).unwrap();
        // Flip a byte in the first block's data: its header still parses.
        let first_data = (FILE_HEADER + RECORD_HEADER) as usize;
        bytes[first_data + 100] ^= 0x55;
        // Break the third record's header checksum.
        let third = (FILE_HEADER as usize) + 2 * (RECORD_HEADER as usize) + blocks[0].2.len() + blocks[1].2.len();
        bytes[third + 20] ^= 1;
        std::fs::write(&pack, &bytes).unwrap();
        let c = BlockCache::open(dir.path(), u64::MAX).unwrap();
        assert!(c.contains(&blocks[0].0), "the damaged record is indexed until read");
        assert_eq!(c.get(&blocks[0].0), None, "damaged bytes served");
        assert!(!c.contains(&blocks[0].0), "dropped once found damaged");
        assert_eq!(c.get(&blocks[1].0).as_deref(), Some(blocks[1].1.as_slice()));
        assert!(!c.contains(&blocks[2].0), "a record after a bad header was indexed");
        // Refetched, it is served again.
        c.insert_verified(&blocks[0].0, &blocks[0].2).unwrap();
        assert_eq!(c.get(&blocks[0].0).as_deref(), Some(blocks[0].1.as_slice()));
    }

    #[test]
    fn hostile_pack_files_are_bounded_and_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("packs")).unwrap();
        // A record claiming 4 GiB, with a valid checksum: not allocated, not indexed.
        let (h, _, _) = block(9, 4096);
        let mut bytes = file_header().to_vec();
        bytes.extend_from_slice(&record_header(&h, u32::MAX));
        bytes.extend_from_slice(&[0; 1000]);
        std::fs::write(dir.path().join("packs/evil.pack"), &bytes).unwrap();
        // Not a pack at all, and a pack of another version.
        std::fs::write(dir.path().join("packs/junk.pack"), b"hello, this is not a pack file at all").unwrap();
        let mut other = file_header();
        other[8] = 99;
        std::fs::write(dir.path().join("packs/future.pack"), other).unwrap();
        let c = PackCache::open(dir.path(), u64::MAX).unwrap();
        assert!(c.is_empty());
        assert!(!c.contains(&h));
        // Eviction leaves files it cannot read alone.
        c.evict_to(0);
        assert!(dir.path().join("packs/future.pack").exists());
    }

    #[test]
    fn blocks_another_process_cached_are_found_after_a_rescan() {
        let dir = tempfile::tempdir().unwrap();
        let a = PackCache::open(dir.path(), u64::MAX).unwrap();
        let b = PackCache::open(dir.path(), u64::MAX).unwrap();
        let (h, _, e) = block(1, 65536);
        b.insert(&h, &e).unwrap();
        std::thread::sleep(RESCAN_EVERY + Duration::from_millis(100));
        assert!(a.contains(&h));
        assert_eq!(a.get_encoded(&h).as_deref(), Some(e.as_slice()));
        // One evicts everything; the other forgets the pack on its next rescan.
        b.evict_to(0);
        std::thread::sleep(RESCAN_EVERY + Duration::from_millis(100));
        let (h2, _, _) = block(2, 65536);
        // A miss (of a block nobody has) is what rescans.
        let _ = a.contains(&h2);
        assert!(!a.contains(&h), "a pack another process evicted is still indexed");
    }

    #[test]
    fn eviction_keeps_the_bound_and_pinned_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let bound = 4u64 << 20;
        let blocks: Vec<_> = (0..120).map(|i| block(i, 65536)).collect();
        // The first block pinned (pin files hold hashes; see `pins`).
        crate::pins::pin(dir.path(), &Hash([7; 32]), &[blocks[0].0]).unwrap();
        let c = BlockCache::open(dir.path(), bound).unwrap();
        for (h, _, e) in &blocks {
            c.insert_verified(h, e).unwrap();
            assert!(c.unpinned_bytes() <= bound, "{} over {bound}", c.unpinned_bytes());
        }
        let on_disk: u64 = pack_files(dir.path()).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
        assert!(on_disk <= bound + 2 * (RECORD_HEADER + 65536 + 64), "{on_disk} bytes of packs for a bound of {bound}");
        assert_eq!(c.get(&blocks[0].0).as_deref(), Some(blocks[0].1.as_slice()), "the pinned block was evicted");
        assert_eq!(c.get(&blocks[119].0).as_deref(), Some(blocks[119].1.as_slice()), "the newest block was evicted");
        assert!(c.get(&blocks[1].0).is_none(), "nothing was evicted");
        // And after a reopen.
        drop(c);
        let c = BlockCache::open(dir.path(), bound).unwrap();
        assert_eq!(c.get(&blocks[0].0).as_deref(), Some(blocks[0].1.as_slice()));
        // Freeing for a full disk frees at least what was asked.
        let before = c.used_bytes();
        assert!(c.free(1 << 20) >= 1 << 20, "freed too little of {before}");
    }

    #[test]
    fn an_evictor_leaves_a_pack_another_process_appends_to() {
        let dir = tempfile::tempdir().unwrap();
        let pinned: Vec<_> = (10..16).map(|i| block(i, 65536)).collect();
        crate::pins::pin(dir.path(), &Hash([7; 32]), &pinned.iter().map(|b| b.0).collect::<Vec<_>>()).unwrap();
        // A prefetch appends an unpinned block and three pinned ones; a mount sees them.
        let writer = PackCache::open(dir.path(), u64::MAX).unwrap();
        let (u, _, ue) = block(1, 65536);
        writer.insert(&u, &ue).unwrap();
        for (h, _, e) in &pinned[..3] {
            writer.insert(h, e).unwrap();
        }
        let evictor = PackCache::open(dir.path(), u64::MAX).unwrap();
        assert!(evictor.contains(&pinned[0].0));
        // The prefetch goes on appending past the mount's last scan; the mount evicts.
        for (h, _, e) in &pinned[3..] {
            writer.insert(h, e).unwrap();
        }
        evictor.evict_to(0);
        let fresh = PackCache::open(dir.path(), u64::MAX).unwrap();
        for (h, _, e) in &pinned {
            assert_eq!(fresh.get_encoded(h).as_deref(), Some(e.as_slice()), "pinned block {h} lost while its pack was written");
        }
        // The pack itself stayed (its unpinned block with it): the writer holds its lock.
        assert_eq!(fresh.get_encoded(&u).as_deref(), Some(ue.as_slice()), "the evictor took a pack another process appends to");
        // Once the writer lets go, the pack goes, its pinned blocks (all six) copied out.
        drop(writer);
        evictor.evict_to(0);
        assert!(!evictor.contains(&u), "the unpinned block stayed");
        let fresh = PackCache::open(dir.path(), u64::MAX).unwrap();
        assert!(!fresh.contains(&u), "the released pack was not evicted");
        for (h, _, e) in &pinned {
            assert_eq!(fresh.get_encoded(h).as_deref(), Some(e.as_slice()), "pinned block {h} lost in eviction");
        }
    }

    #[test]
    fn a_pack_stays_if_its_pinned_blocks_cannot_be_copied_out() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _, pe) = block(3, 65536);
        let (u, _, ue) = block(4, 65536);
        crate::pins::pin(dir.path(), &Hash([7; 32]), &[p]).unwrap();
        {
            let writer = PackCache::open(dir.path(), u64::MAX).unwrap();
            writer.insert(&p, &pe).unwrap();
            writer.insert(&u, &ue).unwrap();
        }
        let before = pack_files(dir.path());
        let evictor = PackCache::open(dir.path(), u64::MAX).unwrap();
        // A full disk: the copy fails, so the only copy stays.
        evictor.fail_appends.store(true, Ordering::Relaxed);
        evictor.evict_to(0);
        assert_eq!(pack_files(dir.path()), before, "the pack went though its pinned block was not copied");
        assert_eq!(PackCache::open(dir.path(), u64::MAX).unwrap().get_encoded(&p).as_deref(), Some(pe.as_slice()));
        // With room again it goes, the pinned block kept.
        evictor.fail_appends.store(false, Ordering::Relaxed);
        evictor.evict_to(0);
        assert!(!before[0].exists(), "the pack stayed");
        let fresh = PackCache::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(fresh.get_encoded(&p).as_deref(), Some(pe.as_slice()));
        assert!(!fresh.contains(&u));
    }

    #[test]
    fn a_rescan_stops_serving_blocks_of_a_pack_another_process_unlinked() {
        let dir = tempfile::tempdir().unwrap();
        let (h, _, e) = block(5, 65536);
        {
            let writer = PackCache::open(dir.path(), u64::MAX).unwrap();
            writer.insert(&h, &e).unwrap();
        }
        let reader = PackCache::open(dir.path(), u64::MAX).unwrap();
        PackCache::open(dir.path(), u64::MAX).unwrap().evict_to(0);
        // The reader's descriptor still reads the unlinked file; `prefetch --offline`
        // must not count that as cached.
        assert_eq!(reader.get_encoded(&h).as_deref(), Some(e.as_slice()));
        reader.rescan_now();
        assert!(reader.get_encoded(&h).is_none(), "a block of an unlinked pack was served after a rescan");
    }

    #[test]
    fn a_pack_left_without_a_header_is_deleted_once_stale() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("packs")).unwrap();
        let fresh = dir.path().join("packs/1-0.pack");
        let old = dir.path().join("packs/2-0.pack");
        std::fs::write(&fresh, b"CAPS").unwrap();
        std::fs::write(&old, b"").unwrap();
        let two_minutes_ago = std::time::SystemTime::now() - Duration::from_secs(120);
        File::options().write(true).open(&old).unwrap().set_modified(two_minutes_ago).unwrap();
        let _c = PackCache::open(dir.path(), u64::MAX).unwrap();
        assert!(fresh.exists(), "a pack being created was deleted");
        assert!(!old.exists(), "a stale empty pack stayed");
    }

    #[test]
    fn block_files_of_an_earlier_version_move_into_packs() {
        let dir = tempfile::tempdir().unwrap();
        let blocks: Vec<_> = (0..3).map(|i| block(i, 65536)).collect();
        {
            let store = capsule_images::Store::open(dir.path()).unwrap();
            for (h, _, e) in &blocks {
                store.put_verified_block(h, e).unwrap();
            }
        }
        let c = BlockCache::open(dir.path(), u64::MAX).unwrap();
        for (h, raw, _) in &blocks {
            assert_eq!(c.get(h).as_deref(), Some(raw.as_slice()));
            assert!(!c.store().block_path(h).exists(), "the block file stayed");
        }
    }
}
