//! `capsule run`, `suspend`, `ps` and `stop`: a mount, a VM session (`capsule-vmm-glue`)
//! and a printer wired together. The run's files and their types are in
//! `capsule_vmm_glue::state`; every QMP step is in `capsule_vmm_glue::session`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsule_fs::commit::{CommitOptions, MachineState};
use capsule_fs::mount::MountInfo;
use capsule_images::VmFile;
use capsule_vmm_glue::qemu::{Accel, DiskFile, QemuConfig, QemuHints, Serial};
use capsule_vmm_glue::session::{self, Balloon, BalloonPatience, Control, Launch, Session};
use capsule_vmm_glue::state::{RunDir, RunRecord, Suspended};
use serde_json::json;

use crate::args::{AccelArg, HypervisorArg, PrefetchMode, RunArgs, SuspendArgs};
use crate::remote::{open_store, push};
use crate::report::{fetch_summary, human, print_transfer};

/// First argument of the hidden re-exec that starts QEMU under the no-hugepage filter.
pub const LAUNCH_ARG: &str = "__launch-qemu";

/// The mount a run uses: unmounted on drop when the run made it.
struct RunMount {
    dir: PathBuf,
    ours: bool,
}

impl Drop for RunMount {
    fn drop(&mut self) {
        if self.ours {
            if let Err(e) = crate::mount::umount(&self.dir) {
                eprintln!("capsule: {e:#}");
            }
        }
    }
}

