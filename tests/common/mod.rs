//! Helpers shared by the end-to-end tests: run the real `capsule` binary on real files.
#![allow(dead_code, clippy::unwrap_used)]

pub mod garage;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The built `capsule` binary with `--store STORE`.
pub fn capsule(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capsule"));
    c.arg("--store").arg(store);
    c
}

/// Runs and returns (success, stdout + stderr).
pub fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().expect("spawn capsule");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out, text)
}

/// Runs and panics with the output unless it succeeded.
pub fn ok(cmd: &mut Command) -> String {
    let (out, text) = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

/// Runs, expects failure with exit code 1 (an error, not a panic), returns the output.
pub fn fails(cmd: &mut Command) -> String {
    fails_with(cmd, 1)
}

/// Runs `cmd`, expecting exit code `code` (3: `verify` found damage) and no panic.
pub fn fails_with(cmd: &mut Command, code: i32) -> String {
    let (out, text) = run(cmd);
    assert_eq!(out.status.code(), Some(code), "{cmd:?} should fail cleanly with {code}:\n{text}");
    assert!(!text.contains("panicked"), "{cmd:?} panicked:\n{text}");
    text
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for hundreds of MiB.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The test guest built by `make guest` (tests/guest/build.sh).
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("CAPSULE_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest"));
    assert!(dir.join(".complete").exists(), "test guest missing at {}: run `make guest` (make test does it for you)", dir.display());
    dir
}

/// `capsule inspect NAME --json`.
pub fn inspect(store: &Path, name: &str) -> serde_json::Value {
    let text = ok(capsule(store).args(["inspect", name, "--json"]));
    serde_json::from_str(&text).expect("inspect --json output")
}

/// Runs an external tool and panics with its output unless it succeeded.
pub fn tool(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// A block where a store keeps it: a file of its own (`blocks/ab/<hash>`) or a span of a
/// pack (`packed/*.pack`, found by a reader of the test's own: the index's entries of hash,
/// offset and length (u64, u32 LE), 44 bytes each, end 56 bytes before the file's end,
/// where the footer begins with the index's offset and count).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoredBlock {
    pub hash: String,
    pub file: PathBuf,
    pub offset: u64,
    pub len: u64,
}

impl StoredBlock {
    /// The block's stored encoding.
    pub fn read(&self) -> Vec<u8> {
        let bytes = std::fs::read(&self.file).unwrap();
        bytes[self.offset as usize..(self.offset + self.len) as usize].to_vec()
    }

    /// Puts `encoding` (of the same length) where the block is.
    pub fn write(&self, encoding: &[u8]) {
        assert_eq!(encoding.len() as u64, self.len, "a block is rewritten in place");
        let mut bytes = std::fs::read(&self.file).unwrap();
        bytes[self.offset as usize..(self.offset + self.len) as usize].copy_from_slice(encoding);
        std::fs::write(&self.file, bytes).unwrap();
    }

    /// Flips the bits of `mask` in byte `at` of the block's encoding.
    pub fn flip(&self, at: usize, mask: u8) {
        let mut enc = self.read();
        enc[at] ^= mask;
        self.write(&enc);
    }
}

/// Every block a store holds, in files and packs, sorted by hash.
pub fn stored_blocks(store: &Path) -> Vec<StoredBlock> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(store.join("blocks")).unwrap().flatten() {
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(StoredBlock { hash: f.file_name().to_string_lossy().into_owned(), file: f.path(), offset: 0, len });
        }
    }
    for f in std::fs::read_dir(store.join("packed")).into_iter().flatten().flatten() {
        if f.path().extension().is_none_or(|x| x != "pack") {
            continue;
        }
        let bytes = std::fs::read(f.path()).unwrap();
        let footer = bytes.len() - 56;
        let le = |at: usize, n: usize| bytes[at..at + n].iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
        let (index, count) = (le(footer, 8) as usize, le(footer + 8, 8) as usize);
        for e in bytes[index..index + 44 * count].chunks(44) {
            let hash = e[..32].iter().map(|b| format!("{b:02x}")).collect();
            let at = index + (e.as_ptr() as usize - bytes[index..].as_ptr() as usize);
            out.push(StoredBlock { hash, file: f.path(), offset: le(at + 32, 8), len: le(at + 40, 4) });
        }
    }
    out.sort();
    out
}

