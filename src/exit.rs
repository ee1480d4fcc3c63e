//! Exit codes, so a script can tell Capsule's own failures from the guest's.
//!
//! ```text
//!   0    success (a run: the guest powered off cleanly)
//!   1    Capsule failed (the message says what and where)
//!   2    bad usage (clap)
//!   3    `verify` found damage (each problem is listed; the store is readable)
//!   64+N a run: the guest ended with status N (QEMU's exit code; N = 1..=63, clamped)
//!  125   a run: the hypervisor was killed by a signal
//! ```

use std::process::ExitStatus;

/// Capsule failed.
pub const FAILURE: u8 = 1;
/// `verify` found damaged or missing objects or blocks.
pub const DAMAGED: u8 = 3;
/// Added to the guest's (hypervisor's) non-zero exit status.
pub const GUEST_BASE: u8 = 64;
/// The hypervisor died of a signal.
pub const GUEST_SIGNALLED: u8 = 125;

/// The exit code of a run whose hypervisor ended with `status` (`run --json` reports it).
pub fn guest_code(status: ExitStatus) -> u8 {
    match status.code() {
        Some(0) => 0,
        Some(n) => GUEST_BASE + n.clamp(1, 63) as u8,
        None => GUEST_SIGNALLED,
    }
}
