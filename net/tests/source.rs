//! The fetch engine over `RemoteSource` against an in-process server over real QUIC: one
//! transfer per hash however many readers ask; a server that goes away and comes back is
//! a pause; one that stays away, or never answers, fails the read after the stall timeout.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use capsule_fetch::{BlockSource, Engine, EngineConfig, FetchErrorKind, LocalBlocks, Urgency};
use capsule_images::envelope::ObjectKind;
use capsule_images::{Hash, Store};
use capsule_net::backend::Backend;
use capsule_net::{ConnectOptions, RemoteSource, RemoteUrl, ServeOptions, Server};

/// The store, counting block reads and holding each GetBlocks a moment so that
/// concurrent readers overlap.
struct SlowCounting {
    store: Store,
    reads: AtomicU64,
    /// Accept requests and never answer them, until cleared.
    hang: AtomicBool,
}

#[derive(Default)]
struct MemCache(Mutex<HashMap<Hash, Vec<u8>>>);

impl LocalBlocks for MemCache {
    fn get(&self, hash: &Hash) -> Option<Vec<u8>> {
        capsule_images::block::decode(hash, self.0.lock().unwrap().get(hash)?).ok()
    }
    fn contains(&self, hash: &Hash) -> bool {
        self.0.lock().unwrap().contains_key(hash)
    }
    fn insert_verified(&self, hash: &Hash, encoded: &[u8]) -> Result<(), String> {
        self.0.lock().unwrap().insert(*hash, encoded.to_vec());
        Ok(())
    }
}

impl Backend for SlowCounting {
    fn read_encoded_block(&self, hash: &Hash) -> capsule_net::Result<Vec<u8>> {
        while self.hang.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.reads.fetch_add(1, Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        Backend::read_encoded_block(&self.store, hash)
    }
    fn has_block(&self, hash: &Hash) -> bool {
        Backend::has_block(&self.store, hash)
    }
    fn put_encoded_block(&self, hash: &Hash, encoded: &[u8]) -> capsule_net::Result<bool> {
        Backend::put_encoded_block(&self.store, hash, encoded)
    }
    fn read_object(&self, id: &Hash) -> capsule_net::Result<Vec<u8>> {
        Backend::read_object(&self.store, id)
    }
    fn has_object(&self, id: &Hash) -> bool {
        Backend::has_object(&self.store, id)
    }
    fn put_encoded_object(&self, kind: ObjectKind, id: &Hash, bytes: &[u8]) -> capsule_net::Result<bool> {
        Backend::put_encoded_object(&self.store, kind, id, bytes)
    }
    fn list_refs(&self) -> capsule_net::Result<Vec<(String, Hash)>> {
        Backend::list_refs(&self.store)
    }
    fn read_ref(&self, name: &str) -> capsule_net::Result<Option<Hash>> {
        Backend::read_ref(&self.store, name)
    }
    fn update_ref(&self, name: &str, old: Option<&Hash>, new: &Hash) -> capsule_net::Result<()> {
        Backend::update_ref(&self.store, name, old, new)
    }
}

/// A store with `n` distinct blocks; returns their hashes.
fn store_with_blocks(root: &std::path::Path, n: u8) -> (Store, Vec<Hash>) {
    let store = Store::open(root).unwrap();
    let hashes = (1..=n)
        .map(|i| match store.put_block(&vec![i; 65536]).unwrap().entry {
            capsule_images::Entry::Data(h) => h,
            capsule_images::Entry::Zero | capsule_images::Entry::Sealed { .. } => unreachable!(),
        })
        .collect();
    (store, hashes)
}

fn serve(rt: &tokio::runtime::Runtime, root: &std::path::Path, backend: Arc<dyn Backend>, listen: &str) -> (quinn::Endpoint, std::net::SocketAddr) {
    let identity = capsule_net::tls::load_or_create_identity(root).unwrap();
    let _guard = rt.enter();
    let server = Server::bind(identity, listen.parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let endpoint = server.endpoint();
    let opts = ServeOptions::new(addr, true, root.to_path_buf());
    rt.spawn(server.run(backend, opts));
    (endpoint, addr)
}

fn source(dir: &std::path::Path, addr: std::net::SocketAddr, stall: Duration) -> (Arc<Engine>, Arc<RemoteSource>) {
    let url = RemoteUrl::parse(&format!("capsule://{addr}")).unwrap();
    let opts = ConnectOptions { token: None, fingerprint: None, known_servers: Some(dir.join("known_servers")), connect_timeout: None };
    let src = Arc::new(RemoteSource::new(url, opts, stall).unwrap());
    let cfg = EngineConfig { stall_timeout: stall, source_label: src.label(), ..EngineConfig::default() };
    (Engine::new(Arc::new(MemCache::default()), Some(src.clone() as Arc<dyn BlockSource>), cfg), src)
}

#[test]
fn concurrent_readers_of_the_same_blocks_cause_one_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("server");
    let (store, hashes) = store_with_blocks(&root, 16);
    let backend = Arc::new(SlowCounting { store, reads: AtomicU64::new(0), hang: AtomicBool::new(false) });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_endpoint, addr) = serve(&rt, &root, backend.clone(), "127.0.0.1:0");
    let (engine, src) = source(dir.path(), addr, Duration::from_secs(10));