/// Where `store` keeps the block named `hash` (panics if it holds none).
pub fn stored_block(store: &Path, hash: &str) -> StoredBlock {
    stored_blocks(store).into_iter().find(|b| b.hash == hash).unwrap_or_else(|| panic!("store {} holds no block {hash}", store.display()))
}

/// A QEMU process killed when dropped, so a failing test leaves none behind.
pub struct Qemu(pub std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the test guest's kernel and initrd under TCG with `drive` (a `-drive` value) and
/// extra kernel arguments; returns the console once `marker` appears. Panics with the
/// console if the guest stops (or `timeout_s` passes) without printing it: a guest that
/// dies early reads nothing, and must not pass for a boot that fetched little.
pub fn boot_guest(kernel: &Path, initrd: &Path, drive: &str, append: &str, marker: &str, timeout_s: u64) -> String {
    use std::io::Read;
    use std::process::Stdio;
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot", "-nic", "none", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 {append}"))
        .arg("-drive")
        .arg(drive)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64 (make setup installs it)");
    let mut qemu = Qemu(child);
    let mut stdout = qemu.0.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
    let mut console = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => {
                console.extend(chunk);
                if String::from_utf8_lossy(&console).contains(marker) {
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = qemu.0.wait();
                let mut err = String::new();
                if let Some(mut e) = qemu.0.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("the guest stopped without printing {marker:?}; qemu stderr:\n{err}\nconsole:\n{}", String::from_utf8_lossy(&console))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("guest did not print {marker:?} within {timeout_s} s; console:\n{}", String::from_utf8_lossy(&console))
            }
        }
    }
    drop(qemu);
    String::from_utf8_lossy(&console).replace('\r', "")
}

/// A `capsule serve` process on a free loopback port, killed when dropped.
pub struct ServerProcess {
    child: std::process::Child,
    /// `capsule://127.0.0.1:PORT`
    pub url: String,
    /// Certificate fingerprint it printed.
    pub fingerprint: String,
}

impl ServerProcess {
    /// Starts `capsule --store STORE serve --listen 127.0.0.1:0 [extra]` and waits until it listens.
    pub fn start(store: &Path, extra: &[&str]) -> Self {
        Self::start_at(store, "127.0.0.1:0", extra)
    }

    /// Like `start`, on a given address (to restart a server where clients expect it).
    pub fn start_at(store: &Path, listen: &str, extra: &[&str]) -> Self {
        Self::start_env(store, listen, extra, &[])
    }

