//! End-to-end tests of the QUIC block service: real `capsule serve` processes, real QUIC
//! on loopback, real stores.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::path::Path;

fn json(text: &str) -> serde_json::Value {
    let start = text.find('{').unwrap_or_else(|| panic!("no JSON in {text}"));
    serde_json::Deserializer::from_str(&text[start..]).into_iter().next().unwrap().unwrap()
}

/// The guest and its update in `store`; returns the update's new block contents (hashed
/// here from the two images) and the bytes their files take in `store`.
fn import_both(store: &Path) -> (std::collections::HashSet<String>, u64) {
    import_guest(store, false);
    import_guest_update(store);
    let g = guest_dir();
    let new = new_contents(&g.join("disk.raw"), &g.join("disk-update.raw"), 65536);
    let bytes = new.iter().map(|h| stored_block(store, h).len).sum();
    (new, bytes)
}

#[test]
fn child_push_costs_about_its_changed_blocks_and_pull_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (local, remote, cfg) = (dir.path().join("local"), dir.path().join("remote"), dir.path().join("cfg"));
    let (new_blocks, changed_bytes) = import_both(&local);
    let token = ok(capsule(&remote).args(["token", "create", "--scope", "write"])).trim().to_string();
    let server = ServerProcess::start(&remote, &[]);

    let first = json(&ok(client(&local, &cfg).args(["push", "guest", &server.url, "--json", "--token", &token])));
    assert_eq!(first["blocks_skipped"], 0);
    let before = stored_block_names(&remote);
    let child = json(&ok(client(&local, &cfg).args(["push", "guest-update", &format!("{}/guest-update", server.url), "--json", "--token", &token])));
    let sent = child["wire_sent"].as_u64().unwrap();
    assert!(child["blocks_skipped"].as_u64().unwrap() > 0);
    let arrived: std::collections::HashSet<String> = stored_block_names(&remote).difference(&before).cloned().collect();
    assert_eq!(arrived, new_blocks, "the child push moved other blocks than the update's new contents");
    assert!(sent as f64 <= changed_bytes as f64 * 1.10, "child push sent {sent} bytes on the wire for {changed_bytes} bytes of changed blocks");

    // Pull into an empty store: everything arrives and verifies.
    let fresh = dir.path().join("fresh");
    let pulled = ok(client(&fresh, &cfg).args(["pull", &format!("{}/guest-update", server.url), "--token", &token]));
    assert!(pulled.contains("pulled guest-update"), "{pulled}");
    ok(capsule(&fresh).args(["verify", "guest-update"]));
    // Pulled and pushed blocks end in packs, on both sides.
    for store in [&fresh, &remote] {
        let loose: Vec<_> = stored_blocks(store).into_iter().filter(|b| !b.file.starts_with(store.join("packed"))).collect();
        assert!(loose.is_empty(), "block files left in {}: {loose:?}", store.display());
    }
    let out = dir.path().join("out");
    ok(capsule(&fresh).args(["export", "guest-update", "--out"]).arg(&out));
    assert!(std::fs::read(out.join("root.raw")).unwrap() == std::fs::read(guest_dir().join("disk-update.raw")).unwrap());

    // A second pull of the parent into the same store moves no blocks.
    let again = json(&ok(client(&fresh, &cfg).args(["pull", &format!("{}/guest", server.url), "--json", "--token", &token])));
    assert_eq!(again["blocks_transferred"], 0, "{again}");
}

#[test]
fn a_block_altered_on_the_server_is_rejected_by_name_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (remote, cfg) = (dir.path().join("remote"), dir.path().join("cfg"));
    import_both(&remote);
    let server = ServerProcess::start(&remote, &["--public-read"]);
    let blocks = stored_blocks(&remote);
    let victim = &blocks[blocks.len() / 3];
    let hash = victim.hash.clone();
    victim.flip(victim.len as usize - 1, 0x01);

    let fresh = dir.path().join("fresh");
    let text = fails(client(&fresh, &cfg).args(["pull", &format!("{}/guest-update", server.url)]));
    assert!(text.contains(&hash), "error names the corrupt block: {text}");
    assert!(!stored_block_names(&fresh).contains(&hash), "the corrupt block was stored");
    assert!(!ok(capsule(&fresh).arg("ls")).contains("guest-update"), "no ref for an incomplete pull");
    ok(capsule(&fresh).arg("verify"));
}

