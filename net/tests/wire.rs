//! In-process server and clients over real QUIC on loopback: hostile frames end only their
//! own stream, and two writers racing for one ref cannot clobber each other.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use capsule_images::{CapsuleSpec, NoProgress, Store};
use capsule_net::frame::{self, decode_control, Frame, MAGIC, VERSION};
use capsule_net::io::FrameReader;
use capsule_net::proto::Response;
use capsule_net::{Client, ConnectOptions, ErrorKind, RemoteUrl, ServeOptions, Server};

struct Fixture {
    _dir: tempfile::TempDir,
    url: RemoteUrl,
    opts: ConnectOptions,
    dir: std::path::PathBuf,
}

/// A served store holding capsules `a` and `b` (a few MiB each), and a write token.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("server");
    let store = Store::open(&root).unwrap();
    for (name, seed) in [("a", 1u8), ("b", 2u8)] {
        let path = dir.path().join(format!("{name}.raw"));
        let data: Vec<u8> = (0..6u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed).collect();
        std::fs::write(&path, data).unwrap();
        let spec = CapsuleSpec { name: name.into(), disks: vec![("root".into(), path)], ..Default::default() };
        capsule_images::import_capsule(&store, &spec, &NoProgress).unwrap();
    }
    let token = capsule_net::auth::create_token(&root, capsule_net::auth::Scope::Write, "").unwrap().0;
    let identity = capsule_net::tls::load_or_create_identity(&root).unwrap();
    let server = Server::bind(identity, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let opts = ServeOptions::new(addr, false, root);
    tokio::spawn(server.run(Arc::new(store), opts));
    let url = RemoteUrl::parse(&format!("capsule://{addr}")).unwrap();
    let known = dir.path().join("known_servers");
    let dir_path = dir.path().to_path_buf();
    Fixture { _dir: dir, url, opts: ConnectOptions { token: Some(token), fingerprint: None, known_servers: Some(known), connect_timeout: None }, dir: dir_path }
}

