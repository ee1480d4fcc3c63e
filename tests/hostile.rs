//! Issue 11: what comes from outside (a capsule, a server, a client, another local user)
//! cannot reach the host. Each test attacks through the real CLI, server and mounts.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

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

/// Records profile `boot` of local capsule `name` by reading `range` of its disk.
fn record_profile(store: &Path, dir: &Path, name: &str, range: std::ops::Range<u64>) {
    let tag = store.file_name().unwrap().to_str().unwrap();
    let m = Mounted::new(
        store,
        &dir.join("cfg"),
        name,
        &dir.join(format!("mnt-{tag}")),
        &dir.join(format!("cache-{tag}")),
        &["--read-only", "--record-profile", "boot"],
    );
    pread(&m.dir.join("root.raw"), range.start, (range.end - range.start) as usize).unwrap();
}

fn server_profile(server_store: &Path, name: &str) -> String {
    let v = inspect(server_store, name);
    v["profiles"].as_array().unwrap().iter().find(|p| p["name"] == "boot").map(|p| p["id"].as_str().unwrap().to_string()).unwrap_or_default()
}

#[test]
fn scopes_cover_whole_segments_profiles_and_tokens_can_be_listed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (srv, victim, attacker, cfg) = (d.join("srv"), d.join("victim"), d.join("attacker"), d.join("cfg"));
    let token = |scope: &str, prefix: &str| -> serde_json::Value {
        serde_json::from_str(&ok(capsule(&srv).args(["token", "create", "--json", "--scope", scope, "--prefix", prefix]))).unwrap()
    };
    let (team_a, team_b, team) = (token("write", "teamA"), token("write", "teamB/"), token("write", "team"));
    let tok = |t: &serde_json::Value| t["token"].as_str().unwrap().to_string();
    let mode = std::fs::metadata(srv.join("server/tokens.json")).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600, "tokens.json must be private");
    let server = ServerProcess::start(&srv, &["--public-read"]);

    // The victim publishes teamB/vm with its boot profile.
    let disk = d.join("vm.disk");
    std::fs::write(&disk, pseudo_random(1 << 20, 11)).unwrap();
    ok(capsule(&victim).args(["import", "vm", "--block-size", "4K", "--disk"]).arg(format!("root={}", disk.display())));
    record_profile(&victim, d, "vm", 0..64 << 10);
    ok(client(&victim, &cfg).args(["push", "vm", &format!("{}/teamB/vm", server.url), "--token", &tok(&team_b)]));
    let published = server_profile(&srv, "teamB/vm");
    assert!(!published.is_empty());

    // The attacker (write token for teamA) takes the same capsule, records another
    // profile, points its own ref at the capsule and pushes: the profile is refused.
    ok(client(&attacker, &cfg).args(["pull", &format!("{}/teamB/vm", server.url), "--as", "vm"]));
    record_profile(&attacker, d, "vm", 512 << 10..1 << 20);
    assert_ne!(inspect(&attacker, "vm")["profiles"][0]["id"].as_str().unwrap(), published);
    let err = fails(client(&attacker, &cfg).args(["push", "vm", &format!("{}/teamA/vm", server.url), "--token", &tok(&team_a)]));
    assert!(err.contains("access denied"), "{err}");
    assert_eq!(server_profile(&srv, "teamB/vm"), published, "teamA replaced teamB's profile");

    // Prefix `team` is the segment `team`: team/vm yes, teamX/vm no.
    std::fs::write(d.join("other.disk"), pseudo_random(64 << 10, 12)).unwrap();
    ok(capsule(&victim).args(["import", "other", "--block-size", "4K", "--disk"]).arg(format!("root={}", d.join("other.disk").display())));
    ok(client(&victim, &cfg).args(["push", "other", &format!("{}/team/vm", server.url), "--token", &tok(&team)]));
    let err = fails(client(&victim, &cfg).args(["push", "other", &format!("{}/teamX/vm", server.url), "--token", &tok(&team)]));
    assert!(err.contains("access denied"), "{err}");

    // Listed by id (never the token itself), revoked by id, refused from the next request.
    let list = ok(capsule(&srv).args(["token", "list"]));
    for t in [&team_a, &team_b, &team] {
        assert!(list.contains(t["id"].as_str().unwrap()) && !list.contains(&tok(t)), "{list}");
    }
    let out = ok(capsule(&srv).args(["token", "revoke", team["id"].as_str().unwrap()]));
    assert!(out.contains(&format!("revoked token {}", team["id"].as_str().unwrap())), "{out}");
    assert!(!ok(capsule(&srv).args(["token", "list"])).contains(team["id"].as_str().unwrap()));
    let err = fails(client(&victim, &cfg).args(["push", "other", &format!("{}/team/vm2", server.url), "--token", &tok(&team)]));
    assert!(err.contains("access denied"), "{err}");
    let err = fails(capsule(&srv).args(["token", "revoke", team["id"].as_str().unwrap()]));
    assert!(err.contains("no token with id"), "{err}");
    let mode = std::fs::metadata(srv.join("server/tokens.json")).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
}

