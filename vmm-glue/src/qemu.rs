//! The QEMU command line for a mounted capsule, and the accelerator choice.
//!
//! Every device is named on the command line (`-nodefaults`), so a suspended machine and
//! the one resuming it have the same device set: same disks in the same order, one
//! virtio-balloon, guest RAM in a `memory-backend-file` on the mount.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};

/// Hints a capsule carries that reach QEMU (written by `capsule suspend`).
pub const HINT_MACHINE: &str = "qemu.machine";
/// See [`HINT_MACHINE`].
pub const HINT_ACCEL: &str = "qemu.accel";
/// See [`HINT_MACHINE`].
pub const HINT_APPEND: &str = "qemu.append";
/// See [`HINT_MACHINE`].
pub const HINT_CAPABILITIES: &str = "qemu.capabilities";
/// The QEMU version that saved the state (informational; never on a command line).
pub const HINT_VERSION: &str = "qemu.version";
/// Longest version string kept.
const MAX_VERSION: usize = 32;
/// Migration capabilities a capsule may ask a resume to turn on: the ones `capsule
/// suspend` sets. Anything else could change how QEMU reads the incoming state.
pub const KNOWN_CAPABILITIES: &[&str] = &["x-ignore-shared"];
/// Longest machine type name accepted (QEMU's are under 32).
const MAX_MACHINE: usize = 64;
/// Longest kernel command line accepted (x86's COMMAND_LINE_SIZE is 2048).
const MAX_APPEND: usize = 4096;

/// The QEMU hints of a capsule, each checked against its grammar. On disk (run.json, a
/// manifest's hints) they are the `qemu.*` keys of a string map.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "BTreeMap<String, String>", into = "BTreeMap<String, String>")]
pub struct QemuHints {
    /// `qemu.machine`: a machine type name.
    pub machine: Option<String>,
    /// `qemu.accel`: `kvm` or `tcg`.
    pub accel: Option<Accel>,
    /// `qemu.append`: the kernel command line the guest booted with.
    pub append: Option<String>,
    /// `qemu.capabilities`: migration capabilities, each in [`KNOWN_CAPABILITIES`].
    pub capabilities: Vec<String>,
    /// `qemu.version`: the QEMU that saved the state.
    pub version: Option<String>,
}

impl TryFrom<BTreeMap<String, String>> for QemuHints {
    type Error = Error;
    fn try_from(map: BTreeMap<String, String>) -> Result<Self> {
        Self::parse(&map)
    }
}

impl From<QemuHints> for BTreeMap<String, String> {
    fn from(h: QemuHints) -> Self {
        h.to_map()
    }
}

fn bad_hint(key: &str, value: &str, why: &str) -> Error {
    let shown: String = value.chars().take(80).collect();
    let more = if value.chars().count() > 80 { "..." } else { "" };
    Error::new(ErrorKind::Invalid, format!("hint {key} = {shown:?}{more}: {why}"))
}

/// A machine type name (`pc`, `pc-i440fx-7.2`): letters, digits, `.`, `_`, `-`. A comma or
/// `=` would add `-machine` options (`pc,initrd=/etc/shadow`).
pub fn check_machine(value: &str) -> Result<()> {
    if value.is_empty() || value.len() > MAX_MACHINE || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) || value.starts_with('-') {
        return Err(bad_hint(HINT_MACHINE, value, &format!("not a machine type name (letters, digits, '.', '_', '-', at most {MAX_MACHINE})")));
    }
    Ok(())
}

/// A kernel command line: one argument of `-append`, so no option can hide in it; still
/// no control characters (a NUL would cut it, a newline would forge log lines) and bounded.
pub fn check_append(value: &str) -> Result<()> {
    if value.len() > MAX_APPEND || value.chars().any(char::is_control) {
        return Err(bad_hint(HINT_APPEND, value, &format!("not a kernel command line (printable characters only, at most {MAX_APPEND} bytes)")));
    }
    Ok(())
}