    /// Like `start_at`, with extra environment variables (an S3 backend's credentials).
    pub fn start_env(store: &Path, listen: &str, extra: &[&str], env: &[(&str, String)]) -> Self {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = capsule(store)
            .args(["serve", "--listen", listen])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start capsule serve");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut url = String::new();
        let mut fingerprint = String::new();
        for line in lines.by_ref() {
            let line = line.expect("server output");
            if let Some(rest) = line.split(" on ").nth(1).filter(|_| line.starts_with("capsule: serving")) {
                url = format!("capsule://{}", rest.trim());
            }
            if let Some(fp) = line.strip_prefix("capsule: certificate SHA-256 ") {
                fingerprint = fp.trim().to_string();
                break;
            }
        }
        assert!(!url.is_empty() && !fingerprint.is_empty(), "capsule serve did not start");
        // Keep draining so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, url, fingerprint }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `capsule` with a private known_servers file under `config`.
pub fn client(store: &Path, config: &Path) -> Command {
    let mut c = capsule(store);
    c.env("CAPSULE_CONFIG_DIR", config).env_remove("CAPSULE_TOKEN");
    c
}

/// A `capsule mount` (detached daemon) that is unmounted, and its daemon killed, when dropped.
pub struct Mounted {
    /// The mount point.
    pub dir: PathBuf,
    /// The cache it uses.
    pub cache: PathBuf,
    store: PathBuf,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// How long a mount may live before its watchdog kills the daemon (seconds;
/// `CAPSULE_TEST_MOUNT_WATCHDOG`, default 600): a hung FUSE read then fails (ENOTCONN) and
/// the test fails, instead of stalling the whole run.
pub fn mount_watchdog_s() -> u64 {
    std::env::var("CAPSULE_TEST_MOUNT_WATCHDOG").ok().and_then(|v| v.parse().ok()).unwrap_or(600)
}

impl Mounted {
    /// `capsule --store STORE mount SOURCE DIR --cache CACHE [extra]`, waiting until it serves.
    pub fn new(store: &Path, config: &Path, source: &str, dir: &Path, cache: &Path, extra: &[&str]) -> Self {
        let mut cmd = client(store, config);
        cmd.args(["mount", source]).arg(dir).arg("--cache").arg(cache).args(extra);
        Self::started_by(&mut cmd, store, dir, cache)
    }

    /// Runs `cmd`, a `capsule mount` of DIR over CACHE (from any binary), waiting until it serves.
    pub fn started_by(cmd: &mut Command, store: &Path, dir: &Path, cache: &Path) -> Self {
        // A stale mount left by a killed daemon makes this fail; `capsule mount` cleans it.
        let _ = std::fs::create_dir_all(dir);
        ok(cmd);
        let m = Self { dir: dir.to_path_buf(), cache: cache.to_path_buf(), store: store.to_path_buf(), done: Default::default() };
        if let Some(supervisor) = m.pid().and_then(parent_of) {
            let (done, dir) = (m.done.clone(), m.dir.clone());
            let limit = mount_watchdog_s();
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(limit);
                while std::time::Instant::now() < deadline {
                    if done.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                eprintln!("watchdog: {} still mounted after {limit} s; killing its supervisor {supervisor} and daemon", dir.display());
                kill_mount_processes(supervisor, &dir);
            });
        }
        m
    }

    /// The daemon's pid, from `.capsule/info.json`.
    pub fn pid(&self) -> Option<u32> {
        let info: serde_json::Value = serde_json::from_slice(&std::fs::read(self.dir.join(".capsule/info.json")).ok()?).ok()?;
        info["pid"].as_u64().map(|p| p as u32)
    }

    /// Parsed `.capsule/stats.json`.
    pub fn stats(&self) -> serde_json::Value {
        let bytes = std::fs::read(self.dir.join(".capsule/stats.json")).unwrap();
        // Every read of it also checks its shape against the type the mount writes.
        let typed: Result<capsule_fs::mount::MountStats, _> = serde_json::from_slice(&bytes);
        assert!(typed.is_ok(), "stats.json is not a MountStats: {typed:?}");
        serde_json::from_slice(&bytes).unwrap()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.cache.join("logs")) {
            for e in entries.flatten() {
                out += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
        }
        out
    }

    /// Unmounts now.
    pub fn unmount(&self) {
        let _ = capsule(&self.store).arg("umount").arg(&self.dir).output();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        let pid = self.pid();
        let supervisor = pid.and_then(parent_of);
        self.unmount();
        let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).output();
        if let Some(s) = supervisor {
            kill_mount_processes(s, &self.dir);
        }
        if let Some(pid) = pid {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).output();
        }
    }
}

/// The parent of `pid` if it is a `capsule mount` (the supervisor of a mount's daemon).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{ppid}/cmdline")).ok()?;
    cmdline.split(|b| *b == 0).any(|a| a == b"mount").then_some(ppid)
}

