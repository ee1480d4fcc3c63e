//! Encrypted capsules end to end: keys, imports that store only ciphertext (deduplicated
//! under one key, shared by nothing across convergence secrets), real FUSE mounts that
//! decrypt, a tampered ciphertext that fails with EIO, and the test guest booting and
//! writing over real QUIC while the server's store never holds its marker.
#![allow(clippy::unwrap_used)]

mod common;

use capsule_images::{map, Entry, Hash};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest tests boot one QEMU at a time: two TCG guests on a busy 2-core machine starve
/// each other past their timeouts.
static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `capsule --store STORE` with the key directory `keys`.
fn cap(store: &Path, keys: &Path) -> Command {
    let mut c = capsule(store);
    c.env("CAPSULE_KEY_DIR", keys);
    c
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() && std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) => out.push(p),
                _ => {}
            }
        }
    }
    out
}

/// A 6 MiB disk: random blocks each carrying `marker` (random, so a plain store keeps them
/// uncompressed and the marker visible), a repeated block, zeros.
fn marked_disk(path: &Path, marker: &str) -> Vec<u8> {
    let mut disk = pseudo_random(4 << 20, 42);
    for block in disk.chunks_mut(65536) {
        block[1000..1000 + marker.len()].copy_from_slice(marker.as_bytes());
    }
    disk.extend(std::iter::repeat_n(b"same block ".as_slice(), (1 << 20) / 11).flatten());
    disk.resize(6 << 20, 0);
    std::fs::write(path, &disk).unwrap();
    disk
}

