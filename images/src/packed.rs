//! A store's blocks packed into large files. A block file of its own costs a cold read
//! an inode lookup and a small read each: reading the Debian guest's 9,268 block files
//! cold took 0.57 s of system CPU, the same bytes as one file 0.02 s. Blocks arrive as
//! files (`blocks/`, every writer's atomic rename) and are packed once a capsule names
//! them (`Store::pack_capsule`, in the capsule's walk order, so a sequential read of a
//! disk is a sequential read of its pack) or by gc.
//!
//! `STORE/packed/<name>.pack`, written to `tmp/`, fsynced and renamed into place whole:
//!
//! ```text
//!  header   magic "CAPSTPAK", version u32, 4 bytes zero
//!  blocks   each block's stored encoding, back to back
//!  index    (hash 32, offset u64, length u32) per block, sorted by hash
//!  footer   index offset u64, count u64, BLAKE3 of index and these two fields, magic "CAPSTEND"
//! ```
//!
//! A pack is read by its index only after the footer's checksum matches and every entry
//! lies inside the blocks' span; the blocks themselves are verified against their hashes
//! by whoever decodes them, as a block file's are.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crate::block::MAX_STORED_SIZE;
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::store::Store;
use filter::HashFilter;

mod filter;

pub(crate) const DIR: &str = "packed";
const MAGIC: &[u8; 8] = b"CAPSTPAK";
const END_MAGIC: &[u8; 8] = b"CAPSTEND";
const VERSION: u32 = 1;
const HEADER: u64 = 16;
const ENTRY: u64 = 44;
const FOOTER: u64 = 56;
/// The longest block a pack holds: a stored block and its encoding header.
const MAX_BLOCK: u64 = MAX_STORED_SIZE as u64 + 64;
/// Packs close at this size, so gc rewrites at most this much to drop one dead block.
pub(crate) const MAX_PACK_BYTES: u64 = 1 << 30;
/// A pack's index holds at most this many entries; a writer closes its pack there (a
/// nearly empty 4 KiB block encodes to a few dozen bytes, so bytes alone would not).
pub(crate) const MAX_ENTRIES: u64 = 1 << 24;
/// Small packs a store gathers before [`Store::merge_small_packs`] merges them.
pub const MERGE_SMALL_AT: usize = 16;
/// How often a lookup looks whether another process added or removed packs.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub(crate) struct IndexEntry {
    pub(crate) hash: Hash,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

/// One pack file, its index in memory (sorted by hash).
#[derive(Debug)]
pub(crate) struct Pack {
    path: PathBuf,
    file: File,
    /// The file's length when opened: a pack is never written after its rename.
    len: u64,
    pub(crate) entries: Vec<IndexEntry>,
    /// Blocks found damaged here by a read: lookups pass over them, so the block reads
    /// from another copy, and a later store of it writes a sound one (gc drops this copy
    /// once a sound one exists).
    damaged: Mutex<HashSet<Hash>>,
    any_damaged: AtomicBool,
    filter: HashFilter,
}

impl Pack {
    /// Opens and checks a pack (see [`parse_index`]).
    fn open(path: &Path) -> Result<Self> {
        let io = |e| Error::io(path.display(), e);
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let entries = parse_index(&path.display().to_string(), len, &|buf, at| file.read_exact_at(buf, at))?;
        let filter = HashFilter::new(entries.iter().map(|e| &e.hash));
        Ok(Self { path: path.to_path_buf(), file, len, entries, damaged: Mutex::default(), any_damaged: AtomicBool::new(false), filter })
    }

    pub(crate) fn find(&self, h: &Hash) -> Option<IndexEntry> {
        self.entries.binary_search_by(|e| e.hash.0.cmp(&h.0)).ok().map(|i| self.entries[i])
    }

    /// [`Self::find`], passing over a copy found damaged.
    fn find_usable(&self, h: &Hash) -> Option<IndexEntry> {
        self.find(h).filter(|_| !self.any_damaged.load(Ordering::Relaxed) || !self.damaged.lock().expect("damaged lock").contains(h))
    }

