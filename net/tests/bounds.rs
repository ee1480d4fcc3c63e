//! Server resource bounds over real QUIC on loopback: caps on connections (in all and per
//! address), a deadline and a size cap on the request header, and few streams and a small
//! window before anything is authorized.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use capsule_images::{CapsuleSpec, NoProgress, Store};
use capsule_net::frame::{decode_control, Frame, MAGIC, VERSION};
use capsule_net::io::FrameReader;
use capsule_net::proto::Response;
use capsule_net::{Client, ConnectOptions, ErrorKind, RemoteUrl, ServeOptions, Server};

struct Fixture {
    dir: tempfile::TempDir,
    url: RemoteUrl,
    opts: ConnectOptions,
}

/// A public-read server over a store holding capsule `a`, with the given bounds.
async fn serve(max_connections: usize, header_timeout: Duration) -> Fixture {
    serve_with(max_connections, capsule_net::server::DEFAULT_MAX_PER_IP, header_timeout).await
}

async fn serve_with(max_connections: usize, max_per_ip: usize, header_timeout: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("server");
    let store = Store::open(&root).unwrap();
    let path = dir.path().join("a.raw");
    std::fs::write(&path, vec![7u8; 256 << 10]).unwrap();
    capsule_images::import_capsule(&store, &CapsuleSpec { name: "a".into(), disks: vec![("root".into(), path)], ..Default::default() }, &NoProgress).unwrap();
    let server = Server::bind(capsule_net::tls::load_or_create_identity(&root).unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let opts = ServeOptions { max_connections, max_per_ip, header_timeout, ..ServeOptions::new(addr, true, root) };
    tokio::spawn(server.run(Arc::new(store), opts));
    let url = RemoteUrl::parse(&format!("capsule://{addr}")).unwrap();
    let known = dir.path().join("known_servers");
    Fixture { dir, url, opts: ConnectOptions { token: None, fingerprint: None, known_servers: Some(known), connect_timeout: None } }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_request_header_loses_its_connection_at_the_deadline() {
    let f = serve(16, Duration::from_millis(1500)).await;
    let slow = Client::connect(&f.url, &f.opts).await.unwrap();
    let honest = Client::connect(&f.url, &f.opts).await.unwrap();
    // (A connection must make a request within the deadline too: both have, so what is
    // tested here is the deadline of a stream's header.)
    assert_eq!(honest.list_refs("").await.unwrap().len(), 1);
    assert_eq!(slow.list_refs("").await.unwrap().len(), 1);
    // Five bytes of a frame header, then nothing (the stream exists for the server once
    // bytes arrive on it).
    let (mut send, _recv) = slow.connection().open_bi().await.unwrap();
    send.write_all(&MAGIC[..]).await.unwrap();
    send.write_all(&[VERSION]).await.unwrap();
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(slow.connection().close_reason().is_none(), "closed before the deadline");
    let reason = tokio::time::timeout(Duration::from_secs(10), slow.connection().closed()).await.expect("the server never dropped the silent client");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5), "dropped after {waited:?}");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => assert!(String::from_utf8_lossy(&c.reason).contains("no request header within"), "{c:?}"),
        other => panic!("closed for another reason: {other}"),
    }
    // Others are served as before.
    assert_eq!(honest.list_refs("").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_is_refused_before_its_payload_is_read() {
    let f = serve(16, Duration::from_secs(20)).await;
    let c = Client::connect(&f.url, &f.opts).await.unwrap();
    // A request frame declaring 1 MiB: under the codec's cap for control frames, over the
    // header cap. Only its 12-byte header is sent, and the stream stays open.
    let (mut send, recv) = c.connection().open_bi().await.unwrap();
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&[VERSION, 1, 0, 0]);
    header.extend_from_slice(&(1u32 << 20).to_le_bytes());
    send.write_all(&header).await.unwrap();
    let mut reader = FrameReader::new(recv);
    let answer = tokio::time::timeout(Duration::from_secs(5), reader.next()).await.expect("the server waited for the payload");
    match answer.unwrap() {
        Some(Frame::Response(p)) => match decode_control::<Response>(&p).unwrap() {
            Response::Error { kind, message } => {
                assert_eq!(kind, ErrorKind::Protocol);
                assert!(message.contains(&format!("frame of {} bytes exceeds the {} accepted here", 1 << 20, capsule_net::server::MAX_HEADER)), "{message}");
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert_eq!(c.list_refs("").await.unwrap().len(), 1, "only that stream ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_until_one_ends() {
    let f = serve(2, Duration::from_secs(20)).await;
    let a = Client::connect(&f.url, &f.opts).await.unwrap();
    let b = Client::connect(&f.url, &f.opts).await.unwrap();
    assert_eq!(a.list_refs("").await.unwrap().len() + b.list_refs("").await.unwrap().len(), 2);
    let err = Client::connect(&f.url, &f.opts).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.to_string().contains("refused"), "{err}");
    a.close().await;
    // The server notices the close and frees the slot.
    let start = Instant::now();
    let c = loop {
        match Client::connect(&f.url, &f.opts).await {
            Ok(c) => break c,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(5), "the slot never came back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(c.list_refs("").await.unwrap().len(), 1);
    assert_eq!(b.list_refs("").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_only_its_share_of_connections() {
    let f = serve_with(16, 2, Duration::from_secs(20)).await;
    let from = |last: u8| Some(std::net::SocketAddr::from(([127, 0, 0, last], 0)));
    let a = Client::connect_from(&f.url, &f.opts, from(1)).await.unwrap();
    let b = Client::connect_from(&f.url, &f.opts, from(1)).await.unwrap();
    let err = Client::connect_from(&f.url, &f.opts, from(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.to_string().contains("refused"), "{err}");
    // Another address is served; the first gets a slot back when one of its own ends.
    let c = Client::connect_from(&f.url, &f.opts, from(2)).await.unwrap();
    assert_eq!(c.list_refs("").await.unwrap().len(), 1);
    a.close().await;
    let start = Instant::now();
    let d = loop {
        match Client::connect_from(&f.url, &f.opts, from(1)).await {
            Ok(d) => break d,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(5), "the address's slot never came back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(d.list_refs("").await.unwrap().len() + b.list_refs("").await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_at_the_deadline_and_an_unauthorized_one_gets_few_streams() {
    let f = serve(16, Duration::from_millis(1500)).await;
    let idle = Client::connect(&f.url, &f.opts).await.unwrap();
    let busy = Client::connect(&f.url, &f.opts).await.unwrap();
    // Before any request: two streams, no third (it waits for the server's credit).
    let s1 = busy.connection().open_bi().await.unwrap();
    let s2 = busy.connection().open_bi().await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(500), busy.connection().open_bi()).await.is_err(), "a third stream before any authorized request");
    drop((s1, s2));
    // One authorized request opens the connection up: many streams at once.
    assert_eq!(busy.list_refs("").await.unwrap().len(), 1);
    let mut streams = Vec::new();
    for _ in 0..16 {
        streams.push(tokio::time::timeout(Duration::from_secs(5), busy.connection().open_bi()).await.expect("streams after authorization").unwrap());
    }
    drop(streams);
    // The idle one never asked anything: closed at the deadline, naming why.
    let reason = tokio::time::timeout(Duration::from_secs(10), idle.connection().closed()).await.expect("the idle connection was kept");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => assert!(String::from_utf8_lossy(&c.reason).contains("no request within"), "{c:?}"),
        other => panic!("closed for another reason: {other}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(busy.list_refs("").await.unwrap().len(), 1, "the busy one stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_of_more_blocks_than_a_batch_allows_is_refused_and_stores_nothing() {
    let f = serve(16, Duration::from_secs(20)).await;
    let root = f.dir.path().join("server");
    let (token, _) = capsule_net::auth::create_token(&root, capsule_net::auth::Scope::Write, "").unwrap();
    let c = Client::connect(&f.url, &ConnectOptions { token: Some(token), ..f.opts.clone() }).await.unwrap();
    let blocks: Vec<_> = (0..=capsule_net::proto::MAX_BATCH as u32)
        .map(|i| {
            let raw = i.to_le_bytes().repeat(16);
            (capsule_images::Hash::of(&raw), capsule_images::block::encode_with_level(&raw, 1).unwrap())
        })
        .collect();
    let err = c.put_blocks(blocks.clone()).await.unwrap_err();
    assert!(err.to_string().contains("blocks in one upload"), "{err}");
    let store = Store::open(&root).unwrap();
    assert!(blocks.iter().all(|(h, _)| !store.has_block(h)), "the refused upload's blocks were stored");
    assert_eq!(c.put_blocks(blocks[..100].to_vec()).await.unwrap(), 100, "a batch under the cap is stored");
    assert!(blocks[..100].iter().all(|(h, _)| store.has_block(h)));
}
