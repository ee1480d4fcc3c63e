//! Exporting images to raw files (sparse: zero blocks are holes).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result, ResultExt};
use crate::image::ImageReader;
use crate::import::Progress;
use crate::manifest::Image;
use crate::store::Store;

/// Writes `image` to `out` as a raw file, verifying every block; returns bytes of data written.
pub fn export_raw(store: &Store, image: &Image, out: &Path, progress: &dyn Progress) -> Result<u64> {
    let reader = ImageReader::open(store, *image)?;
    let file = File::create(out).map_err(|e| Error::io(out.display(), e))?;
    file.set_len(image.size).map_err(|e| Error::io(out.display(), e))?;
    let bs = image.block_size();
    let nblocks = image.block_count();
    let next = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    progress.begin(&out.display().to_string(), image.size);
    let work = || -> Result<()> {
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= nblocks || failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let offset = index * bs;
            let len = bs.min(image.size - offset);
            if let Some(h) = reader.resolve(index)? {
                let data = store.get_block(&h).with_context(|| format!("block {index}"))?;
                file.write_all_at(&data[..len as usize], offset).map_err(|e| Error::io(out.display(), e))?;
                written.fetch_add(len, Ordering::Relaxed);
            }
            progress.advance(len);
        }
    };
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let r = work();
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::invalid("export worker panicked")))).collect()
    });
    progress.end();
    results.into_iter().collect::<Result<Vec<()>>>()?;
    file.sync_all().map_err(|e| Error::io(out.display(), e))?;
    Ok(written.into_inner())
}
