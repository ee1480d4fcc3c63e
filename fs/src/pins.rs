//! Pins: blocks the cache must keep whatever the pressure (a capsule made ready for
//! offline use). One file per pinned capsule under `CACHE/pins/`:
//!
//! ```text
//!  offset 0       4        5          8            16            16+32n       24+32n
//!         +-------+--------+----------+------------+-------------+------------+
//!         | magic | version| reserved | count u64  | n hashes    | checksum   |
//!         | CPIN  | u8 = 1 | 3 bytes  | LE         | 32 bytes ea | u64        |
//!         +-------+--------+----------+------------+-------------+------------+
//!  checksum = first 8 bytes of BLAKE3(bytes 0 .. 16+32n); count capped by the file size
//! ```
//!
//! Mounts re-read the directory when it changes, so a `capsule prefetch --offline` or
//! `capsule unpin` run beside a mount takes effect without a remount.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use capsule_images::Hash;
use tracing::warn;

const MAGIC: &[u8; 4] = b"CPIN";
const VERSION: u8 = 1;
const HEADER: usize = 16;

/// `CACHE/pins`.
pub fn pins_dir(cache: &Path) -> PathBuf {
    cache.join("pins")
}

fn pin_path(cache: &Path, capsule: &Hash) -> PathBuf {
    pins_dir(cache).join(format!("{}.pins", capsule.to_hex()))
}

pub(crate) fn checksum(bytes: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..8]);
    out
}

/// Encodes a pin file.
pub fn encode(hashes: &[Hash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + hashes.len() * 32 + 8);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(hashes.len() as u64).to_le_bytes());
    for h in hashes {
        out.extend_from_slice(&h.0);
    }
    let sum = checksum(&out);
    out.extend_from_slice(&sum);
    out
}

/// Decodes a pin file; `what` names it in errors.
pub fn decode(bytes: &[u8], what: &str) -> Result<Vec<Hash>, String> {
    if bytes.len() < HEADER + 8 || &bytes[..4] != MAGIC {
        return Err(format!("{what}: not a pin file"));
    }
    if bytes[4] != VERSION {
        return Err(format!("{what}: unsupported pin file version {}", bytes[4]));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[8..16]);
    let count = u64::from_le_bytes(n);
    // The count must match the size before anything is allocated for it.
    if (bytes.len() as u64 - HEADER as u64 - 8) != count.saturating_mul(32) {
        return Err(format!("{what}: declares {count} blocks but holds {} bytes", bytes.len()));
    }
    let body = bytes.len() - 8;
    if checksum(&bytes[..body]) != bytes[body..] {
        return Err(format!("{what}: checksum mismatch"));
    }
    Ok(bytes[HEADER..body]
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            Hash(h)
        })
        .collect())
}

/// Pins `hashes` for capsule `capsule` (atomically replacing an earlier pin of it).
pub fn pin(cache: &Path, capsule: &Hash, hashes: &[Hash]) -> std::io::Result<()> {
    let dir = pins_dir(cache);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{}.tmp", capsule.to_hex()));
    std::fs::write(&tmp, encode(hashes))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, pin_path(cache, capsule))
}

/// Releases capsule `capsule`'s pin; false if it had none.
pub fn unpin(cache: &Path, capsule: &Hash) -> std::io::Result<bool> {
    match std::fs::remove_file(pin_path(cache, capsule)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// True if capsule `capsule` is pinned.
pub fn is_pinned(cache: &Path, capsule: &Hash) -> bool {
    pin_path(cache, capsule).exists()
}

/// The union of all pins, re-read when the pins directory changes.
#[derive(Debug)]
pub struct PinSet {
    dir: PathBuf,
    seen: Option<SystemTime>,
    hashes: HashSet<Hash>,
}

impl PinSet {
    /// Pins of the cache at `cache` (loaded on first use).
    pub fn new(cache: &Path) -> Self {
        Self { dir: pins_dir(cache), seen: None, hashes: HashSet::new() }
    }

    /// Reloads if the directory changed since the last look; true if it did.
    pub fn refresh(&mut self) -> bool {
        let mtime = std::fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        if mtime == self.seen && (mtime.is_some() || self.hashes.is_empty()) {
            return false;
        }
        self.seen = mtime;
        self.hashes.clear();
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return true };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "pins") {
                match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| decode(&b, &path.display().to_string())) {
                    Ok(hs) => self.hashes.extend(hs),
                    Err(err) => warn!("ignoring pin file: {err}"),
                }
            }
        }
        true
    }

    /// True if `h` is pinned (as of the last refresh).
    pub fn contains(&self, h: &Hash) -> bool {
        self.hashes.contains(h)
    }

    /// Pinned blocks (as of the last refresh).
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// True if nothing is pinned.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let hs = vec![Hash([1; 32]), Hash([2; 32])];
        let bytes = encode(&hs);
        assert_eq!(decode(&bytes, "x").unwrap(), hs);
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert!(decode(&bad, "x").unwrap_err().contains("checksum"));
        let mut lying = bytes.clone();
        lying[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&lying, "x").unwrap_err().contains("declares"));
        assert!(decode(&bytes[..10], "x").is_err());
    }

    #[test]
    fn pin_set_follows_pin_and_unpin() {
        let dir = tempfile::tempdir().unwrap();
        let id = Hash([7; 32]);
        let mut set = PinSet::new(dir.path());
        set.refresh();
        assert!(set.is_empty());
        pin(dir.path(), &id, &[Hash([3; 32])]).unwrap();
        set.refresh();
        assert!(set.contains(&Hash([3; 32])));
        assert!(unpin(dir.path(), &id).unwrap());
        set.refresh();
        assert!(set.is_empty());
    }
}
