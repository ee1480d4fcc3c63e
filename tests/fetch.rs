//! The fetch engine as a user meets it through a remote mount: only the blocks reads need
//! travel, sequential readers earn readahead and random ones do not, a lost link fails a
//! read after the stall timeout instead of hanging it, and a huge sparse disk mounts and
//! serves its first read after a handful of requests.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const BS: u64 = 64 << 10;

struct Env {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        Self { _dir: dir, root }
    }
    fn p(&self, name: &str) -> std::path::PathBuf {
        self.root.join(name)
    }
    /// The test guest imported into store `server` and served to anyone: the server, and
    /// the guest's URL on it.
    fn serve_guest(&self) -> (ServerProcess, String) {
        import_guest(&self.p("server"), false);
        let server = ServerProcess::start(&self.p("server"), &["--public-read"]);
        let url = format!("{}/guest", server.url);
        (server, url)
    }
}

/// The non-zero 64 KiB blocks of `file` whose index is in `indexes`, as distinct contents
/// (hashed here, independently of capsule).
fn distinct_nonzero_blocks(file: &Path, indexes: impl IntoIterator<Item = u64>) -> usize {
    let data = std::fs::read(file).unwrap();
    let mut seen = HashSet::new();
    for i in indexes {
        let start = (i * BS) as usize;
        let block = &data[start..(start + BS as usize).min(data.len())];
        if block.iter().any(|&b| b != 0) {
            seen.insert(blake3::hash(block));
        }
    }
    seen.len()
}

fn fetch_stat(s: &serde_json::Value, key: &str) -> u64 {
    s["fetch"][key].as_u64().unwrap_or_else(|| panic!("stats.json has no fetch.{key}: {s}"))
}

#[test]
fn random_readers_fetch_only_what_they_read_and_sequential_readers_earn_readahead() {
    let e = Env::new();
    let (_server, url) = e.serve_guest();
    let disk = guest_dir().join("disk.raw");
    let size = std::fs::metadata(&disk).unwrap().len();

    // Scattered 4 KiB reads: each fetches its own block and nothing else.
    let m = Mounted::new(&e.p("c1"), &e.p("cfg"), &url, &e.p("m1"), &e.p("cache1"), &["--read-only"]);
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut touched = Vec::new();
    for _ in 0..64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = (x % (size - 4096)) & !4095;
        let got = pread(&m.dir.join("root.raw"), offset, 4096).unwrap();
        assert_eq!(got, pread(&disk, offset, 4096).unwrap(), "bytes at {offset}");
        touched.push(offset / BS);
    }
    let s = m.stats();
    let needed = distinct_nonzero_blocks(&disk, touched) as u64;
    assert!(needed > 0);
    assert_eq!(s["blocks_fetched"].as_u64().unwrap(), needed, "random reads fetched exactly the blocks they touched: {s}");
    assert_eq!(fetch_stat(&s, "readahead_blocks"), 0, "random readers earn no readahead: {s}");
    drop(m);

    // One sequential pass: readahead kicks in, and still no block travels twice.
    let m = Mounted::new(&e.p("c2"), &e.p("cfg"), &url, &e.p("m2"), &e.p("cache2"), &["--read-only"]);
    let reference = std::fs::read(&disk).unwrap();
    read_through_in_order(&m.dir.join("root.raw"), &reference);
    let s = m.stats();
    let all = distinct_nonzero_blocks(&disk, 0..size.div_ceil(BS)) as u64;
    assert_eq!(s["blocks_fetched"].as_u64().unwrap(), all, "every distinct block once: {s}");
    // A random reader gets none (above); a sequential one gets part of the file ahead of
    // it. How much depends on how fast the reader runs against the link: on loopback both
    // share two cores, the reader often catches up and misses, and a loaded CI machine saw
    // 20% (quiet: 35-45%). The bar is an eighth: far from none, and not a timing test.
    assert!(fetch_stat(&s, "readahead_blocks") > all / 8, "a sequential reader earns readahead: {s}");
    assert_eq!(fetch_stat(&s, "unwanted_blocks"), 0, "{s}");
    assert_eq!(fetch_stat(&s, "verified_blocks"), all, "each block decoded and hashed once: {s}");
    drop(m);

    // The same cache offline, read in order again: blocks are decoded ahead of the reader
    // on other threads, and the bytes are the same.
    let m = Mounted::new(&e.p("c2"), &e.p("cfg"), &url, &e.p("m2"), &e.p("cache2"), &["--read-only", "--offline"]);
    read_through_in_order(&m.dir.join("root.raw"), &reference);
    let s = m.stats();
    assert!(fetch_stat(&s, "decoded_ahead") > all / 8, "a warm sequential reader gets blocks decoded ahead: {s}");
}

