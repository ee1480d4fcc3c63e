//! `capsule run` and `capsule suspend` end to end: a real QEMU (TCG) running the test guest
//! straight from a real mount, fed over real QUIC on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

/// "3.1" "MiB" -> bytes (capsule prints sizes this way).
fn human_bytes(n: &str, unit: &str) -> f64 {
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("not a number: {n}"));
    let unit = unit.trim_end_matches([',', ';', ')']);
    n * match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => panic!("unknown unit {unit}"),
    }
}

/// A server holding the test guest (with boot files) as `guest`, and a write token.
fn serve_guest(dir: &std::path::Path) -> (ServerProcess, String) {
    let server_store = dir.join("server");
    import_guest(&server_store, true);
    let token = ok(capsule(&server_store).args(["token", "create", "--scope", "write"])).trim().to_string();
    (ServerProcess::start(&server_store, &[]), token)
}

#[test]
fn a_remote_capsule_cold_boots_with_capsule_run_from_an_empty_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = serve_guest(dir.path());
    let cache = dir.path().join("cache");
    let mut run = Run::start(
        &dir.path().join("client"),
        &dir.path().join("cfg"),
        &dir.path().join("runs"),
        &format!("{}/guest", server.url),
        &cache,
        "cold",
        &["--append", "gmode=boot", "--token", &token, "--json"],
    );
    let output = run.wait_marker(BOOT_OK, 180);
    // stdout is the report alone: the run, the guest's clean exit, where the time went and
    // what came over the link, as the summary line says.
    let report: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap_or_else(|e| panic!("run --json: {e}:\n{}", run.stdout()));
    assert_eq!(
        (report["id"].as_str(), report["capsule"].as_str(), report["hypervisor"].as_str(), report["accel"].as_str()),
        (Some("cold"), Some("guest"), Some("qemu"), Some("tcg")),
        "{report}"
    );
    assert_eq!(
        (report["exit_code"].as_u64(), report["guest"]["code"].as_i64(), report["error"].is_null(), report["resumed"].as_bool()),
        (Some(0), Some(0), true, Some(false)),
        "{report}"
    );
    let secs = &report["seconds"];
    let (mounted, running, total) = (secs["mounted"].as_f64().unwrap(), secs["running"].as_f64().unwrap(), secs["total"].as_f64().unwrap());
    assert!(0.0 < mounted && mounted <= running && running < total, "{report}");
    let fetched = &report["fetched"];
    assert!(fetched["source"].as_str().unwrap().starts_with(&server.url) && fetched["wire_bytes"].as_u64() > Some(0), "{report}");
    assert!(
        fetched["files"]["vmlinuz"].as_u64().unwrap() >= std::fs::metadata(guest_dir().join("vmlinuz")).unwrap().len(),
        "the kernel is read whole: {report}"
    );
    let console = run.console();
    assert!(console.contains("CAPSULE-GUEST-VERSION 1"), "{console}");
    // "fetched X of Y of disk (...); W on the wire (N blocks)": of the disk (its size from
    // the image itself) a booted guest needs some, and far from all.
    let disk_size = std::fs::metadata(guest_dir().join("disk.raw")).unwrap().len() as f64;
    let line = output.lines().find(|l| l.contains("of disk")).unwrap_or_else(|| panic!("no fetch summary:\n{output}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "fetched").unwrap_or_else(|| panic!("{line}"));
    let (fetched, of) = (human_bytes(words[at + 1], words[at + 2]), human_bytes(words[at + 4], words[at + 5]));
    assert!((of - disk_size).abs() <= 0.01 * disk_size, "the summary's disk size {of} is not the image's {disk_size}: {line}");
    assert!(fetched > 64.0 * 1024.0 && fetched < disk_size / 4.0, "the boot fetched {fetched} bytes of a {disk_size}-byte disk: {line}");
    // And on the wire (background fetches included): the kernel and initrd, read whole,
    // and that part of the disk.
    let at = words.iter().position(|w| *w == "wire").unwrap_or_else(|| panic!("{line}"));
    let wire = human_bytes(words[at - 4], words[at - 3]);
    let boot_files: u64 = ["vmlinuz", "initrd.gz"].iter().map(|f| std::fs::metadata(guest_dir().join(f)).unwrap().len()).sum();
    assert!(wire > fetched && wire < boot_files as f64 + disk_size / 4.0, "{wire} bytes on the wire for a boot: {line}");
    // Unmounted and cleaned up at the end.
    assert!(!dir.path().join("runs/cold").exists(), "run directory left behind:\n{output}");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(dir.path().to_str().unwrap()), "mount left behind:\n{mounts}");
}

