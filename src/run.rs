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
use capsule_vmm_glue::session::{self, Launch, Session};
use capsule_vmm_glue::state::{RunDir, RunRecord, Suspended};

use crate::args::{AccelArg, HypervisorArg, PrefetchMode, RunArgs};
use crate::remote::{open_store, push};
use crate::report::{human, print_transfer, Fetched};
use serde::Serialize;

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

/// What `capsule run --json` prints when the run ends: one document, also when Capsule
/// itself failed (`error` says why; the exit code is then 1, never a guest's).
#[derive(Debug, Default, Serialize)]
pub struct RunReport {
    /// The run's name (`capsule stop ID`, `capsule suspend ID NAME`).
    pub id: String,
    /// The capsule run (its name) and its id, once the mount showed them.
    pub capsule: Option<String>,
    /// See `capsule`.
    pub capsule_id: Option<String>,
    /// `qemu` or `cloud-hypervisor`.
    pub hypervisor: Option<&'static str>,
    /// `kvm` or `tcg` (QEMU).
    pub accel: Option<&'static str>,
    /// A suspended capsule was resumed (not booted).
    pub resumed: bool,
    /// How the hypervisor ended, if it ran.
    pub guest: Option<GuestExit>,
    /// Capsule's own failure, with its causes.
    pub error: Option<String>,
    /// What `capsule run` exits with (see `capsule --help`, Exit codes).
    pub exit_code: u8,
    /// Where the time went.
    pub seconds: Timings,
    /// What the mount fetched.
    pub fetched: Option<Fetched>,
    /// The child a `capsule suspend` of this run made.
    pub suspended_as: Option<Suspended>,
    /// The child `--commit` made of the run's changes.
    pub committed: Option<Committed>,
    /// What `--push` sent.
    pub pushed: Option<capsule_net::TransferReport>,
}

/// The hypervisor's end: its exit code, or the signal that killed it.
#[derive(Debug, Serialize)]
pub struct GuestExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// Seconds from the start of `capsule run`.
#[derive(Debug, Default, Serialize)]
pub struct Timings {
    /// Until the capsule was mounted (read from a mount given: about 0).
    pub mounted: Option<f64>,
    /// Until the guest was running (a resume included).
    pub running: Option<f64>,
    /// Until the run ended.
    pub total: f64,
}

/// `--commit NAME`'s child.
#[derive(Debug, Serialize)]
pub struct Committed {
    pub name: String,
    #[serde(flatten)]
    pub report: capsule_fs::commit::CommitReport,
}