impl QemuHints {
    /// Checks the `qemu.*` hints of `hints` (others are not this crate's); an error names
    /// the hint and its value.
    pub fn parse(hints: &BTreeMap<String, String>) -> Result<Self> {
        let mut out = QemuHints::default();
        if let Some(m) = hints.get(HINT_MACHINE) {
            check_machine(m)?;
            out.machine = Some(m.clone());
        }
        if let Some(a) = hints.get(HINT_ACCEL) {
            out.accel = Some(Accel::parse(a).ok_or_else(|| bad_hint(HINT_ACCEL, a, "not an accelerator (kvm or tcg)"))?);
        }
        if let Some(a) = hints.get(HINT_APPEND) {
            check_append(a)?;
            out.append = Some(a.clone());
        }
        if let Some(c) = hints.get(HINT_CAPABILITIES) {
            for name in c.split(',').filter(|s| !s.is_empty()) {
                if !KNOWN_CAPABILITIES.contains(&name) {
                    return Err(bad_hint(
                        HINT_CAPABILITIES,
                        c,
                        &format!("{name:?} is not a migration capability a resume sets (known: {})", KNOWN_CAPABILITIES.join(", ")),
                    ));
                }
                out.capabilities.push(name.to_string());
            }
        }
        if let Some(v) = hints.get(HINT_VERSION) {
            if v.len() > MAX_VERSION || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b)) {
                return Err(bad_hint(HINT_VERSION, v, "not a version"));
            }
            out.version = Some(v.clone());
        }
        Ok(out)
    }

    /// The hints as the `qemu.*` keys of a capsule's hint map.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put(HINT_MACHINE, self.machine.clone());
        put(HINT_ACCEL, self.accel.map(|a| a.name().to_string()));
        put(HINT_APPEND, self.append.clone());
        put(HINT_CAPABILITIES, (!self.capabilities.is_empty()).then(|| self.capabilities.join(",")));
        put(HINT_VERSION, self.version.clone());
        m
    }
}

/// Which accelerator to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's emulator: slower, works everywhere.
    Tcg,
}

impl Accel {
    /// The `-accel` name.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// Parses `kvm` or `tcg`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

/// A raw disk file for the guest.
#[derive(Debug, Clone)]
pub struct DiskFile {
    /// The file (on the mount).
    pub path: PathBuf,
    /// Attach read-only (`readonly=on`); a read-only mount needs it.
    pub read_only: bool,
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone)]
pub enum Serial {
    /// The terminal, with QEMU's monitor multiplexed (Ctrl-A x quits).
    Terminal,
    /// Appended to a file.
    File(PathBuf),
}

/// Everything the QEMU command line depends on.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The QEMU binary.
    pub binary: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// Versioned machine type (`pc-i440fx-7.2`) or alias (`pc`).
    pub machine: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Guest RAM lives in this file (shared mapping), so it can be saved in place.
    pub memory_file: Option<PathBuf>,
    /// Disks, in order.
    pub disks: Vec<DiskFile>,
    /// Direct kernel boot: kernel, initrd and command line.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: Option<String>,
    /// The QMP socket QEMU listens on.
    pub qmp_socket: PathBuf,
    /// Serial console.
    pub serial: Serial,
    /// Wait for an incoming migration (`-incoming defer`), paused (`-S`).
    pub incoming: bool,
    /// Passed through as they are, last.
    pub extra: Vec<String>,
}

/// Quotes a path for a QEMU option value (commas are doubled).
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

impl QemuConfig {
    /// Checks what may have come from a capsule (machine type, command line) before it
    /// reaches the command line.
    pub fn check(&self) -> Result<()> {
        check_machine(&self.machine)?;
        self.append.as_deref().map_or(Ok(()), check_append)
    }

