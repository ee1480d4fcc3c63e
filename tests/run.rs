//! `capsule run` and `capsule suspend` end to end: a real QEMU (TCG) running the test guest
//! straight from a real mount, fed over real QUIC on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

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
        &["--append", "gmode=boot", "--token", &token],
    );
    let (success, output) = run.wait(180);
    let console = run.console();
    assert!(success, "run failed:\n{output}\nconsole:\n{console}");
    assert!(console.contains("CAPSULE-GUEST-MARKER boot-ok") && console.contains("CAPSULE-GUEST-VERSION 1"), "{console}");
    // The run reports what it fetched; of a 128 MiB disk the boot needs a small part.
    let line = output.lines().find(|l| l.contains("of disk")).unwrap_or_else(|| panic!("no fetch summary:\n{output}"));
    assert!(!line.contains("fetched 0 B of"), "nothing fetched? {line}");
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
        &["--append", &format!("gmode=write rw gtoken={tok}"), "--commit", "guest-written", "--push", &format!("{}/guest-written", server.url), "--token", &token],
    );
    let (success, output) = a.wait(240);
    assert!(success && a.console().contains("CAPSULE-GUEST-MARKER write-ok"), "{output}\nconsole:\n{}", a.console());
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
    let (success, output) = b.wait(240);
    let console = b.console();
    assert!(success, "{output}\nconsole:\n{console}");
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
    let mut a = Run::start(&host_a, &cfg, &runs, &format!("{}/guest", server.url), &dir.path().join("cache-a"), "on-a", &["--append", "gmode=loop", "--token", &token]);
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

    let mut b = Run::start(&dir.path().join("host-b"), &cfg, &runs, &format!("{}/guest-suspended", server.url), &dir.path().join("cache-b"), "on-b", &["--token", &token]);
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
    let mut plain = Run::start(&store, &cfg, &runs, "guest", &dir.path().join("cache-1"), "plain", &dirty);
    let mut shrunk = Run::start(&store, &cfg, &runs, "guest", &dir.path().join("cache-2"), "shrunk", &dirty);
    plain.wait_console("COUNTER 4", 180);
    shrunk.wait_console("COUNTER 4", 180);
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
    let err = fails(capsule(&store).env("CAPSULE_RUN_DIR", &runs).args(["run", "no-such-capsule", "--accel", "tcg", "--id", "bad", "--cache"]).arg(dir.path().join("cache")));
    assert!(err.contains("no-such-capsule"), "{err}");
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