    /// Notes that this pack's copy of `h` does not decode to `h`.
    pub(crate) fn mark_damaged(&self, h: &Hash) {
        self.damaged.lock().expect("damaged lock").insert(*h);
        self.any_damaged.store(true, Ordering::Relaxed);
    }

    /// This pack's copy of `h` if it was found damaged: it reads sound once more (the file
    /// was restored in place), the note goes and its bytes return.
    fn recheck_damaged(&self, h: &Hash) -> Option<(Vec<u8>, Vec<u8>)> {
        let e = self.find(h).filter(|_| self.damaged.lock().expect("damaged lock").contains(h))?;
        let found = self.read_checked(&e).ok()?;
        self.damaged.lock().expect("damaged lock").remove(h);
        Some(found)
    }

    pub(crate) fn read(&self, e: &IndexEntry) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; e.len as usize];
        self.file.read_exact_at(&mut buf, e.offset).map_err(|err| Error::io(format!("{} at {} (block {})", self.path.display(), e.offset, e.hash), err))?;
        Ok(buf)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.len
    }

    /// The block at `e`, read and checked against its hash: its encoding and raw bytes.
    pub(crate) fn read_checked(&self, e: &IndexEntry) -> Result<(Vec<u8>, Vec<u8>)> {
        let encoded = self.read(e)?;
        let raw = crate::block::decode(&e.hash, &encoded)?;
        Ok((encoded, raw))
    }

    /// The block at `e`, read and checked against its hash.
    pub(crate) fn read_decoded(&self, e: &IndexEntry) -> Result<Vec<u8>> {
        self.read_checked(e).map(|(_, raw)| raw)
    }

    /// Whether this pack holds `h` and its copy reads and decodes to `h`.
    pub(crate) fn holds_sound(&self, h: &Hash) -> bool {
        self.find(h).is_some_and(|e| self.read_decoded(&e).is_ok())
    }
}

/// A pack's index, checked: header, footer, the index's place (before it is read), its
/// checksum, and every entry inside the blocks' span, sorted and unique. `read_at` fills
/// a buffer from an offset of the pack, `len` bytes long; `what` names it in errors.
fn parse_index(what: &str, len: u64, read_at: &dyn Fn(&mut [u8], u64) -> std::io::Result<()>) -> Result<Vec<IndexEntry>> {
    let io = |e| Error::io(what, e);
    let bad = |why: &str| Error::corrupt(format!("pack {what}: {why}"));
    if len < HEADER + FOOTER {
        return Err(bad("shorter than its header and footer"));
    }
    let mut header = [0u8; HEADER as usize];
    read_at(&mut header, 0).map_err(io)?;
    if &header[..8] != MAGIC || header[8..12] != VERSION.to_le_bytes() {
        return Err(bad("not a store pack of this version"));
    }
    let mut footer = [0u8; FOOTER as usize];
    read_at(&mut footer, len - FOOTER).map_err(io)?;
    if &footer[48..] != END_MAGIC {
        return Err(bad("no footer (a pack is renamed into place whole: damaged?)"));
    }
    let index_offset = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
    let count = u64::from_le_bytes(footer[8..16].try_into().expect("8 bytes"));
    if count > MAX_ENTRIES || index_offset < HEADER || index_offset.checked_add(count * ENTRY + FOOTER) != Some(len) {
        return Err(bad(&format!("footer names {count} entries at {index_offset} in a file of {len} bytes")));
    }
    let mut index = vec![0u8; (count * ENTRY) as usize];
    read_at(&mut index, index_offset).map_err(io)?;
    if index_checksum(&index, &footer[..16]) != footer[16..48] {
        return Err(bad("index checksum mismatch"));
    }
    let mut entries: Vec<IndexEntry> = Vec::with_capacity(count as usize);
    for (i, e) in index.chunks_exact(ENTRY as usize).enumerate() {
        let hash = Hash(e[..32].try_into().expect("32 bytes"));
        let offset = u64::from_le_bytes(e[32..40].try_into().expect("8 bytes"));
        let blen = u32::from_le_bytes(e[40..44].try_into().expect("4 bytes"));
        let inside = offset >= HEADER && u64::from(blen) <= MAX_BLOCK && offset.checked_add(u64::from(blen)).is_some_and(|end| end <= index_offset);
        let sorted = entries.last().is_none_or(|p| p.hash.0 < hash.0);
        if !inside || !sorted {
            return Err(bad(&format!("index entry {i} ({hash}) is out of place")));
        }
        entries.push(IndexEntry { hash, offset, len: blen });
    }
    Ok(entries)
}

