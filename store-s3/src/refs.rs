//! Refs in a bucket, moved by compare-and-swap across any number of servers without a
//! conditional write (Garage ignores `If-Match`/`If-None-Match` on PUT) and without a lock
//! server. Only plain PUT, GET, LIST and DELETE are used, and one property of the store:
//! a LIST that starts after a PUT or DELETE completed sees it (Garage: quorum writes and
//! quorum reads; AWS S3: strong read-after-write consistency).
//!
//! ```text
//!  PREFIX/refs/NAME/.c<gen>           commit: "<capsule id hex>\n"; the ref is its newest commit
//!  PREFIX/refs/NAME/.p<gen>/<nonce>   proposal to write commit <gen>: "<capsule id hex> <unix ms>\n"
//! ```
//!
//! (Ref name segments never start with '.', so these keys cannot collide with a nested ref.)
//!
//! Moving NAME from `expected` (newest commit `g`) to `new`:
//! 1. read the newest commit; if it is not `expected`, fail with a conflict;
//! 2. PUT a proposal under `.p<g+1>/` with a fresh random nonce;
//! 3. LIST `.p<g+1>/`: if another live proposal is there, DELETE ours and back off (below);
//! 4. alone: LIST the commits again; if the newest is still `g`, PUT `.c<g+1>` and succeed.
//!
//! At most one writer wins a generation: of two proposals, the one that completed later
//! is listed after the earlier completed, so its writer sees the earlier one (which is only
//! withdrawn by a writer that lost). A writer that sees a rival withdraws, waits a random
//! moment and, if the ref still names `expected` (the rival withdrew too), tries again, so
//! one of two racing pushes wins and the other is told, never both silently. Proposals of a
//! writer that died are ignored after [`PROPOSAL_TTL`]; a winner commits only within
//! [`COMMIT_DEADLINE`] of proposing, so a rival never skips a proposal that can still win
//! (this assumes server clocks within `PROPOSAL_TTL - COMMIT_DEADLINE` of each other).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsule_images::Hash;
use futures_util::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tracing::debug;

use crate::error::{Error, ErrorKind, Result};

/// A proposal older than this is from a writer that died or gave up; it no longer blocks.
pub const PROPOSAL_TTL: Duration = Duration::from_secs(60);
/// A writer that saw itself alone commits only this soon after proposing.
pub const COMMIT_DEADLINE: Duration = Duration::from_secs(10);
/// Tries against rival proposals before the conflict is reported.
const RACE_ATTEMPTS: u32 = 5;
/// Commits kept below the newest (older ones and old proposals are pruned).
const KEEP_OLD_COMMITS: u64 = 1;

/// Checked right before a commit is written; an error withdraws the proposal. The bucket's
/// gc fence ([`crate::gc`]) is one: it refuses a capsule that needs what a gc is removing.
pub trait CommitFence: Sync {
    /// Whether the commit may be written now.
    fn check(&self) -> futures_util::future::BoxFuture<'_, Result<()>>;
}

/// No fence (a bucket without gc, tests of the ref protocol).
#[derive(Debug)]
pub struct NoFence;

impl CommitFence for NoFence {
    fn check(&self) -> futures_util::future::BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// The refs of one bucket prefix.
#[derive(Debug, Clone)]
pub struct Refs {
    root: String,
}

impl Refs {
    /// Refs under `prefix` (`""` or `"a/b"`).
    pub fn new(prefix: &str) -> Self {
        Self { root: if prefix.is_empty() { "refs".to_string() } else { format!("{prefix}/refs") } }
    }

    fn dir(&self, name: &str) -> Result<String> {
        capsule_images::manifest::check_name(name).map_err(Error::images)?;
        Ok(format!("{}/{name}", self.root))
    }

