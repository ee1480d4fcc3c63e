//! A QEMU VM session: every QMP step of a capsule's life, in one place.
//!
//! ```text
//!  capsule run       Session::start ─► (resume: migrate-incoming devstate, cont, balloon up)
//!                    ─► balloon stats on ─► run.json ─► wait_or_stop (powerdown, quit, kill)
//!  capsule suspend   Control::connect ─► balloon_to_use (down to what the guest uses)
//!                    ─► save (stop, x-ignore-shared, migrate to devstate; on failure:
//!                    cont and balloon back, the guest keeps running) ─► quit
//! ```
//! The two halves run in different processes (QEMU serves one QMP client at a time): a
//! [`Session`] owns the QEMU process and holds QMP only while it sets the machine up; a
//! [`Control`] is the suspend's connection to a running session.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::qemu::{Accel, QemuConfig, QemuHints};
use crate::qmp::{Command, Qmp};

/// How long QEMU may take to create its QMP socket.
const QMP_WAIT: Duration = Duration::from_secs(30);
/// Longest a device state save or load may take.
const MIGRATION_LIMIT: Duration = Duration::from_secs(600);
/// Migration capabilities a save turns on when this QEMU has them: with RAM already on the
/// mount, x-ignore-shared keeps it out of the stream altogether.
const SAVE_CAPABILITIES: &[&str] = &["x-ignore-shared"];

/// How QEMU is started: its binary directly, or through a wrapper that then execs it
/// (`capsule __launch-qemu`, which installs the no-hugepage filter first).
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Program and leading arguments run instead of the binary; the binary and its
    /// arguments follow them.
    pub wrapper: Option<(PathBuf, Vec<OsString>)>,
    /// The guest console on this terminal: QEMU keeps stdin and the terminal's signals.
    pub terminal: bool,
}

/// A running QEMU; killed on drop unless it already exited (an error path leaves none behind).
#[derive(Debug)]
pub struct Session {
    child: Child,
    done: Option<ExitStatus>,
    qmp_socket: PathBuf,
    qmp: Option<Qmp>,
    /// The versioned machine type the configured one stands for (`pc` → `pc-i440fx-7.2`).
    pub machine: String,
    /// QEMU's version: (major, minor, micro).
    pub version: (u64, u64, u64),
}

impl Session {
    /// Starts QEMU for `config` and connects to its QMP socket. An error names the binary
    /// (QEMU's own message, if any, is on stderr).
    pub fn start(config: &QemuConfig, launch: &Launch) -> Result<Self> {
        config.check()?;
        let mut cmd = match &launch.wrapper {
            Some((program, args)) => {
                let mut c = Process::new(program);
                c.args(args).arg(&config.binary);
                c
            }
            None => Process::new(&config.binary),
        };
        cmd.args(config.args());
        if !launch.terminal {
            // Its own process group: the terminal's Ctrl-C reaches `capsule run`, which
            // stops the guest in order, not QEMU directly.
            use std::os::unix::process::CommandExt;
            cmd.stdin(Stdio::null()).process_group(0);
        }
        let child = cmd.spawn().map_err(|e| Error::io(format!("starting {}", config.binary.display()), e))?;
        let mut session = Session { child, done: None, qmp_socket: config.qmp_socket.clone(), qmp: None, machine: String::new(), version: (0, 0, 0) };
        let child = &mut session.child;
        let mut qmp = Qmp::connect_while(&config.qmp_socket, QMP_WAIT, || matches!(child.try_wait(), Ok(None)))
            .map_err(|e| e.context(format!("starting {} (its own error, if any, is above)", config.binary.display())))?;
        session.machine = qmp.resolve_machine(&config.machine)?;
        session.version = qmp.version;
        session.qmp = Some(qmp);
        Ok(session)
    }

    /// Adopts a QEMU someone else started, given its QMP socket (tests; a peer that speaks QMP).
    pub fn attach(child: Child, qmp_socket: &Path, machine_alias: &str) -> Result<Self> {
        let mut qmp = Qmp::connect(qmp_socket, QMP_WAIT)?;
        let machine = qmp.resolve_machine(machine_alias)?;
        let version = qmp.version;
        Ok(Session { child, done: None, qmp_socket: qmp_socket.to_path_buf(), qmp: Some(qmp), machine, version })
    }

