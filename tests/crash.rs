//! Issue 11, data safety: `kill -9` at random points of an import, a commit, a pull and a
//! mount being written, many times; afterwards nothing that verifies is wrong, nothing a
//! writer was told is written is lost, and a rerun completes. A local-store mount on a
//! full disk never deletes store blocks.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Kill points per kind of operation (`CAPSULE_CRASH_ITERATIONS`, default 12).
fn iterations() -> u32 {
    std::env::var("CAPSULE_CRASH_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(12)
}

/// A small deterministic generator for kill points (the seed is printed on failure).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn seed() -> u64 {
    let s = std::env::var("CAPSULE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    eprintln!("crash seed {s} (CAPSULE_CRASH_SEED={s} repeats it)");
    s | 1
}

/// Spawns `cmd`, SIGKILLs it after `after` unless it finished; true if it was killed.
fn kill_after(cmd: &mut Command, after: Duration) -> bool {
    let mut child: Child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if start.elapsed() >= after {
            let _ = child.kill();
            let _ = child.wait();
            return true;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Kill points spread over a run's length, which varies (dedup hits make later runs 3-5x
/// faster; a busy machine slows some): a run that finishes before its kill point sets the
/// estimate a little below its own length, so the next points fall inside a run; a killed
/// run leaves it as it is.
struct KillPoints {
    rng: Rng,
    estimate: Duration,
}

impl KillPoints {
    /// Runs `cmd` and kills it at a random point of the estimated length; true if killed.
    fn run(&mut self, cmd: &mut Command) -> bool {
        let at = Duration::from_micros(self.rng.below(self.estimate.as_micros() as u64));
        let start = Instant::now();
        let killed = kill_after(cmd, at);
        if !killed {
            self.estimate = start.elapsed().mul_f64(0.9);
        }
        killed
    }
}

fn timed(cmd: &mut Command) -> Duration {
    let start = Instant::now();
    ok(cmd);
    start.elapsed()
}

/// Every ref of `store` that verifies exports exactly `expected(name)`; returns how many
/// refs verified.
fn nothing_that_verifies_is_wrong(store: &Path, out: &Path, expected: &dyn Fn(&str) -> Option<Vec<u8>>) -> usize {
    let refs: serde_json::Value = serde_json::from_str(&ok(capsule(store).args(["ls", "--json"]))).unwrap();
    let mut verified = 0;
    for r in refs.as_array().unwrap() {
        let name = r["name"].as_str().unwrap();
        let (status, text) = run(capsule(store).args(["verify", name]));
        assert!(!text.contains("panicked"), "{text}");
        if !status.status.success() {
            continue;
        }
        verified += 1;
        let _ = std::fs::remove_dir_all(out);
        ok(capsule(store).args(["export", name, "--out"]).arg(out));
        let got = std::fs::read(out.join("root.raw")).unwrap();
        let want = expected(name).unwrap_or_else(|| panic!("unexpected ref {name}"));
        assert!(got == want, "capsule {name} verifies but its disk differs from what was imported");
    }
    verified
}

#[test]
fn kill_9_during_import_leaves_nothing_that_verifies_but_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (store, out) = (dir.path().join("store"), dir.path().join("out"));
    let disks: Vec<PathBuf> = (0..3u64)
        .map(|k| {
            let p = dir.path().join(format!("disk{k}"));
            // Shared blocks between the disks: a rerun's dedup hits land on files a killed
            // import left behind.
            let mut bytes = pseudo_random(6 << 20, 7);
            bytes.extend(pseudo_random(2 << 20, 100 + k));
            std::fs::write(&p, bytes).unwrap();
            p
        })
        .collect();
    let import = |k: usize| {
        let mut c = capsule(&store);
        c.args(["import", &format!("vm{k}"), "--block-size", "4K", "--disk"]).arg(format!("root={}", disks[k].display()));
        c
    };
    let full = timed(&mut import(0));
    ok(capsule(&store).args(["rm", "vm0"]));
    ok(capsule(&store).arg("gc"));
    let mut points = KillPoints { rng: Rng(seed()), estimate: full };
    let mut killed = 0;
    for i in 0..iterations() {
        let k = (i % 3) as usize;
        let _ = capsule(&store).args(["rm", &format!("vm{k}")]).output();
        // Every other time over the leftovers of the killed one (dedup hits on them).
        if i % 2 == 0 {
            ok(capsule(&store).arg("gc"));
        }
        killed += u32::from(points.run(&mut import(k)));
        nothing_that_verifies_is_wrong(&store, &out, &|name| std::fs::read(&disks[name[2..].parse::<usize>().ok()?]).ok());
    }
    assert!(killed >= iterations() / 3, "only {killed} of {} imports were killed mid-way", iterations());
    // Reruns over the leftovers complete and are right.
    for k in 0..3 {
        let _ = capsule(&store).args(["rm", &format!("vm{k}")]).output();
        ok(&mut import(k));
    }
    assert_eq!(nothing_that_verifies_is_wrong(&store, &out, &|name| std::fs::read(&disks[name[2..].parse::<usize>().ok()?]).ok()), 3);
}

#[test]
fn kill_9_during_pull_leaves_nothing_that_verifies_but_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, local, cfg, out) = (dir.path().join("srv"), dir.path().join("local"), dir.path().join("cfg"), dir.path().join("out"));
    let disk = dir.path().join("disk");
    let bytes = pseudo_random(12 << 20, 11);
    std::fs::write(&disk, &bytes).unwrap();
    ok(capsule(&srv).args(["import", "vm", "--block-size", "4K", "--disk"]).arg(format!("root={}", disk.display())));
    let server = ServerProcess::start(&srv, &["--public-read"]);
    let pull = || {
        let mut c = client(&local, &cfg);
        c.args(["pull", &format!("{}/vm", server.url)]);
        c
    };
    let full = timed(&mut pull());
    ok(capsule(&local).args(["rm", "vm"]));
    ok(capsule(&local).arg("gc"));
    let mut points = KillPoints { rng: Rng(seed()), estimate: full };
    let mut killed = 0;
    for _ in 0..iterations() {
        let _ = capsule(&local).args(["rm", "vm"]).output();
        ok(capsule(&local).arg("gc"));
        killed += u32::from(points.run(&mut pull()));
        nothing_that_verifies_is_wrong(&local, &out, &|_| Some(bytes.clone()));
    }
    assert!(killed >= iterations() / 3, "only {killed} of {} pulls were killed mid-way", iterations());
    ok(&mut pull());
    assert_eq!(nothing_that_verifies_is_wrong(&local, &out, &|_| Some(bytes.clone())), 1);
}

