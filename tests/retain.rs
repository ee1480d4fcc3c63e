//! Retention of a daily chain (issue 14): `capsule rm` of the oldest days and `capsule gc`
//! free the blocks no remaining day reads once the oldest remaining day is flattened
//! (`capsule flatten`, `rm --flatten`); every remaining day still verifies, exports,
//! mounts (from the store and over QUIC, where a client's cache still serves it) and pulls
//! byte for byte as it was.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use common::*;

const BS: usize = 4096;
const DAYS: usize = 8;

/// Day 0 is 4 MiB of data; each later day overwrites a region (moving through the disk),
/// zeroes a few blocks and writes some new ones past what was used: a small daily chain whose
/// later days shadow much of the earlier ones.
fn days(dir: &Path) -> Vec<PathBuf> {
    let mut bytes = pseudo_random(4 << 20, 1);
    bytes.resize(6 << 20, 0);
    let mut out = Vec::new();
    for day in 0..DAYS {
        if day > 0 {
            let at = (day * 97 * BS) % (4 << 20);
            bytes[at..at + 96 * BS].copy_from_slice(&pseudo_random(96 * BS, 100 + day as u64));
            bytes[(4 << 20) + day * 8 * BS..][..8 * BS].copy_from_slice(&pseudo_random(8 * BS, 200 + day as u64));
            let z = (day * 131 * BS) % (4 << 20);
            bytes[z..z + 4 * BS].fill(0);
        }
        let p = dir.join(format!("day{day}.raw"));
        std::fs::write(&p, &bytes).unwrap();
        out.push(p);
    }
    out
}

/// The chain day0 <- day1 <- ... in `store` (imports with --parent, as a daily commit makes).
fn import_days(store: &Path, images: &[PathBuf], extra: &[&str]) {
    for (day, image) in images.iter().enumerate() {
        let mut c = capsule(store);
        c.args(["import", &format!("day{day}"), "--block-size", "4K"]).args(extra).arg("--disk").arg(format!("root={}", image.display()));
        if day > 0 {
            c.args(["--parent", &format!("day{}", day - 1)]);
        }
        ok(&mut c);
    }
}

/// `capsule verify` and `capsule export` of each day in `range` give its image, byte for byte.
fn remaining_days_are_intact(store: &Path, images: &[PathBuf], range: std::ops::Range<usize>, out: &Path) {
    for day in range {
        ok(capsule(store).args(["verify", &format!("day{day}")]));
        let dir = out.join(format!("day{day}"));
        let _ = std::fs::remove_dir_all(&dir);
        ok(capsule(store).args(["export", &format!("day{day}"), "--out"]).arg(&dir));
        assert!(std::fs::read(dir.join("root.raw")).unwrap() == std::fs::read(&images[day]).unwrap(), "day{day} no longer exports to its image");
    }
}

fn gc_json(store: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(capsule(store).args(["gc", "--json"]))).unwrap()
}