    fn qmp(&mut self) -> Result<&mut Qmp> {
        if self.qmp.is_none() {
            self.qmp = Some(Qmp::connect(&self.qmp_socket, Duration::from_secs(5))?);
        }
        self.qmp.as_mut().ok_or_else(|| Error::new(ErrorKind::Io, "QMP"))
    }

    /// Loads the device state a suspend saved (QEMU started with `incoming`), turns on the
    /// migration capabilities that saved it, runs the guest and gives it back all of its
    /// `memory_bytes` (the suspend shrank it; the pages come back as holes: zero, nothing
    /// to fetch).
    pub fn resume(&mut self, devstate: &Path, capabilities: &[String], memory_bytes: u64) -> Result<()> {
        let qmp = self.qmp()?;
        let have = qmp.migration_capabilities()?;
        for c in capabilities {
            if !have.contains(c) {
                let (a, b, m) = qmp.version;
                return Err(Error::new(ErrorKind::Unsupported, format!("this QEMU ({a}.{b}.{m}) lacks migration capability {c}, which saved this capsule")));
            }
        }
        let wanted: Vec<&str> = capabilities.iter().map(String::as_str).collect();
        qmp.set_capabilities(&wanted)?;
        qmp.run(Command::MigrateIncomingFromFile(devstate))?;
        qmp.wait_migration(MIGRATION_LIMIT).map_err(|e| e.context("loading the device state"))?;
        qmp.run(Command::Cont)?;
        if let Err(e) = qmp.run(Command::Balloon { bytes: memory_bytes }) {
            tracing::warn!("cannot give the guest its RAM back: {e}");
        }
        Ok(())
    }

    /// Balloon statistics every `seconds`, so a suspend knows what the guest really uses.
    pub fn poll_balloon_stats(&mut self, seconds: u32) -> Result<()> {
        self.qmp()?.run(Command::BalloonStatsInterval { seconds })?;
        Ok(())
    }

    /// The hints a suspend of this session writes into the child, so a resume starts the
    /// same machine (capabilities are the suspend's to add).
    pub fn hints(&self, accel: Accel, append: Option<&str>) -> QemuHints {
        let (a, b, m) = self.version;
        QemuHints {
            machine: Some(self.machine.clone()),
            accel: Some(accel),
            append: append.map(String::from),
            capabilities: Vec::new(),
            version: Some(format!("{a}.{b}.{m}")),
        }
    }