#[test]
fn encrypted_imports_store_only_ciphertext_dedup_under_one_key_and_mount_only_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, store) = (dir.path().join("keys"), dir.path().join("store"));
    let marker = format!("CAPSULE-CRYPT-MARKER-{}", std::process::id());
    let disk = marked_disk(&dir.path().join("disk.raw"), &marker);

    // Keys: 0600, never overwritten, listed with their ids.
    ok(cap(&store, &keys).args(["key", "create", "alice"]));
    ok(cap(&store, &keys).args(["key", "create", "carol"]));
    ok(cap(&store, &keys).args(["key", "create", "bob", "--convergence-secret"]));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(keys.join("alice")).unwrap().permissions().mode() & 0o777, 0o600);
    let before = std::fs::read(keys.join("alice")).unwrap();
    fails(cap(&store, &keys).args(["key", "create", "alice"]));
    assert_eq!(std::fs::read(keys.join("alice")).unwrap(), before, "an existing key was overwritten");
    let list: serde_json::Value = serde_json::from_str(&ok(cap(&store, &keys).args(["key", "list", "--json"]))).unwrap();
    let alice_id = list["keys"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(list["keys"].as_array().unwrap().len(), 3, "{list}");

    let import = |name: &str, key: Option<&str>| -> serde_json::Value {
        let mut c = cap(&store, &keys);
        c.args(["import", name, "--json", "--disk"]).arg(format!("root={}", dir.path().join("disk.raw").display()));
        if let Some(k) = key {
            c.args(["--key", k]);
        }
        let text = ok(&mut c);
        serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap()
    };
    let a = import("a", Some("alice"));
    let distinct = distinct_blocks(&[&dir.path().join("disk.raw")], 65536).len() as u64;
    assert_eq!(a["images"][0][1]["new_blocks"], distinct, "{a}");
    let names_a = stored_block_names(&store);
    assert!(files_containing(&store, marker.as_bytes()).is_empty(), "the store holds the marker in the clear");
    // Names are ciphertext hashes, not the plaintext hashes a server could look up.
    let plain: std::collections::HashSet<String> = block_hashes(&disk, 65536).into_iter().flatten().collect();
    assert!(names_a.is_disjoint(&plain), "a block is stored under its plaintext hash");
    assert_eq!(inspect(&store, "a")["encrypted_with_key"], alice_id.as_str());

    // Same disk, same key: every block deduplicated. Another owner without a convergence
    // secret shares the blocks too; one with a secret shares none.
    let a2 = import("a2", Some("alice"));
    assert_eq!(a2["images"][0][1]["new_blocks"], 0, "{a2}");
    let c = import("c", Some("carol"));
    assert_eq!(c["images"][0][1]["new_blocks"], 0, "{c}");
    assert_eq!(stored_block_names(&store), names_a);
    let b = import("b", Some("bob"));
    assert_eq!(b["images"][0][1]["new_blocks"], distinct, "{b}");
    assert_eq!(stored_block_names(&store).len() as u64, 2 * distinct);
    assert!(files_containing(&store, marker.as_bytes()).is_empty());

    // The control: a plain import of the same disk does show the marker (the scan works).
    import("p", None);
    assert!(!files_containing(&store, marker.as_bytes()).is_empty(), "the scan never finds anything");

    // Mounted over QUIC with the key (found by the id the capsule names): byte for byte,
    // and the cache it filled holds no plaintext. Then on an empty cache with the disk as a
    // seed: matched by plaintext hash on the client, nothing travels.
    let server = ServerProcess::start(&store, &["--public-read"]);
    let mount = |cache: &str, extra: &[&str]| {
        Mounted::started_by(
            client(&dir.path().join("client"), &dir.path().join("cfg"))
                .env("CAPSULE_KEY_DIR", &keys)
                .args(["mount", &format!("{}/b", server.url)])
                .arg(dir.path().join("mnt"))
                .args(["--read-only", "--cache"])
                .arg(dir.path().join(cache))
                .args(extra),
            &dir.path().join("client"),
            &dir.path().join("mnt"),
            &dir.path().join(cache),
        )
    };
    let m = mount("cache", &[]);
    assert!(std::fs::read(m.dir.join("root.raw")).unwrap() == disk, "the mount does not read back the disk");
    assert!(m.stats()["blocks_fetched"].as_u64() > Some(0));
    drop(m);
    // The cache keeps blocks as the server sent them (encoded, verified): no marker in what
    // travelled. Not checked on the wire itself: QUIC's TLS encrypts every datagram, so a
    // capture would show no marker even for a plain capsule and could never fail.
    assert!(files_containing(&dir.path().join("cache"), marker.as_bytes()).is_empty(), "the server sent plaintext");
    // The control: the plain capsule mounted the same way leaves the marker in its cache.
    let m = Mounted::started_by(
        client(&dir.path().join("client"), &dir.path().join("cfg")).args(["mount", &format!("{}/p", server.url)]).arg(dir.path().join("mnt")).args([
            "--read-only",
            "--cache",
            &dir.path().join("cache-plain").display().to_string(),
        ]),
        &dir.path().join("client"),
        &dir.path().join("mnt"),
        &dir.path().join("cache-plain"),
    );
    assert!(std::fs::read(m.dir.join("root.raw")).unwrap() == disk);
    drop(m);
    assert!(!files_containing(&dir.path().join("cache-plain"), marker.as_bytes()).is_empty(), "the cache scan never finds anything");
    let seed = dir.path().join("disk.raw").display().to_string();
    let m = mount("cache-seeded", &["--seed", &seed]);
    assert!(std::fs::read(m.dir.join("root.raw")).unwrap() == disk);
    let s = m.stats();
    assert_eq!(s["blocks_fetched"], 0, "{s}");
    assert!(s["seed_blocks"].as_u64() >= Some(distinct), "{s}");
    drop(m);
    // Prefetched for offline use with no key at all (only ciphertext moves), then
    // mounted with the server gone.
    let url = format!("{}/b", server.url);
    let text = ok(client(&dir.path().join("client"), &dir.path().join("cfg"))
        .env("CAPSULE_KEY_DIR", dir.path().join("no-keys"))
        .args(["prefetch", "--pin", &url, "--cache"])
        .arg(dir.path().join("cache-offline")));
    assert!(text.contains("100%"), "{text}");
    drop(server);
    let m = Mounted::started_by(
        client(&dir.path().join("client"), &dir.path().join("cfg"))
            .env("CAPSULE_KEY_DIR", &keys)
            .args(["mount", &url])
            .arg(dir.path().join("mnt"))
            .args(["--read-only", "--offline", "--cache"])
            .arg(dir.path().join("cache-offline")),
        &dir.path().join("client"),
        &dir.path().join("mnt"),
        &dir.path().join("cache-offline"),
    );
    assert!(std::fs::read(m.dir.join("root.raw")).unwrap() == disk, "the offline mount does not read back the disk");
    drop(m);
    // Without the key: a clear error naming the capsule and the key, and no mount.
    let err = fails(cap(&store, &dir.path().join("no-keys")).args(["mount", "a"]).arg(dir.path().join("mnt")).arg("--cache").arg(dir.path().join("cache")));
    assert!(err.contains("capsule a") && err.contains(&alice_id), "{err}");
    let err = fails(cap(&store, &keys).args(["export", "a", "--key", "bob", "--out"]).arg(dir.path().join("out")));
    assert!(err.contains(&alice_id), "{err}");
    ok(cap(&store, &keys).args(["export", "a", "--out"]).arg(dir.path().join("out")));
    assert!(std::fs::read(dir.path().join("out/root.raw")).unwrap() == disk);
    let verify: serde_json::Value = serde_json::from_str(&ok(capsule(&store).args(["verify", "--json"]))).unwrap();
    assert!(verify.as_array().unwrap().iter().all(|r| r["report"]["problem_count"] == 0 && r["report"]["blocks_checked"].as_u64() > Some(0)), "{verify}");
}

