//! `capsule serve`: the quinn endpoint and one task per stream. Decisions (who may do
//! what) are in `auth`; framing in `frame`; this file only moves bytes.
//!
//! Bounds against clients that never authorize: at most `max_connections` connections in
//! all and `max_per_ip` from one address (more are refused before the handshake); until
//! its first request is authorized a connection may open [`PRE_AUTH_STREAMS`] streams and
//! have [`PRE_AUTH_WINDOW`] bytes in flight, and must send a whole request header within
//! `header_timeout` of its handshake (a stream: of its first bytes), else it is closed; a
//! request header may be at most [`MAX_HEADER`] bytes, read through a small buffer. Only
//! an authorized stream gets block-sized frames, and only an authorized connection the
//! full windows and [`MAX_STREAMS`] streams. Store I/O runs on blocking threads, never on
//! async workers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use capsule_images::envelope::ObjectKind;
use capsule_images::map::{MapPage, MapRoot, PageSource};
use capsule_images::Hash;

use crate::auth::Policy;
use crate::backend::{Backend, BlockBatch};
use crate::error::{Error, ErrorKind, Result};
use crate::frame::{block_parts, MAX_BLOCK_FRAME};
use crate::frame::{decode_control, Frame};
use crate::io::{write_block, write_block_parts, write_control, write_frame, FrameReader};
use crate::proto::{Request, RequestHeader, Response, MAX_BATCH};
use crate::tls::{self, Identity};

/// Most concurrent streams per connection; with the frame caps this bounds memory.
pub const MAX_STREAMS: u32 = 64;

/// Largest request header accepted, before the token in it is checked: a batch of
/// [`MAX_BATCH`] hashes plus room for the token and names (about half a block frame).
pub const MAX_HEADER: usize = MAX_BATCH * 32 + (16 << 10);
/// Default cap on concurrent connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;
/// Default cap on concurrent connections from one IP address.
pub const DEFAULT_MAX_PER_IP: usize = 32;
/// Streams a connection may have open before its first authorized request.
pub const PRE_AUTH_STREAMS: u32 = 2;
/// Bytes a connection may have in flight (unread by the server) before its first
/// authorized request: one whole request header and some.
pub const PRE_AUTH_WINDOW: u32 = MAX_HEADER as u32 + (64 << 10);
/// A connection's receive window once authorized.
const RECEIVE_WINDOW: u32 = 32 << 20;

/// Block reads a stream keeps in flight ahead of its sends: a store of one file or object
/// per block pays its read latency per block, and parallel reads hide it (the test guest's
/// 811 block files read cold: 0.27 s one at a time, 0.13 s 4 at a time, 0.10 s 16).
const READS_AHEAD_PER_STREAM: usize = 16;
/// Block reads all of a connection's streams keep in flight: what one connection can hold
/// in memory is this many blocks, however many streams it opens.
const READS_AHEAD_PER_CONNECTION: usize = 64;

/// What a connection's streams share.
struct ConnShared {
    /// Set by the first authorized request.
    authorized: AtomicBool,
    /// Permits for block reads ahead of their sends ([`READS_AHEAD_PER_CONNECTION`]).
    /// A stream asks for them in its sending order and the semaphore is fair, so a stream
    /// holding any permit holds one for the block it sends next: no stream waits on
    /// another's.
    reads: Semaphore,
    /// Blocks recently sent on this connection: one asked for again (it arrived corrupt, or
    /// its stream stalled) is read from a copy checked against its hash.
    sent: std::sync::Mutex<RecentlySent>,
}

/// Blocks a connection was sent lately, by the first 8 bytes of their hashes, in a
/// direct-mapped table: a block asked for again within the few hundred a client has in
/// flight is still in its slot 19 times in 20 (a later block in its slot costs one
/// resend unchecked, as before this check, and the client's next attempt is checked). A fixed 32 KiB a connection: a set and a queue of the
/// last 4,096 held 213 KB (measured with a counting allocator; the set's deletions grew
/// it to 16,384 buckets).
struct RecentlySent(Box<[u64; RECENTLY_SENT]>);

