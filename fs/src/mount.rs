//! The FUSE filesystem: a capsule's images as files, read through the layer chain, the
//! cache and the block source; writes to the copy-on-write overlay.
//!
//! ```text
//!  /                      <disk>.raw ..., memory.raw, devstate.bin, vmlinuz, initrd.img,
//!                         capsule.json (the VM description)
//!  /.capsule/stats.json   live counters (read it again for fresh numbers)
//!  /.capsule/info.json    what `capsule commit` and `capsule umount` need
//!  /.capsule/metadata     reading it completes the capsule's metadata in the cache
//!                         (map pages are otherwise fetched when a read needs them)
//! ```

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsule_images::{Hash, Image, Layer, Slot};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use tracing::{error, warn};

use capsule_fetch::readahead::{Neighbours, Readahead};
use capsule_fetch::sched::SchedConfig;
use capsule_fetch::{BlockSource, Engine, EngineConfig};

use crate::blocks::{CacheBlocks, LazyPages};
use crate::cache::BlockCache;
use crate::error::{errno, Error, ErrorKind, Result};
pub use crate::layout::{image_files, read_info, vm_json, MountInfo};
use crate::overlay::Overlay;
pub use crate::recorder::Recorder;
pub use ahead::auto_cluster;
pub use status::{FetchStats, FileStats, MountStats};

mod ahead;
mod read;
mod sealed;
mod status;
mod write;

const ROOT: u64 = 1;
const META_DIR: u64 = 2;
const STATS: u64 = 3;
const INFO: u64 = 4;
/// Reading it fetches every map page of the capsule the cache lacks (for a commit).
const METADATA: u64 = 5;
const FIRST_FILE: u64 = 6;
const TTL: Duration = Duration::from_secs(3600);
/// Most bytes read ahead of one sequential stream.
const MAX_READAHEAD_BYTES: u64 = 8 << 20;
/// Most bytes decoded ahead of one sequential stream from the local cache (a sixteenth of
/// the memory cache's default).
const DECODE_AHEAD_BYTES: u64 = 4 << 20;
/// How far ahead, in the stream's time, blocks are decoded: several blocks' decoding.
const DECODE_AHEAD_HORIZON: std::time::Duration = std::time::Duration::from_millis(10);

#[allow(clippy::large_enum_variant)] // one per file of a mount
enum Content {
    Image {
        image: Image,
        chain: Vec<(Hash, Layer)>,
        overlay: Option<Overlay>,
        readahead: Mutex<Readahead>,
        neighbours: Mutex<Neighbours>,
        /// Streams decoded ahead from the local cache (see `decode_ahead`).
        decode_ahead: Mutex<Readahead>,
    },
    Bytes(Vec<u8>),
}

struct Node {
    name: String,
    content: Content,
    /// What a read that fetches brings along.
    ahead: Ahead,
    /// `Ahead::Whole` asked for the file already.
    asked_whole: std::sync::atomic::AtomicBool,
}

/// Blocks fetched beside the ones a read needs.
#[derive(Debug, Clone, Copy)]
enum Ahead {
    /// A window ahead of readers that earn it by reading sequentially (disks).
    Sequential,
    /// The whole file once it is first read: a hypervisor reads the kernel and initrd
    /// whole at start, so all of it is needed and none of it is a guess.
    Whole,
    /// The rest of the read's aligned group of this many blocks (guest RAM, whose faults
    /// only look sequential; 1: none; 0: sized from the link, see [`auto_cluster`]).
    Aligned(u64),
}