/// Reads `file` from start to end in 128 KiB reads, comparing each with `reference`.
fn read_through_in_order(file: &Path, reference: &[u8]) {
    let file = std::fs::File::open(file).unwrap();
    let mut buf = vec![0u8; 128 << 10];
    let mut offset = 0u64;
    while offset < reference.len() as u64 {
        let n = std::os::unix::fs::FileExt::read_at(&file, &mut buf, offset).unwrap();
        assert!(n > 0);
        assert!(buf[..n] == reference[offset as usize..offset as usize + n], "bytes at {offset}");
        offset += n as u64;
    }
}

/// A free UDP port on loopback (bound and released: good enough for a test).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Relay(std::process::Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_cut_link_fails_a_read_after_the_stall_timeout_and_reads_resume_when_it_returns() {
    let e = Env::new();
    let (server, _) = e.serve_guest();
    let port = free_udp_port();
    let cut = e.p("cut");
    let _relay = Relay(
        std::process::Command::new(env!("CARGO_BIN_EXE_capsule-linkemu"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--to", server.url.trim_start_matches("capsule://")])
            .arg("--cut-file")
            .arg(&cut)
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(200));
    let url = format!("capsule://127.0.0.1:{port}/guest");
    let m = Mounted::new(&e.p("c"), &e.p("cfg"), &url, &e.p("m"), &e.p("cache"), &["--read-only", "--stall-timeout", "3"]);
    let disk = guest_dir().join("disk.raw");
    let file = m.dir.join("root.raw");
    assert_eq!(pread(&file, 0, 4096).unwrap(), pread(&disk, 0, 4096).unwrap());

    std::fs::write(&cut, b"").unwrap();
    // The relay looks at the file every 50 ms.
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let err = pread(&file, 64 << 20, 4096).map(|_| ()).expect_err("a read across a cut link fails");
    let took = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(5), "EIO: {err}");
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(15), "failed after {took:?}, stall timeout 3 s");
    assert!(m.log().contains("stall timeout"), "the log says why: {}", m.log());

    std::fs::remove_file(&cut).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let back = pread(&file, 64 << 20, 4096).expect("the link is back");
    assert_eq!(back, pread(&disk, 64 << 20, 4096).unwrap());
}