/// SIGKILLs a mount's supervisor (so nothing restarts) and the daemons it started, if
/// `supervisor` is still the `capsule mount` of `dir` (not a reused pid).
pub fn kill_mount_processes(supervisor: u32, dir: &Path) {
    let cmdline = std::fs::read(format!("/proc/{supervisor}/cmdline")).unwrap_or_default();
    if !cmdline.split(|b| *b == 0).any(|a| a == dir.as_os_str().as_encoded_bytes()) {
        return;
    }
    let children: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)).and_then(|x| x.parse::<u32>().ok()))
                == Some(supervisor)
        })
        .collect();
    let _ = Command::new("kill").arg("-9").arg(supervisor.to_string()).output();
    for c in children {
        let _ = Command::new("kill").arg("-9").arg(c.to_string()).output();
    }
}

/// Reads `len` bytes at `offset` of `path`.
pub fn pread(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; len];
    let n = f.read_at(&mut buf, offset)?;
    buf.truncate(n);
    Ok(buf)
}

/// Imports the test guest as capsule `guest` into `store`, with its kernel and initrd
/// when `boot_files`.
pub fn import_guest(store: &Path, boot_files: bool) {
    let g = guest_dir();
    let mut cmd = capsule(store);
    cmd.args(["import", "guest", "--disk"]).arg(format!("root={}", g.join("disk.raw").display()));
    if boot_files {
        cmd.arg("--kernel").arg(g.join("vmlinuz")).arg("--initrd").arg(g.join("initrd.gz")).args(["--cmdline", GUEST_CMDLINE]);
    }
    ok(&mut cmd);
}

/// Imports the updated guest disk as `guest-update` over `guest`; returns the import
/// report (`images[0][1]` holds the disk's counters).
pub fn import_guest_update(store: &Path) -> serde_json::Value {
    let g = guest_dir();
    let text = ok(capsule(store)
        .args(["import", "guest-update", "--parent", "guest", "--json", "--disk"])
        .arg(format!("root={}", g.join("disk-update.raw").display())));
    serde_json::from_str(&text[text.find('{').expect("JSON report")..]).expect("import report")
}

/// The test guest's marker of a completed `gmode=boot`.
pub const BOOT_OK: &str = "CAPSULE-GUEST-MARKER boot-ok";

/// Boots the guest from a mount's files (read-only disk); panics unless it printed its boot
/// marker with no I/O error and no guest error on the way.
pub fn boot_from_mount(m: &Mounted) -> String {
    let drive = format!("file={},format=raw,if=virtio,readonly=on", m.dir.join("root.raw").display());
    let console = boot_guest(&m.dir.join("vmlinuz"), &m.dir.join("initrd.img"), &drive, "gmode=boot", BOOT_OK, 150);
    assert!(!console.contains("I/O error") && !console.contains("CAPSULE-GUEST-ERROR"), "the boot hit errors:\n{console}");
    console
}

/// The kernel command line the test guest is imported with (`capsule run` appends modes).
pub const GUEST_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// A `capsule run` in the background (TCG, console to a log file). Dropping it stops the
/// run (SIGINT, then kill) and kills its QEMU and mount if they outlive it.
pub struct Run {
    child: std::process::Child,
    /// The run's id.
    pub id: String,
    /// `CAPSULE_RUN_DIR` it uses.
    pub runs: PathBuf,
    /// The guest's serial console.
    pub log: PathBuf,
    /// stderr of `capsule run`.
    pub out: PathBuf,
    /// Its stdout (with --json, the report alone).
    pub stdout: PathBuf,
    store: PathBuf,
    qemu_pid: Option<u32>,
    mountpoint: Option<PathBuf>,
}

