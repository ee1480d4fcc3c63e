//! A Cloud Hypervisor snapshot directory imported as a capsule and mounted is a complete
//! snapshot directory again: same bytes, paths pointing into the mount. Cloud Hypervisor
//! itself needs KVM, which the test machines lack, so its command line is checked, not run.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn a_cloud_hypervisor_snapshot_round_trips_through_a_capsule_mount() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snapshot");
    std::fs::create_dir_all(&snap).unwrap();
    let disk = dir.path().join("os-disk.raw");
    let mut disk_bytes = pseudo_random(3 << 20, 7);
    disk_bytes.extend(vec![0u8; 1 << 20]);
    std::fs::write(&disk, &disk_bytes).unwrap();
    let kernel = guest_dir().join("vmlinuz");
    let config = serde_json::json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 8u64 << 20, "shared": false},
        "payload": {"kernel": kernel, "cmdline": "console=ttyS0 root=/dev/vda"},
        "disks": [{"path": disk, "readonly": false, "id": "_disk0"}],
        "serial": {"mode": "Tty"},
    });
    std::fs::write(snap.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let state = br#"{"snapshots":{"cpu-manager":{"id":"cpu-manager","snapshot_data":"AAAA"}}}"#;
    std::fs::write(snap.join("state.json"), state).unwrap();
    let mut memory = vec![0u8; 4 << 20];
    memory.extend(pseudo_random(4 << 20, 9));
    std::fs::write(snap.join("memory-ranges"), &memory).unwrap();

    let store = dir.path().join("store");
    ok(capsule(&store).args(["import-snapshot", "chv-vm"]).arg(&snap));
    let m = Mounted::new(&store, &dir.path().join("cfg"), "chv-vm", &dir.path().join("mnt"), &dir.path().join("cache"), &["--read-only"]);
    assert_eq!(std::fs::read(m.dir.join("state.json")).unwrap(), state);
    assert_eq!(std::fs::read(m.dir.join("memory-ranges")).unwrap(), memory);
    let on_mount: serde_json::Value = serde_json::from_slice(&std::fs::read(m.dir.join("config.json")).unwrap()).unwrap();
    // The mapping the import promises (vmm-glue/src/cloud_hypervisor.rs): disks[i] becomes
    // `disk<i>.raw` and the kernel `vmlinuz`, both in the mount; all else is the snapshot's.
    let mut expected = config.clone();
    expected["disks"][0]["path"] = m.dir.join("disk0.raw").to_str().unwrap().into();
    expected["payload"]["kernel"] = m.dir.join("vmlinuz").to_str().unwrap().into();
    assert_eq!(on_mount, expected);
    assert_eq!(std::fs::read(m.dir.join("disk0.raw")).unwrap(), disk_bytes);
    assert_eq!(std::fs::read(m.dir.join("vmlinuz")).unwrap(), std::fs::read(&kernel).unwrap());

    let runs = dir.path().join("runs");
    let line = ok(capsule(&store).env("CAPSULE_RUN_DIR", &runs).arg("run").arg(&m.dir).args(["--dry-run"]));
    assert!(line.starts_with("cloud-hypervisor --api-socket"), "{line}");
    assert!(line.contains(&format!("--restore source_url=file://{}", m.dir.display())), "{line}");
    // Not installed here: a clear error that still shows what would run.
    let err = fails(capsule(&store).env("CAPSULE_RUN_DIR", &runs).env("CAPSULE_CLOUD_HYPERVISOR", "/nonexistent/cloud-hypervisor").arg("run").arg(&m.dir));
    assert!(err.contains("is not installed") && err.contains("--restore"), "{err}");
}