/// Checks a whole pack held in memory as a pack file is checked when opened; returns the
/// number of blocks its index names. For the fuzzer, which also uses [`seal_pack_footer`].
pub fn check_pack(bytes: &[u8]) -> Result<usize> {
    let read_at = |buf: &mut [u8], at: u64| {
        let end = (at as usize).checked_add(buf.len()).filter(|&e| e <= bytes.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&bytes[at as usize..end]);
        Ok(())
    };
    parse_index("(in memory)", bytes.len() as u64, &read_at).map(|e| e.len())
}

/// Writes the checksum a pack's footer should hold for its index, if the footer's fields
/// point inside `bytes`: lets a fuzzer's mutations of the index reach the entry checks.
pub fn seal_pack_footer(bytes: &mut [u8]) {
    let Some(f) = bytes.len().checked_sub(FOOTER as usize) else { return };
    let index_offset = u64::from_le_bytes(bytes[f..f + 8].try_into().expect("8 bytes"));
    if index_offset as usize > f {
        return;
    }
    let fields: [u8; 16] = bytes[f..f + 16].try_into().expect("16 bytes");
    let sum = index_checksum(&bytes[index_offset as usize..f], &fields);
    bytes[f + 16..f + 48].copy_from_slice(&sum);
}

/// A pack of `blocks` in memory, as [`PackWriter`] writes one (the fuzzer's seeds).
pub fn pack_bytes(blocks: &[(Hash, Vec<u8>)]) -> Vec<u8> {
    let mut out = header().to_vec();
    let mut entries = Vec::new();
    for (hash, b) in blocks {
        entries.push(IndexEntry { hash: *hash, offset: out.len() as u64, len: b.len() as u32 });
        out.extend_from_slice(b);
    }
    let blocks_end = out.len() as u64;
    out.extend(tail(&mut entries, blocks_end).0);
    out
}

fn header() -> [u8; HEADER as usize] {
    let mut header = [0u8; HEADER as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header
}

/// What follows a pack's blocks (ending at `blocks_end`): the index of `entries` (sorted
/// and deduplicated here) and the footer. Also returns the index, which names the pack.
fn tail(entries: &mut Vec<IndexEntry>, blocks_end: u64) -> (Vec<u8>, Vec<u8>) {
    entries.sort_by_key(|e| e.hash.0);
    entries.dedup_by(|a, b| a.hash == b.hash);
    let mut index = Vec::with_capacity(entries.len() * ENTRY as usize);
    for e in entries.iter() {
        index.extend_from_slice(&e.hash.0);
        index.extend_from_slice(&e.offset.to_le_bytes());
        index.extend_from_slice(&e.len.to_le_bytes());
    }
    let mut fields = [0u8; 16];
    fields[..8].copy_from_slice(&blocks_end.to_le_bytes());
    fields[8..].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    let checksum = index_checksum(&index, &fields);
    let mut out = index.clone();
    for part in [&fields[..], &checksum, END_MAGIC] {
        out.extend_from_slice(part);
    }
    (out, index)
}

/// Raises the soft limit on open files to the hard one, once: every pack a store or a
/// cache knows holds a descriptor, and at the usual soft limit of 1024 a server with many
/// uploads' packs, or a large cache of small packs, would run out.
pub fn raise_open_file_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut lim = getrlimit(Resource::Nofile);
        if lim.current < lim.maximum {
            lim.current = lim.maximum;
            if let Err(e) = setrlimit(Resource::Nofile, lim) {
                tracing::warn!("cannot raise the open file limit: {e}");
            }
        }
    });
}

fn index_checksum(index: &[u8], footer_fields: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(index);
    hasher.update(footer_fields);
    *hasher.finalize().as_bytes()
}