impl Run {
    /// `capsule --store STORE run SOURCE --cache CACHE --id ID --accel tcg --serial-log .. [extra]`.
    pub fn start(store: &Path, config: &Path, runs: &Path, source: &str, cache: &Path, id: &str, extra: &[&str]) -> Self {
        Self::start_env(store, config, runs, source, cache, id, extra, &[])
    }

    /// Like `start`, with extra environment variables (a key directory).
    #[allow(clippy::too_many_arguments)]
    pub fn start_env(store: &Path, config: &Path, runs: &Path, source: &str, cache: &Path, id: &str, extra: &[&str], env: &[(&str, &Path)]) -> Self {
        std::fs::create_dir_all(runs).unwrap();
        let log = runs.join(format!("{id}.console"));
        let out = runs.join(format!("{id}.out"));
        let outf = std::fs::File::create(&out).unwrap();
        let stdout = runs.join(format!("{id}.stdout"));
        let child = client(store, config)
            .envs(env.iter().copied())
            .env("CAPSULE_RUN_DIR", runs)
            .args(["run", source, "--accel", "tcg", "--quiet", "--id", id, "--cache"])
            .arg(cache)
            .arg("--serial-log")
            .arg(&log)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(outf)
            .spawn()
            .expect("start capsule run");
        Self { child, id: id.to_string(), runs: runs.to_path_buf(), log, out, stdout, store: store.to_path_buf(), qemu_pid: None, mountpoint: None }
    }

    /// The console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `capsule run`'s own output so far: its stderr, then its stdout.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default() + &self.stdout()
    }

    /// `capsule run`'s stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Waits until the console shows `pattern`; panics with both logs after `timeout_s`
    /// or if the run ends first.
    pub fn wait_console(&mut self, pattern: &str, timeout_s: u64) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
        loop {
            let text = self.console();
            if text.contains(pattern) {
                self.remember();
                return text;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("run {} ended ({status}) before printing {pattern:?}\nconsole:\n{text}\noutput:\n{}", self.id, self.output());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "run {} did not print {pattern:?} in {timeout_s} s\nconsole:\n{text}\noutput:\n{}",
                self.id,
                self.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Waits for the run to end by itself; panics unless it succeeded and the console shows
    /// `marker`. Returns `capsule run`'s output.
    pub fn wait_marker(&mut self, marker: &str, timeout_s: u64) -> String {
        let (success, output) = self.wait(timeout_s);
        let console = self.console();
        assert!(success && console.contains(marker), "run {} ended (success: {success}) without {marker:?}\noutput:\n{output}\nconsole:\n{console}", self.id);
        output
    }

    /// The run's `run.json`.
    pub fn record(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.runs.join(&self.id).join("run.json")).expect("run.json")).unwrap()
    }

    fn remember(&mut self) {
        if self.qemu_pid.is_none() {
            if let Ok(b) = std::fs::read(self.runs.join(&self.id).join("run.json")) {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
                    self.qemu_pid = v["qemu_pid"].as_u64().map(|p| p as u32);
                    self.mountpoint = v["mountpoint"].as_str().map(PathBuf::from);
                }
            }
        }
    }

    /// Waits for the run to end by itself; returns its success and output.
    pub fn wait(&mut self, timeout_s: u64) -> (bool, String) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.success(), self.output());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "run {} still going after {timeout_s} s\nconsole:\n{}\noutput:\n{}",
                self.id,
                self.console(),
                self.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// `capsule suspend ID NAME --json [extra]` against this run.
    pub fn suspend(&mut self, config: &Path, name: &str, extra: &[&str]) -> serde_json::Value {
        self.remember();
        let text = ok(client(&self.store, config).env("CAPSULE_RUN_DIR", &self.runs).args(["suspend", &self.id, name, "--json"]).args(extra));
        serde_json::from_str(&text[text.find("{\n").expect("suspend --json output")..]).unwrap()
    }

    /// Sends SIGINT (as Ctrl-C would).
    pub fn interrupt(&mut self) {
        self.remember();
        let _ = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).output();
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.remember();
        if self.child.try_wait().ok().flatten().is_none() {
            self.interrupt();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while self.child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(pid) = self.qemu_pid {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).output();
        }
        if let Some(m) = &self.mountpoint {
            let _ = Command::new("fusermount3").arg("-uz").arg(m).output();
        }
    }
}

