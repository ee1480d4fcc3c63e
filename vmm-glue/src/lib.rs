//! # capsule-vmm-glue (stub; filled by the run/suspend/resume issue)
//!
//! Will start unmodified hypervisors from a mounted capsule: QEMU first (cold boot from
//! the raw disks, resume from the memory image with `x-ignore-shared`), Cloud Hypervisor
//! through the same files, and talk QMP over its Unix socket. The accelerator is an
//! option that picks KVM only when it actually works, else TCG.
