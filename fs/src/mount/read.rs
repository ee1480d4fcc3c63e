//! How a read of an image file is served: its blocks resolved through the overlay, the
//! layer chain and the seeds, the missing ones asked of the fetch engine in one request
//! together with what the read brings along (readahead, neighbours, a RAM fault's group),
//! then sliced into the reply.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use capsule_fetch::Urgency;
use capsule_images::{Entry, Hash, Image, Layer};

use super::ahead::auto_cluster;
use super::{Ahead, CapsuleFs, Content, Node};
use crate::error::{Error, ErrorKind, Result};
use crate::overlay::{Overlay, DATA, ZERO};

impl CapsuleFs {
    /// The verified content of block `h`, fetching it if needed.
    pub(super) fn block(&self, h: &Hash) -> Result<Arc<Vec<u8>>> {
        let mut got = self.engine.get(&[*h], &[], Urgency::Demand, u32::MAX)?;
        got.pop().ok_or_else(|| Error::new(ErrorKind::Missing, format!("block {h} could not be fetched")))
    }

    /// Current content of block `i` of an image (overlay first).
    pub(super) fn block_content(&self, image: &Image, chain: &[(Hash, Layer)], overlay: Option<&Overlay>, i: u64) -> Result<Vec<u8>> {
        if let Some(o) = overlay {
            match o.state(i) {
                DATA => return o.read_block(i).map_err(|e| Error::io("overlay", e)),
                ZERO => return Ok(vec![0; image.block_size() as usize]),
                _ => {}
            }
        }
        match self.resolve_entry(chain, i)? {
            None => Ok(vec![0; image.block_size() as usize]),
            Some(entry) => {
                let h = entry.block().unwrap_or(Hash([0; 32]));
                let b = match self.sealed_from_seed(&entry) {
                    Some(plain) => plain,
                    None => match entry {
                        Entry::Sealed { .. } => self.open(&entry, &self.block(&h)?)?,
                        _ => self.block(&h)?.as_ref().clone(),
                    },
                };
                check_len(&h, &b, image.block_size())?;
                Ok(b)
            }
        }
    }