#[derive(Debug, Default)]
struct State {
    loaded: bool,
    packs: Vec<Arc<Pack>>,
    /// Packs that failed to open: path and why (`verify` reports them).
    broken: Vec<(PathBuf, String)>,
    dir_mtime: Option<SystemTime>,
    /// The directory changed within a second of the load: its time can hide a later
    /// change in the same tick (ext4 stamps with a coarse clock), so a look reloads.
    racy: bool,
    checked: Option<Instant>,
}

/// The packs of one store, loaded on first use and reloaded when the directory changes.
#[derive(Debug)]
pub(crate) struct Packs {
    dir: PathBuf,
    state: RwLock<State>,
}

impl Packs {
    pub(crate) fn new(root: &Path) -> Self {
        Self { dir: root.join(DIR), state: RwLock::new(State::default()) }
    }

    fn dir_mtime(&self) -> Option<SystemTime> {
        fs::metadata(&self.dir).and_then(|m| m.modified()).ok()
    }

    /// Reads the directory again: opens packs new to it, drops those gone.
    pub(crate) fn reload(&self) {
        raise_open_file_limit();
        let mtime = self.dir_mtime();
        let loaded_at = SystemTime::now();
        let mut names = Vec::new();
        if let Ok(entries) = fs::read_dir(&self.dir) {
            names = entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "pack")).collect();
        }
        names.sort();
        let mut st = self.state.write().expect("packs lock");
        let known: HashMap<PathBuf, Arc<Pack>> = st.packs.drain(..).map(|p| (p.path.clone(), p)).collect();
        let mut broken = Vec::new();
        for path in names {
            if let Some(p) = known.get(&path) {
                st.packs.push(p.clone());
                continue;
            }
            match Pack::open(&path) {
                Ok(p) => st.packs.push(Arc::new(p)),
                // Renamed away by a gc between the listing and the open.
                Err(e) if e.kind() == crate::ErrorKind::NotFound => {}
                // Out of descriptors: not the pack's fault; the next reload tries again.
                Err(e) if e.io_error().and_then(std::io::Error::raw_os_error) == Some(rustix::io::Errno::MFILE.raw_os_error()) => {
                    tracing::warn!("{e}");
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    broken.push((path, e.to_string()));
                }
            }
        }
        st.broken = broken;
        st.loaded = true;
        st.racy = mtime.is_some_and(|m| loaded_at.duration_since(m).unwrap_or_default() < Duration::from_secs(1));
        st.dir_mtime = mtime;
        st.checked = Some(Instant::now());
    }

    /// Loads the packs on first use, and again when the directory changed (looked at
    /// most once a second, or now with `look_now`).
    fn refresh(&self, look_now: bool) {
        {
            let st = self.state.read().expect("packs lock");
            let due = st.checked.is_none_or(|t| t.elapsed() >= RECHECK_EVERY);
            if st.loaded && !look_now && !due {
                return;
            }
            if st.loaded && !st.racy && st.dir_mtime == self.dir_mtime() {
                drop(st);
                self.state.write().expect("packs lock").checked = Some(Instant::now());
                return;
            }
        }
        self.reload();
    }

    /// The first pack holding a copy of `h` not found damaged, and its entry.
    pub(crate) fn lookup(&self, h: &Hash) -> Option<(Arc<Pack>, IndexEntry)> {
        self.refresh(false);
        let st = self.state.read().expect("packs lock");
        // One pack: its index alone is the shorter search.
        let single = st.packs.len() == 1;
        st.packs.iter().filter(|p| single || p.filter.may_hold(h)).find_map(|p| p.find_usable(h).map(|e| (p.clone(), e)))
    }

    /// A copy of `h` once found damaged that now reads sound: its encoding and raw bytes.
    pub(crate) fn recheck_damaged(&self, h: &Hash) -> Option<(Vec<u8>, Vec<u8>)> {
        let st = self.state.read().expect("packs lock");
        st.packs.iter().filter(|p| p.any_damaged.load(Ordering::Relaxed)).find_map(|p| p.recheck_damaged(h))
    }

    /// True if a pack holds the block.
    pub(crate) fn contains(&self, h: &Hash) -> bool {
        self.lookup(h).is_some()
    }

    /// [`Self::contains`], after looking whether the directory changed: for an answer
    /// another process may act on (a server telling a client what it lacks).
    pub(crate) fn contains_now(&self, h: &Hash) -> bool {
        self.refresh_now();
        self.contains(h)
    }

    /// Looks now whether `packed/` changed, and reloads if so.
    pub(crate) fn refresh_now(&self) {
        self.refresh(true);
    }

    /// The block as stored, if a pack holds it: a copy found damaged only if no other is
    /// known (its reader checks it, and it may have been restored in place).
    pub(crate) fn read(&self, h: &Hash) -> Option<Result<Vec<u8>>> {
        self.lookup(h).map(|(p, e)| p.read(&e)).or_else(|| {
            // Only a pack holding a marked copy: the others answered `lookup` already.
            let st = self.state.read().expect("packs lock");
            st.packs.iter().filter(|p| p.any_damaged.load(Ordering::Relaxed)).find_map(|p| p.find(h).map(|e| p.read(&e)))
        })
    }

    /// The block's stored length and its pack, if a pack holds it.
    pub(crate) fn locate(&self, h: &Hash) -> Option<(PathBuf, u32)> {
        self.lookup(h).map(|(p, e)| (p.path.clone(), e.len))
    }

    /// Every pack (after a reload) and every file that failed to open as one.
    pub(crate) fn all(&self) -> (Vec<Arc<Pack>>, Vec<(PathBuf, String)>) {
        self.reload();
        let st = self.state.read().expect("packs lock");
        (st.packs.clone(), st.broken.clone())
    }
}