    /// Lets go of QMP, so `capsule suspend` (another process) can connect.
    pub fn release_qmp(&mut self) {
        self.qmp = None;
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if QEMU ends within `limit`.
    pub fn exited_within(&mut self, limit: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| Error::io("waiting for QEMU", e))? {
                self.done = Some(status);
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for QEMU to exit. Once `stop` is set (Ctrl-C, SIGTERM, `capsule stop`) asks the
    /// guest to power off (ACPI), then quits QEMU after `grace` (its disks are flushed
    /// either way), then kills it. `on_stop` runs once, when the stop begins.
    pub fn wait_or_stop(&mut self, stop: &AtomicBool, grace: Duration, on_stop: impl FnOnce()) -> Result<ExitStatus> {
        self.release_qmp();
        while !stop.load(Ordering::Relaxed) {
            if let Some(status) = self.exited_within(Duration::from_millis(100))? {
                return Ok(status);
            }
        }
        on_stop();
        for command in [Command::SystemPowerdown, Command::Quit] {
            if let Ok(mut q) = Qmp::connect(&self.qmp_socket, Duration::from_secs(2)) {
                let _ = q.run(command);
            }
            if let Some(status) = self.exited_within(grace)? {
                return Ok(status);
            }
        }
        let _ = self.child.kill();
        let status = self.child.wait().map_err(|e| Error::io("waiting for QEMU", e))?;
        self.done = Some(status);
        Ok(status)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.done.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How long a balloon may take to deflate the guest.
#[derive(Debug, Clone, Copy)]
pub struct BalloonPatience {
    /// Give up when the guest gave nothing back for this long.
    pub stalled: Duration,
    /// Give up after this long in any case.
    pub limit: Duration,
    /// Between two looks at the balloon.
    pub poll: Duration,
}

impl Default for BalloonPatience {
    fn default() -> Self {
        Self { stalled: Duration::from_secs(10), limit: Duration::from_secs(120), poll: Duration::from_millis(200) }
    }
}

/// What ballooning before a save did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balloon {
    /// Not asked for.
    Skipped,
    /// The guest reports no memory statistics (no virtio_balloon driver).
    NoStatistics,
    /// Less than 8 MiB to gain.
    NotWorthIt,
    /// Asked for `target` bytes; the guest came down to `reached` (above `target` if it stalled).
    Shrunk {
        /// Bytes asked for.
        target: u64,
        /// Bytes the guest came down to.
        reached: u64,
    },
}

/// Migration capabilities this QEMU has that a save could use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SaveCapabilities {
    /// RAM on a shared file stays out of the stream.
    #[serde(rename = "x-ignore-shared")]
    pub x_ignore_shared: bool,
    /// RAM written into a file with holes for zeros (QEMU 9+; unused: x-ignore-shared is better).
    #[serde(rename = "mapped-ram")]
    pub mapped_ram: bool,
}

/// A saved machine: what the device state needs at resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Capabilities turned on for the save (a resume must turn on the same).
    pub capabilities: Vec<String>,
    /// What this QEMU offered.
    pub detected: SaveCapabilities,
}

/// A suspend's QMP connection to a running session.
#[derive(Debug)]
pub struct Control {
    qmp: Qmp,
    /// Guest RAM when the suspend began (what a failed suspend gives back), in bytes.
    ram: u64,
}

impl Control {
    /// Connects to a session's QMP socket.
    pub fn connect(socket: &Path) -> Result<Self> {
        let mut qmp = Qmp::connect(socket, Duration::from_secs(5))?;
        let ram = qmp.balloon_actual().unwrap_or(0);
        Ok(Self { qmp, ram })
    }

    /// Shrinks the guest to what it uses plus a margin (a quarter of what it has
    /// available, at least 64 MiB), so free RAM is handed back (and punched out of
    /// memory.raw) before the save. Never below use: a guest ballooned below its working
    /// set dies of OOM. On error the guest gets its RAM back.
    pub fn balloon_to_use(&mut self, patience: BalloonPatience) -> Result<Balloon> {
        let r = self.balloon_down(patience);
        if r.is_err() && self.ram > 0 {
            let _ = self.qmp.run(Command::Balloon { bytes: self.ram });
        }
        r
    }

    fn balloon_down(&mut self, patience: BalloonPatience) -> Result<Balloon> {
        let Some(avail) = self.qmp.guest_available() else { return Ok(Balloon::NoStatistics) };
        let margin = (64u64 << 20).max(avail / 4);
        let reclaim = avail.saturating_sub(margin);
        if reclaim < (8 << 20) || self.ram <= reclaim {
            return Ok(Balloon::NotWorthIt);
        }
        let target = self.ram - reclaim;
        self.qmp.run(Command::Balloon { bytes: target })?;
        // The guest gives pages back at its own pace: wait while it makes progress.
        let (mut last, mut last_change, start) = (self.ram, Instant::now(), Instant::now());
        loop {
            let actual = self.qmp.balloon_actual()?;
            if actual <= target + (1 << 20) || last_change.elapsed() > patience.stalled || start.elapsed() > patience.limit {
                return Ok(Balloon::Shrunk { target, reached: actual });
            }
            if actual < last {
                (last, last_change) = (actual, Instant::now());
            }
            std::thread::sleep(patience.poll);
        }
    }

