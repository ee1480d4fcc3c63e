//! [`RemoteSource`]: a capsule server as the fetch engine's `BlockSource`. Each batch is
//! one QUIC stream on one shared connection, started without blocking and delivered a
//! block at a time as frames arrive; the engine decides what to ask, verifies what comes
//! and retries what a lost link dropped. Here: connecting (bounded in time), reconnecting
//! after a loss, and counting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsule_fetch::{BatchRequest, BatchSink, BlockSource, FetchError, FetchErrorKind, PathReply, SourceCounters};
use capsule_images::map::MapRoot;
use capsule_images::Hash;
use tracing::{debug, info, warn};

use crate::client::{Client, ConnectOptions, RemoteUrl};
use crate::error::{Error, ErrorKind, Result};

/// Longest wait for one connection attempt (the engine retries with backoff).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A connection silent this long (or [`SILENCE_RTTS`] round trips, if longer) is taken for
/// dead. A live peer answers the 1 s keep-alives, so this notices a dead server in a few
/// seconds instead of the 15 s idle timeout; a false alarm costs one reconnect.
const SILENCE_FLOOR: Duration = Duration::from_secs(3);
const SILENCE_RTTS: u32 = 8;
const SILENCE_CHECK: Duration = Duration::from_millis(250);

/// Counters, for `.capsule/stats.json` and tests.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Batch requests started (retries included).
    pub requests: AtomicU64,
    /// Blocks received.
    pub blocks: AtomicU64,
    /// Their encoded bytes.
    pub bytes: AtomicU64,
    /// Connections made after the first.
    pub reconnects: AtomicU64,
    /// Metadata (map page) requests, map path requests included.
    pub object_requests: AtomicU64,
    /// Map path requests (pages and the block they lead to, in one).
    pub path_requests: AtomicU64,
    /// Set once the server refused a path request (it predates them): not asked again.
    paths_refused: std::sync::atomic::AtomicBool,
    /// UDP bytes received on connections already closed.
    wire_closed: AtomicU64,
    /// UDP datagrams received on connections already closed.
    datagrams_closed: AtomicU64,
    /// The current connection's smallest round trip as QUIC measured it, in microseconds
    /// (0: none yet): the handshake's, then the smoothed one at quiet moments.
    path_rtt_us: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Shared {
    url: RemoteUrl,
    opts: ConnectOptions,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
    /// The connection now, for counters without awaiting.
    current: Mutex<Option<Arc<Client>>>,
    stall_timeout: Duration,
    stats: SourceStats,
    connected_once: AtomicU64,
    /// Index of the server (of several in the URL) to try first on the next connect: the
    /// last one that answered, or the one after it once its connection failed.
    next_server: std::sync::atomic::AtomicUsize,
}

/// Blocks from a capsule server.
#[derive(Debug)]
pub struct RemoteSource {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Runtime,
    tasks: Arc<Mutex<HashMap<u64, tokio::task::AbortHandle>>>,
}

fn retryable(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Unavailable | ErrorKind::Io)
}

fn fetch_error(e: &Error) -> FetchError {
    let kind = match e.kind() {
        ErrorKind::NotFound => FetchErrorKind::NotFound,
        ErrorKind::Corrupt | ErrorKind::Protocol => FetchErrorKind::Corrupt,
        ErrorKind::Denied | ErrorKind::Fingerprint => FetchErrorKind::Denied,
        _ => FetchErrorKind::Unavailable,
    };
    FetchError::new(kind, e.report())
}