/// A capsule `evil` made as a hostile server would: `name` with one sealed block's
/// ciphertext altered (one bit of its sealed body), stored under the altered bytes' hash,
/// and the map entry naming it (the plaintext hash masked for the new name, as a writer
/// holding the key would). Returns that block's index.
fn tamper_one_block(store: &Path, keys: &Path, name: &str, evil: &str) -> u64 {
    let s = capsule_images::Store::open(store).unwrap();
    let id = s.resolve(name).unwrap();
    let mut m = s.manifest(&id).unwrap();
    let key = capsule_images::keys::load(keys, "alice").unwrap();
    let image = m.disks[0].image;
    let layer = s.layer(&image.top.unwrap()).unwrap();
    let mut entries = Vec::new();
    map::walk(&s, &layer.map, image.block_count(), &mut |_| Ok(()), &mut |i, e| {
        entries.push((i, e));
        Ok(())
    })
    .unwrap();
    let at = entries.len() / 2;
    let (index, Entry::Sealed { name: old, masked_plain }) = entries[at] else { panic!("not sealed: {:?}", entries[at]) };
    let plain = key.plain_hash(&old, &masked_plain);
    let mut c = s.get_block(&old).unwrap();
    let last = c.len() - 1;
    c[last] ^= 1;
    let new = Hash::of(&c);
    s.put_hashed_block(&new, &c).unwrap();
    entries[at].1 = Entry::Sealed { name: new, masked_plain: key.plain_hash(&new, &plain) };
    let root = map::build(&entries, image.block_count(), &mut |p| Ok(s.put_object(capsule_images::envelope::ObjectKind::MapPage, p)?.0)).unwrap();
    let top = s.put_object(capsule_images::envelope::ObjectKind::Layer, &capsule_images::Layer { map: root, ..layer }).unwrap().0;
    m.disks[0].image.top = Some(top);
    m.name = evil.to_string();
    let (eid, _) = s.put_manifest(&m).unwrap();
    s.set_ref(evil, &eid).unwrap();
    index
}

