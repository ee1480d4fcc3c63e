//! `capsule mount`, `umount` and `commit`: process plumbing around `capsule-fs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsule_fetch::BlockSource;
use capsule_fs::cache::BlockCache;
use capsule_fs::mount::{CapsuleFs, MountConfig, MountInfo};
use capsule_images::{Hash, Store};

use crate::args::{MountArgs, PrefetchMode};

/// The cache's ref remembering which capsule a remote name pointed at last.
pub fn remembered_ref(url: &capsule_net::RemoteUrl, name: &str) -> String {
    format!("remote/{}_{}/{name}", url.host.replace(':', "_"), url.port)
}

/// `$CAPSULE_CACHE`, else `$XDG_CACHE_HOME/capsule`, else `~/.cache/capsule`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CAPSULE_CACHE") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Path::new(&d).join("capsule");
    }
    Path::new(&std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(".cache/capsule")
}

fn info_path(mountpoint: &Path) -> PathBuf {
    mountpoint.join(".capsule/info.json")
}

/// A FUSE mount whose daemon died answers ENOTCONN: detach it so the path is usable again.
fn clean_stale(mountpoint: &Path) {
    // A stat can be answered from cached attributes (default_permissions keeps them): an
    // opendir always asks the daemon.
    if let Err(e) = std::fs::metadata(mountpoint).and_then(|_| std::fs::read_dir(mountpoint).map(drop)) {
        if e.raw_os_error() == Some(ENOTCONN) {
            note!("capsule: cleaning up a stale mount at {}", mountpoint.display());
            let _ = std::process::Command::new("fusermount3").arg("-uz").arg(mountpoint).status();
            let _ = std::process::Command::new("umount").arg("-l").arg(mountpoint).status();
        }
    }
}

/// "Transport endpoint is not connected" on Linux.
const ENOTCONN: i32 = 107;