/// Slots in a connection's [`RecentlySent`].
const RECENTLY_SENT: usize = 4096;

impl Default for RecentlySent {
    fn default() -> Self {
        Self(Box::new([0; RECENTLY_SENT]))
    }
}

impl RecentlySent {
    fn key_and_slot(hash: &Hash) -> (u64, usize) {
        let key = u64::from_le_bytes(hash.0[..8].try_into().expect("8 bytes"));
        (key, key as usize % RECENTLY_SENT)
    }

    /// Whether `hash` was sent lately (its slot holds it still).
    fn knows(&self, hash: &Hash) -> bool {
        let (key, slot) = Self::key_and_slot(hash);
        self.0[slot] == key
    }

    /// Notes `hash` as sent; true if it was sent lately.
    fn note(&mut self, hash: &Hash) -> bool {
        let known = self.knows(hash);
        let (key, slot) = Self::key_and_slot(hash);
        self.0[slot] = key;
        known
    }
}
/// Default time for a request header to arrive whole. Generous: a full batch of hashes
/// (half a MiB) takes 11 s at 384 kbit/s.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(20);
/// QUIC application close code for a client too slow with its request header.
const CLOSE_HEADER_TIMEOUT: u32 = 2;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (UDP).
    pub listen: SocketAddr,
    /// Allow reads without a token.
    pub public_read: bool,
    /// Store directory (for tokens.json).
    pub store_root: PathBuf,
    /// Most concurrent connections; more are refused.
    pub max_connections: usize,
    /// Most concurrent connections from one IP address; more are refused.
    pub max_per_ip: usize,
    /// Time from a stream's first bytes to its whole request header; slower clients are
    /// disconnected.
    pub header_timeout: Duration,
}

impl ServeOptions {
    /// Options with the default bounds.
    pub fn new(listen: SocketAddr, public_read: bool, store_root: PathBuf) -> Self {
        Self {
            listen,
            public_read,
            store_root,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_per_ip: DEFAULT_MAX_PER_IP,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
        }
    }
}

/// Transport settings shared by both ends: windows big enough for a fast loopback,
/// keep-alives every second so a client notices a dead server within seconds (see
/// `source::watch_silence`).
pub fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
    t.receive_window(quinn::VarInt::from_u32(RECEIVE_WINDOW));
    t.send_window(32 << 20);
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    // Headers are what a slow link carries besides blocks. quinn searches payloads up to
    // 1452 bytes (IPv6 inside Ethernet) in steps of 20; an IPv4 path over Ethernet takes
    // 1472. A probe the path drops costs only the probe. Measured on a 10 Mbit/s cold boot:
    // datagrams of 1356 bytes on average and QUIC bytes 1.039 times the blocks' before, 1369
    // and 1.033 with this and the client's empty connection ID (see `endpoint`).
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_ETHERNET_UDP_PAYLOAD).minimum_change(4);
    t.mtu_discovery_config(Some(mtu));
    // No ACK frequency extension: asking for an ACK every 8 packets saved half the return
    // direction's bytes on slow links, but on loopback it made some connections stall each
    // small exchange (4 KiB random reads from an empty cache at 12/s instead of 35,000/s,
    // in about half the runs).
    // A dead peer is noticed here after 15 s of silence; a mount's source watches for a
    // shorter silence itself and moves on within a few seconds.
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(15_000))));
    // The sender's congestion controller decides bulk goodput on a lossy link: Cubic backs
    // off on every random drop (0.56 of a 10 Mbit/s, 40 ms link at 0.5% loss in
    // bench-bulk-link) where BBR, which models bandwidth and round trip, keeps 0.95 and
    // keeps queues short for demand reads. BBR's window has a floor on fast paths
    // (`congestion::FloorBbr`): loopback's cold sequential read 274 -> 380 MB/s.
    // `CAPSULE_QUIC_CC=bbr|cubic|newreno` for comparison.
    match std::env::var("CAPSULE_QUIC_CC").as_deref() {
        Ok("cubic") => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
        }
        Ok("newreno") => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()));
        }
        Ok("bbr") => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        _ => {
            t.congestion_controller_factory(Arc::new(crate::congestion::FloorBbrConfig::default()));
        }
    }
    t
}

