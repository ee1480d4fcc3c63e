//! The client end: connect (with trust on first use), then one stream per request.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use capsule_fetch::PathReply;
use capsule_images::envelope::ObjectKind;
use capsule_images::map::MapRoot;
use capsule_images::Hash;

use crate::error::{Error, ErrorKind, Result};
use crate::frame::{decode_control, Frame};
use crate::io::{conn_err, write_control, write_frame, FrameReader};
use crate::proto::{Request, RequestHeader, Response};
use crate::server::transport;
use crate::tls::{self, FingerprintVerifier};

/// Time past a round trip a closing client waits for its close frame to leave.
const CLOSE_GRACE: Duration = Duration::from_millis(25);
/// The most of a round trip a closing client waits: right after a bulk transfer the
/// smoothed round trip holds the bottleneck's queue (a pull over a 50 Mbit/s, 40 ms link
/// waited 0.38 s after its last block), and a close frame that is lost costs the server
/// only a connection held until its idle timeout.
const CLOSE_RTT_CAP: Duration = Duration::from_millis(100);

/// The port `capsule serve` listens on unless told otherwise, and a URL's port when it
/// names none.
pub const DEFAULT_PORT: u16 = 7070;
/// How long a connection attempt may take unless [`ConnectOptions::connect_timeout`] says
/// otherwise (an unreachable server answers nothing: without a bound the QUIC idle
/// timeout, 30 s, would be the wait).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `capsule://HOST[:PORT][,HOST[:PORT]...][/NAME]`: one server, or several serving the same
/// store (stateless servers on one bucket), tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    /// Host name or address (of the first server).
    pub host: String,
    /// UDP port (of the first server).
    pub port: u16,
    /// Capsule name, if given.
    pub name: Option<String>,
    /// The other servers, (host, port), in the order given.
    pub others: Vec<(String, u16)>,
}

/// Most servers one URL may list.
pub const MAX_SERVERS: usize = 16;

impl RemoteUrl {
    /// Parses `capsule://HOST[:PORT][/NAME]` (port [`DEFAULT_PORT`] if none; an IPv6
    /// address in brackets).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::new(ErrorKind::InvalidInput, format!("{s:?} is not capsule://HOST[:PORT][,HOST[:PORT]...][/NAME]: {why}"));
        let rest = s.strip_prefix("capsule://").ok_or_else(|| bad("missing capsule://"))?;
        let (authority, name) = match rest.split_once('/') {
            Some((a, n)) if !n.is_empty() => (a, Some(n.to_string())),
            Some((a, _)) => (a, None),
            None => (rest, None),
        };
        let mut servers = Vec::new();
        for one in authority.split(',') {
            if servers.len() == MAX_SERVERS {
                return Err(bad(&format!("more than {MAX_SERVERS} servers")));
            }
            servers.push(parse_server(one).map_err(&bad)?);
        }
        let (host, port) = servers.remove(0);
        Ok(Self { host, port, name, others: servers })
    }

    /// Each server as a URL of its own (same name), first the one `start` places first:
    /// the servers from index `start` on, then those before it.
    pub fn servers_from(&self, start: usize) -> Vec<RemoteUrl> {
        let all: Vec<(String, u16)> = std::iter::once((self.host.clone(), self.port)).chain(self.others.iter().cloned()).collect();
        let n = all.len();
        (0..n)
            .map(|i| {
                let (host, port) = all[(start + i) % n].clone();
                RemoteUrl { host, port, name: self.name.clone(), others: Vec::new() }
            })
            .collect()
    }

    /// How many servers the URL lists.
    pub fn server_count(&self) -> usize {
        1 + self.others.len()
    }

    /// `HOST:PORT`, the key in known_servers.
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// `HOST[:PORT]` (port [`DEFAULT_PORT`] if none; an IPv6 address in brackets).
fn parse_server(authority: &str) -> std::result::Result<(String, u16), &'static str> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed.split_once(']').ok_or("unclosed [")?;
            (host, if after.is_empty() { None } else { Some(after.strip_prefix(':').ok_or("bad port")?) })
        }
        // One colon: HOST:PORT; more: an IPv6 address without brackets, port last.
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("empty host");
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| "bad port")?,
        None => DEFAULT_PORT,
    };
    Ok((host.to_string(), port))
}

