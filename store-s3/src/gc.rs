//! `capsule gc --backend s3://...`: removes blocks and objects no ref reaches, while pushes
//! through any number of servers go on. S3 has no conditional DELETE (a DELETE of a block a
//! push just wrote again removes the new copy), so the rule is a published intent plus a
//! fence at every ref update:
//!
//! 1. gc lists `blocks/` and `objects/`, then reads the refs and walks them: the candidates
//!    are what no ref (nor a live capsule's profile) reaches and was last written more than
//!    `grace` before the gc started (a push in progress writes blocks before its ref).
//! 2. gc publishes them in a marker `gc/<start>-<nonce>.pending`, waits `settle`, reads the
//!    refs again, and removes only the candidates no ref reaches now.
//! 3. gc writes `gc/<start>-<nonce>.done`, then removes its pending marker.
//!
//! A server moving a ref (and setting a profile) lists `gc/` before it checks that the
//! capsule is whole, and again right before it writes the commit ([`Fence`]): if a marker
//! appeared in between it starts over; if a pending marker names any block or object the
//! capsule needs, the update is refused (push again once the gc ended); and the commit must
//! be written within [`FENCE_WINDOW`] of that second listing. Either the second listing
//! came after gc published its marker, so the overlap is caught, or the commit was written
//! before gc's second read of the refs (`settle` > [`FENCE_WINDOW`] plus one write), which
//! then keeps what the commit reaches. A server forgets the blocks it remembered as present
//! and the objects it cached whenever it sees a new marker, so nothing a gc removed is
//! taken as present later. Markers of a gc that died stop counting after [`MARKER_TTL`]
//! (a gc stops deleting before that).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsule_images::store::GcStats;
use capsule_images::Hash;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};
use tracing::{info, warn};

use crate::error::{Error, ErrorKind, Result};
use crate::{S3Backend, BLOCK, OBJECT};

/// The longest a ref commit may be written after the fence's listing of gc markers.
pub const FENCE_WINDOW: Duration = Duration::from_secs(4);
/// A gc's markers count this long (a gc that died leaves them behind).
pub const MARKER_TTL: Duration = Duration::from_secs(3600);
/// Default age below which an unreachable block or object stays.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// Default wait between publishing the candidates and reading the refs again.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(60);
/// How stale a server's view of running gcs may be when it answers "present" from memory.
const GC_VIEW_REFRESH: Duration = Duration::from_secs(10);
const MARKER_MAGIC: &[u8] = b"capsule-gc 1\n";
/// One candidate in a marker: kind tag and hash.
const ENTRY: usize = 33;
/// Largest marker read or written (about two million candidates; the rest wait for the next gc).
const MAX_MARKER: usize = 64 << 20;
const PARALLEL_DELETES: usize = 32;

/// How a bucket gc runs.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Unreachable blocks and objects younger than this stay.
    pub grace: Duration,
    /// Wait between publishing the candidates and reading the refs again; more than
    /// [`FENCE_WINDOW`] plus the longest write to the store.
    pub settle: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self { grace: DEFAULT_GRACE, settle: DEFAULT_SETTLE }
    }
}

/// A gc marker in the bucket.
#[derive(Debug, Clone)]
pub(crate) struct Marker {
    path: Path,
    name: String,
    pending: bool,
    age: Duration,
}

/// What the refs reach: (kind tag, hash) of every live object and block.
type Live = HashSet<(u8, Hash)>;