#[test]
fn a_file_written_by_the_guest_is_committed_pushed_and_found_on_another_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = serve_guest(dir.path());
    let cfg = dir.path().join("cfg");
    let runs = dir.path().join("runs");
    let source = format!("{}/guest", server.url);
    let tok = format!("write-{}", std::process::id());
    let mut a = Run::start(
        &dir.path().join("host-a"),
        &cfg,
        &runs,
        &source,
        &dir.path().join("cache-a"),
        "writer",
        &[
            "--append",
            &format!("gmode=write rw gtoken={tok}"),
            "--commit",
            "guest-written",
            "--push",
            &format!("{}/guest-written", server.url),
            "--token",
            &token,
        ],
    );
    let output = a.wait_marker("CAPSULE-GUEST-MARKER write-ok", 240);
    assert!(output.contains("pushed guest-written"), "{output}");

    let mut b = Run::start(
        &dir.path().join("host-b"),
        &cfg,
        &runs,
        &format!("{}/guest-written", server.url),
        &dir.path().join("cache-b"),
        "reader",
        &["--append", "gmode=read", "--token", &token, "--read-only"],
    );
    b.wait_marker("CAPSULE-GUEST-MARKER read-ok", 240);
    let console = b.console();
    assert!(console.contains(&format!("CAPSULE-GUEST-READ {tok}")), "the file written on host A is not there:\n{console}");
}

/// Distinct bytes of `memory.raw` mapped into QEMU (its RSS there) and whether the kernel
/// mapped any of it as huge pages.
fn qemu_ram_rss(pid: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut rss, mut pmd, mut inside) = (0, 0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.ends_with("/memory.raw");
        } else if inside {
            let kb = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
            if line.starts_with("Rss:") {
                rss += kb(line);
            } else if line.starts_with("FilePmdMapped:") {
                pmd += kb(line);
            }
        }
    }
    (rss, pmd)
}

