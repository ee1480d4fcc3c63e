//! Cloud Hypervisor: its snapshot directory as a capsule, and its command line.
//!
//! ```text
//!  snapshot dir (cloud-hypervisor snapshot)      capsule                  mount
//!  config.json  VmConfig, host paths       -->   hint chv.config    -->   config.json, paths
//!                                                (paths -> @CAPSULE_MOUNT@/...)   into the mount
//!  state.json   device state               -->   devstate image     -->   state.json
//!  memory-ranges guest RAM                 -->   memory image       -->   memory-ranges
//!  disks[i].path (raw)                     -->   disk disk<i>       -->   disk<i>.raw
//!  payload.kernel / initramfs / cmdline    -->   boot files         -->   vmlinuz, initrd.img
//! ```
//! So `cloud-hypervisor --restore source_url=file://MOUNT` finds a complete snapshot whose
//! disks are the mount's files. Cloud Hypervisor needs KVM; on machines without it only
//! the round trip and the command line are tested (see ARCHITECTURE.md).

use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};
use capsule_images::{Manifest, MountLayout, Slot, VmFile};

/// VM hint holding a snapshot's `config.json` whose paths into the capsule start with
/// [`MOUNT_PLACEHOLDER`]; a mount presents such a capsule as a snapshot directory.
pub const CONFIG_HINT: &str = "chv.config";
/// Stands for the mount point in the stored config.
pub const MOUNT_PLACEHOLDER: &str = "@CAPSULE_MOUNT@";
/// Cloud Hypervisor's names in a snapshot directory.
pub const CONFIG_FILE: &str = "config.json";
/// See [`CONFIG_FILE`].
pub const STATE_FILE: &str = "state.json";
/// See [`CONFIG_FILE`].
pub const MEMORY_FILE: &str = "memory-ranges";

/// The stored config (see [`CONFIG_HINT`]) with the mount point filled in, pretty-printed.
pub fn config_for_mount(template: &str, mountpoint: &Path) -> Vec<u8> {
    let filled = template.replace(MOUNT_PLACEHOLDER, &mountpoint.display().to_string());
    match serde_json::from_str::<Value>(&filled) {
        Ok(v) => serde_json::to_vec_pretty(&v).unwrap_or_default(),
        // Not JSON after all: hand it over as stored rather than hide it.
        Err(_) => filled.into_bytes(),
    }
}

/// How a mount shows a capsule imported from a snapshot directory: RAM and device state
/// under the snapshot's own names and its `config.json` pointing into the mount, so the
/// mount is a snapshot directory `--restore` takes. `None` for other capsules.
pub fn snapshot_layout(m: &Manifest, mountpoint: &Path) -> Option<MountLayout> {
    let template = m.vm.hints.get(CONFIG_HINT)?;
    Some(MountLayout {
        renamed: [(Slot::Memory, MEMORY_FILE.to_string()), (Slot::Devstate, STATE_FILE.to_string())].into_iter().collect(),
        extra: vec![(CONFIG_FILE.to_string(), config_for_mount(template, mountpoint))],
    })
}
/// Largest `config.json` accepted (real ones are a few KiB).
const MAX_CONFIG: u64 = 256 << 10;

/// A snapshot directory, read and checked, ready to import.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// (disk name, host file) in the order of `disks` in config.json.
    pub disks: Vec<(String, PathBuf)>,
    /// Direct-boot kernel, if the config names one that exists.
    pub kernel: Option<PathBuf>,
    /// Its initramfs.
    pub initrd: Option<PathBuf>,
    /// Its command line.
    pub cmdline: Option<String>,
    /// `memory-ranges`.
    pub memory: PathBuf,
    /// `state.json`.
    pub state: PathBuf,
    /// config.json with every imported path replaced by [`MOUNT_PLACEHOLDER`]/file.
    pub config_template: String,
    /// Boot vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
}

fn invalid(dir: &Path, what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Invalid, format!("{}: {what}", dir.display()))
}

