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
//! Suspend and resume are sequences of QMP commands; the CLI (`capsule run`, `capsule
//! suspend`) owns the processes and the mount, this crate owns the hypervisor dialogue.

pub mod cloud_hypervisor;
pub mod error;
pub mod launcher;
pub mod qemu;
pub mod qmp;

pub use error::{Error, ErrorKind, Result};