/// Socket buffer asked for: a burst of a few MiB must not overflow the kernel's default
/// 208 KiB (it showed as ~6% packet loss on loopback). The kernel caps it at rmem_max
/// (wmem_max), which a stock kernel sets to that same 208 KiB; root goes past the cap.
const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket with large buffers, for either end.
pub fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let io = |e: std::io::Error| Error::new(ErrorKind::Io, format!("UDP socket on {addr}: {e}"));
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(io)?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    // The kernel reports twice what it granted (its bookkeeping); less than asked means
    // the cap applied. Forcing needs CAP_NET_ADMIN: others keep what they got.
    if socket.recv_buffer_size().is_ok_and(|n| n < SOCKET_BUFFER) {
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, SOCKET_BUFFER);
    }
    if socket.send_buffer_size().is_ok_and(|n| n < SOCKET_BUFFER) {
        let _ = rustix::net::sockopt::set_socket_send_buffer_size_force(&socket, SOCKET_BUFFER);
    }
    socket.bind(&addr.into()).map_err(io)?;
    Ok(socket.into())
}

/// The largest UDP payload in a 1500-byte IPv4 packet.
const MAX_ETHERNET_UDP_PAYLOAD: u16 = 1500 - 20 - 8;

/// An endpoint on a large-buffer socket.
pub fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| Error::new(ErrorKind::Io, "no async runtime"))?;
    let mut config = quinn::EndpointConfig::default();
    if server.is_none() {
        // A client endpoint carries one connection (each connect makes its own), so the
        // server's packets need not name it: 8 bytes fewer in every packet that carries
        // blocks. The server still names its side, so a client that moves keeps its
        // connection.
        config.cid_generator(|| Box::new(quinn_proto::RandomConnectionIdGenerator::new(0)));
    }
    quinn::Endpoint::new(config, server, udp_socket(addr)?, runtime).map_err(|e| Error::new(ErrorKind::Io, format!("endpoint on {addr}: {e}")))
}

/// A bound server endpoint.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    /// SHA-256 of the certificate clients will see.
    pub fingerprint: String,
}

impl Server {
    /// Binds the endpoint with the store's identity.
    pub fn bind(identity: Identity, listen: SocketAddr) -> Result<Self> {
        let mut crypto = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::new(ErrorKind::Io, format!("TLS setup: {e}")))?
            .with_no_client_auth()
            .with_single_cert(vec![identity.cert], identity.key)
            .map_err(|e| Error::new(ErrorKind::Io, format!("server certificate: {e}")))?;
        crypto.alpn_protocols = vec![tls::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).map_err(|e| Error::new(ErrorKind::Io, format!("QUIC TLS setup: {e}")))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        // Small until the first authorized request (`open_up`).
        let mut t = transport();
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(PRE_AUTH_STREAMS));
        t.receive_window(quinn::VarInt::from_u32(PRE_AUTH_WINDOW));
        config.transport_config(Arc::new(t));
        let endpoint = endpoint(listen, Some(config))?;
        Ok(Self { endpoint, fingerprint: identity.fingerprint })
    }

    /// A handle to close the endpoint (stops serving).
    pub fn endpoint(&self) -> quinn::Endpoint {
        self.endpoint.clone()
    }

    /// The address actually bound (port 0 picks one).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint.local_addr().map_err(Error::from)
    }

    /// Serves until the endpoint is closed.
    pub async fn run(self, backend: Arc<dyn Backend>, opts: ServeOptions) -> Result<()> {
        let slots = Arc::new(Semaphore::new(opts.max_connections));
        let per_ip: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
        while let Some(incoming) = self.endpoint.accept().await {
            // Refused before the handshake costs anything: the client sees "refused".
            let ip = incoming.remote_address().ip();
            let Some(ip_slot) = IpSlot::take(&per_ip, ip, opts.max_per_ip) else {
                debug!(remote = %incoming.remote_address(), "refused: {} connections from {ip} already", opts.max_per_ip);
                incoming.refuse();
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(remote = %incoming.remote_address(), "refused: {} connections already", opts.max_connections);
                incoming.refuse();
                continue;
            };
            let backend = backend.clone();
            let opts = opts.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => {
                        debug!(remote = %conn.remote_address(), "connection");
                        serve_connection(conn, backend, opts).await;
                    }
                    Err(e) => debug!("handshake failed: {e}"),
                }
                drop((slot, ip_slot));
            });
        }
        Ok(())
    }
}