/// Reads a Cloud Hypervisor snapshot directory.
pub fn read_snapshot(dir: &Path) -> Result<Snapshot> {
    let config_path = dir.join(CONFIG_FILE);
    let memory = dir.join(MEMORY_FILE);
    let state = dir.join(STATE_FILE);
    for p in [&config_path, &memory, &state] {
        if !p.is_file() {
            return Err(invalid(dir, format!("not a Cloud Hypervisor snapshot: {} is missing", p.file_name().and_then(|n| n.to_str()).unwrap_or("?"))));
        }
    }
    let len = std::fs::metadata(&config_path).map_err(|e| Error::io(config_path.display(), e))?.len();
    if len > MAX_CONFIG {
        return Err(invalid(dir, format!("config.json is {len} bytes, more than the {MAX_CONFIG} accepted")));
    }
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(config_path.display(), e))?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| invalid(dir, format!("config.json: {e}")))?;
    let mut disks = Vec::new();
    if let Some(list) = config.get_mut("disks").and_then(Value::as_array_mut) {
        for (i, d) in list.iter_mut().enumerate() {
            let Some(path) = d.get("path").and_then(Value::as_str).map(PathBuf::from) else {
                return Err(invalid(dir, format!("config.json: disk {i} has no path (only file-backed disks can be imported)")));
            };
            if !path.is_file() {
                return Err(invalid(dir, format!("config.json: disk {i}: {} does not exist here", path.display())));
            }
            let name = format!("disk{i}");
            d["path"] = Value::String(format!("{MOUNT_PLACEHOLDER}/{name}.raw"));
            disks.push((name, path));
        }
    }
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = None;
    if let Some(payload) = config.get_mut("payload").and_then(Value::as_object_mut) {
        if let Some(k) = payload.get("kernel").and_then(Value::as_str).map(PathBuf::from).filter(|p| p.is_file()) {
            payload.insert("kernel".into(), Value::String(format!("{MOUNT_PLACEHOLDER}/vmlinuz")));
            kernel = Some(k);
        }
        if let Some(i) = payload.get("initramfs").and_then(Value::as_str).map(PathBuf::from).filter(|p| p.is_file()) {
            payload.insert("initramfs".into(), Value::String(format!("{MOUNT_PLACEHOLDER}/initrd.img")));
            initrd = Some(i);
        }
        cmdline = payload.get("cmdline").and_then(Value::as_str).map(String::from);
    }
    let cpus = config["cpus"]["boot_vcpus"].as_u64().unwrap_or(1).clamp(1, 4096) as u32;
    let memory_mib = config["memory"]["size"].as_u64().map(|b| b >> 20).unwrap_or(0);
    let config_template = serde_json::to_string(&config).map_err(|e| invalid(dir, e))?;
    Ok(Snapshot { disks, kernel, initrd, cmdline, memory, state, config_template, cpus, memory_mib })
}

/// Keys whose string values Cloud Hypervisor opens as host paths (or socket paths).
const PATH_KEYS: &[&str] = &["path", "file", "socket", "vhost_socket", "kernel", "initramfs", "firmware", "src", "sysfsdev"];
/// Keys whose values are text that may hold a `/` without naming a host file.
const TEXT_KEYS: &[&str] = &["cmdline", "oem_strings", "serial_number", "uuid"];
/// Host files a restored config may name outside the mount: the entropy source.
const HOST_FILES: &[&str] = &["/dev/urandom"];

/// Whether `p` is `mnt` or below it, with no `.`/`..` to climb out.
fn inside(p: &Path, mnt: &Path) -> bool {
    p.strip_prefix(mnt).is_ok_and(|rest| rest.components().all(|c| matches!(c, Component::Normal(_))))
}

fn check_value(v: &Value, at: &str, key: &str, mnt: &Path) -> Result<()> {
    match v {
        Value::Object(m) => m.iter().try_for_each(|(k, v)| check_value(v, &format!("{at}.{k}"), k, mnt)),
        // Array items inherit the key (`oem_strings[0]`).
        Value::Array(l) => l.iter().enumerate().try_for_each(|(i, v)| check_value(v, &format!("{at}[{i}]"), key, mnt)),
        Value::String(_) if TEXT_KEYS.contains(&key) => Ok(()),
        // A path key always, and any other string that looks like a path (a VFIO sysfs
        // device, a URL), must point into the mount.
        Value::String(s) if PATH_KEYS.contains(&key) || s.contains('/') => {
            if inside(Path::new(s), mnt) || (key == "src" && HOST_FILES.contains(&s.as_str())) {
                Ok(())
            } else {
                Err(Error::new(ErrorKind::Invalid, format!("{at} = {s:?} is outside the mount {}", mnt.display())))
            }
        }
        _ => Ok(()),
    }
}

/// Checks a restore config (the mount's `config.json`, placeholders filled): every path
/// in it must lie in the mount `mnt`, so a capsule cannot hand Cloud Hypervisor a host
/// file as a disk, a serial log or a device.
pub fn check_config(config: &Value, mnt: &Path) -> Result<()> {
    check_value(config, "config", "", mnt).map_err(|e| Error::new(ErrorKind::Invalid, format!("hint {CONFIG_HINT}: {e}")))
}

/// Reads and checks the mount's `config.json` (see [`check_config`]).
fn check_mounted_config(mnt: &Path) -> Result<()> {
    let path = mnt.join(CONFIG_FILE);
    let len = std::fs::metadata(&path).map_err(|e| Error::io(path.display(), e))?.len();
    if len > MAX_CONFIG {
        return Err(invalid(&path, format!("{len} bytes, more than the {MAX_CONFIG} accepted")));
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::io(path.display(), e))?;
    let config: Value = serde_json::from_slice(&bytes).map_err(|e| invalid(&path, format!("hint {CONFIG_HINT} is not JSON: {e}")))?;
    check_config(&config, mnt)
}

