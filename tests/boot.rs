//! The test guest, imported with its update as a child capsule and exported as a qcow2
//! chain, boots in a real QEMU (TCG) to its marker.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn child_capsule_exported_as_qcow2_chain_boots_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    import_guest(&store, true);
    import_guest_update(&store);
    let out = dir.path().join("export");
    ok(capsule(&store).args(["export", "guest-update", "--format", "qcow2", "--out"]).arg(&out));
    let drive = format!("file={},format=qcow2,if=virtio,snapshot=on", out.join("root.qcow2").display());
    let console = boot_guest(&out.join("vmlinuz"), &out.join("initrd.img"), &drive, "gmode=boot", "CAPSULE-GUEST-MARKER boot-ok", 120);
    assert!(console.contains("CAPSULE-GUEST-VERSION 2"), "the updated disk booted, not the base:\n{console}");
    assert!(!console.contains("CAPSULE-GUEST-ERROR"), "{console}");
}

#[test]
fn a_remote_capsule_cold_boots_from_the_mount_on_an_empty_cache() {
    let dir = tempfile::tempdir().unwrap();
    let server_store = dir.path().join("server");
    import_guest(&server_store, true);
    let server = ServerProcess::start(&server_store, &["--public-read"]);
    let m = Mounted::new(
        &dir.path().join("client"),
        &dir.path().join("cfg"),
        &format!("{}/guest", server.url),
        &dir.path().join("mnt"),
        &dir.path().join("cache"),
        &["--read-only"],
    );
    let console = boot_from_mount(&m);
    assert!(console.contains("CAPSULE-GUEST-VERSION 1"), "{console}");
    let stats = m.stats();
    let disk_blocks = std::fs::metadata(guest_dir().join("disk.raw")).unwrap().len() / 65536;
    let fetched = stats["files"]["root.raw"]["fetched_blocks"].as_u64().unwrap();
    // Of the disk (its size from the image itself) the boot needs some blocks, far from all.
    assert!(fetched > 0 && fetched < disk_blocks / 4, "the boot fetched {fetched} disk blocks; the disk has {disk_blocks}: {stats}");
}