#[test]
fn umount_touches_only_capsule_mounts_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let empty = d.join("not a mount");
    std::fs::create_dir_all(&empty).unwrap();
    let err = fails(capsule(&d.join("store")).arg("umount").arg(&empty));
    assert!(err.contains(&format!("{} is not a capsule mount; nothing unmounted", empty.display())) && !err.contains("unmounted /"), "{err}");
    let err = fails(capsule(&d.join("store")).arg("umount").arg(d.join("missing")));
    assert!(err.contains("is not a capsule mount"), "{err}");
    // A real one still unmounts (its path has a space: mountinfo escapes it).
    std::fs::write(d.join("disk"), pseudo_random(64 << 10, 5)).unwrap();
    ok(capsule(&d.join("store")).args(["import", "vm", "--disk"]).arg(format!("root={}", d.join("disk").display())));
    let m = Mounted::new(&d.join("store"), &d.join("cfg"), "vm", &d.join("mnt x"), &d.join("cache"), &["--read-only"]);
    let out = ok(capsule(&d.join("store")).arg("umount").arg(&m.dir));
    assert!(out.contains(&format!("unmounted {}", m.dir.display())), "{out}");
    assert!(!m.dir.join("capsule.json").exists());
}

#[test]
fn the_mount_daemon_does_not_show_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("disk"), pseudo_random(64 << 10, 6)).unwrap();
    ok(capsule(&d.join("srv")).args(["import", "vm", "--disk"]).arg(format!("root={}", d.join("disk").display())));
    let token = ok(capsule(&d.join("srv")).args(["token", "create", "--scope", "read"])).trim().to_string();
    let server = ServerProcess::start(&d.join("srv"), &[]);
    let m =
        Mounted::new(&d.join("client"), &d.join("cfg"), &format!("{}/vm", server.url), &d.join("mnt"), &d.join("cache"), &["--read-only", "--token", &token]);
    // The token reached the daemon (a read fetches through the server, which wants it)...
    assert_eq!(std::fs::read(m.dir.join("root.raw")).unwrap(), pseudo_random(64 << 10, 6));
    // ...but not its command line, which every local user can read.
    let pid = m.pid().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("--foreground") && !cmdline.contains(&token) && !cmdline.contains("--token"), "{cmdline}");
}

/// Removes a directory on drop (also when the test fails).
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_tmp_run_directory_must_be_private_and_ours() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // As `nobody`, whose fallback run directory no real user of this machine needs.
    let nobody = 65534u32;
    let runs = std::path::PathBuf::from(format!("/tmp/capsule-runs-{nobody}"));
    let _ = std::fs::remove_dir_all(&runs);
    let _cleanup = RemoveDir(runs.clone());
    let ps = || {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(env!("CARGO_BIN_EXE_capsule")).arg("ps");
        c.env_remove("CAPSULE_RUN_DIR").env_remove("XDG_RUNTIME_DIR").env("HOME", "/nonexistent");
        c
    };
    // Planted by someone else (root here): refused.
    std::fs::create_dir(&runs).unwrap();
    let err = fails(&mut ps());
    assert!(err.contains(&format!("{} belongs to uid 0, not to uid {nobody}; refusing to keep runs there", runs.display())), "{err}");
    // Ours but writable by all: refused.
    std::os::unix::fs::chown(&runs, Some(nobody), Some(nobody)).unwrap();
    std::fs::set_permissions(&runs, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = fails(&mut ps());
    assert!(err.contains("is writable by others (mode 777)"), "{err}");
    // A symlink to somewhere else: refused.
    std::fs::remove_dir(&runs).unwrap();
    std::os::unix::fs::symlink("/tmp", &runs).unwrap();
    let err = fails(&mut ps());
    assert!(err.contains("is not a directory"), "{err}");
    std::fs::remove_file(&runs).unwrap();
    // Absent: made 0700 and owned by its user.
    ok(&mut ps());
    let m = std::fs::symlink_metadata(&runs).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (nobody, 0o700));
}

#[test]
fn other_local_users_cannot_read_a_root_mount() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // `nobody` must reach the mount point to be refused by the mount itself.
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(d.join("disk"), pseudo_random(64 << 10, 8)).unwrap();
    ok(capsule(&d.join("store")).args(["import", "vm", "--ram", "1M", "--disk"]).arg(format!("root={}", d.join("disk").display())));
    let as_nobody = |args: &[&str], file: &Path| {
        let out = std::process::Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).args(args).arg(file).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for (mnt, extra) in [("ro", &["--read-only"][..]), ("rw", &[][..])] {
        let m = Mounted::new(&d.join("store"), &d.join("cfg"), "vm", &d.join(mnt), &d.join(format!("cache-{mnt}")), extra);
        assert_eq!(std::fs::read(m.dir.join("root.raw")).unwrap(), pseudo_random(64 << 10, 8), "the owner reads");
        let files: &[&str] = if extra.is_empty() { &["root.raw", "memory.raw"] } else { &["root.raw"] };
        for f in files {
            let (read, err) = as_nobody(&["cat"], &m.dir.join(f));
            assert!(!read && err.contains("Permission denied"), "nobody read {mnt}/{f}: {err}");
            let (wrote, err) = as_nobody(&["truncate", "-s", "0"], &m.dir.join(f));
            let refused = err.contains("Permission denied") || (mnt == "ro" && err.contains("Read-only file system"));
            assert!(!wrote && refused, "nobody wrote {mnt}/{f}: {err}");
        }
        // The VM description stays readable (it holds no guest data).
        assert!(as_nobody(&["cat"], &m.dir.join("capsule.json")).0);
    }
}