/// What `cloud-hypervisor` runs: a restore of the mounted snapshot (its config checked
/// first, see [`check_config`]), or a cold boot from the mount's files (disks
/// `readonly=on` when `read_only`). `vm` is the mount's `capsule.json`.
pub fn command_line(mnt: &Path, vm: &VmFile, read_only: bool, api_socket: &Path, serial_log: Option<&Path>, extra: &[String]) -> Result<Vec<String>> {
    let mut a = vec!["--api-socket".to_string(), format!("path={}", api_socket.display())];
    if vm.suspended && mnt.join(CONFIG_FILE).exists() {
        check_mounted_config(mnt)?;
        a.push("--restore".into());
        a.push(format!("source_url=file://{}", mnt.display()));
    } else {
        if mnt.join("vmlinuz").exists() {
            a.extend(["--kernel".into(), mnt.join("vmlinuz").display().to_string()]);
            if mnt.join("initrd.img").exists() {
                a.extend(["--initramfs".into(), mnt.join("initrd.img").display().to_string()]);
            }
            if let Some(c) = &vm.cmdline {
                a.extend(["--cmdline".into(), c.clone()]);
            }
        }
        a.extend(["--cpus".into(), format!("boot={}", vm.cpus)]);
        a.extend(["--memory".into(), format!("size={}M", vm.memory_mib)]);
        for d in &vm.disks {
            let ro = if read_only { ",readonly=on" } else { "" };
            a.extend(["--disk".into(), format!("path={}{ro}", mnt.join(&d.file).display())]);
        }
        a.extend(["--console".into(), "off".into()]);
        a.extend(["--serial".into(), serial_log.map_or("tty".into(), |p| format!("file={}", p.display()))]);
    }
    a.extend(extra.iter().cloned());
    Ok(a)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn vm(v: serde_json::Value) -> VmFile {
        let mut base = json!({"capsule": "c", "id": "00", "parent": null, "cpus": 1, "memory_mib": 256, "hypervisor": null, "disks": [],
            "memory": null, "suspended": false, "devstate": null, "kernel": null, "initrd": null, "cmdline": null});
        for (k, x) in v.as_object().unwrap() {
            base[k] = x.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn snapshot_paths_become_mount_paths() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("os.raw");
        std::fs::write(&disk, [1u8; 4096]).unwrap();
        let config = json!({"cpus": {"boot_vcpus": 2}, "memory": {"size": 512u64 << 20}, "disks": [{"path": disk, "readonly": false}], "payload": {"cmdline": "console=ttyS0"}});
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        std::fs::write(dir.path().join("state.json"), "{}").unwrap();
        std::fs::write(dir.path().join("memory-ranges"), [0u8; 8192]).unwrap();
        let s = read_snapshot(dir.path()).unwrap();
        assert_eq!((s.cpus, s.memory_mib, s.disks.len()), (2, 512, 1));
        assert_eq!(s.cmdline.as_deref(), Some("console=ttyS0"));
        let on_mount: Value = serde_json::from_slice(&config_for_mount(&s.config_template, Path::new("/mnt/x"))).unwrap();
        assert_eq!(on_mount["disks"][0]["path"], "/mnt/x/disk0.raw");
        assert_eq!(on_mount["memory"], config["memory"]);
    }

    #[test]
    fn only_a_snapshot_capsule_is_shown_under_the_snapshot_names() {
        let mut m = capsule_images::Manifest {
            name: "vm".into(),
            parent: None,
            created_unix: 0,
            vm: Default::default(),
            disks: vec![],
            memory: None,
            devstate: None,
            boot: None,
            sealing: None,
        };
        // Any other capsule: each slot under its own name, no extra file.
        assert_eq!(crate::mount_layout(&m, Path::new("/mnt/x")), MountLayout::default());
        m.vm.hints.insert(CONFIG_HINT.into(), format!(r#"{{"disks": [{{"path": "{MOUNT_PLACEHOLDER}/disk0.raw"}}]}}"#));
        let layout = crate::mount_layout(&m, Path::new("/mnt/x"));
        assert_eq!((layout.file_name(&Slot::Memory), layout.file_name(&Slot::Devstate)), ("memory-ranges".to_string(), "state.json".to_string()));
        assert_eq!(layout.file_name(&Slot::Disk("disk0".into())), "disk0.raw");
        assert_eq!(layout.extra.len(), 1);
        let (name, bytes) = &layout.extra[0];
        let config: Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!((name.as_str(), &config["disks"][0]["path"]), ("config.json", &json!("/mnt/x/disk0.raw")));
    }

    #[test]
    fn incomplete_or_hostile_snapshots_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_snapshot(dir.path()).unwrap_err();
        assert!(err.to_string().contains("config.json is missing"), "{err}");
        std::fs::write(dir.path().join("config.json"), r#"{"disks": [{"path": "/nonexistent/disk"}]}"#).unwrap();
        std::fs::write(dir.path().join("state.json"), "{}").unwrap();
        std::fs::write(dir.path().join("memory-ranges"), b"").unwrap();
        let err = read_snapshot(dir.path()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk does not exist"), "{err}");
        std::fs::write(dir.path().join("config.json"), vec![b' '; 300 << 10]).unwrap();
        assert!(read_snapshot(dir.path()).unwrap_err().to_string().contains("more than"));
    }

    #[test]
    fn restore_and_cold_boot_command_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let vm = vm(json!({"suspended": true, "cpus": 1, "memory_mib": 256, "disks": [{"name": "disk0", "file": "disk0.raw", "size": 0}]}));
        let a = command_line(dir.path(), &vm, false, Path::new("/run/r/ch.sock"), None, &[]).unwrap();
        assert_eq!(a[2..], ["--restore".to_string(), format!("source_url=file://{}", dir.path().display())]);
        let vm = super::tests::vm(
            json!({"suspended": false, "cpus": 2, "memory_mib": 256, "cmdline": "console=ttyS0", "disks": [{"name": "root", "file": "root.raw", "size": 0}]}),
        );
        std::fs::write(dir.path().join("vmlinuz"), "k").unwrap();
        let a = command_line(dir.path(), &vm, true, Path::new("/run/r/ch.sock"), Some(Path::new("/tmp/s.log")), &[]).unwrap().join(" ");
        assert!(
            a.contains(&format!(
                "--kernel {}/vmlinuz --cmdline console=ttyS0 --cpus boot=2 --memory size=256M --disk path={}/root.raw,readonly=on",
                dir.path().display(),
                dir.path().display()
            )),
            "{a}"
        );
        assert!(a.ends_with("--serial file=/tmp/s.log"), "{a}");
    }

    #[test]
    fn restore_configs_may_name_only_the_mount() {
        let mnt = Path::new("/run/capsule/r1/mnt");
        let good = json!({
            "disks": [{"path": "/run/capsule/r1/mnt/disk0.raw", "id": "_disk0"}],
            "payload": {"kernel": "/run/capsule/r1/mnt/vmlinuz", "cmdline": "console=ttyS0 root=/dev/vda"},
            "rng": {"src": "/dev/urandom"}, "serial": {"mode": "Tty", "file": null},
            "platform": {"oem_strings": ["a/b"]},
        });
        check_config(&good, mnt).unwrap();
        for (hostile, at) in [
            (json!({"disks": [{"path": "/etc/shadow"}]}), "config.disks[0].path = \"/etc/shadow\""),
            (json!({"disks": [{"path": "/run/capsule/r1/mnt/../../../etc/shadow"}]}), "config.disks[0].path"),
            (json!({"disks": [{"path": "disk0.raw"}]}), "config.disks[0].path = \"disk0.raw\""),
            (json!({"serial": {"mode": "File", "file": "/root/.ssh/authorized_keys"}}), "config.serial.file"),
            (json!({"payload": {"kernel": "/run/capsule/r1/mntx/vmlinuz"}}), "config.payload.kernel"),
            (json!({"devices": [{"path": "/sys/bus/pci/devices/0000:00:1f.2"}]}), "config.devices[0].path"),
            (json!({"memory": {"zones": [{"file": "/dev/mem"}]}}), "config.memory.zones[0].file"),
            (json!({"rng": {"src": "/etc/shadow"}}), "config.rng.src"),
            (json!({"fs": [{"tag": "x", "socket": "/run/other.sock"}]}), "config.fs[0].socket"),
            (json!({"landlock_rules": [{"path": "/home/user", "access": "rw"}]}), "config.landlock_rules[0].path"),
            (json!({"platform": {"note": "file:///etc/shadow"}}), "config.platform.note"),
        ] {
            let err = check_config(&hostile, mnt).unwrap_err().to_string();
            assert!(err.starts_with("hint chv.config: ") && err.contains(at) && err.contains("outside the mount /run/capsule/r1/mnt"), "{err}");
        }
    }

    #[test]
    fn a_restore_with_a_hostile_config_has_no_command_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"disks": [{"path": "/etc/shadow"}]}"#).unwrap();
        let vm = vm(json!({"suspended": true}));
        let err = command_line(dir.path(), &vm, false, Path::new("/run/r/ch.sock"), None, &[]).unwrap_err();
        assert!(err.to_string().contains("config.disks[0].path = \"/etc/shadow\" is outside the mount"), "{err}");
    }
}