#[test]
fn a_guest_suspended_on_host_a_resumes_on_host_b_and_its_counter_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = serve_guest(dir.path());
    let cfg = dir.path().join("cfg");
    let runs = dir.path().join("runs");
    let host_a = dir.path().join("host-a");
    let mut a =
        Run::start(&host_a, &cfg, &runs, &format!("{}/guest", server.url), &dir.path().join("cache-a"), "on-a", &["--append", "gmode=loop", "--token", &token]);
    a.wait_console("COUNTER 3", 120);
    let ps: serde_json::Value = serde_json::from_str(&ok(client(&host_a, &cfg).env("CAPSULE_RUN_DIR", &runs).args(["ps", "--json"]))).unwrap();
    assert!(ps.as_array().unwrap().iter().any(|r| r["run"]["id"] == "on-a" && r["running"] == true), "{ps}");
    let report = a.suspend(&cfg, "guest-suspended", &["--push", &format!("{}/guest-suspended", server.url), "--token", &token]);
    let (success, output) = a.wait(60);
    assert!(success, "run A did not end cleanly after the suspend:\n{output}");
    let before = counters(&a.console());
    let last = *before.last().unwrap();
    assert!(report["devstate_bytes"].as_u64().unwrap() > 0, "{report}");
    assert!(report["memory_blocks"].as_u64().unwrap() > 0, "the child carries no RAM: {report}");

    let mut b = Run::start(
        &dir.path().join("host-b"),
        &cfg,
        &runs,
        &format!("{}/guest-suspended", server.url),
        &dir.path().join("cache-b"),
        "on-b",
        &["--token", &token],
    );
    let resumed_at = std::time::Instant::now();
    b.wait_console("COUNTER", 120);
    let pid = b.record()["qemu_pid"].as_u64().unwrap();
    let mountpoint = std::path::PathBuf::from(b.record()["mountpoint"].as_str().unwrap());
    // Fault granularity: what the first 10 s fetched of the RAM against what QEMU touched.
    std::thread::sleep(std::time::Duration::from_secs(10).saturating_sub(resumed_at.elapsed()));
    let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(mountpoint.join(".capsule/stats.json")).unwrap()).unwrap();
    let (rss, huge) = qemu_ram_rss(pid);
    let fetched = stats["files"]["memory.raw"]["fetched_bytes"].as_u64().unwrap();
    assert_eq!(huge, 0, "guest RAM on the mount was mapped with huge pages");
    assert!(fetched > 0, "the resume fetched no RAM at all? {stats}");
    assert!(fetched as f64 <= 1.5 * rss as f64, "resume fetched {fetched} bytes of RAM in 10 s; QEMU touched {rss} bytes of it");
    // The boot files are not needed to resume: only the kernel's header block travels.
    let boot_files = stats["files"]["vmlinuz"]["fetched_bytes"].as_u64().unwrap() + stats["files"]["initrd.img"]["fetched_bytes"].as_u64().unwrap();
    assert!(boot_files <= 64 << 10, "the resume fetched {boot_files} bytes of kernel and initrd");

    b.wait_console(&format!("COUNTER {}", last + 3), 60);
    let console = b.console();
    let after = counters(&console);
    assert!(!console.contains("CAPSULE-GUEST-VERSION"), "host B booted the guest instead of resuming it:\n{console}");
    assert!(after[0] > last && after[0] <= last + 2, "host A stopped at {last}, host B went on from {}:\n{console}", after[0]);
    // Kernel messages may garble a line, so only the order is checked.
    assert!(after.windows(2).all(|w| w[1] > w[0]), "{after:?}");
    // Suspended again, the grandchild carries only the pages dirtied since the resume.
    let again = b.suspend(&cfg, "guest-suspended-2", &[]);
    let (first, second) = (report["memory_blocks"].as_u64().unwrap(), again["memory_blocks"].as_u64().unwrap());
    assert!(second * 4 < first, "second suspend stored {second} RAM blocks, the first {first}: {again}");
    let (success, output) = b.wait(60);
    assert!(success && output.contains("suspended as guest-suspended-2"), "{output}");

    // The same child resumed twice more from empty caches, side by side: with
    // --memory-cluster 8 and with --prefetch memory. Its RAM pages, hashed here from an
    // export (from the server's store, which holds the whole chain), tell what each cache
    // must hold.
    let export = dir.path().join("export");
    ok(capsule(&dir.path().join("server")).args(["export", "guest-suspended", "--out"]).arg(&export));
    let pages = block_hashes(&std::fs::read(export.join("memory.raw")).unwrap(), 4096);
    let url = format!("{}/guest-suspended", server.url);
    let mut c = Run::start(&dir.path().join("host-c"), &cfg, &runs, &url, &dir.path().join("cache-c"), "on-c", &["--token", &token, "--memory-cluster", "8"]);
    let mut d = Run::start(&dir.path().join("host-d"), &cfg, &runs, &url, &dir.path().join("cache-d"), "on-d", &["--token", &token, "--prefetch", "memory"]);
    c.wait_console(&format!("COUNTER {}", last + 2), 120);
    d.wait_console(&format!("COUNTER {}", last + 2), 120);
    // A fault fetches its whole aligned group of 8 pages: every group the guest touched is
    // complete in C's cache, unlike B's (page by page).
    let (c_full, c_groups) = complete_groups(&pages, &stored_block_names(&dir.path().join("cache-c")), 8);
    let (b_full, b_groups) = complete_groups(&pages, &stored_block_names(&dir.path().join("cache-b")), 8);
    eprintln!("complete groups of 8 RAM pages: {c_full}/{c_groups} with --memory-cluster 8, {b_full}/{b_groups} without");
    assert!(c_groups > 0 && c_full as f64 >= 0.98 * c_groups as f64, "--memory-cluster 8 left groups incomplete: {c_full} of {c_groups} complete");
    assert!((b_full as f64) < 0.9 * b_groups as f64, "without clustering {b_full} of {b_groups} groups are complete: the check cannot tell");
    // --prefetch memory: the whole RAM image arrives in the background, the disk does not.
    let mnt_d = std::path::PathBuf::from(d.record()["mountpoint"].as_str().unwrap());
    let start = std::time::Instant::now();
    loop {
        let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(mnt_d.join(".capsule/stats.json")).unwrap()).unwrap();
        if stats["files"]["memory.raw"]["resident_pct"].as_f64().unwrap() >= 100.0 {
            assert!(stats["files"]["root.raw"]["resident_pct"].as_f64().unwrap() < 100.0, "--prefetch memory fetched the disk too: {stats}");
            break;
        }
        assert!(start.elapsed().as_secs() < 180, "--prefetch memory did not bring the RAM image in 180 s: {stats}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let cached = stored_block_names(&dir.path().join("cache-d"));
    let missing = pages.iter().flatten().filter(|h| !cached.contains(*h)).count();
    assert_eq!(missing, 0, "RAM pages not in the cache after --prefetch memory");
    d.wait_console(&format!("COUNTER {}", last + 4), 60);
    c.interrupt();
    d.interrupt();
}

