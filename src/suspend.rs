//! `capsule suspend`, `ps` and `stop`: acting on a run from outside it, through its
//! directory (`capsule_vmm_glue::state`) and QEMU's QMP socket (`capsule_vmm_glue::session`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsule_fs::commit::{CommitOptions, MachineState};
use capsule_vmm_glue::qemu::QemuHints;
use capsule_vmm_glue::session::{Balloon, BalloonPatience, Control};
use capsule_vmm_glue::state::{RunDir, RunRecord, Suspended};
use serde::Serialize;

use crate::args::SuspendArgs;
use crate::remote::{open_store, push};
use crate::report::{human, print_transfer};

pub fn suspend(store: Option<PathBuf>, args: SuspendArgs) -> Result<()> {
    let dir = RunDir::find(&args.run)?;
    let rec = dir.record()?;
    if !rec.memory_on_mount {
        bail!("run {}: its RAM is not on the mount (read-only mount or --ram): it cannot be suspended", rec.id);
    }
    capsule_images::manifest::check_name(&args.name)?;
    let target = open_store(store)?;
    let lock = dir.try_lock_suspend(&rec.id)?;
    // The mount as the run met it (run.json; an older run's record lacks it, so the mount
    // says): its overlays are what the child commits.
    let info = &match &rec.mount {
        Some(info) => info.clone(),
        None => capsule_fs::mount::read_info(&rec.mountpoint)?,
    };
    // Before the guest stops: an encrypted capsule's child needs its key.
    let key = crate::mount::mount_key(info, args.key.as_deref())?;
    let t0 = Instant::now();

    let mut vm = Control::connect(&rec.qmp).with_context(|| format!("run {}: QMP", rec.id))?;
    let balloon = if args.no_balloon { Ok(Balloon::Skipped) } else { vm.balloon_to_use(BalloonPatience::default()) }
        .with_context(|| format!("shrinking run {} before the suspend; the guest was left running", rec.id))?;
    match balloon {
        Balloon::NoStatistics => eprintln!("capsule: the guest reports no memory statistics (no virtio_balloon driver?): saving without ballooning"),
        Balloon::Shrunk { target, reached } if reached > target + (1 << 20) => {
            eprintln!("capsule: balloon stopped at {} MiB (asked {} MiB)", reached >> 20, target >> 20)
        }
        _ => {}
    }
    let t_balloon = t0.elapsed();
    let devstate = dir.devstate();
    let saved = vm.save(&devstate).with_context(|| format!("suspending run {}; the guest was left running", rec.id))?;
    if saved.capabilities.is_empty() {
        eprintln!("capsule: this QEMU lacks x-ignore-shared: the whole RAM went into the device state");
    }
    // Guest RAM writes sit in the page cache of the shared mapping: push them to the
    // mount (the VM is stopped, nothing changes them now).
    for (file, _) in &info.files {
        let path = rec.mountpoint.join(file);
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
            f.sync_all().with_context(|| format!("flushing {}", path.display()))?;
        }
    }
    vm.quit();
    crate::mount::wait_gone(rec.qemu_pid, Duration::from_secs(30));
    let t_save = t0.elapsed() - t_balloon;

    let hints = QemuHints { capabilities: saved.capabilities.clone(), ..rec.hints.clone() };
    let mut hints = hints.to_map();
    hints.insert("suspended_unix".into(), capsule_fs::mount::now_unix().to_string());
    capsule_fs::commit::complete_metadata(&rec.mountpoint)?;
    let report = capsule_fs::commit::commit(info, &target, &args.name, &CommitOptions { state: MachineState::Suspended(devstate.clone()), hints, key })
        .with_context(|| format!("committing the suspended run as {}", args.name))?;
    let devstate_bytes = std::fs::metadata(&devstate).map(|m| m.len()).unwrap_or(0);
    dir.write_suspended(&Suspended { name: args.name.clone(), id: report.id.to_hex() })?;
    let t_commit = t0.elapsed() - t_balloon - t_save;
    let pushed = match &args.push {
        Some(url) => Some(push(&target, &args.name, url, &args.conn)?),
        None => None,
    };
    let t_total = t0.elapsed();
    drop(lock);
    let ballooned = match balloon {
        Balloon::Shrunk { target, reached } => Some((target, reached)),
        _ => None,
    };
    let out = SuspendReport {
        name: &args.name,
        id: report.id.to_hex(),
        parent: info.capsule_id.to_hex(),
        changed_blocks: report.changed_blocks,
        memory_blocks: report.memory_blocks,
        stored_bytes: report.stored_bytes,
        devstate_bytes,
        qemu_capabilities: &saved.detected,
        balloon: ballooned.map(|(t, a)| Ballooned { target_mib: t >> 20, reached_mib: a >> 20 }),
        seconds: StepSeconds { balloon: t_balloon.as_secs_f64(), save: t_save.as_secs_f64(), commit: t_commit.as_secs_f64(), total: t_total.as_secs_f64() },
        pushed: pushed.as_ref(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "suspended {} as {} ({}): {} memory and {} disk blocks changed, {} stored, device state {}; {:.1} s{}",
            rec.id,
            args.name,
            report.id.short(),
            report.memory_blocks,
            report.changed_blocks - report.memory_blocks,
            human(report.stored_bytes),
            human(devstate_bytes),
            t_total.as_secs_f64(),
            ballooned.map(|(t, a)| format!(" (ballooned to {} MiB, asked {})", a >> 20, t >> 20)).unwrap_or_default()
        );
        if let Some(p) = &pushed {
            print_transfer(false, "pushed", &args.name, p, None)?;
        }
    }
    Ok(())
}