/// A pack being written to `tmp/`: blocks streamed out, the index kept in memory.
pub(crate) struct PackWriter {
    tmp: TmpFile,
    out: std::io::BufWriter<File>,
    entries: Vec<IndexEntry>,
    offset: u64,
}

impl PackWriter {
    pub(crate) fn create(tmp: &Path) -> Result<Self> {
        let file = File::create(tmp).map_err(|e| Error::io(tmp.display(), e))?;
        let mut w = Self { tmp: TmpFile(tmp.to_path_buf()), out: std::io::BufWriter::with_capacity(1 << 20, file), entries: Vec::new(), offset: 0 };
        w.write(&header())?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| Error::io(self.tmp.0.display(), e))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Appends a block's stored encoding.
    pub(crate) fn add(&mut self, hash: &Hash, encoded: &[u8]) -> Result<()> {
        if encoded.len() as u64 > MAX_BLOCK {
            return Err(Error::corrupt(format!("block {hash} of {} bytes is too long to pack", encoded.len())));
        }
        self.entries.push(IndexEntry { hash: *hash, offset: self.offset, len: encoded.len() as u32 });
        self.write(encoded)
    }

    /// Bytes written so far.
    pub(crate) fn len(&self) -> u64 {
        self.offset
    }

    /// Writes the index and footer, fsyncs the pack and renames it into `dir` (fsynced
    /// too): a pack is in place whole or not at all. Returns its path.
    pub(crate) fn finish(mut self, dir: &Path) -> Result<PathBuf> {
        let (tail, index) = tail(&mut self.entries, self.offset);
        self.write(&tail)?;
        let tmp = self.tmp.0.clone();
        let io = |e| Error::io(tmp.display(), e);
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        let dest = dir.join(format!("{}.pack", &Hash::of(&index).to_hex()[..32]));
        fs::rename(&tmp, &dest).map_err(|e| Error::io(format!("rename {} -> {}", tmp.display(), dest.display()), e))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir.display(), e))?;
        Ok(dest)
    }
}

/// A pack being written, removed if its writer is dropped unfinished (after `finish`
/// renamed it, nothing is left to remove): an upload cut off mid-request leaves nothing in
/// the `tmp/` of a server that may run for months (it is cleared only when a process opens
/// the store alone).
#[derive(Debug)]
struct TmpFile(PathBuf);

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// What packing did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PackStats {
    /// Block files moved into packs.
    pub blocks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Packs written.
    pub packs: u64,
}

