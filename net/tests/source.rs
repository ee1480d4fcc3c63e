//! `RemoteSource` against an in-process server over real QUIC: one transfer per hash
//! however many readers ask; a server that goes away and comes back is a pause.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use capsule_fs::{BlockSource, FetchErrorKind, Urgency};
use capsule_images::envelope::ObjectKind;
use capsule_images::{Hash, Store};
use capsule_net::backend::Backend;
use capsule_net::{ConnectOptions, RemoteSource, RemoteUrl, ServeOptions, Server};

/// The store, counting block reads and holding each GetBlocks a moment so that
/// concurrent readers overlap.
struct SlowCounting {
    store: Store,
    reads: AtomicU64,
}

impl Backend for SlowCounting {
    fn read_encoded_block(&self, hash: &Hash) -> capsule_net::Result<Vec<u8>> {
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
            capsule_images::Entry::Zero => unreachable!(),
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
    let opts = ServeOptions { listen: addr, public_read: true, store_root: root.to_path_buf() };
    rt.spawn(server.run(backend, opts));
    (endpoint, addr)
}

fn source(dir: &std::path::Path, addr: std::net::SocketAddr, stall: Duration) -> RemoteSource {
    let url = RemoteUrl::parse(&format!("capsule://{addr}")).unwrap();
    let opts = ConnectOptions { token: None, fingerprint: None, known_servers: Some(dir.join("known_servers")) };
    RemoteSource::new(url, opts, stall).unwrap()
}

#[test]
fn concurrent_readers_of_the_same_blocks_cause_one_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("server");
    let (store, hashes) = store_with_blocks(&root, 16);
    let backend = Arc::new(SlowCounting { store, reads: AtomicU64::new(0) });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_endpoint, addr) = serve(&rt, &root, backend.clone(), "127.0.0.1:0");
    let src = Arc::new(source(dir.path(), addr, Duration::from_secs(10)));

    let readers = 8;
    let barrier = Arc::new(Barrier::new(readers));
    let threads: Vec<_> = (0..readers)
        .map(|_| {
            let (src, barrier, hashes) = (src.clone(), barrier.clone(), hashes.clone());
            std::thread::spawn(move || {
                barrier.wait();
                src.fetch(&hashes, Urgency::Demand).unwrap()
            })
        })
        .collect();
    for t in threads {
        let got = t.join().unwrap();
        assert_eq!(got.iter().map(|(h, _)| *h).collect::<Vec<_>>(), hashes);
        for (h, encoded) in got {
            capsule_images::block::decode(&h, &encoded).unwrap();
        }
    }
    assert_eq!(backend.reads.load(Ordering::SeqCst), 16, "each block read from the server exactly once");
    assert_eq!(src.stats.blocks.load(Ordering::SeqCst), 16);
}

#[test]
fn a_server_that_goes_away_and_comes_back_is_a_pause_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("server");
    let (store, hashes) = store_with_blocks(&root, 4);
    let store: Arc<dyn Backend> = Arc::new(store);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (endpoint, addr) = serve(&rt, &root, store.clone(), "127.0.0.1:0");
    let src = Arc::new(source(dir.path(), addr, Duration::from_secs(60)));
    src.fetch(&hashes[..1], Urgency::Demand).unwrap();

    // The server goes away; a reader asks meanwhile; the server comes back on the same port.
    endpoint.close(quinn::VarInt::from_u32(0), b"restart");
    rt.block_on(endpoint.wait_idle());
    drop(endpoint);
    std::thread::sleep(Duration::from_millis(200));
    let reader = {
        let (src, hashes) = (src.clone(), hashes.clone());
        std::thread::spawn(move || src.fetch(&hashes[1..], Urgency::Demand))
    };
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!reader.is_finished(), "the read waits while the server is away");
    let _back = serve(&rt, &root, store, &addr.to_string());
    let got = reader.join().unwrap().expect("the waiting read completes once the server is back");
    assert_eq!(got.len(), 3);
    assert!(src.stats.reconnects.load(Ordering::SeqCst) >= 1);
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
    let src = source(dir.path(), addr, Duration::from_secs(2));
    let err = src.fetch(&hashes, Urgency::Demand).unwrap_err();
    assert_eq!(err.kind, FetchErrorKind::Unavailable);
    assert!(err.message.contains("stall timeout") && err.message.contains(&addr.to_string()), "{err}");
}