/// Live counters.
#[derive(Debug, Default)]
pub struct Stats {
    reads_in_flight: AtomicU64,
    read_errors: AtomicU64,
    bytes_written: AtomicU64,
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Refuse writes.
    pub read_only: bool,
    /// Where the overlays go (`CACHE/cow/<id>`), used when writable.
    pub overlay_dir: PathBuf,
    /// Shown in info.json.
    pub source_label: String,
    /// Local files whose blocks count as present.
    pub seeds: Vec<PathBuf>,
    /// Record the blocks reads touch, in first-touch order, into this recorder.
    pub recorder: Option<Arc<Recorder>>,
    /// The kernel's readahead for this mount, in bytes. 0 makes a fault on an mmap'd file
    /// (guest RAM) read only the faulting page.
    pub kernel_readahead: u32,
    /// Guest RAM faults fetch aligned groups of this many blocks (1: one page).
    pub memory_cluster: u32,
    /// Where the mount appears (files that name other files point there).
    pub mountpoint: PathBuf,
    /// How the capsule's files are named and what else the mount shows: the hypervisor
    /// glue's choice (`capsule_vmm_glue::mount_layout`).
    pub layout: capsule_images::LayoutFn,
    /// A read waiting on the source fails after this long without any block arriving.
    pub stall_timeout: Duration,
    /// The key that opens an encrypted capsule (checked against the one it names).
    pub key: Option<capsule_images::Key>,
}

/// The kernel readahead a mount gets unless told otherwise: the kernel's own default for
/// the device. More (1 MiB: a cold sequential read on loopback 405-461 -> 479-554 MB/s)
/// also reads ahead for a hypervisor's page-cache reads, and a profile-warmed boot then
/// fetched 32 blocks outside its profile.
pub const DEFAULT_KERNEL_READAHEAD: u32 = 128 << 10;

/// The filesystem.
pub struct CapsuleFs {
    cache: Arc<BlockCache>,
    engine: Arc<Engine>,
    local: Arc<CacheBlocks>,
    pages: LazyPages,
    nodes: Vec<Node>,
    read_only: bool,
    stats: Stats,
    info: MountInfo,
    mounted_at: SystemTime,
    recorder: Option<Arc<Recorder>>,
    /// `stats.json` as it was when each handle opened it: a reader gets one consistent
    /// document however many reads it takes.
    snapshots: Mutex<std::collections::HashMap<u64, Vec<u8>>>,
    next_fh: AtomicU64,
    kernel_readahead: u32,
    /// The working-set profile being prefetched, if any: readahead and RAM fault clusters
    /// then bring only blocks it lists (it already says what the guest will read).
    profile: Arc<std::sync::RwLock<Option<Arc<std::collections::HashSet<Hash>>>>>,
    /// Opens the sealed blocks of an encrypted capsule.
    key: Option<capsule_images::Key>,
}

/// While alive, the mount's readahead and RAM clusters follow a profile
/// ([`CapsuleFs::follow_profile`]); dropped when its prefetch ends.
#[derive(Debug)]
pub struct FollowProfile(Arc<std::sync::RwLock<Option<Arc<std::collections::HashSet<Hash>>>>>);

impl Drop for FollowProfile {
    fn drop(&mut self) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Node {
    fn bytes(name: &str, bytes: Vec<u8>) -> Self {
        Self { name: name.into(), content: Content::Bytes(bytes), ahead: Ahead::Aligned(1), asked_whole: Default::default() }
    }
}

impl std::fmt::Debug for CapsuleFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapsuleFs").field("capsule", &self.info.capsule_id).finish_non_exhaustive()
    }
}