/// The block pattern of write number `n` to block `b`: 4 KiB naming both.
fn pattern(b: u64, n: u64) -> Vec<u8> {
    let mut v = pseudo_random(4096, (b << 32) ^ n ^ 0x9e37);
    v[..16].copy_from_slice(&[b.to_le_bytes(), n.to_le_bytes()].concat());
    v
}

/// What the disk must hold once a write the kill interrupted (`in_flight`) is settled: it
/// left its blocks old or new, whole (never torn), and `now` tells which.
fn settle_interrupted(expected: Vec<u8>, now: &[u8], in_flight: Option<(u64, Vec<u8>)>, round: u32) -> Vec<u8> {
    let Some((off, bytes)) = in_flight else { return expected };
    let (a, b) = (off as usize, off as usize + bytes.len());
    let (lo, hi) = ((a / 4096) * 4096, b.div_ceil(4096) * 4096);
    let mut new = expected.clone();
    new[a..b].copy_from_slice(&bytes);
    assert!(now[lo..hi] == expected[lo..hi] || now[lo..hi] == new[lo..hi], "round {round}: the interrupted write left its block torn");
    if now[lo..hi] == new[lo..hi] {
        new
    } else {
        expected
    }
}

#[test]
fn kill_9_of_a_mount_being_written_and_of_its_commit_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (store, cache, cfg, mnt, out) = (d.join("store"), d.join("cache"), d.join("cfg"), d.join("mnt"), d.join("out"));
    const BLOCKS: u64 = 256; // 1 MiB disk of 4 KiB blocks
    let base = pseudo_random((BLOCKS * 4096) as usize, 5);
    std::fs::write(d.join("disk"), &base).unwrap();
    ok(capsule(&store).args(["import", "vm", "--block-size", "4K", "--disk"]).arg(format!("root={}", d.join("disk").display())));
    let mut rng = Rng(seed());
    // What the disk must hold: the base, then every acknowledged write in order.
    let mut expected = base.clone();
    let mut n = 0u64;
    let mut in_flight: Option<(u64, Vec<u8>)> = None;
    for round in 0..iterations() {
        let m = Mounted::new(&store, &cfg, "vm", &mnt, &cache, &[]);
        // Everything acknowledged before (in earlier rounds, whose daemons were killed)
        // reads back; the write the kill interrupted left its range old or new, whole.
        let now = std::fs::read(mnt.join("root.raw")).unwrap();
        expected = settle_interrupted(expected, &now, in_flight.take(), round);
        assert!(now == expected, "round {round}: the disk lost acknowledged writes after kill -9 of its mount");
        // A writer: full-block writes (some rewrite a block, some gain one), and a partial
        // write now and then (read-modify-write); the daemon is killed while it writes.
        let pid = m.pid().unwrap();
        let stop_after = 20 + rng.below(200);
        let path = mnt.join("root.raw");
        let writer = {
            let path = path.clone();
            let mut local = Rng(rng.0 ^ 0x5555);
            let start_n = n;
            std::thread::spawn(move || {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                let mut acked = Vec::new();
                let mut failed = None;
                for k in 0..10_000u64 {
                    let b = local.below(BLOCKS);
                    let nn = start_n + k;
                    let (off, bytes) = if k % 5 == 4 { (b * 4096 + 100, pattern(b, nn)[..1000].to_vec()) } else { (b * 4096, pattern(b, nn)) };
                    match f.write_all_at(&bytes, off) {
                        Ok(()) => acked.push((off, bytes)),
                        Err(_) => {
                            failed = Some((off, bytes));
                            break;
                        }
                    }
                    if k % 7 == 0 {
                        let _ = f.sync_data();
                    }
                }
                (acked, failed)
            })
        };
        std::thread::sleep(Duration::from_millis(stop_after));
        // The supervisor first, or it would restart the daemon (tests/takeover.rs covers that).
        if let Some(supervisor) = parent_of(pid) {
            Command::new("kill").args(["-9", &supervisor.to_string()]).output().unwrap();
        }
        Command::new("kill").args(["-9", &pid.to_string()]).output().unwrap();
        // The next round's mount takes the overlay's lock, which the killed daemon holds
        // until it has exited (kill returns at once): wait for that, as a user's retry would.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| !r.trim_start().starts_with('Z')))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (acked, failed) = writer.join().unwrap();
        in_flight = failed;
        n += 10_000;
        for (off, bytes) in &acked {
            expected[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
        }
        drop(m);
        let _ = Command::new("fusermount3").arg("-uz").arg(&mnt).output();
    }
    // A commit killed at random points, then a full one: the child is the disk as written.
    let m = Mounted::new(&store, &cfg, "vm", &mnt, &cache, &[]);
    let now = std::fs::read(mnt.join("root.raw")).unwrap();
    // The last round's kill may have interrupted a write too.
    expected = settle_interrupted(expected, &now, in_flight.take(), iterations());
    assert!(now == expected, "after the last kill -9: the disk lost acknowledged writes");
    let commit = |name: &str| {
        let mut c = capsule(&store);
        c.args(["commit"]).arg(&mnt).arg(name);
        c
    };
    let full = timed(&mut commit("probe"));
    ok(capsule(&store).args(["rm", "probe"]));
    let mut points = KillPoints { rng: Rng(rng.0), estimate: full };
    for i in 0..iterations() {
        points.run(&mut commit(&format!("child{i}")));
    }
    ok(&mut commit("final"));
    drop(m);
    let verified = nothing_that_verifies_is_wrong(&store, &out, &|name| Some(if name == "vm" { base.clone() } else { expected.clone() }));
    assert!(verified >= 2, "the base and the final commit verify");
}