#[test]
fn qcow2_import_needs_its_format_named_and_follows_only_named_backing_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = d.join("store");
    // A host file the image's author wants to steal, and a qcow2 that names it as its backing.
    let secret = d.join("passwd");
    let mut secret_bytes = b"root:x:0:0:root:/root:/bin/bash\n".repeat(2048);
    secret_bytes.resize(1 << 20, b'#');
    std::fs::write(&secret, &secret_bytes).unwrap();
    let evil = d.join("evil.qcow2");
    tool(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&secret).arg(&evil).arg("1M"));
    let import = |name: &str, extra: &[&str]| {
        let mut c = capsule(&store);
        c.args(["import", name]).args(extra).arg("--disk").arg(format!("root={}", evil.display()));
        c
    };
    let secret_block = blake3::hash(&secret_bytes[..65536]).to_hex().to_string();
    let stolen = || stored_block_names(&store).contains(&secret_block);

    // Not named as qcow2: refused, not guessed.
    let err = fails(&mut import("a", &[]));
    assert!(err.contains("looks like qcow2") && err.contains("--disk-format qcow2"), "{err}");
    // Named qcow2: its backing file was not named, so it is refused unread.
    let err = fails(&mut import("b", &["--disk-format", "qcow2"]));
    assert!(err.contains(&format!("names backing file {:?}", secret.display().to_string())) && err.contains("--backing-file"), "{err}");
    assert!(!stolen(), "the refused backing file reached the store");
    // Raw: the qcow2 file's own bytes, nothing of its backing file.
    ok(&mut import("c", &["--disk-format", "raw"]));
    assert!(!stolen());
    ok(capsule(&store).args(["export", "c", "--out"]).arg(d.join("out-c")));
    assert!(std::fs::read(d.join("out-c/root.raw")).unwrap() == std::fs::read(&evil).unwrap());
    // A raw file named qcow2 is refused; an external data file (another host file) too.
    let err = fails(capsule(&store).args(["import", "e", "--disk-format", "qcow2", "--disk"]).arg(format!("root={}", secret.display())));
    assert!(err.contains("not a qcow2 file"), "{err}");
    let external = d.join("external.qcow2");
    // (qemu-img create truncates the data file it names: a copy of the secret.)
    let data_file = d.join("shadow");
    tool(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file={},data_file_raw=on", data_file.display()))
            .arg(&external)
            .arg("1M"),
    );
    std::fs::write(&data_file, &secret_bytes).unwrap();
    let err = fails(capsule(&store).args(["import", "f", "--disk-format", "qcow2", "--disk"]).arg(format!("root={}", external.display())));
    assert!(err.contains("external data file"), "{err}");
    // A backing file without a format in the header is not probed.
    let unformatted = d.join("unformatted.qcow2");
    // (qemu-img no longer writes one; older ones did: the format extension renamed away.)
    let mut bytes = std::fs::read(&evil).unwrap();
    let at = bytes.windows(4).position(|w| w == [0xe2, 0x79, 0x2a, 0xca]).unwrap();
    bytes[at..at + 4].copy_from_slice(&[0x00, 0x00, 0x0e, 0x57]);
    std::fs::write(&unformatted, bytes).unwrap();
    let err = fails(
        capsule(&store)
            .args(["import", "g", "--disk-format", "qcow2", "--backing-file"])
            .arg(&secret)
            .arg("--disk")
            .arg(format!("root={}", unformatted.display())),
    );
    assert!(err.contains("no format in the header"), "{err}");
    assert!(!stolen());
    // Named by the user, the same backing file is followed.
    ok(&mut import("h", &["--disk-format", "qcow2", "--backing-file", secret.to_str().unwrap()]));
    assert!(stolen(), "a named backing file is imported");
    ok(capsule(&store).args(["verify", "h"]));
}

#[test]
fn a_disk_named_like_the_ram_file_is_refused_not_shown_twice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("disk"), pseudo_random(64 << 10, 5)).unwrap();
    // Its file would be `memory.raw`, where a writable mount keeps the guest's RAM.
    ok(capsule(&d.join("store")).args(["import", "vm", "--ram", "64M", "--disk"]).arg(format!("memory={}", d.join("disk").display())));
    std::fs::create_dir_all(d.join("mnt")).unwrap();
    let err = fails(capsule(&d.join("store")).args(["mount", "vm"]).arg(d.join("mnt")).arg("--cache").arg(d.join("cache")));
    assert!(err.contains("two files named \"memory.raw\""), "{err}");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(d.to_str().unwrap()), "{mounts}");
}