    /// The newest commit of `name`: (generation, capsule id); generation 0 is "no ref".
    pub async fn newest(&self, os: &dyn ObjectStore, name: &str) -> Result<(u64, Option<Hash>)> {
        let dir = self.dir(name)?;
        let listing = os.list_with_delimiter(Some(&Path::from(dir.as_str()))).await.map_err(|e| Error::store(format!("listing ref {name}"), e))?;
        let newest = listing.objects.iter().filter_map(|o| parse_gen(o.location.filename()?, ".c")).max();
        let Some(generation) = newest else { return Ok((0, None)) };
        let id = read_id(os, &commit_path(&dir, generation), name).await?;
        Ok((generation, Some(id)))
    }

    /// Every ref with its newest commit, sorted by name.
    pub async fn list(&self, os: &dyn ObjectStore) -> Result<Vec<(String, Hash)>> {
        let root = Path::from(self.root.as_str());
        let metas: Vec<_> = os.list(Some(&root)).try_collect().await.map_err(|e| Error::store("listing refs", e))?;
        let mut newest: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        for meta in &metas {
            let key = meta.location.as_ref();
            let Some(rest) = key.strip_prefix(self.root.as_str()).and_then(|r| r.strip_prefix('/')) else { continue };
            let Some((name, last)) = rest.rsplit_once('/') else { continue };
            let Some(generation) = parse_gen(last, ".c") else { continue };
            let slot = newest.entry(name.to_string()).or_default();
            *slot = (*slot).max(generation);
        }
        let mut out = Vec::with_capacity(newest.len());
        for (name, generation) in newest {
            if capsule_images::manifest::check_name(&name).is_err() {
                continue; // not ours: a stray key under refs/
            }
            match read_id(os, &commit_path(&format!("{}/{name}", self.root), generation), &name).await {
                Ok(id) => out.push((name, id)),
                // Pruned between the listing and the read: a newer commit exists; read it.
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    if let (_, Some(id)) = self.newest(os, &name).await? {
                        out.push((name, id));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Points `name` at `new` only if it names `expected` now (`None`: absent).
    /// `fence` is checked right before the commit is written.
    pub async fn compare_and_swap(&self, os: &dyn ObjectStore, name: &str, expected: Option<&Hash>, new: &Hash, fence: &dyn CommitFence) -> Result<()> {
        let dir = self.dir(name)?;
        for attempt in 1..=RACE_ATTEMPTS {
            let (generation, current) = self.newest(os, name).await?;
            if current.as_ref() != expected {
                let show = |h: Option<&Hash>| h.map_or("nothing".to_string(), Hash::short);
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("ref {name} names {} but {} was expected: another writer moved it", show(current.as_ref()), show(expected)),
                ));
            }
            let next = generation + 1;
            match self.try_generation(os, &dir, name, next, new, fence).await? {
                Attempt::Won => {
                    self.prune(os, &dir, next).await;
                    return Ok(());
                }
                Attempt::Rival => {
                    debug!(%name, next, attempt, "ref: a rival proposal; backing off");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Attempt::Moved => {} // the next round reports who moved it
            }
        }
        Err(Error::new(ErrorKind::Conflict, format!("ref {name}: another server is moving it at the same time; try again")))
    }

    async fn try_generation(&self, os: &dyn ObjectStore, dir: &str, name: &str, next: u64, new: &Hash, fence: &dyn CommitFence) -> Result<Attempt> {
        let proposals = Path::from(format!("{dir}/.p{next:020}"));
        let mine = proposals.clone().join(nonce()?);
        let started = Instant::now();
        let body = format!("{} {}\n", new.to_hex(), unix_ms());
        os.put(&mine, PutPayload::from(body.into_bytes())).await.map_err(|e| Error::store(format!("proposing ref {name}"), e))?;
        let outcome = self.decide(os, dir, name, next, (&proposals, &mine), started, new, fence).await;
        if !matches!(outcome, Ok(Attempt::Won)) {
            // Withdraw, so the rival can win; if this fails the proposal expires.
            if let Err(e) = os.delete(&mine).await {
                debug!(%name, "withdrawing a ref proposal: {e}");
            }
        }
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn decide(
        &self,
        os: &dyn ObjectStore,
        dir: &str,
        name: &str,
        next: u64,
        (proposals, mine): (&Path, &Path),
        started: Instant,
        new: &Hash,
        fence: &dyn CommitFence,
    ) -> Result<Attempt> {
        let listed: Vec<_> = os.list(Some(proposals)).try_collect().await.map_err(|e| Error::store(format!("listing proposals of ref {name}"), e))?;
        let now = unix_ms();
        let rivals = listed.iter().filter(|m| m.location != *mine).filter(|m| {
            // Undated or unreadable proposals count as live: better a conflict than two winners.
            let age = now.saturating_sub(u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(0));
            Duration::from_millis(age) < PROPOSAL_TTL
        });
        if rivals.count() > 0 {
            return Ok(Attempt::Rival);
        }
        if self.newest(os, name).await?.0 != next - 1 {
            return Ok(Attempt::Moved);
        }
        if started.elapsed() > COMMIT_DEADLINE {
            return Err(Error::new(ErrorKind::Unavailable, format!("ref {name}: the object store took over {COMMIT_DEADLINE:?} to take a proposal")));
        }
        fence.check().await?;
        let commit = commit_path(dir, next);
        let body = format!("{}\n", new.to_hex());
        os.put(&commit, PutPayload::from(body.into_bytes())).await.map_err(|e| Error::store(format!("committing ref {name}"), e))?;
        Ok(Attempt::Won)
    }

    /// Removes commits older than the one below `newest`, and proposals of past generations.
    /// Best effort: leftovers only cost listing time.
    async fn prune(&self, os: &dyn ObjectStore, dir: &str, newest: u64) {
        let Ok(listed) = os.list(Some(&Path::from(dir))).try_collect::<Vec<_>>().await else { return };
        for meta in listed {
            let Some(rest) = meta.location.as_ref().strip_prefix(dir).and_then(|r| r.strip_prefix('/')) else { continue };
            let stale = match rest.split_once('/') {
                Some((p, _)) => parse_gen(p, ".p").is_some_and(|g| g <= newest),
                None => parse_gen(rest, ".c").is_some_and(|g| g + KEEP_OLD_COMMITS < newest),
            };
            if stale {
                let _ = os.delete(&meta.location).await;
            }
        }
    }
}

enum Attempt {
    Won,
    Rival,
    Moved,
}

fn commit_path(dir: &str, generation: u64) -> Path {
    Path::from(format!("{dir}/.c{generation:020}"))
}

fn parse_gen(segment: &str, tag: &str) -> Option<u64> {
    let digits = segment.strip_prefix(tag)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// Bodies are one line, a hex id first; a ref file of more than a line is damaged.
const MAX_REF_BODY: usize = 256;

async fn read_line(os: &dyn ObjectStore, path: &Path, name: &str) -> Result<String> {
    let got = os.get(path).await.map_err(|e| Error::store(format!("reading ref {name}"), e))?;
    if got.meta.size > MAX_REF_BODY as u64 {
        return Err(Error::new(ErrorKind::Corrupt, format!("ref {name}: {path} is {} bytes, not a ref", got.meta.size)));
    }
    let bytes = got.bytes().await.map_err(|e| Error::store(format!("reading ref {name}"), e))?;
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::new(ErrorKind::Corrupt, format!("ref {name}: {path} is not text")))
}

async fn read_id(os: &dyn ObjectStore, path: &Path, name: &str) -> Result<Hash> {
    let text = read_line(os, path, name).await?;
    text.trim_end().parse().map_err(|e: capsule_images::Error| Error::images(e).context(format!("ref {name} ({path})")))
}

pub(crate) fn nonce() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| Error::new(ErrorKind::Unavailable, format!("no randomness for a ref proposal: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A random wait that grows with the attempt, so two withdrawn rivals rarely meet again.
fn backoff(attempt: u32) -> Duration {
    let mut b = [0u8; 2];
    let jitter = if getrandom::fill(&mut b).is_ok() { u64::from(u16::from_le_bytes(b)) % 200 } else { 100 };
    Duration::from_millis(20 + jitter * u64::from(attempt))
}