#[test]
fn a_mount_of_the_local_store_never_deletes_store_blocks_on_a_full_disk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("fs");
    std::fs::create_dir_all(&disk).unwrap();
    // Store, cache and overlay on one small filesystem of our own.
    tool(Command::new("mount").args(["-t", "tmpfs", "-o", "size=10m", "capsule-test"]).arg(&disk));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).output();
        }
    }
    let _tmpfs = Unmount(disk.clone());
    let (store, cache, cfg) = (disk.join("store"), disk.join("cache"), dir.path().join("cfg"));
    let image = dir.path().join("disk");
    let bytes = pseudo_random(6 << 20, 3);
    std::fs::write(&image, &bytes).unwrap();
    ok(capsule(&store).args(["import", "vm", "--block-size", "64K", "--disk"]).arg(format!("root={}", image.display())));
    let before = stored_block_names(&store);
    assert!(!before.is_empty());
    let m = Mounted::new(&store, &cfg, "vm", &dir.path().join("mnt"), &cache, &[]);
    // Read it all (the blocks are "cached" as far as the mount knows), then fill the disk.
    assert!(std::fs::read(m.dir.join("root.raw")).unwrap() == bytes);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(m.dir.join("root.raw")).unwrap();
    let chunk = pseudo_random(256 << 10, 9);
    let mut at = 0u64;
    let err = loop {
        assert!(at < 6 << 20, "a 10 MiB disk holding a 6 MiB store took a 6 MiB overlay");
        match f.write_all_at(&chunk, at) {
            Ok(()) => at += chunk.len() as u64,
            Err(e) => break e,
        }
    };
    assert_eq!(err.raw_os_error(), Some(28), "ENOSPC expected, got {err}");
    drop(f);
    assert_eq!(stored_block_names(&store), before, "a full disk cost the store blocks");
    drop(m);
    ok(capsule(&store).args(["verify", "vm"]));
}