/// Aligned groups of `n` pages holding a cached page whose content no other page has (so
/// it was fetched for that page): how many of them have every non-zero page cached, of how many.
fn complete_groups(pages: &[Option<String>], cached: &std::collections::HashSet<String>, n: usize) -> (usize, usize) {
    let mut count = std::collections::HashMap::new();
    for h in pages.iter().flatten() {
        *count.entry(h.as_str()).or_insert(0) += 1;
    }
    let (mut full, mut touched) = (0, 0);
    for group in pages.chunks(n) {
        if group.iter().flatten().any(|h| count[h.as_str()] == 1 && cached.contains(h)) {
            touched += 1;
            full += usize::from(group.iter().flatten().all(|h| cached.contains(h)));
        }
    }
    (full, touched)
}

/// QEMU's seccomp mode (`Seccomp:` in /proc/PID/status): 2 under a filter, 0 without.
fn seccomp_mode(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("Seccomp:")).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("{status}"))
}

/// The kernel readahead (KiB) of the FUSE mount at `mnt`, from its device's sysfs entry.
fn mount_readahead_kb(mnt: &std::path::Path) -> u64 {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dev = info
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4) == Some(&mnt.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} is not mounted", mnt.display()))[2]
        .to_string();
    std::fs::read_to_string(format!("/sys/class/bdi/{dev}/read_ahead_kb")).unwrap().trim().parse().unwrap()
}