fn mount_for_run(store: Option<&Path>, args: &RunArgs, dir: &RunDir) -> Result<RunMount> {
    let given = Path::new(&args.source);
    if given.join(".capsule/info.json").exists() {
        return Ok(RunMount { dir: given.canonicalize()?, ours: false });
    }
    let mnt = dir.mountpoint();
    std::fs::create_dir_all(&mnt)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    if let Some(s) = store {
        cmd.arg("--store").arg(s);
    }
    cmd.arg("mount").arg(&args.source).arg(&mnt).arg("--cache-size").arg(&args.cache_size).arg("--prepare-run");
    if let Some(c) = &args.cache {
        cmd.arg("--cache").arg(c);
    }
    if !args.no_fault_fix {
        cmd.args(["--kernel-readahead", "0"]);
    }
    if args.read_only {
        cmd.arg("--read-only");
    }
    if args.discard_changes {
        cmd.arg("--discard-changes");
    }
    if args.offline {
        cmd.arg("--offline");
    }
    cmd.arg("--memory-cluster").arg(args.memory_cluster.to_string());
    if let Some(p) = &args.record_profile {
        cmd.arg("--record-profile").arg(p);
    }
    // By default a profile the capsule carries (learnt from an earlier boot or resume) is
    // fetched ahead of the guest: it is what the guest will read, in order.
    cmd.arg("--prefetch").arg(match args.prefetch.unwrap_or(PrefetchMode::Auto) {
        PrefetchMode::None => "none",
        PrefetchMode::Profile => "profile",
        PrefetchMode::All => "all",
        PrefetchMode::Memory => "memory",
        PrefetchMode::Auto => "auto",
    });
    if let Some(p) = &args.profile {
        cmd.arg("--profile").arg(p);
    }
    if let Some(k) = &args.key {
        cmd.arg("--key").arg(k);
    }
    for seed in &args.seeds {
        cmd.arg("--seed").arg(seed);
    }
    if let Some(t) = args.stall_timeout {
        cmd.arg("--stall-timeout").arg(t.to_string());
    }
    if let Some(t) = &args.conn.token {
        cmd.env("CAPSULE_TOKEN", t);
    }
    cmd.arg("--connect-timeout").arg(args.conn.connect_timeout.to_string());
    if let Some(f) = &args.conn.server_fingerprint {
        cmd.arg("--server-fingerprint").arg(f);
    }
    let out = cmd.stdin(Stdio::null()).output().context("starting capsule mount")?;
    if !out.status.success() {
        bail!("mounting {}: {}", args.source, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(RunMount { dir: mnt.canonicalize()?, ours: true })
}

fn new_run_id(capsule: &str) -> String {
    let base: String = capsule.rsplit('/').next().unwrap_or("vm").chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    format!("{base}-{}", std::process::id())
}

/// `quiet` (-q): the guest's console is not echoed.
pub fn run(store: Option<PathBuf>, args: RunArgs, quiet: bool) -> Result<ExitCode> {
    let id = args.id.clone().unwrap_or_else(|| new_run_id(&args.source));
    let dir = RunDir::named(&id)?;
    dir.create()?;
    let result = run_in(store.as_deref(), &args, &id, &dir, quiet);
    dir.remove();
    result
}

/// What `run` needs of a mount: the VM description and the files it shows (name ->
/// bytes). Read from a mount, or, for `--dry-run`, planned from the manifest alone.
struct View {
    dir: PathBuf,
    vm: VmFile,
    writable: bool,
    /// The run mounted it (and so set the kernel readahead itself).
    ours: bool,
    kernel_readahead: Option<u32>,
    files: BTreeMap<String, u64>,
    /// A plan only: nothing is mounted, probed or written.
    dry: bool,
}

impl View {
    fn file(&self, name: &str) -> Option<PathBuf> {
        self.files.contains_key(name).then(|| self.dir.join(name))
    }
}

/// The mount a run uses, read once.
struct Mounted {
    mount: RunMount,
    info: MountInfo,
    view: View,
}

fn read_mount(mount: RunMount) -> Result<Mounted> {
    let read = |name: &str| std::fs::read(mount.dir.join(name)).with_context(|| format!("reading the mount's {name}"));
    let vm: VmFile = serde_json::from_slice(&read("capsule.json")?).context("the mount's capsule.json")?;
    let info: MountInfo = serde_json::from_slice(&read(".capsule/info.json")?).context("the mount's .capsule/info.json")?;
    let files = info.files.iter().filter_map(|(name, _)| Some((name.clone(), std::fs::metadata(mount.dir.join(name)).ok()?.len()))).collect();
    let view =
        View { dir: mount.dir.clone(), vm, writable: info.overlay_dir.is_some(), ours: mount.ours, kernel_readahead: info.kernel_readahead, files, dry: false };
    Ok(Mounted { mount, info, view })
}

/// `--dry-run` of a capsule not mounted yet: its manifest from the local store, or (its
/// metadata only, into the cache) from the server; no mount, no block fetched.
fn planned_view(store: Option<&Path>, args: &RunArgs, dir: &RunDir) -> Result<View> {
    let (id, manifest) = if args.source.starts_with("capsule://") {
        let url = capsule_net::RemoteUrl::parse(&args.source)?;
        let name = url.name.clone().with_context(|| format!("{}: name the capsule: capsule://HOST:PORT/NAME", args.source))?;
        let cache_dir = args.cache.clone().unwrap_or_else(crate::mount::default_cache_dir);
        let cache = capsule_images::Store::open(&cache_dir).with_context(|| format!("opening cache {}", cache_dir.display()))?;
        let remembered = crate::mount::remembered_ref(&url, &name);
        let id = if args.offline {
            cache.read_ref(&remembered)?.with_context(|| format!("{}: never fetched into cache {}", args.source, cache_dir.display()))?
        } else {
            crate::remote::runtime()?.block_on(async {
                let client = crate::remote::connect(&url, &args.conn).await?;
                let id = client.get_ref(&name).await?.with_context(|| format!("the server has no capsule named {name:?}"))?;
                capsule_net::pull_head(&client, &id, &cache).await.context("fetching the capsule's metadata")?;
                client.close().await;
                anyhow::Ok(id)
            })?
        };
        (id, cache.manifest(&id)?)
    } else {
        let s = crate::remote::open_existing_store(store.map(Path::to_path_buf))?;
        let id = s.resolve(&args.source)?;
        (id, s.manifest(&id).with_context(|| format!("capsule {}", args.source))?)
    };
    let mut manifest = manifest;
    if let Some(key) = crate::keys::for_capsule(args.key.as_deref(), &manifest, &id)? {
        manifest.open(&key)?;
    }
    let writable = !args.read_only;
    let files = capsule_fs::layout::image_files(&manifest, writable).into_iter().map(|(name, _, image)| (name, image.size)).collect();
    Ok(View { dir: dir.mountpoint(), vm: capsule_fs::layout::vm_json(&id, &manifest), writable, ours: true, kernel_readahead: None, files, dry: true })
}

fn hypervisor_of(args: &RunArgs, vm: &VmFile) -> HypervisorArg {
    args.hypervisor.unwrap_or(if vm.hypervisor.as_deref() == Some("cloud-hypervisor") { HypervisorArg::CloudHypervisor } else { HypervisorArg::Qemu })
}

/// The QEMU machine a run starts: a cold boot, or the resume of a suspended capsule.
struct Plan {
    config: QemuConfig,
    suspended: bool,
    hints: QemuHints,
}

fn plan_qemu(args: &RunArgs, m: &View, dir: &RunDir) -> Result<Plan> {
    let (vm, mnt) = (&m.vm, &m.dir);
    // Hints come from the capsule, that is from whoever made it: checked before any reaches QEMU.
    let hints = QemuHints::parse(&vm.hints).with_context(|| format!("capsule {} ({}): refusing to run it", vm.capsule, args.source))?;
    let writable = m.writable;
    let suspended = vm.suspended;
    if !m.ours && !args.no_fault_fix && m.kernel_readahead.is_some_and(|r| r > 0) {
        eprintln!("capsule: {} has kernel readahead on: each RAM fault reads ahead (mount it with --kernel-readahead 0)", mnt.display());
    }
    if suspended && !writable {
        bail!("{} is a suspended capsule: resuming needs a writable mount (its RAM is written in place)", args.source);
    }
    let memory_mib = args.memory.map_or(vm.memory_mib, |b| b >> 20);
    let ram_on_mount = m.files.get("memory.raw") == Some(&(vm.memory_mib << 20));
    let memory_file = (writable && memory_mib == vm.memory_mib && ram_on_mount).then(|| mnt.join("memory.raw"));
    if suspended && memory_file.is_none() {
        bail!("resuming needs the capsule's RAM size ({} MiB); drop --ram", vm.memory_mib);
    }
    let cpus = args.cpus.unwrap_or(vm.cpus);
    if suspended && cpus != vm.cpus {
        bail!("resuming needs the capsule's {} vCPUs; drop --cpus", vm.cpus);
    }
    let kernel = m.file("vmlinuz");
    let accel = match args.accel {
        AccelArg::Kvm => Accel::Kvm,
        AccelArg::Tcg => Accel::Tcg,
        AccelArg::Auto => match hints.accel.filter(|_| suspended) {
            Some(Accel::Tcg) => Accel::Tcg,
            _ if m.dry => {
                let memo = session::kvm_remembered(dir.path().parent().unwrap_or(dir.path()));
                if memo.unwrap_or_else(session::kvm_device_opens) {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
            _ => {
                let (usable, probed) = session::kvm_usable(dir.path().parent().unwrap_or(dir.path()), &args.qemu, kernel.as_deref());
                if probed && !usable {
                    eprintln!("capsule: KVM does not run guests here; using TCG (slower)");
                }
                if usable {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
        },
    };
    let append = if suspended {
        hints.append.clone()
    } else {
        let base = vm.cmdline.clone().unwrap_or_default();
        Some(match &args.append {
            Some(extra) => format!("{base} {extra}").trim().to_string(),
            None => base,
        })
    };
    let (kernel, initrd) = match (&kernel, suspended) {
        (Some(_), true) if m.dry => (Some(dir.boot_standins().join("vmlinuz")), m.file("initrd.img").map(|_| dir.boot_standins().join("initrd.img"))),
        (Some(k), true) => {
            let (k, i) = session::boot_standins(&dir.boot_standins(), k, m.file("initrd.img").as_deref())?;
            (Some(k), i)
        }
        _ => (kernel.clone(), m.file("initrd.img")),
    };
    let config = QemuConfig {
        binary: args.qemu.clone(),
        accel,
        machine: hints.machine.clone().filter(|_| suspended).unwrap_or_else(|| "pc".into()),
        cpus,
        memory_mib,
        memory_file,
        disks: vm.disks.iter().map(|d| DiskFile { path: mnt.join(&d.file), read_only: !writable }).collect(),
        initrd: initrd.filter(|_| kernel.is_some()),
        append: append.filter(|_| kernel.is_some()),
        kernel,
        qmp_socket: dir.qmp_socket(),
        serial: if args.console { Serial::Terminal } else { Serial::File(args.serial_log.clone().unwrap_or_else(|| dir.serial_log())) },
        incoming: suspended,
        extra: args.extra.clone(),
    };
    config.check().with_context(|| format!("capsule {} ({})", vm.capsule, args.source))?;
    Ok(Plan { config, suspended, hints })
}

fn run_in(store: Option<&Path>, args: &RunArgs, id: &str, dir: &RunDir, quiet: bool) -> Result<ExitCode> {
    // From the start: a Ctrl-C while mounting or resuming must still stop QEMU and unmount.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    if args.dry_run && !Path::new(&args.source).join(".capsule/info.json").exists() {
        // The command line from the manifest: nothing mounted, no block fetched. (Cloud
        // Hypervisor's restore reads its config through the mount: that one mounts.)
        let view = planned_view(store, args, dir)?;
        if hypervisor_of(args, &view.vm) == HypervisorArg::Qemu {
            print_dry_run(args, &plan_qemu(args, &view, dir)?.config)?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    let m = read_mount(mount_for_run(store, args, dir)?)?;
    if hypervisor_of(args, &m.view.vm) == HypervisorArg::CloudHypervisor {
        return crate::chv::run(args, &m.mount.dir, &m.view.vm, dir.path());
    }
    let plan = plan_qemu(args, &m.view, dir)?;
    let config = &plan.config;
    if args.dry_run {
        print_dry_run(args, config)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Serial::File(log) = &config.serial {
        // A fresh log each run, so the echo shows this guest only.
        std::fs::write(log, b"").with_context(|| format!("creating {}", log.display()))?;
    }
    tracing::info!("starting {}", config.shell_line());
    let launch = Launch {
        wrapper: (!args.no_fault_fix).then(|| std::env::current_exe().map(|exe| (exe, vec![LAUNCH_ARG.into()]))).transpose()?,
        terminal: args.console,
    };
    let started = Instant::now();
    let mut vm = Session::start(config, &launch)?;
    let stop_echo = Arc::new(AtomicBool::new(false));
    let echo = match (&config.serial, quiet) {
        (Serial::File(log), false) => Some(echo_serial(log.clone(), stop_echo.clone())),
        _ => None,
    };
    if plan.suspended {
        let devstate = m.mount.dir.join(m.view.vm.devstate.as_deref().unwrap_or("devstate.bin"));
        vm.resume(&devstate, &plan.hints.capabilities, config.memory_mib << 20)?;
        eprintln!("capsule: resumed {} in {:.2} s", m.view.vm.capsule, started.elapsed().as_secs_f64());
    }
    if let Err(e) = vm.poll_balloon_stats(2) {
        tracing::warn!("no balloon statistics: {e}");
    }
    let record = RunRecord {
        id: id.to_string(),
        capsule: m.view.vm.capsule.clone(),
        capsule_id: m.info.capsule_id.to_hex(),
        mountpoint: m.mount.dir.clone(),
        qemu_pid: vm.pid(),
        run_pid: std::process::id(),
        qmp: config.qmp_socket.clone(),
        memory_on_mount: config.memory_file.is_some(),
        hints: vm.hints(config.accel, config.append.as_deref()),
    };
    vm.release_qmp();
    dir.write_record(&record)?;
    eprintln!(
        "capsule: running {} as {id} ({} under {}); suspend with: capsule suspend {id} NAME",
        record.capsule,
        m.mount.dir.display(),
        config.accel.name().to_uppercase()
    );

    // Bytes fetched, rate, resident %, stalls on a terminal (not when QEMU owns it).
    let stop_line = Arc::new(AtomicBool::new(false));
    let line = (!args.console).then(|| crate::status::live_line(m.mount.dir.clone(), echo.is_some(), stop_line.clone())).flatten();
    let status = vm.wait_or_stop(&stop, Duration::from_secs(10), || eprintln!("capsule: stopping the guest"));
    stop_line.store(true, Ordering::Relaxed);
    if let Some(h) = line {
        let _ = h.join();
    }
    let status = status?;
    // A suspend in progress holds this lock until its commit is done.
    let _lock = dir.wait_suspend()?;
    stop_echo.store(true, Ordering::Relaxed);
    if let Some(h) = echo {
        let _ = h.join();
    }
    let committed = finish(store, args, id, dir, &m)?;
    if let Some(line) = fetch_summary(&m.mount.dir, &m.view.vm) {
        eprintln!("capsule: {line}");
    }
    let overlay = m.info.overlay_dir.clone();
    let ours = m.mount.ours;
    drop(m);
    // What the run changed now lives in the child: the next run of the parent starts clean.
    if committed && ours {
        if let Some(o) = overlay {
            let _ = std::fs::remove_dir_all(o);
        }
    }
    eprintln!("capsule: guest stopped ({status}) after {:.1} s", started.elapsed().as_secs_f64());
    Ok(crate::exit::guest(status))
}

/// After the guest stopped: report a suspend's child, or commit (and push) what the run
/// changed if asked. True if the changes now live in a child capsule.
fn finish(store: Option<&Path>, args: &RunArgs, id: &str, dir: &RunDir, m: &Mounted) -> Result<bool> {
    if let Some(s) = dir.suspended()? {
        eprintln!("capsule: {id} suspended as {}", s.name);
        return Ok(true);
    }
    let Some(name) = &args.commit else { return Ok(false) };
    let target = open_store(store.map(Path::to_path_buf))?;
    capsule_fs::commit::complete_metadata(&m.mount.dir)?;
    let key = crate::mount::mount_key(&m.info, args.key.as_deref())?;
    let report = capsule_fs::commit::commit(&m.info, &target, name, &CommitOptions { state: MachineState::PoweredOff, hints: Default::default(), key })
        .with_context(|| format!("committing the run as {name}"))?;
    println!("committed {id} as {name} ({}): {} changed blocks, {} stored", report.id, report.changed_blocks, human(report.stored_bytes));
    if let Some(url) = &args.push {
        let report = push(&target, name, url, &args.conn)?;
        print_transfer(false, "pushed", name, &report, None)?;
    }
    Ok(true)
}

/// Echoes the serial log to stdout as it grows.
fn echo_serial(path: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::Read;
        let Ok(mut f) = std::fs::File::open(&path) else { return };
        let mut out = std::io::stdout();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).unwrap_or(0);
            if n > 0 {
                let _ = std::io::Write::write_all(&mut out, &buf[..n]);
                let _ = std::io::Write::flush(&mut out);
                continue;
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

pub fn suspend(store: Option<PathBuf>, args: SuspendArgs) -> Result<()> {
    let dir = RunDir::find(&args.run)?;
    let rec = dir.record()?;
    if !rec.memory_on_mount {
        bail!("run {}: its RAM is not on the mount (read-only mount or --ram): it cannot be suspended", rec.id);
    }
    capsule_images::manifest::check_name(&args.name)?;
    let target = open_store(store)?;
    let lock = dir.try_lock_suspend(&rec.id)?;
    let info: MountInfo = serde_json::from_slice(&std::fs::read(rec.mountpoint.join(".capsule/info.json")).context("reading the run's mount")?)?;
    // Before the guest stops: an encrypted capsule's child needs its key.
    let key = crate::mount::mount_key(&info, args.key.as_deref())?;
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
    let report = capsule_fs::commit::commit(&info, &target, &args.name, &CommitOptions { state: MachineState::Suspended(devstate.clone()), hints, key })
        .with_context(|| format!("committing the suspended run as {}", args.name))?;
    let devstate_bytes = std::fs::metadata(&devstate).map(|m| m.len()).unwrap_or(0);
    dir.write_suspended(&Suspended { name: args.name.clone(), id: report.id.to_hex() })?;
    let t_commit = t0.elapsed() - t_balloon - t_save;
    if let Some(url) = &args.push {
        let pushed = push(&target, &args.name, url, &args.conn)?;
        print_transfer(false, "pushed", &args.name, &pushed, None)?;
    }
    let t_total = t0.elapsed();
    drop(lock);
    let ballooned = match balloon {
        Balloon::Shrunk { target, reached } => Some((target, reached)),
        _ => None,
    };
    let out = json!({
        "name": args.name, "id": report.id.to_hex(), "parent": rec.capsule_id,
        "changed_blocks": report.changed_blocks, "memory_blocks": report.memory_blocks, "stored_bytes": report.stored_bytes,
        "devstate_bytes": devstate_bytes,
        "qemu_capabilities": saved.detected,
        "balloon": ballooned.map(|(t, a)| json!({"target_mib": t >> 20, "reached_mib": a >> 20})),
        "seconds": {"balloon": t_balloon.as_secs_f64(), "save": t_save.as_secs_f64(), "commit": t_commit.as_secs_f64(), "total": t_total.as_secs_f64()},
    });
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
    }
    Ok(())
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
        let list: Vec<serde_json::Value> = runs.iter().map(|(r, alive)| json!({"run": r, "running": alive})).collect();
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

/// `capsule __launch-qemu QEMU ARGS...`: install the no-hugepage seccomp filter, then
/// become QEMU (same pid, unmodified binary).
pub fn launch_qemu(argv: &[std::ffi::OsString]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let Some((binary, args)) = argv.split_first() else {
        eprintln!("capsule: {LAUNCH_ARG} needs a QEMU binary");
        return ExitCode::FAILURE;
    };
    if let Err(e) = capsule_vmm_glue::launcher::disable_hugepage_advice() {
        eprintln!("capsule: {e}");
        return ExitCode::FAILURE;
    }
    let e = Command::new(binary).args(args).exec();
    eprintln!("capsule: cannot start {}: {e}", binary.to_string_lossy());
    ExitCode::FAILURE
}

/// What `run --dry-run --json` prints: the QEMU command line, as words and as one line.
#[derive(Debug, serde::Serialize)]
struct DryRun {
    binary: PathBuf,
    args: Vec<String>,
    line: String,
}

fn print_dry_run(args: &RunArgs, config: &capsule_vmm_glue::qemu::QemuConfig) -> Result<()> {
    if args.json {
        let plan =
            DryRun { binary: config.binary.clone(), args: config.args().iter().map(|a| a.to_string_lossy().into_owned()).collect(), line: config.shell_line() };
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        println!("{}", config.shell_line());
    }
    Ok(())
}
