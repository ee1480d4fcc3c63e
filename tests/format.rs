//! End-to-end tests of the capsule format, store, importers and exporters through the
//! real `capsule` binary, real files, and real qemu-img.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

/// An image with random data, zero runs, repeated blocks and a partial last block.
fn sample_image(path: &Path, seed: u64) -> Vec<u8> {
    let mut data = pseudo_random(3 * 1024 * 1024 + 12345, seed);
    data[100_000..1_200_000].fill(0);
    let copy = data[0..65536].to_vec();
    data[2 * 1024 * 1024..2 * 1024 * 1024 + 65536].copy_from_slice(&copy);
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn raw_import_export_round_trip_is_byte_identical_at_every_block_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let src = dir.path().join("disk.raw");
    let data = sample_image(&src, 7);
    for bs in ["4K", "16K", "64K", "256K", "1M"] {
        let name = format!("img-{bs}");
        ok(capsule(&store).args(["import", &name, "--block-size", bs, "--disk"]).arg(format!("root={}", src.display())));
        let out = dir.path().join(format!("out-{bs}"));
        ok(capsule(&store).args(["export", &name, "--out"]).arg(&out));
        let back = std::fs::read(out.join("root.raw")).unwrap();
        assert_eq!(back.len(), data.len(), "size at {bs}");
        assert!(back == data, "content differs at block size {bs}");
        let v = inspect(&store, &name);
        assert_eq!(v["disks"][0]["image"]["size"], data.len() as u64);
    }
    ok(capsule(&store).arg("verify"));
}

