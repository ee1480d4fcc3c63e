//! Starting QEMU so a fault on mount-backed guest RAM reads one page, not 2–4 MiB.
//!
//! QEMU marks guest RAM `MADV_HUGEPAGE`; on a file mapping the kernel then reads a whole
//! huge page around every fault (measured: ~72 MiB fetched within 1 s of a resume). The
//! binary stays unmodified: the process that execs QEMU installs a seccomp filter first
//! that makes `madvise(..., MADV_HUGEPAGE)` return 0 without doing anything. The filter
//! survives `exec`; every other syscall, and every other advice, is untouched. With the
//! mount's kernel readahead at 0 as well, a fault reads exactly its page.

use std::collections::BTreeMap;
use std::convert::TryInto;

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch};

use crate::error::{Error, ErrorKind, Result};

/// `MADV_HUGEPAGE` from <linux/mman.h> (the same on every architecture).
const MADV_HUGEPAGE: u64 = 14;
/// `madvise` on x86_64.
#[cfg(target_arch = "x86_64")]
const SYS_MADVISE: i64 = 28;
#[cfg(target_arch = "aarch64")]
const SYS_MADVISE: i64 = 233;

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// The filter: `madvise(addr, len, MADV_HUGEPAGE)` returns 0 unexecuted; all else runs.
pub fn no_hugepage_filter() -> Result<BpfProgram> {
    let cond = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, MADV_HUGEPAGE)
        .map_err(|e| Error::new(ErrorKind::Invalid, format!("seccomp condition: {e}")))?;
    let rule = SeccompRule::new(vec![cond]).map_err(|e| Error::new(ErrorKind::Invalid, format!("seccomp rule: {e}")))?;
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [(SYS_MADVISE, vec![rule])].into_iter().collect();
    // Errno(0): the kernel skips the call and returns 0, so QEMU sees success.
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(0), ARCH)
        .map_err(|e| Error::new(ErrorKind::Invalid, format!("seccomp filter: {e}")))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| Error::new(ErrorKind::Invalid, format!("seccomp program: {e}")))
}

/// Installs the filter on this process (and so on whatever it execs next).
pub fn disable_hugepage_advice() -> Result<()> {
    let program = no_hugepage_filter()?;
    seccompiler::apply_filter(&program).map_err(|e| Error::new(ErrorKind::Unsupported, format!("installing the seccomp filter: {e}")))
}