/// `kill -9` at random points of a `capsule flatten` of the oldest kept day of a chain whose
/// first days were removed: every day still verifies and exports as it was, a rerun finishes
/// the flatten, and gc then leaves what an uninterrupted flatten and gc leave.
#[test]
fn kill_9_during_flatten_leaves_every_day_intact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (template, out) = (d.join("template"), d.join("out"));
    // Six days of a 4 MiB disk at 4 KiB blocks, each rewriting 512 KiB of it.
    let mut bytes = pseudo_random(4 << 20, 3);
    let mut days = Vec::new();
    for day in 0..6usize {
        if day > 0 {
            let at = ((day * 3) % 7) << 19;
            bytes[at..at + (1 << 19)].copy_from_slice(&pseudo_random(1 << 19, 50 + day as u64));
        }
        let image = d.join("day.raw");
        std::fs::write(&image, &bytes).unwrap();
        days.push(bytes.clone());
        let mut c = capsule(&template);
        c.args(["import", &format!("day{day}"), "--block-size", "4K", "--disk"]).arg(format!("root={}", image.display()));
        if day > 0 {
            c.args(["--parent", &format!("day{}", day - 1)]);
        }
        ok(&mut c);
    }
    ok(capsule(&template).args(["rm", "day0", "day1"]));
    let expected = |name: &str| days.get(name.strip_prefix("day")?.parse::<usize>().ok()?).cloned();
    let copy = |to: &Path| assert!(Command::new("cp").arg("-a").arg(&template).arg(to).status().unwrap().success());
    let flatten = |store: &Path| {
        let mut c = capsule(store);
        c.args(["flatten", "day2"]);
        c
    };
    let reference = d.join("reference");
    copy(&reference);
    let full = timed(&mut flatten(&reference));
    ok(capsule(&reference).arg("gc"));
    assert_eq!(nothing_that_verifies_is_wrong(&reference, &out, &expected), 4);
    let ids = |store: &Path| ok(capsule(store).args(["ls", "--json"]));
    let (want_ids, want_blocks) = (ids(&reference), stored_block_names(&reference));
    assert!(want_blocks.len() < stored_block_names(&template).len(), "the flatten and gc freed nothing");
    let mut points = KillPoints { rng: Rng(seed()), estimate: full };
    let mut killed = 0;
    for i in 0..iterations() {
        let store = d.join(format!("s{i}"));
        copy(&store);
        killed += u32::from(points.run(&mut flatten(&store)));
        assert_eq!(nothing_that_verifies_is_wrong(&store, &out, &expected), 4, "a day stopped verifying after a killed flatten");
        // The rerun finishes it: the same capsules (ids) as an uninterrupted flatten, the same blocks.
        ok(&mut flatten(&store));
        ok(capsule(&store).arg("gc"));
        ok(capsule(&store).arg("verify"));
        assert_eq!(ids(&store), want_ids, "a finished flatten names other capsules than an uninterrupted one");
        assert_eq!(stored_block_names(&store), want_blocks, "a finished flatten and gc leave other blocks than an uninterrupted one");
        std::fs::remove_dir_all(&store).unwrap();
    }
    assert!(killed >= iterations() / 3, "only {killed} of {} flattens were killed mid-way", iterations());
}
