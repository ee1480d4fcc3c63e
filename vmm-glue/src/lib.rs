//! # capsule-vmm-glue
//!
//! Starts unmodified hypervisors from a mounted capsule and drives them.
//!
//! - [`qemu`]: the QEMU command line (raw disks from the mount, guest RAM in the mount's
//!   `memory.raw` as a shared file mapping, a balloon, QMP) and whether KVM really works.
//! - [`qmp`]: a small synchronous QMP client (serde_json over the Unix socket).
//! - [`launcher`]: the seccomp filter that keeps QEMU's `MADV_HUGEPAGE` from turning every
//!   guest-RAM fault into a 2–4 MiB read of the mount.
//! - [`cloud_hypervisor`]: Cloud Hypervisor snapshots as capsules, and its command line.
//!
//! - [`session`]: a VM's life in QMP steps: start, resume, balloon to what the guest uses,
//!   suspend to a device-state file, stop.
//! - [`state`]: a run's directory and the typed files its processes hand each other
//!   (`run.json`, `suspend.lock`, `suspended.json`).
//!
//! The CLI (`capsule run`, `capsule suspend`) wires a mount, a session and a printer; this
//! crate owns the hypervisor dialogue.

pub mod cloud_hypervisor;
pub mod error;
pub mod launcher;
pub mod qemu;
pub mod qmp;
pub mod session;
pub mod state;

pub use error::{Error, ErrorKind, Result};

use std::path::Path;

use capsule_images::{Manifest, MountLayout};

/// How a mount shows capsule `m` at `mountpoint`, for the hypervisor that will read it: a
/// Cloud Hypervisor snapshot's names and config ([`cloud_hypervisor::snapshot_layout`]),
/// else each image slot under its own file name (what the QEMU command line names). The
/// mount (`capsule-fs`) takes this as its `MountConfig::layout`.
pub fn mount_layout(m: &Manifest, mountpoint: &Path) -> MountLayout {
    cloud_hypervisor::snapshot_layout(m, mountpoint).unwrap_or_default()
}