/// Blocks written into new packs, one closing at [`MAX_PACK_BYTES`] or [`MAX_ENTRIES`]
/// and the next begun: the one writer behind a pull's and an upload's batch, packing block
/// files, and gc's rewrites. For a batch that stores many blocks before a ref names them,
/// one fsync per pack instead of a file and an fsync per block. A pack is visible once it
/// is closed (all by [`PackBatch::finish`]); an unfinished pack is removed with its batch.
/// Owns what it needs, so it can outlive a borrow of its store (a server's request).
#[derive(Debug)]
pub struct PackBatch {
    root: PathBuf,
    packs: Arc<Packs>,
    writer: Option<PackWriter>,
    /// Blocks added, so one given twice is stored once.
    added: HashSet<Hash>,
    /// Packs this batch put in place.
    written: Vec<PathBuf>,
    stats: PackStats,
}

impl PackBatch {
    /// Appends a block's encoding, checked against its hash by the caller; false if this
    /// batch has it already. (gc and packing copy blocks packs hold: see [`Self::add_new`].)
    pub fn add(&mut self, h: &Hash, encoded: &[u8]) -> Result<bool> {
        if !self.added.insert(*h) {
            return Ok(false);
        }
        if self.writer.is_none() {
            self.writer = Some(PackWriter::create(&crate::store::unique_tmp(&self.root))?);
        }
        let w = self.writer.as_mut().expect("just created");
        w.add(h, encoded)?;
        self.stats.blocks += 1;
        self.stats.bytes += encoded.len() as u64;
        if w.len() >= MAX_PACK_BYTES || w.entries.len() as u64 >= MAX_ENTRIES {
            self.close_pack()?;
        }
        Ok(true)
    }

    /// [`Self::add`] for a block arriving from elsewhere (a pull, an upload): false also if
    /// a pack the store knows holds it (an in-memory look, no listing: a block packed
    /// elsewhere a moment ago, or held as a file, is stored twice until gc).
    pub fn add_new(&mut self, h: &Hash, encoded: &[u8]) -> Result<bool> {
        if self.packs.contains(h) {
            return Ok(false);
        }
        self.add(h, encoded)
    }

    fn close_pack(&mut self) -> Result<()> {
        if let Some(w) = self.writer.take() {
            crate::store::mark_packed_format(&self.root)?;
            self.written.push(w.finish(&self.root.join(DIR))?);
        }
        Ok(())
    }

    /// Puts the batch's last pack in place (fsynced) and makes its blocks visible.
    pub fn finish(self) -> Result<PackStats> {
        self.finish_packs().map(|(stats, _)| stats)
    }

    /// [`Self::finish`], also naming the packs put in place.
    pub(crate) fn finish_packs(mut self) -> Result<(PackStats, Vec<PathBuf>)> {
        self.close_pack()?;
        self.packs.reload();
        let stats = PackStats { packs: self.written.len() as u64, ..self.stats };
        Ok((stats, std::mem::take(&mut self.written)))
    }
}

impl std::fmt::Debug for PackWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackWriter").field("tmp", &self.tmp.0).field("blocks", &self.entries.len()).field("bytes", &self.offset).finish()
    }
}

impl Store {
    /// A batch of blocks written straight into packs (see [`PackBatch`]).
    pub fn pack_batch(&self) -> PackBatch {
        PackBatch {
            root: self.root().to_path_buf(),
            packs: self.packs.clone(),
            writer: None,
            added: HashSet::new(),
            written: Vec::new(),
            stats: PackStats::default(),
        }
    }

    /// Moves the block files capsule `id` reaches into packs, in its walk order (files in
    /// order, blocks by offset), so a sequential read of one of its disks reads its pack
    /// sequentially. Blocks already packed stay where they are.
    pub fn pack_capsule(&self, id: &Hash) -> Result<PackStats> {
        let (_, blocks) = self.closure(id)?;
        self.pack_loose(blocks, false)
    }

    /// [`Self::pack_capsule`] after a ref names `id`; a failure leaves its blocks in
    /// their files, where they are served as before, and is logged.
    pub fn pack_named_capsule(&self, id: &Hash) {
        let packed = self.closure(id).and_then(|(_, blocks)| self.pack_loose(blocks, false));
        self.log_packing(id, packed);
    }