impl CapsuleFs {
    /// Prepares capsule `id` (its metadata must be in the cache's store).
    pub fn new(cache: Arc<BlockCache>, source: Option<Arc<dyn BlockSource>>, id: Hash, config: &MountConfig) -> Result<Self> {
        let store = cache.store();
        let mut manifest = store.manifest(&id)?;
        let key = match (&manifest.sealing, &config.key) {
            (None, _) => None,
            (Some(s), Some(k)) => {
                k.check_opens(s, &format!("{} ({})", manifest.name, id.short()))?;
                let k = k.clone();
                // The VM description and boot command line are sealed with the blocks.
                manifest.open(&k)?;
                Some(k)
            }
            (Some(s), None) => {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("capsule {} ({}) is encrypted with key {}, and no key was given to the mount", manifest.name, id.short(), s.key_id),
                ))
            }
        };
        let layout = (config.layout)(&manifest, &config.mountpoint);
        // Two files of one name (a disk named `memory` beside the RAM's `memory.raw`) would
        // let one stand for the other: a capsule from elsewhere chooses its names.
        let names = image_files(&manifest, !config.read_only, &layout)
            .into_iter()
            .map(|(n, ..)| n)
            .chain(["capsule.json".to_string()])
            .chain(layout.extra.iter().map(|(n, _)| n.clone()));
        let mut seen = std::collections::HashSet::new();
        for name in names {
            if !seen.insert(name.clone()) {
                return Err(Error::new(ErrorKind::Invalid, format!("capsule {} ({}): two files named {name:?}", manifest.name, id.short())));
            }
        }
        let mut nodes = Vec::new();
        let mut files = Vec::new();
        for (name, slot, image) in image_files(&manifest, !config.read_only, &layout) {
            let reader = capsule_images::ImageReader::open(store, image).map_err(|e| Error::from(e).context(&name))?;
            let chain = reader.chain().to_vec();
            let overlay = if config.read_only {
                None
            } else {
                Some(Overlay::open(&config.overlay_dir, &slot.key(), image.size, image.block_size()).map_err(|e| Error::io(config.overlay_dir.display(), e))?)
            };
            let ahead = match slot {
                Slot::Memory => Ahead::Aligned(u64::from(config.memory_cluster)),
                Slot::Kernel | Slot::Initrd => Ahead::Whole,
                Slot::Disk(_) | Slot::Devstate => Ahead::Sequential,
            };
            files.push((name.clone(), slot));
            nodes.push(Node {
                name,
                content: Content::Image {
                    image,
                    chain,
                    overlay,
                    readahead: Mutex::new(Readahead::default()),
                    neighbours: Mutex::new(Neighbours::default()),
                    decode_ahead: Mutex::new(Readahead::default()),
                },
                ahead,
                asked_whole: Default::default(),
            });
        }
        let mut sizes: Vec<u64> = nodes
            .iter()
            .filter_map(|n| match &n.content {
                Content::Image { image, .. } => Some(image.block_size()),
                Content::Bytes(_) => None,
            })
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        let seeds = crate::seed::Seeds::index(&config.seeds, &sizes).map_err(|e| Error::io("indexing seeds", e))?;
        let local = Arc::new(CacheBlocks::new(cache.clone(), seeds));
        let engine_config = EngineConfig {
            stall_timeout: config.stall_timeout,
            sched: SchedConfig { block_bytes_guess: sizes.last().copied().unwrap_or(65536), batch_stall: config.stall_timeout, ..SchedConfig::default() },
            source_label: config.source_label.clone(),
            verify_threads: EngineConfig::verify_threads_for_machine(),
            ..EngineConfig::default()
        };
        let pages = LazyPages::new(cache.clone(), source.clone());
        let engine = Engine::new(local.clone(), source, engine_config);
        let vm = serde_json::to_vec_pretty(&vm_json(&id, &manifest, &layout)).unwrap_or_default();
        nodes.push(Node::bytes("capsule.json", vm));
        for (name, bytes) in layout.extra {
            nodes.push(Node::bytes(&name, bytes));
        }
        let info = MountInfo {
            capsule_id: id,
            name: manifest.name.clone(),
            cache_store: store.root().to_path_buf(),
            overlay_dir: (!config.read_only).then(|| config.overlay_dir.clone()),
            source: config.source_label.clone(),
            pid: std::process::id(),
            files,
            kernel_readahead: Some(config.kernel_readahead),
        };
        Ok(Self {
            kernel_readahead: config.kernel_readahead,
            profile: Default::default(),
            key,
            cache,
            engine,
            local,
            pages,
            nodes,
            read_only: config.read_only,
            stats: Stats::default(),
            info,
            mounted_at: SystemTime::now(),
            recorder: config.recorder.clone(),
            snapshots: Mutex::new(std::collections::HashMap::new()),
            // Distinct from a predecessor daemon's handles (after a takeover both kinds are open).
            next_fh: AtomicU64::new(u64::from(std::process::id()) << 32 | 1),
        })
    }

    fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(FIRST_FILE).and_then(|i| self.nodes.get(i as usize))
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm) = match ino {
            ROOT | META_DIR => (FileType::Directory, 0, 0o755),
            STATS | METADATA => (FileType::RegularFile, 0, 0o444),
            INFO => (FileType::RegularFile, self.info_bytes().len() as u64, 0o444),
            _ => match &self.node(ino)?.content {
                // Guest disks, RAM and device state: the mounting user and its group (a
                // hypervisor in that group) only; enforced by `default_permissions`.
                Content::Image { image, overlay, .. } => (FileType::RegularFile, image.size, if overlay.is_some() { 0o640 } else { 0o440 }),
                Content::Bytes(b) => (FileType::RegularFile, b.len() as u64, 0o444),
            },
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            rdev: 0,
            flags: 0,
            blksize: 65536,
        })
    }

    /// What info.json says.
    pub fn info(&self) -> &MountInfo {
        &self.info
    }

    fn lookup_ino(&self, parent: u64, name: &OsStr) -> Option<u64> {
        let name = name.to_str()?;
        match (parent, name) {
            (ROOT, ".capsule") => Some(META_DIR),
            (META_DIR, "stats.json") => Some(STATS),
            (META_DIR, "info.json") => Some(INFO),
            (META_DIR, "metadata") => Some(METADATA),
            (ROOT, n) => self.nodes.iter().position(|node| node.name == n).map(|i| FIRST_FILE + i as u64),
            _ => None,
        }
    }

    fn info_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&self.info).unwrap_or_default()
    }

    /// The fetch engine (for prefetching through the same single flight).
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// A working-set profile is being prefetched: until the returned guard drops (when the
    /// prefetch ends), readahead and RAM fault clusters bring only blocks it lists, so they
    /// reorder the profile's fetches rather than add bytes to them.
    pub fn follow_profile(&self, blocks: &[Hash]) -> FollowProfile {
        let set = Arc::new(blocks.iter().copied().collect());
        *self.profile.write().unwrap_or_else(|p| p.into_inner()) = Some(set);
        FollowProfile(self.profile.clone())
    }
}