    /// Appends the bytes of `[offset, offset+size)` of an image file to `out` (a buffer
    /// the caller reuses: a fresh megabyte per read cost more in page faults than the copy).
    pub(super) fn read_image(&self, tag: u32, node: &Node, offset: u64, size: u32, out: &mut Vec<u8>) -> Result<()> {
        let Content::Image { image, chain, overlay, readahead, neighbours, decode_ahead } = &node.content else {
            return Err(Error::new(ErrorKind::Invalid, "not an image"));
        };
        let end = image.size.min(offset.saturating_add(u64::from(size)));
        if offset >= end {
            return Ok(());
        }
        let bs = image.block_size();
        let (first, last) = (offset / bs, (end - 1) / bs);
        let overlay = overlay.as_ref();
        // Resolve every block first so missing ones travel in one request.
        let mut plan = Vec::with_capacity((last - first + 1) as usize);
        for i in first..=last {
            let src = match overlay.map(|o| o.state(i)) {
                Some(DATA) | Some(ZERO) => None,
                _ => self.resolve_entry(chain, i)?,
            };
            // A sealed block a seed holds does not travel.
            let seeded = src.as_ref().and_then(|e| self.sealed_from_seed(e));
            plan.push((i, src, seeded));
        }
        if let Some(r) = &self.recorder {
            r.touch(&plan.iter().filter_map(|(_, e, _)| e.and_then(|e| e.block())).collect::<Vec<_>>());
        }
        let demand: Vec<Hash> = plan.iter().filter(|(_, _, s)| s.is_none()).filter_map(|(_, e, _)| e.and_then(|e| e.block())).collect();
        let missed = demand.iter().any(|h| !self.engine.is_local(h));
        // A read that waits for the link has nothing decoded ahead: its next blocks are
        // not here either.
        if matches!(node.ahead, Ahead::Sequential) && !missed {
            self.decode_ahead(image, chain, overlay, decode_ahead, offset, end);
        }
        let (extra, extra_urgency) = if self.engine.is_online() {
            match node.ahead {
                Ahead::Sequential => {
                    let mut plan = self.readahead_plan(image, chain, overlay, readahead, offset, end, missed);
                    let mut near = neighbours.lock().unwrap_or_else(|p| p.into_inner());
                    near.on_read(first, last);
                    if plan.is_empty() && missed && near.on_miss(first, last) {
                        let n = capsule_fetch::readahead::neighbours_on_miss(self.engine.rtt(), self.engine.capacity(), self.engine.block_bytes(), bs);
                        for j in last + 1..=last + n {
                            near.sent(j);
                        }
                        if n > 0 {
                            plan = self.neighbour_plan(image, chain, overlay, last, n);
                        }
                    }
                    (plan, Urgency::Readahead)
                }
                // Past the first block: a resume reads only the kernel's header (for its
                // stand-in), and must not bring the rest.
                Ahead::Whole if missed && last > 0 && !node.asked_whole.swap(true, Ordering::Relaxed) => {
                    (self.whole_plan(image, chain, overlay), Urgency::Readahead)
                }
                Ahead::Whole => (Vec::new(), Urgency::Readahead),
                // A RAM fault brings its group along, in the same request, if it fetches at all.
                Ahead::Aligned(n) if missed && (n > 1 || n == 0) => {
                    let n = if n == 0 { auto_cluster(self.engine.rtt(), self.engine.bandwidth(), image.block_size()) } else { n };
                    (if n > 1 { self.cluster_plan(image, chain, overlay, first, n) } else { Vec::new() }, Urgency::Demand)
                }
                Ahead::Aligned(_) => (Vec::new(), Urgency::Demand),
            }
        } else {
            (Vec::new(), Urgency::Demand)
        };
        let mut extra = extra;
        if let Some(profile) = self.profile.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            extra.retain(|h| profile.contains(h));
        }
        let blocks = self.engine.get_with(&demand, Urgency::Demand, &extra, extra_urgency, tag)?;
        let mut blocks = blocks.into_iter();
        out.reserve((end - offset) as usize);
        for (i, src, seeded) in plan {
            let block_start = i * bs;
            let from = (offset.max(block_start) - block_start) as usize;
            let to = (end.min(block_start + bs) - block_start) as usize;
            match (src, seeded) {
                (Some(entry), Some(plain)) => {
                    check_len(&entry.block().unwrap_or(Hash([0; 32])), &plain, bs)?;
                    out.extend_from_slice(&plain[from..to]);
                }
                (Some(entry), None) => {
                    let h = entry.block().unwrap_or(Hash([0; 32]));
                    let b = blocks.next().ok_or_else(|| Error::new(ErrorKind::Missing, format!("block {h} of {} was not fetched", node.name)))?;
                    let b = match entry {
                        Entry::Sealed { .. } => std::borrow::Cow::Owned(self.open(&entry, &b).map_err(|e| e.context(format!("{}, block {i}", node.name)))?),
                        _ => std::borrow::Cow::Borrowed(b.as_slice()),
                    };
                    check_len(&h, &b, bs)?;
                    out.extend_from_slice(&b[from..to]);
                }
                // A zero block with no overlay data over it: zeros, without a block of them.
                (None, _) if overlay.is_none_or(|o| o.state(i) == crate::overlay::NONE) => out.resize(out.len() + (to - from), 0),
                (None, _) => out.extend_from_slice(&self.block_content(image, chain, overlay, i)?[from..to]),
            }
        }
        Ok(())
    }
}

/// A block that hashes right but has the wrong length (a hostile capsule) must not be
/// sliced past its end: it fails the read instead.
fn check_len(h: &Hash, block: &[u8], block_size: u64) -> Result<()> {
    if block.len() as u64 != block_size {
        return Err(Error::new(ErrorKind::Corrupt, format!("block {h} holds {} bytes where the image's block size is {block_size}", block.len())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_of_the_wrong_length_fails_instead_of_being_sliced() {
        let h = Hash::of(b"short");
        assert!(check_len(&h, &[0; 65536], 65536).is_ok());
        for wrong in [0usize, 4096, 65535, 65537] {
            let err = check_len(&h, &vec![0; wrong], 65536).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{wrong} bytes: {err}");
        }
    }
}
