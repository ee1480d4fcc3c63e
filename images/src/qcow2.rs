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
use crate::import::{import_file, FileImport, ImportStats, Progress};
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
pub fn import_chain(store: &Store, path: &Path, block_size_log2: u8, progress: &dyn Progress) -> Result<(Image, Vec<ChainLayer>)> {
    let info = json(&run(Command::new("qemu-img").args(["info", "--output=json", "--backing-chain"]).arg(path))?, "qemu-img info")?;
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
        let opts = FileImport { block_size_log2, parent: reader.as_ref(), only: only.as_deref(), threads: 0, progress };
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
