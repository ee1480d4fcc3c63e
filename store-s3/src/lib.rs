//! # capsule-store-s3
//!
//! `capsule serve --backend s3://BUCKET[/PREFIX]`: the server's [`Backend`] on an S3 bucket
//! (Garage, AWS S3, MinIO, ...), so any number of stateless servers can serve one store.
//!
//! ```text
//!  PREFIX/blocks/<hash>                  one encoded block, named by BLAKE3 of its raw bytes
//!  PREFIX/objects/<hash>                 one envelope (manifest, layer, map page, profile)
//!  PREFIX/profiles/<capsule>/<name>      "<profile object id hex>\n"
//!  PREFIX/refs/NAME/...                  commits and proposals, see [`refs`]
//! ```
//!
//! Blocks and objects are named by hash and verified before they are written, so a PUT
//! that races another of the same name writes the same bytes. The S3 protocol (signing,
//! retries with backoff, timeouts) is `object_store`'s. The [`Backend`] trait is synchronous
//! and the server calls it on blocking threads; each call runs on this backend's own small
//! tokio runtime, so store latency never occupies the server's async workers.
//!
//! A server keeps a bounded cache of encoded blocks and small objects (popular blocks are
//! read from the bucket once per server, not once per client) and remembers which blocks it
//! saw in the bucket, which makes the completeness check of a ref update after a push cheap.

pub mod error;
pub mod gc;
pub mod refs;

use std::sync::Arc;
use std::time::Duration;

use capsule_images::envelope::{self, ObjectKind};
use capsule_images::map::{MapPage, PageSource};
use capsule_images::store::ObjectSource;
use capsule_images::{block, Hash};
use capsule_net::backend::Backend;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use tracing::warn;

pub use error::{Error, ErrorKind, Result};

/// Default bytes of blocks and objects a server keeps in memory.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;
/// Largest object accepted from the bucket (a block frame's cap: blocks are at most 1 MiB
/// raw, metadata envelopes smaller).
const MAX_OBJECT: u64 = capsule_net::frame::MAX_BLOCK_FRAME as u64;
/// Block existence checks in flight at once during a ref update.
const PARALLEL_CHECKS: usize = 32;
/// Blocks remembered as present in the bucket.
const PRESENT_ENTRIES: usize = 1 << 20;
const PAGE_CACHE_ENTRIES: usize = 4096;
/// Tries of a ref update that a gc starting or ending restarts.
const FENCE_ATTEMPTS: usize = 3;

/// Where the bucket is and how to reach it. Unset fields come from the usual `AWS_*`
/// environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`).
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing '/' (may be empty).
    pub prefix: String,
    /// `http(s)://HOST:PORT` of the S3 API (Garage: its `s3_api` address).
    pub endpoint: Option<String>,
    /// Signing region (Garage: its `s3_region`, `garage` by default).
    pub region: Option<String>,
    /// Bytes of blocks and objects cached in memory.
    pub cache_bytes: u64,
}