    /// [`Self::pack_named_capsule`] given the capsule's blocks in walk order (its
    /// [`Store::closure`]), for a caller that has walked it already.
    pub fn pack_walked_capsule(&self, id: &Hash, blocks: &[Hash]) {
        self.log_packing(id, self.pack_loose(blocks.iter().copied(), false));
    }

    fn log_packing(&self, id: &Hash, packed: Result<PackStats>) {
        match packed {
            Ok(s) if s.blocks > 0 => tracing::debug!("store {}: packed {} blocks of {id} ({} bytes)", self.root().display(), s.blocks, s.bytes),
            Ok(_) => {}
            Err(e) => tracing::warn!("store {}: cannot pack capsule {id}'s blocks (they stay in their files): {}", self.root().display(), e.report()),
        }
    }

    /// [`Self::merge_small_packs`], a failure logged (the packs stay as they are).
    pub fn tidy_packs(&self) {
        if let Err(e) = self.merge_small_packs() {
            tracing::warn!("store {}: cannot merge small packs (they stay as they are): {}", self.root().display(), e.report());
        }
    }

    /// Merges the packs under gc's small-pack size once there are more than
    /// [`MERGE_SMALL_AT`] of them (uploads make one per request), so a server that never
    /// stops for a gc keeps its lookups and open files few. Safe beside readers: a
    /// process reading an old pack holds it open, and one that lists `packed/` afresh finds
    /// the merged pack before the old ones go.
    pub fn merge_small_packs(&self) -> Result<()> {
        let _lock = self.pack_lock()?;
        let (packs, _) = self.packs.all();
        if packs.iter().filter(|p| p.bytes() < crate::store::SMALL_PACK).count() > MERGE_SMALL_AT {
            self.gc_packs(None, &mut crate::store::GcStats::default())?;
        }
        Ok(())
    }

    /// The store's packer lock (`packed/lock`): one packer of files or merger at a time.
    fn pack_lock(&self) -> Result<File> {
        let dir = self.root().join(DIR);
        fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
        let lock_path = dir.join("lock");
        let lock = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| Error::io(lock_path.display(), e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|e| Error::io(lock_path.display(), e.into()))?;
        Ok(lock)
    }

    /// Packs the block files among `order`, in that order; with `drop_duplicates`, also
    /// removes the files of blocks a pack holds a sound copy of. A file is packed only if
    /// it decodes to its name (a damaged one stays, for a later store of the block to
    /// replace and `verify` to name), and removed only once a pack in place answers for
    /// it; one packer of files at a time per store.
    pub(crate) fn pack_loose(&self, order: impl IntoIterator<Item = Hash>, drop_duplicates: bool) -> Result<PackStats> {
        let _lock = self.pack_lock()?;
        self.packs.reload();
        let mut batch = self.pack_batch();
        // Blocks whose files go once their packs are in place.
        let mut moved = Vec::new();
        for h in order {
            let path = self.block_path(&h);
            if self.packs.contains(&h) {
                if drop_duplicates && path.exists() && self.packed_copy_sound(&h) {
                    moved.push(h);
                }
                continue;
            }
            let encoded = match fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(path.display(), e)),
            };
            if let Err(e) = crate::block::decode(&h, &encoded) {
                tracing::warn!("store {}: block file {} is damaged, not packed: {e}", self.root().display(), path.display());
                continue;
            }
            if batch.add(&h, &encoded)? {
                moved.push(h);
            }
        }
        let stats = batch.finish()?;
        for h in moved {
            if !self.packs.contains(&h) {
                tracing::warn!("store {}: block {h} is in no pack after packing; its file stays", self.root().display());
                continue;
            }
            let path = self.block_path(&h);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(path.display(), e)),
                _ => {}
            }
        }
        Ok(stats)
    }

    /// Whether the first pack holding `h` holds it sound (read and decoded).
    pub(crate) fn packed_copy_sound(&self, h: &Hash) -> bool {
        self.packs.lookup(h).is_some_and(|(p, e)| p.read_decoded(&e).is_ok())
    }
}

#[cfg(test)]
mod tests;