impl S3Backend {
    pub(crate) fn dir(&self, dir: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(dir)
        } else {
            Path::from(format!("{}/{dir}", self.prefix))
        }
    }

    /// Every gc marker in the bucket.
    pub(crate) async fn gc_markers(&self) -> Result<Vec<Marker>> {
        let listed: Vec<ObjectMeta> = self.os.list(Some(&self.dir("gc"))).try_collect().await.map_err(|e| Error::store("listing gc markers", e))?;
        let now = unix_ms();
        Ok(listed
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.to_string();
                let pending = name.ends_with(".pending");
                if !pending && !name.ends_with(".done") {
                    return None;
                }
                let written = u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(0);
                Some(Marker { path: m.location, name, pending, age: Duration::from_millis(now.saturating_sub(written)) })
            })
            .collect())
    }

    /// Forgets remembered blocks and cached objects if a gc started or ended since the last look.
    pub(crate) fn forget_if_gc_moved(&self, markers: &[Marker]) {
        let mut seen = self.gc_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut moved = false;
        for m in markers {
            moved |= seen.insert(m.name.clone());
        }
        if moved {
            self.forget_all();
        }
    }

    /// Looks at the gc markers at most every [`GC_VIEW_REFRESH`], so a push's "which blocks
    /// do you lack" is not answered from memory a gc made stale.
    pub(crate) fn refresh_gc_view(&self) {
        {
            let mut last = self.gc_checked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < GC_VIEW_REFRESH) {
                return;
            }
            *last = Some(Instant::now());
        }
        match self.run(self.gc_markers()) {
            Ok(markers) => self.forget_if_gc_moved(&markers),
            Err(e) => warn!("listing gc markers: {e}"),
        }
    }

    /// Forgets which blocks the bucket holds and the cached objects (a gc removes some).
    pub(crate) fn forget_all(&self) {
        self.present.clear();
        self.cache.clear();
        self.pages.clear();
    }

    /// The candidates a pending marker names.
    async fn marker_entries(&self, m: &Marker) -> Result<HashSet<(u8, Hash)>> {
        let got = match self.os.get(&m.path).await {
            Ok(got) => got,
            // Finished meanwhile: its done marker is a new name, which restarts the update.
            Err(object_store::Error::NotFound { .. }) => return Ok(HashSet::new()),
            Err(e) => return Err(Error::store(format!("reading gc marker {}", m.name), e)),
        };
        if got.meta.size > MAX_MARKER as u64 {
            return Err(Error::new(ErrorKind::Corrupt, format!("gc marker {}: {} bytes, more than a gc writes", m.name, got.meta.size)));
        }
        let bytes = got.bytes().await.map_err(|e| Error::store(format!("reading gc marker {}", m.name), e))?;
        parse_marker(&bytes).ok_or_else(|| Error::new(ErrorKind::Corrupt, format!("gc marker {} ({}) is damaged", m.name, m.path)))
    }

    async fn list_hashed(&self, dir: &str) -> Result<Vec<(Hash, ObjectMeta)>> {
        let listed: Vec<ObjectMeta> = self.os.list(Some(&self.dir(dir))).try_collect().await.map_err(|e| Error::store(format!("listing {dir}"), e))?;
        Ok(listed.into_iter().filter_map(|m| Some((m.location.filename()?.parse::<Hash>().ok()?, m))).collect())
    }

    /// What the refs reach now, and the profile pointers of capsules they do not reach.
    fn live(&self) -> Result<(Live, Vec<ObjectMeta>)> {
        let live = std::cell::RefCell::new(Live::new());
        for (name, id) in self.run(self.refs.list(self.os.as_ref()))? {
            capsule_images::store::walk_capsule(
                self,
                &id,
                &mut |h| {
                    live.borrow_mut().insert((OBJECT, *h));
                    Ok(())
                },
                &mut |_, _, h| {
                    live.borrow_mut().insert((BLOCK, *h));
                    Ok(())
                },
            )
            .map_err(|e| Error::images(e).context(format!("gc: ref {name} is damaged; nothing was removed")))?;
        }
        let pointers: Vec<ObjectMeta> = self.run(self.os.list(Some(&self.dir("profiles"))).try_collect()).map_err(|e| Error::store("listing profiles", e))?;
        let (mut live, mut dead) = (live.into_inner(), Vec::new());
        for meta in pointers {
            let capsule = meta.location.as_ref().rsplit('/').nth(1).and_then(|c| c.parse::<Hash>().ok());
            match capsule {
                Some(c) if live.contains(&(OBJECT, c)) => {
                    let bytes = self.run(self.get(&meta.location, &format!("profile pointer {}", meta.location)))?;
                    // A damaged pointer keeps nothing alive; reading its profile fails anyway.
                    if let Some(pid) = std::str::from_utf8(&bytes).ok().and_then(|t| t.trim_end().parse::<Hash>().ok()) {
                        live.insert((OBJECT, pid));
                    }
                }
                _ => dead.push(meta),
            }
        }
        Ok((live, dead))
    }

    /// Removes what no ref reaches, by the rule in this module's documentation. A `settle`
    /// not longer than [`FENCE_WINDOW`] is only safe when nothing else writes the bucket.
    pub fn gc(&self, options: &GcOptions) -> Result<GcStats> {
        let started = Instant::now();
        let start_ms = unix_ms();
        let cutoff = start_ms.saturating_sub(u64::try_from(options.grace.as_millis()).unwrap_or(u64::MAX));
        let blocks = self.run(self.list_hashed("blocks"))?;
        let objects = self.run(self.list_hashed("objects"))?;
        let (live, _) = self.live()?;
        // At least `grace` old, to the millisecond: with a zero grace, what was written in the
        // gc's own first millisecond goes too.
        let old = |m: &ObjectMeta| u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(u64::MAX) <= cutoff;
        let mut doomed: HashMap<(u8, Hash), ObjectMeta> = HashMap::new();
        for (tag, listed) in [(BLOCK, &blocks), (OBJECT, &objects)] {
            for (h, meta) in listed.iter() {
                if !live.contains(&(tag, *h)) && old(meta) && doomed.len() < MAX_MARKER / ENTRY {
                    doomed.insert((tag, *h), meta.clone());
                }
            }
        }
        let mut stats = GcStats { blocks_kept: blocks.len() as u64, ..GcStats::default() };
        if doomed.is_empty() {
            self.prune_markers(None);
            return Ok(stats);
        }
        let name = format!("{start_ms:020}-{}", crate::refs::nonce()?);
        let pending = self.dir("gc").join(format!("{name}.pending"));
        let mut body = MARKER_MAGIC.to_vec();
        for (tag, h) in doomed.keys() {
            body.push(*tag);
            body.extend_from_slice(&h.0);
        }
        self.run(self.os.put(&pending, PutPayload::from(body))).map_err(|e| Error::store("publishing the gc candidates", e))?;
        info!(candidates = doomed.len(), "gc: published candidates; settling for {:?}", options.settle);
        std::thread::sleep(options.settle);

        let removed = self.sweep(&mut doomed, (started, cutoff), &mut stats);
        // Whatever happened, a done marker (a new name) tells servers to forget what they knew.
        let done = self.dir("gc").join(format!("{name}.done"));
        let ended = self.run(self.os.put(&done, PutPayload::from_static(b"done\n"))).map_err(|e| Error::store("writing the gc's done marker", e));
        if ended.is_ok() {
            self.prune_markers(Some(&pending));
        }
        removed?;
        ended?;
        Ok(stats)
    }

    /// Step 2 after the settle: reads the refs again and removes the candidates still unreachable.
    fn sweep(&self, doomed: &mut HashMap<(u8, Hash), ObjectMeta>, (started, cutoff): (Instant, u64), stats: &mut GcStats) -> Result<()> {
        let (live, dead_profiles) = self.live()?;
        doomed.retain(|k, _| !live.contains(k));
        // Stop well before the marker expires for servers with a clock up to 50 s apart.
        let deadline = MARKER_TTL.saturating_sub(Duration::from_secs(120));
        let entries: Vec<((u8, Hash), ObjectMeta)> = doomed.drain().collect();
        let results: Vec<Result<((u8, Hash), u64)>> = self.run(
            futures_util::stream::iter(entries.into_iter().map(|(key, meta)| async move {
                if started.elapsed() > deadline {
                    return Err(Error::new(ErrorKind::Unavailable, "gc: ran out of time before its marker expires; run it again"));
                }
                match self.os.delete(&meta.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok((key, meta.size)),
                    Err(e) => Err(Error::store(format!("removing {}", meta.location), e)),
                }
            }))
            .buffer_unordered(PARALLEL_DELETES)
            .collect(),
        );
        let mut first_error = None;
        for r in results {
            match r {
                Ok(((tag, h), size)) => {
                    self.cache.remove(&(tag, h));
                    if tag == BLOCK {
                        self.present.remove(&h);
                        stats.blocks_removed += 1;
                        stats.blocks_kept = stats.blocks_kept.saturating_sub(1);
                    } else {
                        stats.objects_removed += 1;
                    }
                    stats.bytes_freed += size;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        // Profile pointers of capsules no ref reaches (the objects they name went above).
        for meta in dead_profiles.iter().filter(|m| u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(u64::MAX) <= cutoff) {
            if let Err(e) = self.run(self.os.delete(&meta.location)) {
                warn!("gc: removing {}: {e}", meta.location);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Removes this gc's pending marker and markers older than [`MARKER_TTL`]. Best effort.
    fn prune_markers(&self, own_pending: Option<&Path>) {
        if let Some(p) = own_pending {
            if let Err(e) = self.run(self.os.delete(p)) {
                warn!("gc: removing its marker {p}: {e}");
            }
        }
        if let Ok(markers) = self.run(self.gc_markers()) {
            for m in markers.iter().filter(|m| m.age > MARKER_TTL + Duration::from_secs(3600)) {
                let _ = self.run(self.os.delete(&m.path));
            }
        }
    }
}

/// Checked by a ref update right before its commit: see the module documentation.
pub(crate) struct Fence<'a> {
    backend: &'a S3Backend,
    known: BTreeSet<String>,
    needed: &'a HashSet<(u8, Hash)>,
    what: String,
    changed: AtomicBool,
}

impl<'a> Fence<'a> {
    /// A fence for an update whose completeness check followed the listing `known`.
    pub(crate) fn new(backend: &'a S3Backend, known: &[Marker], needed: &'a HashSet<(u8, Hash)>, what: String) -> Self {
        Self { backend, known: known.iter().map(|m| m.name.clone()).collect(), needed, what, changed: AtomicBool::new(false) }
    }

    /// Whether the update failed because a gc started or ended meanwhile (start it over).
    pub(crate) fn changed(&self) -> bool {
        self.changed.load(Ordering::Relaxed)
    }

    pub(crate) async fn check_now(&self) -> Result<()> {
        let listed_at = Instant::now();
        let markers = self.backend.gc_markers().await?;
        if markers.iter().any(|m| !self.known.contains(&m.name)) {
            self.changed.store(true, Ordering::Relaxed);
            return Err(Error::new(ErrorKind::Conflict, format!("{}: a gc of the bucket started or ended meanwhile", self.what)));
        }
        for m in markers.iter().filter(|m| m.pending && m.age < MARKER_TTL) {
            let doomed = self.backend.marker_entries(m).await?;
            if let Some((tag, h)) = self.needed.iter().find(|k| doomed.contains(k)) {
                // The push that retries must send what goes, not take it for present.
                self.backend.forget_all();
                let kind = if *tag == BLOCK { "block" } else { "object" };
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "{} needs {kind} {h}, which a gc of the bucket ({}) is removing; push again once it ends",
                        self.what,
                        m.name.trim_end_matches(".pending")
                    ),
                ));
            }
        }
        if listed_at.elapsed() > FENCE_WINDOW {
            self.changed.store(true, Ordering::Relaxed);
            return Err(Error::new(ErrorKind::Unavailable, format!("{}: the object store took over {FENCE_WINDOW:?} to list the gc markers", self.what)));
        }
        Ok(())
    }
}

impl crate::refs::CommitFence for Fence<'_> {
    fn check(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.check_now())
    }
}

fn parse_marker(bytes: &[u8]) -> Option<HashSet<(u8, Hash)>> {
    let body = bytes.strip_prefix(MARKER_MAGIC)?;
    if body.len() % ENTRY != 0 {
        return None;
    }
    body.chunks_exact(ENTRY)
        .map(|e| {
            let tag = e[0];
            let h: [u8; 32] = e[1..].try_into().ok()?;
            (tag == BLOCK || tag == OBJECT).then_some((tag, Hash(h)))
        })
        .collect()
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