#[test]
fn qcow2_chain_imports_one_layer_per_file_and_exports_identically() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = d.join("store");
    let raw = d.join("base.raw");
    sample_image(&raw, 11);
    tool(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(d.join("base.qcow2")));
    tool(Command::new("qemu-img").current_dir(d).args(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"]));
    // Data over data, and explicit zeros over data.
    tool(Command::new("qemu-io").current_dir(d).args(["-f", "qcow2", "-c", "write -q -P 0x5a 65536 131072", "-c", "write -q -z 0 65536", "mid.qcow2"]));
    tool(Command::new("qemu-img").current_dir(d).args(["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"]));
    tool(Command::new("qemu-io").current_dir(d).args(["-f", "qcow2", "-c", "write -q -P 0xa5 3145728 4096", "top.qcow2"]));
    tool(Command::new("qemu-img").current_dir(d).args(["convert", "-q", "-O", "raw", "top.qcow2", "expected.raw"]));
    let expected = std::fs::read(d.join("expected.raw")).unwrap();

    // The base alone first: the chain import must then share its layer.
    ok(capsule(&store).args(["import", "base", "--disk-format", "qcow2", "--disk"]).arg(format!("root={}", d.join("base.qcow2").display())));
    let text = ok(capsule(&store)
        .args(["import", "chain", "--disk-format", "qcow2", "--backing-file"])
        .arg(d.join("mid.qcow2"))
        .arg("--backing-file")
        .arg(d.join("base.qcow2"))
        .arg("--disk")
        .arg(format!("root={}", d.join("top.qcow2").display())));
    assert!(text.contains("1 layer(s) were already in the store and are shared"), "{text}");
    let v = inspect(&store, "chain");
    let layers = v["disks"][0]["image"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "one layer per qcow2 file: {v}");
    assert_eq!(layers[0]["mapped_blocks"], 1, "top wrote one 4 KiB range inside one 64 KiB block");
    assert_eq!(layers[1]["mapped_blocks"], 3, "mid wrote blocks 0 (zeros), 1 and 2");
    assert_eq!(layers[2]["id"], inspect(&store, "base")["disks"][0]["image"]["layers"][0]["id"]);

    ok(capsule(&store).args(["export", "chain", "--out"]).arg(d.join("raw-out")));
    assert!(std::fs::read(d.join("raw-out/root.raw")).unwrap() == expected, "raw export differs from the qcow2 chain");

    let out = d.join("qcow2-out");
    ok(capsule(&store).args(["export", "chain", "--format", "qcow2", "--out"]).arg(&out));
    for f in ["root.0.qcow2", "root.1.qcow2", "root.qcow2"] {
        tool(Command::new("qemu-img").args(["check", "-q"]).arg(out.join(f)));
    }
    let info = tool(Command::new("qemu-img").args(["info", "--backing-chain", "--output=json"]).arg(out.join("root.qcow2")));
    let chain: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(chain.as_array().unwrap().len(), 3, "exported chain mirrors the layers: {info}");
    tool(Command::new("qemu-img").current_dir(&out).args(["convert", "-q", "-O", "raw", "root.qcow2", "flat.raw"]));
    assert!(std::fs::read(out.join("flat.raw")).unwrap() == expected, "qcow2 export differs");
}

#[test]
fn updated_guest_disk_with_parent_stores_exactly_the_changed_blocks() {
    let guest = guest_dir();
    let base = std::fs::read(guest.join("disk.raw")).unwrap();
    let update = std::fs::read(guest.join("disk-update.raw")).unwrap();
    for bs in [4096usize, 65536] {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let bs_arg = format!("{}K", bs / 1024);
        ok(capsule(&store).args(["import", "guest", "--block-size", &bs_arg, "--disk"]).arg(format!("root={}", guest.join("disk.raw").display())));
        let before: HashSet<_> = stored_blocks(&store).into_iter().map(|b| b.hash).collect();
        ok(capsule(&store).args(["import", "guest-update", "--parent", "guest", "--disk"]).arg(format!("root={}", guest.join("disk-update.raw").display())));
        let after: HashSet<_> = stored_blocks(&store).into_iter().map(|b| b.hash).collect();

        // Count, independently, the blocks that differ and the distinct new non-zero contents.
        let mut changed = 0u64;
        let mut base_contents = HashSet::new();
        for chunk in base.chunks(bs) {
            base_contents.insert(blake3::hash(chunk));
        }
        let mut new_contents = HashSet::new();
        for (a, b) in base.chunks(bs).zip(update.chunks(bs)) {
            if a != b {
                changed += 1;
                if b.iter().any(|&x| x != 0) && !base_contents.contains(&blake3::hash(b)) {
                    new_contents.insert(blake3::hash(b));
                }
            }
        }
        assert!(changed > 0, "the update must change something");
        let v = inspect(&store, "guest-update");
        let layers = v["disks"][0]["image"]["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0]["mapped_blocks"].as_u64().unwrap(), changed, "child layer maps exactly the changed blocks at {bs}");
        assert_eq!(after.difference(&before).count(), new_contents.len(), "child stores exactly the new block contents at {bs}");
        ok(capsule(&store).args(["verify", "guest-update"]));
        let out = dir.path().join("out");
        ok(capsule(&store).args(["export", "guest-update", "--out"]).arg(&out));
        assert!(std::fs::read(out.join("root.raw")).unwrap() == update, "child exports to the updated disk");
    }
}

#[test]
fn corrupt_block_fails_verify_naming_capsule_block_and_hash() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let src = dir.path().join("disk.raw");
    sample_image(&src, 3);
    ok(capsule(&store).args(["import", "victim", "--disk"]).arg(&src));
    ok(capsule(&store).args(["verify", "victim"]));
    let blocks = stored_blocks(&store);
    let target = &blocks[blocks.len() / 2];
    let hash = target.hash.clone();
    target.flip(target.len as usize / 2, 0x40);

    // A damaged capsule has an exit code of its own (3), apart from Capsule failing (1).
    let text = fails_with(capsule(&store).args(["verify", "victim"]), 3);
    assert!(text.contains("capsule victim"), "names the capsule: {text}");
    assert!(text.contains(&hash), "names the hash: {text}");
    assert!(text.contains("disk disk: block "), "names the image and block index: {text}");
    // Export refuses rather than writing wrong bytes.
    let text = fails(capsule(&store).args(["export", "victim", "--out"]).arg(dir.path().join("out")));
    assert!(text.contains(&hash), "{text}");
}

#[test]
fn truncated_or_garbage_manifest_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let src = dir.path().join("disk.raw");
    sample_image(&src, 5);
    let text = ok(capsule(&store).args(["import", "m", "--disk"]).arg(&src));
    let id = text.lines().last().unwrap().split_whitespace().nth(3).unwrap().to_string();
    let manifest = store.join("objects").join(&id[..2]).join(&id);
    let original = std::fs::read(&manifest).unwrap();
    for damaged in [original[..original.len() / 2].to_vec(), b"garbage, not a manifest at all".to_vec(), vec![]] {
        std::fs::write(&manifest, &damaged).unwrap();
        // The store names an object by its hash, so any damage shows as other content.
        let expected = format!("manifest {id}: content hashes to {}", blake3::hash(&damaged).to_hex());
        for args in [vec!["inspect", "m"], vec!["verify", "m"], vec!["export", "m", "--out", "/nonexistent-capsule-out"]] {
            let text = fails_with(capsule(&store).args(&args), if args[0] == "verify" { 3 } else { 1 });
            assert!(text.contains(&expected), "{args:?} should say {expected:?}: {text}");
        }
    }
}

