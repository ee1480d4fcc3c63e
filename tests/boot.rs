//! The test guest, imported with its update as a child capsule and exported as a qcow2
//! chain, boots in a real QEMU (TCG) to its marker.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn child_capsule_exported_as_qcow2_chain_boots_in_qemu() {
    let guest = guest_dir();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    ok(capsule(&store)
        .args(["import", "guest", "--cmdline", "console=ttyS0", "--disk"])
        .arg(format!("root={}", guest.join("disk.raw").display()))
        .arg("--kernel")
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initrd.gz")));
    ok(capsule(&store).args(["import", "guest-update", "--parent", "guest", "--disk"]).arg(format!("root={}", guest.join("disk-update.raw").display())));
    let out = dir.path().join("export");
    ok(capsule(&store).args(["export", "guest-update", "--format", "qcow2", "--out"]).arg(&out));
    let drive = format!("file={},format=qcow2,if=virtio,snapshot=on", out.join("root.qcow2").display());
    let console = boot_guest(&out.join("vmlinuz"), &out.join("initrd.img"), &drive, "gmode=boot", "CAPSULE-GUEST-MARKER boot-ok", 120);
    assert!(console.contains("CAPSULE-GUEST-VERSION 2"), "the updated disk booted, not the base:\n{console}");
    assert!(!console.contains("CAPSULE-GUEST-ERROR"), "{console}");
}
