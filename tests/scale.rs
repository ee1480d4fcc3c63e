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
    let killer = {
        let (cluster, b, stop, node_at, server_at) = (cluster.clone(), b.clone(), stop.clone(), node_killed_at.clone(), server_killed_at.clone());
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
}
