//! Offline and cut links: `prefetch --offline`, pins under cache pressure, `mount
//! --offline`, and a server that dies in the middle of a boot.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn after_prefetch_offline_the_guest_boots_with_the_server_gone_and_no_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    import_guest(&d.join("server"), true);
    let server = ServerProcess::start(&d.join("server"), &["--public-read"]);
    let url = format!("{}/guest", server.url);
    let text = ok(client(&d.join("c"), &d.join("cfg")).args(["prefetch", "--offline", &url, "--cache"]).arg(d.join("cache")));
    assert!(text.contains("ready offline: 100% ("), "{text}");
    let status = ok(client(&d.join("c"), &d.join("cfg")).args(["status", &url, "--cache"]).arg(d.join("cache")));
    assert!(status.contains("100.0% resident, 100.0% pinned"), "{status}");
    drop(server);

    let m = Mounted::new(&d.join("c"), &d.join("cfg"), &url, &d.join("mnt"), &d.join("cache"), &["--read-only", "--offline"]);
    boot_from_mount(&m);
    let s = m.stats();
    assert_eq!(s["blocks_fetched"], 0, "{s}");
    assert_eq!(s["read_errors"], 0, "{s}");
    assert_eq!(s["link"], "local", "an offline mount has no source at all: {s}");
    drop(m);

    // The same with `capsule run --offline`: the whole run, from the cache alone.
    let mut run =
        Run::start(&d.join("c"), &d.join("cfg"), &d.join("runs"), &url, &d.join("cache"), "offline", &["--offline", "--read-only", "--append", "gmode=boot"]);
    let output = run.wait_marker(BOOT_OK, 180);
    assert!(output.contains("0 B on the wire (0 blocks)"), "{output}");
}

#[test]
fn pinned_blocks_survive_cache_pressure_larger_than_the_cache_until_unpinned() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_store = d.join("server");
    import_guest(&server_store, true);
    let other = d.join("other.raw");
    std::fs::write(&other, pseudo_random(32 << 20, 77)).unwrap();
    ok(capsule(&server_store).args(["import", "other", "--disk"]).arg(&other));
    let server = ServerProcess::start(&server_store, &["--public-read"]);
    let guest = format!("{}/guest", server.url);
    let cache = d.join("cache");
    let c = |args: &[&str]| ok(client(&d.join("c"), &d.join("cfg")).args(args).arg("--cache").arg(&cache));

    c(&["prefetch", "--offline", &guest, "--cache-size", "4M"]);
    {
        // 32 MiB of other blocks through a 4 MiB cache.
        let m = Mounted::new(&d.join("c"), &d.join("cfg"), &format!("{}/other", server.url), &d.join("mnt"), &cache, &["--read-only", "--cache-size", "4M"]);
        assert!(std::fs::read(m.dir.join("other.raw")).unwrap() == std::fs::read(&other).unwrap());
    }
    let status = c(&["status", &guest]);
    assert!(status.contains("root") && !status.contains("  0.0% pinned"), "{status}");
    for line in status.lines().skip(1) {
        assert!(line.contains("100.0% resident, 100.0% pinned"), "pinned blocks were evicted: {status}");
    }

    c(&["unpin", &guest]);
    {
        let m = Mounted::new(&d.join("c"), &d.join("cfg"), &format!("{}/other", server.url), &d.join("mnt"), &cache, &["--read-only", "--cache-size", "4M"]);
        let _ = std::fs::read(m.dir.join("other.raw")).unwrap();
    }
    let status: serde_json::Value = serde_json::from_str(&c(&["status", &guest, "--json"])).unwrap();
    let root = status["files"]["root.raw"]["resident_pct"].as_f64().unwrap();
    assert!(root < 100.0, "unpinned blocks stay evictable, yet the disk is still {root}% resident: {status}");
}

#[test]
fn an_offline_mount_fails_a_missing_block_at_once_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    import_guest(&d.join("server"), true);
    let server = ServerProcess::start(&d.join("server"), &["--public-read"]);
    let url = format!("{}/guest", server.url);
    {
        // Touch a little of the disk online: the capsule is known to the cache, mostly absent.
        let m = Mounted::new(&d.join("c"), &d.join("cfg"), &url, &d.join("mnt"), &d.join("cache"), &["--read-only"]);
        pread(&m.dir.join("root.raw"), 0, 4096).unwrap();
    }
    let m = Mounted::new(&d.join("c"), &d.join("cfg"), &url, &d.join("mnt"), &d.join("cache"), &["--read-only", "--offline"]);
    let start = std::time::Instant::now();
    let err = std::fs::read(m.dir.join("root.raw")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
    assert!(start.elapsed().as_secs() < 5, "an offline miss must fail at once");
    assert!(pread(&m.dir.join("root.raw"), 0, 4096).is_ok(), "cached blocks still read");
    let log = m.log();
    assert!(log.contains("read of root.raw at offset") && log.contains("offline"), "{log}");
}

