//! Unit tests on an in-memory object store; the real store (a Garage cluster) is in the
//! root crate's tests/scale.rs.

use std::sync::{Arc, Barrier};

use capsule_images::{CapsuleSpec, NoProgress, Store};
use object_store::memory::InMemory;

use super::*;

fn backend(os: Arc<dyn ObjectStore>) -> S3Backend {
    S3Backend::with_store(os, "team", 8 << 20, "s3://test/team".into()).unwrap()
}

fn net_kind(e: &capsule_net::Error) -> capsule_net::ErrorKind {
    e.kind()
}

#[test]
fn url_parsing() {
    let c = S3Config::parse_url("s3://capsules/site-a/v1/").unwrap();
    assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("capsules", "site-a/v1"));
    assert_eq!(S3Config::parse_url("s3://capsules").unwrap().prefix, "");
    for bad in ["capsules", "s3://", "s3://Caps", "s3://ok-bucket/../x", "s3://ok-bucket/a//b"] {
        assert_eq!(S3Config::parse_url(bad).unwrap_err().kind(), ErrorKind::InvalidInput, "{bad}");
    }
}

#[test]
fn refs_compare_and_swap() {
    let b = backend(Arc::new(InMemory::new()));
    let refs = refs::Refs::new("team");
    let (x, y, z) = (Hash([1; 32]), Hash([2; 32]), Hash([3; 32]));
    let cas = |old: Option<&Hash>, new: &Hash| b.run(refs.compare_and_swap(b.os.as_ref(), "app/web", old, new, &refs::NoFence));
    cas(None, &x).unwrap();
    assert_eq!(cas(None, &y).unwrap_err().kind(), ErrorKind::Conflict);
    cas(Some(&x), &y).unwrap();
    cas(Some(&y), &z).unwrap();
    assert_eq!(b.read_ref("app/web").unwrap(), Some(z));
    assert_eq!(b.read_ref("app").unwrap(), None);
    assert_eq!(b.list_refs().unwrap(), vec![("app/web".to_string(), z)]);
    // Old generations are pruned: the newest commit and the one below it stay.
    let keys: Vec<String> = b.run(b.os.list(None).map_ok(|m| m.location.to_string()).try_collect()).unwrap();
    assert_eq!(keys.iter().filter(|k| k.contains("/.c")).count(), 2, "{keys:?}");
    assert!(!keys.iter().any(|k| k.contains("/.p")), "proposals left: {keys:?}");
    assert!(b.read_ref("../x").is_err());
}

#[test]
fn racing_writers_one_wins_the_others_are_told() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let writers = 6;
    let barrier = Arc::new(Barrier::new(writers));
    let threads: Vec<_> = (0..writers)
        .map(|i| {
            let (os, barrier) = (os.clone(), barrier.clone());
            std::thread::spawn(move || {
                let b = backend(os);
                barrier.wait();
                let target = Hash([i as u8 + 1; 32]);
                (target, b.run(refs::Refs::new("team").compare_and_swap(b.os.as_ref(), "app", None, &target, &refs::NoFence)))
            })
        })
        .collect();
    let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<Hash> = outcomes.iter().filter(|(_, r)| r.is_ok()).map(|(h, _)| *h).collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    for (_, r) in &outcomes {
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        }
    }
    assert_eq!(backend(os).read_ref("app").unwrap(), Some(winners[0]));
}

#[test]
fn a_dead_writers_proposal_blocks_until_it_expires() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let b = backend(os.clone());
    // A proposal for generation 1 from a writer that never came back.
    let stale = Path::from(format!("team/refs/app/.p{:020}/deadbeef", 1));
    b.run(os.put(&stale, PutPayload::from_static(b"00 0\n"))).unwrap();
    let err = b.run(refs::Refs::new("team").compare_and_swap(os.as_ref(), "app", None, &Hash([7; 32]), &refs::NoFence)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("at the same time"), "{err}");
    assert_eq!(b.read_ref("app").unwrap(), None);
}

