//! Bearer tokens and who may do what. Pure: no I/O beyond loading and saving the list.
//!
//! The server keeps only BLAKE3 hashes of tokens, in `STORE/server/tokens.json`. A token
//! has a scope (read, or write which includes read) and a capsule-name prefix. Names are
//! checked against the prefix; blocks and objects are named by hashes nobody can guess, so
//! any valid token (or `--public-read`) may fetch them. Every refusal is the same
//! "access denied", whether or not the name exists.

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
    /// Names visible to this request start with this ("" for all).
    pub prefix: String,
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
        let path = tokens_path(store_root);
        let tokens = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::new(ErrorKind::Corrupt, format!("{}: not a token list: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::new(ErrorKind::Io, format!("{}: {e}", path.display()))),
        };
        Ok(Self { tokens, public_read })
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
            if name.is_some_and(|n| !n.starts_with(&r.prefix)) {
                return Err(denied());
            }
            return Ok(Grant { prefix: r.prefix.clone() });
        }
        match record {
            Some(r) => {
                if name.is_some_and(|n| !n.starts_with(&r.prefix)) {
                    return Err(denied());
                }
                Ok(Grant { prefix: r.prefix.clone() })
            }
            None if self.public_read => Ok(Grant { prefix: String::new() }),
            None => Err(denied()),
        }
    }
}

/// Makes a new token, records its hash in the store, and returns the token (shown once).
pub fn create_token(store_root: &Path, scope: Scope, prefix: &str) -> Result<String> {
    let mut secret = [0u8; 24];
    getrandom::fill(&mut secret).map_err(|e| Error::new(ErrorKind::Io, format!("no randomness for a token: {e}")))?;
    let token = format!("capsule_{}", secret.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let mut policy = Policy::load(store_root, false)?;
    let created_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    policy.tokens.push(TokenRecord { hash: hash_token(&token), scope, prefix: prefix.to_string(), created_unix });
    let path = tokens_path(store_root);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::new(ErrorKind::Io, format!("{}: {e}", dir.display())))?;
    }
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(&policy.tokens).map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
    std::fs::write(&tmp, json).and_then(|_| std::fs::rename(&tmp, &path)).map_err(|e| Error::new(ErrorKind::Io, format!("{}: {e}", path.display())))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_images::Hash;

    fn policy() -> (Policy, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let read = create_token(dir.path(), Scope::Read, "team/").unwrap();
        let write = create_token(dir.path(), Scope::Write, "team/").unwrap();
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
}
