//! `capsule run` and `capsule suspend`: an unmodified hypervisor running straight from a
//! mount, and a running machine saved as a child capsule holding only what changed.
//!
//! ```text
//!  RUNS/<id>/run.json       what `suspend` needs: QEMU pid, QMP socket, mount, settings
//!  RUNS/<id>/qmp.sock       QEMU's QMP socket
//!  RUNS/<id>/mnt/           the mount (when `run` made it)
//!  RUNS/<id>/devstate.bin   the device state a suspend saves
//!  RUNS/<id>/suspend.lock   held by `suspend` until its commit is done; `run` waits on it
//!  RUNS/<id>/suspended.json the child a suspend made
//! ```
//! RUNS is `$CAPSULE_RUN_DIR`, else `$XDG_RUNTIME_DIR/capsule/runs`, else `/tmp/capsule-runs-<uid>`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsule_fs::commit::{CommitOptions, MachineState};
use capsule_fs::mount::MountInfo;
use capsule_vmm_glue::qemu::{Accel, DiskFile, QemuConfig, QemuHints, Serial};
use capsule_vmm_glue::qmp::Qmp;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ConnArgs;

/// How long QEMU may take to create its QMP socket.
const QMP_WAIT: Duration = Duration::from_secs(30);

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelArg {
    /// KVM if it really runs a guest here, else TCG
    Auto,
    Kvm,
    Tcg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypervisorArg {
    Qemu,
    CloudHypervisor,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// capsule://HOST:PORT/NAME, a capsule NAME in the local store, or a capsule mount point
    pub source: String,
    /// Hypervisor [default: the capsule's preference, else qemu]
    #[arg(long, value_enum)]
    pub hypervisor: Option<HypervisorArg>,
    /// Accelerator; auto uses KVM only when a guest really runs under it
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Virtual CPUs [default: the capsule's]
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest RAM [default: the capsule's]; another size than the capsule's keeps RAM off
    /// the mount, so the run cannot be suspended
    #[arg(long, value_name = "SIZE", value_parser = crate::parse_size)]
    pub memory: Option<u64>,
    /// The guest's serial console on this terminal (QEMU's monitor on Ctrl-A c, quit with Ctrl-A x)
    #[arg(long, conflicts_with = "serial_log")]
    pub console: bool,
    /// Write the guest's serial console to FILE (it is also echoed unless --quiet)
    #[arg(long, value_name = "FILE")]
    pub serial_log: Option<PathBuf>,
    /// Do not echo the guest's console
    #[arg(long)]
    pub quiet: bool,
    /// Added to the capsule's kernel command line (cold boot only)
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
    /// Mount read-only: disks attached read-only, RAM not on the mount (no suspend)
    #[arg(long)]
    pub read_only: bool,
    /// Block cache [default: $CAPSULE_CACHE, else ~/.cache/capsule]
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Bound of the block cache
    #[arg(long, value_name = "SIZE", default_value = "10G")]
    pub cache_size: String,
    /// When the guest powers off, commit its disk changes as capsule NAME in the local store
    #[arg(long, value_name = "NAME")]
    pub commit: Option<String>,
    /// ... and push that capsule to capsule://HOST:PORT[/NAME]
    #[arg(long, value_name = "URL", requires = "commit")]
    pub push: Option<String>,
    /// Resuming a suspended capsule: drop an earlier resume's uncommitted changes in the cache
    #[arg(long)]
    pub discard_changes: bool,
    /// Keep QEMU's MADV_HUGEPAGE and the kernel's readahead on guest RAM (a baseline for
    /// benchmarks: each fault then reads 2-4 MiB of the mount)
    #[arg(long)]
    pub no_fault_fix: bool,
    /// Never touch the network: run from what the cache holds (`capsule prefetch --offline`)
    #[arg(long)]
    pub offline: bool,
    /// Record the blocks this run touches as working-set profile NAME (saved when it ends)
    #[arg(long, value_name = "NAME")]
    pub record_profile: Option<String>,
    /// Fetch in the background, below the guest's reads: the profile's blocks, or all
    #[arg(long, value_enum)]
    pub prefetch: Option<crate::PrefetchMode>,
    /// The profile `--prefetch profile` uses [default: boot]
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// A local file whose blocks count as present; repeatable
    #[arg(long = "seed", value_name = "PATH")]
    pub seeds: Vec<PathBuf>,
    /// Seconds a read of a missing block waits for a lost server before the guest sees EIO
    #[arg(long, value_name = "SECS")]
    pub stall_timeout: Option<u64>,
    /// A RAM fault also fetches the rest of its aligned group of N pages: fewer round trips
    /// on a high-latency link, more bytes. 0 (the default): sized from the measured round
    /// trip and bandwidth (1 on a LAN, up to 16 on a slow long link)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub memory_cluster: u32,
    /// Print the hypervisor command line and stop
    #[arg(long)]
    pub dry_run: bool,
    /// Name of this run [default: the capsule's name and a number]
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// QEMU binary
    #[arg(long, env = "CAPSULE_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Passed to the hypervisor as they are
    #[arg(last = true, value_name = "EXTRA")]
    pub extra: Vec<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SuspendArgs {
    /// The run: its id, its directory, or its QMP socket
    pub run: String,
    /// Name of the child capsule in the local store
    pub name: String,
    /// Then push it to capsule://HOST:PORT[/NAME]
    #[arg(long, value_name = "URL")]
    pub push: Option<String>,
    /// Save without shrinking the guest first (a baseline: the child then carries free RAM)
    #[arg(long)]
    pub no_balloon: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[arg(long)]
    pub json: bool,
}

/// What a run records for `suspend` (`run.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub capsule: String,
    pub capsule_id: String,
    pub mountpoint: PathBuf,
    pub qemu_pid: u32,
    pub run_pid: u32,
    pub qmp: PathBuf,
    /// Guest RAM is the mount's memory.raw (a suspend can keep it in place).
    pub memory_on_mount: bool,
    /// Hints a suspend writes into the child, so the resume starts the same machine.
    pub hints: BTreeMap<String, String>,
}

/// Where runs keep their state.
pub fn runs_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("CAPSULE_RUN_DIR") {
        return Ok(d.into());
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Ok(Path::new(&d).join("capsule/runs"));
    }
    // A predictable name in /tmp: anyone could have made it first (to plant a run.json
    // naming their own QMP socket, or to read guest serial logs).
    let uid = rustix::process::getuid().as_raw();
    let dir = PathBuf::from(format!("/tmp/capsule-runs-{uid}"));
    private_dir(&dir, uid)?;
    Ok(dir)
}

/// Makes `dir` 0700, or accepts it only if it is a real directory owned by `uid` that
/// nobody else can write (one merely readable by others is tightened to 0700).
fn private_dir(dir: &Path, uid: u32) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e).with_context(|| format!("creating {}", dir.display())),
        _ => {}
    }
    let m = std::fs::symlink_metadata(dir).with_context(|| format!("checking {}", dir.display()))?;
    let refuse = |why: String| anyhow::anyhow!("{} {why}; refusing to keep runs there (remove it, or set CAPSULE_RUN_DIR)", dir.display());
    if !m.file_type().is_dir() {
        return Err(refuse("is not a directory".into()));
    }
    if m.uid() != uid {
        return Err(refuse(format!("belongs to uid {}, not to uid {uid}", m.uid())));
    }
    if m.mode() & 0o022 != 0 {
        return Err(refuse(format!("is writable by others (mode {:o})", m.mode() & 0o7777)));
    }
    if m.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("chmod 700 {}", dir.display()))?;
    }
    Ok(())
}

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