/// How to connect.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Bearer token.
    pub token: Option<String>,
    /// Pinned certificate fingerprint (overrides known_servers).
    pub fingerprint: Option<String>,
    /// The known_servers file (default: `tls::default_known_servers()`).
    pub known_servers: Option<PathBuf>,
    /// Give up on a server that does not answer within this (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub connect_timeout: Option<Duration>,
}

/// A connection to a capsule server.
#[derive(Debug)]
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    token: Option<String>,
    /// The server's certificate fingerprint.
    pub fingerprint: String,
    /// True if this connection recorded a new server in known_servers.
    pub newly_trusted: bool,
}

impl Client {
    /// Connects, checking the server's certificate against the pinned or known fingerprint;
    /// an unknown server is trusted and recorded (as ssh does).
    /// With several servers, each is tried in turn (each within the connect timeout) until
    /// one answers; a refused certificate ends the attempt at once.
    pub async fn connect(url: &RemoteUrl, opts: &ConnectOptions) -> Result<Self> {
        let mut failure = None;
        for server in url.servers_from(0) {
            match Self::connect_from(&server, opts, None).await {
                Ok(c) => return Ok(c),
                Err(e) if e.kind() == ErrorKind::Unavailable => {
                    if url.server_count() > 1 {
                        tracing::info!("{}; trying the next server", e.report());
                    }
                    failure = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(failure.unwrap_or_else(|| Error::new(ErrorKind::Unavailable, "no server to connect to")))
    }

    /// Like `connect`, from local address `bind` (tests and load generators that speak
    /// from several addresses; `None`: any).
    pub async fn connect_from(url: &RemoteUrl, opts: &ConnectOptions, bind: Option<SocketAddr>) -> Result<Self> {
        let addr: SocketAddr = (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map_err(|e| Error::new(ErrorKind::Unavailable, format!("resolving {}: {e}", url.host_port())))?
            .next()
            .ok_or_else(|| Error::new(ErrorKind::Unavailable, format!("{} has no address", url.host)))?;
        let known_path = opts.known_servers.clone().unwrap_or_else(tls::default_known_servers);
        let known = tls::known_fingerprint(&known_path, &url.host_port())?;
        let expected = opts.fingerprint.clone().or_else(|| known.clone());
        let verifier = Arc::new(FingerprintVerifier::new(expected));
        let mut crypto = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::new(ErrorKind::Io, format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        crypto.alpn_protocols = vec![tls::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(|e| Error::new(ErrorKind::Io, format!("QUIC TLS setup: {e}")))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport()));
        let bind: SocketAddr = match bind {
            Some(b) => b,
            None => if addr.is_ipv6() { "[::]:0".parse() } else { "0.0.0.0:0".parse() }.map_err(|_| Error::new(ErrorKind::Io, "bind address"))?,
        };
        let mut endpoint = crate::server::endpoint(bind, None)?;
        endpoint.set_default_client_config(config);
        let connecting =
            endpoint.connect(addr, "capsule").map_err(|e| Error::new(ErrorKind::Unavailable, format!("connecting to {}: {e}", url.host_port())))?;
        let limit = opts.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let connected = tokio::time::timeout(limit, connecting).await.map_err(|_| {
            Error::new(ErrorKind::Unavailable, format!("server {} did not answer within {:.0} s (--connect-timeout)", url.host_port(), limit.as_secs_f64()))
        })?;
        let conn = match connected {
            Ok(c) => c,
            Err(e) => {
                if let (Some(seen), Some(expected)) = (verifier.seen(), verifier.expected()) {
                    if seen != expected {
                        return Err(Error::new(
                            ErrorKind::Fingerprint,
                            format!(
                                "server {} presented certificate fingerprint {seen}, but {expected} was expected ({}); refusing to connect",
                                url.host_port(),
                                if opts.fingerprint.is_some() { "--server-fingerprint".to_string() } else { known_path.display().to_string() }
                            ),
                        ));
                    }
                }
                return Err(Error::new(ErrorKind::Unavailable, format!("connecting to {}: {e}", url.host_port())));
            }
        };
        let fingerprint = verifier.seen().unwrap_or_default();
        let newly_trusted = known.is_none() && opts.fingerprint.is_none();
        if newly_trusted {
            tls::remember(&known_path, &url.host_port(), &fingerprint)?;
        }
        Ok(Self { endpoint, conn, token: opts.token.clone(), fingerprint, newly_trusted })
    }

    /// The QUIC connection (for statistics and tests).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Bytes (sent, received) on the wire so far, UDP payloads included.
    pub fn wire_bytes(&self) -> (u64, u64) {
        let s = self.conn.stats();
        (s.udp_tx.bytes, s.udp_rx.bytes)
    }

    /// UDP datagrams received so far (with [`Client::wire_bytes`], the mean datagram size:
    /// how much of a slow link goes to headers).
    pub fn wire_datagrams_received(&self) -> u64 {
        self.conn.stats().udp_rx.datagrams
    }

    async fn open(&self, request: Request, priority: u8) -> Result<(quinn::SendStream, FrameReader)> {
        let (mut send, recv) = self.conn.open_bi().await.map_err(conn_err)?;
        if priority > 0 {
            let _ = send.set_priority(i32::from(priority));
        }
        write_control(&mut send, false, &RequestHeader { token: self.token.clone(), priority, request }).await?;
        Ok((send, FrameReader::new(recv)))
    }

    async fn call(&self, request: Request) -> Result<Response> {
        let (mut send, mut reader) = self.open(request, 0).await?;
        let _ = send.finish();
        response(reader.expect().await?)
    }

    /// Refs under `prefix` that the token may see.
    pub async fn list_refs(&self, prefix: &str) -> Result<Vec<(String, Hash)>> {
        match self.call(Request::ListRefs { prefix: prefix.into() }).await? {
            Response::Refs(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// The capsule id `name` points at.
    pub async fn get_ref(&self, name: &str) -> Result<Option<Hash>> {
        match self.call(Request::GetRef { name: name.into() }).await? {
            Response::Ref(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// The subset of `hashes` (blocks, or objects if `objects`) the server lacks.
    pub async fn missing(&self, hashes: Vec<Hash>, objects: bool) -> Result<Vec<Hash>> {
        let req = if objects { Request::MissingObjects { ids: hashes } } else { Request::MissingBlocks { hashes } };
        match self.call(req).await? {
            Response::Missing(m) => Ok(m),
            other => Err(unexpected(&other)),
        }
    }

    /// Moves `name` from `old` to `new` on the server.
    pub async fn update_ref(&self, name: &str, old: Option<Hash>, new: Hash) -> Result<()> {
        match self.call(Request::UpdateRef { name: name.into(), old, new }).await? {
            Response::Stored { .. } => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Working-set profiles the server has for `capsule`.
    pub async fn list_profiles(&self, capsule: &Hash) -> Result<Vec<(String, Hash)>> {
        match self.call(Request::ListProfiles { capsule: *capsule }).await? {
            Response::Profiles(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    /// Names profile object `id` (already sent) as `name` of `capsule` on the server.
    pub async fn set_profile(&self, capsule: &Hash, name: &str, id: &Hash) -> Result<()> {
        match self.call(Request::SetProfile { capsule: *capsule, name: name.into(), id: *id }).await? {
            Response::Stored { .. } => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Fetches blocks in their stored encoding; each is verified against its hash before
    /// it is returned, so a corrupt block is an error naming it.
    pub async fn get_blocks(&self, hashes: Vec<Hash>, priority: u8) -> Result<Vec<(Hash, Vec<u8>)>> {
        let wanted = hashes.clone();
        let (mut send, mut reader) = self.open(Request::GetBlocks { hashes }, priority).await?;
        let _ = send.finish();
        let mut out = Vec::with_capacity(wanted.len());
        loop {
            match reader.expect().await? {
                Frame::Block { hash, encoded } => {
                    if wanted.get(out.len()) != Some(&hash) {
                        return Err(Error::protocol(format!("server sent block {hash} out of order")));
                    }
                    capsule_images::block::decode(&hash, &encoded).map_err(|e| Error::new(ErrorKind::Corrupt, format!("server sent a corrupt block: {e}")))?;
                    out.push((hash, encoded));
                }
                Frame::End if out.len() == wanted.len() => return Ok(out),
                Frame::Response(p) => return Err(response_error(&p)),
                _ => return Err(Error::protocol("unexpected frame in a block batch")),
            }
        }
    }

    /// Streams blocks in their stored encoding to `each` as they arrive, in request order,
    /// unverified: the fetch engine verifies each block once, where it lands.
    pub async fn stream_blocks(&self, hashes: Vec<Hash>, priority: u8, mut each: impl FnMut(Hash, Vec<u8>)) -> Result<()> {
        let wanted = hashes.clone();
        let (mut send, mut reader) = self.open(Request::GetBlocks { hashes }, priority).await?;
        let _ = send.finish();
        let mut got = 0;
        loop {
            match reader.expect().await? {
                Frame::Block { hash, encoded } => {
                    if wanted.get(got) != Some(&hash) {
                        return Err(Error::protocol(format!("server sent block {hash} out of order")));
                    }
                    got += 1;
                    each(hash, encoded);
                }
                Frame::End if got == wanted.len() => return Ok(()),
                Frame::Response(p) => return Err(response_error(&p)),
                _ => return Err(Error::protocol("unexpected frame in a block batch")),
            }
        }
    }

    /// Fetches metadata objects; each is checked against its id.
    pub async fn get_objects(&self, ids: Vec<Hash>) -> Result<Vec<(ObjectKind, Hash, Vec<u8>)>> {
        let wanted = ids.clone();
        let (mut send, mut reader) = self.open(Request::GetObjects { ids }, 0).await?;
        let _ = send.finish();
        let mut out = Vec::with_capacity(wanted.len());
        loop {
            match reader.expect().await? {
                Frame::Object { kind, id, bytes } => {
                    if wanted.get(out.len()) != Some(&id) || Hash::of(&bytes) != id {
                        return Err(Error::new(ErrorKind::Corrupt, format!("server sent object {id} that does not match what was asked")));
                    }
                    out.push((kind, id, bytes));
                }
                Frame::End if out.len() == wanted.len() => return Ok(out),
                Frame::Response(p) => return Err(response_error(&p)),
                _ => return Err(Error::protocol("unexpected frame in an object batch")),
            }
        }
    }

    /// The map pages from page `root` down to block `index` (each checked against its id;
    /// the caller checks that each names the next) and, with `with_block`, the block
    /// there in its stored encoding (unverified: the fetch engine verifies it).
    /// Once the leaf arrived, a block `needed` refuses is left unread (the stream is
    /// dropped: the server stops sending it).
    pub async fn get_path(&self, root: MapRoot, index: u64, with_block: bool, needed: &(dyn Fn(&Hash) -> bool + Sync)) -> Result<PathReply> {
        let (mut send, mut reader) = self.open(Request::GetPath { root, index, with_block }, 2).await?;
        let _ = send.finish();
        let mut reply = PathReply::default();
        loop {
            match reader.expect().await? {
                Frame::Object { kind: ObjectKind::MapPage, id, bytes } if reply.block.is_none() => {
                    if reply.pages.len() >= usize::from(root.height) || Hash::of(&bytes) != id {
                        return Err(Error::new(ErrorKind::Corrupt, format!("server sent map page {id} that is not on the path to block {index}")));
                    }
                    let leaf = (reply.pages.len() + 1 == usize::from(root.height)).then(|| leaf_block(&id, &bytes, index)).flatten();
                    reply.pages.push((id, bytes));
                    if with_block && leaf.is_some_and(|h| !needed(&h)) {
                        return Ok(reply);
                    }
                }
                Frame::Block { hash, encoded } if with_block && reply.block.is_none() => reply.block = Some((hash, encoded)),
                Frame::End => return Ok(reply),
                Frame::Response(p) => return Err(response_error(&p)),
                _ => return Err(Error::protocol("unexpected frame in a map path")),
            }
        }
    }

    /// Sends blocks (hash, encoding); returns how many were new to the server.
    pub async fn put_blocks(&self, blocks: Vec<(Hash, Vec<u8>)>) -> Result<u64> {
        let (mut send, mut reader) = self.open(Request::PutBlocks, 0).await?;
        for (hash, encoded) in blocks {
            write_frame(&mut send, &Frame::Block { hash, encoded }).await?;
        }
        write_frame(&mut send, &Frame::End).await?;
        let _ = send.finish();
        match response(reader.expect().await?)? {
            Response::Stored { new } => Ok(new),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends objects; returns how many were new to the server.
    pub async fn put_objects(&self, objects: Vec<(ObjectKind, Hash, Vec<u8>)>) -> Result<u64> {
        let (mut send, mut reader) = self.open(Request::PutObjects, 0).await?;
        for (kind, id, bytes) in objects {
            write_frame(&mut send, &Frame::Object { kind, id, bytes }).await?;
        }
        write_frame(&mut send, &Frame::End).await?;
        let _ = send.finish();
        match response(reader.expect().await?)? {
            Response::Stored { new } => Ok(new),
            other => Err(unexpected(&other)),
        }
    }

    /// Closes the connection: the close frame leaves at once, and the endpoint stays to
    /// answer what the peer had in flight for a round trip (and [`CLOSE_GRACE`]), not for
    /// QUIC's whole closing period of three probe timeouts, which `Endpoint::wait_idle`
    /// waits out: over a 40 ms round trip a sparse mount, which closes its metadata
    /// connection before it serves, took 0.51 s with it and 0.36 s without. A peer whose
    /// close frame was lost times out on its own.
    pub async fn close(self) {
        tracing::debug!(stats = ?self.conn.stats(), "closing connection");
        let grace = self.conn.rtt().min(CLOSE_RTT_CAP) + CLOSE_GRACE;
        self.conn.close(quinn::VarInt::from_u32(0), b"bye");
        let started = std::time::Instant::now();
        let drained = tokio::time::timeout(grace, self.endpoint.wait_idle()).await.is_ok();
        tracing::debug!(waited = ?started.elapsed(), drained, "closed");
    }
}

fn response(f: Frame) -> Result<Response> {
    match f {
        Frame::Response(p) => match decode_control::<Response>(&p)? {
            Response::Error { kind, message } => Err(Error::new(kind, format!("server: {message}"))),
            r => Ok(r),
        },
        _ => Err(Error::protocol("expected a response frame")),
    }
}

fn response_error(payload: &[u8]) -> Error {
    match decode_control::<Response>(payload) {
        Ok(Response::Error { kind, message }) => Error::new(kind, format!("server: {message}")),
        Ok(other) => unexpected(&other),
        Err(e) => e,
    }
}

fn unexpected(r: &Response) -> Error {
    Error::protocol(format!("unexpected response {r:?}"))
}

/// The block a leaf page names for `index`, if it names one (an undecodable page names
/// none: the caller checks pages itself).
fn leaf_block(id: &Hash, bytes: &[u8], index: u64) -> Option<Hash> {
    let page: capsule_images::map::MapPage = capsule_images::envelope::decode_verified(ObjectKind::MapPage, id, bytes).ok()?;
    match page.step(index, 0) {
        capsule_images::map::Step::Entry(e) => e.block(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = RemoteUrl::parse("capsule://127.0.0.1:7070/team/app").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.name.as_deref()), ("127.0.0.1", 7070, Some("team/app")));
        assert_eq!(RemoteUrl::parse("capsule://[::1]:1/").unwrap().host, "::1");
        // No port: the default one.
        let u = RemoteUrl::parse("capsule://vms.example/app").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.name.as_deref()), ("vms.example", DEFAULT_PORT, Some("app")));
        let u = RemoteUrl::parse("capsule://a.example:1,[::1]:2,c.example/app").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.name.as_deref()), ("a.example", 1, Some("app")));
        assert_eq!(u.others, vec![("::1".to_string(), 2), ("c.example".to_string(), DEFAULT_PORT)]);
        let hosts: Vec<String> = u.servers_from(1).iter().map(RemoteUrl::host_port).collect();
        assert_eq!(hosts, ["::1:2", "c.example:7070", "a.example:1"]);
        assert!(u.servers_from(0).iter().all(|s| s.others.is_empty() && s.name.as_deref() == Some("app")));
        assert!(RemoteUrl::parse("capsule://a:1,,b:2/app").is_err());
        let u = RemoteUrl::parse("capsule://[fe80::1]/app").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("fe80::1", DEFAULT_PORT));
        for bad in ["http://x:1/a", "capsule://:1/a", "capsule://x:port/a", "capsule://[::1/a", "capsule://[::1]x/a", "capsule:///a"] {
            assert!(RemoteUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