thread_local! {
    /// Each FUSE thread's reply buffer, reused from read to read.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn slice_from(bytes: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = (offset as usize).min(bytes.len());
    let end = start.saturating_add(size as usize).min(bytes.len());
    &bytes[start..end]
}

impl Filesystem for CapsuleFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large readahead means fewer round trips for sequential readers; 0 (for a guest's
        // RAM) makes a page fault read just its page.
        // fuser refuses 0; the kernel rounds down to whole pages, so 1 byte means none.
        let _ = config.set_max_readahead(self.kernel_readahead.max(1));
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_ino(u64::from(parent), name).and_then(|ino| self.attr(ino)) {
            Some(attr) => reply.entry(if attr.ino == INodeNo(STATS) { &Duration::ZERO } else { &TTL }, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(u64::from(ino)) {
            Some(attr) => reply.attr(if u64::from(ino) == STATS { &Duration::ZERO } else { &TTL }, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(u64::from(ino)) else { return reply.error(Errno::ENOENT) };
        // Images have a fixed size; truncating to the same size is a no-op.
        if size.is_some_and(|s| s != attr.size) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ino = u64::from(ino);
        let writing = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        match ino {
            STATS | METADATA => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                match self.snapshot_bytes(ino) {
                    Ok(bytes) => {
                        self.snapshots.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, bytes);
                        reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
                    }
                    Err(e) => reply.error(errno(&e)),
                }
            }
            INFO => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            _ => match self.node(ino) {
                Some(Node { content: Content::Image { overlay, .. }, .. }) => {
                    if writing && overlay.is_none() {
                        return reply.error(Errno::EROFS);
                    }
                    // Content under a capsule id never changes underneath us, and writes go
                    // through this same mount: keep the kernel's page cache across opens.
                    reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
                }
                Some(_) if writing => reply.error(Errno::EROFS),
                Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
                None => reply.error(Errno::ENOENT),
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyData) {
        let ino = u64::from(ino);
        match ino {
            STATS | METADATA => {
                let known = self.snapshots.lock().unwrap_or_else(|p| p.into_inner()).get(&fh.0).cloned();
                // A handle opened before this daemon took the mount over: its snapshot went
                // with the old daemon, so it gets a fresh one, as an open would.
                let bytes = match known {
                    Some(bytes) => bytes,
                    None => match self.snapshot_bytes(ino) {
                        Ok(bytes) => {
                            self.snapshots.lock().unwrap_or_else(|p| p.into_inner()).insert(fh.0, bytes.clone());
                            bytes
                        }
                        Err(e) => return reply.error(errno(&e)),
                    },
                };
                return reply.data(slice_from(&bytes, offset, size));
            }
            INFO => return reply.data(slice_from(&self.info_bytes(), offset, size)),
            _ => {}
        }
        let Some(node) = self.node(ino) else { return reply.error(Errno::ENOENT) };
        match &node.content {
            Content::Bytes(b) => reply.data(slice_from(b, offset, size)),
            Content::Image { .. } => {
                self.stats.reads_in_flight.fetch_add(1, Ordering::Relaxed);
                READ_BUFFER.with(|buf| {
                    let mut out = buf.borrow_mut();
                    out.clear();
                    let result = self.read_image((ino - FIRST_FILE) as u32, node, offset, size, &mut out);
                    self.stats.reads_in_flight.fetch_sub(1, Ordering::Relaxed);
                    match result {
                        Ok(()) => reply.data(&out),
                        Err(e) => {
                            self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                            error!("read of {} at offset {offset} ({size} bytes) failed: {}", node.name, e.report());
                            reply.error(errno(&e));
                        }
                    }
                    // A read is at most max_read (1 MiB); never keep more than a few.
                    if out.capacity() > 4 << 20 {
                        *out = Vec::new();
                    }
                });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(node) = self.node(u64::from(ino)) else { return reply.error(Errno::EROFS) };
        match self.write_image(node, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => {
                error!("write of {} at offset {offset} ({} bytes) failed: {}", node.name, data.len(), e.report());
                reply.error(errno(&e));
            }
        }
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.node(u64::from(ino)).map(|n| &n.content) {
            Some(Content::Image { overlay: Some(o), .. }) => match o.sync() {
                Ok(()) => reply.ok(),
                Err(e) => {
                    error!("fsync of overlay failed: {e}");
                    reply.error(Errno::from(e));
                }
            },
            _ => reply.ok(),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    #[allow(clippy::too_many_arguments)]
    fn release(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, _lock: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        if matches!(u64::from(ino), STATS | METADATA) {
            self.snapshots.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        }
        reply.ok();
    }

    fn fallocate(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        let Some(node) = self.node(u64::from(ino)) else { return reply.error(Errno::ENOENT) };
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let result = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 && mode & !punch == 0 || mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            self.zero_range(node, offset, length)
        } else if mode == 0 || mode == libc::FALLOC_FL_KEEP_SIZE {
            // Space for a fixed-size image is always "allocated".
            Ok(())
        } else {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => {
                warn!("fallocate of {} failed: {}", node.name, e.report());
                reply.error(errno(&e));
            }
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries: Vec<(u64, FileType, String)> = match u64::from(ino) {
            ROOT => {
                let mut v =
                    vec![(ROOT, FileType::Directory, ".".into()), (ROOT, FileType::Directory, "..".into()), (META_DIR, FileType::Directory, ".capsule".into())];
                v.extend(self.nodes.iter().enumerate().map(|(i, n)| (FIRST_FILE + i as u64, FileType::RegularFile, n.name.clone())));
                v
            }
            META_DIR => vec![
                (META_DIR, FileType::Directory, ".".into()),
                (ROOT, FileType::Directory, "..".into()),
                (STATS, FileType::RegularFile, "stats.json".into()),
                (INFO, FileType::RegularFile, "info.json".into()),
                (METADATA, FileType::RegularFile, "metadata".into()),
            ],
            _ => return reply.error(Errno::ENOTDIR),
        };
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let total: u64 = self
            .nodes
            .iter()
            .map(|n| match &n.content {
                Content::Image { image, .. } => image.size,
                Content::Bytes(b) => b.len() as u64,
            })
            .sum();
        let blocks = total.div_ceil(4096);
        reply.statfs(blocks, if self.read_only { 0 } else { blocks }, if self.read_only { 0 } else { blocks }, self.nodes.len() as u64 + 4, 0, 4096, 255, 4096);
    }
}

/// Seconds since the epoch, for logs.
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
