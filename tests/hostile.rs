//! Issue 11: what comes from outside (a capsule, a server, a client, another local user)
//! cannot reach the host. Each test attacks through the real CLI, server and mounts.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;

/// A suspended capsule (device state present, so its `qemu.*` hints are used) with `hints`.
fn import_suspended(store: &Path, dir: &Path, name: &str, hints: &[&str]) {
    let disk = dir.join(format!("{name}.disk"));
    std::fs::write(&disk, pseudo_random(256 << 10, 3)).unwrap();
    let devstate = dir.join(format!("{name}.devstate"));
    std::fs::write(&devstate, b"QEVM not really").unwrap();
    let mut cmd = capsule(store);
    cmd.args(["import", name, "--ram", "16M", "--block-size", "4K", "--disk"]).arg(format!("root={}", disk.display())).arg("--devstate").arg(&devstate);
    for h in hints {
        cmd.args(["--hint", h]);
    }
    ok(&mut cmd);
}

#[test]
fn hostile_hypervisor_hints_are_refused_before_any_hypervisor_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (store, runs, cfg) = (dir.path().join("store"), dir.path().join("runs"), dir.path().join("cfg"));
    import_suspended(&store, dir.path(), "good", &["qemu.machine=pc-i440fx-7.2", "qemu.accel=tcg", "qemu.capabilities=x-ignore-shared"]);
    import_suspended(&store, dir.path(), "evil-machine", &["qemu.machine=pc,initrd=/etc/shadow"]);
    import_suspended(&store, dir.path(), "evil-caps", &["qemu.capabilities=x-ignore-shared,postcopy-ram"]);
    import_suspended(&store, dir.path(), "evil-append", &["qemu.append=console=ttyS0\u{1b}[2J"]);
    let server = ServerProcess::start(&store, &["--public-read"]);
    let run = |source: &str| {
        let mut c = client(&dir.path().join("client-store"), &cfg);
        c.env("CAPSULE_RUN_DIR", &runs).args(["run", source, "--accel", "tcg", "--dry-run", "--cache"]).arg(dir.path().join("cache"));
        c
    };

    // The control: the same kind of capsule with honest hints runs (dry) with them.
    let line = ok(&mut run(&format!("{}/good", server.url)));
    assert!(line.contains("-machine pc-i440fx-7.2,accel=tcg,memory-backend=capsule-ram"), "{line}");

    // Pulled from a server, a machine type carrying options is refused, naming the hint,
    // its value and the capsule; nothing of it reaches a command line.
    let err = fails(&mut run(&format!("{}/evil-machine", server.url)));
    assert!(err.contains("capsule evil-machine") && err.contains("refusing to run it"), "{err}");
    assert!(err.contains(r#"hint qemu.machine = "pc,initrd=/etc/shadow": not a machine type name"#), "{err}");
    assert!(!err.contains("-machine pc"), "{err}");
    let err = fails(&mut run(&format!("{}/evil-caps", server.url)));
    assert!(err.contains("capsule evil-caps") && err.contains(r#""postcopy-ram" is not a migration capability"#), "{err}");
    let err = fails(&mut run(&format!("{}/evil-append", server.url)));
    assert!(err.contains("capsule evil-append") && err.contains("hint qemu.append") && err.contains("not a kernel command line"), "{err}");
    // Every refused run unmounted what it mounted.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(runs.to_str().unwrap()), "a refused run left a mount:\n{mounts}");
}

#[test]
fn a_cloud_hypervisor_config_naming_host_files_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, runs) = (dir.path().join("store"), dir.path().join("runs"));
    let good = r#"chv.config={"disks":[{"path":"@CAPSULE_MOUNT@/root.raw"}],"payload":{"cmdline":"root=/dev/vda"},"rng":{"src":"/dev/urandom"}}"#;
    let evil = r#"chv.config={"disks":[{"path":"@CAPSULE_MOUNT@/root.raw"},{"path":"/etc/shadow"}],"serial":{"mode":"File","file":"/root/.bashrc"}}"#;
    let climb = r#"chv.config={"disks":[{"path":"@CAPSULE_MOUNT@/../../../etc/shadow"}]}"#;
    import_suspended(&store, dir.path(), "chv-good", &[good]);
    import_suspended(&store, dir.path(), "chv-evil", &[evil]);
    import_suspended(&store, dir.path(), "chv-climb", &[climb]);
    let run = |name: &str| {
        let mut c = capsule(&store);
        c.env("CAPSULE_RUN_DIR", &runs).args(["run", name, "--hypervisor", "cloud-hypervisor", "--dry-run", "--cache"]).arg(dir.path().join("cache"));
        c
    };
    let line = ok(&mut run("chv-good"));
    assert!(line.contains("--restore source_url=file://"), "{line}");
    let err = fails(&mut run("chv-evil"));
    assert!(err.contains("capsule chv-evil") && err.contains("refusing to run it"), "{err}");
    assert!(err.contains(r#"hint chv.config: config.disks[1].path = "/etc/shadow" is outside the mount"#), "{err}");
    assert!(!err.contains("--restore"), "{err}");
    let err = fails(&mut run("chv-climb"));
    assert!(err.contains("config.disks[0].path") && err.contains("/../../../etc/shadow\" is outside the mount"), "{err}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(runs.to_str().unwrap()), "a refused run left a mount:\n{mounts}");
}