#[test]
fn over_quic_an_encrypted_guest_boots_writes_and_commits_while_the_server_sees_only_ciphertext() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (keys, server_store) = (dir.path().join("keys"), dir.path().join("server"));
    let g = guest_dir();
    ok(cap(&server_store, &keys).args(["key", "create", "alice"]));
    ok(cap(&server_store, &keys)
        .args(["import", "guest", "--key", "alice", "--disk"])
        .arg(format!("root={}", g.join("disk.raw").display()))
        .arg("--kernel")
        .arg(g.join("vmlinuz"))
        .arg("--initrd")
        .arg(g.join("initrd.gz"))
        .args(["--cmdline", GUEST_CMDLINE]));
    let bad_index = tamper_one_block(&server_store, &keys, "guest", "evil");
    let token = ok(capsule(&server_store).args(["token", "create", "--scope", "write"])).trim().to_string();
    let server = ServerProcess::start(&server_store, &[]);
    let (cfg, runs) = (dir.path().join("cfg"), dir.path().join("runs"));
    let marker = format!("CRYPTMARK{}", std::process::id());
    let env = [("CAPSULE_KEY_DIR", keys.as_path())];

    // Boot over QUIC from an empty cache, write the marker to the disk, commit (encrypted,
    // as its parent) and push.
    let mut a = Run::start_env(
        &dir.path().join("host-a"),
        &cfg,
        &runs,
        &format!("{}/guest", server.url),
        &dir.path().join("cache-a"),
        "writer",
        &["--append", &format!("gmode=write rw gtoken={marker}"), "--commit", "written", "--push", &format!("{}/written", server.url), "--token", &token],
        &env,
    );
    let output = a.wait_marker("CAPSULE-GUEST-MARKER write-ok", 240);
    assert!(output.contains("pushed written"), "{output}");
    assert!(inspect(&server_store, "written")["encrypted_with_key"].is_string(), "the child of an encrypted capsule is not encrypted");
    assert!(files_containing(&server_store, marker.as_bytes()).is_empty(), "the server's store holds the guest's marker");
    // The cache holds ciphertext blocks only (the overlay of unsaved writes is plaintext
    // and goes with the run).
    let cached: Vec<_> =
        files_containing(&dir.path().join("cache-a"), marker.as_bytes()).into_iter().filter(|p| !p.starts_with(dir.path().join("cache-a/cow"))).collect();
    assert!(cached.is_empty(), "plaintext in the cache: {cached:?}");

    // Another host mounts the encrypted child over QUIC: the disk it decrypts holds the
    // marker (so the store scan above looked for something that was written).
    let mount = |capsule: &str, host: &str| {
        Mounted::started_by(
            client(&dir.path().join(host), &cfg)
                .env("CAPSULE_KEY_DIR", &keys)
                .args(["mount", &format!("{}/{capsule}", server.url)])
                .arg(dir.path().join(format!("mnt-{host}")))
                .args(["--read-only", "--token", &token, "--cache"])
                .arg(dir.path().join(format!("cache-{host}"))),
            &dir.path().join(host),
            &dir.path().join(format!("mnt-{host}")),
            &dir.path().join(format!("cache-{host}")),
        )
    };
    let m = mount("written", "b");
    let written = std::fs::read(m.dir.join("root.raw")).unwrap();
    assert!(written.windows(marker.len()).any(|w| w == marker.as_bytes()), "the guest's marker is not on the committed disk");
    drop(m);

    // The tampered block fails authentication: EIO, never other bytes; its neighbours read.
    let m = mount("evil", "c");
    let err = pread(&m.dir.join("root.raw"), bad_index * 65536, 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO expected, got {err}");
    assert!(m.log().contains("authentication failed"), "{}", m.log());
    let disk = std::fs::read(g.join("disk.raw")).unwrap();
    let next = ((bad_index + 1) * 65536) as usize;
    assert!(pread(&m.dir.join("root.raw"), next as u64, 65536).unwrap() == disk[next..next + 65536]);
}

#[test]
fn an_encrypted_guest_suspends_with_a_marker_in_ram_and_resumes_over_quic_with_none_of_it_on_the_server() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (keys, server_store) = (dir.path().join("keys"), dir.path().join("server"));
    let g = guest_dir();
    ok(cap(&server_store, &keys).args(["key", "create", "alice", "--convergence-secret"]));
    ok(cap(&server_store, &keys)
        .args(["import", "guest", "--key", "alice", "--disk"])
        .arg(format!("root={}", g.join("disk.raw").display()))
        .arg("--kernel")
        .arg(g.join("vmlinuz"))
        .arg("--initrd")
        .arg(g.join("initrd.gz"))
        .args(["--cmdline", GUEST_CMDLINE]));
    let token = ok(capsule(&server_store).args(["token", "create", "--scope", "write"])).trim().to_string();
    let server = ServerProcess::start(&server_store, &[]);
    let (cfg, runs, host_a) = (dir.path().join("cfg"), dir.path().join("runs"), dir.path().join("host-a"));
    let env = [("CAPSULE_KEY_DIR", keys.as_path())];
    // The guest's kernel command line (so its RAM, and the run's hints) carries the marker.
    let marker = format!("RAMMARK{}", std::process::id());
    let mut a = Run::start_env(
        &host_a,
        &cfg,
        &runs,
        &format!("{}/guest", server.url),
        &dir.path().join("cache-a"),
        "on-a",
        &["--append", &format!("gmode=loop gtoken={marker}"), "--token", &token],
        &env,
    );
    a.wait_console("COUNTER 2", 300);
    let suspend = client(&host_a, &cfg)
        .env("CAPSULE_RUN_DIR", &runs)
        .env("CAPSULE_KEY_DIR", &keys)
        .args(["suspend", "on-a", "suspended", "--json", "--token", &token, "--push", &format!("{}/suspended", server.url)])
        .output()
        .unwrap();
    assert!(suspend.status.success(), "{}", String::from_utf8_lossy(&suspend.stderr));
    let (success, output) = a.wait(120);
    assert!(success, "{output}");
    let last = *counters(&a.console()).last().unwrap();
    assert!(files_containing(&server_store, marker.as_bytes()).is_empty(), "the server's store holds the guest's RAM marker");
    assert!(["blocks", "packed", "objects"].iter().all(|d| files_containing(&host_a.join(d), marker.as_bytes()).is_empty()));
    // The control: decrypted (from the server's store, which holds the whole chain), the
    // suspended RAM does hold it.
    ok(cap(&server_store, &keys).args(["export", "suspended", "--out"]).arg(dir.path().join("export")));
    let ram = std::fs::read(dir.path().join("export/memory.raw")).unwrap();
    assert!(ram.windows(marker.len()).any(|w| w == marker.as_bytes()), "the marker never reached the guest's RAM");
    drop(ram);

    // Resumed on another host from the server, on an empty cache: the counter goes on.
    let mut b = Run::start_env(
        &dir.path().join("host-b"),
        &cfg,
        &runs,
        &format!("{}/suspended", server.url),
        &dir.path().join("cache-b"),
        "on-b",
        &["--token", &token],
        &env,
    );
    b.wait_console(&format!("COUNTER {}", last + 2), 300);
    let after = counters(&b.console());
    assert!(after[0] > last && after[0] <= last + 2, "host A stopped at {last}, host B went on from {}", after[0]);
    assert!(!b.console().contains("CAPSULE-GUEST-VERSION"), "host B booted instead of resuming");
}