impl Shared {
    async fn connected(&self) -> Result<Arc<Client>> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.connection().close_reason().is_none() {
                return Ok(c.clone());
            }
            self.retire(c);
            let next = (self.next_server.load(Ordering::Relaxed) + 1) % self.url.server_count();
            self.next_server.store(next, Ordering::Relaxed);
            *slot = None;
        }
        // Each server in turn, from the preferred one; each within the connect timeout.
        let (start, limit) = (self.next_server.load(Ordering::Relaxed), CONNECT_TIMEOUT.min(self.stall_timeout));
        let mut failure = None;
        let mut connected = None;
        for (i, server) in self.url.servers_from(start).into_iter().enumerate() {
            match tokio::time::timeout(limit, Client::connect(&server, &self.opts)).await {
                Ok(Ok(c)) => {
                    self.next_server.store((start + i) % self.url.server_count(), Ordering::Relaxed);
                    connected = Some((Arc::new(c), server));
                    break;
                }
                Ok(Err(e)) if !retryable(e.kind()) => return Err(e),
                Ok(Err(e)) => failure = Some(e),
                Err(_) => {
                    failure =
                        Some(Error::new(ErrorKind::Unavailable, format!("server {} did not answer within {:.0} s", server.host_port(), limit.as_secs_f64())))
                }
            }
        }
        let Some((c, server)) = connected else {
            return Err(failure.unwrap_or_else(|| Error::new(ErrorKind::Unavailable, "no server to connect to")));
        };
        if self.connected_once.fetch_add(1, Ordering::Relaxed) > 0 {
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            info!(server = %server.host_port(), "reconnected");
        }
        *slot = Some(c.clone());
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        // A new path (perhaps another server): its own round trip, from its handshake.
        self.stats.path_rtt_us.store(micros(c.connection().rtt()), Ordering::Relaxed);
        tokio::spawn(watch_silence(Arc::downgrade(&c), server.host_port(), self.stats.path_rtt_us.clone()));
        Ok(c)
    }

    fn retire(&self, c: &Arc<Client>) {
        self.stats.wire_closed.fetch_add(c.wire_bytes().1, Ordering::Relaxed);
        self.stats.datagrams_closed.fetch_add(c.wire_datagrams_received(), Ordering::Relaxed);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, c)) {
            *current = None;
        }
    }

    /// Drops the connection after a link failure, so the next batch connects afresh.
    async fn forget(&self, failed: &Arc<Client>) {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, failed)) {
            // With several servers, the next connect tries another one first.
            let next = (self.next_server.load(Ordering::Relaxed) + 1) % self.url.server_count();
            self.next_server.store(next, Ordering::Relaxed);
            failed.connection().close(quinn::VarInt::from_u32(0), b"retry");
            self.retire(failed);
            *slot = None;
        }
    }

    async fn run_batch(&self, batch: &BatchRequest, sink: &dyn BatchSink) -> std::result::Result<(), FetchError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let client = self.connected().await.map_err(|e| fetch_error(&e))?;
        let result = client
            .stream_blocks(batch.hashes.clone(), batch.urgency.priority(), |hash, encoded| {
                self.stats.blocks.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes.fetch_add(encoded.len() as u64, Ordering::Relaxed);
                sink.block(batch.id, hash, encoded);
            })
            .await;
        if let Err(e) = &result {
            if retryable(e.kind()) {
                warn!(server = %self.url.host_port(), "batch of {} block(s) lost: {e}", batch.hashes.len());
                self.forget(&client).await;
            }
        }
        result.map_err(|e| fetch_error(&e))
    }
}

