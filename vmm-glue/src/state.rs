//! A run's directory and the files its processes hand each other: `capsule run` writes
//! `run.json`, `capsule suspend` holds `suspend.lock` while it saves and commits, then
//! leaves `suspended.json` for the run to report.
//!
//! ```text
//!  RUNS/<id>/run.json        RunRecord: QEMU pid, QMP socket, the mount's info, hints for a resume
//!  RUNS/<id>/qmp.sock        QEMU's QMP socket
//!  RUNS/<id>/mnt/            the mount (when `run` made it)
//!  RUNS/<id>/devstate.bin    the device state a suspend saves
//!  RUNS/<id>/suspend.lock    held by `suspend` until its commit is done; `run` waits on it
//!  RUNS/<id>/suspended.json  Suspended: the child a suspend made
//! ```
//! RUNS is `$CAPSULE_RUN_DIR`, else `$XDG_RUNTIME_DIR/capsule/runs`, else `/tmp/capsule-runs-<uid>`.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use capsule_images::MountInfo;

use crate::error::{Error, ErrorKind, Result};
use crate::qemu::QemuHints;

/// Largest state file read back (they are a few hundred bytes).
const MAX_STATE_FILE: u64 = 1 << 20;

/// What a run records for `suspend` and `ps` (`run.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run's name.
    pub id: String,
    /// The capsule it runs (its name).
    pub capsule: String,
    /// The mount the hypervisor reads.
    pub mountpoint: PathBuf,
    /// What that mount said about itself when the run started (its `.capsule/info.json`):
    /// a suspend commits the overlays it names without reading the mount again. `None` in
    /// a record an older `capsule run` wrote (runs outlive an upgrade through takeover):
    /// read it from the mount then.
    #[serde(default)]
    pub mount: Option<MountInfo>,
    /// QEMU's pid.
    pub qemu_pid: u32,
    /// `capsule run`'s pid.
    pub run_pid: u32,
    /// QEMU's QMP socket.
    pub qmp: PathBuf,
    /// Guest RAM is the mount's memory.raw (a suspend can keep it in place).
    pub memory_on_mount: bool,
    /// Hints a suspend writes into the child, so the resume starts the same machine.
    pub hints: QemuHints,
}

/// The child capsule a suspend made (`suspended.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspended {
    /// Its name in the local store.
    pub name: String,
    /// Its id (hex).
    pub id: String,
}

/// `suspend.lock`, held (flock) until dropped.
#[derive(Debug)]
pub struct SuspendLock {
    _file: File,
}

/// One run's directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Where runs keep their state.
    pub fn root() -> Result<PathBuf> {
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

    /// Run `id` under [`RunDir::root`] (not created).
    pub fn named(id: &str) -> Result<Self> {
        Ok(Self { path: Self::root()?.join(id) })
    }

    /// A run given by its id, its directory or its QMP socket; it must have a `run.json`.
    pub fn find(run: &str) -> Result<Self> {
        let p = Path::new(run);
        let path = if p.is_dir() {
            p.to_path_buf()
        } else if p.file_name().is_some_and(|n| n == "qmp.sock") && p.parent().is_some() {
            p.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            Self::root()?.join(run)
        };
        let dir = Self { path };
        if !dir.record_path().exists() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no run {run:?} (looked for {}); `capsule run` prints the id, `capsule ps` lists them", dir.record_path().display()),
            ));
        }
        Ok(dir)
    }

    /// The runs under [`RunDir::root`] that have a readable `run.json`, by id.
    pub fn list() -> Result<Vec<(RunDir, RunRecord)>> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(Self::root()?) else { return Ok(out) };
        for e in entries.flatten() {
            let dir = Self { path: e.path() };
            if let Ok(rec) = dir.record() {
                out.push((dir, rec));
            }
        }
        out.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        Ok(out)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// `run.json`.
    pub fn record_path(&self) -> PathBuf {
        self.path.join("run.json")
    }
    /// QEMU's QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.path.join("qmp.sock")
    }
    /// Where `run` mounts the capsule when it is not given a mount.
    pub fn mountpoint(&self) -> PathBuf {
        self.path.join("mnt")
    }
    /// The device state a suspend saves.
    pub fn devstate(&self) -> PathBuf {
        self.path.join("devstate.bin")
    }
    /// The guest's serial console, unless the user names another file.
    pub fn serial_log(&self) -> PathBuf {
        self.path.join("serial.log")
    }
    /// Stand-ins for a resume's boot files.
    pub fn boot_standins(&self) -> PathBuf {
        self.path.join("boot-standin")
    }

    /// Creates the directory; refuses if a live run already uses it.
    pub fn create(&self) -> Result<()> {
        if let Ok(rec) = self.record() {
            if Path::new(&format!("/proc/{}", rec.run_pid)).exists() {
                return Err(Error::new(ErrorKind::Busy, format!("a run named {} is already going ({}); pick another --id", rec.id, self.path.display())));
            }
        }
        std::fs::create_dir_all(&self.path).map_err(|e| Error::io(format!("creating {}", self.path.display()), e))
    }

    /// Removes the directory and all in it.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }

    /// Reads `run.json`.
    pub fn record(&self) -> Result<RunRecord> {
        read_json(&self.record_path())
    }

    /// Writes `run.json` (whole or not at all: `suspend` and `ps` may read it any time).
    pub fn write_record(&self, rec: &RunRecord) -> Result<()> {
        write_json(&self.record_path(), rec)
    }

    /// `suspended.json`, if a suspend finished.
    pub fn suspended(&self) -> Result<Option<Suspended>> {
        let path = self.path.join("suspended.json");
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }

    /// Writes `suspended.json`.
    pub fn write_suspended(&self, s: &Suspended) -> Result<()> {
        write_json(&self.path.join("suspended.json"), s)
    }

    /// Takes `suspend.lock` for a suspend; fails at once if another holds it.
    pub fn try_lock_suspend(&self, id: &str) -> Result<SuspendLock> {
        let file = self.lock_file()?;
        file.try_lock().map_err(|_| Error::new(ErrorKind::Busy, format!("run {id} is already being suspended")))?;
        Ok(SuspendLock { _file: file })
    }

    /// Waits for a suspend in progress (if any) to finish its commit.
    pub fn wait_suspend(&self) -> Result<SuspendLock> {
        let file = self.lock_file()?;
        file.lock().map_err(|e| Error::io("suspend.lock", e))?;
        Ok(SuspendLock { _file: file })
    }

    fn lock_file(&self) -> Result<File> {
        let path = self.path.join("suspend.lock");
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| Error::io(path.display(), e))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(path).and_then(|f| f.take(MAX_STATE_FILE).read_to_end(&mut bytes)).map_err(|e| Error::io(path.display(), e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::new(ErrorKind::Invalid, format!("{}: {e}", path.display())))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::new(ErrorKind::Invalid, format!("{}: {e}", path.display())))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| Error::io(path.display(), e))
}