#[test]
fn a_sparse_100_gib_disk_mounts_and_serves_its_first_read_after_a_few_requests() {
    let e = Env::new();
    let raw = e.p("big.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(100 << 30).unwrap();
    let data = pseudo_random(BS as usize, 5);
    let at = 50u64 << 30;
    std::os::unix::fs::FileExt::write_all_at(&f, &data, at).unwrap();
    drop(f);
    let t = Instant::now();
    ok(capsule(&e.p("server")).args(["import", "big", "--disk"]).arg(format!("root={}", raw.display())));
    assert!(t.elapsed() < Duration::from_secs(30), "a sparse import skips the holes: {:?}", t.elapsed());
    let server = ServerProcess::start(&e.p("server"), &["--public-read"]);
    let m = Mounted::new(&e.p("c"), &e.p("cfg"), &format!("{}/big", server.url), &e.p("m"), &e.p("cache"), &["--read-only"]);
    let before = m.stats();
    assert_eq!(fetch_stat(&before, "map_pages_fetched"), 0, "no map page below the roots before a read: {before}");

    let got = pread(&m.dir.join("root.raw"), at + 4096, 4096).unwrap();
    assert_eq!(got, data[4096..8192]);
    let s = m.stats();
    // 1.6 M blocks: a three-level map whose root came with the mount; the read needs the
    // two pages below it and its block, which come in one map path request.
    assert_eq!(fetch_stat(&s, "path_requests"), 1, "{s}");
    assert_eq!(fetch_stat(&s, "object_requests"), 1, "{s}");
    assert_eq!(fetch_stat(&s, "requests"), 0, "{s}");
    assert_eq!(fetch_stat(&s, "map_pages_fetched"), 2, "{s}");
    assert!(s["bytes_fetched"].as_u64().unwrap() <= BS + 64, "{s}");

    // A hole answers zeros without asking anything.
    assert_eq!(pread(&m.dir.join("root.raw"), 10 << 30, 4096).unwrap(), vec![0; 4096]);
    let after = m.stats();
    assert_eq!(fetch_stat(&after, "object_requests") + fetch_stat(&after, "requests"), 1, "{after}");

    // stats.json counts resident blocks from at most 65,536 lookups per image (evenly
    // spaced samples of the 1.6 M here), so opening it stays cheap and asks nothing.
    let t = Instant::now();
    for _ in 0..5 {
        m.stats();
    }
    let each = t.elapsed() / 5;
    let s = m.stats();
    assert_eq!(s["files"]["root.raw"]["blocks"].as_u64(), Some((100 << 30) / BS), "{s}");
    assert!(each < Duration::from_secs(2), "stats.json of a 100 GiB image took {each:?} per open");
    let asked = |s: &serde_json::Value| fetch_stat(s, "object_requests") + fetch_stat(s, "requests");
    assert_eq!(asked(&s), asked(&after), "counting fetched nothing: {s}");
    eprintln!("stats.json of a 100 GiB image: {each:?} per open");
}

/// A profile recorded through a mount lists the blocks its readers read, not what the
/// kernel's readahead on the mounted file read for them (with the default 1 MiB of it,
/// a Debian boot's profile listed 12% more blocks than the boot reads).
#[test]
fn a_recorded_profile_lists_what_readers_read_and_no_kernel_readahead() {
    let e = Env::new();
    import_guest(&e.p("server"), false);
    let disk = guest_dir().join("disk.raw");
    let size = std::fs::metadata(&disk).unwrap().len();
    let mut touched = Vec::new();
    {
        let m = Mounted::new(&e.p("server"), &e.p("cfg"), "guest", &e.p("rec"), &e.p("rec-cache"), &["--read-only", "--record-profile", "boot"]);
        // Buffered 4 KiB reads in order through one block, at spots far apart: one block
        // each, unless the kernel, seeing a sequential reader, reads ahead into the next.
        let file = std::fs::File::open(m.dir.join("root.raw")).unwrap();
        let mut buf = vec![0u8; 4096];
        for i in 0..12u64 {
            let block = (i * 37 + 3) % (size / BS);
            for page in 0..BS / 4096 {
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, block * BS + page * 4096).unwrap();
            }
            touched.push(block);
        }
    }
    let profile = inspect(&e.p("server"), "guest")["profiles"].as_array().unwrap().iter().find(|p| p["name"] == "boot").cloned().expect("a boot profile");
    let needed = distinct_nonzero_blocks(&disk, touched) as u64;
    assert!(needed > 0);
    assert_eq!(profile["blocks"].as_u64().unwrap(), needed, "the blocks read, no more: {profile}");
}

