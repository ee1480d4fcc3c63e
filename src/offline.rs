//! `capsule prefetch [--offline]`, `warm --all`, `unpin` and `status`: the cache made
//! ready ahead of need, for a slow link or none at all.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use capsule_fs::cache::BlockCache;
use capsule_fs::pins;
use capsule_images::{Hash, Progress};

use crate::args::ConnArgs;
use crate::mount::{default_cache_dir, remembered_ref};
use crate::report::human;

/// Which capsule, in which cache.
#[derive(clap::Args, Debug, Clone)]
pub struct CacheTarget {
    /// capsule://HOST:PORT/NAME
    pub source: String,
    /// Block cache [default: $CAPSULE_CACHE, else ~/.cache/capsule]
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Bound of the block cache for unpinned blocks
    #[arg(long, value_name = "SIZE", value_parser = crate::args::parse_size, default_value = "10G")]
    pub cache_size: u64,
    /// Give up when nothing arrives from the server for this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub stall_timeout: u64,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// What `prefetch`, `warm` and `unpin` report with `--json`.
#[derive(Debug, serde::Serialize)]
struct CacheReport<'a> {
    capsule: &'a str,
    id: String,
    cache: &'a std::path::Path,
    /// Blocks listed (and now in the cache), and their bytes.
    blocks: usize,
    bytes: u64,
    /// Block bytes that came over the link now (the rest was already cached).
    fetched_bytes: u64,
    pinned: bool,
}

fn remote(source: &str) -> Result<(capsule_net::RemoteUrl, String)> {
    let url = capsule_net::RemoteUrl::parse(source)?;
    let name = url.name.clone().with_context(|| format!("{source}: name the capsule: capsule://HOST:PORT/NAME"))?;
    Ok((url, name))
}

