//! One raw file into the store as an image (in parallel on all cores): what `capsule
//! import`, the qcow2 importer and a suspend's device state all build on.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

use crate::block;
use crate::envelope::ObjectKind;
use crate::error::{Error, Result, ResultExt};
use crate::hash::Hash;
use crate::image::ImageReader;
use crate::manifest::{check_block_size_log2, Image, Layer};
use crate::map::{self, Entry};
use crate::parallel::run_workers;
use crate::store::Store;

/// Default block size (64 KiB); `BENCHMARKS.md` says why.
pub const DEFAULT_BLOCK_SIZE_LOG2: u8 = 16;
const BATCH: u64 = 16;

/// What one import worker produced: its map entries (unsorted) and counters.
type WorkerOutput = (Vec<(u64, Entry)>, ImportStats);

/// Reports progress of long operations (a progress bar on a TTY, nothing otherwise).
pub trait Progress: Sync {
    /// A new phase over `total` bytes begins.
    fn begin(&self, label: &str, total: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The phase is over.
    fn end(&self);
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}

/// Counters of one image import.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ImportStats {
    /// Image size in bytes.
    pub logical_bytes: u64,
    /// Blocks in the image.
    pub blocks: u64,
    /// All-zero blocks (never stored).
    pub zero_blocks: u64,
    /// Blocks equal to the parent's (not mapped by the new layer).
    pub unchanged_blocks: u64,
    /// Blocks the new layer maps.
    pub mapped_blocks: u64,
    /// Mapped blocks written to the store now.
    pub new_blocks: u64,
    /// Mapped blocks the store already had (from any capsule).
    pub deduplicated_blocks: u64,
    /// Bytes written for new blocks (compressed where that helped).
    pub stored_bytes: u64,
    /// Bytes of new metadata (layer and map pages).
    pub metadata_bytes: u64,
}

impl ImportStats {
    pub(crate) fn add(&mut self, o: &ImportStats) {
        self.zero_blocks += o.zero_blocks;
        self.unchanged_blocks += o.unchanged_blocks;
        self.mapped_blocks += o.mapped_blocks;
        self.new_blocks += o.new_blocks;
        self.deduplicated_blocks += o.deduplicated_blocks;
        self.stored_bytes += o.stored_bytes;
    }
}

/// How to import one file as an image.
#[derive(Clone, Copy)]
pub struct FileImport<'a> {
    /// Block size as a power of two.
    pub block_size_log2: u8,
    /// The image the new layer goes over: only differing blocks are mapped.
    pub parent: Option<&'a ImageReader<'a>>,
    /// If set, only blocks `i` with `only[i]` may be mapped; others are taken from the parent.
    pub only: Option<&'a [bool]>,
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Progress reporting.
    pub progress: &'a dyn Progress,
    /// Seal the blocks with this key (an encrypted capsule; the parent, if any, is sealed
    /// with it too and opened by it).
    pub key: Option<&'a crate::seal::Key>,
}

impl std::fmt::Debug for FileImport<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileImport").field("block_size_log2", &self.block_size_log2).finish_non_exhaustive()
    }
}

/// What a worker learnt of a sparse file's layout: `[.., hole_until)` is a hole from
/// `known_from`, `[.., data_until)` data, so most blocks need no `lseek` at all.
#[derive(Debug, Default)]
struct Extents {
    known_from: u64,
    hole_until: u64,
    data_until: u64,
}

impl Extents {
    /// True if `[offset, offset + len)` lies in a hole (SEEK_DATA/SEEK_HOLE; a file system
    /// without them reports data everywhere, which is only slower).
    fn is_hole(&mut self, file: &File, offset: u64, len: u64, size: u64) -> bool {
        use rustix::fs::{seek, SeekFrom};
        let end = offset + len;
        if offset >= self.known_from && end <= self.hole_until {
            return true;
        }
        if offset >= self.known_from && end <= self.data_until {
            return false;
        }
        self.known_from = offset;
        match seek(file, SeekFrom::Data(offset)) {
            Ok(data) if data >= end => {
                self.hole_until = data;
                self.data_until = 0;
                true
            }
            Ok(_) => {
                self.hole_until = 0;
                self.data_until = seek(file, SeekFrom::Hole(offset)).unwrap_or(size);
                false
            }
            // ENXIO: no data at or after `offset`.
            Err(e) if e == rustix::io::Errno::NXIO => {
                self.hole_until = size.max(end);
                true
            }
            Err(_) => {
                self.hole_until = 0;
                self.data_until = size;
                false
            }
        }
    }
}