#[test]
fn kill_9_during_import_leaves_a_verifying_store_and_no_partial_capsule() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let small = dir.path().join("small.raw");
    sample_image(&small, 1);
    ok(capsule(&store).args(["import", "survivor", "--disk"]).arg(&small));
    let big = dir.path().join("big.raw");
    std::fs::write(&big, pseudo_random(256 << 20, 99)).unwrap();

    let mut child = capsule(&store).args(["import", "doomed", "--block-size", "4K", "--disk"]).arg(&big).spawn().unwrap();
    let start = std::time::Instant::now();
    let baseline = stored_blocks(&store).len();
    // Kill once the import is visibly writing blocks.
    while stored_blocks(&store).len() < baseline + 200 && start.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "import must still have been running when killed");

    let list = ok(capsule(&store).arg("ls"));
    assert!(!list.contains("doomed"), "{list}");
    assert!(list.contains("survivor"), "{list}");
    let text = ok(capsule(&store).arg("verify"));
    assert!(text.contains("store") && text.contains("ok"), "{text}");
    // Orphans go at gc, and the survivor is intact.
    let gc = ok(capsule(&store).arg("gc"));
    assert!(!gc.contains("removed 0 blocks"), "orphan blocks of the killed import are collected: {gc}");
    ok(capsule(&store).args(["verify", "survivor"]));
}

#[test]
fn capsule_parts_round_trip_and_children_inherit_boot_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = d.join("store");
    let disk = d.join("root.raw");
    sample_image(&disk, 21);
    let mem = d.join("mem.raw");
    let mut m = vec![0u8; 8 << 20];
    m[1 << 20..3 << 20].copy_from_slice(&pseudo_random(2 << 20, 8));
    std::fs::write(&mem, &m).unwrap();
    let dev = d.join("dev.bin");
    std::fs::write(&dev, pseudo_random(366_601, 9)).unwrap();
    let kernel = d.join("vmlinuz");
    std::fs::write(&kernel, pseudo_random(100_000, 10)).unwrap();
    ok(capsule(&store)
        .args(["import", "vm", "--cmdline", "console=ttyS0", "--cpus", "2", "--disk"])
        .arg(&disk)
        .arg("--memory")
        .arg(&mem)
        .arg("--devstate")
        .arg(&dev)
        .arg("--kernel")
        .arg(&kernel));
    // A suspended session over it: memory changed in one block only.
    m[5 << 20] = 1;
    std::fs::write(&mem, &m).unwrap();
    let text = ok(capsule(&store).args(["import", "vm-session", "--parent", "vm", "--disk"]).arg(&disk).arg("--memory").arg(&mem));
    assert!(text.contains("memory: 8.0 MiB in 128 blocks: 95 zero, 127 unchanged from parent, 1 mapped"), "{text}");
    let out = d.join("out");
    ok(capsule(&store).args(["export", "vm-session", "--out"]).arg(&out));
    assert!(std::fs::read(out.join("memory.raw")).unwrap() == m);
    assert!(std::fs::read(out.join("vmlinuz")).unwrap() == std::fs::read(&kernel).unwrap(), "kernel inherited from parent");
    assert!(std::fs::read(out.join("root.raw")).unwrap() == std::fs::read(&disk).unwrap());
    let desc: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("capsule.json")).unwrap()).unwrap();
    assert_eq!(desc["cpus"], 2);
    assert_eq!(desc["cmdline"], "console=ttyS0");
    assert_eq!(desc["memory_mib"], 8);
    assert!(!out.join("devstate.bin").exists(), "device state belongs to one session and is not inherited");
}

#[test]
fn bad_arguments_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let src = dir.path().join("d.raw");
    sample_image(&src, 2);
    let text = fails(capsule(&store).args(["import", "x", "--disk"]).arg(dir.path().join("missing.raw")));
    assert!(text.contains("missing.raw"), "{text}");
    let text = fails(capsule(&store).args(["import", "../evil", "--disk"]).arg(&src));
    assert!(text.contains("invalid capsule name"), "{text}");
    let text = fails(capsule(&store).args(["inspect", "nothing-here"]));
    assert!(text.contains("no capsule named \"nothing-here\""), "{text}");
    ok(capsule(&store).args(["import", "p", "--block-size", "4K", "--disk"]).arg(&src));
    let text = fails(capsule(&store).args(["import", "c", "--parent", "p", "--block-size", "64K", "--disk"]).arg(&src));
    assert!(text.contains("block size"), "{text}");
    // A value the parser refuses: a usage error (exit code 2, clap's), never a panic.
    let (out, text) = run(capsule(&store).args(["import", "y", "--block-size", "3K", "--disk"]).arg(&src));
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(!text.contains("panicked") && text.contains("block size 3K must be a power of two from 4K to 1M"), "{text}");
}

