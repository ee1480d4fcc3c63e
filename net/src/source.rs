//! [`RemoteSource`]: the QUIC client as the mount's `BlockSource`. Blocking API for FUSE
//! worker threads; one transfer per hash however many readers ask; a lost server is a
//! pause (reconnect with backoff) until the stall timeout, not an error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use capsule_fs::{BlockSource, FetchError, FetchErrorKind, Urgency};
use capsule_images::Hash;
use tracing::{info, warn};

use crate::client::{Client, ConnectOptions, RemoteUrl};
use crate::error::{Error, ErrorKind, Result};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Counters, for `.capsule/stats.json` and tests.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// GetBlocks requests sent (retries included).
    pub requests: AtomicU64,
    /// Blocks received and verified.
    pub blocks: AtomicU64,
    /// Their encoded bytes.
    pub bytes: AtomicU64,
    /// Connections made after the first.
    pub reconnects: AtomicU64,
}

#[derive(Debug, Default)]
struct Flight {
    result: Mutex<Option<std::result::Result<Vec<u8>, FetchError>>>,
    done: Condvar,
}

impl Flight {
    fn set(&self, r: std::result::Result<Vec<u8>, FetchError>) {
        if let Ok(mut slot) = self.result.lock() {
            *slot = Some(r);
        }
        self.done.notify_all();
    }

    fn wait(&self) -> std::result::Result<Vec<u8>, FetchError> {
        let unavailable = || FetchError { kind: FetchErrorKind::Unavailable, message: "fetch abandoned".into() };
        let Ok(mut slot) = self.result.lock() else { return Err(unavailable()) };
        loop {
            if let Some(r) = slot.as_ref() {
                return r.clone();
            }
            slot = match self.done.wait(slot) {
                Ok(s) => s,
                Err(_) => return Err(unavailable()),
            };
        }
    }
}

/// Blocks from a capsule server.
#[derive(Debug)]
pub struct RemoteSource {
    url: RemoteUrl,
    opts: ConnectOptions,
    runtime: tokio::runtime::Runtime,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
    inflight: Mutex<HashMap<Hash, Arc<Flight>>>,
    stall_timeout: Duration,
    /// What it did so far.
    pub stats: SourceStats,
}

fn retryable(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Unavailable | ErrorKind::Io)
}

fn fetch_error(e: &Error) -> FetchError {
    let kind = match e.kind() {
        ErrorKind::NotFound => FetchErrorKind::NotFound,
        ErrorKind::Corrupt => FetchErrorKind::Corrupt,
        ErrorKind::Denied | ErrorKind::Fingerprint => FetchErrorKind::Denied,
        _ => FetchErrorKind::Unavailable,
    };
    FetchError { kind, message: e.to_string() }
}

impl RemoteSource {
    /// A source for `url`; nothing is connected until the first fetch. A fetch that cannot
    /// reach the server waits (retrying) up to `stall_timeout`, then fails.
    pub fn new(url: RemoteUrl, opts: ConnectOptions, stall_timeout: Duration) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("capsule-net")
            .enable_all()
            .build()
            .map_err(|e| Error::new(ErrorKind::Io, format!("starting the network runtime: {e}")))?;
        Ok(Self {
            url,
            opts,
            runtime,
            client: tokio::sync::Mutex::new(None),
            inflight: Mutex::new(HashMap::new()),
            stall_timeout,
            stats: SourceStats::default(),
        })
    }

    async fn connected(&self) -> Result<Arc<Client>> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.connection().close_reason().is_none() {
                return Ok(c.clone());
            }
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        let c = Arc::new(Client::connect(&self.url, &self.opts).await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn fetch_retrying(&self, hashes: &[Hash], urgency: Urgency) -> Result<Vec<(Hash, Vec<u8>)>> {
        let start = Instant::now();
        let mut delay = FIRST_BACKOFF;
        let priority = u8::from(urgency == Urgency::Demand);
        loop {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let attempt = async { self.connected().await?.get_blocks(hashes.to_vec(), priority).await };
            match attempt.await {
                Ok(blocks) => {
                    if delay > FIRST_BACKOFF {
                        info!(server = %self.url.host_port(), "server reachable again after {:.1} s", start.elapsed().as_secs_f64());
                    }
                    return Ok(blocks);
                }
                Err(e) if retryable(e.kind()) => {
                    if let Some(c) = self.client.lock().await.take() {
                        c.connection().close(quinn::VarInt::from_u32(0), b"retry");
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    if start.elapsed() + delay > self.stall_timeout {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            format!("server {} unreachable for {:.0} s (stall timeout): {e}", self.url.host_port(), start.elapsed().as_secs_f64()),
                        ));
                    }
                    warn!(server = %self.url.host_port(), "fetch of {} block(s) waits for the server: {e}; retrying in {delay:?}", hashes.len());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl BlockSource for RemoteSource {
    fn counters(&self) -> capsule_fs::SourceCounters {
        capsule_fs::SourceCounters {
            blocks: self.stats.blocks.load(Ordering::Relaxed),
            bytes: self.stats.bytes.load(Ordering::Relaxed),
            reconnects: self.stats.reconnects.load(Ordering::Relaxed),
        }
    }

    fn fetch(&self, hashes: &[Hash], urgency: Urgency) -> std::result::Result<Vec<(Hash, Vec<u8>)>, FetchError> {
        // Join flights already in the air; lead the rest.
        let mut lead = Vec::new();
        let mut flights = Vec::with_capacity(hashes.len());
        {
            let mut map = self.inflight.lock().map_err(|_| FetchError { kind: FetchErrorKind::Unavailable, message: "fetch state poisoned".into() })?;
            for h in hashes {
                let flight = map.entry(*h).or_insert_with(|| {
                    lead.push(*h);
                    Arc::new(Flight::default())
                });
                flights.push(flight.clone());
            }
        }
        if !lead.is_empty() {
            let result = self.runtime.block_on(self.fetch_retrying(&lead, urgency));
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(blocks) => {
                    for (h, encoded) in blocks {
                        self.stats.blocks.fetch_add(1, Ordering::Relaxed);
                        self.stats.bytes.fetch_add(encoded.len() as u64, Ordering::Relaxed);
                        if let Some(f) = map.remove(&h) {
                            f.set(Ok(encoded));
                        }
                    }
                    for h in &lead {
                        if let Some(f) = map.remove(h) {
                            f.set(Err(FetchError { kind: FetchErrorKind::NotFound, message: format!("server did not send block {h}") }));
                        }
                    }
                }
                Err(e) => {
                    let err = fetch_error(&e);
                    for h in &lead {
                        if let Some(f) = map.remove(h) {
                            f.set(Err(err.clone()));
                        }
                    }
                }
            }
        }
        hashes.iter().zip(flights).map(|(h, f)| f.wait().map(|encoded| (*h, encoded))).collect()
    }
}