#[test]
fn rm_of_old_days_then_flatten_and_gc_frees_what_only_they_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = days(d);
    let store = d.join("store");
    import_days(&store, &images, &[]);
    let all = distinct_blocks(&images.iter().map(PathBuf::as_path).collect::<Vec<_>>(), BS);
    assert_eq!(stored_block_names(&store), all);

    // rm alone: the kept days read through the removed ones, so nothing is freed, and rm says so.
    let names: Vec<String> = (0..4).map(|day| format!("day{day}")).collect();
    let rm: serde_json::Value = serde_json::from_str(&ok(capsule(&store).arg("rm").args(&names).arg("--json"))).unwrap();
    assert_eq!(rm["removed"], serde_json::json!(names));
    assert_eq!(rm["still_reaching_removed"], serde_json::json!(["day4"]), "{rm}");
    assert_eq!(gc_json(&store)["blocks_removed"], 0, "gc freed blocks the kept days read through");
    // A missing name fails the whole rm, naming it; nothing is removed.
    let text = fails(capsule(&store).args(["rm", "day5", "nosuch"]));
    assert!(text.contains("no capsule named \"nosuch\""), "{text}");
    ok(capsule(&store).args(["verify", "day5"]));
    let text = fails(capsule(&store).args(["flatten", "day0"]));
    assert!(text.contains("no capsule named \"day0\""), "{text}");

    // A client reads day7 over QUIC before the flatten; its cache serves the flattened day7
    // afterwards (new id, same blocks): nothing travels again.
    let day7 = std::fs::read(&images[7]).unwrap();
    let remote_day7 = |url: &str| {
        Mounted::started_by(
            client(&d.join("client"), &d.join("cfg"))
                .args(["mount", &format!("{url}/day7")])
                .arg(d.join("rmnt"))
                .args(["--read-only", "--cache"])
                .arg(d.join("client-cache")),
            &d.join("client"),
            &d.join("rmnt"),
            &d.join("client-cache"),
        )
    };
    {
        let server = ServerProcess::start(&store, &["--public-read"]);
        let m = remote_day7(&server.url);
        assert!(std::fs::read(m.dir.join("root.raw")).unwrap() == day7, "day7 over QUIC reads wrong");
        assert!(m.stats()["blocks_fetched"].as_u64().unwrap() > 0);
    }

    let f: serde_json::Value = serde_json::from_str(&ok(capsule(&store).args(["flatten", "day4", "--json"]))).unwrap();
    let moved: Vec<&str> = f["rebased"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(moved, ["day5", "day6", "day7"], "{f}");
    assert_ne!(f["old_id"], f["new_id"]);
    assert_eq!(inspect(&store, "day4")["parent"], serde_json::Value::Null, "a flattened capsule has no parent");
    let gc = gc_json(&store);
    let kept = distinct_blocks(&images[4..].iter().map(PathBuf::as_path).collect::<Vec<_>>(), BS);
    assert_eq!(stored_block_names(&store), kept, "gc must leave exactly the blocks days 4-7 read");
    assert_eq!(gc["blocks_removed"].as_u64().unwrap() as usize, all.len() - kept.len(), "{gc}");
    assert!(gc["bytes_freed"].as_u64().unwrap() > (all.len() - kept.len()) as u64 * BS as u64 / 2, "{gc}");
    remaining_days_are_intact(&store, &images, 4..DAYS, &d.join("out"));
    ok(capsule(&store).arg("verify"));
    let again = ok(capsule(&store).args(["flatten", "day4"]));
    assert!(again.contains("already stands alone"), "{again}");

    // A remaining day mounted from the store, and pulled from its server into another store.
    let day6 = std::fs::read(&images[6]).unwrap();
    {
        let m = Mounted::new(&store, &d.join("cfg"), "day6", &d.join("mnt"), &d.join("cache"), &["--read-only"]);
        assert!(std::fs::read(m.dir.join("root.raw")).unwrap() == day6, "mounted day6 reads wrong");
    }
    let server = ServerProcess::start(&store, &["--public-read"]);
    {
        let m = remote_day7(&server.url);
        assert!(std::fs::read(m.dir.join("root.raw")).unwrap() == day7, "the flattened day7 over QUIC reads wrong");
        assert_eq!(m.stats()["blocks_fetched"], 0, "the client's cache no longer served day7's blocks: {}", m.stats());
    }
    let local = d.join("local");
    ok(client(&local, &d.join("cfg")).args(["pull", &format!("{}/day7", server.url)]));
    drop(server);
    remaining_days_are_intact(&local, &images, 7..8, &d.join("out-pulled"));

    // rm --flatten does it in one step, and a new day can still be committed on the chain.
    let store2 = d.join("store2");
    import_days(&store2, &images[..6], &[]);
    let client_store = d.join("client-store");
    assert!(std::process::Command::new("cp").arg("-a").arg(&store2).arg(&client_store).status().unwrap().success());
    let rm: serde_json::Value = serde_json::from_str(&ok(capsule(&store2).args(["rm", "day0", "day1", "day2", "--flatten", "--json"]))).unwrap();
    // The same rm on another store holding the chain (the client that commits the next day)
    // gives the same ids.
    ok(capsule(&client_store).args(["rm", "day0", "day1", "day2", "--flatten"]));
    let ids = |s: &Path| ok(capsule(s).args(["ls", "--json"]));
    assert_eq!(ids(&client_store), ids(&store2), "one flatten on two stores gave different ids");
    assert_eq!(rm["flattened"][0]["name"], "day3", "{rm}");
    assert_eq!(rm["flattened"].as_array().unwrap().len(), 1, "{rm}");
    gc_json(&store2);
    let kept = distinct_blocks(&images[3..6].iter().map(PathBuf::as_path).collect::<Vec<_>>(), BS);
    assert_eq!(stored_block_names(&store2), kept);
    ok(capsule(&store2).args(["import", "day6", "--block-size", "4K", "--parent", "day5", "--disk"]).arg(format!("root={}", images[6].display())));
    remaining_days_are_intact(&store2, &images, 3..7, &d.join("out2"));

    // A damaged ref elsewhere does not fail a plain rm (only its note); rm --flatten, which
    // must know the chains, says what it could not read and that the refs are gone.
    std::fs::write(store2.join("refs/broken"), format!("{}\n", "ab".repeat(32))).unwrap();
    ok(capsule(&store2).args(["rm", "day3"]));
    let text = fails(capsule(&store2).args(["rm", "day4", "--flatten"]));
    assert!(text.contains("removed day4") && text.contains("broken"), "{text}");
}

#[test]
fn an_encrypted_chain_flattens_without_its_key_and_still_opens_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys = d.join("keys");
    let images = days(d);
    let store = d.join("store");
    let with_keys = |store: &Path| {
        let mut c = capsule(store);
        c.env("CAPSULE_KEY_DIR", &keys);
        c
    };
    ok(with_keys(&store).args(["key", "create", "owner"]));
    for (day, image) in images[..4].iter().enumerate() {
        let mut c = with_keys(&store);
        c.args(["import", &format!("day{day}"), "--block-size", "4K", "--key", "owner", "--disk"]).arg(format!("root={}", image.display()));
        if day > 0 {
            c.args(["--parent", &format!("day{}", day - 1)]);
        }
        ok(&mut c);
    }
    let before: HashSet<String> = stored_block_names(&store);
    // Flatten and gc need no key: they move names, never plaintext.
    ok(capsule(&store).args(["rm", "day0", "day1", "--flatten"]).env("CAPSULE_KEY_DIR", d.join("no-keys")));
    let gc = gc_json(&store);
    // Convergent under one key: one stored block per distinct plaintext block days 2-3 read.
    let kept = distinct_blocks(&images[2..4].iter().map(PathBuf::as_path).collect::<Vec<_>>(), BS).len();
    assert_eq!(stored_block_names(&store).len(), kept, "gc must leave exactly the blocks days 2-3 read");
    assert_eq!(gc["blocks_removed"].as_u64().unwrap() as usize, before.len() - kept, "{gc}");
    for (day, image) in images.iter().enumerate().take(4).skip(2) {
        ok(capsule(&store).args(["verify", &format!("day{day}")]));
        let out = d.join(format!("out{day}"));
        ok(with_keys(&store).args(["export", &format!("day{day}"), "--out"]).arg(&out));
        assert!(std::fs::read(out.join("root.raw")).unwrap() == std::fs::read(image).unwrap(), "day{day} opens wrong");
    }
}