    /// The arguments after the binary.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<String> = vec!["-nodefaults".into(), "-no-user-config".into(), "-display".into(), "none".into(), "-no-reboot".into()];
        let mut machine = format!("{},accel={}", self.machine, self.accel.name());
        if let Some(mem) = &self.memory_file {
            a.push("-object".into());
            a.push(format!("memory-backend-file,id=capsule-ram,size={}M,mem-path={},share=on", self.memory_mib, opt_path(mem)));
            machine.push_str(",memory-backend=capsule-ram");
        }
        a.extend(["-machine".into(), machine, "-m".into(), format!("{}M", self.memory_mib), "-smp".into(), self.cpus.to_string()]);
        a.push("-qmp".into());
        a.push(format!("unix:{},server=on,wait=off", opt_path(&self.qmp_socket)));
        a.push("-serial".into());
        a.push(match &self.serial {
            Serial::Terminal => "mon:stdio".into(),
            Serial::File(p) => format!("file:{}", p.display()),
        });
        // The balloon is always there: a suspend can shrink the guest before saving it,
        // and the resuming machine needs the same devices.
        a.extend(["-device".into(), format!("virtio-balloon-pci,id={}", crate::qmp::BALLOON_ID)]);
        for d in &self.disks {
            a.push("-drive".into());
            let ro = if d.read_only { ",readonly=on" } else { "" };
            a.push(format!("file={},format=raw,if=virtio,cache=writeback,discard=unmap{ro}", opt_path(&d.path)));
        }
        if let Some(k) = &self.kernel {
            a.push("-kernel".into());
            a.push(k.display().to_string());
            if let Some(i) = &self.initrd {
                a.push("-initrd".into());
                a.push(i.display().to_string());
            }
            if let Some(c) = &self.append {
                a.push("-append".into());
                a.push(c.clone());
            }
        }
        if self.incoming {
            a.extend(["-S".into(), "-incoming".into(), "defer".into()]);
        }
        a.extend(self.extra.iter().cloned());
        a.into_iter().map(OsString::from).collect()
    }

    /// The command line as one shell-quoted string, for logs and `--dry-run`.
    pub fn shell_line(&self) -> String {
        shell_line(self.binary.as_os_str(), self.args())
    }
}

/// `binary args...` as one shell-quoted string.
pub fn shell_line<A: AsRef<std::ffi::OsStr>>(binary: &std::ffi::OsStr, args: impl IntoIterator<Item = A>) -> String {
    let mut words = vec![shell_quote(&binary.to_string_lossy())];
    words.extend(args.into_iter().map(|a| shell_quote(&a.as_ref().to_string_lossy())));
    words.join(" ")
}

