//! End-to-end tests of `capsule mount`: real FUSE mounts, a real server on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::path::Path;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }
    fn p(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// Guest (with boot files) and its update in `store`; returns the count of block contents
/// the update has and the guest lacks, hashed here from the two images (not capsule's count).
fn import_both(store: &Path) -> u64 {
    import_guest(store, true);
    import_guest_update(store);
    let g = guest_dir();
    new_contents(&g.join("disk.raw"), &g.join("disk-update.raw"), 65536).len() as u64
}

fn same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{} vs {}", a.display(), b.display());
    assert!(x == y, "{} differs from {}", a.display(), b.display());
}

#[test]
fn local_mount_serves_every_file_byte_for_byte_and_random_reads_match() {
    let e = Env::new();
    import_both(&e.p("store"));
    let g = guest_dir();
    let m = Mounted::new(&e.p("store"), &e.p("cfg"), "guest-update", &e.p("mnt"), &e.p("cache"), &["--read-only"]);
    same_file(&m.dir.join("root.raw"), &g.join("disk-update.raw"));
    same_file(&m.dir.join("vmlinuz"), &g.join("vmlinuz"));
    let desc: serde_json::Value = serde_json::from_slice(&std::fs::read(m.dir.join("capsule.json")).unwrap()).unwrap();
    assert_eq!(desc["capsule"], "guest-update");
    // Thousands of reads at random offsets and lengths, against the source file.
    let source = std::fs::read(g.join("disk-update.raw")).unwrap();
    let mut x = 0x9e3779b97f4a7c15u64;
    for _ in 0..3000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = x % source.len() as u64;
        let len = ((x >> 40) % 300_000) as usize;
        let got = pread(&m.dir.join("root.raw"), offset, len).unwrap();
        let end = (offset as usize + len).min(source.len());
        assert!(got == source[offset as usize..end], "read at {offset} of {len} differs");
    }
    // Read-only means read-only.
    assert!(std::fs::OpenOptions::new().write(true).open(m.dir.join("root.raw")).is_err());
    m.unmount();
    assert!(!m.dir.join("root.raw").exists(), "unmounted");
}

#[test]
fn a_child_mounted_on_the_parents_cache_fetches_only_its_changed_blocks() {
    let e = Env::new();
    let new_blocks = import_both(&e.p("server"));
    let server = ServerProcess::start(&e.p("server"), &["--public-read"]);
    let g = guest_dir();
    {
        let m = Mounted::new(&e.p("client"), &e.p("cfg"), &format!("{}/guest", server.url), &e.p("mnt"), &e.p("cache"), &["--read-only"]);
        same_file(&m.dir.join("root.raw"), &g.join("disk.raw"));
        let s = m.stats();
        assert!(s["blocks_fetched"].as_u64().unwrap() > 0);
        assert_eq!(s["files"]["root.raw"]["resident_pct"], 100.0, "{s}");
    }
    let m = Mounted::new(&e.p("client"), &e.p("cfg"), &format!("{}/guest-update", server.url), &e.p("mnt"), &e.p("cache"), &["--read-only"]);
    same_file(&m.dir.join("root.raw"), &g.join("disk-update.raw"));
    let s = m.stats();
    assert_eq!(s["blocks_fetched"].as_u64().unwrap(), new_blocks, "the child fetched more than its changed blocks: {s}");
}

#[test]
fn a_read_larger_than_the_cache_completes_within_the_bound() {
    let e = Env::new();
    import_both(&e.p("server"));
    let server = ServerProcess::start(&e.p("server"), &["--public-read"]);
    let bound = 8u64 << 20;
    let m = Mounted::new(&e.p("client"), &e.p("cfg"), &format!("{}/guest", server.url), &e.p("mnt"), &e.p("cache"), &["--read-only", "--cache-size", "8M"]);
    same_file(&m.dir.join("root.raw"), &guest_dir().join("disk.raw"));
    let held = cache_block_bytes(&e.p("cache"));
    assert!(held > 0, "nothing was cached");
    assert!(held <= bound, "cache holds {held} bytes, bound {bound}");
    assert!(m.stats()["cache_bytes"].as_u64().unwrap() <= bound);
}