pub fn mount(store_dir: Option<PathBuf>, args: MountArgs) -> Result<()> {
    let role = if args.foreground { crate::supervise::role() } else { crate::supervise::Role::Supervisor };
    // A successor serves a live mount whose daemon died: anything that touches the mount
    // before it serves would wait for it.
    let handoff = if role == crate::supervise::Role::Successor { Some(crate::supervise::receive_handoff()?) } else { None };
    if handoff.is_none() {
        clean_stale(&args.mountpoint);
    }
    let cache_dir = args.cache.clone().unwrap_or_else(default_cache_dir);
    std::fs::create_dir_all(&cache_dir).with_context(|| format!("creating cache {}", cache_dir.display()))?;
    if !args.foreground {
        return spawn_daemon(&cache_dir, &args);
    }
    if role == crate::supervise::Role::Supervisor {
        return crate::supervise::supervise(&args.mountpoint);
    }
    let pinned = handoff.as_ref().map(|h| h.id);
    let mountpoint = match &handoff {
        Some(h) => h.mountpoint.clone(),
        None => args.mountpoint.canonicalize().with_context(|| format!("mount point {}", args.mountpoint.display()))?,
    };

    let (cache, source, id, label): (Arc<BlockCache>, Option<Arc<dyn BlockSource>>, Hash, String) = if args.source.starts_with("capsule://") {
        let url = capsule_net::RemoteUrl::parse(&args.source)?;
        let name = url.name.clone().with_context(|| format!("{}: name the capsule: capsule://HOST:PORT/NAME", args.source))?;
        let cache = Arc::new(BlockCache::open(&cache_dir, args.cache_size).with_context(|| format!("opening cache {}", cache_dir.display()))?);
        let remembered = remembered_ref(&url, &name);
        if args.offline {
            let id = match pinned {
                Some(id) => id,
                None => cache
                    .store()
                    .read_ref(&remembered)?
                    .with_context(|| format!("{}: never fetched into cache {}; nothing to mount offline", args.source, cache_dir.display()))?,
            };
            let config = mount_config(&args, &cache_dir, &mountpoint, id, format!("{} (offline)", args.source));
            return serve_mount(cache, None, id, config, &args, &mountpoint, handoff);
        }
        let source = capsule_net::RemoteSource::new(url.clone(), args.conn.options(), Duration::from_secs(args.stall_timeout))?;
        // A successor serves the capsule its mount shows, from what the cache holds.
        let id = if let Some(id) = pinned {
            id
        } else {
            let metadata_runtime = crate::remote::runtime()?;
            let (id, client) = metadata_runtime.block_on(async {
                match crate::remote::connect(&url, &args.conn).await {
                    Ok(client) => {
                        // The blocks' connection shakes hands while the metadata travels
                        // (after this one, which records a new server's certificate).
                        source.connect_ahead();
                        let id = client.get_ref(&name).await?.with_context(|| format!("the server has no capsule named {name:?}"))?;
                        // Manifests and layers now; map pages when a read needs them, unless
                        // everything will be fetched anyway.
                        if args.prefetch == PrefetchMode::All {
                            capsule_net::pull_metadata(&client, &id, cache.store()).await.context("fetching the capsule's metadata")?;
                        } else {
                            capsule_net::pull_head(&client, &id, cache.store()).await.context("fetching the capsule's metadata")?;
                        }
                        capsule_net::pull_profiles(&client, &id, cache.store()).await.context("fetching the capsule's profiles")?;
                        cache.store().set_ref(&remembered, &id)?;
                        anyhow::Ok((id, Some(client)))
                    }
                    Err(e) if e.downcast_ref::<capsule_net::Error>().is_some_and(|n| n.kind() == capsule_net::ErrorKind::Unavailable) => {
                        match cache.store().read_ref(&remembered)? {
                            Some(id) => {
                                tracing::warn!("server unreachable ({e}); mounting the version of {name} last seen ({id})");
                                Ok((id, None))
                            }
                            None => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                }
            })?;
            if let Some(client) = client {
                crate::remote::close_in_background(metadata_runtime, client);
            }
            id
        };
        // Ready when the first read comes: the mount still has the FUSE session to set up.
        source.connect_ahead();
        (cache, Some(Arc::new(source)), id, args.source.clone())
    } else {
        let store = crate::remote::open_store(store_dir)?;
        let id = match pinned {
            Some(id) => id,
            None => store.resolve(&args.source)?,
        };
        let cache = Arc::new(BlockCache::over_store(store.root())?);
        (cache, None, id, format!("local store {}", store.root().display()))
    };

    let config = mount_config(&args, &cache_dir, &mountpoint, id, label);
    serve_mount(cache, source, id, config, &args, &mountpoint, handoff)
}

/// What `mount --json` prints once the mount is up.
#[derive(Debug, serde::Serialize)]
struct Mounted<'a> {
    mounted: &'a str,
    mountpoint: &'a Path,
    supervisor_pid: u32,
    /// The daemon's log.
    log: &'a Path,
}

/// What the mount of capsule `id` is told, from the command line.
fn mount_config(args: &MountArgs, cache_dir: &Path, mountpoint: &Path, id: Hash, source_label: String) -> MountConfig {
    MountConfig {
        read_only: args.read_only,
        overlay_dir: cache_dir.join("cow").join(id.to_hex()),
        source_label,
        seeds: args.seeds.clone(),
        recorder: None,
        kernel_readahead: args.kernel_readahead.unwrap_or(if args.record_profile.is_some() { 0 } else { capsule_fs::mount::DEFAULT_KERNEL_READAHEAD }),
        memory_cluster: args.memory_cluster,
        mountpoint: mountpoint.to_path_buf(),
        layout: capsule_vmm_glue::mount_layout,
        stall_timeout: Duration::from_secs(args.stall_timeout),
        key: None,
    }
}

fn serve_mount(
    cache: Arc<BlockCache>,
    source: Option<Arc<dyn BlockSource>>,
    id: Hash,
    mut config: MountConfig,
    args: &MountArgs,
    mountpoint: &Path,
    handoff: Option<crate::supervise::Handoff>,
) -> Result<()> {
    // One writer per overlay: a second writable mount of the same capsule would interleave.
    let _overlay_lock = if args.read_only { None } else { Some(lock_overlay(&config.overlay_dir)?) };
    // A successor's guest is running: its local state is what it runs on.
    if args.prepare_run && !args.read_only && handoff.is_none() {
        let suspended = cache.store().manifest(&id)?.devstate.is_some();
        let dropped = capsule_fs::overlay::prepare_for_run(&config.overlay_dir, suspended, args.discard_changes).map_err(anyhow::Error::msg)?;
        if !dropped.is_empty() {
            note!("capsule: dropped local state of an earlier run: {}", dropped.join(", "));
        }
    }
    let recorder = args.record_profile.as_ref().map(|_| Arc::new(capsule_fs::mount::Recorder::default()));
    config.recorder = recorder.clone();
    config.key = crate::keys::for_capsule(args.key.as_deref(), &cache.store().manifest(&id)?, &id)?;
    let store_cache = cache.clone();
    let online = source.is_some();
    let fs = CapsuleFs::new(cache, source, id, &config).with_context(|| format!("preparing capsule {id}"))?;
    if online {
        start_prefetch(&store_cache, &fs, &id, args)?;
    }
    let name = fs.info().name.clone();

    // The kernel checks each open against the files' modes: allow_other (below, for root)
    // must not open guest disks and RAM to every local user.
    let mut options =
        vec![fuser::MountOption::FSName(format!("capsule:{name}")), fuser::MountOption::Subtype("capsule".into()), fuser::MountOption::DefaultPermissions];
    if args.read_only {
        options.push(fuser::MountOption::RO);
    }
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = options;
    // Readers blocked on the link do not use a core; more of them keep more demand in flight.
    fuse_config.n_threads = Some(8);
    if is_root() {
        // Let a hypervisor running as another user open the files.
        fuse_config.acl = fuser::SessionACL::All;
    }
    let (session, took_over) = match &handoff {
        Some(h) => (crate::supervise::resume_session(fs, &h.fuse, &fuse_config)?, true),
        None => (fuser::Session::new(fs, mountpoint, &fuse_config).with_context(|| format!("mounting at {}", mountpoint.display()))?, false),
    };
    let mut session = session;
    if !took_over && config.kernel_readahead > capsule_fs::mount::DEFAULT_KERNEL_READAHEAD {
        // The kernel's device default covers what is less. Set before the session answers
        // the kernel's first request (see `set_kernel_readahead`).
        if let Err(e) = capsule_fs::mountinfo::set_kernel_readahead(mountpoint, config.kernel_readahead) {
            tracing::debug!("kernel readahead of {} left at the default: {e}", mountpoint.display());
        }
    }
    let mut unmounter = (!took_over).then(|| session.unmount_callable());
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    let at = mountpoint.to_path_buf();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            note!("capsule: unmounting");
            match unmounter.as_mut() {
                Some(u) => {
                    if let Err(e) = u.unmount() {
                        note!("capsule: unmount failed: {e}");
                    }
                }
                // A successor's session did not mount: unmount by path.
                None => crate::supervise::unmount_path(&at),
            }
        }
    });
    match (&handoff, crate::supervise::role()) {
        (Some(h), _) => {
            crate::supervise::resend_unanswered(&h.fuse)?;
            crate::supervise::report_serving()?;
            note!("capsule: took over {name} ({id}) at {} (pid {})", mountpoint.display(), std::process::id());
        }
        (None, crate::supervise::Role::First) => {
            crate::supervise::report_mounted(std::os::fd::AsFd::as_fd(&session), &id)?;
            note!("capsule: mounted {name} ({id}) at {}", mountpoint.display());
        }
        (None, _) => note!("capsule: mounted {name} ({id}) at {}", mountpoint.display()),
    }
    // In the foreground on a terminal: a live line of what arrives (once the mount answers).
    let stop_line = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let line = {
        let (dir, stop) = (mountpoint.to_path_buf(), stop_line.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            crate::status::live_line(dir, false, stop).map(|h| h.join())
        })
    };
    let served = session.run().context("serving the mount");
    stop_line.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = line.join();
    served?;
    note!("capsule: unmounted {}", mountpoint.display());
    if let (Some(name), Some(recorder)) = (&args.record_profile, recorder) {
        let profile = capsule_images::Profile { capsule: id, name: name.clone(), blocks: recorder.blocks() };
        let pid = store_cache.store().put_profile(&profile).with_context(|| format!("saving profile {name}"))?;
        note!("capsule: recorded profile {name} of {id}: {} blocks ({pid})", profile.blocks.len());
    }
    Ok(())
}

