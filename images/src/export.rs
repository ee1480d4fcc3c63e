//! Exporting images to raw files (sparse: zero blocks are holes).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::image::ImageReader;
use crate::import::Progress;
use crate::manifest::Image;
use crate::parallel::run_workers;
use crate::store::Store;

/// Writes `image` to `out` as a raw file, verifying every block (opening sealed ones with
/// `key`); returns bytes of data written.
pub fn export_raw(store: &Store, image: &Image, key: Option<&crate::seal::Key>, out: &Path, progress: &dyn Progress) -> Result<u64> {
    let reader = ImageReader::open(store, *image)?.with_key(key.cloned());
    let file = File::create(out).map_err(|e| Error::io(out.display(), e))?;
    file.set_len(image.size).map_err(|e| Error::io(out.display(), e))?;
    let bs = image.block_size();
    let nblocks = image.block_count();
    let next = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    progress.begin(&out.display().to_string(), image.size);
    let work = |stop: &AtomicBool| -> Result<()> {
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= nblocks || stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let offset = index * bs;
            let len = bs.min(image.size - offset);
            if reader.resolve(index)?.is_some() {
                let data = reader.read_block(index)?;
                file.write_all_at(&data[..len as usize], offset).map_err(|e| Error::io(out.display(), e))?;
                written.fetch_add(len, Ordering::Relaxed);
            }
            progress.advance(len);
        }
    };
    let result = run_workers(0, &work);
    progress.end();
    result?;
    file.sync_all().map_err(|e| Error::io(out.display(), e))?;
    Ok(written.into_inner())
}