/// Makes `dir` 0700, or accepts it only if it is a real directory owned by `uid` that
/// nobody else can write (one merely readable by others is tightened to 0700).
fn private_dir(dir: &Path, uid: u32) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(Error::io(format!("creating {}", dir.display()), e)),
        _ => {}
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| Error::io(format!("checking {}", dir.display()), e))?;
    let refuse =
        |why: String| Error::new(ErrorKind::Invalid, format!("{} {why}; refusing to keep runs there (remove it, or set CAPSULE_RUN_DIR)", dir.display()));
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
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(format!("chmod 700 {}", dir.display()), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::qemu::Accel;

    #[test]
    fn records_round_trip_and_hostile_hints_in_run_json_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RunDir { path: tmp.path().join("r1") };
        dir.create().unwrap();
        let rec = RunRecord {
            id: "r1".into(),
            capsule: "guest".into(),
            mountpoint: dir.mountpoint(),
            mount: Some(MountInfo {
                capsule_id: capsule_images::Hash::of(b"guest"),
                name: "guest".into(),
                cache_store: "/cache".into(),
                overlay_dir: Some("/cache/cow/ab".into()),
                source: "local".into(),
                pid: 3,
                files: vec![("root.raw".into(), capsule_images::Slot::Disk("root".into())), ("memory.raw".into(), capsule_images::Slot::Memory)],
                kernel_readahead: Some(0),
            }),
            qemu_pid: 1,
            run_pid: 2,
            qmp: dir.qmp_socket(),
            memory_on_mount: true,
            hints: QemuHints { machine: Some("pc-i440fx-7.2".into()), accel: Some(Accel::Tcg), ..Default::default() },
        };
        dir.write_record(&rec).unwrap();
        // A record an older `capsule run` wrote has no `mount`: it still reads.
        let mut old: serde_json::Value = serde_json::to_value(&rec).unwrap();
        old.as_object_mut().unwrap().remove("mount");
        let back: RunRecord = serde_json::from_value(old).unwrap();
        assert_eq!(back.mount, None);
        assert_eq!(dir.record().unwrap(), rec);
        let text = std::fs::read_to_string(dir.record_path()).unwrap();
        assert!(text.contains("\"qemu.machine\": \"pc-i440fx-7.2\""), "hints keep their keys on disk: {text}");
        std::fs::write(dir.record_path(), text.replace("pc-i440fx-7.2", "pc,initrd=/etc/shadow")).unwrap();
        assert!(dir.record().unwrap_err().to_string().contains("hint qemu.machine"));

        assert_eq!(dir.suspended().unwrap(), None);
        let s = Suspended { name: "child".into(), id: "cd".into() };
        dir.write_suspended(&s).unwrap();
        assert_eq!(dir.suspended().unwrap(), Some(s));
    }

    #[test]
    fn one_suspend_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RunDir { path: tmp.path().to_path_buf() };
        let held = dir.try_lock_suspend("r1").unwrap();
        assert_eq!(dir.try_lock_suspend("r1").unwrap_err().kind(), ErrorKind::Busy);
        drop(held);
        dir.wait_suspend().unwrap();
    }
}
