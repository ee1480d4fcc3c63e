//! The command line as a user meets it: generated completions and man pages, the help's
//! environment and exit codes, read-only commands that create nothing, `--json` on the
//! commands that print, `capsule status --watch` of a remote mount, `capsule stop`.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn completions_man_pages_and_help_come_from_the_parser() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let bash = ok(capsule(&store).args(["completions", "bash"]));
    assert!(bash.contains("_capsule()") && bash.contains("suspend") && bash.contains("--record-profile"), "{bash}");
    let zsh = ok(capsule(&store).args(["completions", "zsh"]));
    assert!(zsh.contains("#compdef capsule"), "{zsh}");
    let man = ok(capsule(&store).arg("man"));
    assert!(man.contains(".TH capsule 1") && man.contains("CAPSULE_RUN_DIR"), "{man}");
    let run_man = ok(capsule(&store).args(["man", "run"]));
    assert!(run_man.contains(".TH capsule-run 1") && run_man.contains("dry\\-run"), "{run_man}");
    let err = fails(capsule(&store).args(["man", "no-such-command"]));
    assert!(err.contains("no command \"no-such-command\""), "{err}");
    let help = ok(capsule(&store).arg("--help"));
    for var in ["CAPSULE_STORE", "CAPSULE_CACHE", "CAPSULE_RUN_DIR", "CAPSULE_TOKEN", "CAPSULE_CONFIG_DIR", "CAPSULE_KEY_DIR", "CAPSULE_LOG", "Exit codes"] {
        assert!(help.contains(var), "--help lacks {var}:\n{help}");
    }
    assert!(!store.exists(), "printing help made a store");
    // --store is listed only where a store is used.
    for cmd in ["import", "inspect", "mount", "run", "serve", "push"] {
        let help = ok(capsule(&store).args([cmd, "--help"]));
        assert!(help.contains("--store"), "{cmd} --help lacks --store:\n{help}");
    }
    for cmd in
        [&["ps"][..], &["stop"], &["status"], &["umount"], &["warm"], &["prefetch"], &["unpin"], &["takeover"], &["man"], &["key", "create"], &["key", "list"]]
    {
        let help = ok(capsule(&store).args(cmd).arg("--help"));
        assert!(!help.contains("--store"), "{cmd:?} --help lists --store, which it ignores:\n{help}");
    }
}

#[test]
fn reading_commands_create_nothing_where_a_typo_points() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo");
    let err = fails(capsule(&typo).args(["inspect", "x"]));
    assert!(err.contains(&format!("no capsule store at {}", typo.display())), "{err}");
    fails(capsule(&typo).args(["verify"]));
    fails(capsule(&typo).args(["export", "x", "--out"]).arg(dir.path().join("out")));
    assert_eq!(ok(capsule(&typo).args(["ls", "--json"])).trim(), "[]");
    // A store of another format version is named as such, not listed as empty.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("format"), "capsule-store 9\n").unwrap();
    let err = fails(capsule(&other).arg("ls"));
    assert!(err.contains("not a capsule store of this version"), "{err}");
    let cache = dir.path().join("cache-typo");
    let id = "0".repeat(64);
    let err = fails(capsule(&typo).args(["status", &id, "--cache"]).arg(&cache));
    assert!(err.contains("no block cache at"), "{err}");
    fails(capsule(&typo).args(["unpin", "capsule://127.0.0.1:1/x", "--cache"]).arg(&cache));
    // warm fills a cache, but makes none for a server that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let url = format!("capsule://{}/x", silent.local_addr().unwrap());
    for cmd in [&["warm", "--all"][..], &["prefetch"]] {
        let err = fails(capsule(&typo).args(cmd).args([&url, "--connect-timeout", "1", "--cache"]).arg(&cache));
        assert!(err.contains("did not answer"), "{err}");
    }
    assert!(!typo.exists() && !cache.exists(), "a reading command created a store or cache");
    let err = fails(capsule(&typo).env("CAPSULE_RUN_DIR", dir.path().join("runs")).args(["stop", "no-such-run"]));
    assert!(err.contains("no run \"no-such-run\""), "{err}");
}

