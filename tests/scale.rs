//! Stateless servers on a distributed object store: a real 3-node Garage cluster on
//! loopback (replication factor 3), real `capsule serve --backend s3://...` processes
//! sharing one identity directory, real QUIC, FUSE and QEMU.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use common::garage::Cluster;
use common::*;

/// Two servers, A on Garage node 0 and B on node 1, with one identity and token file (B's
/// directory is a copy of A's, as an operator would deploy it); returns them and a write token.
fn two_servers(dir: &Path, cluster: &Cluster, prefix: &str) -> (ServerProcess, ServerProcess, String) {
    let (id_a, id_b) = (dir.join("server-a"), dir.join("server-b"));
    let token = ok(capsule(&id_a).args(["token", "create", "--scope", "write"])).trim().to_string();
    // The identity is created on first serve; make it now so B's copy has it.
    ok(Command::new("cp").arg("-a").arg(&id_a).arg(&id_b));
    let start = |id: &Path, node: usize| {
        let mut args = cluster.serve_args(node, prefix);
        args.push("--public-read".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ServerProcess::start_env(id, "127.0.0.1:0", &args, &cluster.env())
    };
    let a = start(&id_a, 0);
    std::fs::remove_dir_all(id_b.join("server")).unwrap();
    ok(Command::new("cp").arg("-a").arg(id_a.join("server")).arg(id_b.join("server")));
    let b = start(&id_b, 1);
    assert_eq!(a.fingerprint, b.fingerprint, "servers sharing an identity directory show one certificate");
    (a, b, token)
}

use std::process::Command;

fn capsule_id(store: &Path, name: &str) -> String {
    inspect(store, name)["id"].as_str().unwrap().to_string()
}

fn fetched_blocks(mnt: &Path) -> u64 {
    let stats: serde_json::Value = std::fs::read(mnt.join(".capsule/stats.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    stats["files"]["root.raw"]["fetched_blocks"].as_u64().unwrap_or(0)
}

/// One boot, three events: the capsule is pushed through A and mounted through B (A as the
/// second server) on an empty cache; once the boot has read some blocks a Garage node dies
/// (neither server's endpoint: later reads need the two nodes left), and later server B
/// dies (the mount moves to A). The guest boots with no I/O error.
#[test]
fn push_through_a_boot_through_b_while_a_garage_node_and_then_b_die() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(Mutex::new(Cluster::start(dir.path())));
    let (a, b, token) = two_servers(dir.path(), &cluster.lock().unwrap(), "boot");
    let (local, cfg) = (dir.path().join("local"), dir.path().join("cfg"));
    import_guest(&local, true);
    let pushed = ok(client(&local, &cfg).args(["push", "guest", &format!("{}/guest", a.url), "--token", &token]));
    assert!(pushed.contains("guest"), "{pushed}");

    let both = format!("capsule://{},{}/guest", b.url.trim_start_matches("capsule://"), a.url.trim_start_matches("capsule://"));
    let m = Mounted::new(&dir.path().join("client"), &cfg, &both, &dir.path().join("mnt"), &dir.path().join("cache"), &["--read-only"]);
    let b = Arc::new(Mutex::new(Some(b)));
    let (mnt, stop) = (m.dir.clone(), Arc::new(AtomicBool::new(false)));
    let (node_killed_at, server_killed_at) = (Arc::new(AtomicU64::new(u64::MAX)), Arc::new(AtomicU64::new(u64::MAX)));
    let failover_ms = Arc::new(AtomicU64::new(u64::MAX));
    let killer = {
        let (cluster, b, stop, node_at, server_at, failover_ms) =
            (cluster.clone(), b.clone(), stop.clone(), node_killed_at.clone(), server_killed_at.clone(), failover_ms.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = fetched_blocks(&mnt);
                if n >= 4 && node_at.load(Ordering::Relaxed) == u64::MAX {
                    cluster.lock().unwrap().kill(2);
                    node_at.store(n, Ordering::Relaxed);
                }
                if n >= 14 {
                    drop(b.lock().unwrap().take()); // kills server B
                    server_at.store(n, Ordering::Relaxed);
                    // How long until a block arrives again (from A).
                    let killed = std::time::Instant::now();
                    while !stop.load(Ordering::Relaxed) && killed.elapsed() < Duration::from_secs(120) {
                        if fetched_blocks(&mnt) > n {
                            failover_ms.store(killed.elapsed().as_millis() as u64, Ordering::Relaxed);
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let console = boot_from_mount(&m);
    stop.store(true, Ordering::Relaxed);
    killer.join().unwrap();
    assert!(console.contains("CAPSULE-GUEST-VERSION 1"), "{console}");
    let end = fetched_blocks(&m.dir);
    let (node_at, server_at) = (node_killed_at.load(Ordering::Relaxed), server_killed_at.load(Ordering::Relaxed));
    assert!(node_at != u64::MAX && server_at != u64::MAX, "the boot finished before the kills ({node_at}, {server_at} of {end} blocks)");
    assert!(end > server_at, "no block was fetched after server B died ({server_at} before, {end} at the end)");
    assert!(m.stats()["reconnects"].as_u64().unwrap() >= 1, "{}", m.stats());
    // A dead server is noticed by its silence within seconds, not at the 15 s idle timeout.
    let failover = failover_ms.load(Ordering::Relaxed);
    assert!(failover < 10_000, "blocks resumed {failover} ms after server B died (the idle timeout is 15 s)");
    eprintln!("failover: blocks resumed {failover} ms after server B died");
    drop(m);
    drop(a);
}

#[test]
fn racing_pushes_through_two_servers_one_wins_and_the_bucket_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path());
    let (a, b, token) = two_servers(dir.path(), &cluster, "race");
    let cfg = dir.path().join("cfg");
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    import_guest(&one, false);
    import_guest(&two, false);
    import_guest_update(&two);
    // Every block is in the bucket already, so both pushes reach their ref update together.
    ok(client(&two, &cfg).args(["push", "guest-update", &format!("{}/base", a.url), "--token", &token]));

    let barrier = Arc::new(Barrier::new(2));
    let race = |store: &Path, name: &'static str, server: &str| {
        let (store, url, token, cfg, barrier) = (store.to_path_buf(), format!("{server}/race"), token.clone(), cfg.clone(), barrier.clone());
        std::thread::spawn(move || {
            barrier.wait();
            run(client(&store, &cfg).args(["push", name, &url, "--token", &token]))
        })
    };
    let (t1, t2) = (race(&one, "guest", &a.url), race(&two, "guest-update", &b.url));
    let ((out1, text1), (out2, text2)) = (t1.join().unwrap(), t2.join().unwrap());
    assert!(out1.status.success() != out2.status.success(), "exactly one push must win:\nthrough A: {text1}\nthrough B: {text2}");
    let (winner, winner_store, loser_text) = if out1.status.success() { ("guest", &one, text2) } else { ("guest-update", &two, text1) };
    assert!(loser_text.contains("lost a race"), "the losing push must say it lost a race: {loser_text}");

    // Both servers name the winner; what the ref names arrives whole and verifies.
    let want = capsule_id(winner_store, winner);
    for server in [&a, &b] {
        let fresh = dir.path().join(format!("check-{}", server.url.rsplit(':').next().unwrap()));
        ok(client(&fresh, &cfg).args(["pull", &format!("{}/race", server.url)]));
        assert_eq!(capsule_id(&fresh, "race"), want, "{} names another capsule", server.url);
        ok(capsule(&fresh).args(["verify", "race"]));
    }
    // The loser can push again after pulling (the conflict is not permanent).
    let old_ref = if winner == "guest" { "guest-update" } else { "guest" };
    let loser_store = if winner == "guest" { &two } else { &one };
    let again = run(client(loser_store, &cfg).args(["push", old_ref, &format!("{}/race-2", b.url), "--token", &token]));
    assert!(again.0.status.success(), "{}", again.1);

    gc_races_a_push(dir.path(), &cluster, (&a, &b), &token, &one);
}

/// A capsule of `mib` MiB of pseudo-random bytes imported as `name` into `store`.
fn import_random(store: &Path, name: &str, mib: usize, seed: u64) {
    let file = store.with_extension(format!("{name}.raw"));
    std::fs::write(&file, pseudo_random(mib << 20, seed)).unwrap();
    ok(capsule(store).args(["import", name, "--disk"]).arg(format!("root={}", file.display())));
}

/// `capsule gc` directly on the bucket (through node 0, A's) while a push of new blocks goes
/// through B: every ref names a whole capsule afterwards, the orphans went, and the push
/// either won or was told to push again once the gc ended (then does).
fn gc_races_a_push(dir: &Path, cluster: &Cluster, (a, b): (&ServerProcess, &ServerProcess), token: &str, guest_store: &Path) {
    let cfg = dir.join("cfg");
    // Orphans: `junk` is pushed as race-junk, then race-junk moves to the guest.
    let (junk, fresh) = (dir.join("junk"), dir.join("fresh"));
    import_random(&junk, "junk", 6, 11);
    import_random(&fresh, "fresh", 12, 12);
    let junk_blocks = stored_blocks(&junk).len();
    ok(client(&junk, &cfg).args(["push", "junk", &format!("{}/race-junk", a.url), "--token", token]));
    ok(client(guest_store, &cfg).args(["push", "guest", &format!("{}/race-junk", a.url), "--token", token]));

    let gc = || {
        let mut cmd = capsule(&dir.join("gc"));
        cmd.args(["gc", "--json", "--grace", "0", "--settle", "5"]).args(cluster.serve_args(0, "race")).envs(cluster.env());
        cmd
    };
    let barrier = Arc::new(Barrier::new(2));
    let pusher = {
        let (fresh, cfg, url, token, barrier) = (fresh.clone(), cfg.clone(), format!("{}/race-fresh", b.url), token.to_string(), barrier.clone());
        std::thread::spawn(move || {
            barrier.wait();
            run(client(&fresh, &cfg).args(["push", "fresh", &url, "--token", &token]))
        })
    };
    barrier.wait();
    let collected = ok(&mut gc());
    let (pushed, text) = pusher.join().unwrap();
    if !pushed.status.success() {
        assert!(text.contains("a gc of the bucket"), "a push refused during a gc must say why: {text}");
        ok(client(&fresh, &cfg).args(["push", "fresh", &format!("{}/race-fresh", b.url), "--token", token]));
    }
    let report: serde_json::Value = serde_json::from_str(&collected[collected.find('{').unwrap()..]).unwrap();
    // A second gc with nothing racing: the orphans are gone by now, whatever the first left.
    let second: serde_json::Value = {
        let t = ok(&mut gc());
        serde_json::from_str(&t[t.find('{').unwrap()..]).unwrap()
    };
    let removed = report["blocks_removed"].as_u64().unwrap() + second["blocks_removed"].as_u64().unwrap();
    assert!(removed >= junk_blocks as u64, "junk's {junk_blocks} blocks must go: {report} then {second}");

    // Every ref arrives whole through either server and verifies; the pushed one is `fresh`.
    let check = dir.join("after-gc");
    for (server, name) in [(a, "race"), (b, "base"), (a, "race-2"), (b, "race-junk"), (a, "race-fresh")] {
        ok(client(&check, &cfg).args(["pull", &format!("{}/{name}", server.url)]));
        ok(capsule(&check).args(["verify", name]));
    }
    assert_eq!(capsule_id(&check, "race-fresh"), capsule_id(&fresh, "fresh"));
}