/// An image of `blocks` 64 KiB blocks: random ones, with `zero` of them left zero.
fn blocks_image(path: &Path, blocks: usize, seed: u64, zero: &[usize]) -> Vec<u8> {
    let mut data = pseudo_random(blocks * 65536, seed);
    for &b in zero {
        data[b * 65536..(b + 1) * 65536].fill(0);
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// Three capsules in `store`: `parent`, `child` over it (some blocks changed, one zeroed,
/// one a copy of another parent block), and `other` sharing half of the parent's blocks.
/// Returns the distinct non-zero block contents of each image, hashed here.
fn family(dir: &Path, store: &Path) -> [HashSet<String>; 3] {
    let (p, c, o) = (dir.join("parent.raw"), dir.join("child.raw"), dir.join("other.raw"));
    let parent = blocks_image(&p, 48, 1, &[5, 6]);
    let mut child = parent.clone();
    child[10 * 65536..14 * 65536].copy_from_slice(&pseudo_random(4 * 65536, 2));
    child[20 * 65536..21 * 65536].fill(0);
    child.copy_within(30 * 65536..31 * 65536, 31 * 65536);
    std::fs::write(&c, &child).unwrap();
    let mut other = blocks_image(&o, 48, 3, &[]);
    other[..24 * 65536].copy_from_slice(&parent[..24 * 65536]);
    std::fs::write(&o, &other).unwrap();
    let disk = |f: &Path| format!("disk={}", f.display());
    ok(capsule(store).args(["import", "parent", "--disk", &disk(&p)]));
    let text = ok(capsule(store).args(["import", "child", "--parent", "parent", "--disk", &disk(&c)]));
    assert!(text.contains("unchanged from parent"), "{text}");
    ok(capsule(store).args(["import", "other", "--disk", &disk(&o)]));
    [distinct_blocks(&[&p], 65536), distinct_blocks(&[&c], 65536), distinct_blocks(&[&o], 65536)]
}

fn union(sets: &[&HashSet<String>]) -> HashSet<String> {
    sets.iter().flat_map(|s| s.iter().cloned()).collect()
}

/// `capsule gc`: "removed N blocks" and the store's block files afterwards.
fn gc(store: &Path) -> (u64, HashSet<String>) {
    let text = ok(capsule(store).arg("gc"));
    let n = text.split("removed ").nth(1).and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{text}"));
    (n, stored_block_names(store))
}

fn exports_as(store: &Path, name: &str, image: &Path, out: &Path) {
    ok(capsule(store).args(["verify", name]));
    ok(capsule(store).args(["export", name, "--out"]).arg(out));
    assert!(std::fs::read(out.join("disk.raw")).unwrap() == std::fs::read(image).unwrap(), "{name} no longer exports to its image");
}

#[test]
fn rm_then_gc_removes_exactly_the_blocks_no_capsule_reaches() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Parent removed first: the child still reaches every parent block through its chain.
    let store = d.join("a");
    let [p, c, o] = family(d, &store);
    let all = union(&[&p, &c, &o]);
    assert_eq!(stored_block_names(&store), all, "the store holds exactly the distinct non-zero blocks");
    assert_eq!(gc(&store), (0, all.clone()), "gc with every capsule live removed something");
    let text = ok(capsule(&store).args(["rm", "parent"]));
    assert!(text.contains("removed ref parent"), "{text}");
    let list = ok(capsule(&store).arg("ls"));
    assert!(!list.lines().any(|l| l.starts_with("parent")), "{list}");
    let text = fails(capsule(&store).args(["inspect", "parent"]));
    assert!(text.contains("no capsule named \"parent\""), "{text}");
    let text = fails(capsule(&store).args(["rm", "parent"]));
    assert!(text.contains("no capsule named \"parent\""), "{text}");
    assert_eq!(gc(&store), (0, all.clone()), "gc removed blocks the child reaches through its removed parent");
    exports_as(&store, "child", &d.join("child.raw"), &d.join("out-a1"));
    ok(capsule(&store).args(["rm", "child"]));
    let expected = o.clone();
    let (n, left) = gc(&store);
    assert_eq!(left, expected, "after removing parent and child only other's blocks stay");
    assert_eq!(n as usize, all.len() - expected.len());
    exports_as(&store, "other", &d.join("other.raw"), &d.join("out-a2"));
    ok(capsule(&store).arg("verify"));
    ok(capsule(&store).args(["rm", "other"]));
    assert_eq!(gc(&store), (o.len() as u64, HashSet::new()));

    // Child removed first: its own blocks go, the parent's (shared ones included) stay.
    let store = d.join("b");
    family(d, &store);
    ok(capsule(&store).args(["rm", "child"]));
    let expected = union(&[&p, &o]);
    let (n, left) = gc(&store);
    assert_eq!(left, expected, "after removing the child");
    assert_eq!(n as usize, all.len() - expected.len(), "the child's own blocks");
    exports_as(&store, "parent", &d.join("parent.raw"), &d.join("out-b"));
    ok(capsule(&store).arg("verify"));
}

#[test]
fn gc_keeps_a_profile_and_its_blocks_while_its_capsule_lives() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = d.join("store");
    let [p, c, o] = family(d, &store);
    // A working set recorded on the child: some parent blocks, some of its own.
    let child = std::fs::read(d.join("child.raw")).unwrap();
    let touched = [1usize, 11, 12, 40];
    {
        let m = Mounted::new(&store, &d.join("cfg"), "child", &d.join("mnt"), &d.join("cache"), &["--read-only", "--record-profile", "boot"]);
        for &b in &touched {
            assert!(pread(&m.dir.join("disk.raw"), (b * 65536) as u64, 4096).unwrap() == child[b * 65536..b * 65536 + 4096]);
        }
    }
    let recorded = inspect(&store, "child")["profiles"][0]["blocks"].as_u64().unwrap();
    assert!(recorded >= touched.len() as u64, "{}", inspect(&store, "child"));
    ok(capsule(&store).args(["rm", "parent"]));
    ok(capsule(&store).args(["rm", "other"]));
    let (_, left) = gc(&store);
    assert_eq!(left, union(&[&c, &p]), "gc kept other blocks than the child's chain");
    assert!(o.iter().any(|h| !left.contains(h)), "other's own blocks should be gone");
    let v = inspect(&store, "child");
    assert_eq!((v["profiles"][0]["name"].as_str(), v["profiles"][0]["blocks"].as_u64()), (Some("boot"), Some(recorded)), "{v}");
    ok(capsule(&store).arg("verify"));
    // The profile still warms another machine: every block it names is still served.
    let server = ServerProcess::start(&store, &["--public-read"]);
    let text = ok(client(&d.join("c"), &d.join("cfg")).args(["warm", &format!("{}/child", server.url), "--profile", "boot", "--cache"]).arg(d.join("wcache")));
    assert!(text.contains(&format!("warm: profile boot: {recorded} blocks")), "{text}");
    let warmed = stored_block_names(&d.join("wcache"));
    let hashes = block_hashes(&child, 65536);
    for &b in &touched {
        let h = hashes[b].as_ref().unwrap();
        assert!(warmed.contains(h), "block {b} ({h}) of the profile was not warmed");
    }
}