    /// Pauses the guest and saves its device state to `devstate` (RAM stays in the mount's
    /// memory.raw when this QEMU has x-ignore-shared). On failure the guest runs again with
    /// its RAM back: nothing is lost.
    pub fn save(&mut self, devstate: &Path) -> Result<Saved> {
        let have = self.qmp.migration_capabilities()?;
        let detected = SaveCapabilities { x_ignore_shared: have.iter().any(|c| c == "x-ignore-shared"), mapped_ram: have.iter().any(|c| c == "mapped-ram") };
        let used: Vec<&str> = SAVE_CAPABILITIES.iter().copied().filter(|c| have.iter().any(|h| h == c)).collect();
        let saved = (|| -> Result<()> {
            self.qmp.run(Command::Stop)?;
            self.qmp.set_capabilities(&used)?;
            self.qmp.run(Command::MigrateToFile(devstate))?;
            self.qmp.wait_migration(MIGRATION_LIMIT).map_err(|e| e.context("saving the device state"))?;
            Ok(())
        })();
        if let Err(e) = saved {
            let _ = self.qmp.run(Command::Cont);
            if self.ram > 0 {
                let _ = self.qmp.run(Command::Balloon { bytes: self.ram });
            }
            return Err(e);
        }
        Ok(Saved { capabilities: used.into_iter().map(String::from).collect(), detected })
    }