impl S3Config {
    /// Parses `s3://BUCKET[/PREFIX]`.
    pub fn parse_url(url: &str) -> Result<Self> {
        let bad = |why: &str| Error::new(ErrorKind::InvalidInput, format!("{url:?} is not s3://BUCKET[/PREFIX]: {why}"));
        let rest = url.strip_prefix("s3://").ok_or_else(|| bad("it must start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len()) && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
        if !bucket_ok {
            return Err(bad("a bucket name is 3 to 63 lowercase letters, digits, '-' and '.'"));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            capsule_images::manifest::check_name(prefix).map_err(|_| bad("prefix parts are letters, digits, '.', '_', '-', not starting with '.'"))?;
        }
        Ok(Self { bucket: bucket.to_string(), prefix: prefix.to_string(), cache_bytes: DEFAULT_CACHE_BYTES, ..Self::default() })
    }

    /// The client for this bucket: environment defaults, then the fields set here.
    pub fn build(&self) -> Result<Arc<dyn ObjectStore>> {
        // object_store's HTTP client takes rustls's process-wide provider: the one QUIC uses
        // (ring). Fails harmlessly if one is installed already.
        let _ = Arc::unwrap_or_clone(capsule_net::tls::provider()).install_default();
        // A request to a store that lost a node is retried (object_store backs off), but
        // a push or a mount must hear of an outage within a minute, not after three.
        let retry = RetryConfig { max_retries: 6, retry_timeout: Duration::from_secs(45), ..RetryConfig::default() };
        let mut client = ClientOptions::new().with_timeout(Duration::from_secs(30)).with_connect_timeout(Duration::from_secs(5));
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&self.bucket).with_retry(retry);
        if let Some(region) = &self.region {
            b = b.with_region(region);
        }
        let endpoint = self.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(endpoint) = endpoint {
            client = client.with_allow_http(endpoint.starts_with("http://"));
            b = b.with_endpoint(endpoint);
        }
        let store = b.with_client_options(client).build().map_err(|e| Error::store(format!("S3 bucket {}", self.bucket), e))?;
        Ok(Arc::new(store))
    }
}

/// A capsule store in a bucket, as the server's [`Backend`].
#[derive(Debug)]
pub struct S3Backend {
    os: Arc<dyn ObjectStore>,
    prefix: String,
    refs: refs::Refs,
    /// Encoded blocks and objects by (kind tag, hash), weighed by their size.
    cache: quick_cache::sync::Cache<(u8, Hash), bytes::Bytes, Weigh>,
    pages: quick_cache::sync::Cache<Hash, Arc<MapPage>>,
    /// Blocks seen in the bucket (read, written or checked) by this server.
    present: quick_cache::sync::Cache<Hash, ()>,
    /// gc markers seen: a new one makes the server forget `present` and its caches.
    gc_seen: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// When the gc markers were last listed for `present`'s sake.
    gc_checked: std::sync::Mutex<Option<std::time::Instant>>,
    handle: tokio::runtime::Handle,
    _runtime: OwnRuntime,
    description: String,
}

/// The backend's runtime, shut down without blocking: the server drops its backend inside
/// its own runtime, where a blocking shutdown is not allowed.
#[derive(Debug)]
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

#[derive(Debug, Clone)]
struct Weigh;

impl quick_cache::Weighter<(u8, Hash), bytes::Bytes> for Weigh {
    fn weight(&self, _: &(u8, Hash), value: &bytes::Bytes) -> u64 {
        value.len() as u64 + 64
    }
}

const BLOCK: u8 = 0;
const OBJECT: u8 = 1;

impl S3Backend {
    /// A backend on the bucket `config` names.
    pub fn open(config: &S3Config) -> Result<Self> {
        let description = if config.prefix.is_empty() { format!("s3://{}", config.bucket) } else { format!("s3://{}/{}", config.bucket, config.prefix) };
        Self::with_store(config.build()?, &config.prefix, config.cache_bytes, description)
    }

    /// A backend on any object store (tests use an in-memory one).
    pub fn with_store(os: Arc<dyn ObjectStore>, prefix: &str, cache_bytes: u64, description: String) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("capsule-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::new(ErrorKind::Unavailable, format!("starting the object store runtime: {e}")))?;
        let cache_bytes = cache_bytes.max(1 << 20);
        Ok(Self {
            os,
            prefix: prefix.to_string(),
            refs: refs::Refs::new(prefix),
            cache: quick_cache::sync::Cache::with_weighter((cache_bytes / (64 << 10)).max(16) as usize, cache_bytes, Weigh),
            pages: quick_cache::sync::Cache::new(PAGE_CACHE_ENTRIES),
            present: quick_cache::sync::Cache::new(PRESENT_ENTRIES),
            gc_seen: std::sync::Mutex::default(),
            gc_checked: std::sync::Mutex::default(),
            handle: runtime.handle().clone(),
            _runtime: OwnRuntime(Some(runtime)),
            description,
        })
    }