/// `quiet` (-q): the guest's console is not echoed.
pub fn run(store: Option<PathBuf>, args: RunArgs, quiet: bool) -> Result<ExitCode> {
    let started = Instant::now();
    let id = args.id.clone().unwrap_or_else(|| new_run_id(&args.source));
    // Exit 0 unless the guest's end says otherwise (a dry run, a run whose guest powered off).
    let mut report = RunReport { id: id.clone(), ..Default::default() };
    let result = RunDir::named(&id).map_err(anyhow::Error::from).and_then(|dir| {
        dir.create()?;
        let r = run_in(store.as_deref(), &args, &id, &dir, quiet, &started, &mut report);
        dir.remove();
        r
    });
    if args.json && !args.dry_run {
        report.seconds.total = started.elapsed().as_secs_f64();
        if let Err(e) = &result {
            report.error = Some(format!("{e:#}"));
            report.exit_code = crate::exit::FAILURE;
        }
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    result.map(|()| ExitCode::from(report.exit_code))
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
    let info = capsule_fs::mount::read_info(&mount.dir)?;
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
    let layout = capsule_vmm_glue::mount_layout(&manifest, &dir.mountpoint());
    let files = capsule_fs::layout::image_files(&manifest, writable, &layout).into_iter().map(|(name, _, image)| (name, image.size)).collect();
    Ok(View { dir: dir.mountpoint(), vm: capsule_fs::layout::vm_json(&id, &manifest, &layout), writable, ours: true, kernel_readahead: None, files, dry: true })
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

/// Runs the capsule, filling `report` as it goes (its exit code last).
fn run_in(store: Option<&Path>, args: &RunArgs, id: &str, dir: &RunDir, quiet: bool, started: &Instant, report: &mut RunReport) -> Result<()> {
    // From the start: a Ctrl-C while mounting or resuming must still stop QEMU and unmount.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    if args.dry_run && !Path::new(&args.source).join(".capsule/info.json").exists() {
        // The command line from the manifest: nothing mounted, no block fetched. (Cloud
        // Hypervisor's restore reads its config through the mount: that one mounts.)
        let view = planned_view(store, args, dir)?;
        if hypervisor_of(args, &view.vm) == HypervisorArg::Qemu {
            return print_qemu_dry_run(args.json, &plan_qemu(args, &view, dir)?.config);
        }
    }
    let m = read_mount(mount_for_run(store, args, dir)?)?;
    report.seconds.mounted = Some(started.elapsed().as_secs_f64());
    report.capsule = Some(m.view.vm.capsule.clone());
    report.capsule_id = Some(m.info.capsule_id.to_hex());
    if hypervisor_of(args, &m.view.vm) == HypervisorArg::CloudHypervisor {
        report.hypervisor = Some("cloud-hypervisor");
        if let Some(status) = crate::chv::run(args, &m.mount.dir, &m.view.vm, dir.path())? {
            report.fetched = Fetched::read(&m.mount.dir, &m.view.vm);
            guest_ended(report, status);
        }
        return Ok(());
    }
    let plan = plan_qemu(args, &m.view, dir)?;
    let config = &plan.config;
    if args.dry_run {
        return print_qemu_dry_run(args.json, config);
    }
    report.hypervisor = Some("qemu");
    report.accel = Some(config.accel.name());
    report.resumed = plan.suspended;
    if let Serial::File(log) = &config.serial {
        // A fresh log each run, so the echo shows this guest only.
        std::fs::write(log, b"").with_context(|| format!("creating {}", log.display()))?;
    }
    tracing::info!("starting {}", config.shell_line());
    let launch = Launch {
        wrapper: (!args.no_fault_fix).then(|| std::env::current_exe().map(|exe| (exe, vec![LAUNCH_ARG.into()]))).transpose()?,
        terminal: args.console,
    };
    let qemu_started = Instant::now();
    let mut vm = Session::start(config, &launch)?;
    let stop_echo = Arc::new(AtomicBool::new(false));
    let echo = match (&config.serial, quiet) {
        // With --json stdout is the report: the console goes to stderr.
        (Serial::File(log), false) => Some(echo_serial(log.clone(), args.json, stop_echo.clone())),
        _ => None,
    };
    if plan.suspended {
        let devstate = m.mount.dir.join(m.view.vm.devstate.as_deref().unwrap_or("devstate.bin"));
        vm.resume(&devstate, &plan.hints.capabilities, config.memory_mib << 20)?;
        eprintln!("capsule: resumed {} in {:.2} s", m.view.vm.capsule, qemu_started.elapsed().as_secs_f64());
    }
    report.seconds.running = Some(started.elapsed().as_secs_f64());
    if let Err(e) = vm.poll_balloon_stats(2) {
        tracing::warn!("no balloon statistics: {e}");
    }
    let record = RunRecord {
        id: id.to_string(),
        capsule: m.view.vm.capsule.clone(),
        mountpoint: m.mount.dir.clone(),
        mount: Some(m.info.clone()),
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
    guest_ended(report, status);
    let committed = finish(store, args, id, dir, &m, report)?;
    report.fetched = Fetched::read(&m.mount.dir, &m.view.vm);
    if let Some(f) = &report.fetched {
        eprintln!("capsule: {}", f.summary(&m.view.vm));
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
    eprintln!("capsule: guest stopped ({status}) after {:.1} s", qemu_started.elapsed().as_secs_f64());
    Ok(())
}

fn guest_ended(report: &mut RunReport, status: std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    report.guest = Some(GuestExit { code: status.code(), signal: status.signal() });
    report.exit_code = crate::exit::guest_code(status);
}

/// After the guest stopped: report a suspend's child, or commit (and push) what the run
/// changed if asked. True if the changes now live in a child capsule.
fn finish(store: Option<&Path>, args: &RunArgs, id: &str, dir: &RunDir, m: &Mounted, out: &mut RunReport) -> Result<bool> {
    if let Some(s) = dir.suspended()? {
        eprintln!("capsule: {id} suspended as {}", s.name);
        out.suspended_as = Some(s);
        return Ok(true);
    }
    let Some(name) = &args.commit else { return Ok(false) };
    let target = open_store(store.map(Path::to_path_buf))?;
    capsule_fs::commit::complete_metadata(&m.mount.dir)?;
    let key = crate::mount::mount_key(&m.info, args.key.as_deref())?;
    let report = capsule_fs::commit::commit(&m.info, &target, name, &CommitOptions { state: MachineState::PoweredOff, hints: Default::default(), key })
        .with_context(|| format!("committing the run as {name}"))?;
    if !args.json {
        println!("committed {id} as {name} ({}): {} changed blocks, {} stored", report.id, report.changed_blocks, human(report.stored_bytes));
    }
    out.committed = Some(Committed { name: name.clone(), report });
    if let Some(url) = &args.push {
        let report = push(&target, name, url, &args.conn)?;
        if !args.json {
            print_transfer(false, "pushed", name, &report, None)?;
        }
        out.pushed = Some(report);
    }
    Ok(true)
}

/// Echoes the serial log as it grows, to stdout (to stderr when stdout is a JSON report).
fn echo_serial(path: PathBuf, to_stderr: bool, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::Read;
        let Ok(mut f) = std::fs::File::open(&path) else { return };
        let mut out: Box<dyn std::io::Write> = if to_stderr { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).unwrap_or(0);
            if n > 0 {
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
                continue;
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
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

fn print_qemu_dry_run(json: bool, config: &QemuConfig) -> Result<()> {
    crate::report::print_dry_run(json, config.binary.clone(), config.args().iter().map(|a| a.to_string_lossy().into_owned()).collect(), config.shell_line())
}