/// `--prefetch auto` (what `capsule run` passes by default): a capsule that carries a
/// `boot` profile has its blocks fetched in the background before anyone reads them; one
/// without a profile fetches nothing until read.
#[test]
fn prefetch_auto_fetches_the_capsules_own_profile_and_nothing_without_one() {
    let e = Env::new();
    import_guest(&e.p("server"), false);
    ok(capsule(&e.p("server")).args(["import", "plain", "--disk"]).arg(format!("root={}", guest_dir().join("disk.raw").display())));
    // The boot profile of "guest": its first 4 MiB, read once on a local mount.
    {
        let m = Mounted::new(&e.p("server"), &e.p("cfg"), "guest", &e.p("rec"), &e.p("rec-cache"), &["--read-only", "--record-profile", "boot"]);
        pread(&m.dir.join("root.raw"), 0, 4 << 20).unwrap();
    }
    let profile = inspect(&e.p("server"), "guest")["profiles"].as_array().unwrap().iter().find(|p| p["name"] == "boot").cloned().expect("a boot profile");
    let listed = profile["blocks"].as_u64().unwrap();
    assert!(listed > 0, "{profile}");
    let server = ServerProcess::start(&e.p("server"), &["--public-read"]);

    let m = Mounted::new(&e.p("c1"), &e.p("cfg"), &format!("{}/guest", server.url), &e.p("m1"), &e.p("cache1"), &["--read-only", "--prefetch", "auto"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = m.stats();
    while fetch_stat(&s, "background_blocks") < listed && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        s = m.stats();
    }
    assert_eq!(fetch_stat(&s, "background_blocks"), listed, "the profile's blocks, fetched with no reader: {s}");
    assert_eq!(fetch_stat(&s, "demand_blocks") + fetch_stat(&s, "readahead_blocks"), 0, "{s}");
    drop(m);

    let m = Mounted::new(&e.p("c2"), &e.p("cfg"), &format!("{}/plain", server.url), &e.p("m2"), &e.p("cache2"), &["--read-only", "--prefetch", "auto"]);
    std::thread::sleep(Duration::from_secs(1));
    let s = m.stats();
    assert_eq!(fetch_stat(&s, "background_blocks"), 0, "no profile, nothing fetched ahead: {s}");
}

/// The kernel's readahead of a mount's device: what `--kernel-readahead` asks for (1 MiB
/// here, so a sequential reader's requests come 1 MiB at a time, not capped at the
/// device's default 128 KiB, which is also the mount's default), and none with
/// `--kernel-readahead 0` (what `capsule run` gives guest RAM).
#[test]
fn a_mount_gets_the_kernel_readahead_it_asks_for() {
    let e = Env::new();
    import_guest(&e.p("server"), false);
    let device_readahead_kib = |dir: &Path| -> u64 {
        let (major, minor) = capsule_fs::mountinfo::mount_at(&dir.canonicalize().unwrap()).expect("the mount in mountinfo").device;
        std::fs::read_to_string(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb")).unwrap().trim().parse().unwrap()
    };
    {
        let m = Mounted::new(&e.p("server"), &e.p("cfg"), "guest", &e.p("m1"), &e.p("cache1"), &["--read-only", "--kernel-readahead", "1048576"]);
        assert_eq!(device_readahead_kib(&m.dir), 1024, "1 MiB, as asked");
    }
    {
        let m = Mounted::new(&e.p("server"), &e.p("cfg"), "guest", &e.p("m0"), &e.p("cache0"), &["--read-only"]);
        assert_eq!(device_readahead_kib(&m.dir), 128, "the default");
    }
    {
        let m = Mounted::new(&e.p("server"), &e.p("cfg"), "guest", &e.p("m2"), &e.p("cache2"), &["--read-only", "--kernel-readahead", "0"]);
        assert_eq!(device_readahead_kib(&m.dir), 0, "none");
    }
}

#[test]
fn an_offline_sequential_read_succeeds_when_the_map_past_it_was_never_fetched() {
    // A mount fetches map pages as reads need them, so an offline mount of that cache can
    // lack the page after what was read. Decoding ahead looks past the read, and must not
    // fail it for that.
    let e = Env::new();
    let (server, url) = e.serve_guest();
    let disk = guest_dir().join("disk.raw");
    // The last 24 blocks under the first map page (1,024 slots), read online one block at a
    // time from the last: no stream forms, so nothing reads ahead into the next page.
    let blocks = 1000..1024u64;
    assert!(std::fs::metadata(&disk).unwrap().len() > 1100 * BS, "the test guest's disk spans two map pages");
    let m = Mounted::new(&e.p("c"), &e.p("cfg"), &url, &e.p("m1"), &e.p("cache"), &["--read-only"]);
    for i in blocks.clone().rev() {
        assert_eq!(pread(&m.dir.join("root.raw"), i * BS, 4096).unwrap(), pread(&disk, i * BS, 4096).unwrap(), "block {i}");
    }
    drop(m);
    drop(server);

    let m = Mounted::new(&e.p("c"), &e.p("cfg"), &url, &e.p("m2"), &e.p("cache"), &["--read-only", "--offline"]);
    let file = m.dir.join("root.raw");
    // A zero block needs no cached block, only its map page: unreadable offline, it shows
    // the next page is missing, without which this test proves nothing.
    let reference = std::fs::read(&disk).unwrap();
    let zero = (1024..reference.len() as u64 / BS)
        .find(|&i| reference[(i * BS) as usize..((i + 1) * BS) as usize].iter().all(|&b| b == 0))
        .expect("a zero block under the second map page");
    assert!(pread(&file, zero * BS, 4096).is_err(), "zero block {zero} was readable offline: its map page is here");
    // O_DIRECT, 128 KiB at a time: the daemon sees exactly these reads (through the page
    // cache, a failed readahead request is retried a page at a time and hides the error).
    let direct = std::process::Command::new("dd")
        .arg(format!("if={}", file.display()))
        .args(["iflag=direct", "bs=128K", "status=none"])
        .arg(format!("skip={}", blocks.start / 2))
        .arg(format!("count={}", (blocks.end - blocks.start) / 2))
        .output()
        .unwrap();
    assert!(direct.status.success(), "offline sequential read failed: {}", String::from_utf8_lossy(&direct.stderr));
    assert!(direct.stdout == reference[(blocks.start * BS) as usize..(blocks.end * BS) as usize], "offline read differs");
    assert!(fetch_stat(&m.stats(), "decoded_ahead") > 0, "the read was decoded ahead, so it looked past itself");
}
