//! qcow2 chains in and out, through `qemu-img` and `qemu-io` (package qemu-utils).
//!
//! Import: one layer per file of the backing chain, bottom first. A file's layer maps the
//! blocks that file itself allocates (`qemu-img map` depth 0), with their content as seen
//! through the chain. Layers are content-addressed, so a backing file imported before
//! yields the same layer id and is shared, not copied.
//!
//! Export: one qcow2 file per layer with `cluster_size` = block size, each backed by the
//! one below, holding exactly the blocks its layer maps (explicit zeros as zero clusters).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::image::ImageReader;
use crate::ingest::{import_file, FileImport, ImportStats, Progress};
use crate::manifest::Image;
use crate::map::{self, Entry};
use crate::store::Store;

/// One file of an imported chain.
#[derive(Debug, Clone)]
pub struct ChainLayer {
    /// The qcow2 (or raw base) file.
    pub file: PathBuf,
    /// Counters of its import.
    pub stats: ImportStats,
    /// True if its layer was already in the store.
    pub shared: bool,
}

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound { " (install qemu-utils)" } else { "" };
        Error::new(ErrorKind::External, format!("cannot run {shown}{hint}: {e}"))
    })?;
    if !out.status.success() {
        return Err(Error::new(ErrorKind::External, format!("{shown} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(out.stdout)
}

fn json(bytes: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| Error::new(ErrorKind::External, format!("unreadable output of {what}: {e}")))
}

/// Imports `path` and its backing chain; returns the top image and one entry per file.
/// The chain must have passed [`check_chain`] (qemu-img follows it).
pub fn import_chain(store: &Store, path: &Path, block_size_log2: u8, progress: &dyn Progress) -> Result<(Image, Vec<ChainLayer>)> {
    let info = json(&run(Command::new("qemu-img").args(["info", "-f", "qcow2", "--output=json", "--backing-chain"]).arg(path))?, "qemu-img info")?;
    let chain = info.as_array().ok_or_else(|| Error::new(ErrorKind::External, "qemu-img info: expected a list"))?;
    let bs = 1u64 << block_size_log2;
    let mut image: Option<Image> = None;
    let mut layers = Vec::new();
    for (depth, entry) in chain.iter().enumerate().rev() {
        let file = PathBuf::from(entry["filename"].as_str().unwrap_or_default());
        let format = entry["format"].as_str().unwrap_or("raw").to_string();
        let what = format!("{} (chain depth {depth})", file.display());
        let size = entry["virtual-size"].as_u64().ok_or_else(|| Error::new(ErrorKind::External, format!("{what}: no virtual size")))?;
        let only = match image {
            None => None,
            Some(_) => Some(allocated_blocks(&file, &format, size, bs).with_context(|| what.clone())?),
        };
        // The file's content as the guest would see it, chain included.
        let materialized;
        let source = if format == "raw" {
            file.clone()
        } else {
            materialized = TempFile(store.root().join("tmp").join(format!("qcow2-{}-{depth}.raw", std::process::id())));
            run(Command::new("qemu-img").args(["convert", "-q", "-f", &format, "-O", "raw"]).arg(&file).arg(&materialized.0))?;
            materialized.0.clone()
        };
        let reader = image.map(|i| ImageReader::open(store, i)).transpose()?;
        let opts = FileImport { block_size_log2, parent: reader.as_ref(), only: only.as_deref(), threads: 0, progress, key: None };
        let had_before = image.and_then(|i| i.top);
        let (mut new_image, stats) = import_file(store, &source, &opts).with_context(|| what.clone())?;
        new_image.size = size;
        let shared = new_image.top != had_before && stats.metadata_bytes == 0;
        layers.push(ChainLayer { file, stats, shared });
        image = Some(new_image);
    }
    let image = image.ok_or_else(|| Error::new(ErrorKind::External, format!("{}: empty backing chain", path.display())))?;
    Ok((image, layers))
}

/// Blocks that `file` itself allocates (data or explicit zeros), not its backing files.
fn allocated_blocks(file: &Path, format: &str, size: u64, bs: u64) -> Result<Vec<bool>> {
    let map = json(&run(Command::new("qemu-img").args(["map", "--output=json", "-f", format]).arg(file))?, "qemu-img map")?;
    let mut only = vec![false; size.div_ceil(bs) as usize];
    for extent in map.as_array().into_iter().flatten() {
        let depth = extent["depth"].as_u64().unwrap_or(u64::MAX);
        let data = extent["data"].as_bool().unwrap_or(false);
        let zero = extent["zero"].as_bool().unwrap_or(false);
        let present = extent["present"].as_bool().unwrap_or(true);
        let (Some(start), Some(len)) = (extent["start"].as_u64(), extent["length"].as_u64()) else { continue };
        if depth == 0 && present && (data || zero) && len > 0 {
            for b in start / bs..=(start + len - 1) / bs {
                if let Some(slot) = only.get_mut(b as usize) {
                    *slot = true;
                }
            }
        }
    }
    Ok(only)
}

/// Removes the file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `image` as a chain of qcow2 files in `dir`: `<stem>.qcow2` on top, backed by
/// `<stem>.<n>.qcow2` (n = 0 at the bottom). Returns the files, bottom first.
pub fn export_chain(store: &Store, image: &Image, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let reader = ImageReader::open(store, *image)?;
    let layers: Vec<_> = reader.chain().iter().rev().collect();
    let bs = image.block_size();
    let cluster = format!("cluster_size={bs}");
    let mut files = Vec::new();
    if layers.is_empty() {
        let name = format!("{stem}.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", &cluster]).arg(dir.join(&name)).arg(image.size.to_string()))?;
        return Ok(vec![dir.join(name)]);
    }
    for (n, (layer_id, layer)) in layers.iter().enumerate() {
        let name = if n + 1 == layers.len() { format!("{stem}.qcow2") } else { format!("{stem}.{n}.qcow2") };
        let out = dir.join(&name);
        let _ = std::fs::remove_file(&out);
        // The layer's data blocks in a sparse raw file; zero runs stay unallocated.
        let delta = TempFile(dir.join(format!(".{stem}.{n}.delta.raw")));
        let f = std::fs::File::create(&delta.0).map_err(|e| Error::io(delta.0.display(), e))?;
        f.set_len(image.size).map_err(|e| Error::io(delta.0.display(), e))?;
        let mut zeros = Vec::new();
        map::walk(store, &layer.map, image.block_count(), &mut |_| Ok(()), &mut |index, entry| {
            let offset = index * bs;
            if offset >= image.size {
                return Ok(());
            }
            let len = bs.min(image.size - offset);
            match entry {
                Entry::Data(h) => {
                    let data = store.get_block(&h).with_context(|| format!("layer {layer_id}, block {index}"))?;
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(&data[..len as usize], offset).map_err(|e| Error::io(delta.0.display(), e))
                }
                Entry::Zero => {
                    zeros.push((offset, len));
                    Ok(())
                }
                Entry::Sealed { name, .. } => Err(Error::new(
                    crate::ErrorKind::NoKey,
                    format!("layer {layer_id}, block {index}: sealed block {name}; export an encrypted capsule as raw"),
                )),
            }
        })?;
        drop(f);
        run(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", &cluster]).arg(&delta.0).arg(&out))?;
        if n > 0 {
            let below = files.last().and_then(|p: &PathBuf| p.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            run(Command::new("qemu-img").current_dir(dir).args(["rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", &below, &name]))?;
        }
        // Explicit zeros over a non-zero parent become zero clusters.
        for batch in zeros.chunks(256) {
            let mut cmd = Command::new("qemu-io");
            cmd.current_dir(dir).args(["-f", "qcow2"]);
            for (offset, len) in batch {
                cmd.arg("-c").arg(format!("write -q -z {offset} {len}"));
            }
            cmd.arg(&name);
            run(&mut cmd)?;
        }
        files.push(out);
    }
    Ok(files)
}

/// What a qcow2 file's header says about where its data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// The backing file name, as written in the header.
    pub backing_file: Option<String>,
    /// The backing file's format (header extension), if named.
    pub backing_format: Option<String>,
    /// An external data file (another host file the image's data would come from).
    pub data_file: Option<String>,
    /// Encrypted (AES or LUKS).
    pub encrypted: bool,
}

/// Bytes of a qcow2 file the header parser needs at most (its first cluster, 2 MiB max).
pub const QCOW2_HEADER_READ: usize = 2 << 20;
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;

/// Parses a qcow2 header from the first bytes of a file (at most [`QCOW2_HEADER_READ`]),
/// checking every offset and length against what is there before using it.
pub fn parse_header(bytes: &[u8]) -> Result<Qcow2Header> {
    let bad = |why: String| Error::corrupt(format!("qcow2 header: {why}"));
    let be32 = |at: usize| -> Result<u32> {
        bytes.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).ok_or_else(|| bad(format!("truncated at byte {at}")))
    };
    let be64 = |at: usize| -> Result<u64> { Ok((u64::from(be32(at)?) << 32) | u64::from(be32(at + 4)?)) };
    if bytes.get(..4) != Some(QCOW2_MAGIC) {
        return Err(bad("no qcow2 magic".into()));
    }
    let version = be32(4)?;
    if version != 2 && version != 3 {
        return Err(bad(format!("version {version} (2 and 3 are known)")));
    }
    let backing_offset = be64(8)?;
    let backing_len = be32(16)?;
    let cluster_bits = be32(20)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(format!("cluster bits {cluster_bits} (9 to 21 are valid)")));
    }
    let size = be64(24)?;
    let encrypted = be32(32)? != 0;
    let cluster = 1usize << cluster_bits;
    let (header_len, incompatible) = if version == 3 { (be32(100)? as usize, be64(72)?) } else { (72, 0) };
    if header_len < 72 || header_len > cluster {
        return Err(bad(format!("header length {header_len}")));
    }
    let mut backing_file = None;
    if backing_offset != 0 {
        if backing_len == 0 || backing_len > 1023 {
            return Err(bad(format!("backing file name of {backing_len} bytes (1 to 1023)")));
        }
        let start = usize::try_from(backing_offset)
            .ok()
            .filter(|&o| o < cluster)
            .ok_or_else(|| bad(format!("backing file name at offset {backing_offset}, past the first cluster")))?;
        let name = bytes.get(start..start + backing_len as usize).ok_or_else(|| bad(format!("backing file name at {start} runs past the header read")))?;
        backing_file = Some(String::from_utf8(name.to_vec()).map_err(|_| bad("backing file name is not UTF-8".into()))?);
    }
    // Header extensions: type, length, data padded to 8 bytes; type 0 ends them.
    let (mut backing_format, mut data_file) = (None, None);
    let mut at = header_len;
    for _ in 0..1024 {
        if at + 8 > cluster.min(bytes.len()) {
            break;
        }
        let (ext, len) = (be32(at)?, be32(at + 4)? as usize);
        if ext == 0 {
            break;
        }
        let data = bytes
            .get(at + 8..at + 8 + len)
            .filter(|_| at + 8 + len <= cluster)
            .ok_or_else(|| bad(format!("header extension {ext:#x} of {len} bytes at {at} runs past the first cluster")))?;
        let text = || String::from_utf8(data.to_vec()).map_err(|_| bad(format!("header extension {ext:#x} is not UTF-8")));
        match ext {
            EXT_BACKING_FORMAT => backing_format = Some(text()?),
            EXT_DATA_FILE => data_file = Some(text()?),
            _ => {}
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 && data_file.is_none() {
        data_file = Some(String::new());
    }
    Ok(Qcow2Header { version, size, cluster_bits, backing_file, backing_format, data_file, encrypted })
}

/// Reads and parses the header of qcow2 file `path`.
pub fn read_header(path: &Path) -> Result<Qcow2Header> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path.display(), e))?;
    let mut bytes = Vec::new();
    f.take(QCOW2_HEADER_READ as u64).read_to_end(&mut bytes).map_err(|e| Error::io(path.display(), e))?;
    parse_header(&bytes).map_err(|e| e.context(path.display()))
}