/// Counter values a `gmode=loop` guest printed, from complete lines only (a guest stopped
/// mid-line leaves "COUNTER 1" of "COUNTER 12").
pub fn counters(console: &str) -> Vec<u64> {
    let complete = match console.rfind('\n') {
        Some(i) => &console[..i],
        None => "",
    };
    complete.lines().filter_map(|l| l.trim().strip_prefix("COUNTER ")).filter_map(|n| n.trim().parse().ok()).collect()
}

/// BLAKE3 of each `bs`-byte block of `data` (the last one zero-padded, as capsule stores
/// it), `None` for an all-zero block: the block names the format gives, computed here
/// without capsule, so tests compare capsule's behaviour with an independent expectation.
pub fn block_hashes(data: &[u8], bs: usize) -> Vec<Option<String>> {
    data.chunks(bs)
        .map(|c| {
            if c.iter().all(|&b| b == 0) {
                return None;
            }
            let mut padded = c.to_vec();
            padded.resize(bs, 0);
            Some(blake3::hash(&padded).to_hex().to_string())
        })
        .collect()
}

/// The distinct non-zero block contents of `files` at block size `bs`.
pub fn distinct_blocks(files: &[&Path], bs: usize) -> std::collections::HashSet<String> {
    files.iter().flat_map(|f| block_hashes(&std::fs::read(f).unwrap(), bs)).flatten().collect()
}

/// The distinct non-zero contents `update` has and `base` lacks, at block size `bs`: what
/// a child over `base` must store, and what a cache holding `base` must fetch to read it.
pub fn new_contents(base: &Path, update: &Path, bs: usize) -> std::collections::HashSet<String> {
    let old = distinct_blocks(&[base], bs);
    distinct_blocks(&[update], bs).into_iter().filter(|h| !old.contains(h)).collect()
}

/// Names (hashes) of the blocks in a store or cache.
pub fn stored_block_names(store: &Path) -> std::collections::HashSet<String> {
    let mut names: std::collections::HashSet<String> = stored_blocks(store).into_iter().map(|b| b.hash).collect();
    names.extend(packed_block_names(store));
    names
}

/// Blocks a cache holds in its pack files (`CACHE/packs/*.pack`), read with a parser of
/// the test's own: a 16-byte file header, then records of magic "BLK1", length (u32 LE),
/// hash (32 bytes), checksum (8 bytes) and the block's encoding.
pub fn packed_block_names(cache: &Path) -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    let Ok(dir) = std::fs::read_dir(cache.join("packs")) else { return out };
    for f in dir.flatten() {
        let bytes = std::fs::read(f.path()).unwrap_or_default();
        if bytes.len() < 16 || &bytes[..8] != b"CAPSPACK" {
            continue;
        }
        let mut at = 16;
        while at + 48 <= bytes.len() && &bytes[at..at + 4] == b"BLK1" {
            let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            out.insert(bytes[at + 8..at + 40].iter().map(|b| format!("{b:02x}")).collect());
            at += 48 + len;
        }
    }
    out
}

/// Bytes a cache's blocks take on disk: block files and pack files.
pub fn cache_block_bytes(cache: &Path) -> u64 {
    let files: u64 = stored_blocks(cache).iter().map(|b| b.len).sum();
    let packs: u64 = std::fs::read_dir(cache.join("packs")).map(|d| d.flatten().map(|f| f.metadata().map(|m| m.len()).unwrap_or(0)).sum()).unwrap_or(0);
    files + packs
}
