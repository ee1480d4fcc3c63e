//! Bearer tokens and who may do what. Pure: no I/O beyond loading and saving the list.
//!
//! The server keeps only BLAKE3 hashes of tokens, in `STORE/server/tokens.json` (mode
//! 0600, changed under an flock on `tokens.lock`, fsynced, replaced by rename). A token
//! has a scope (read, or write which includes read) and a capsule-name prefix that covers
//! whole path segments: `team` (or `team/`) covers `team` and `team/...`, never `teamX`.
//! Names are checked against the prefix; blocks and objects are named by hashes nobody can
//! guess, so any valid token (or `--public-read`) may fetch them. Naming a profile for a
//! capsule needs a write token covering a ref that points at that capsule (checked by the
//! server, which knows the refs). Every refusal is the same "access denied", whether or
//! not the name exists.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::proto::Request;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// List, get refs, fetch objects and blocks.
    Read,
    /// Read, plus put blocks and objects and move refs.
    Write,
}

/// One issued token, as the server keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Hex BLAKE3 of the token.
    pub hash: String,
    /// Its scope.
    pub scope: Scope,
    /// Capsule names it covers start with this.
    pub prefix: String,
    /// When it was made.
    pub created_unix: u64,
}

/// The server's access rules.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Issued tokens.
    pub tokens: Vec<TokenRecord>,
    /// Reads need no token.
    pub public_read: bool,
}

/// What an authorized request may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Names under this prefix (whole segments, see [`covers`]) are visible ("" for all).
    pub prefix: String,
}

impl Grant {
    /// Whether this grant reaches capsule name `name`.
    pub fn covers(&self, name: &str) -> bool {
        covers(&self.prefix, name)
    }
}

/// Whether `prefix` covers `name` in whole `/`-separated segments: `team` and `team/`
/// cover `team` and `team/a`, not `teamX` or `teamX/a`; "" covers every name.
pub fn covers(prefix: &str, name: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    p.is_empty() || name.strip_prefix(p).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Length of a token's short id (hex digits of its hash): enough to tell tokens apart,
/// nothing that helps guess one.
pub const ID_LEN: usize = 12;

impl TokenRecord {
    /// The short id `capsule token list` shows and `capsule token revoke` takes.
    pub fn id(&self) -> &str {
        self.hash.get(..ID_LEN).unwrap_or(&self.hash)
    }
}

fn denied() -> Error {
    Error::new(ErrorKind::Denied, "access denied")
}

/// `STORE/server/tokens.json`.
pub fn tokens_path(store_root: &Path) -> PathBuf {
    store_root.join("server").join("tokens.json")
}

fn hash_token(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

impl Policy {
    /// Loads the token list (absent file: no tokens).
    pub fn load(store_root: &Path, public_read: bool) -> Result<Self> {
        Ok(Self { tokens: read_tokens(&tokens_path(store_root))?, public_read })
    }

    /// Decides whether `token` may make `request`; names are checked against prefixes.
    pub fn authorize(&self, token: Option<&str>, request: &Request) -> Result<Grant> {
        let record = token.and_then(|t| {
            let h = hash_token(t);
            self.tokens.iter().find(|r| r.hash == h)
        });
        let name = match request {
            Request::GetRef { name } | Request::UpdateRef { name, .. } => Some(name.as_str()),
            _ => None,
        };
        if request.is_write() {
            let r = record.filter(|r| r.scope == Scope::Write).ok_or_else(denied)?;
            if name.is_some_and(|n| !covers(&r.prefix, n)) {
                return Err(denied());
            }
            return Ok(Grant { prefix: r.prefix.clone() });
        }
        match record {
            Some(r) => {
                if name.is_some_and(|n| !covers(&r.prefix, n)) {
                    return Err(denied());
                }
                Ok(Grant { prefix: r.prefix.clone() })
            }
            None if self.public_read => Ok(Grant { prefix: String::new() }),
            None => Err(denied()),
        }
    }
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::with_source(ErrorKind::Io, path.display(), e)
}

fn read_tokens(path: &Path) -> Result<Vec<TokenRecord>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::new(ErrorKind::Corrupt, format!("{}: not a token list: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Changes the token list under an exclusive flock (two `token create`s never lose one),
/// then writes it 0600, fsynced, by rename (a crash leaves the old list or the new one).
fn update_tokens<T>(store_root: &Path, change: impl FnOnce(&mut Vec<TokenRecord>) -> Result<T>) -> Result<T> {
    let path = tokens_path(store_root);
    let dir = path.parent().unwrap_or(store_root);
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let lock_path = dir.join("tokens.lock");
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&lock_path).map_err(|e| io_err(&lock_path, e))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|e| io_err(&lock_path, e.into()))?;
    let mut tokens = read_tokens(&path)?;
    let out = change(&mut tokens)?;
    let json = serde_json::to_vec_pretty(&tokens).map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(&tmp).map_err(|e| io_err(&tmp, e))?;
    // The umask cannot widen 0600, but be explicit: hashes of live tokens are nobody's business.
    f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|e| io_err(&tmp, e))?;
    f.write_all(&json).and_then(|_| f.sync_all()).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))?;
    Ok(out)
}