/// QEMU, killed on drop unless it already exited (an error path must leave none behind).
struct Vm {
    child: Child,
    done: Option<std::process::ExitStatus>,
}

impl Vm {
    /// The exit status if QEMU ends within `limit`.
    fn exited_within(&mut self, limit: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.done = Some(status);
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_exit(&mut self) -> Result<std::process::ExitStatus> {
        let status = self.child.wait()?;
        self.done = Some(status);
        Ok(status)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.done.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn mount_for_run(store: Option<&Path>, args: &RunArgs, dir: &Path) -> Result<RunMount> {
    let given = Path::new(&args.source);
    if given.join(".capsule/info.json").exists() {
        return Ok(RunMount { dir: given.canonicalize()?, ours: false });
    }
    let mnt = dir.join("mnt");
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
    if let Some(mode) = args.prefetch {
        cmd.arg("--prefetch").arg(match mode {
            crate::PrefetchMode::None => "none",
            crate::PrefetchMode::Profile => "profile",
            crate::PrefetchMode::All => "all",
            crate::PrefetchMode::Memory => "memory",
        });
    }
    if let Some(p) = &args.profile {
        cmd.arg("--profile").arg(p);
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
    if let Some(f) = &args.conn.server_fingerprint {
        cmd.arg("--server-fingerprint").arg(f);
    }
    let out = cmd.stdin(Stdio::null()).output().context("starting capsule mount")?;
    if !out.status.success() {
        bail!("mounting {}: {}", args.source, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(RunMount { dir: mnt.canonicalize()?, ours: true })
}

/// KVM works here? Probed once per host boot (a broken KVM costs the probe's 5 s).
fn kvm_usable(root: &Path, qemu: &Path, kernel: Option<&Path>) -> bool {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let memo = root.join(format!("kvm-probe-{}", boot_id.trim()));
    if let Ok(s) = std::fs::read_to_string(&memo) {
        return s.trim() == "kvm";
    }
    let works = match kernel {
        Some(k) => capsule_vmm_glue::qemu::kvm_works(qemu, k, Duration::from_secs(5)),
        // Nothing to boot as a probe: trust the device node.
        None => std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok(),
    };
    let _ = std::fs::create_dir_all(root);
    let _ = std::fs::write(&memo, if works { "kvm" } else { "tcg" });
    if !works {
        eprintln!("capsule: KVM does not run guests here; using TCG (slower)");
    }
    works
}

fn new_run_id(capsule: &str) -> String {
    let base: String = capsule.rsplit('/').next().unwrap_or("vm").chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    format!("{base}-{}", std::process::id())
}

pub fn run(store: Option<PathBuf>, args: RunArgs) -> Result<ExitCode> {
    let root = runs_dir()?;
    let id = args.id.clone().unwrap_or_else(|| new_run_id(&args.source));
    let dir = root.join(&id);
    if dir.join("run.json").exists() {
        let rec: Option<RunRecord> = std::fs::read(dir.join("run.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if rec.is_some_and(|r| Path::new(&format!("/proc/{}", r.run_pid)).exists()) {
            bail!("a run named {id} is already going ({}); pick another --id", dir.display());
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_in(store.as_deref(), &args, &id, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(store: Option<&Path>, args: &RunArgs, id: &str, dir: &Path) -> Result<ExitCode> {
    // From the start: a Ctrl-C while mounting or resuming must still stop QEMU and unmount.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let mount = mount_for_run(store, args, dir)?;
    let mnt = mount.dir.clone();
    let vm: Value = serde_json::from_slice(&std::fs::read(mnt.join("capsule.json")).context("reading the mount's capsule.json")?)?;
    let info: MountInfo = serde_json::from_slice(&std::fs::read(mnt.join(".capsule/info.json"))?)?;
    let hints: BTreeMap<String, String> = serde_json::from_value(vm["hints"].clone()).unwrap_or_default();
    let capsule_name = vm["capsule"].as_str().unwrap_or("?").to_string();
    let suspended = vm["suspended"].as_bool().unwrap_or(false);
    let hypervisor =
        args.hypervisor.unwrap_or(if vm["hypervisor"].as_str() == Some("cloud-hypervisor") { HypervisorArg::CloudHypervisor } else { HypervisorArg::Qemu });
    if hypervisor == HypervisorArg::CloudHypervisor {
        return crate::chv::run(args, &mnt, &vm, dir);
    }
    // Hints come from the capsule, that is from whoever made it: checked before any reaches QEMU.
    let qemu_hints = QemuHints::parse(&hints).with_context(|| format!("capsule {capsule_name} ({}): refusing to run it", args.source))?;
    let writable = info.overlay_dir.is_some();
    if !mount.ours && !args.no_fault_fix && info.kernel_readahead.is_some_and(|r| r > 0) {
        eprintln!("capsule: {} has kernel readahead on: each RAM fault reads ahead (mount it with --kernel-readahead 0)", mnt.display());
    }
    if suspended && !writable {
        bail!("{} is a suspended capsule: resuming needs a writable mount (its RAM is written in place)", args.source);
    }

    let exists = |name: &str| mnt.join(name).exists().then(|| mnt.join(name));
    let kernel = exists("vmlinuz");
    let capsule_mib = vm["memory_mib"].as_u64().unwrap_or(256);
    let memory_mib = args.memory.map_or(capsule_mib, |b| b >> 20);
    let ram_on_mount = std::fs::metadata(mnt.join("memory.raw")).is_ok_and(|m| m.len() == capsule_mib << 20);
    let memory_file = (writable && memory_mib == capsule_mib && ram_on_mount).then(|| mnt.join("memory.raw"));
    if suspended && memory_file.is_none() {
        bail!("resuming needs the capsule's RAM size ({capsule_mib} MiB); drop --memory");
    }
    let accel = match args.accel {
        AccelArg::Kvm => Accel::Kvm,
        AccelArg::Tcg => Accel::Tcg,
        AccelArg::Auto => match qemu_hints.accel.filter(|_| suspended) {
            Some(Accel::Tcg) => Accel::Tcg,
            _ if kvm_usable(dir.parent().unwrap_or(dir), &args.qemu, kernel.as_deref()) => Accel::Kvm,
            _ => Accel::Tcg,
        },
    };
    let append = if suspended {
        qemu_hints.append.clone()
    } else {
        let base = vm["cmdline"].as_str().unwrap_or("").to_string();
        Some(match &args.append {
            Some(extra) => format!("{base} {extra}").trim().to_string(),
            None => base,
        })
    };
    // A resumed guest never reads its boot files again (they sit in QEMU's fw_cfg for a
    // reboot, and -no-reboot ends the run instead), yet QEMU reads them whole at start:
    // 9.5 MiB of the test guest's, 38 s at 2 Mbit/s. Hand it stand-ins of the same size
    // with the real kernel header.
    let (kernel, initrd) = match (&kernel, suspended) {
        (Some(k), true) => {
            let (k, i) = boot_standins(dir, k, exists("initrd.img").as_deref())?;
            (Some(k), i)
        }
        _ => (kernel.clone(), exists("initrd.img")),
    };
    let disks: Vec<DiskFile> =
        vm["disks"].as_array().into_iter().flatten().filter_map(|d| d["file"].as_str()).map(|f| DiskFile { path: mnt.join(f), read_only: !writable }).collect();
    let serial_path = args.serial_log.clone().unwrap_or_else(|| dir.join("serial.log"));
    let config = QemuConfig {
        binary: args.qemu.clone(),
        accel,
        machine: qemu_hints.machine.clone().filter(|_| suspended).unwrap_or_else(|| "pc".into()),
        cpus: args.cpus.unwrap_or_else(|| vm["cpus"].as_u64().unwrap_or(1) as u32),
        memory_mib,
        memory_file: memory_file.clone(),
        disks,
        kernel: kernel.clone(),
        initrd: initrd.filter(|_| kernel.is_some()),
        append: append.filter(|_| kernel.is_some()),
        qmp_socket: dir.join("qmp.sock"),
        serial: if args.console { Serial::Terminal } else { Serial::File(serial_path.clone()) },
        incoming: suspended,
        extra: args.extra.clone(),
    };
    config.check().with_context(|| format!("capsule {capsule_name} ({})", args.source))?;
    if args.dry_run {
        println!("{}", config.shell_line());
        return Ok(ExitCode::SUCCESS);
    }
    if suspended && config.cpus != vm["cpus"].as_u64().unwrap_or(1) as u32 {
        bail!("resuming needs the capsule's {} vCPUs; drop --cpus", vm["cpus"]);
    }
    if !args.console {
        // A fresh log each run, so the echo shows this guest only.
        std::fs::write(&serial_path, b"").with_context(|| format!("creating {}", serial_path.display()))?;
    }
    tracing::info!("starting {}", config.shell_line());
    let mut cmd = if args.no_fault_fix {
        Command::new(&config.binary)
    } else {
        let mut c = Command::new(std::env::current_exe()?);
        c.arg(crate::LAUNCH_ARG).arg(&config.binary);
        c
    };
    cmd.args(config.args());
    if !args.console {
        // Its own process group: the terminal's Ctrl-C reaches `capsule run`, which stops
        // the guest in order, not QEMU directly.
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::null()).process_group(0);
    }
    let started = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {}", config.binary.display()))?;
    let mut vm_proc = Vm { child, done: None };
    let stop_echo = Arc::new(AtomicBool::new(false));
    let echo = (!args.console && !args.quiet).then(|| echo_serial(serial_path.clone(), stop_echo.clone()));

    let child = &mut vm_proc.child;
    let mut qmp = Qmp::connect_while(&config.qmp_socket, QMP_WAIT, || matches!(child.try_wait(), Ok(None)))
        .with_context(|| format!("starting {} (its own error, if any, is above)", config.binary.display()))?;
    let machine = qmp.resolve_machine(&config.machine)?;
    if suspended {
        let caps = qmp.migration_capabilities()?;
        let wanted: Vec<&str> = qemu_hints.capabilities.iter().map(String::as_str).collect();
        for c in &wanted {
            if !caps.iter().any(|k| k == c) {
                bail!("this QEMU ({}.{}.{}) lacks migration capability {c}, which saved this capsule", qmp.version.0, qmp.version.1, qmp.version.2);
            }
        }
        qmp.set_capabilities(&wanted)?;
        let devstate = mnt.join("devstate.bin");
        qmp.execute("migrate-incoming", Some(json!({ "uri": format!("exec:cat {}", capsule_vmm_glue::qemu::shell_quote(&devstate.display().to_string())) })))?;
        qmp.wait_migration(Duration::from_secs(600)).context("loading the device state")?;
        qmp.execute("cont", None)?;
        // The suspend shrank the guest to save less; give it all its RAM back. The pages
        // come back as holes in memory.raw: zero, nothing to fetch.
        if let Err(e) = qmp.execute("balloon", Some(json!({ "value": memory_mib << 20 }))) {
            tracing::warn!("cannot give the guest its RAM back: {e}");
        }
        eprintln!("capsule: resumed {} in {:.2} s", vm["capsule"].as_str().unwrap_or("?"), started.elapsed().as_secs_f64());
    }
    // Balloon statistics every 2 s, so a suspend knows what the guest really uses.
    if let Err(e) = qmp.execute("qom-set", Some(json!({"path": "/machine/peripheral/balloon0", "property": "guest-stats-polling-interval", "value": 2}))) {
        tracing::warn!("no balloon statistics: {e}");
    }
    let mut run_hints = BTreeMap::new();
    run_hints.insert("qemu.machine".to_string(), machine);
    run_hints.insert("qemu.accel".to_string(), accel.name().to_string());
    run_hints.insert("qemu.version".to_string(), format!("{}.{}.{}", qmp.version.0, qmp.version.1, qmp.version.2));
    if let Some(a) = &config.append {
        run_hints.insert("qemu.append".to_string(), a.clone());
    }
    drop(qmp);
    let record = RunRecord {
        id: id.to_string(),
        capsule: vm["capsule"].as_str().unwrap_or("").to_string(),
        capsule_id: info.capsule_id.to_hex(),
        mountpoint: mnt.clone(),
        qemu_pid: vm_proc.child.id(),
        run_pid: std::process::id(),
        qmp: config.qmp_socket.clone(),
        memory_on_mount: memory_file.is_some(),
        hints: run_hints,
    };
    std::fs::write(dir.join("run.json"), serde_json::to_vec_pretty(&record)?)?;
    eprintln!("capsule: running {} as {id} ({} under {}); suspend with: capsule suspend {id} NAME", record.capsule, mnt.display(), accel.name().to_uppercase());

    let status = wait_or_stop(&mut vm_proc, &config.qmp_socket, &stop)?;
    // A suspend in progress holds this lock until its commit is done.
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("suspend.lock"))?;
    lock.lock()?;
    stop_echo.store(true, Ordering::Relaxed);
    if let Some(h) = echo {
        let _ = h.join();
    }
    let suspended_as: Option<Value> = std::fs::read(dir.join("suspended.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let mut committed = suspended_as.is_some();
    if let Some(s) = &suspended_as {
        eprintln!("capsule: {id} suspended as {}", s["name"].as_str().unwrap_or("?"));
    } else if let Some(name) = &args.commit {
        let target = crate::open_store(store.map(Path::to_path_buf))?;
        capsule_fs::commit::complete_metadata(&mnt)?;
        let report = capsule_fs::commit::commit(&info, &target, name, &CommitOptions { state: MachineState::PoweredOff, hints: BTreeMap::new() })
            .with_context(|| format!("committing the run as {name}"))?;
        println!("committed {id} as {name} ({}): {} changed blocks, {} stored", report.id, report.changed_blocks, crate::human(report.stored_bytes));
        committed = true;
        if let Some(url) = &args.push {
            let report = crate::push(&target, name, url, &args.conn)?;
            crate::print_transfer(false, "pushed", name, &report, None)?;
        }
    }
    if let Some(line) = fetch_summary(&mnt, &vm) {
        eprintln!("capsule: {line}");
    }
    let overlay = info.overlay_dir.clone();
    let ours = mount.ours;
    drop(mount);
    // What the run changed now lives in the child: the next run of the parent starts clean.
    if committed && ours {
        if let Some(o) = overlay {
            let _ = std::fs::remove_dir_all(o);
        }
    }
    eprintln!("capsule: guest stopped ({status}) after {:.1} s", started.elapsed().as_secs_f64());
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8) })
}

/// "fetched 3.1 MiB of 128 MiB of disk (vmlinuz 7.9 MiB, ...); ..." from the mount's stats;
/// the disks are the ones `capsule.json` (`vm`) lists.
fn fetch_summary(mnt: &Path, vm: &Value) -> Option<String> {
    let disk_files: Vec<&str> = vm["disks"].as_array()?.iter().filter_map(|d| d["file"].as_str()).collect();
    let stats: Value = serde_json::from_slice(&std::fs::read(mnt.join(".capsule/stats.json")).ok()?).ok()?;
    let (mut disk, mut disk_size, mut other) = (0u64, 0u64, Vec::new());
    for (name, f) in stats["files"].as_object()? {
        let fetched = f["fetched_bytes"].as_u64().unwrap_or(0);
        let size = f["blocks"].as_u64().unwrap_or(0) * f["block_size"].as_u64().unwrap_or(0);
        if disk_files.contains(&name.as_str()) {
            disk += fetched;
            disk_size += size;
        } else {
            other.push(format!("{name} {}", crate::human(fetched)));
        }
    }
    Some(format!(
        "fetched {} of {} of disk ({}); {} on the wire ({} blocks) from {}",
        crate::human(disk),
        crate::human(disk_size),
        other.join(", "),
        crate::human(stats["bytes_fetched"].as_u64().unwrap_or(0)),
        stats["blocks_fetched"].as_u64().unwrap_or(0),
        stats["source"].as_str().unwrap_or("?")
    ))
}

/// Local stand-ins for a resume's kernel and initrd: the kernel's first 64 KiB (its setup
/// header, which QEMU parses) and then holes, the initrd all holes; sizes as the real ones.
fn boot_standins(dir: &Path, kernel: &Path, initrd: Option<&Path>) -> Result<(PathBuf, Option<PathBuf>)> {
    const HEADER: u64 = 64 << 10;
    let out = dir.join("boot-standin");
    std::fs::create_dir_all(&out)?;
    let k = out.join("vmlinuz");
    let size = std::fs::metadata(kernel)?.len();
    let mut header = Vec::new();
    std::fs::File::open(kernel)?.take(HEADER).read_to_end(&mut header).with_context(|| format!("reading {}", kernel.display()))?;
    std::fs::write(&k, &header)?;
    std::fs::OpenOptions::new().write(true).open(&k)?.set_len(size)?;
    let i = match initrd {
        Some(real) => {
            let path = out.join("initrd.img");
            std::fs::File::create(&path)?.set_len(std::fs::metadata(real)?.len())?;
            Some(path)
        }
        None => None,
    };
    Ok((k, i))
}

/// Waits for QEMU to exit. Ctrl-C or SIGTERM asks the guest to power off (ACPI), then
/// quits QEMU after 10 s (its disks are flushed either way), then kills it.
fn wait_or_stop(vm: &mut Vm, qmp_socket: &Path, stop: &AtomicBool) -> Result<std::process::ExitStatus> {
    while !stop.load(Ordering::Relaxed) {
        if let Some(status) = vm.exited_within(Duration::from_millis(100))? {
            return Ok(status);
        }
    }
    eprintln!("capsule: stopping the guest");
    for command in ["system_powerdown", "quit"] {
        if let Ok(mut q) = Qmp::connect(qmp_socket, Duration::from_secs(2)) {
            let _ = q.execute(command, None);
        }
        if let Some(status) = vm.exited_within(Duration::from_secs(10))? {
            return Ok(status);
        }
    }
    vm.child.kill()?;
    vm.wait_exit()
}

/// Echoes the serial log to stdout as it grows.
fn echo_serial(path: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
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

fn find_run(run: &str) -> Result<PathBuf> {
    let p = Path::new(run);
    let dir = if p.is_dir() {
        p.to_path_buf()
    } else if p.file_name().is_some_and(|n| n == "qmp.sock") && p.parent().is_some() {
        p.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        runs_dir()?.join(run)
    };
    if !dir.join("run.json").exists() {
        bail!("no run {run:?} (looked for {}); `capsule run` prints the id", dir.join("run.json").display());
    }
    Ok(dir)
}

/// The memory the guest could give up by its own account (its available memory, from the
/// balloon's statistics), if the driver reports it.
fn guest_available(qmp: &mut Qmp) -> Option<u64> {
    let stats = qmp.execute("qom-get", Some(json!({"path": "/machine/peripheral/balloon0", "property": "guest-stats"}))).ok()?;
    stats["stats"]["stat-available-memory"].as_i64().filter(|&v| v > 0).map(|v| v as u64)
}

/// Shrinks the guest to what it uses plus a margin, so free RAM is handed back (and
/// punched out of memory.raw) before the save. Never below use: a guest ballooned below
/// its working set dies of OOM.
fn balloon_down(qmp: &mut Qmp, ram: u64) -> Result<Option<(u64, u64)>> {
    let Some(avail) = guest_available(qmp) else {
        eprintln!("capsule: the guest reports no memory statistics (no virtio_balloon driver?): saving without ballooning");
        return Ok(None);
    };
    let margin = (64u64 << 20).max(avail / 4);
    let reclaim = avail.saturating_sub(margin);
    if reclaim < (8 << 20) {
        return Ok(None);
    }
    let target = ram - reclaim;
    qmp.execute("balloon", Some(json!({ "value": target })))?;
    // The guest gives pages back at its own pace: wait while it makes progress.
    let (mut last, mut last_change) = (ram, Instant::now());
    let start = Instant::now();
    loop {
        let actual = qmp.execute("query-balloon", None)?["actual"].as_u64().unwrap_or(ram);
        if actual <= target + (1 << 20) {
            return Ok(Some((target, actual)));
        }
        if actual < last {
            (last, last_change) = (actual, Instant::now());
        }
        if last_change.elapsed() > Duration::from_secs(10) || start.elapsed() > Duration::from_secs(120) {
            eprintln!("capsule: balloon stopped at {} MiB (asked {} MiB)", actual >> 20, target >> 20);
            return Ok(Some((target, actual)));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn suspend(store: Option<PathBuf>, args: SuspendArgs) -> Result<()> {
    let dir = find_run(&args.run)?;
    let rec: RunRecord = serde_json::from_slice(&std::fs::read(dir.join("run.json"))?).context("reading run.json")?;
    if !rec.memory_on_mount {
        bail!("run {}: its RAM is not on the mount (read-only mount or --memory): it cannot be suspended", rec.id);
    }
    capsule_images::manifest::check_name(&args.name)?;
    let target = crate::open_store(store)?;
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("suspend.lock"))?;
    lock.try_lock().map_err(|_| anyhow::anyhow!("run {} is already being suspended", rec.id))?;
    let info: MountInfo = serde_json::from_slice(&std::fs::read(rec.mountpoint.join(".capsule/info.json")).context("reading the run's mount")?)?;
    let t0 = Instant::now();

    let mut qmp = Qmp::connect(&rec.qmp, Duration::from_secs(5)).with_context(|| format!("run {}: QMP", rec.id))?;
    let ram = qmp.execute("query-balloon", None).ok().and_then(|b| b["actual"].as_u64()).unwrap_or(0);
    let ballooned = if args.no_balloon {
        None
    } else {
        match balloon_down(&mut qmp, ram) {
            Ok(b) => b,
            Err(e) => {
                let _ = qmp.execute("balloon", Some(json!({ "value": ram })));
                return Err(e.context(format!("shrinking run {} before the suspend; the guest was left running", rec.id)));
            }
        }
    };
    let t_balloon = t0.elapsed();

    let caps = qmp.migration_capabilities()?;
    let has = |c: &str| caps.iter().any(|k| k == c);
    // mapped-ram (QEMU 9+) would write RAM into a file with holes for zeros; with RAM
    // already on the mount x-ignore-shared is better still: RAM is not in the stream at all.
    let detected = json!({"x-ignore-shared": has("x-ignore-shared"), "mapped-ram": has("mapped-ram")});
    // RAM stays in memory.raw; only device state (and ROMs) go into the stream.
    let mut used_caps = Vec::new();
    if has("x-ignore-shared") {
        used_caps.push("x-ignore-shared");
    } else {
        eprintln!("capsule: this QEMU lacks x-ignore-shared: the whole RAM goes into the device state");
    }
    let devstate = dir.join("devstate.bin");
    let saved = (|| -> Result<()> {
        qmp.execute("stop", None)?;
        qmp.set_capabilities(&used_caps)?;
        let quoted = capsule_vmm_glue::qemu::shell_quote(&devstate.display().to_string());
        qmp.execute("migrate", Some(json!({ "uri": format!("exec:cat > {quoted}") })))?;
        qmp.wait_migration(Duration::from_secs(600)).context("saving the device state")?;
        Ok(())
    })();
    if let Err(e) = saved {
        // Nothing is lost: the guest goes on running, with its RAM back.
        let _ = qmp.execute("cont", None);
        if ram > 0 {
            let _ = qmp.execute("balloon", Some(json!({ "value": ram })));
        }
        return Err(e.context(format!("suspending run {}; the guest was left running", rec.id)));
    }
    // Guest RAM writes sit in the page cache of the shared mapping: push them to the
    // mount (the VM is stopped, nothing changes them now).
    for (file, _) in &info.files {
        let path = rec.mountpoint.join(file);
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
            f.sync_all().with_context(|| format!("flushing {}", path.display()))?;
        }
    }
    let _ = qmp.execute("quit", None);
    drop(qmp);
    crate::mount::wait_gone(rec.qemu_pid, Duration::from_secs(30));
    let t_save = t0.elapsed() - t_balloon;

    let mut hints = rec.hints.clone();
    hints.insert("qemu.capabilities".into(), used_caps.join(","));
    hints.insert("suspended_unix".into(), capsule_fs::mount::now_unix().to_string());
    capsule_fs::commit::complete_metadata(&rec.mountpoint)?;
    let report = capsule_fs::commit::commit(&info, &target, &args.name, &CommitOptions { state: MachineState::Suspended(devstate.clone()), hints })
        .with_context(|| format!("committing the suspended run as {}", args.name))?;
    let devstate_bytes = std::fs::metadata(&devstate).map(|m| m.len()).unwrap_or(0);
    std::fs::write(dir.join("suspended.json"), serde_json::to_vec(&json!({"name": args.name, "id": report.id.to_hex()}))?)?;
    let t_commit = t0.elapsed() - t_balloon - t_save;
    if let Some(url) = &args.push {
        let pushed = crate::push(&target, &args.name, url, &args.conn)?;
        crate::print_transfer(false, "pushed", &args.name, &pushed, None)?;
    }
    let t_total = t0.elapsed();
    drop(lock);
    let out = json!({
        "name": args.name, "id": report.id.to_hex(), "parent": rec.capsule_id,
        "changed_blocks": report.changed_blocks, "memory_blocks": report.memory_blocks, "stored_bytes": report.stored_bytes,
        "devstate_bytes": devstate_bytes,
        "qemu_capabilities": detected,
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
            crate::human(report.stored_bytes),
            crate::human(devstate_bytes),
            t_total.as_secs_f64(),
            ballooned.map(|(t, a)| format!(" (ballooned to {} MiB, asked {})", a >> 20, t >> 20)).unwrap_or_default()
        );
    }
    Ok(())
}

/// `capsule ps`: the runs on this machine.
pub fn ps(json: bool) -> Result<()> {
    let mut runs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(runs_dir()?) {
        for e in entries.flatten() {
            let Ok(bytes) = std::fs::read(e.path().join("run.json")) else { continue };
            let Ok(rec) = serde_json::from_slice::<RunRecord>(&bytes) else { continue };
            let alive = Path::new(&format!("/proc/{}", rec.qemu_pid)).exists();
            runs.push((rec, alive));
        }
    }
    runs.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    if json {
        let list: Vec<Value> = runs.iter().map(|(r, alive)| json!({"run": r, "running": alive})).collect();
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
