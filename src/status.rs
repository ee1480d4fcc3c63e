//! What a mount is doing, over time: `capsule status --watch` (JSON lines a user or a
//! benchmark script can plot) and the live status line of `capsule run` and `capsule mount
//! --foreground` on a terminal. Both read the mount's `.capsule/stats.json`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use capsule_fs::mount::MountStats;
use serde::Serialize;

use crate::report::human;

/// One line of `capsule status --watch`.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The mounted capsule.
    pub capsule: String,
    /// Block bytes fetched so far, all classes.
    pub fetched_bytes: u64,
    /// Of those, what readers waited for.
    pub demand_bytes: u64,
    /// Of those, what was fetched ahead of need (readahead and background prefetch).
    pub background_bytes: u64,
    /// Blocks fetched per class.
    pub demand_blocks: u64,
    /// See `demand_blocks`.
    pub readahead_blocks: u64,
    /// See `demand_blocks`.
    pub background_blocks: u64,
    /// Fetch rate since the previous sample, bytes per second.
    pub rate_bytes_per_s: f64,
    /// Blocks of the mount's image files that are local, in %.
    pub resident_pct: f64,
    /// Reads that waited past the stall timeout (the source lost).
    pub stalls: u64,
    /// Reads that failed.
    pub read_errors: u64,
}

/// Reads samples of one mount.
#[derive(Debug)]
pub struct Sampler {
    path: PathBuf,
    last: Option<(Instant, u64)>,
}

impl Sampler {
    /// Samples the mount at `mountpoint`; it must be a capsule mount.
    pub fn new(mountpoint: &Path) -> Result<Self> {
        let path = mountpoint.join(".capsule/stats.json");
        if !path.exists() {
            anyhow::bail!("{} is not a capsule mount (no .capsule/stats.json)", mountpoint.display());
        }
        Ok(Self { path, last: None })
    }

    /// The mount's state now.
    pub fn sample(&mut self) -> Result<Sample> {
        let stats: MountStats = serde_json::from_slice(&std::fs::read(&self.path).with_context(|| self.path.display().to_string())?)
            .with_context(|| self.path.display().to_string())?;
        let now = Instant::now();
        let f = &stats.fetch.engine;
        let rate = match self.last {
            Some((t, bytes)) if now > t => f.fetched_bytes.saturating_sub(bytes) as f64 / (now - t).as_secs_f64(),
            _ => 0.0,
        };
        self.last = Some((now, f.fetched_bytes));
        let (blocks, resident) = stats.files.values().fold((0u64, 0u64), |(b, r), file| (b + file.blocks, r + file.resident_blocks));
        Ok(Sample {
            unix_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            capsule: stats.capsule,
            fetched_bytes: f.fetched_bytes,
            demand_bytes: f.demand_bytes,
            background_bytes: f.fetched_bytes.saturating_sub(f.demand_bytes),
            demand_blocks: f.demand_blocks,
            readahead_blocks: f.readahead_blocks,
            background_blocks: f.background_blocks,
            rate_bytes_per_s: rate,
            resident_pct: if blocks == 0 { 100.0 } else { resident as f64 * 100.0 / blocks as f64 },
            stalls: f.timeouts,
            read_errors: stats.read_errors,
        })
    }
}

impl Sample {
    /// "fetched 12.5 MiB (1.2 MiB/s), 41.0% resident, 0 stalls"
    pub fn line(&self) -> String {
        format!(
            "fetched {} ({}/s; {} ahead of need), {:.1}% resident, {} stall{}",
            human(self.fetched_bytes),
            human(self.rate_bytes_per_s as u64),
            human(self.background_bytes),
            self.resident_pct,
            self.stalls,
            if self.stalls == 1 { "" } else { "s" }
        )
    }
}

/// `capsule status MOUNT --watch`: one JSON line per `interval` until the mount goes away
/// (or Ctrl-C).
pub fn watch(mountpoint: &Path, interval: Duration) -> Result<()> {
    let mut sampler = Sampler::new(mountpoint)?;
    let mut out = std::io::stdout();
    loop {
        let Ok(sample) = sampler.sample() else { return Ok(()) };
        if writeln!(out, "{}", serde_json::to_string(&sample)?).and_then(|_| out.flush()).is_err() {
            return Ok(()); // the reader went away (a closed pipe)
        }
        std::thread::sleep(interval);
    }
}

/// The live status line on stderr while `stop` is unset: redrawn in place every 2 s when
/// stderr is a terminal of its own; when the guest's console shares it (`shared`), a whole
/// line every 10 s, and only while blocks arrive. Nothing when stderr is not a terminal.
pub fn live_line(mountpoint: PathBuf, shared: bool, stop: Arc<AtomicBool>) -> Option<std::thread::JoinHandle<()>> {
    if !std::io::stderr().is_terminal() || crate::progress::is_quiet() {
        return None;
    }
    let mut sampler = Sampler::new(&mountpoint).ok()?;
    Some(std::thread::spawn(move || {
        let period = if shared { Duration::from_secs(10) } else { Duration::from_secs(2) };
        let mut last_bytes = None;
        let mut drawn = false;
        'outer: loop {
            let until = Instant::now() + period;
            while Instant::now() < until {
                if stop.load(Ordering::Relaxed) {
                    break 'outer;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let Ok(s) = sampler.sample() else { break };
            if shared {
                if last_bytes != Some(s.fetched_bytes) {
                    note!("capsule: {}", s.line());
                }
            } else {
                note_raw!("\r\x1b[Kcapsule: {}", s.line());
                drawn = true;
            }
            last_bytes = Some(s.fetched_bytes);
        }
        if drawn {
            note_raw!("\r\x1b[K");
        }
    }))
}
