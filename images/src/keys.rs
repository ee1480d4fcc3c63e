//! Key files: an owner's [`Key`] in `~/.config/capsule/keys/NAME` (mode 0600).
//!
//! ```text
//!   capsule-key 1
//!   secret <64 hex digits>
//!   convergence <64 hex digits> | none
//! ```
//! The key's id is derived from its secret (see `seal`); a sealed capsule names it, so a
//! client finds the key in its key directory without being told.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::manifest::check_disk_name;
use crate::seal::{Key, KeyId, Sealing};

const HEADER: &str = "capsule-key 1";
/// Largest key file read (a real one is about 170 bytes).
const MAX_KEY_FILE: u64 = 4096;

/// The key directory: `$CAPSULE_KEY_DIR`, else `$XDG_CONFIG_HOME/capsule/keys`, else
/// `~/.config/capsule/keys`.
pub fn key_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CAPSULE_KEY_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".config"));
    config.join("capsule").join("keys")
}

fn hex32(s: &str, what: &str, path: &Path) -> Result<[u8; 32]> {
    let h: crate::Hash = s.parse().map_err(|_| Error::corrupt(format!("key file {}: {what} is not 64 hex digits", path.display())))?;
    Ok(h.0)
}

fn to_hex(b: &[u8; 32]) -> String {
    crate::Hash(*b).to_hex()
}

/// The file's text for `key`.
fn key_text(key: &Key) -> String {
    let conv = key.convergence_secret().map_or_else(|| "none".to_string(), to_hex);
    format!("{HEADER}\nsecret {}\nconvergence {conv}\n", to_hex(key.secret()))
}

/// Parses a key file's bytes.
fn parse(bytes: &[u8], path: &Path) -> Result<Key> {
    let bad = |why: &str| Error::corrupt(format!("key file {}: {why}", path.display()));
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.first() != Some(&HEADER) {
        return Err(bad(&format!("does not start with {HEADER:?}")));
    }
    let field = |name: &str| -> Result<&str> {
        let mut found = lines.iter().filter_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')));
        let v = found.next().ok_or_else(|| bad(&format!("no {name} line")))?;
        if found.next().is_some() {
            return Err(bad(&format!("two {name} lines")));
        }
        Ok(v.trim())
    };
    let secret = hex32(field("secret")?, "secret", path)?;
    let convergence = match field("convergence")? {
        "none" => None,
        hex => Some(hex32(hex, "convergence", path)?),
    };
    if lines.len() != 3 {
        return Err(bad("unexpected lines"));
    }
    Ok(Key::from_secrets(secret, convergence))
}

/// Makes key `name` in `dir` (0600; the directory 0700), with a convergence secret if
/// asked. Never overwrites an existing key.
pub fn create(dir: &Path, name: &str, convergence: bool) -> Result<Key> {
    check_disk_name(name).map_err(|_| Error::invalid(format!("invalid key name {name:?}: use letters, digits, '.', '_', '-'")))?;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(dir.display(), e))?;
    let key = Key::generate(convergence)?;
    let path = dir.join(name);
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Error::new(ErrorKind::Conflict, format!("key {name} exists already ({}); not overwriting it", path.display())),
        _ => Error::io(path.display(), e),
    })?;
    f.write_all(key_text(&key).as_bytes()).and_then(|_| f.sync_all()).map_err(|e| Error::io(path.display(), e))?;
    Ok(key)
}

/// Loads key `name` from `dir`; refuses a file others can read.
pub fn load(dir: &Path, name: &str) -> Result<Key> {
    check_disk_name(name).map_err(|_| Error::invalid(format!("invalid key name {name:?}")))?;
    load_path(&dir.join(name))
}