/// One connection's share of its address's quota, given back when dropped.
struct IpSlot {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl IpSlot {
    fn take(map: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<Self> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self { map: map.clone(), ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// (id, stored bytes) of map pages, top first.
type PagesOnPath = Vec<(Hash, Vec<u8>)>;

/// The pages a lookup of block `index` below `root` visits (id, stored bytes; top first)
/// and the block it maps there, if any. At most `root.height` pages: a tree level each.
fn walk_path(backend: &dyn Backend, root: &MapRoot, index: u64) -> Result<(PagesOnPath, Option<Hash>)> {
    struct Recording<'a> {
        backend: &'a dyn Backend,
        visited: Mutex<Vec<(Hash, Vec<u8>)>>,
    }
    impl PageSource for Recording<'_> {
        fn page(&self, id: &Hash) -> capsule_images::Result<Arc<MapPage>> {
            let bytes = self.backend.read_object(id).map_err(|e| capsule_images::Error::new(capsule_images::ErrorKind::NotFound, e.to_string()))?;
            let page: MapPage = capsule_images::envelope::decode_verified(ObjectKind::MapPage, id, &bytes)?;
            page.validate()?;
            self.visited.lock().unwrap_or_else(|p| p.into_inner()).push((*id, bytes));
            Ok(Arc::new(page))
        }
    }
    if root.height == 0 || root.height > capsule_images::map::MAX_HEIGHT {
        return Err(Error::new(ErrorKind::InvalidInput, format!("map path of height {}", root.height)));
    }
    let pages = Recording { backend, visited: Mutex::new(Vec::new()) };
    let entry = capsule_images::map::lookup(&pages, root, index).map_err(|e| Error::new(ErrorKind::NotFound, format!("map path to block {index}: {e}")))?;
    // A sealed block's name is its ciphertext's hash: sent the same way.
    let block = entry.and_then(|e| e.block());
    Ok((pages.visited.into_inner().unwrap_or_else(|p| p.into_inner()), block))
}

/// One uploaded block: verified and added to `batch`, or stored on its own; false if the
/// backend (or the batch) had it.
fn put_block(backend: &dyn Backend, batch: Option<&mut (dyn BlockBatch + 'static)>, hash: &Hash, encoded: &[u8]) -> Result<bool> {
    let Some(batch) = batch else { return backend.put_encoded_block(hash, encoded) };
    capsule_images::block::decode(hash, encoded)?;
    batch.put(hash, encoded)
}

/// Runs a store operation off the async workers, so file I/O and fsyncs never keep the
/// endpoint from draining its socket (on loopback that showed as packet loss).
async fn blocking<T: Send + 'static>(backend: &Arc<dyn Backend>, f: impl FnOnce(&dyn Backend) -> Result<T> + Send + 'static) -> Result<T> {
    let backend = backend.clone();
    tokio::task::spawn_blocking(move || f(backend.as_ref())).await.map_err(|e| Error::new(ErrorKind::Io, format!("store task failed: {e}")))?
}

async fn serve_connection(conn: quinn::Connection, backend: Arc<dyn Backend>, opts: ServeOptions) {
    // A connection that has made no authorized request by the deadline holds a slot for
    // nothing: closed.
    let shared =
        Arc::new(ConnShared { authorized: AtomicBool::new(false), reads: Semaphore::new(READS_AHEAD_PER_CONNECTION), sent: std::sync::Mutex::default() });
    {
        let (conn, shared, limit) = (conn.clone(), shared.clone(), opts.header_timeout);
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(limit) => {
                    if !shared.authorized.load(Ordering::Relaxed) {
                        let why = format!("no request within {limit:?} of connecting");
                        debug!(remote = %conn.remote_address(), "{why}");
                        conn.close(quinn::VarInt::from_u32(CLOSE_HEADER_TIMEOUT), why.as_bytes());
                    }
                }
                _ = conn.closed() => {}
            }
        });
    }
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(remote = %conn.remote_address(), "connection ended: {e}");
                return;
            }
        };
        let backend = backend.clone();
        let opts = opts.clone();
        let remote = conn.remote_address();
        let conn = conn.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            match serve_stream(&conn, &shared, send, recv, backend, &opts).await {
                Err(e) if e.kind() == ErrorKind::Denied => debug!(%remote, "refused: {}", e.report()),
                Err(e) => warn!(%remote, "stream failed: {}", e.report()),
                Ok(()) => {}
            }
        });
    }
}