#[test]
fn a_higher_compression_level_stores_fewer_bytes_and_exports_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    // Log-like text: compressible, not trivially.
    let mut data = Vec::new();
    let mut i = 0u64;
    while data.len() < 2 << 20 {
        data.extend_from_slice(format!("{i:08} host{} GET /item/{} status={} bytes={}\n", i % 7, i * 7919 % 100_003, 200 + i % 5, i * 31 % 65_536).as_bytes());
        i += 1;
    }
    std::fs::write(&src, &data).unwrap();
    let mut stored = Vec::new();
    for level in ["1", "19"] {
        let store = dir.path().join(format!("store-{level}"));
        ok(capsule(&store).args(["import", "log", "--compress-level", level, "--disk"]).arg(format!("root={}", src.display())));
        stored.push(stored_blocks(&store).iter().map(|b| b.len).sum::<u64>());
        let out = dir.path().join(format!("out-{level}"));
        ok(capsule(&store).args(["export", "log", "--out"]).arg(&out));
        assert!(std::fs::read(out.join("root.raw")).unwrap() == data, "level {level} exports the same bytes");
        ok(capsule(&store).arg("verify"));
    }
    assert!(stored[1] < stored[0], "level 19 stores fewer bytes than level 1: {stored:?}");
    let (out, err) =
        run(capsule(&dir.path().join("store-x")).args(["import", "log", "--compress-level", "23", "--disk"]).arg(format!("root={}", src.display())));
    assert_eq!(out.status.code(), Some(2), "a usage error: {err}");
    assert!(err.contains("--compress-level"), "{err}");
}