#[test]
fn blocks_objects_and_ref_completeness() {
    let dir = tempfile::tempdir().unwrap();
    let local = Store::open(dir.path().join("store")).unwrap();
    let disk = dir.path().join("disk.raw");
    let bytes: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&disk, &bytes).unwrap();
    capsule_images::import_capsule(&local, &CapsuleSpec { name: "app".into(), disks: vec![("root".into(), disk)], ..Default::default() }, &NoProgress).unwrap();
    let id = local.read_ref("app").unwrap().unwrap();
    let (objects, blocks) = local.closure(&id).unwrap();
    assert!(blocks.len() > 2);

    let b = backend(Arc::new(InMemory::new()));
    for o in &objects {
        let bytes = local.read_object(o).unwrap();
        let kind = envelope::peek_kind(&bytes).unwrap();
        assert!(b.put_encoded_object(kind, o, &bytes).unwrap());
        // A damaged object is refused before it is stored.
        let mut bad = bytes.clone();
        bad[bytes.len() / 2] ^= 1;
        assert_eq!(net_kind(&b.put_encoded_object(kind, o, &bad).unwrap_err()), capsule_net::ErrorKind::Corrupt);
    }
    for h in &blocks[1..] {
        b.put_encoded_block(h, &local.read_encoded_block(h).unwrap()).unwrap();
    }
    // One block short: no ref may name the capsule.
    let err = b.update_ref("app", None, &id).unwrap_err();
    assert_eq!(net_kind(&err), capsule_net::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains(&blocks[0].to_hex()), "{err}");
    assert!(!b.has_block(&blocks[0]));
    let encoded = local.read_encoded_block(&blocks[0]).unwrap();
    let mut bad = encoded.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(net_kind(&b.put_encoded_block(&blocks[0], &bad).unwrap_err()), capsule_net::ErrorKind::Corrupt);
    b.put_encoded_block(&blocks[0], &encoded).unwrap();
    b.update_ref("app", None, &id).unwrap();
    assert_eq!(b.read_ref("app").unwrap(), Some(id));
    assert_eq!(b.read_encoded_block(&blocks[0]).unwrap(), encoded);
    assert!(b.has_object(&id) && b.has_block(&blocks[1]));
}

/// A capsule of `len` pseudo-random bytes imported into a fresh local store, copied into `b`
/// (objects and blocks) and named by ref `name` there; returns its id and closure.
fn pushed(b: &S3Backend, dir: &std::path::Path, name: &str, seed: u32, len: u32) -> (Hash, Vec<Hash>, Vec<Hash>) {
    let local = Store::open(dir.join(format!("store-{name}"))).unwrap();
    let disk = dir.join(format!("{name}.raw"));
    // xorshift: incompressible, so blocks weigh what they hold.
    let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(&disk, &bytes).unwrap();
    capsule_images::import_capsule(&local, &CapsuleSpec { name: name.into(), disks: vec![("root".into(), disk)], ..Default::default() }, &NoProgress).unwrap();
    let id = local.read_ref(name).unwrap().unwrap();
    let (objects, blocks) = local.closure(&id).unwrap();
    for o in &objects {
        let bytes = local.read_object(o).unwrap();
        b.put_encoded_object(envelope::peek_kind(&bytes).unwrap(), o, &bytes).unwrap();
    }
    for h in &blocks {
        b.put_encoded_block(h, &local.read_encoded_block(h).unwrap()).unwrap();
    }
    let old = b.read_ref(name).unwrap();
    b.update_ref(name, old.as_ref(), &id).unwrap();
    (id, objects, blocks)
}

fn keys(b: &S3Backend, dir: &str) -> Vec<String> {
    b.run(b.os.list(Some(&b.dir(dir))).map_ok(|m| m.location.to_string()).try_collect()).unwrap()
}

#[test]
fn gc_removes_what_no_ref_reaches_and_keeps_young_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let b = backend(os.clone());
    let (kept, kept_objects, kept_blocks) = pushed(&b, dir.path(), "kept", 1, 1 << 20);
    let (_, _, orphan_blocks) = pushed(&b, dir.path(), "moved", 2, 1 << 20);
    // The ref moves to `kept`: the first capsule's blocks are reachable no more.
    b.update_ref("moved", b.read_ref("moved").unwrap().as_ref(), &kept).unwrap();
    let before = keys(&b, "blocks").len();

    // Within the grace period nothing goes.
    let gc = backend(os.clone());
    let young = gc.gc(&gc::GcOptions { grace: Duration::from_secs(3600), settle: Duration::ZERO }).unwrap();
    assert_eq!((young.blocks_removed, young.objects_removed), (0, 0));
    let s = gc.gc(&gc::GcOptions { grace: Duration::ZERO, settle: Duration::ZERO }).unwrap();
    assert_eq!(s.blocks_removed as usize, orphan_blocks.len(), "{s:?}");
    assert!(s.objects_removed > 0 && s.bytes_freed > 0, "{s:?}");
    assert_eq!(keys(&b, "blocks").len(), before - orphan_blocks.len());
    for h in &kept_blocks {
        assert!(b.has_block(h));
    }
    for o in &kept_objects {
        assert!(b.has_object(o));
    }
    // Its marker says it ended; the pending one is gone.
    let markers = keys(&b, "gc");
    assert!(markers.len() == 1 && markers[0].ends_with(".done"), "{markers:?}");
    // A server that remembered the removed blocks forgets them at its next ref update
    // (the new marker), so pushing the old capsule again is refused until its blocks return.
    let local = Store::open(dir.path().join("store-moved")).unwrap();
    let old_id = local.read_ref("moved").unwrap().unwrap();
    let err = b.update_ref("again", None, &old_id).unwrap_err();
    assert_eq!(err.kind(), capsule_net::ErrorKind::NotFound, "{err}");
}