#[test]
fn a_server_killed_for_10_s_mid_boot_is_a_pause_and_the_boot_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    import_guest(&d.join("server"), true);
    let server = ServerProcess::start(&d.join("server"), &["--public-read"]);
    let addr = server.url.trim_start_matches("capsule://").to_string();
    let m = Mounted::new(&d.join("c"), &d.join("cfg"), &format!("{}/guest", server.url), &d.join("mnt"), &d.join("cache"), &["--read-only"]);
    // Kernel and initrd first (QEMU reads them whole at start), then cut the link while the
    // guest's disk reads are still to come.
    std::fs::read(m.dir.join("vmlinuz")).unwrap();
    std::fs::read(m.dir.join("initrd.img")).unwrap();
    let outage = {
        let d = d.clone();
        std::thread::spawn(move || {
            drop(server);
            std::thread::sleep(std::time::Duration::from_secs(10));
            ServerProcess::start_at(&d.join("server"), &addr, &["--public-read"])
        })
    };
    boot_from_mount(&m);
    let _restarted = outage.join().unwrap();
    assert!(m.stats()["reconnects"].as_u64().unwrap() >= 1, "{}", m.stats());
}

#[test]
fn a_profile_recorded_on_one_machine_warms_another_whose_boot_then_fetches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let publisher = d.join("publisher");
    import_guest(&publisher, true);
    // Record the boot's working set on the publisher's own machine.
    {
        let m = Mounted::new(&publisher, &d.join("cfg"), "guest", &d.join("mnt"), &d.join("pcache"), &["--read-only", "--record-profile", "boot"]);
        boot_from_mount(&m);
    }
    let v = inspect(&publisher, "guest");
    let recorded = v["profiles"][0]["blocks"].as_u64().unwrap();
    assert_eq!(v["profiles"][0]["name"], "boot", "{v}");
    assert!(recorded > 0);

    // The profile travels with the capsule.
    let token = ok(capsule(&d.join("server")).args(["token", "create", "--scope", "write"])).trim().to_string();
    let server = ServerProcess::start(&d.join("server"), &["--public-read"]);
    ok(client(&publisher, &d.join("cfg")).args(["push", "guest", &server.url, "--token", &token]));
    let url = format!("{}/guest", server.url);
    ok(client(&d.join("fresh"), &d.join("cfg")).args(["pull", &url]));
    assert_eq!(inspect(&d.join("fresh"), "guest")["profiles"][0]["blocks"].as_u64().unwrap(), recorded);

    // Another machine warms from it; its boot then has no demand miss.
    let text = ok(client(&d.join("c"), &d.join("cfg")).args(["warm", &url, "--profile", "boot", "--cache"]).arg(d.join("cache")));
    assert!(text.contains(&format!("warm: profile boot: {recorded} blocks")), "{text}");
    let m = Mounted::new(&d.join("c"), &d.join("cfg"), &url, &d.join("mnt2"), &d.join("cache"), &["--read-only"]);
    boot_from_mount(&m);
    let s = m.stats();
    assert_eq!(s["blocks_fetched"], 0, "the warmed boot still fetched: {s}");

    // A mount that prefetches the profile in the background reaches the same state.
    let m = Mounted::new(&d.join("c3"), &d.join("cfg"), &url, &d.join("mnt3"), &d.join("cache3"), &["--read-only", "--prefetch", "profile"]);
    let start = std::time::Instant::now();
    while m.stats()["blocks_fetched"].as_u64().unwrap() < recorded {
        assert!(start.elapsed().as_secs() < 60, "background prefetch stalled: {}", m.stats());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    boot_from_mount(&m);
    assert_eq!(m.stats()["blocks_fetched"].as_u64().unwrap(), recorded, "the boot needed blocks beyond the profile: {}", m.stats());
}