/// Sends `bytes` on a fresh stream and returns what the server answered.
async fn send_raw(client: &Client, bytes: Vec<u8>) -> Option<Response> {
    let (mut send, recv) = client.connection().open_bi().await.unwrap();
    let _ = send.write_all(&bytes).await;
    let _ = send.finish();
    let mut reader = FrameReader::new(recv);
    match reader.next().await {
        Ok(Some(Frame::Response(p))) => Some(decode_control(&p).unwrap()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_end_only_their_stream_while_an_honest_pull_completes() {
    let f = fixture().await;
    let honest = Client::connect(&f.url, &f.opts).await.unwrap();
    let hostile = Client::connect(&f.url, &f.opts).await.unwrap();
    let pull_store = Store::open(f.dir.join("client")).unwrap();
    let pull = async { capsule_net::pull(&honest, "a", &pull_store, "a", &NoProgress).await };

    let attacks = async {
        let mut answers = Vec::new();
        // Garbage.
        answers.push(send_raw(&hostile, b"this is not a capsule frame at all, just noise".to_vec()).await);
        // A valid header declaring more than the cap.
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&[VERSION, 1, 0, 0]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        answers.push(send_raw(&hostile, huge).await);
        // A truncated request.
        let full = frame::encode(&Frame::Request(vec![7; 200])).unwrap();
        answers.push(send_raw(&hostile, full[..100].to_vec()).await);
        // A well-framed request whose payload is not a request.
        answers.push(send_raw(&hostile, frame::encode(&Frame::Request(vec![0xff; 40])).unwrap()).await);
        // A block where a request belongs.
        answers.push(send_raw(&hostile, frame::encode(&Frame::End).unwrap()).await);
        answers
    };
    let (pulled, answers) = tokio::join!(pull, attacks);
    let (_, report) = pulled.unwrap();
    assert!(report.blocks_transferred > 0);
    assert!(capsule_images::verify_capsule(&pull_store, "a", &pull_store.resolve("a").unwrap()).ok());
    for (i, a) in answers.iter().enumerate() {
        match a {
            Some(Response::Error { kind, message }) => assert_eq!(*kind, ErrorKind::Protocol, "attack {i}: {message}"),
            other => panic!("attack {i}: expected a protocol error, got {other:?}"),
        }
    }
    // The hostile connection itself still works for well-formed requests.
    assert!(hostile.get_ref("b").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_racing_for_one_ref_one_wins_the_other_gets_a_conflict() {
    let f = fixture().await;
    let c1 = Client::connect(&f.url, &f.opts).await.unwrap();
    let c2 = Client::connect(&f.url, &f.opts).await.unwrap();
    let a = c1.get_ref("a").await.unwrap().unwrap();
    let b = c2.get_ref("b").await.unwrap().unwrap();
    // Both read the ref before either writes: the window a real race opens.
    let old1 = c1.get_ref("shared").await.unwrap();
    let old2 = c2.get_ref("shared").await.unwrap();
    let (r1, r2) = tokio::join!(c1.update_ref("shared", old1, a), c2.update_ref("shared", old2, b));
    let (winner, loser) = match (&r1, &r2) {
        (Ok(()), Err(e)) => (a, e),
        (Err(e), Ok(())) => (b, e),
        _ => panic!("exactly one must win: {r1:?} {r2:?}"),
    };
    assert_eq!(loser.kind(), ErrorKind::Conflict);
    assert!(loser.to_string().contains("another writer moved it"), "{loser}");
    assert_eq!(c1.get_ref("shared").await.unwrap(), Some(winner));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ref_to_an_incomplete_capsule_is_refused() {
    let f = fixture().await;
    let c = Client::connect(&f.url, &f.opts).await.unwrap();
    let err = c.update_ref("ghost", None, capsule_images::Hash([9; 32])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(c.get_ref("ghost").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_path_brings_every_page_down_to_the_block_and_the_block_in_one_request() {
    let f = fixture().await;
    let store = Store::open(f.dir.join("server")).unwrap();
    let manifest = store.manifest(&store.resolve("a").unwrap()).unwrap();
    let image = manifest.disks[0].image;
    let layer = store.layer(&image.top.unwrap()).unwrap();
    let index = 70;
    let want = capsule_images::map::lookup(&store, &layer.map, index).unwrap();
    let Some(capsule_images::Entry::Data(block)) = want else { panic!("block {index} of a is data: {want:?}") };

    let c = Client::connect(&f.url, &f.opts).await.unwrap();
    let reply = c.get_path(layer.map, index, true, &|_| true).await.unwrap();
    assert_eq!(reply.pages.len(), usize::from(layer.map.height), "one page per tree level");
    assert_eq!(reply.pages[0].0, layer.map.root.unwrap(), "top first");
    let (hash, encoded) = reply.block.expect("the block came along");
    assert_eq!(hash, block);
    assert_eq!(capsule_images::block::decode(&hash, &encoded).unwrap().len(), 1 << image.block_size_log2);
    assert!(c.get_path(layer.map, index, false, &|_| true).await.unwrap().block.is_none(), "only when asked");
    let held = c.get_path(layer.map, index, true, &|h| *h != block).await.unwrap();
    assert!(held.block.is_none() && held.pages.len() == reply.pages.len(), "a block the client holds is left unread");

    // Hostile or stale requests fail alone, with a kind the client can act on.
    let too_high = capsule_images::map::MapRoot { height: 7, ..layer.map };
    assert_eq!(c.get_path(too_high, index, true, &|_| true).await.unwrap_err().kind(), ErrorKind::InvalidInput);
    let unknown = capsule_images::map::MapRoot { root: Some(capsule_images::Hash([7; 32])), ..layer.map };
    assert_eq!(c.get_path(unknown, index, true, &|_| true).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert!(c.get_ref("a").await.unwrap().is_some(), "the connection lives on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_asked_for_again_is_checked_so_a_damaged_copy_is_named_reported_missing_and_healed_by_a_put() {
    let f = fixture().await;
    let store = Store::open(f.dir.join("server")).unwrap();
    let (_, blocks) = store.closure(&store.resolve("a").unwrap()).unwrap();
    let h = blocks[3];
    let sound = store.read_encoded_block(&h).unwrap();
    // Damage the block where it is packed (found by its bytes: the pack format is the store's).
    let pack = std::fs::read_dir(f.dir.join("server/packed"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "pack") && std::fs::read(p).unwrap().windows(sound.len()).any(|w| w == sound))
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = bytes.windows(sound.len()).position(|w| w == sound).unwrap() + sound.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&pack, &bytes).unwrap();

    let c = Client::connect(&f.url, &f.opts).await.unwrap();
    // Served as stored: the client finds it corrupt.
    assert_eq!(c.get_blocks(vec![h], 0).await.unwrap_err().kind(), ErrorKind::Corrupt);
    // Asked again, the server checks its copy, finds no sound one, and says so.
    let err = c.get_blocks(vec![h], 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().starts_with("server:"), "the server's own check names it: {err}");
    // It no longer counts the damaged copy: a push sends the block, and it is served sound.
    assert_eq!(c.missing(vec![h], false).await.unwrap(), vec![h]);
    c.put_blocks(vec![(h, sound.clone())]).await.unwrap();
    let fresh = Client::connect(&f.url, &f.opts).await.unwrap();
    assert_eq!(fresh.get_blocks(vec![h], 0).await.unwrap(), vec![(h, sound)]);
}