/// A profile recorded on an encrypted capsule lists what its reads fetched (ciphertext
/// names), travels with it, and a mount on another cache with `--prefetch profile` fetches
/// exactly those blocks ahead of the reads, which then fetch nothing more.
#[test]
fn a_profile_recorded_on_an_encrypted_capsule_drives_prefetch_profile() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (keys, store) = (d.join("keys"), d.join("store"));
    let disk = marked_disk(&d.join("disk.raw"), "CAPSULE-PROFILE-MARKER");
    ok(cap(&store, &keys).args(["key", "create", "alice"]));
    ok(cap(&store, &keys).args(["import", "enc", "--key", "alice", "--disk"]).arg(format!("root={}", d.join("disk.raw").display())));
    // Scattered 4 KiB reads: random-block data, the repeated block, a zero block.
    let offsets = [3u64 * 65536 + 4096, 17 * 65536, 40 * 65536 + 8192, 70 * 65536, 90 * 65536];
    let read_all = |m: &Mounted| {
        for &o in &offsets {
            assert!(pread(&m.dir.join("root.raw"), o, 4096).unwrap() == disk[o as usize..o as usize + 4096], "offset {o} reads wrong");
        }
    };
    {
        let m = Mounted::started_by(
            cap(&store, &keys).args(["mount", "enc"]).arg(d.join("mnt")).args(["--read-only", "--record-profile", "boot", "--cache"]).arg(d.join("rec-cache")),
            &store,
            &d.join("mnt"),
            &d.join("rec-cache"),
        );
        read_all(&m);
    }
    let v = inspect(&store, "enc");
    assert_eq!(v["profiles"][0]["name"], "boot", "{v}");
    let recorded = v["profiles"][0]["blocks"].as_u64().unwrap();
    assert!((4..20).contains(&recorded), "{recorded} blocks recorded for 4 distinct non-zero blocks read: {v}");

    let server = ServerProcess::start(&store, &["--public-read"]);
    let url = format!("{}/enc", server.url);
    let m = Mounted::started_by(
        client(&d.join("client"), &d.join("cfg"))
            .env("CAPSULE_KEY_DIR", &keys)
            .args(["mount", &url])
            .arg(d.join("mnt2"))
            .args(["--read-only", "--prefetch", "profile", "--cache"])
            .arg(d.join("cache")),
        &d.join("client"),
        &d.join("mnt2"),
        &d.join("cache"),
    );
    let start = std::time::Instant::now();
    while m.stats()["blocks_fetched"].as_u64().unwrap() < recorded {
        assert!(start.elapsed().as_secs() < 60, "the profile was not prefetched: {}", m.stats());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    read_all(&m);
    assert_eq!(m.stats()["blocks_fetched"].as_u64().unwrap(), recorded, "the reads needed blocks beyond the profile: {}", m.stats());
    drop(m);
    assert!(files_containing(&d.join("cache"), b"CAPSULE-PROFILE-MARKER").is_empty(), "plaintext in the cache");
}