#[test]
fn ballooning_before_a_suspend_leaves_freed_ram_out_of_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    import_guest(&store, true);
    let cfg = dir.path().join("cfg");
    let runs = dir.path().join("runs");
    // The guest fills 96 MiB of tmpfs with random data and deletes it: freed, not zero.
    let dirty = ["--append", "gmode=loop gdirty=96"];
    // `plain` also runs without the fault-granularity fix; `shrunk` has it.
    let mut plain = Run::start(&store, &cfg, &runs, "guest", &dir.path().join("cache-1"), "plain", &[&dirty[..], &["--no-fault-fix"]].concat());
    let mut shrunk = Run::start(&store, &cfg, &runs, "guest", &dir.path().join("cache-2"), "shrunk", &dirty);
    plain.wait_console("COUNTER 4", 180);
    shrunk.wait_console("COUNTER 4", 180);
    // The fix: QEMU under the seccomp filter, and no kernel readahead on the mount.
    let place = |r: &Run| (r.record()["qemu_pid"].as_u64().unwrap(), std::path::PathBuf::from(r.record()["mountpoint"].as_str().unwrap()));
    let ((fixed_pid, fixed_mnt), (plain_pid, plain_mnt)) = (place(&shrunk), place(&plain));
    assert_eq!((seccomp_mode(fixed_pid), mount_readahead_kb(&fixed_mnt)), (2, 0), "the fault fix is off by default");
    assert_eq!(seccomp_mode(plain_pid), 0, "--no-fault-fix still filters QEMU's system calls");
    assert!(mount_readahead_kb(&plain_mnt) > 0, "--no-fault-fix still turns kernel readahead off");
    let without = plain.suspend(&cfg, "without-balloon", &["--no-balloon"]);
    let with = shrunk.suspend(&cfg, "with-balloon", &[]);
    let (n_without, n_with) = (without["memory_blocks"].as_u64().unwrap(), with["memory_blocks"].as_u64().unwrap());
    eprintln!("RAM blocks in the child: {n_without} without a balloon, {n_with} with ({with})");
    assert!(n_without > 96 * 256, "without a balloon the freed 96 MiB should be in the child: {without}");
    assert!((n_with as f64) < 0.6 * n_without as f64, "ballooning kept {n_with} RAM blocks of {n_without}: {with}");
    assert!(with["balloon"]["reached_mib"].as_u64().unwrap() >= 64, "ballooned below what the guest needs: {with}");
    // And the ballooned child still resumes.
    let mut again = Run::start(&store, &cfg, &runs, "with-balloon", &dir.path().join("cache-3"), "again", &[]);
    let last = *counters(&shrunk.console()).last().unwrap();
    again.wait_console(&format!("COUNTER {}", last + 2), 120);
}

#[test]
fn bad_runs_fail_cleanly_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    import_guest(&store, true);
    let runs = dir.path().join("runs");
    let err = fails(capsule(&store).env("CAPSULE_RUN_DIR", &runs).args(["suspend", "no-such-run", "child"]));
    assert!(err.contains("no run \"no-such-run\""), "{err}");
    let out = capsule(&store)
        .env("CAPSULE_RUN_DIR", &runs)
        .args(["run", "no-such-capsule", "--accel", "tcg", "--id", "bad", "--json", "--cache"])
        .arg(dir.path().join("cache"))
        .output()
        .unwrap();
    // Capsule's own failure: exit 1 (never a guest's 64+N), and with --json a report saying so.
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-capsule"), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["id"].as_str(), report["exit_code"].as_u64()), (Some("bad"), Some(1)), "{report}");
    assert!(report["error"].as_str().unwrap().contains("no-such-capsule") && report["guest"].is_null(), "{report}");
    assert!(!runs.join("bad").exists(), "run directory left behind");
    // A QEMU that cannot start (a bad extra argument): the error is QEMU's, the mount is gone.
    let err = fails(
        capsule(&store)
            .env("CAPSULE_RUN_DIR", &runs)
            .args(["run", "guest", "--accel", "tcg", "--id", "bad-qemu", "--quiet", "--cache"])
            .arg(dir.path().join("cache"))
            .args(["--", "-no-such-qemu-option"]),
    );
    assert!(err.contains("no-such-qemu-option"), "QEMU's own complaint should reach the user: {err}");
    assert!(!runs.join("bad-qemu").exists(), "run directory left behind");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(dir.path().to_str().unwrap()), "mount left behind:\n{mounts}");
}