#[test]
fn verify_repair_sets_a_damaged_block_aside_and_the_next_pull_heals_it() {
    let dir = tempfile::tempdir().unwrap();
    let (remote, mirror, cfg) = (dir.path().join("remote"), dir.path().join("mirror"), dir.path().join("cfg"));
    import_guest(&remote, false);
    let server = ServerProcess::start(&remote, &["--public-read"]);
    let url = format!("{}/guest", server.url);
    ok(client(&mirror, &cfg).args(["pull", &url]));
    let blocks = stored_blocks(&mirror);
    let victim = &blocks[blocks.len() / 2];
    victim.flip(victim.len as usize - 1, 0x01);

    // Without --repair a later pull takes the damaged copy for the block: nothing travels.
    let again = json(&ok(client(&mirror, &cfg).args(["pull", &url, "--json"])));
    assert_eq!(again["blocks_transferred"], 0, "{again}");
    assert!(fails_with(capsule(&mirror).arg("verify"), 3).contains(&victim.hash));

    let repaired = fails_with(capsule(&mirror).args(["verify", "--repair"]), 3);
    assert!(repaired.contains("1 damaged copies moved") && repaired.contains("1 blocks are missing now"), "{repaired}");
    assert!(repaired.lines().any(|l| l.trim() == victim.hash), "the missing block is named: {repaired}");
    let healed = json(&ok(client(&mirror, &cfg).args(["pull", &url, "--json"])));
    assert_eq!(healed["blocks_transferred"], 1, "{healed}");
    ok(capsule(&mirror).arg("verify"));
    let aside: Vec<_> = std::fs::read_dir(mirror.join("damaged")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(aside.len() == 1 && aside[0].starts_with(&victim.hash), "{aside:?}");
}

#[test]
fn tokens_scopes_prefixes_and_fingerprints_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let (local, remote, cfg) = (dir.path().join("local"), dir.path().join("remote"), dir.path().join("cfg"));
    let src = dir.path().join("d.raw");
    std::fs::write(&src, pseudo_random(1 << 20, 4)).unwrap();
    ok(capsule(&local).args(["import", "app", "--disk"]).arg(&src));
    let write_team = ok(capsule(&remote).args(["token", "create", "--scope", "write", "--prefix", "team/"])).trim().to_string();
    let read_team = ok(capsule(&remote).args(["token", "create", "--scope", "read", "--prefix", "team/"])).trim().to_string();
    let server = ServerProcess::start(&remote, &[]);
    let to = |name: &str| format!("{}/{name}", server.url);

    ok(client(&local, &cfg).args(["push", "app", &to("team/app"), "--token", &write_team]));
    let fresh = dir.path().join("fresh");
    ok(client(&fresh, &cfg).args(["pull", &to("team/app"), "--token", &read_team]));

    let denied = |args: Vec<String>| {
        let store = if args[0] == "push" { &local } else { &fresh };
        let text = fails(client(store, &cfg).args(&args));
        assert!(text.contains("access denied"), "{args:?}: {text}");
        text
    };
    denied(vec!["pull".into(), to("team/app")]);
    denied(vec!["pull".into(), to("team/app"), "--token".into(), "capsule_not_a_real_token".into()]);
    denied(vec!["push".into(), "app".into(), to("team/other"), "--token".into(), read_team.clone()]);
    denied(vec!["push".into(), "app".into(), to("elsewhere/app"), "--token".into(), write_team.clone()]);
    // Outside the prefix, an existing and a missing name look the same.
    let a = denied(vec!["pull".into(), to("elsewhere/app"), "--token".into(), read_team.clone()]);
    let b = denied(vec!["pull".into(), to("elsewhere/nothing"), "--token".into(), read_team.clone()]);
    assert_eq!(a.replace("elsewhere/app", "X"), b.replace("elsewhere/nothing", "X"));

    // The first connection recorded the server; a wrong pinned fingerprint is refused.
    let known = std::fs::read_to_string(cfg.join("known_servers")).unwrap();
    assert!(known.contains(&server.fingerprint), "{known}");
    let wrong = "00".repeat(32);
    let text = fails(client(&fresh, &cfg).args(["pull", &to("team/app"), "--as", "x", "--token", &read_team, "--server-fingerprint", &wrong]));
    assert!(text.contains(&wrong) && text.contains(&server.fingerprint), "names both fingerprints: {text}");
    // A server with a new certificate at a known address is refused too.
    drop(server);
    std::fs::remove_dir_all(remote.join("server")).unwrap();
    let text = {
        let s2 = ServerProcess::start(&remote, &["--public-read"]);
        let other_cfg = dir.path().join("cfg2");
        std::fs::create_dir_all(&other_cfg).unwrap();
        let port = s2.url.rsplit(':').next().unwrap().to_string();
        std::fs::write(other_cfg.join("known_servers"), format!("127.0.0.1:{port} {}\n", "ab".repeat(32))).unwrap();
        fails(client(&fresh, &other_cfg).args(["pull", &format!("{}/team/app", s2.url), "--as", "y"]))
    };
    assert!(text.contains("refusing to connect"), "{text}");
}
