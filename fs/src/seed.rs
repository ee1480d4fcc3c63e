//! Seeds: local files (an older image, an installer ISO) indexed by block hash, so blocks
//! they contain never travel, as the paper's hash cache and casync's seeds do. A seed is
//! read again and verified when used: one that changed since it was indexed is skipped.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use capsule_images::block::is_zero;
use capsule_images::Hash;
use tracing::{info, warn};

/// Block hash -> where a seed holds it.
#[derive(Debug, Default)]
pub struct Seeds {
    files: Vec<(PathBuf, File)>,
    index: HashMap<Hash, (usize, u64, u64)>,
}

impl Seeds {
    /// Indexes `paths` at each of `block_sizes`.
    pub fn index(paths: &[PathBuf], block_sizes: &[u64]) -> std::io::Result<Self> {
        let mut seeds = Self::default();
        for path in paths {
            let file = File::open(path).map_err(|e| std::io::Error::new(e.kind(), format!("seed {}: {e}", path.display())))?;
            let size = file.metadata()?.len();
            let n = seeds.files.len();
            let before = seeds.index.len();
            for &bs in block_sizes {
                let mut buf = vec![0u8; bs as usize];
                let mut offset = 0;
                while offset < size {
                    let len = bs.min(size - offset) as usize;
                    file.read_exact_at(&mut buf[..len], offset)?;
                    buf[len..].fill(0);
                    if !is_zero(&buf) {
                        seeds.index.entry(Hash::of(&buf)).or_insert((n, offset, bs));
                    }
                    offset += bs;
                }
            }
            info!("seed {}: {} blocks indexed", path.display(), seeds.index.len() - before);
            seeds.files.push((path.clone(), file));
        }
        Ok(seeds)
    }

    /// True if no seed was given.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Blocks indexed.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True if a seed was indexed with this block (it is verified when read).
    pub fn contains(&self, h: &Hash) -> bool {
        self.index.contains_key(h)
    }

    /// The block's raw bytes from a seed, if a seed holds it and still matches.
    pub fn get(&self, h: &Hash) -> Option<Vec<u8>> {
        let &(file, offset, bs) = self.index.get(h)?;
        let (path, f) = &self.files[file];
        let mut buf = vec![0u8; bs as usize];
        let n = read_up_to(f, &mut buf, offset).ok()?;
        buf[n..].fill(0);
        if Hash::of(&buf) != *h {
            warn!("seed {} changed at offset {offset} since it was indexed; not using it for block {h}", path.display());
            return None;
        }
        Some(buf)
    }
}

fn read_up_to(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}
