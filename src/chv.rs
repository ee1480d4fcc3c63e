//! `capsule run --hypervisor cloud-hypervisor` and `capsule import-snapshot`.
//!
//! Cloud Hypervisor needs KVM. Where it is installed and KVM works, `run` starts it on the
//! mount's files; elsewhere `--dry-run` prints the command line it would run.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{bail, Context, Result};
use capsule_images::VmFile;
use capsule_vmm_glue::cloud_hypervisor as chv;

use crate::args::RunArgs;

/// Starts Cloud Hypervisor on the mount's snapshot (or with `--dry-run` prints its
/// command line); returns its exit status, `None` for a dry run.
pub fn run(args: &RunArgs, mnt: &Path, vm: &VmFile, dir: &Path) -> Result<Option<ExitStatus>> {
    let binary = std::env::var_os("CAPSULE_CLOUD_HYPERVISOR").unwrap_or_else(|| "cloud-hypervisor".into());
    let argv = chv::command_line(mnt, vm, args.read_only, &dir.join("ch.sock"), args.serial_log.as_deref(), &args.extra)
        .with_context(|| format!("capsule {} ({}): refusing to run it", vm.capsule, args.source))?;
    let line = capsule_vmm_glue::qemu::shell_line(&binary, &argv);
    if args.dry_run {
        crate::report::print_dry_run(args.json, PathBuf::from(&binary), argv, line)?;
        return Ok(None);
    }
    let mut cmd = Command::new(&binary);
    if args.json {
        // Its console goes where QEMU's does with --json: stderr, so stdout is the report.
        cmd.stdout(std::io::stderr());
    }
    match cmd.args(&argv).status() {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} is not installed (set CAPSULE_CLOUD_HYPERVISOR to its path); the command line would be:\n{line}", binary.to_string_lossy())
        }
        Err(e) => Err(e).with_context(|| format!("starting {}", binary.to_string_lossy())),
    }
}

/// Imports a Cloud Hypervisor snapshot directory as capsule `name`.
pub fn import_snapshot(store: &capsule_images::Store, name: &str, dir: &Path, block_size_log2: Option<u8>) -> Result<capsule_images::ImportReport> {
    let snap = chv::read_snapshot(dir)?;
    let spec = capsule_images::CapsuleSpec {
        name: name.to_string(),
        disks: snap.disks.clone(),
        memory: Some(snap.memory.clone()),
        devstate: Some(snap.state.clone()),
        kernel: snap.kernel.clone(),
        initrd: snap.initrd.clone(),
        cmdline: snap.cmdline.clone(),
        block_size_log2,
        cpus: Some(snap.cpus),
        memory_mib: (snap.memory_mib > 0).then_some(snap.memory_mib),
        hypervisor: Some("cloud-hypervisor".into()),
        hints: vec![(chv::CONFIG_HINT.to_string(), snap.config_template.clone())],
        // Cloud Hypervisor opens the files itself: the mount gives back the same bytes.
        disk_format: Some(capsule_images::DiskFormat::Raw),
        ..Default::default()
    };
    capsule_images::import_capsule(store, &spec, &crate::progress::Bar::new()).with_context(|| format!("importing snapshot {}", dir.display()))
}
