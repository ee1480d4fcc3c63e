//! Capsule's fuzz harness, on the stable toolchain: every decoder and parser of outside
//! input is fed valid encodings made by the real encoders, then mutated by a small
//! deterministic mutator (bit flips, interesting integers at any offset, cuts, splices,
//! repeats). Checksums would stop almost every mutation at the first check, so each
//! target also has a "wrapped" mode: the mutated bytes become the payload of a container
//! whose checksum the harness computes, and the decoder behind the check gets them.
//!
//! A target passes when no input panics and none takes longer than [`HANG_LIMIT`]; an
//! error return is the expected answer to most inputs.

mod mutate;
mod seeds;
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use mutate::{mutate, Rng};
use targets::*;

/// An input running longer than this is a hang.
pub const HANG_LIMIT: Duration = Duration::from_secs(5);
/// Largest input the mutator makes.
pub const MAX_INPUT: usize = 64 << 10;

/// One decoder under test.
#[derive(Debug)]
pub struct Target {
    /// Its name (`--target NAME`).
    pub name: &'static str,
    /// Valid encodings to start from (mode byte first: 0 raw, 1 wrapped).
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Feeds one input to the decoder; true if the decoder accepted it.
    pub run: fn(&[u8]) -> bool,
}

/// Every target.
pub fn targets() -> Vec<Target> {
    vec![
        Target { name: "frame", seeds: seeds_frame, run: run_frame },
        Target { name: "control", seeds: seeds_control, run: run_control },
        Target { name: "envelope", seeds: seeds_envelope, run: run_envelope },
        Target { name: "manifest", seeds: seeds_manifest, run: run_manifest },
        Target { name: "layer", seeds: seeds_layer, run: run_layer },
        Target { name: "map-page", seeds: seeds_map_page, run: run_map_page },
        Target { name: "profile", seeds: seeds_profile, run: run_profile },
        Target { name: "block", seeds: seeds_block, run: run_block },
        Target { name: "sealed-block", seeds: seeds_sealed_block, run: run_sealed_block },
        Target { name: "pins", seeds: seeds_pins, run: run_pins },
        Target { name: "store-pack", seeds: seeds_store_pack, run: run_store_pack },
        Target { name: "overlay-state", seeds: seeds_overlay_state, run: run_overlay_state },
        Target { name: "token-file", seeds: seeds_token_file, run: run_token_file },
        Target { name: "qmp", seeds: seeds_qmp, run: run_qmp },
        Target { name: "qcow2-header", seeds: seeds_qcow2, run: run_qcow2 },
        Target { name: "hints", seeds: seeds_hints, run: run_hints },
    ]
}

/// What a run of one target did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Inputs fed.
    pub inputs: u64,
    /// Inputs the decoder accepted.
    pub accepted: u64,
    /// Inputs that panicked (each saved under the crash directory).
    pub panics: u64,
    /// The slowest input.
    pub slowest: Duration,
    /// Wall time.
    pub elapsed: Duration,
    /// The first panic's message.
    pub first_panic: Option<String>,
}

/// Runs `target` on `inputs` inputs from `seed`: the seeds themselves first, then
/// mutations of seeds and of inputs the decoder accepted. A panicking input is written to
/// `crash_dir`. An input that runs past [`HANG_LIMIT`] is written there too, and the
/// process exits (a hang cannot be interrupted).
pub fn run_target(target: &Target, inputs: u64, seed: u64, crash_dir: &Path) -> Report {
    let seeds = (target.seeds)();
    let mut corpus = seeds.clone();
    let mut rng = Rng::new(seed ^ blake3::hash(target.name.as_bytes()).as_bytes()[0] as u64);
    let mut report = Report::default();
    let current: Arc<Mutex<Vec<u8>>> = Arc::default();
    let started_ms = Arc::new(AtomicU64::new(u64::MAX));
    let epoch = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let (current, started_ms, done, dir, name) = (current.clone(), started_ms.clone(), done.clone(), crash_dir.to_path_buf(), target.name);
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let s = started_ms.load(Ordering::Relaxed);
                if s != u64::MAX && epoch.elapsed().as_millis() as u64 > s + HANG_LIMIT.as_millis() as u64 {
                    let input = current.lock().map(|c| c.clone()).unwrap_or_default();
                    let path = save(&dir, name, "hang", &input);
                    eprintln!("fuzz {name}: HANG: an input ran over {} s; saved as {}", HANG_LIMIT.as_secs(), path.display());
                    std::process::exit(3);
                }
            }
        })
    };
    // Panics are counted and saved, not printed one by one.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let start = Instant::now();
    let mut input = Vec::new();
    for n in 0..inputs {
        input.clear();
        if (n as usize) < seeds.len() {
            input.extend_from_slice(&seeds[n as usize]);
        } else {
            input.extend_from_slice(&corpus[rng.below(corpus.len())]);
            mutate(&mut rng, &mut input, &corpus);
        }
        if let Ok(mut c) = current.lock() {
            c.clear();
            c.extend_from_slice(&input);
        }
        let t0 = Instant::now();
        started_ms.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let result = catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
        started_ms.store(u64::MAX, Ordering::Relaxed);
        report.slowest = report.slowest.max(t0.elapsed());
        report.inputs += 1;
        match result {
            Ok(true) => {
                report.accepted += 1;
                // Accepted mutants are good parents: keep a bounded, refreshed sample.
                if n as usize >= seeds.len() {
                    if corpus.len() < 4096 {
                        corpus.push(input.clone());
                    } else {
                        let i = seeds.len() + rng.below(corpus.len() - seeds.len());
                        corpus[i] = input.clone();
                    }
                }
            }
            Ok(false) => {}
            Err(payload) => {
                report.panics += 1;
                let msg = payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                let path = save(crash_dir, target.name, "panic", &input);
                if report.first_panic.is_none() {
                    report.first_panic = Some(format!("{msg} (input saved as {})", path.display()));
                }
            }
        }
    }
    report.elapsed = start.elapsed();
    std::panic::set_hook(previous_hook);
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    report
}

fn save(dir: &Path, name: &str, what: &str, input: &[u8]) -> std::path::PathBuf {
    let _ = std::fs::create_dir_all(dir);
    let path = dir.join(format!("{name}-{what}-{}.bin", blake3::hash(input).to_hex().as_str().get(..16).unwrap_or_default()));
    let _ = std::fs::write(&path, input);
    path
}

/// Replays one saved input (a panic or hang found earlier) through `target`.
pub fn replay(target: &Target, input: &[u8]) -> bool {
    (target.run)(input)
}