/// Fetches the capsule's blocks into the cache: the profile's first (in first-touch
/// order), then, with `all`, every other block (pinning them all first if `pin`); then
/// checks that each one is there (read back and hashed unless the engine just did).
/// Resumable: only blocks the cache lacks travel.
pub fn prefetch(t: &CacheTarget, pin: bool, profile: Option<&str>, all: bool) -> Result<()> {
    let (url, name) = remote(&t.source)?;
    let dir = t.cache.clone().unwrap_or_else(default_cache_dir);
    let progress = crate::progress::Bar::new();
    let source = capsule_net::RemoteSource::new(url.clone(), t.conn.options(), std::time::Duration::from_secs(t.stall_timeout))?;
    let metadata_runtime = crate::remote::runtime()?;
    let (client, cache, id, blocks, missing) = metadata_runtime.block_on(async {
        let client = crate::remote::connect(&url, &t.conn).await?;
        // The blocks' connection shakes hands while the metadata travels (after this
        // one, which records a new server's certificate first).
        source.connect_ahead();
        let id = client.get_ref(&name).await?.with_context(|| format!("the server has no capsule named {name:?}"))?;
        // Only now, with something to put in it: a server that never answers, or a name it
        // lacks, leaves no empty cache behind.
        let cache = Arc::new(BlockCache::open(&dir, t.cache_size).with_context(|| format!("opening cache {}", dir.display()))?);
        capsule_net::pull_metadata(&client, &id, cache.store()).await.context("fetching the capsule's metadata")?;
        cache.store().set_ref(&remembered_ref(&url, &name), &id)?;
        capsule_net::pull_profiles(&client, &id, cache.store()).await.context("fetching profiles")?;
        // What the capsule's files read, not the blocks its ancestors' layers shadow.
        let everything = capsule_images::image::live_blocks(cache.store(), &id)?;
        let mut blocks = Vec::new();
        if let Some(name) = profile {
            let (_, pid) =
                cache.store().list_profiles(&id)?.into_iter().find(|(n, _)| n == name).with_context(|| format!("{name:?} is not a profile of {}", t.source))?;
            blocks = cache.store().profile(&pid)?.blocks;
        }
        if all {
            let listed: std::collections::HashSet<Hash> = blocks.iter().copied().collect();
            blocks.extend(everything.iter().filter(|h| !listed.contains(h)));
        }
        if pin {
            // Before fetching, so nothing fetched here can be evicted on the way.
            pins::pin(&dir, &id, &blocks).context("writing the pin")?;
        }
        let missing: Vec<Hash> = blocks.iter().filter(|h| !cache.contains(h)).copied().collect();
        anyhow::Ok((client, cache, id, blocks, missing))
    })?;
    crate::remote::close_in_background(metadata_runtime, client);
    // The blocks through the fetch engine, the same path a mount's reads take: batches
    // pipelined to the measured bandwidth-delay product, each block verified once.
    let block_size = cache.store().manifest(&id)?.disks.first().map_or(65536, |d| d.image.block_size());
    progress.begin(if pin { "prefetch" } else { "warm" }, missing.len() as u64 * block_size);
    let config = capsule_fetch::EngineConfig {
        stall_timeout: std::time::Duration::from_secs(t.stall_timeout),
        source_label: source.label(),
        sched: capsule_fetch::sched::SchedConfig { block_bytes_guess: block_size, ..Default::default() },
        verify_threads: capsule_fetch::EngineConfig::verify_threads_for_machine(),
        ..Default::default()
    };
    let local = Arc::new(capsule_fs::blocks::CacheBlocks::new(cache.clone(), capsule_fs::seed::Seeds::default()));
    let engine = capsule_fetch::Engine::new(local, Some(Arc::new(source)), config);
    let (fetched_raw, reported) = (AtomicU64::new(0), AtomicU64::new(0));
    let fetched = engine.fetch_all(&missing, capsule_fetch::Urgency::Background, &|raw| {
        fetched_raw.fetch_add(raw, Ordering::Relaxed);
        reported.fetch_add(1, Ordering::Relaxed);
        progress.advance(raw)
    });
    progress.end();
    let fetched_bytes = fetched.with_context(|| format!("fetching from {}", t.source))?;
    // Offline must survive a power cut: the cache skips per-block fsyncs, so flush once.
    cache.store().sync_filesystem().context("flushing the cache to disk")?;
    // Every block still in a pack file that exists (a mount may have evicted one of ours
    // meanwhile; its pinned blocks then live in the mount's). The engine decoded and hashed
    // each block it fetched just now, so for `warm` those are only looked up: reading them
    // back decoded them a second time (a warm of the Debian capsule on loopback took
    // 1.41-1.49 s with it, 0.98-1.00 s without). Blocks that were here before are read back
    // and hashed, and so is everything for `prefetch --offline` (its "ready offline" is a
    // promise) or when a block arrived by another way (a mount sharing the cache) and its
    // size was not counted.
    cache.rescan();
    let counted = !pin && reported.into_inner() == missing.len() as u64;
    let fetched_now: std::collections::HashSet<&Hash> = if counted { missing.iter().collect() } else { Default::default() };
    let mut total = if counted { fetched_raw.into_inner() } else { 0 };
    for h in &blocks {
        let here = if fetched_now.contains(h) { cache.contains(h) } else { cache.get(h).map(|data| total += data.len() as u64).is_some() };
        if !here {
            bail!("block {h} is not in the cache after the fetch (evicted? raise --cache-size or use --offline)");
        }
    }
    if t.json {
        let r = CacheReport { capsule: &name, id: id.to_hex(), cache: &dir, blocks: blocks.len(), bytes: total, fetched_bytes, pinned: pin };
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    if pin {
        println!("ready offline: 100% ({} blocks, {}); fetched {} now", blocks.len(), human(total), human(fetched_bytes));
    } else {
        let what = match (profile, all) {
            (Some(p), true) => format!("profile {p} and every other block"),
            (Some(p), false) => format!("profile {p}"),
            _ => "every block".to_string(),
        };
        println!("warm: {what}: {} blocks ({}) cached; fetched {} now", blocks.len(), human(total), human(fetched_bytes));
    }
    println!("capsule {name} ({id}) in cache {}", dir.display());
    Ok(())
}

fn resolve_in_cache(source: &str, dir: &std::path::Path) -> Result<(capsule_images::Store, Hash)> {
    // Reading a cache must not make one where a typo points.
    if !dir.join("format").is_file() {
        bail!("no block cache at {} (nothing was fetched there; check --cache or CAPSULE_CACHE)", dir.display());
    }
    let store = capsule_images::Store::open(dir).with_context(|| format!("opening cache {}", dir.display()))?;
    let id = if source.starts_with("capsule://") {
        let (url, name) = remote(source)?;
        store.read_ref(&remembered_ref(&url, &name))?.with_context(|| format!("{source} was never fetched into cache {}", dir.display()))?
    } else {
        source.parse::<Hash>().with_context(|| format!("{source}: expected capsule://HOST:PORT/NAME or a capsule id"))?
    };
    Ok((store, id))
}

/// What `unpin --json` prints.
#[derive(Debug, serde::Serialize)]
struct Unpinned<'a> {
    unpinned: &'a str,
    id: String,
    cache: &'a std::path::Path,
}