/// Checks the backing chain of qcow2 file `path` from the headers alone, before any tool
/// opens it: every backing file must be one the user named in `allowed` (compared as
/// canonical paths), have its format named in the header (`raw` or `qcow2`: nothing is
/// probed), and no file may use an external data file or encryption. Returns the chain,
/// top first.
pub fn check_chain(path: &Path, allowed: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let allowed: Vec<PathBuf> =
        allowed.iter().map(|p| std::fs::canonicalize(p).map_err(|e| Error::io(format!("--backing-file {}", p.display()), e))).collect::<Result<_>>()?;
    let mut chain = vec![std::fs::canonicalize(path).map_err(|e| Error::io(path.display(), e))?];
    let mut format = "qcow2".to_string();
    while format == "qcow2" {
        let file = chain.last().cloned().unwrap_or_default();
        let h = read_header(&file)?;
        let what = file.display();
        if h.encrypted {
            return Err(Error::invalid(format!("{what}: encrypted qcow2 images are not imported")));
        }
        if let Some(data) = &h.data_file {
            return Err(Error::invalid(format!("{what}: uses an external data file {data:?}; refusing to read another host file")));
        }
        let Some(backing) = h.backing_file else { break };
        if backing.starts_with("json:") || backing.contains("://") {
            return Err(Error::invalid(format!("{what}: backing file {backing:?} is not a plain file name; refusing it")));
        }
        let resolved = file.parent().unwrap_or(Path::new("/")).join(&backing);
        let canonical = std::fs::canonicalize(&resolved).ok().filter(|c| allowed.contains(c)).ok_or_else(|| {
            Error::invalid(format!(
                "{what} names backing file {backing:?} ({}), which was not named with --backing-file; refusing to read it",
                resolved.display()
            ))
        })?;
        if chain.contains(&canonical) {
            return Err(Error::invalid(format!("{what}: backing chain loops back to {}", canonical.display())));
        }
        format = match h.backing_format.as_deref() {
            Some(f @ ("qcow2" | "raw")) => f.to_string(),
            Some(f) => return Err(Error::invalid(format!("{what}: backing file {backing:?} has format {f:?} (raw or qcow2 are imported)"))),
            None => {
                return Err(Error::invalid(format!(
                    "{what}: backing file {backing:?} has no format in the header; refusing to probe it (set one: qemu-img rebase -u -F qcow2|raw)"
                )))
            }
        };
        chain.push(canonical);
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, backing: Option<&str>, extensions: &[(u32, &[u8])]) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        let mut at = if version == 3 { 104 } else { 72 };
        if version == 3 {
            h[100..104].copy_from_slice(&104u32.to_be_bytes());
        }
        for (t, data) in extensions {
            h[at..at + 4].copy_from_slice(&t.to_be_bytes());
            h[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            h[at + 8..at + 8 + data.len()].copy_from_slice(data);
            at += 8 + data.len().div_ceil(8) * 8;
        }
        if let Some(b) = backing {
            let off = 2048u64;
            h[8..16].copy_from_slice(&off.to_be_bytes());
            h[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
            h[off as usize..off as usize + b.len()].copy_from_slice(b.as_bytes());
        }
        h
    }

    #[test]
    fn header_names_backing_file_format_and_data_file() {
        let h = parse_header(&header(3, Some("/etc/passwd"), &[(EXT_BACKING_FORMAT, b"raw")])).unwrap();
        assert_eq!((h.version, h.size, h.cluster_bits), (3, 1 << 20, 16));
        assert_eq!(h.backing_file.as_deref(), Some("/etc/passwd"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        let h = parse_header(&header(2, None, &[])).unwrap();
        assert_eq!((h.backing_file, h.data_file), (None, None));
        let h = parse_header(&header(3, None, &[(EXT_DATA_FILE, b"/etc/shadow")])).unwrap();
        assert_eq!(h.data_file.as_deref(), Some("/etc/shadow"));
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        let good = header(3, Some("base.qcow2"), &[(EXT_BACKING_FORMAT, b"qcow2")]);
        for cut in [0, 3, 4, 20, 71, 100, 2050] {
            assert!(parse_header(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut far = good.clone();
        far[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(parse_header(&far).unwrap_err().to_string().contains("past the first cluster"));
        let mut long_ext = header(3, None, &[(EXT_DATA_FILE, b"x")]);
        long_ext[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_header(&long_ext).is_err());
        let mut bits = good;
        bits[20..24].copy_from_slice(&64u32.to_be_bytes());
        assert!(parse_header(&bits).unwrap_err().to_string().contains("cluster bits 64"));
    }
}
