//! The write path of an image file: whole blocks and read-modify-write of partial ones
//! into the overlay, and ranges punched to zero.

use super::*;

impl CapsuleFs {
    pub(super) fn write_image(&self, node: &Node, offset: u64, data: &[u8]) -> Result<u32> {
        let Content::Image { image, chain, overlay, .. } = &node.content else { return Err(Error::new(ErrorKind::ReadOnly, "read-only file")) };
        let Some(overlay) = overlay.as_ref() else { return Err(Error::new(ErrorKind::ReadOnly, "mounted read-only")) };
        let end = offset.checked_add(data.len() as u64).filter(|&e| e <= image.size).ok_or_else(|| {
            Error::new(ErrorKind::TooBig, format!("write at {offset} of {} bytes past the end of {} ({} bytes)", data.len(), node.name, image.size))
        })?;
        if data.is_empty() {
            return Ok(0);
        }
        let bs = image.block_size();
        for i in offset / bs..=(end - 1) / bs {
            let block_start = i * bs;
            let from = offset.max(block_start);
            let to = end.min(block_start + bs);
            let chunk = &data[(from - offset) as usize..(to - offset) as usize];
            let _guard = overlay.lock_block(i);
            let mut block = if to - from == bs { vec![0; bs as usize] } else { self.block_content(image, chain, Some(overlay), i)? };
            block[(from - block_start) as usize..(to - block_start) as usize].copy_from_slice(chunk);
            self.write_overlay_block(overlay, &node.name, i, &block)?;
        }
        self.stats.bytes_written.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data.len() as u32)
    }

    /// Writes a block to the overlay; on a full disk, evicts cached blocks once and retries,
    /// then reports ENOSPC to the writer.
    pub(super) fn write_overlay_block(&self, overlay: &Overlay, name: &str, i: u64, block: &[u8]) -> Result<()> {
        match overlay.write_block(i, block) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                let freed = self.cache.free(64 * block.len() as u64);
                warn!("disk full writing the overlay of {name}: evicted {freed} bytes of cached blocks");
                overlay.write_block(i, block).map_err(|e| Error::io(format!("overlay of {name}, block {i}"), e))
            }
            r => r.map_err(|e| Error::io(format!("overlay of {name}, block {i}"), e)),
        }
    }

    pub(super) fn zero_range(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        let Content::Image { image, chain, overlay, .. } = &node.content else { return Err(Error::new(ErrorKind::ReadOnly, "read-only file")) };
        let Some(overlay) = overlay.as_ref() else { return Err(Error::new(ErrorKind::ReadOnly, "mounted read-only")) };
        let end = image.size.min(offset.saturating_add(len));
        if offset >= end {
            return Ok(());
        }
        let bs = image.block_size();
        for i in offset / bs..=(end - 1) / bs {
            let block_start = i * bs;
            let (from, to) = (offset.max(block_start), end.min(block_start + bs));
            let _guard = overlay.lock_block(i);
            if to - from == bs.min(image.size - block_start) {
                overlay.zero_block(i).map_err(|e| Error::io(format!("overlay of {}", node.name), e))?;
            } else {
                let mut block = self.block_content(image, chain, Some(overlay), i)?;
                block[(from - block_start) as usize..(to - block_start) as usize].fill(0);
                self.write_overlay_block(overlay, &node.name, i, &block)?;
            }
        }
        Ok(())
    }
}