/// Closes `conn` once nothing arrived on it for the silence limit, so its batches fail
/// over (to the next server) now rather than at the idle timeout.
async fn watch_silence(client: std::sync::Weak<Client>, server: String, path_rtt_us: Arc<AtomicU64>) {
    let (mut seen, mut since) = (0, Instant::now());
    loop {
        tokio::time::sleep(SILENCE_CHECK).await;
        // Holds no connection between checks: a dropped client closes it as before.
        let Some(client) = client.upgrade() else { return };
        let conn = client.connection();
        if conn.close_reason().is_some() {
            return;
        }
        // QUIC's smoothed round trip settles on the path's own when nothing queues; the
        // smallest seen stands for the path (a replaced connection's watcher ends once the
        // connection closes; until then it can only lower the figure).
        path_rtt_us.fetch_min(micros(conn.rtt()), Ordering::Relaxed);
        let now = conn.stats().udp_rx.datagrams;
        if now != seen {
            (seen, since) = (now, Instant::now());
            continue;
        }
        let limit = SILENCE_FLOOR.max(conn.rtt() * SILENCE_RTTS);
        if since.elapsed() > limit {
            warn!(%server, "no packet from the server for {:.1} s; taking it for dead", since.elapsed().as_secs_f64());
            conn.close(quinn::VarInt::from_u32(0), b"server silent");
            return;
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl RemoteSource {
    /// A source for `url`; nothing is connected until the first fetch (or
    /// [`RemoteSource::connect_ahead`]). Metadata fetches
    /// that cannot reach the server retry up to `stall_timeout`, then fail.
    pub fn new(url: RemoteUrl, opts: ConnectOptions, stall_timeout: Duration) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("capsule-net")
            .enable_all()
            .build()
            .map_err(|e| Error::new(ErrorKind::Io, format!("starting the network runtime: {e}")))?;
        let shared = Arc::new(Shared {
            url,
            opts,
            client: tokio::sync::Mutex::new(None),
            current: Mutex::new(None),
            stall_timeout,
            stats: SourceStats::default(),
            connected_once: AtomicU64::new(0),
            next_server: std::sync::atomic::AtomicUsize::new(0),
        });
        Ok(Self { shared, runtime, tasks: Arc::new(Mutex::new(HashMap::new())) })
    }

    /// Starts connecting now, in the background, so the first read does not pay the
    /// handshake's round trips (a failure is only logged: the first fetch tries again).
    pub fn connect_ahead(&self) {
        let shared = self.shared.clone();
        self.runtime.spawn(async move {
            if let Err(e) = shared.connected().await {
                debug!(server = %shared.url.host_port(), "connecting ahead of the first read: {e}");
            }
        });
    }

    /// What it did so far.
    pub fn stats(&self) -> &SourceStats {
        &self.shared.stats
    }

    /// The server, as `HOST:PORT`.
    pub fn label(&self) -> String {
        format!("capsule://{}", self.shared.url.host_port())
    }
}

impl BlockSource for RemoteSource {
    fn start(&self, batch: BatchRequest, sink: Arc<dyn BatchSink>) {
        let shared = self.shared.clone();
        let tasks = self.tasks.clone();
        let id = batch.id;
        // The table is locked across the spawn so the task cannot finish (and remove
        // itself) before it is listed.
        let mut table = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let handle = self.runtime.spawn(async move {
            let result = shared.run_batch(&batch, &*sink).await;
            tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(&batch.id);
            sink.end(batch.id, result);
        });
        table.insert(id, handle.abort_handle());
    }

    fn cancel(&self, batch: u64) {
        if let Some(h) = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(&batch) {
            h.abort();
        }
    }

    fn fetch_objects(&self, ids: &[Hash]) -> std::result::Result<Vec<Vec<u8>>, FetchError> {
        let shared = &self.shared;
        self.runtime.block_on(async {
            let start = Instant::now();
            let mut delay = FIRST_BACKOFF;
            loop {
                shared.stats.object_requests.fetch_add(1, Ordering::Relaxed);
                // A server that accepts the request and never answers must not hold the
                // reader past the stall timeout.
                let left = shared.stall_timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(1));
                let attempt = async { shared.connected().await?.get_objects(ids.to_vec()).await };
                let attempt = match tokio::time::timeout(left, attempt).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::new(ErrorKind::Unavailable, format!("no answer within {:.0} s", left.as_secs_f64()))),
                };
                match attempt {
                    Ok(objects) => return Ok(objects.into_iter().map(|(_, _, bytes)| bytes).collect()),
                    Err(e) if retryable(e.kind()) && start.elapsed() + delay <= shared.stall_timeout => {
                        warn!(server = %shared.url.host_port(), "metadata fetch waits for the server: {e}; retrying in {delay:?}");
                        // The guard must be gone before `forget` locks again.
                        let current = shared.client.lock().await.clone();
                        if let Some(c) = current {
                            shared.forget(&c).await;
                        }
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(MAX_BACKOFF);
                    }
                    Err(e) if retryable(e.kind()) => {
                        return Err(FetchError::new(
                            FetchErrorKind::Unavailable,
                            format!("server {} unreachable for {:.0} s (stall timeout): {e}", shared.url.host_port(), start.elapsed().as_secs_f64()),
                        ))
                    }
                    Err(e) => return Err(fetch_error(&e)),
                }
            }
        })
    }

    fn fetch_path(
        &self,
        root: &MapRoot,
        index: u64,
        with_block: bool,
        needed: &(dyn Fn(&Hash) -> bool + Sync),
    ) -> Option<std::result::Result<PathReply, FetchError>> {
        let shared = &self.shared;
        if shared.stats.paths_refused.load(Ordering::Relaxed) {
            return None;
        }
        shared.stats.object_requests.fetch_add(1, Ordering::Relaxed);
        shared.stats.path_requests.fetch_add(1, Ordering::Relaxed);
        // One attempt: on any failure the caller walks page by page, with its retries.
        let result = self.runtime.block_on(async {
            let attempt = async { shared.connected().await?.get_path(*root, index, with_block, needed).await };
            match tokio::time::timeout(shared.stall_timeout, attempt).await {
                Ok(r) => r,
                Err(_) => Err(Error::new(ErrorKind::Unavailable, format!("no answer within {:.0} s", shared.stall_timeout.as_secs_f64()))),
            }
        });
        match result {
            Ok(reply) => {
                if let Some((_, encoded)) = &reply.block {
                    shared.stats.blocks.fetch_add(1, Ordering::Relaxed);
                    shared.stats.bytes.fetch_add(encoded.len() as u64, Ordering::Relaxed);
                }
                Some(Ok(reply))
            }
            Err(e) => {
                if matches!(e.kind(), ErrorKind::Protocol | ErrorKind::InvalidInput) {
                    debug!(server = %shared.url.host_port(), "no map path requests: {e}");
                    shared.stats.paths_refused.store(true, Ordering::Relaxed);
                }
                Some(Err(fetch_error(&e)))
            }
        }
    }

    fn path_rtt(&self) -> Option<Duration> {
        match self.shared.stats.path_rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn counters(&self) -> SourceCounters {
        let s = &self.shared.stats;
        let (live, live_datagrams) =
            self.shared.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or((0, 0), |c| (c.wire_bytes().1, c.wire_datagrams_received()));
        SourceCounters {
            requests: s.requests.load(Ordering::Relaxed),
            blocks: s.blocks.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            object_requests: s.object_requests.load(Ordering::Relaxed),
            path_requests: s.path_requests.load(Ordering::Relaxed),
            wire_received: s.wire_closed.load(Ordering::Relaxed) + live,
            wire_received_datagrams: s.datagrams_closed.load(Ordering::Relaxed) + live_datagrams,
        }
    }
}