    /// `s3://BUCKET[/PREFIX]`.
    pub fn description(&self) -> &str {
        &self.description
    }

    fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        // Called on the server's blocking threads (never on an async worker).
        self.handle.block_on(f)
    }

    fn key(&self, dir: &str, h: &Hash) -> Path {
        if self.prefix.is_empty() {
            Path::from(format!("{dir}/{}", h.to_hex()))
        } else {
            Path::from(format!("{}/{dir}/{}", self.prefix, h.to_hex()))
        }
    }

    fn profiles_dir(&self, capsule: &Hash) -> String {
        if self.prefix.is_empty() {
            format!("profiles/{}", capsule.to_hex())
        } else {
            format!("{}/profiles/{}", self.prefix, capsule.to_hex())
        }
    }

    async fn get(&self, path: &Path, what: &str) -> Result<bytes::Bytes> {
        let got = self.os.get(path).await.map_err(|e| Error::store(what, e))?;
        if got.meta.size > MAX_OBJECT {
            return Err(Error::new(ErrorKind::Corrupt, format!("{what}: {} bytes in the bucket, more than any block or object", got.meta.size)));
        }
        got.bytes().await.map_err(|e| Error::store(what, e))
    }

    async fn put(&self, path: &Path, bytes: Vec<u8>, what: &str) -> Result<()> {
        self.os.put(path, PutPayload::from(bytes)).await.map(|_| ()).map_err(|e| Error::store(what, e))
    }

    async fn exists(&self, path: &Path, what: &str) -> Result<bool> {
        match self.os.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::store(what, e)),
        }
    }

    fn cached(&self, tag: u8, dir: &str, h: &Hash) -> Result<bytes::Bytes> {
        // One read from the bucket per block however many clients ask for it at once: the
        // others wait for the first (a cold cache under many clients would otherwise send
        // the store one GET per client).
        self.cache.get_or_insert_with(&(tag, *h), || {
            let what = format!("{} {h} in {}", if tag == BLOCK { "block" } else { "object" }, self.description);
            self.run(self.get(&self.key(dir, h), &what))
        })
    }

    fn has(&self, dir: &str, h: &Hash) -> bool {
        match self.run(self.exists(&self.key(dir, h), dir)) {
            Ok(found) => found,
            Err(e) => {
                // Answered as missing: a push sends it again, a ref update refuses.
                warn!("checking {dir}/{h} in {}: {e}", self.description);
                false
            }
        }
    }

    /// Blocks of `hashes` not in the bucket (checked in parallel; remembered ones skipped).
    fn missing_blocks(&self, hashes: Vec<Hash>) -> Result<Vec<Hash>> {
        let unknown: Vec<Hash> = hashes.into_iter().filter(|h| self.present.get(h).is_none()).collect();
        let checked: Vec<(Hash, bool)> = self.run(
            futures_util::stream::iter(unknown.into_iter().map(|h| async move { self.exists(&self.key("blocks", &h), "block").await.map(|found| (h, found)) }))
                .buffer_unordered(PARALLEL_CHECKS)
                .try_collect(),
        )?;
        let mut missing = Vec::new();
        for (h, found) in checked {
            if found {
                self.present.insert(h, ());
            } else {
                missing.push(h);
            }
        }
        Ok(missing)
    }

    /// Everything capsule `id` needs, or why a ref cannot name it here (an object or block missing).
    fn needs(&self, id: &Hash) -> Result<std::result::Result<std::collections::HashSet<(u8, Hash)>, String>> {
        let mut blocks = Vec::new();
        let mut needed = std::collections::HashSet::new();
        let mut labels = std::collections::HashMap::new();
        let walked = capsule_images::store::walk_capsule(
            self,
            id,
            &mut |h| {
                needed.insert((OBJECT, *h));
                Ok(())
            },
            &mut |label, index, h| {
                if labels.insert(*h, (label.to_string(), index)).is_none() {
                    blocks.push(*h);
                }
                Ok(())
            },
        );
        if let Err(e) = walked {
            return match e.kind() {
                capsule_images::ErrorKind::NotFound | capsule_images::ErrorKind::Corrupt => Ok(Err(e.to_string())),
                _ => Err(Error::images(e)),
            };
        }
        needed.extend(blocks.iter().map(|h| (BLOCK, *h)));
        let missing = self.missing_blocks(blocks)?;
        Ok(match missing.first() {
            None => Ok(needed),
            Some(h) => {
                let (label, index) = &labels[h];
                Err(format!("{label}: block {index} ({h}) missing ({} blocks missing)", missing.len()))
            }
        })
    }
}