#[test]
fn a_ref_update_needing_what_a_running_gc_removes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let b = backend(os.clone());
    let (id, _, blocks) = pushed(&b, dir.path(), "app", 3, 1 << 20);
    // A gc (another process) published a candidate this capsule needs and is settling.
    let mut body = b"capsule-gc 1\n".to_vec();
    body.push(BLOCK);
    body.extend_from_slice(&blocks[1].0);
    let marker = b.dir("gc").join("00000000000000000001-cafe.pending");
    b.run(os.put(&marker, PutPayload::from(body))).unwrap();
    let err = b.update_ref("copy", None, &id).unwrap_err();
    assert_eq!(err.kind(), capsule_net::ErrorKind::Conflict, "{err}");
    assert!(err.to_string().contains("is removing") && err.to_string().contains(&blocks[1].to_hex()), "{err}");
    assert_eq!(b.read_ref("copy").unwrap(), None);
    // Once it ended (done marker, pending removed) the update goes through.
    b.run(os.put(&b.dir("gc").join("00000000000000000001-cafe.done"), PutPayload::from_static(b"done\n"))).unwrap();
    b.run(os.delete(&marker)).unwrap();
    b.update_ref("copy", None, &id).unwrap();
    // A damaged marker is an error naming it, not a pass.
    b.run(os.put(&b.dir("gc").join("00000000000000000002-beef.pending"), PutPayload::from_static(b"junk"))).unwrap();
    let err = b.update_ref("copy2", None, &id).unwrap_err();
    assert!(err.to_string().contains("beef.pending"), "{err}");
}

#[test]
fn popular_blocks_are_read_from_the_bucket_once_and_the_cache_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let writer = backend(os.clone());
    let (_, _, blocks) = pushed(&writer, dir.path(), "app", 4, 4 << 20);
    // A server with a 1 MiB cache (the smallest allowed) reads one block, then the bucket
    // loses it: the server still serves it from memory.
    let cap = 1 << 20;
    let server = S3Backend::with_store(os.clone(), "team", cap, "s3://test/team".into()).unwrap();
    let first = server.read_encoded_block(&blocks[0]).unwrap();
    server.run(os.delete(&server.key("blocks", &blocks[0]))).unwrap();
    assert_eq!(server.read_encoded_block(&blocks[0]).unwrap(), first);
    // Reading the whole capsule (4 MiB of blocks) keeps the cache within its bytes.
    let mut read = 0;
    for h in &blocks[1..] {
        read += server.read_encoded_block(h).unwrap().len() as u64;
    }
    assert!(read > 2 * cap, "{read}");
    assert!(server.cache.weight() <= cap, "cache holds {} bytes, cap {cap}", server.cache.weight());
    assert!(server.cache.weight() > cap / 4, "the cache keeps something: {}", server.cache.weight());
}

/// Counts GETs, each slowed down so concurrent readers overlap.
#[derive(Debug)]
struct CountingGets {
    inner: InMemory,
    gets: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Display for CountingGets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CountingGets")
    }
}

#[async_trait::async_trait]
impl ObjectStore for CountingGets {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: object_store::PutOptions) -> object_store::Result<object_store::PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, options: object_store::GetOptions) -> object_store::Result<object_store::GetResult> {
        self.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures_util::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> futures_util::stream::BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: object_store::CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[test]
fn a_cold_block_asked_by_many_at_once_is_read_from_the_bucket_once() {
    let dir = tempfile::tempdir().unwrap();
    let counting = Arc::new(CountingGets { inner: InMemory::new(), gets: std::sync::atomic::AtomicUsize::new(0) });
    let os: Arc<dyn ObjectStore> = counting.clone();
    let (_, _, blocks) = pushed(&backend(os.clone()), dir.path(), "app", 5, 1 << 20);
    let server = Arc::new(backend(os));
    let before = counting.gets.load(std::sync::atomic::Ordering::Relaxed);
    let barrier = Arc::new(Barrier::new(16));
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let (server, barrier, h) = (server.clone(), barrier.clone(), blocks[0]);
            std::thread::spawn(move || {
                barrier.wait();
                server.read_encoded_block(&h).unwrap()
            })
        })
        .collect();
    let got: Vec<Vec<u8>> = readers.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(got.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(counting.gets.load(std::sync::atomic::Ordering::Relaxed) - before, 1, "16 readers of one cold block");
}