    /// Ends QEMU (after a save: its state is on disk).
    pub fn quit(mut self) {
        let _ = self.qmp.run(Command::Quit);
    }
}

/// Local stand-ins for a resume's kernel and initrd, in `dir`: the kernel's first 64 KiB
/// (its setup header, which QEMU parses) and then holes, the initrd all holes; sizes as the
/// real ones. A resumed guest never reads its boot files again (they sit in fw_cfg for a
/// reboot, and -no-reboot ends the run instead), yet QEMU reads them whole at start: 9.5 MiB
/// of the test guest's, 38 s at 2 Mbit/s.
pub fn boot_standins(dir: &Path, kernel: &Path, initrd: Option<&Path>) -> Result<(PathBuf, Option<PathBuf>)> {
    const HEADER: u64 = 64 << 10;
    fn io(what: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
        move |e| Error::io(what.display(), e)
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let k = dir.join("vmlinuz");
    let size = std::fs::metadata(kernel).map_err(io(kernel))?.len();
    let mut header = Vec::new();
    std::fs::File::open(kernel).and_then(|f| f.take(HEADER).read_to_end(&mut header)).map_err(io(kernel))?;
    std::fs::write(&k, &header).and_then(|_| std::fs::OpenOptions::new().write(true).open(&k)?.set_len(size)).map_err(io(&k))?;
    let i = match initrd {
        Some(real) => {
            let path = dir.join("initrd.img");
            let len = std::fs::metadata(real).map_err(io(real))?.len();
            std::fs::File::create(&path).and_then(|f| f.set_len(len)).map_err(io(&path))?;
            Some(path)
        }
        None => None,
    };
    Ok((k, i))
}

fn kvm_memo(memo_dir: &Path) -> PathBuf {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    memo_dir.join(format!("kvm-probe-{}", boot_id.trim()))
}

/// What [`kvm_usable`] found on this host boot, if it probed.
pub fn kvm_remembered(memo_dir: &Path) -> Option<bool> {
    std::fs::read_to_string(kvm_memo(memo_dir)).ok().map(|s| s.trim() == "kvm")
}

/// `/dev/kvm` opens (it may still not run a guest: see [`kvm_usable`]).
pub fn kvm_device_opens() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// Whether KVM runs guests here, probed once per host boot and remembered in `memo_dir`
/// (a broken KVM costs the probe's 5 s). Returns (usable, probed now).
pub fn kvm_usable(memo_dir: &Path, qemu: &Path, kernel: Option<&Path>) -> (bool, bool) {
    if let Some(known) = kvm_remembered(memo_dir) {
        return (known, false);
    }
    let memo = kvm_memo(memo_dir);
    let works = match kernel {
        Some(k) => crate::qemu::kvm_works(qemu, k, Duration::from_secs(5)),
        // Nothing to boot as a probe: trust the device node.
        None => kvm_device_opens(),
    };
    let _ = std::fs::create_dir_all(memo_dir);
    let _ = std::fs::write(&memo, if works { "kvm" } else { "tcg" });
    (works, true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::qmp::test_peer::{expect, Peer};

    const MIB: u64 = 1 << 20;

    fn fast() -> BalloonPatience {
        BalloonPatience { stalled: Duration::from_millis(300), limit: Duration::from_secs(5), poll: Duration::from_millis(10) }
    }

    #[test]
    fn suspend_balloons_to_use_then_saves_without_ram_in_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let devstate = dir.path().join("dev state.bin");
        let peer = Peer::spawn(
            &sock,
            vec![
                expect("query-balloon", r#"{"return": {"actual": 268435456}}"#),
                // 200 MiB available: keep a quarter (50 MiB, so 64 MiB), give back 136 MiB.
                expect("qom-get", r#"{"return": {"stats": {"stat-available-memory": 209715200}}}"#),
                expect("balloon", r#"{"return": {}}"#),
                expect("query-balloon", r#"{"return": {"actual": 200000000}}"#),
                expect("query-balloon", r#"{"return": {"actual": 125829120}}"#),
                expect(
                    "query-migrate-capabilities",
                    r#"{"return": [{"capability": "xbzrle", "state": false}, {"capability": "x-ignore-shared", "state": false}]}"#,
                ),
                expect("stop", r#"{"return": {}}"#),
                expect("migrate-set-capabilities", r#"{"return": {}}"#),
                expect("migrate", r#"{"return": {}}"#),
                expect("query-migrate", r#"{"return": {"status": "active"}}"#),
                expect("query-migrate", r#"{"return": {"status": "completed"}}"#),
                expect("quit", r#"{"return": {}}"#),
            ],
        );
        let mut c = Control::connect(&sock).unwrap();
        let b = c.balloon_to_use(fast()).unwrap();
        assert_eq!(b, Balloon::Shrunk { target: 256 * MIB - 136 * MIB, reached: 120 * MIB });
        let saved = c.save(&devstate).unwrap();
        assert_eq!(saved.capabilities, ["x-ignore-shared"]);
        assert_eq!(saved.detected, SaveCapabilities { x_ignore_shared: true, mapped_ram: false });
        c.quit();
        let sent = peer.join();
        assert_eq!(sent[2]["arguments"], serde_json::json!({"path": "/machine/peripheral/balloon0", "property": "guest-stats"}));
        assert_eq!(sent[3]["arguments"]["value"], 120 * MIB);
        assert_eq!(sent[8]["arguments"]["capabilities"], serde_json::json!([{"capability": "x-ignore-shared", "state": true}]));
        assert_eq!(sent[9]["arguments"]["uri"], format!("exec:cat > '{}'", devstate.display()));
    }

    #[test]
    fn a_failed_save_leaves_the_guest_running_with_its_ram() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let peer = Peer::spawn(
            &sock,
            vec![
                expect("query-balloon", r#"{"return": {"actual": 268435456}}"#),
                expect("qom-get", r#"{"error": {"class": "GenericError", "desc": "guest stats not available"}}"#),
                expect("query-migrate-capabilities", r#"{"return": []}"#),
                expect("stop", r#"{"return": {}}"#),
                expect("migrate", r#"{"return": {}}"#),
                expect("query-migrate", r#"{"return": {"status": "failed", "error-desc": "disk full"}}"#),
                expect("cont", r#"{"return": {}}"#),
                expect("balloon", r#"{"return": {}}"#),
            ],
        );
        let mut c = Control::connect(&sock).unwrap();
        assert_eq!(c.balloon_to_use(fast()).unwrap(), Balloon::NoStatistics);
        let err = c.save(&dir.path().join("devstate.bin")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Qmp);
        assert!(err.to_string().contains("saving the device state") && err.to_string().contains("disk full"), "{err}");
        drop(c);
        let sent = peer.join();
        assert_eq!(sent.last().unwrap()["arguments"]["value"], 256 * MIB, "the guest gets its RAM back");
    }

    #[test]
    fn resume_loads_state_with_the_savers_capabilities_and_refuses_a_qemu_without_them() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let devstate = dir.path().join("devstate.bin");
        let peer = Peer::spawn(
            &sock,
            vec![
                expect("query-machines", r#"{"return": [{"name": "pc-i440fx-7.2", "alias": "pc"}, {"name": "pc-q35-7.2", "alias": "q35"}]}"#),
                expect("query-migrate-capabilities", r#"{"return": [{"capability": "x-ignore-shared", "state": false}]}"#),
                expect("migrate-set-capabilities", r#"{"return": {}}"#),
                expect("migrate-incoming", r#"{"return": {}}"#),
                expect("query-migrate", r#"{"return": {"status": "completed"}}"#),
                expect("cont", r#"{"return": {}}"#),
                expect("balloon", r#"{"return": {}}"#),
                expect("qom-set", r#"{"return": {}}"#),
            ],
        );
        let sleeper = Process::new("sleep").arg("30").spawn().unwrap();
        let mut s = Session::attach(sleeper, &sock, "pc").unwrap();
        assert_eq!(s.machine, "pc-i440fx-7.2");
        s.resume(&devstate, &["x-ignore-shared".to_string()], 256 * MIB).unwrap();
        s.poll_balloon_stats(2).unwrap();
        let hints = s.hints(Accel::Tcg, Some("console=ttyS0"));
        assert_eq!(hints.to_map().get("qemu.machine").map(String::as_str), Some("pc-i440fx-7.2"));
        assert_eq!(hints.version.as_deref(), Some("7.2.22"));
        s.release_qmp();
        let sent = peer.join();
        assert_eq!(sent[4]["arguments"]["uri"], format!("exec:cat {}", devstate.display()));
        assert_eq!(sent[7]["arguments"]["value"], 256 * MIB);
        assert_eq!(sent[8]["arguments"], serde_json::json!({"path": "/machine/peripheral/balloon0", "property": "guest-stats-polling-interval", "value": 2}));
        drop(s); // kills the sleeper

        let peer = Peer::spawn(
            &sock,
            vec![
                expect("query-machines", r#"{"return": [{"name": "pc-i440fx-7.2", "alias": "pc"}]}"#),
                expect("query-migrate-capabilities", r#"{"return": []}"#),
            ],
        );
        let mut s = Session::attach(Process::new("sleep").arg("30").spawn().unwrap(), &sock, "pc").unwrap();
        let err = s.resume(&devstate, &["x-ignore-shared".to_string()], 256 * MIB).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("lacks migration capability x-ignore-shared"), "{err}");
        drop(s);
        peer.join();
    }

    #[test]
    fn stop_powers_down_then_quits() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let peer = Peer::spawn(&sock, vec![expect("query-machines", r#"{"return": [{"name": "pc-i440fx-7.2", "alias": "pc"}]}"#)]);
        let mut s = Session::attach(Process::new("sleep").arg("30").spawn().unwrap(), &sock, "pc").unwrap();
        peer.join();
        // The guest ignores the power button; quit ends it (here: the peer kills the sleeper).
        let pid = s.pid();
        let peer = Peer::spawn(&sock, vec![expect("system_powerdown", r#"{"return": {}}"#)]);
        let peer2 = std::thread::spawn({
            let sock = sock.clone();
            move || {
                let sent = peer.join();
                let p = Peer::spawn(&sock, vec![expect("quit", r#"{"return": {}}"#)]);
                let got = p.join();
                let _ = Process::new("kill").arg(pid.to_string()).status();
                (sent, got)
            }
        });
        let stop = AtomicBool::new(true);
        let mut stopping = false;
        let status = s.wait_or_stop(&stop, Duration::from_millis(300), || stopping = true).unwrap();
        assert!(stopping && !status.success());
        let (a, b) = peer2.join().unwrap();
        assert_eq!(a[1]["execute"], "system_powerdown");
        assert_eq!(b[1]["execute"], "quit");
    }
}