#[test]
fn json_output_of_store_commands_and_a_watch_of_a_remote_mount() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server_store, cfg) = (d.join("server"), d.join("cfg"));
    let disk = d.join("root.raw");
    std::fs::write(&disk, pseudo_random(4 << 20, 7)).unwrap();
    ok(capsule(&server_store).args(["import", "data", "--block-size", "64K", "--disk"]).arg(format!("root={}", disk.display())));
    ok(capsule(&server_store).args(["import", "spare", "--disk"]).arg(format!("root={}", disk.display())));
    // ls --json carries what the table shows.
    let listed: serde_json::Value = serde_json::from_str(&ok(capsule(&server_store).args(["ls", "--json"]))).unwrap();
    let row = listed.as_array().unwrap().iter().find(|r| r["name"] == "data").unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(
        (row["size"].as_u64(), &row["disks"], row["parent"].is_null(), row["damaged"].is_null()),
        (Some(4 << 20), &serde_json::json!(["root"]), true, true),
        "{row}"
    );
    let table = ok(capsule(&server_store).arg("ls"));
    assert!(
        table.lines().any(|l| l.starts_with("data ") && l.contains(&row["id"].as_str().unwrap()[..12]) && l.contains("4.0 MiB") && l.ends_with("root")),
        "{table}"
    );
    let inspected: serde_json::Value = serde_json::from_str(&ok(capsule(&server_store).args(["inspect", "data", "--json"]))).unwrap();
    let image = &inspected["disks"][0]["image"];
    assert_eq!(
        (inspected["id"].as_str(), &inspected["disks"][0]["name"], image["size"].as_u64(), image["block_size"].as_u64()),
        (row["id"].as_str(), &serde_json::json!("root"), Some(4 << 20), Some(65536)),
        "{inspected}"
    );
    assert!(image["layers"].as_array().unwrap().len() == 1 && image["metadata_bytes"].as_u64() > Some(0) && inspected["boot"].is_null(), "{inspected}");
    let shown = ok(capsule(&server_store).args(["inspect", "data"]));
    assert!(shown.lines().any(|l| l.starts_with("disk root") && l.contains("4.0 MiB") && l.contains("1 layer(s)")), "{shown}");
    // Tokens: the token once, at creation; listed by id and scope, never the token.
    let made: serde_json::Value =
        serde_json::from_str(&ok(capsule(&server_store).args(["token", "create", "--scope", "read", "--prefix", "team", "--json"]))).unwrap();
    let tokens = ok(capsule(&server_store).args(["token", "list", "--json"]));
    let tokens: serde_json::Value = serde_json::from_str(&tokens).unwrap();
    assert_eq!(
        (&tokens[0]["id"], &tokens[0]["scope"], &tokens[0]["prefix"]),
        (&made["id"], &serde_json::json!("read"), &serde_json::json!("team")),
        "{tokens}"
    );
    assert!(!tokens.to_string().contains(made["token"].as_str().unwrap()), "token list shows a token: {tokens}");
    let revoked: serde_json::Value =
        serde_json::from_str(&ok(capsule(&server_store).args(["token", "revoke", made["id"].as_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(revoked["revoked"], made["id"]);
    // A commit of something that is not a mount says so.
    let err = fails(capsule(&server_store).args(["commit", d.to_str().unwrap(), "child"]));
    assert!(err.contains(&format!("{} is not a capsule mount", d.display())), "{err}");

    let exported: serde_json::Value = serde_json::from_str(&ok(capsule(&server_store).args(["export", "data", "--json", "--out"]).arg(d.join("out")))).unwrap();
    let files: Vec<&str> = exported["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(files.iter().any(|f| f.ends_with("/root.raw")) && files.iter().any(|f| f.ends_with("/capsule.json")), "{exported}");
    assert_eq!(std::fs::read(d.join("out/root.raw")).unwrap(), std::fs::read(&disk).unwrap());
    let rm: serde_json::Value = serde_json::from_str(&ok(capsule(&server_store).args(["rm", "spare", "--json"]))).unwrap();
    assert_eq!(rm["removed"], serde_json::json!(["spare"]));
    let gc: serde_json::Value = serde_json::from_str(&ok(capsule(&server_store).args(["gc", "--json"]))).unwrap();
    assert!(gc["blocks_kept"].as_u64().unwrap() >= 64, "{gc}");

    // A remote mount read in part: --watch shows what the read fetched on demand.
    let server = ServerProcess::start(&server_store, &["--public-read"]);
    let m = Mounted::new(&d.join("client"), &cfg, &format!("{}/data", server.url), &d.join("mnt"), &d.join("cache"), &["--read-only"]);
    let before = pread(&m.dir.join("root.raw"), 0, 1).unwrap();
    assert_eq!(before.len(), 1);
    let out = std::process::Command::new("timeout")
        .args(["2", env!("CARGO_BIN_EXE_capsule"), "status"])
        .arg(&m.dir)
        .args(["--watch", "--interval", "0.2"])
        .output()
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() >= 3, "one line per interval: {lines:?}");
    let last = lines.last().unwrap();
    assert_eq!(last["capsule"], "data");
    assert!(last["demand_bytes"].as_u64().unwrap() >= 64 << 10, "the first block was read on demand: {last}");
    assert_eq!(last["fetched_bytes"].as_u64().unwrap(), last["demand_bytes"].as_u64().unwrap() + last["background_bytes"].as_u64().unwrap(), "{last}");
    assert!(last["resident_pct"].as_f64().unwrap() < 100.0, "{last}");
    assert!(lines.windows(2).all(|w| w[0]["unix_ms"].as_u64() <= w[1]["unix_ms"].as_u64()), "timestamps go forward: {lines:?}");
    let um: serde_json::Value = serde_json::from_str(&ok(capsule(&d.join("client")).args(["umount", "--json"]).arg(&m.dir))).unwrap();
    assert_eq!(um["unmounted"], m.dir.display().to_string());
    // Watching a mount that is gone is an error, not an empty stream.
    fails(capsule(&d.join("client")).args(["status", "--watch"]).arg(&m.dir));
    drop(m);

    // A detached mount reports where it is and which daemon serves it.
    let mnt = d.join("mnt-local");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted: serde_json::Value =
        serde_json::from_str(&ok(capsule(&server_store).args(["mount", "data", "--json", "--cache"]).arg(d.join("cache-local")).arg("--").arg(&mnt))).unwrap();
    let pid = mounted["supervisor_pid"].as_u64().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists() && mounted["mountpoint"] == mnt.display().to_string(), "{mounted}");
    assert_eq!(std::fs::read(mnt.join("root.raw")).unwrap(), std::fs::read(&disk).unwrap());
    ok(capsule(&server_store).arg("umount").arg(&mnt));
}

#[test]
fn a_server_that_never_answers_fails_after_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // A UDP port that swallows every datagram: a host behind a firewall dropping packets.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let url = format!("capsule://{}/x", silent.local_addr().unwrap());
    let start = std::time::Instant::now();
    let err = fails(client(&dir.path().join("s"), &dir.path().join("cfg")).args(["pull", &url, "--connect-timeout", "1"]));
    let took = start.elapsed();
    assert!(err.contains("did not answer within 1 s") && !err.contains("no answer yet"), "{err}");
    assert!(took < std::time::Duration::from_secs(8), "waited {took:?}");
    // A longer wait is not spent in silence.
    let err = fails(client(&dir.path().join("s"), &dir.path().join("cfg")).args(["pull", &url, "--connect-timeout", "3"]));
    assert!(
        err.contains(&format!("no answer yet from {}; waiting up to 3 s", silent.local_addr().unwrap())) && err.contains("did not answer within 3 s"),
        "{err}"
    );
    // So is a mount's (it connects before it mounts anything).
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let err = fails(
        client(&dir.path().join("s"), &dir.path().join("cfg"))
            .args(["mount", &url, "--connect-timeout", "3", "--cache"])
            .arg(dir.path().join("cache"))
            .arg("--")
            .arg(&mnt),
    );
    assert!(err.contains("no answer yet from") && err.contains("did not answer within 3 s"), "{err}");
}

#[test]
fn run_dry_run_prints_the_command_line_without_mounting() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server_store, cfg, runs, cache) = (d.join("server"), d.join("cfg"), d.join("runs"), d.join("cache"));
    let disk = d.join("root.raw");
    std::fs::write(&disk, pseudo_random(1 << 20, 3)).unwrap();
    ok(capsule(&server_store).args(["import", "vm", "--ram", "64M", "--cpus", "2", "--disk"]).arg(format!("root={}", disk.display())));
    let server = ServerProcess::start(&server_store, &["--public-read"]);
    let line = ok(client(&d.join("client"), &cfg)
        .env("CAPSULE_RUN_DIR", &runs)
        .args(["run", &format!("{}/vm", server.url), "--accel", "tcg", "--id", "dry", "--dry-run", "--cache"])
        .arg(&cache));
    let mnt = runs.join("dry/mnt");
    assert!(line.contains(&format!("file={}/root.raw,format=raw", mnt.display())), "{line}");
    assert!(line.contains(&format!("mem-path={}/memory.raw", mnt.display())) && line.contains("-smp 2"), "{line}");
    let plan: serde_json::Value = serde_json::from_str(&ok(client(&d.join("client"), &cfg)
        .env("CAPSULE_RUN_DIR", &runs)
        .args(["run", &format!("{}/vm", server.url), "--accel", "tcg", "--id", "dry", "--dry-run", "--json", "--cache"])
        .arg(&cache)))
    .unwrap();
    assert_eq!(plan["line"].as_str(), line.lines().next(), "{plan}");
    assert!(plan["args"].as_array().unwrap().iter().any(|a| a == "-smp"), "{plan}");
    // No mount daemon ran (it would have logged into the cache), and no block came over.
    assert!(!cache.join("logs").exists(), "--dry-run started a mount");
    let blocks = stored_block_names(&cache).len();
    assert_eq!(blocks, 0, "--dry-run fetched blocks");
    assert!(!runs.join("dry").exists(), "the run's directory is left behind");
}