/// Imports the file at `path` as a new top layer; returns the image and what it cost.
pub fn import_file(store: &Store, path: &Path, opts: &FileImport<'_>) -> Result<(Image, ImportStats)> {
    check_block_size_log2(opts.block_size_log2)?;
    if let Some(p) = opts.parent {
        if p.image().block_size_log2 != opts.block_size_log2 {
            return Err(Error::invalid(format!(
                "{}: block size 2^{} differs from the parent image's 2^{}; a layer chain has one block size",
                path.display(),
                opts.block_size_log2,
                p.image().block_size_log2
            )));
        }
    }
    let file = File::open(path).map_err(|e| Error::io(path.display(), e))?;
    let size = file.metadata().map_err(|e| Error::io(path.display(), e))?.len();
    let bs = 1u64 << opts.block_size_log2;
    let nblocks = size.div_ceil(bs);
    let next = AtomicU64::new(0);
    let worker = |stop: &AtomicBool| -> Result<WorkerOutput> {
        let mut entries = Vec::new();
        let mut stats = ImportStats::default();
        let mut buf = vec![0u8; bs as usize];
        let mut extents = Extents::default();
        loop {
            let start = next.fetch_add(BATCH, Ordering::Relaxed);
            if start >= nblocks || stop.load(Ordering::Relaxed) {
                return Ok((entries, stats));
            }
            for index in start..(start + BATCH).min(nblocks) {
                let offset = index * bs;
                let len = bs.min(size - offset) as usize;
                if opts.only.is_some_and(|only| !only.get(index as usize).copied().unwrap_or(false)) {
                    opts.progress.advance(len as u64);
                    continue;
                }
                // A hole in a sparse file reads as zeros: no need to read it.
                let content = if extents.is_hole(&file, offset, len as u64, size) {
                    None
                } else {
                    file.read_exact_at(&mut buf[..len], offset).map_err(|e| Error::io(format!("{}: block {index} at offset {offset}", path.display()), e))?;
                    buf[len..].fill(0);
                    if block::is_zero(&buf) {
                        None
                    } else {
                        Some(Hash::of(&buf))
                    }
                };
                if content.is_none() {
                    stats.zero_blocks += 1;
                }
                let below = match opts.parent {
                    Some(p) => p.content_hash_in_chain(index)?,
                    None => None,
                };
                if content == below {
                    if opts.parent.is_some() {
                        stats.unchanged_blocks += 1;
                    }
                } else {
                    stats.mapped_blocks += 1;
                    match content {
                        None => entries.push((index, Entry::Zero)),
                        Some(h) => {
                            let put = match opts.key {
                                Some(k) => store.put_sealed_block(k, &h, &buf),
                                None => store.put_hashed_block(&h, &buf),
                            }
                            .with_context(|| format!("{}: block {index}", path.display()))?;
                            if put.new {
                                stats.new_blocks += 1;
                                stats.stored_bytes += put.stored_bytes;
                            } else {
                                stats.deduplicated_blocks += 1;
                            }
                            entries.push((index, put.entry));
                        }
                    }
                }
                opts.progress.advance(len as u64);
            }
        }
    };
    let results = run_workers(opts.threads, &worker)?;
    let mut entries = Vec::new();
    let mut stats = ImportStats { logical_bytes: size, blocks: nblocks, ..Default::default() };
    for (e, s) in results {
        entries.extend(e);
        stats.add(&s);
    }
    entries.sort_unstable_by_key(|e| e.0);

    let parent_top = opts.parent.and_then(|p| p.image().top);
    if entries.is_empty() {
        return Ok((Image { size, block_size_log2: opts.block_size_log2, top: parent_top }, stats));
    }
    let mut metadata_bytes = 0u64;
    let root = map::build(&entries, nblocks, &mut |page| {
        let (id, new) = store.put_object(ObjectKind::MapPage, page)?;
        if new {
            metadata_bytes += store.object_size(&id).unwrap_or(0);
        }
        Ok(id)
    })?;
    let layer = Layer { block_size_log2: opts.block_size_log2, parent: parent_top, map: root, mapped: entries.len() as u64 };
    let (layer_id, new) = store.put_object(ObjectKind::Layer, &layer)?;
    if new {
        metadata_bytes += store.object_size(&layer_id).unwrap_or(0);
    }
    stats.metadata_bytes = metadata_bytes;
    Ok((Image { size, block_size_log2: opts.block_size_log2, top: Some(layer_id) }, stats))
}