/// Quotes `s` for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=,:+@%".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Whether KVM really runs a guest here: `/dev/kvm` can exist and still hang a Linux boot
/// right after the firmware (seen on these machines). Boots `kernel` under KVM with no
/// disk and waits up to `limit` for its first console line; a working KVM prints it in
/// well under a second.
pub fn kvm_works(qemu: &Path, kernel: &Path, limit: Duration) -> bool {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return false;
    }
    let child = Command::new(qemu)
        .args(["-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none", "-m", "128", "-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 earlyprintk=serial panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    let Some(mut out) = child.stdout.take() else { return false };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("Linux version") {
                let _ = tx.send(());
                break;
            }
        }
    });
    let start = Instant::now();
    let ok = rx.recv_timeout(limit.saturating_sub(start.elapsed())).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    ok
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config() -> QemuConfig {
        QemuConfig {
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            machine: "pc-i440fx-7.2".into(),
            cpus: 2,
            memory_mib: 256,
            memory_file: Some("/mnt/c,x/memory.raw".into()),
            disks: vec![DiskFile { path: "/mnt/c,x/root.raw".into(), read_only: false }, DiskFile { path: "/mnt/c,x/data.raw".into(), read_only: true }],
            kernel: Some("/mnt/c,x/vmlinuz".into()),
            initrd: Some("/mnt/c,x/initrd.img".into()),
            append: Some("console=ttyS0 gmode=loop".into()),
            qmp_socket: "/run/r1/qmp.sock".into(),
            serial: Serial::File("/run/r1/serial.log".into()),
            incoming: true,
            extra: vec!["-rtc".into(), "base=utc".into()],
        }
    }

    #[test]
    fn command_line_names_every_device_and_escapes_commas() {
        let args: Vec<String> = config().args().into_iter().map(|a| a.into_string().unwrap()).collect();
        let joined = args.join(" ");
        assert!(joined.contains("memory-backend-file,id=capsule-ram,size=256M,mem-path=/mnt/c,,x/memory.raw,share=on"), "{joined}");
        assert!(joined.contains("-machine pc-i440fx-7.2,accel=tcg,memory-backend=capsule-ram"), "{joined}");
        assert!(joined.contains("file=/mnt/c,,x/root.raw,format=raw,if=virtio,cache=writeback,discard=unmap -drive"), "{joined}");
        assert!(joined.contains("/mnt/c,,x/data.raw,format=raw,if=virtio,cache=writeback,discard=unmap,readonly=on"), "{joined}");
        assert!(joined.contains("-S -incoming defer -rtc base=utc"), "extra args come last: {joined}");
        assert!(args.contains(&"-nodefaults".to_string()) && args.contains(&"virtio-balloon-pci,id=balloon0".to_string()));
        let i = args.iter().position(|a| a == "-append").unwrap();
        assert_eq!(args[i + 1], "console=ttyS0 gmode=loop");
    }

    #[test]
    fn no_memory_file_means_plain_ram_and_shell_line_quotes() {
        let mut c = config();
        c.memory_file = None;
        c.incoming = false;
        let line = c.shell_line();
        assert!(!line.contains("memory-backend"));
        assert!(line.contains("-machine pc-i440fx-7.2,accel=tcg -m 256M"));
        assert!(line.contains("-append 'console=ttyS0 gmode=loop'"), "{line}");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    fn hints(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn good_hints_pass_and_others_are_ignored() {
        let h = QemuHints::parse(&hints(&[
            ("qemu.machine", "pc-i440fx-7.2"),
            ("qemu.accel", "tcg"),
            ("qemu.append", "console=ttyS0 root=/dev/vda gmode=loop"),
            ("qemu.capabilities", "x-ignore-shared"),
            ("qemu.version", "7.2.0"),
            ("chv.config", "{}"),
        ]))
        .unwrap();
        assert_eq!(h.machine.as_deref(), Some("pc-i440fx-7.2"));
        assert_eq!(h.accel, Some(Accel::Tcg));
        assert_eq!(h.capabilities, ["x-ignore-shared"]);
        assert_eq!(QemuHints::parse(&hints(&[("qemu.capabilities", "")])).unwrap().capabilities, Vec::<String>::new());
        assert_eq!(h.version.as_deref(), Some("7.2.0"));
        let mut back = h.to_map();
        back.insert("chv.config".into(), "{}".into());
        assert_eq!(QemuHints::parse(&back).unwrap(), h, "to_map is parse's inverse");
        assert!(!h.to_map().contains_key("chv.config"));
    }

    #[test]
    fn hostile_hints_are_refused_naming_the_hint() {
        for (key, value, why) in [
            ("qemu.machine", "pc,initrd=/etc/shadow", "not a machine type"),
            ("qemu.machine", "pc=x", "not a machine type"),
            ("qemu.machine", "", "not a machine type"),
            ("qemu.machine", "-help", "not a machine type"),
            ("qemu.machine", "pc q35", "not a machine type"),
            ("qemu.accel", "kvm,kernel-irqchip=off", "not an accelerator"),
            ("qemu.accel", "xen", "not an accelerator"),
            ("qemu.append", "console=ttyS0\nCAPSULE-GUEST-MARKER", "not a kernel command line"),
            ("qemu.append", "a\0b", "not a kernel command line"),
            ("qemu.capabilities", "x-ignore-shared,postcopy-ram", "\"postcopy-ram\" is not a migration capability"),
        ] {
            let err = QemuHints::parse(&hints(&[(key, value)])).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid);
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("hint {key} = ")) && msg.contains(why), "{key}={value:?}: {msg}");
        }
        let long = "x".repeat(MAX_APPEND + 1);
        assert!(QemuHints::parse(&hints(&[("qemu.append", &long)])).unwrap_err().to_string().contains("...: not a kernel command line"));
    }

    #[test]
    fn config_check_guards_the_command_line() {
        let mut c = config();
        c.check().unwrap();
        c.machine = "pc,initrd=/etc/shadow".into();
        assert!(c.check().unwrap_err().to_string().contains("hint qemu.machine"));
    }
}