/// What `capsule suspend --json` prints.
#[derive(Debug, Serialize)]
struct SuspendReport<'a> {
    /// The child, its id and its parent (the capsule the run ran).
    name: &'a str,
    id: String,
    parent: String,
    /// Blocks the child maps over its parent, of them the RAM's, and their stored bytes.
    changed_blocks: u64,
    memory_blocks: u64,
    stored_bytes: u64,
    devstate_bytes: u64,
    qemu_capabilities: &'a capsule_vmm_glue::session::SaveCapabilities,
    /// Where the balloon got (none: `--no-balloon`, or no statistics from the guest).
    balloon: Option<Ballooned>,
    seconds: StepSeconds,
    /// What `--push` sent.
    pushed: Option<&'a capsule_net::TransferReport>,
}

#[derive(Debug, Serialize)]
struct Ballooned {
    target_mib: u64,
    reached_mib: u64,
}

/// Seconds per step of a suspend.
#[derive(Debug, Serialize)]
struct StepSeconds {
    balloon: f64,
    save: f64,
    commit: f64,
    total: f64,
}

/// A run as `ps --json` lists it: its record, and whether its QEMU is still there.
#[derive(Debug, Serialize)]
struct Listed<'a> {
    run: &'a RunRecord,
    running: bool,
}

/// `capsule ps`: the runs on this machine.
pub fn ps(json: bool) -> Result<()> {
    let runs: Vec<(RunRecord, bool)> = RunDir::list()?
        .into_iter()
        .map(|(_, r)| {
            let alive = Path::new(&format!("/proc/{}", r.qemu_pid)).exists();
            (r, alive)
        })
        .collect();
    if json {
        let list: Vec<Listed> = runs.iter().map(|(run, running)| Listed { run, running: *running }).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!("{:<24} {:<24} {:>8}  {:<8} MOUNT", "RUN", "CAPSULE", "QEMU PID", "STATE");
    for (r, alive) in runs {
        let state = if alive { "running" } else { "gone" };
        let suspendable = if r.memory_on_mount { "" } else { " (not suspendable)" };
        println!("{:<24} {:<24} {:>8}  {:<8} {}{suspendable}", r.id, r.capsule, r.qemu_pid, state, r.mountpoint.display());
    }
    Ok(())
}

/// `capsule stop RUN`: asks the run to stop its guest in order (as Ctrl-C would: ACPI
/// power-off, then quit, then kill) and waits until the run has ended.
pub fn stop(run: &str, wait: Duration) -> Result<String> {
    let dir = RunDir::find(run)?;
    let rec = dir.record()?;
    let pid = rustix::process::Pid::from_raw(rec.run_pid as i32).context("run.json: bad run pid")?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).with_context(|| format!("run {} (pid {}) is not running", rec.id, rec.run_pid))?;
    crate::mount::wait_gone(rec.run_pid, wait);
    if Path::new(&format!("/proc/{}", rec.run_pid)).exists() {
        bail!("run {} still going after {} s", rec.id, wait.as_secs());
    }
    Ok(rec.id)
}