impl PageSource for S3Backend {
    fn page(&self, id: &Hash) -> capsule_images::Result<Arc<MapPage>> {
        if let Some(p) = self.pages.get(id) {
            return Ok(p);
        }
        let bytes = self.cached(OBJECT, "objects", id)?;
        let page: MapPage = envelope::decode_verified(ObjectKind::MapPage, id, &bytes)?;
        page.validate()?;
        let page = Arc::new(page);
        self.pages.insert(*id, page.clone());
        Ok(page)
    }
}

impl ObjectSource for S3Backend {
    fn object_bytes(&self, id: &Hash) -> capsule_images::Result<Vec<u8>> {
        Ok(self.cached(OBJECT, "objects", id)?.to_vec())
    }
}

impl Backend for S3Backend {
    fn read_encoded_block(&self, hash: &Hash) -> capsule_net::Result<Vec<u8>> {
        let bytes = self.cached(BLOCK, "blocks", hash)?;
        self.present.insert(*hash, ());
        Ok(bytes.to_vec())
    }

    fn has_block(&self, hash: &Hash) -> bool {
        self.refresh_gc_view();
        self.present.get(hash).is_some() || {
            let found = self.has("blocks", hash);
            if found {
                self.present.insert(*hash, ());
            }
            found
        }
    }

    fn put_encoded_block(&self, hash: &Hash, encoded: &[u8]) -> capsule_net::Result<bool> {
        block::decode(hash, encoded).map_err(|e| capsule_net::Error::new(capsule_net::ErrorKind::Corrupt, e.to_string()))?;
        // Same name, same bytes: a PUT racing another server's is harmless.
        let what = format!("storing block {hash} in {}", self.description);
        self.run(self.put(&self.key("blocks", hash), encoded.to_vec(), &what))?;
        self.present.insert(*hash, ());
        Ok(true)
    }

    fn read_object(&self, id: &Hash) -> capsule_net::Result<Vec<u8>> {
        Ok(self.cached(OBJECT, "objects", id)?.to_vec())
    }

    fn has_object(&self, id: &Hash) -> bool {
        self.refresh_gc_view();
        self.cache.get(&(OBJECT, *id)).is_some() || self.has("objects", id)
    }

    fn put_encoded_object(&self, kind: ObjectKind, id: &Hash, bytes: &[u8]) -> capsule_net::Result<bool> {
        let corrupt = |m: String| capsule_net::Error::new(capsule_net::ErrorKind::Corrupt, m);
        if Hash::of(bytes) != *id {
            return Err(corrupt(format!("{} {id}: content does not hash to its id", kind.name())));
        }
        envelope::open(kind, bytes).map_err(|e| corrupt(e.to_string()))?;
        let what = format!("storing {} {id} in {}", kind.name(), self.description);
        self.run(self.put(&self.key("objects", id), bytes.to_vec(), &what))?;
        Ok(true)
    }

    fn list_refs(&self) -> capsule_net::Result<Vec<(String, Hash)>> {
        Ok(self.run(self.refs.list(self.os.as_ref()))?)
    }

    fn read_ref(&self, name: &str) -> capsule_net::Result<Option<Hash>> {
        Ok(self.run(self.refs.newest(self.os.as_ref(), name))?.1)
    }