fn load_path(path: &Path) -> Result<Key> {
    let f = fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::new(ErrorKind::NoKey, format!("no key file {} (capsule key create NAME makes one)", path.display())),
        _ => Error::io(path.display(), e),
    })?;
    let meta = f.metadata().map_err(|e| Error::io(path.display(), e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(Error::invalid(format!("key file {} is readable by others (mode {:o}); chmod 600 it", path.display(), meta.permissions().mode() & 0o777)));
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(Error::new(ErrorKind::TooLarge, format!("key file {} is {} bytes, cap {MAX_KEY_FILE}", path.display(), meta.len())));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_KEY_FILE), &mut bytes).map_err(|e| Error::io(path.display(), e))?;
    parse(&bytes, path)
}

/// Every key in `dir`, by name; a file that is not a key is reported, not skipped.
pub fn list(dir: &Path) -> Result<Vec<(String, Result<Key>)>> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.map_err(|e| Error::io(dir.display(), e))?,
    };
    let mut out: Vec<(String, Result<Key>)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), load_path(&e.path())))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The key in `dir` whose id is `id`, with its name.
pub fn find(dir: &Path, id: KeyId) -> Result<Option<(String, Key)>> {
    Ok(list(dir)?.into_iter().find_map(|(name, k)| k.ok().filter(|k| k.id() == id).map(|k| (name, k))))
}

/// The key that opens capsule `capsule` sealed as `sealing` (`None`: a plain capsule,
/// which needs none): key `name` if given, else the key of its id in `dir`.
pub fn key_for(dir: &Path, name: Option<&str>, sealing: Option<&Sealing>, capsule: &str) -> Result<Option<Key>> {
    let Some(sealing) = sealing else { return Ok(None) };
    let key = match name {
        Some(n) => load(dir, n)?,
        None => match find(dir, sealing.key_id)? {
            Some((_, k)) => k,
            None => {
                return Err(Error::new(
                    ErrorKind::NoKey,
                    format!("capsule {capsule} is encrypted with key {}, which is not in {} (capsule key list; --key NAME)", sealing.key_id, dir.display()),
                ))
            }
        },
    };
    key.check_opens(sealing, capsule)?;
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_load_list_find_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let kd = dir.path().join("keys");
        let a = create(&kd, "alice", false).unwrap();
        let b = create(&kd, "bob", true).unwrap();
        assert_eq!(fs::metadata(kd.join("alice")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(create(&kd, "alice", true).unwrap_err().kind(), ErrorKind::Conflict);
        assert_eq!(load(&kd, "alice").unwrap().id(), a.id());
        let bl = load(&kd, "bob").unwrap();
        assert_eq!(bl.convergence_secret(), b.convergence_secret());
        assert!(bl.convergence_secret().is_some());
        let names: Vec<_> = list(&kd).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["alice", "bob"]);
        assert_eq!(find(&kd, b.id()).unwrap().unwrap().0, "bob");
        let err = key_for(&kd, None, Some(&Key::from_secrets([3; 32], None).sealing()), "demo").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoKey);
        assert!(err.to_string().contains("demo") && err.to_string().contains(&Key::from_secrets([3; 32], None).id().to_string()), "{err}");
        assert_eq!(key_for(&kd, None, Some(&a.sealing()), "demo").unwrap().unwrap().id(), a.id());
        assert_eq!(key_for(&kd, Some("bob"), Some(&a.sealing()), "demo").unwrap_err().kind(), ErrorKind::NoKey);
        fs::set_permissions(kd.join("alice"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&kd, "alice").unwrap_err().to_string().contains("readable by others"));
    }

    #[test]
    fn hostile_key_files_are_refused() {
        let p = Path::new("k");
        for bad in ["", "capsule-key 2\nsecret 00\nconvergence none\n", "capsule-key 1\nsecret zz\nconvergence none\n", "capsule-key 1\nconvergence none\n"] {
            assert!(parse(bad.as_bytes(), p).is_err(), "{bad:?}");
        }
        let good = key_text(&Key::from_secrets([4; 32], Some([5; 32])));
        assert_eq!(parse(good.as_bytes(), p).unwrap().id(), Key::from_secrets([4; 32], None).id());
        assert!(parse(format!("{good}secret {}\n", "00".repeat(32)).as_bytes(), p).is_err());
    }
}