/// `--prefetch profile|auto|all|memory`: a background thread asking the mount's own fetch
/// engine, at background urgency (below every demand read and readahead), for what the
/// profile lists (then everything else), or the RAM image; what the cache has is skipped.
fn start_prefetch(cache: &Arc<BlockCache>, fs: &CapsuleFs, id: &Hash, args: &MountArgs) -> Result<()> {
    if args.prefetch == PrefetchMode::None {
        return Ok(());
    }
    let store = cache.store();
    let mut blocks = Vec::new();
    if args.prefetch == PrefetchMode::Memory {
        if let Some(memory) = store.manifest(id)?.memory {
            let reader = capsule_images::ImageReader::open(store, memory)?;
            // Map pages may still be on the server.
            let pages = capsule_fs::blocks::LazyPages::new(cache.clone(), fs.engine().source().cloned());
            let mut seen = std::collections::HashSet::new();
            for i in 0..memory.block_count() {
                if let Some(h) = capsule_images::image::resolve_chain(&pages, reader.chain(), i)? {
                    if seen.insert(h) {
                        blocks.push(h);
                    }
                }
            }
        }
    } else {
        let manifest = store.manifest(id)?;
        let suspended = manifest.memory.is_some();
        let name = args.profile.clone().unwrap_or_else(|| if suspended { "resume" } else { "boot" }.to_string());
        match store.list_profiles(id)?.into_iter().find(|(n, _)| *n == name) {
            Some((_, pid)) => {
                blocks = store.profile(&pid)?.blocks;
                note!("capsule: prefetching profile {name:?} ({} blocks) ahead of the guest", blocks.len());
            }
            None if args.prefetch == PrefetchMode::Auto => return Ok(()),
            None => tracing::warn!("no profile {name:?} for {id}; prefetching without one"),
        }
    }
    if args.prefetch == PrefetchMode::All {
        let listed: std::collections::HashSet<Hash> = blocks.iter().copied().collect();
        let everything = capsule_images::image::live_blocks(store, id)?;
        blocks.extend(everything.into_iter().filter(|h| !listed.contains(h)));
    }
    let follow = (matches!(args.prefetch, PrefetchMode::Profile | PrefetchMode::Auto) && !blocks.is_empty()).then(|| fs.follow_profile(&blocks));
    let engine = fs.engine();
    std::thread::Builder::new().name("capsule-prefetch".into()).spawn(move || {
        let _follow = follow;
        match engine.fetch_all(&blocks, capsule_fetch::Urgency::Background, &|_| {}) {
            Ok(bytes) => tracing::info!("prefetch done: {} blocks listed, {bytes} bytes fetched", blocks.len()),
            Err(e) => tracing::warn!("prefetch stopped: {e}"),
        }
    })?;
    Ok(())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn lock_overlay(dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).with_context(|| path.display().to_string())?;
    // An exclusive, non-blocking flock, released when the daemon exits.
    if let Err(e) = f.try_lock() {
        bail!("{}: the capsule is already mounted writable elsewhere ({e}); mount with --read-only", dir.display());
    }
    Ok(f)
}