#[test]
fn plain_prefetch_and_warm_all_cache_every_block_unpinned_and_status_reads_a_mount() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    import_guest(&d.join("server"), true);
    import_guest_update(&d.join("server"));
    let server = ServerProcess::start(&d.join("server"), &["--public-read"]);
    let url = format!("{}/guest", server.url);
    let g = guest_dir();
    // A child: exactly the blocks its files read travel, not its parent's that it overwrote
    // (a restore of the last day of a daily chain fetches that day, not every day's writes).
    let update = distinct_blocks(&[&g.join("disk-update.raw"), &g.join("vmlinuz"), &g.join("initrd.gz")], 65536);
    let text = ok(client(&d.join("c"), &d.join("cfg")).args(["prefetch", &format!("{}/guest-update", server.url), "--cache"]).arg(d.join("c5")));
    assert!(text.contains(&format!("warm: every block: {} blocks", update.len())), "expected {} blocks: {text}", update.len());
    let cached = stored_block_names(&d.join("c5"));
    assert!(update.is_subset(&cached), "{} of the child's blocks missing from the cache", update.difference(&cached).count());
    let shadowed = distinct_blocks(&[&g.join("disk.raw")], 65536).difference(&update).count();
    assert!(shadowed > 0 && cached.len() <= update.len(), "{} blocks cached for {} the child reads", cached.len(), update.len());
    // Every distinct non-zero 64 KiB block of the disk, kernel and initrd, hashed here.
    let every = distinct_blocks(&[&g.join("disk.raw"), &g.join("vmlinuz"), &g.join("initrd.gz")], 65536);
    let c = |cache: &str, args: &[&str]| client(&d.join("c"), &d.join("cfg")).args(args).arg("--cache").arg(d.join(cache)).output().unwrap();

    for (cache, args, says) in [("c1", vec!["prefetch", &url], "warm: every block"), ("c2", vec!["warm", "--all", &url], "warm: every block")] {
        let text = ok(client(&d.join("c"), &d.join("cfg")).args(&args).arg("--cache").arg(d.join(cache)));
        assert!(text.contains(&format!("{says}: {} blocks", every.len())), "{args:?}: expected {} blocks: {text}", every.len());
        let cached = stored_block_names(&d.join(cache));
        assert!(every.is_subset(&cached), "{args:?}: {} blocks missing from the cache", every.difference(&cached).count());
        // Cached, not pinned: no pin file, and status says so.
        let pins = std::fs::read_dir(d.join(cache).join("pins")).map(|r| r.count()).unwrap_or(0);
        assert_eq!(pins, 0, "{args:?} pinned blocks");
        // Zero blocks need nothing, so they count as pinned: only they may.
        let status: serde_json::Value = serde_json::from_slice(&c(cache, &["status", &url, "--json"]).stdout).unwrap();
        for (file, image) in [("root.raw", "disk.raw"), ("vmlinuz", "vmlinuz"), ("initrd.img", "initrd.gz")] {
            let blocks = block_hashes(&std::fs::read(g.join(image)).unwrap(), 65536);
            let zero = blocks.iter().filter(|b| b.is_none()).count() as f64 * 100.0 / blocks.len() as f64;
            let v = &status["files"][file];
            assert_eq!((v["resident_pct"].as_f64(), v["pinned_pct"].as_f64()), (Some(100.0), Some(zero)), "{args:?}: {file}: {status}");
        }
    }
    let text = fails(client(&d.join("c"), &d.join("cfg")).args(["warm", &url, "--cache"]).arg(d.join("c3")));
    assert!(text.contains("say what to fetch"), "{text}");

    // `status MOUNTPOINT`: the mount's own view, before and after reading the whole disk.
    let m = Mounted::new(&d.join("c"), &d.join("cfg"), &url, &d.join("mnt"), &d.join("c4"), &["--read-only"]);
    let status = |json: bool| {
        let mut cmd = client(&d.join("c"), &d.join("cfg"));
        cmd.arg("status").arg(&m.dir);
        if json {
            cmd.arg("--json");
        }
        ok(&mut cmd)
    };
    let id = inspect(&d.join("server"), "guest")["id"].as_str().unwrap().to_string();
    let text = status(false);
    assert!(text.starts_with(&format!("capsule guest ({id})")), "{text}");
    let before: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    // Nothing read yet on an empty cache: at most the zero blocks are resident, and only
    // those whose map pages are here (a mount fetches map pages as reads need them, and a
    // block is resident only if it can be read without the server).
    let disk = block_hashes(&std::fs::read(g.join("disk.raw")).unwrap(), 65536);
    let zero = disk.iter().filter(|b| b.is_none()).count() as f64 * 100.0 / disk.len() as f64;
    assert!(before["files"]["root.raw"]["resident_pct"].as_f64().unwrap() <= zero, "{before}");
    assert!(std::fs::read(m.dir.join("root.raw")).unwrap() == std::fs::read(g.join("disk.raw")).unwrap());
    let after: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(after["files"]["root.raw"]["resident_pct"].as_f64(), Some(100.0), "{after}");
    let text = status(false);
    assert!(text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["root.raw", "100.0%", "resident"]), "{text}");
    drop(m);
    // After the unmount the path is no mount: status says what is wrong, without a panic.
    fails(client(&d.join("c"), &d.join("cfg")).arg("status").arg(d.join("mnt")).arg("--cache").arg(d.join("c4")));
}