    let readers = 8;
    let barrier = Arc::new(Barrier::new(readers));
    let threads: Vec<_> = (0..readers)
        .map(|_| {
            let (engine, barrier, hashes) = (engine.clone(), barrier.clone(), hashes.clone());
            std::thread::spawn(move || {
                barrier.wait();
                engine.get(&hashes, &[], Urgency::Demand, 0).unwrap()
            })
        })
        .collect();
    for t in threads {
        let got = t.join().unwrap();
        for (i, block) in got.iter().enumerate() {
            assert_eq!(**block, vec![i as u8 + 1; 65536], "block {i}");
        }
    }
    assert_eq!(backend.reads.load(Ordering::SeqCst), 16, "each block read from the server exactly once");
    assert_eq!(src.stats().blocks.load(Ordering::SeqCst), 16);
    assert_eq!(engine.snapshot().verified_blocks, 16, "each block decoded and hashed once");
}

#[test]
fn a_server_that_goes_away_and_comes_back_is_a_pause_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("server");
    let (store, hashes) = store_with_blocks(&root, 4);
    let store: Arc<dyn Backend> = Arc::new(store);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (endpoint, addr) = serve(&rt, &root, store.clone(), "127.0.0.1:0");
    let (engine, src) = source(dir.path(), addr, Duration::from_secs(60));
    engine.get(&hashes[..1], &[], Urgency::Demand, 0).unwrap();

    // The server goes away; a reader asks meanwhile; the server comes back on the same port.
    endpoint.close(quinn::VarInt::from_u32(0), b"restart");
    rt.block_on(endpoint.wait_idle());
    drop(endpoint);
    std::thread::sleep(Duration::from_millis(200));
    let reader = {
        let (engine, hashes) = (engine.clone(), hashes.clone());
        std::thread::spawn(move || engine.get(&hashes[1..], &[], Urgency::Demand, 0))
    };
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!reader.is_finished(), "the read waits while the server is away");
    let _back = serve(&rt, &root, store, &addr.to_string());
    let got = reader.join().unwrap().expect("the waiting read completes once the server is back");
    assert_eq!(got.len(), 3);
    assert!(src.stats().reconnects.load(Ordering::SeqCst) >= 1);
}

#[test]
fn a_server_gone_past_the_stall_timeout_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("server");
    let (store, hashes) = store_with_blocks(&root, 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (endpoint, addr) = serve(&rt, &root, Arc::new(store), "127.0.0.1:0");
    endpoint.close(quinn::VarInt::from_u32(0), b"gone");
    rt.block_on(endpoint.wait_idle());
    let (engine, _src) = source(dir.path(), addr, Duration::from_secs(2));
    let err = engine.get(&hashes, &[], Urgency::Demand, 0).unwrap_err();
    assert_eq!(err.kind, FetchErrorKind::Unavailable);
    assert!(err.message.contains("stall timeout") && err.message.contains(&addr.to_string()), "{err}");
}

#[test]
fn a_server_that_accepts_a_request_and_never_answers_fails_the_read_after_the_stall_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("server");
    let (store, hashes) = store_with_blocks(&root, 2);
    let backend = Arc::new(SlowCounting { store, reads: AtomicU64::new(0), hang: AtomicBool::new(false) });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_endpoint, addr) = serve(&rt, &root, backend.clone(), "127.0.0.1:0");
    let (engine, _src) = source(dir.path(), addr, Duration::from_secs(1));
    engine.get(&hashes[..1], &[], Urgency::Demand, 0).expect("the server answers at first");
    backend.hang.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let err = engine.get(&hashes[1..], &[], Urgency::Demand, 0).unwrap_err();
    let took = t.elapsed();
    backend.hang.store(false, Ordering::SeqCst);
    assert_eq!(err.kind, FetchErrorKind::Unavailable, "{err}");
    assert!(err.message.contains("stall timeout"), "{err}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(5), "failed after {took:?}");
    rt.shutdown_background();
}
