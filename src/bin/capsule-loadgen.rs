//! `capsule-loadgen`: hostile load on a capsule server, for `make bench-load`. Holds
//! `--idle N` connections that never ask anything and `--slow N` clients that send a
//! request header one byte a second and never finish it, each from `--per-ip` connections
//! per loopback address (127.0.1.x and 127.0.2.x); whatever the server closes is opened
//! again. Prints a status line every `--every` seconds until killed or `--duration` ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsule_net::frame::{MAGIC, VERSION};
use capsule_net::{Client, ConnectOptions, RemoteUrl};

#[derive(Default)]
struct Counters {
    idle_live: AtomicU64,
    slow_live: AtomicU64,
    connects: AtomicU64,
    refused: AtomicU64,
    closed_by_server: AtomicU64,
    header_bytes: AtomicU64,
}

fn main() -> Result<()> {
    let mut url = None;
    let (mut idle, mut slow, mut per_ip, mut every, mut duration) = (1000usize, 100usize, 25usize, 5u64, 0u64);
    let mut known = std::env::temp_dir().join(format!("capsule-loadgen-{}-known_servers", std::process::id()));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--url" => url = Some(v()?),
            "--idle" => idle = v()?.parse()?,
            "--slow" => slow = v()?.parse()?,
            "--per-ip" => per_ip = v()?.parse()?,
            "--every" => every = v()?.parse()?,
            "--duration" => duration = v()?.parse()?,
            "--known-servers" => known = v()?.into(),
            _ => bail!("unknown argument {a}; usage: capsule-loadgen --url capsule://HOST:PORT [--idle N] [--slow N] [--per-ip N] [--every S] [--duration S]"),
        }
    }
    let url = RemoteUrl::parse(&url.context("--url capsule://HOST:PORT is required")?)?;
    let opts = ConnectOptions { token: None, fingerprint: None, known_servers: Some(known), connect_timeout: None };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let counters = Arc::new(Counters::default());
        let from = |net: u8, i: usize| SocketAddr::from(([127, 0, net, (1 + i / per_ip.max(1)) as u8], 0));
        // Trust the server once, before the crowd connects.
        Client::connect(&url, &opts).await?.close().await;
        for i in 0..idle {
            tokio::spawn(idle_client(url.clone(), opts.clone(), from(1, i), counters.clone()));
        }
        for i in 0..slow {
            tokio::spawn(slow_client(url.clone(), opts.clone(), from(2, i), counters.clone()));
        }
        let start = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(every)).await;
            let c = &counters;
            println!(
                "loadgen t={:.0}s idle_live={} slow_live={} connects={} refused={} closed_by_server={} header_bytes={}",
                start.elapsed().as_secs_f64(),
                c.idle_live.load(Ordering::Relaxed),
                c.slow_live.load(Ordering::Relaxed),
                c.connects.load(Ordering::Relaxed),
                c.refused.load(Ordering::Relaxed),
                c.closed_by_server.load(Ordering::Relaxed),
                c.header_bytes.load(Ordering::Relaxed)
            );
            if duration > 0 && start.elapsed() >= Duration::from_secs(duration) {
                return Ok(());
            }
        }
    })
}

async fn connect(url: &RemoteUrl, opts: &ConnectOptions, bind: SocketAddr, c: &Counters) -> Client {
    loop {
        match Client::connect_from(url, opts, Some(bind)).await {
            Ok(client) => {
                c.connects.fetch_add(1, Ordering::Relaxed);
                return client;
            }
            Err(_) => {
                c.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Connects and asks nothing; again when the server closes it.
async fn idle_client(url: RemoteUrl, opts: ConnectOptions, bind: SocketAddr, c: Arc<Counters>) {
    loop {
        let client = connect(&url, &opts, bind, &c).await;
        c.idle_live.fetch_add(1, Ordering::Relaxed);
        client.connection().closed().await;
        c.idle_live.fetch_sub(1, Ordering::Relaxed);
        c.closed_by_server.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sends a request header a byte a second and never finishes it.
async fn slow_client(url: RemoteUrl, opts: ConnectOptions, bind: SocketAddr, c: Arc<Counters>) {
    // A request frame declaring a 1 KiB payload: its 12 header bytes, then payload bytes.
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&[VERSION, 1, 0, 0]);
    header.extend_from_slice(&1024u32.to_le_bytes());
    header.resize(12 + 1024, 0);
    loop {
        let client = connect(&url, &opts, bind, &c).await;
        c.slow_live.fetch_add(1, Ordering::Relaxed);
        if let Ok((mut send, _recv)) = client.connection().open_bi().await {
            for b in &header {
                if send.write_all(std::slice::from_ref(b)).await.is_err() {
                    break;
                }
                c.header_bytes.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = client.connection().closed() => break,
                }
            }
        }
        client.connection().closed().await;
        c.slow_live.fetch_sub(1, Ordering::Relaxed);
        c.closed_by_server.fetch_add(1, Ordering::Relaxed);
    }
}