async fn serve_stream(
    conn: &quinn::Connection,
    shared: &ConnShared,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    backend: Arc<dyn Backend>,
    opts: &ServeOptions,
) -> Result<()> {
    let mut reader = FrameReader::limited(recv, MAX_HEADER);
    let header = match tokio::time::timeout(opts.header_timeout, reader.expect()).await {
        Ok(Ok(Frame::Request(payload))) => decode_control::<RequestHeader>(&payload),
        Ok(Ok(other)) => Err(Error::protocol(format!("expected a request, got {}", frame_name(&other)))),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            // A slow or silent header holds a connection slot: end the whole connection.
            let why = format!("no request header within {:?}", opts.header_timeout);
            conn.close(quinn::VarInt::from_u32(CLOSE_HEADER_TIMEOUT), why.as_bytes());
            return Err(Error::protocol(why));
        }
    };
    let result = match header {
        Ok(h) => handle(conn, shared, &mut send, &mut reader, h, &backend, opts).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        // Tell the client why, then end only this stream.
        let _ = write_control(&mut send, true, &Response::Error { kind: e.kind(), message: e.report() }).await;
        reader.stop();
    }
    let _ = send.finish();
    result
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Request(_) => "a request",
        Frame::Response(_) => "a response",
        Frame::Block { .. } => "a block",
        Frame::Object { .. } => "an object",
        Frame::End => "an end marker",
    }
}

/// The connection's first authorized request opens its windows and streams.
fn open_up(conn: &quinn::Connection, authorized: &AtomicBool) {
    if !authorized.swap(true, Ordering::Relaxed) {
        conn.set_receive_window(quinn::VarInt::from_u32(RECEIVE_WINDOW));
        conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(MAX_STREAMS));
    }
}