    fn update_ref(&self, name: &str, old: Option<&Hash>, new: &Hash) -> capsule_net::Result<()> {
        // A ref must never name a capsule the bucket cannot serve whole, now or after a gc
        // running meanwhile (see `gc`): the completeness check follows one listing of the gc
        // markers, and the commit a second.
        for _ in 0..FENCE_ATTEMPTS {
            let markers = self.run(self.gc_markers())?;
            self.forget_if_gc_moved(&markers);
            let needed = match self.needs(new)? {
                Ok(needed) => needed,
                Err(why) => {
                    return Err(capsule_net::Error::new(
                        capsule_net::ErrorKind::NotFound,
                        format!("capsule {new} is incomplete in {}: {why}", self.description),
                    ))
                }
            };
            let fence = gc::Fence::new(self, &markers, &needed, format!("ref {name} -> {}", new.short()));
            match self.run(self.refs.compare_and_swap(self.os.as_ref(), name, old, new, &fence)) {
                Err(_) if fence.changed() => continue,
                r => return Ok(r?),
            }
        }
        Err(capsule_net::Error::new(capsule_net::ErrorKind::Conflict, format!("ref {name}: gc of {} kept starting and ending; try again", self.description)))
    }

    fn list_profiles(&self, capsule: &Hash) -> capsule_net::Result<Vec<(String, Hash)>> {
        let dir = Path::from(self.profiles_dir(capsule));
        let run = async {
            let metas: Vec<_> = self.os.list(Some(&dir)).try_collect().await.map_err(|e| Error::store(format!("listing profiles of {capsule}"), e))?;
            let mut out = Vec::new();
            for meta in metas {
                let Some(name) = meta.location.filename().map(str::to_string) else { continue };
                let bytes = self.get(&meta.location, &format!("profile {name} of {capsule}")).await?;
                let id = std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|t| t.trim_end().parse::<Hash>().ok())
                    .ok_or_else(|| Error::new(ErrorKind::Corrupt, format!("profile {name} of {capsule} ({}): not an object id", meta.location)))?;
                out.push((name, id));
            }
            out.sort();
            Ok::<_, Error>(out)
        };
        Ok(self.run(run)?)
    }

    fn set_profile(&self, capsule: &Hash, name: &str, id: &Hash) -> capsule_net::Result<()> {
        let invalid = |m: String| capsule_net::Error::new(capsule_net::ErrorKind::InvalidInput, m);
        capsule_images::manifest::check_name(name).map_err(|e| invalid(e.to_string()))?;
        if name.contains('/') {
            return Err(invalid(format!("invalid profile name {name:?}: no '/' allowed")));
        }
        let bytes = self.read_object(id)?;
        let p: capsule_images::Profile = envelope::decode_verified(ObjectKind::Profile, id, &bytes).map_err(|e| invalid(e.to_string()))?;
        if p.capsule != *capsule || p.name != name {
            return Err(invalid(format!("profile {id} is {:?} of capsule {}, not {name:?} of {capsule}", p.name, p.capsule)));
        }
        // The profile object must outlive a gc running meanwhile: the same fence as a ref's.
        for _ in 0..FENCE_ATTEMPTS {
            let markers = self.run(self.gc_markers())?;
            self.forget_if_gc_moved(&markers);
            if !self.has("objects", id) {
                return Err(capsule_net::Error::new(capsule_net::ErrorKind::NotFound, format!("profile {id} is not in {}", self.description)));
            }
            let needed = std::collections::HashSet::from([(OBJECT, *id)]);
            let fence = gc::Fence::new(self, &markers, &needed, format!("profile {name} of {}", capsule.short()));
            match self.run(fence.check_now()) {
                Err(_) if fence.changed() => continue,
                r => r?,
            }
            let path = Path::from(format!("{}/{name}", self.profiles_dir(capsule)));
            return Ok(self.run(self.put(&path, format!("{id}\n").into_bytes(), &format!("storing profile {name} of {capsule}")))?);
        }
        Err(capsule_net::Error::new(
            capsule_net::ErrorKind::Conflict,
            format!("profile {name}: gc of {} kept starting and ending; try again", self.description),
        ))
    }
}
#[cfg(test)]
mod tests;