/// Makes a new token, records its hash in the store, and returns the token (shown once)
/// and its record.
pub fn create_token(store_root: &Path, scope: Scope, prefix: &str) -> Result<(String, TokenRecord)> {
    let mut secret = [0u8; 24];
    getrandom::fill(&mut secret).map_err(|e| Error::new(ErrorKind::Io, format!("no randomness for a token: {e}")))?;
    let token = format!("capsule_{}", secret.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let created_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let record = TokenRecord { hash: hash_token(&token), scope, prefix: prefix.to_string(), created_unix };
    update_tokens(store_root, |tokens| {
        tokens.push(record.clone());
        Ok(())
    })?;
    Ok((token, record))
}

/// The issued tokens (their hashes, scopes and prefixes; never the tokens).
pub fn list_tokens(store_root: &Path) -> Result<Vec<TokenRecord>> {
    read_tokens(&tokens_path(store_root))
}

/// Revokes the token whose short id is (or starts with, at least 6 digits) `id`; the
/// server refuses it from its next request on. Returns its record.
pub fn revoke_token(store_root: &Path, id: &str) -> Result<TokenRecord> {
    if id.len() < 6 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::new(ErrorKind::InvalidInput, format!("{id:?} is not a token id (at least 6 hex digits, as `capsule token list` shows)")));
    }
    let id = id.to_ascii_lowercase();
    update_tokens(store_root, |tokens| {
        let matching: Vec<usize> = tokens.iter().enumerate().filter(|(_, r)| r.hash.starts_with(&id)).map(|(i, _)| i).collect();
        match matching[..] {
            [i] => Ok(tokens.remove(i)),
            [] => Err(Error::new(ErrorKind::NotFound, format!("no token with id {id} (see capsule token list)"))),
            _ => Err(Error::new(ErrorKind::InvalidInput, format!("{} tokens have an id starting with {id}; give more digits", matching.len()))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_images::Hash;

    fn policy() -> (Policy, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let read = create_token(dir.path(), Scope::Read, "team/").unwrap().0;
        let write = create_token(dir.path(), Scope::Write, "team/").unwrap().0;
        (Policy::load(dir.path(), false).unwrap(), read, write)
    }

    #[test]
    fn scopes_and_prefixes() {
        let (p, read, write) = policy();
        let get = |n: &str| Request::GetRef { name: n.into() };
        let update = |n: &str| Request::UpdateRef { name: n.into(), old: None, new: Hash([0; 32]) };
        assert!(p.authorize(Some(&read), &get("team/a")).is_ok());
        assert!(p.authorize(Some(&write), &get("team/a")).is_ok());
        for (token, req) in [
            (None, get("team/a")),
            (Some("capsule_wrong"), get("team/a")),
            (Some(read.as_str()), get("other/a")),
            (Some(read.as_str()), update("team/a")),
            (Some(read.as_str()), Request::PutBlocks),
            (Some(write.as_str()), update("other/a")),
            (Some(write.as_str()), update("teamX/a")),
            (Some(read.as_str()), get("teamX")),
            (Some(read.as_str()), get("teamX/a")),
        ] {
            let err = p.authorize(token, &req).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Denied);
            assert_eq!(err.to_string(), "access denied", "a refusal reveals nothing");
        }
        assert!(p.authorize(Some(&write), &update("team/a")).is_ok());
    }

    #[test]
    fn public_read_opens_reads_only() {
        let (mut p, _, _) = policy();
        p.public_read = true;
        assert!(p.authorize(None, &Request::GetRef { name: "x".into() }).is_ok());
        assert!(p.authorize(None, &Request::PutBlocks).is_err());
    }

    #[test]
    fn prefixes_are_whole_segments() {
        for (prefix, name, yes) in [
            ("", "anything", true),
            ("team", "team", true),
            ("team", "team/a", true),
            ("team/", "team/a/b", true),
            ("team/", "team", true),
            ("team", "teamX", false),
            ("team", "teamX/a", false),
            ("team/", "teamX/a", false),
            ("team/a", "team/ab", false),
            ("team/a", "team/a/b", true),
        ] {
            assert_eq!(covers(prefix, name), yes, "{prefix:?} covers {name:?}");
        }
    }

    #[test]
    fn token_file_is_private_and_revocable() {
        let dir = tempfile::tempdir().unwrap();
        let (a, ra) = create_token(dir.path(), Scope::Write, "a").unwrap();
        let (b, rb) = create_token(dir.path(), Scope::Read, "").unwrap();
        let mode = std::fs::metadata(tokens_path(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let listed = list_tokens(dir.path()).unwrap();
        assert_eq!(listed, [ra.clone(), rb.clone()]);
        assert!(!std::fs::read_to_string(tokens_path(dir.path())).unwrap().contains(&a), "only hashes are kept");
        assert_eq!(revoke_token(dir.path(), ra.id()).unwrap(), ra);
        let p = Policy::load(dir.path(), false).unwrap();
        assert!(p.authorize(Some(&a), &Request::GetRef { name: "a".into() }).is_err());
        assert!(p.authorize(Some(&b), &Request::GetRef { name: "a".into() }).is_ok());
        assert_eq!(revoke_token(dir.path(), ra.id()).unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(revoke_token(dir.path(), "abc").unwrap_err().kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn concurrent_creates_lose_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let root = root.clone();
                std::thread::spawn(move || (0..5).map(|_| create_token(&root, Scope::Read, "").unwrap().1).collect::<Vec<_>>())
            })
            .collect();
        let made: usize = threads.into_iter().map(|t| t.join().unwrap().len()).sum();
        assert_eq!(list_tokens(&root).unwrap().len(), made);
    }
}