async fn handle(
    conn: &quinn::Connection,
    shared: &ConnShared,
    send: &mut quinn::SendStream,
    reader: &mut FrameReader,
    header: RequestHeader,
    backend: &Arc<dyn Backend>,
    opts: &ServeOptions,
) -> Result<()> {
    // Reload tokens per stream: `capsule token create` and `revoke` take effect without a restart.
    let (root, public_read) = (opts.store_root.clone(), opts.public_read);
    let policy = tokio::task::spawn_blocking(move || Policy::load(&root, public_read))
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("token task failed: {e}")))??;
    let grant = policy.authorize(header.token.as_deref(), &header.request)?;
    open_up(conn, &shared.authorized);
    reader.authorized(MAX_BLOCK_FRAME);
    if header.request.batch_len() > MAX_BATCH {
        return Err(Error::protocol(format!("batch of {} exceeds {MAX_BATCH}", header.request.batch_len())));
    }
    if header.priority > 0 {
        let _ = send.set_priority(i32::from(header.priority));
    }
    match header.request {
        Request::ListRefs { prefix } => {
            let refs = blocking(backend, |b| b.list_refs()).await?.into_iter().filter(|(n, _)| n.starts_with(&prefix) && grant.covers(n)).collect();
            write_control(send, true, &Response::Refs(refs)).await
        }
        Request::GetRef { name } => write_control(send, true, &Response::Ref(blocking(backend, move |b| b.read_ref(&name)).await?)).await,
        Request::MissingBlocks { hashes } => {
            let missing = blocking(backend, move |b| Ok(b.missing_blocks(hashes))).await?;
            write_control(send, true, &Response::Missing(missing)).await
        }
        Request::MissingObjects { ids } => {
            let missing = blocking(backend, move |b| Ok(ids.into_iter().filter(|h| !b.has_object(h)).collect())).await?;
            write_control(send, true, &Response::Missing(missing)).await
        }
        Request::GetBlocks { hashes } => {
            // Reads run a few blocks ahead of the send, in order: a cold store (one file or
            // one object per block) otherwise pays its read latency once per block.
            // The frame (and its checksum) is built on the blocking thread too: the async
            // workers drive the connection, and on a fast link every microsecond there is
            // one the sender is not sending.
            let mut reads = futures_util::stream::iter(hashes)
                .map(|hash| async move {
                    let permit = shared.reads.acquire().await.map_err(|_| Error::new(ErrorKind::Io, "server shutting down"))?;
                    let again = shared.sent.lock().map(|mut s| s.note(&hash)).unwrap_or(false);
                    let parts = blocking(backend, move |b| {
                        let encoded = if again { b.read_checked_block(&hash) } else { b.read_encoded_block(&hash) };
                        block_parts(&hash, encoded.map_err(|e| e.context(format!("block {hash}")))?)
                    })
                    .await?;
                    Ok::<_, Error>((parts, permit))
                })
                .buffered(READS_AHEAD_PER_STREAM);
            while let Some(read) = reads.next().await {
                let (parts, _permit) = read?;
                // Sent as stored: no recompression. The client verifies every block.
                write_block_parts(send, parts).await?;
            }
            write_frame(send, &Frame::End).await
        }
        Request::GetPath { root, index, with_block } => {
            let (pages, block) = blocking(backend, move |b| walk_path(b, &root, index)).await?;
            for (id, bytes) in pages {
                write_frame(send, &Frame::Object { kind: ObjectKind::MapPage, id, bytes }).await?;
            }
            if let Some(hash) = block.filter(|_| with_block) {
                // A block the store cannot read is left out: the client asks for it alone
                // and gets the error there.
                if let Ok(encoded) = blocking(backend, move |b| b.read_encoded_block(&hash)).await {
                    write_block(send, hash, encoded).await?;
                }
            }
            write_frame(send, &Frame::End).await
        }
        Request::GetObjects { ids } => {
            for id in ids {
                let bytes = blocking(backend, move |b| b.read_object(&id)).await.map_err(|e| e.context(format!("object {id}")))?;
                let kind = capsule_images::envelope::peek_kind(&bytes)
                    .ok_or_else(|| Error::new(ErrorKind::Corrupt, format!("object {id} is damaged on the server")))?;
                write_frame(send, &Frame::Object { kind, id, bytes }).await?;
            }
            write_frame(send, &Frame::End).await
        }
        Request::PutBlocks => {
            let (mut new, mut received) = (0, 0);
            // The request's blocks stored together where the backend can (a pack: one fsync).
            let mut batch = backend.block_batch();
            loop {
                match reader.expect().await? {
                    Frame::Block { hash, encoded } => {
                        // A batch keeps an index entry per block in memory until it ends.
                        received += 1;
                        if received > MAX_BATCH {
                            return Err(Error::protocol(format!("more than {MAX_BATCH} blocks in one upload")));
                        }
                        let mut held = batch.take();
                        let (held, added) = blocking(backend, move |b| {
                            let added = put_block(b, held.as_deref_mut(), &hash, &encoded);
                            Ok((held, added))
                        })
                        .await?;
                        batch = held;
                        new += u64::from(added?);
                    }
                    Frame::End => break,
                    other => return Err(Error::protocol(format!("expected blocks, got {}", frame_name(&other)))),
                }
            }
            if let Some(batch) = batch {
                blocking(backend, move |_| batch.finish()).await?;
            }
            write_control(send, true, &Response::Stored { new }).await
        }
        Request::PutObjects => {
            let mut new = 0;
            loop {
                match reader.expect().await? {
                    Frame::Object { kind, id, bytes } => new += u64::from(blocking(backend, move |b| b.put_encoded_object(kind, &id, &bytes)).await?),
                    Frame::End => break,
                    other => return Err(Error::protocol(format!("expected objects, got {}", frame_name(&other)))),
                }
            }
            write_control(send, true, &Response::Stored { new }).await
        }
        Request::ListProfiles { capsule } => write_control(send, true, &Response::Profiles(blocking(backend, move |b| b.list_profiles(&capsule)).await?)).await,
        Request::SetProfile { capsule, name, id } => {
            // Profiles are keyed by capsule id and prefetched and pinned by whoever mounts
            // it through any ref: setting one needs a write grant covering every ref that
            // names the capsule (and at least one), so teamA cannot point its own ref at
            // teamB's capsule and replace teamB's profiles.
            let refs = blocking(backend, |b| b.list_refs()).await?;
            let naming: Vec<&String> = refs.iter().filter(|(_, target)| *target == capsule).map(|(n, _)| n).collect();
            if naming.is_empty() || !naming.iter().all(|n| grant.covers(n)) {
                return Err(Error::new(ErrorKind::Denied, "access denied"));
            }
            blocking(backend, move |b| b.set_profile(&capsule, &name, &id)).await?;
            write_control(send, true, &Response::Stored { new: 0 }).await
        }
        Request::UpdateRef { name, old, new } => {
            let n = name.clone();
            blocking(backend, move |b| b.update_ref(&n, old.as_ref(), &new)).await?;
            info!(%name, id = %new, "ref updated");
            write_control(send, true, &Response::Stored { new: 0 }).await?;
            // After the answer: merging packs is not the pushing client's wait.
            blocking(backend, |b| {
                b.tidy();
                Ok(())
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_sent_lately_is_known_again_and_others_are_not() {
        let mut sent = RecentlySent::default();
        let blocks: Vec<Hash> = (0..300u32).map(|i| Hash::of(&i.to_le_bytes())).collect();
        assert!(blocks.iter().all(|h| !sent.note(h)), "a first send counted as a repeat");
        // A client asks again for one block among its few hundred in flight: most are
        // still known (a later block in the same slot evicts one: 17 of these 300; about
        // 11 expected of 300 in 4,096 slots).
        let known = blocks.iter().filter(|h| sent.knows(h)).count();
        assert!(known >= 270, "only {known} of 300 blocks sent known");
        assert!(sent.note(&blocks[299]), "the last block sent, asked again");
        assert!(!sent.note(&Hash::of(b"never sent")));
    }

    /// Root gets its socket buffers whatever rmem_max says (a stock kernel's 208 KiB
    /// overflowed under a loopback burst).
    #[test]
    fn root_gets_the_socket_buffers_it_asks_for() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let socket = socket2::Socket::from(udp_socket("127.0.0.1:0".parse().unwrap()).unwrap());
        assert!(socket.recv_buffer_size().unwrap() >= SOCKET_BUFFER);
        assert!(socket.send_buffer_size().unwrap() >= SOCKET_BUFFER);
    }
}