#[test]
fn cached_blocks_still_read_after_the_server_is_gone() {
    let e = Env::new();
    import_both(&e.p("server"));
    let server = ServerProcess::start(&e.p("server"), &["--public-read"]);
    let url = format!("{}/guest", server.url);
    {
        let m = Mounted::new(&e.p("client"), &e.p("cfg"), &url, &e.p("mnt"), &e.p("cache"), &["--read-only"]);
        same_file(&m.dir.join("root.raw"), &guest_dir().join("disk.raw"));
    }
    drop(server);
    // A new mount, no server: the last-seen version from the cache, every block local.
    let m = Mounted::new(&e.p("client"), &e.p("cfg"), &url, &e.p("mnt"), &e.p("cache"), &["--read-only", "--stall-timeout", "5"]);
    same_file(&m.dir.join("root.raw"), &guest_dir().join("disk.raw"));
    assert_eq!(m.stats()["blocks_fetched"], 0);
}

#[test]
fn a_corrupt_block_from_the_server_is_eio_never_wrong_bytes_and_recovers_when_fixed() {
    let e = Env::new();
    import_both(&e.p("server"));
    let server = ServerProcess::start(&e.p("server"), &["--public-read"]);
    // A non-zero block of the root disk, named by hashing the source image ourselves.
    let disk = std::fs::read(guest_dir().join("disk.raw")).unwrap();
    let chunk = disk.chunks(65536).skip(disk.len() / 65536 / 2).find(|c| c.iter().any(|&b| b != 0)).unwrap();
    let hash = blake3::hash(chunk).to_hex().to_string();
    let victim = stored_block(&e.p("server"), &hash);
    let good = victim.read();
    victim.flip(good.len() - 1, 0xff);

    let m = Mounted::new(&e.p("client"), &e.p("cfg"), &format!("{}/guest", server.url), &e.p("mnt"), &e.p("cache"), &["--read-only"]);
    let err = std::fs::read(m.dir.join("root.raw")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO expected, got {err}");
    assert!(m.log().contains(&hash), "the log names the corrupt block {hash}:\n{}", m.log());
    assert!(!stored_block_names(&e.p("cache")).contains(&hash), "a corrupt block was cached");

    victim.write(&good);
    same_file(&m.dir.join("root.raw"), &guest_dir().join("disk.raw"));
}

#[test]
fn writes_commit_push_and_show_up_on_an_empty_cache_elsewhere() {
    let e = Env::new();
    let local = e.p("local");
    import_both(&local);
    let token = ok(capsule(&e.p("server")).args(["token", "create", "--scope", "write"])).trim().to_string();
    let server = ServerProcess::start(&e.p("server"), &[]);
    let disk = std::fs::read(guest_dir().join("disk.raw")).unwrap();
    let (at_zero, at_data) = (100u64 << 20, 40u64 << 20);
    {
        let m = Mounted::new(&local, &e.p("cfg"), "guest", &e.p("mnt"), &e.p("cache"), &[]);
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(m.dir.join("root.raw")).unwrap();
        f.write_all_at(b"written through capsule", at_zero).unwrap();
        f.write_all_at(b"partial block edit", at_data + 1000).unwrap();
        f.sync_all().unwrap();
        drop(f);
        assert_eq!(pread(&m.dir.join("root.raw"), at_zero, 23).unwrap(), b"written through capsule");
        let text = ok(capsule(&local).args(["commit"]).arg(&m.dir).args(["edited", "--json"]));
        let v: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
        assert_eq!(v["changed_blocks"], 2, "{v}");
        // The mount showed a blank memory.raw; nothing wrote to it, so the child has no RAM.
        assert!(inspect(&local, "edited")["memory"].is_null(), "{}", inspect(&local, "edited"));
    }
    ok(client(&local, &e.p("cfg")).args(["push", "edited", &server.url, "--token", &token]));
    let m = Mounted::new(&e.p("elsewhere"), &e.p("cfg"), &format!("{}/edited", server.url), &e.p("mnt2"), &e.p("cache2"), &["--read-only", "--token", &token]);
    let root = m.dir.join("root.raw");
    assert_eq!(pread(&root, at_zero, 23).unwrap(), b"written through capsule");
    let around = pread(&root, at_data, 65536).unwrap();
    let mut expected = disk[at_data as usize..at_data as usize + 65536].to_vec();
    expected[1000..1018].copy_from_slice(b"partial block edit");
    assert!(around == expected, "the read-modify-write kept the rest of the block");
}

#[test]
fn kill_9_of_the_mount_mid_write_keeps_every_acknowledged_write_through_commit() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let e = Env::new();
    let local = e.p("local");
    import_both(&local);
    let disk = std::fs::read(guest_dir().join("disk.raw")).unwrap();
    let bs = 65536usize;
    let targets: Vec<usize> = (0..64).map(|b| b * 7 + 3).collect();
    let rounds = 50u8;
    let m = Mounted::new(&local, &e.p("cfg"), "guest", &e.p("mnt"), &e.p("cache"), &[]);
    // (block, round) of every write the mount acknowledged (write and fdatasync returned),
    // and the one in flight: the writer's own record, kept apart from the mount's counters.
    let acked: Arc<Mutex<Vec<(usize, u8)>>> = Arc::default();
    let in_flight: Arc<Mutex<Option<(usize, u8)>>> = Arc::default();
    let finished = Arc::new(AtomicBool::new(false));
    let writer = {
        let (path, acked, in_flight, finished, targets) = (m.dir.join("root.raw"), acked.clone(), in_flight.clone(), finished.clone(), targets.clone());
        std::thread::spawn(move || -> std::io::Error {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            // Whole blocks, each filled with its round's byte: a torn block would show two.
            for round in 1..=rounds {
                for &i in &targets {
                    *in_flight.lock().unwrap() = Some((i, round));
                    if let Err(err) = f.write_all_at(&vec![round; bs], (i * bs) as u64).and_then(|_| f.sync_data()) {
                        return err;
                    }
                    acked.lock().unwrap().push((i, round));
                }
            }
            finished.store(true, Ordering::SeqCst);
            std::io::Error::other("the writer finished every round: the kill came too late")
        })
    };
    // Kill once the writer is into its second round (so blocks were overwritten) and the
    // mount itself has counted those bytes as written.
    let start = std::time::Instant::now();
    loop {
        let n = acked.lock().unwrap().len();
        let written = m.stats()["bytes_written"].as_u64().unwrap_or(0);
        if n >= targets.len() + 20 && written >= ((targets.len() + 20) * bs) as u64 {
            break;
        }
        assert!(
            start.elapsed().as_secs() < 120 && !finished.load(Ordering::SeqCst),
            "the writer made no progress: {n} writes, {written} bytes written per stats"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The supervisor first (else it restarts the daemon, see tests/takeover.rs): the whole
    // mount dies, as in an out-of-memory kill of both.
    let pid = m.pid().unwrap();
    let supervisor = parent_of(pid).expect("the mount's supervisor");
    tool(std::process::Command::new("kill").args(["-9", &supervisor.to_string()]));
    tool(std::process::Command::new("kill").args(["-9", &pid.to_string()]));
    let err = writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    let in_flight = *in_flight.lock().unwrap();
    assert!(!finished.load(Ordering::SeqCst) && acked.len() < targets.len() * rounds as usize, "the writer was not interrupted: {err}");
    eprintln!("writer interrupted after {} acknowledged writes: {err}", acked.len());
    // The dead mount stays in place (its guard cleans up at the end, also on failure):
    // the next mount must clean it up itself.
    let _dead = m;

    // What each block must hold: its last acknowledged round (else the disk's own bytes),
    // or, for the write in flight at the kill, that round.
    let mut last = std::collections::HashMap::new();
    for &(i, r) in &acked {
        last.insert(i, r);
    }
    let check = |root: &[u8], what: &str| {
        for &i in &targets {
            let block = &root[i * bs..(i + 1) * bs];
            let expected = match last.get(&i) {
                Some(&r) => block.iter().all(|&x| x == r),
                None => block == &disk[i * bs..(i + 1) * bs],
            };
            let was_in_flight = in_flight.is_some_and(|(j, r)| j == i && block.iter().all(|&x| x == r));
            assert!(
                expected || was_in_flight,
                "{what}: block {i} holds neither its acknowledged write ({:?}) nor the one in flight ({in_flight:?}); first bytes {:?}",
                last.get(&i),
                &block[..8]
            );
        }
    };
    // Remount (the stale mount is cleaned up), then commit the overlay as a child capsule.
    {
        let m = Mounted::new(&local, &e.p("cfg"), "guest", &e.p("mnt"), &e.p("cache"), &[]);
        check(&std::fs::read(m.dir.join("root.raw")).unwrap(), "remount");
        ok(capsule(&local).arg("commit").arg(&m.dir).arg("after-kill"));
    }
    ok(capsule(&local).args(["verify", "after-kill"]));
    // A fresh mount of the child, on a fresh cache: the acknowledged writes are in it.
    let m = Mounted::new(&local, &e.p("cfg"), "after-kill", &e.p("mnt2"), &e.p("cache2"), &["--read-only"]);
    let root = std::fs::read(m.dir.join("root.raw")).unwrap();
    check(&root, "child");
    // Everything else is the parent's disk.
    let mut rest = root.clone();
    let mut expected = disk.clone();
    for &i in &targets {
        rest[i * bs..(i + 1) * bs].fill(0);
        expected[i * bs..(i + 1) * bs].fill(0);
    }
    assert!(rest == expected, "the child differs from its parent outside the written blocks");
}

#[test]
fn a_seed_supplies_the_blocks_it_has_and_a_changed_seed_is_not_trusted() {
    let e = Env::new();
    let new_blocks = import_both(&e.p("server"));
    let server = ServerProcess::start(&e.p("server"), &["--public-read"]);
    let g = guest_dir();
    let url = format!("{}/guest-update", server.url);
    {
        // The old image as a seed: only the update's own blocks travel.
        let m = Mounted::new(&e.p("client"), &e.p("cfg"), &url, &e.p("mnt"), &e.p("cache"), &["--read-only", "--seed", g.join("disk.raw").to_str().unwrap()]);
        same_file(&m.dir.join("root.raw"), &g.join("disk-update.raw"));
        let s = m.stats();
        assert_eq!(s["blocks_fetched"].as_u64().unwrap(), new_blocks, "{s}");
        assert!(s["seed_blocks"].as_u64().unwrap() > 0, "{s}");
    }
    // A seed that changes after it was indexed: verification catches it, the reads stay right.
    let seed = e.p("seed.raw");
    std::fs::copy(g.join("disk.raw"), &seed).unwrap();
    let m = Mounted::new(&e.p("client2"), &e.p("cfg"), &url, &e.p("mnt2"), &e.p("cache2"), &["--read-only", "--seed", seed.to_str().unwrap()]);
    let mut bytes = std::fs::read(&seed).unwrap();
    for b in bytes.iter_mut().step_by(4096) {
        *b = !*b;
    }
    std::fs::write(&seed, &bytes).unwrap();
    same_file(&m.dir.join("root.raw"), &g.join("disk-update.raw"));
    assert!(m.stats()["blocks_fetched"].as_u64().unwrap() > new_blocks, "changed seed blocks were fetched instead");
    assert!(m.log().contains("changed at offset"), "{}", m.log());
}

#[test]
fn mapped_and_o_direct_access_work_and_sigterm_unmounts_cleanly() {
    let e = Env::new();
    import_both(&e.p("store"));
    let g = guest_dir();
    let source = std::fs::read(g.join("disk.raw")).unwrap();
    let mnt = e.p("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    // In the foreground, so the test can signal it; the guard unmounts if anything fails.
    let _cleanup = UnmountOnDrop(mnt.clone());
    let mut daemon = client(&e.p("store"), &e.p("cfg"))
        .args(["mount", "guest"])
        .arg(&mnt)
        .arg("--cache")
        .arg(e.p("cache"))
        .arg("--foreground")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !mnt.join(".capsule/info.json").exists() {
        assert!(start.elapsed().as_secs() < 30, "mount did not come up");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let root = mnt.join("root.raw");
    // O_DIRECT reads (QEMU's cache=none) work.
    let direct = std::process::Command::new("dd")
        .arg(format!("if={}", root.display()))
        .args(["iflag=direct", "bs=1M", "count=8", "skip=16", "status=none"])
        .output()
        .unwrap();
    assert!(direct.status.success());
    assert!(direct.stdout == source[16 << 20..24 << 20], "O_DIRECT read differs");
    // mmap (QEMU maps guest RAM from memory files this way): shared mapping, read and write.
    let script = format!(
        "import mmap\nf=open('{}','r+b')\nm=mmap.mmap(f.fileno(),0)\nprint(m[{}:{}].hex())\nm[5:10]=b'mmapd'\nm.flush()\n",
        root.display(),
        20 << 20,
        (20 << 20) + 16
    );
    let py = tool(std::process::Command::new("python3").arg("-c").arg(&script));
    assert_eq!(py.trim(), source[20 << 20..(20 << 20) + 16].iter().map(|b| format!("{b:02x}")).collect::<String>());
    assert_eq!(pread(&root, 5, 5).unwrap(), b"mmapd");
    // SIGTERM: the daemon unmounts and exits cleanly.
    tool(std::process::Command::new("kill").args(["-TERM", &daemon.id().to_string()]));
    let status = daemon.wait().unwrap();
    assert!(status.success(), "daemon exit: {status}");
    assert!(!root.exists(), "still mounted after SIGTERM");
}

struct UnmountOnDrop(std::path::PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fusermount3").arg("-uz").arg(&self.0).output();
    }
}

#[test]
fn a_full_disk_gives_the_writer_enospc_and_keeps_what_was_written() {
    let e = Env::new();
    import_both(&e.p("store"));
    let cache = e.p("cache");
    std::fs::create_dir_all(&cache).unwrap();
    // A small filesystem of our own for the cache and its overlay.
    tool(std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=24m", "capsule-test"]).arg(&cache));
    let _tmpfs = UnmountTmpfsOnDrop(cache.clone());
    let m = Mounted::new(&e.p("store"), &e.p("cfg"), "guest", &e.p("mnt"), &cache, &[]);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(m.dir.join("root.raw")).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        match f.write_all_at(&chunk, written) {
            Ok(()) => written += 1 << 20,
            Err(e) => break e,
        }
        assert!(written < 100 << 20, "a 24 MiB disk took {written} bytes");
    };
    assert_eq!(err.raw_os_error(), Some(28), "ENOSPC expected, got {err}");
    assert!(written >= 8 << 20, "only {written} bytes fit");
    drop(f);
    // What fit is intact, and the rest of the disk still reads as before.
    assert!(pread(&m.dir.join("root.raw"), 0, 1 << 20).unwrap() == chunk);
    let disk = std::fs::read(guest_dir().join("disk.raw")).unwrap();
    let tail = pread(&m.dir.join("root.raw"), 100 << 20, 1 << 20).unwrap();
    assert!(tail == disk[100 << 20..101 << 20]);
}

struct UnmountTmpfsOnDrop(std::path::PathBuf);

impl Drop for UnmountTmpfsOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).output();
    }
}