pub fn unpin(t: &CacheTarget) -> Result<()> {
    let dir = t.cache.clone().unwrap_or_else(default_cache_dir);
    let (_, id) = resolve_in_cache(&t.source, &dir)?;
    if !pins::unpin(&dir, &id)? {
        bail!("{} ({id}) was not pinned in {}", t.source, dir.display());
    }
    if t.json {
        println!("{}", serde_json::to_string_pretty(&Unpinned { unpinned: &t.source, id: id.to_hex(), cache: &dir })?);
    } else {
        println!("unpinned {} ({id}); its blocks may now be evicted", t.source);
    }
    Ok(())
}

/// `status` of a capsule: of a mount, its `stats.json` (printed whole with `--json`); of a
/// capsule in a cache, this, under the same names for what both have (files by name,
/// `blocks`, `resident_pct`).
#[derive(Debug, serde::Serialize)]
struct StatusView {
    capsule: String,
    id: String,
    /// `cache`, or for a mount where its blocks come from.
    source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pinned: Option<bool>,
    files: std::collections::BTreeMap<String, FileStatus>,
}

#[derive(Debug, serde::Serialize)]
struct FileStatus {
    blocks: u64,
    resident_pct: f64,
    /// Of a cache only (a mount's pins are the cache's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pinned_pct: Option<f64>,
}

pub fn status(source: &str, cache: Option<PathBuf>, as_json: bool) -> Result<()> {
    let stats_path = std::path::Path::new(source).join(".capsule/stats.json");
    let view: StatusView = if stats_path.exists() {
        let bytes = std::fs::read(&stats_path).with_context(|| stats_path.display().to_string())?;
        if as_json {
            // The mount's counters whole (`capsule status --watch` samples the same file).
            std::io::Write::write_all(&mut std::io::stdout(), &bytes)?;
            println!();
            return Ok(());
        }
        let m: capsule_fs::mount::MountStats = serde_json::from_slice(&bytes).with_context(|| stats_path.display().to_string())?;
        StatusView {
            capsule: m.capsule,
            id: m.id,
            source: m.source,
            cache: None,
            pinned: None,
            files: m.files.into_iter().map(|(name, f)| (name, FileStatus { blocks: f.blocks, resident_pct: f.resident_pct, pinned_pct: None })).collect(),
        }
    } else {
        let dir = cache.unwrap_or_else(default_cache_dir);
        let (store, id) = resolve_in_cache(source, &dir)?;
        // The blocks are in its packs; no bound: looking must not evict.
        let cache = BlockCache::open(&dir, u64::MAX).with_context(|| format!("opening cache {}", dir.display()))?;
        let mut pinset = pins::PinSet::new(&dir);
        pinset.refresh();
        let m = store.manifest(&id)?;
        let mut files = std::collections::BTreeMap::new();
        // Keyed by file name, as a mount's stats.json is: one schema for both.
        for (what, _, image) in capsule_fs::layout::image_files(&m, false, &capsule_vmm_glue::mount_layout(&m, std::path::Path::new("/"))) {
            let reader = capsule_images::ImageReader::open(&store, image)?;
            let (mut resident, mut pinned) = (0u64, 0u64);
            for i in 0..image.block_count() {
                // Zero blocks need nothing: they count as resident and pinned.
                let (r, p) = match reader.resolve(i)? {
                    None => (true, true),
                    Some(h) => {
                        let here = cache.contains(&h);
                        (here, here && pinset.contains(&h))
                    }
                };
                resident += u64::from(r);
                pinned += u64::from(p);
            }
            let n = image.block_count().max(1) as f64;
            files.insert(
                what,
                FileStatus { blocks: image.block_count(), resident_pct: resident as f64 * 100.0 / n, pinned_pct: Some(pinned as f64 * 100.0 / n) },
            );
        }
        StatusView { capsule: m.name, id: id.to_hex(), source: "cache".into(), pinned: Some(pins::is_pinned(&dir, &id)), cache: Some(dir), files }
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    println!("capsule {} ({})", view.capsule, view.id);
    for (file, v) in &view.files {
        let pinned = v.pinned_pct.map(|p| format!(", {p:.1}% pinned")).unwrap_or_default();
        println!("  {file:<16} {:>6.1}% resident{pinned}", v.resident_pct);
    }
    Ok(())
}