/// Re-runs this command in the foreground as a detached process, and returns once the
/// mount answers (or fails with the daemon's log).
fn spawn_daemon(cache_dir: &Path, args: &MountArgs) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let logs = cache_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let tag: String = args.mountpoint.display().to_string().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let log_path = logs.join(format!("mount{tag}.log"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    // The daemon lives as long as the mount, and its command line is readable by every
    // local user: the token goes to it in the environment (readable by its owner only).
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    let mut rest = std::env::args_os().skip(1);
    while let Some(a) = rest.next() {
        if a == "--token" {
            rest.next();
        } else if !a.to_str().is_some_and(|s| s.starts_with("--token=")) {
            argv.push(a);
        }
    }
    // Before a `--` (after it, it would be a positional argument).
    let at = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
    argv.insert(at, "--foreground".into());
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    match &args.conn.token {
        Some(t) => cmd.env("CAPSULE_TOKEN", t),
        None => cmd.env_remove("CAPSULE_TOKEN"),
    };
    let mut child =
        cmd.args(argv).stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0).spawn().context("starting the mount daemon")?;
    let start = Instant::now();
    loop {
        if std::fs::metadata(info_path(&args.mountpoint)).is_ok() {
            let out = Mounted { mounted: &args.source, mountpoint: &args.mountpoint, supervisor_pid: child.id(), log: &log_path };
            return crate::report::print_json_or(args.json, &out, || {
                format!("mounted {} at {} (supervisor pid {}, log {})", args.source, args.mountpoint.display(), out.supervisor_pid, log_path.display())
            });
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("mount failed ({status}):\n{}", tail.join("\n"));
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            bail!("mount did not come up within 120 s; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `path` is where a capsule FUSE mount sits (from /proc/self/mountinfo: a FUSE
/// file system named `capsule:NAME` by the daemon, type `fuse` or `fuse.capsule`).
pub(crate) fn is_capsule_mount(path: &Path) -> bool {
    capsule_fs::mountinfo::mounts()
        .iter()
        .any(|m| m.mountpoint == path && (m.fstype == "fuse.capsule" || (m.fstype.starts_with("fuse") && m.source.starts_with("capsule:"))))
}

pub fn umount(mountpoint: &Path) -> Result<()> {
    // Only capsule mounts: anything else at that path is not ours to detach.
    let abs = std::path::absolute(mountpoint).with_context(|| format!("{}", mountpoint.display()))?;
    let path = abs.canonicalize().unwrap_or(abs);
    if !is_capsule_mount(&path) {
        bail!("{} is not a capsule mount; nothing unmounted", mountpoint.display());
    }
    let info = capsule_fs::mount::read_info(mountpoint).ok();
    let ok = std::process::Command::new("fusermount3").arg("-u").arg(mountpoint).status().is_ok_and(|s| s.success())
        || std::process::Command::new("umount").arg(mountpoint).status().is_ok_and(|s| s.success());
    if !ok {
        clean_stale(mountpoint);
        if std::fs::metadata(info_path(mountpoint)).is_ok() {
            bail!("cannot unmount {} (busy? close the files using it)", mountpoint.display());
        }
    }
    if let Some(info) = info {
        wait_gone(info.pid, Duration::from_secs(10));
    }
    Ok(())
}

/// Waits up to `limit` for process `pid` to exit (a zombie counts as gone: its parent, not
/// us, reaps it).
pub fn wait_gone(pid: u32, limit: Duration) {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let start = Instant::now();
    while proc.exists() && start.elapsed() < limit {
        if std::fs::read_to_string(proc.join("stat")).is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `capsule commit MOUNTPOINT NAME`: commits and prints what it made.
pub fn commit_command(target: &Store, mountpoint: &Path, name: &str, key: Option<&str>, json: bool) -> Result<()> {
    let report = commit(target, mountpoint, name, key)?;
    crate::report::print_json_or(json, &report, || {
        format!(
            "committed {} as {name} ({}): {} changed blocks, {} stored",
            mountpoint.display(),
            report.id,
            report.changed_blocks,
            crate::report::human(report.stored_bytes)
        )
    })
}

pub fn commit(target: &Store, mountpoint: &Path, name: &str, key: Option<&str>) -> Result<capsule_fs::commit::CommitReport> {
    let info = capsule_fs::mount::read_info(mountpoint)?;
    capsule_fs::commit::complete_metadata(mountpoint)?;
    let key = mount_key(&info, key)?;
    Ok(capsule_fs::commit::commit(&info, target, name, &capsule_fs::commit::CommitOptions { key, ..Default::default() })?)
}

/// The key of the capsule a mount shows (`None` if it is not encrypted): `name` if given,
/// else the key of the id its manifest names.
pub fn mount_key(info: &MountInfo, name: Option<&str>) -> Result<Option<capsule_images::Key>> {
    let cache = Store::open(&info.cache_store)?;
    let manifest = cache.manifest(&info.capsule_id)?;
    crate::keys::for_capsule(name, &manifest, &info.capsule_id)
}
