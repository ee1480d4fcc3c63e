//! What a read brings along besides its own blocks: earned readahead for disks, the
//! whole file for the kernel and initrd, the aligned group of a RAM fault.

use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use capsule_fetch::readahead::{blocks_ahead, Readahead};
use capsule_images::map::Entry;
use capsule_images::{Hash, Image, Layer};

use super::{CapsuleFs, DECODE_AHEAD_BYTES, DECODE_AHEAD_HORIZON, MAX_READAHEAD_BYTES};
use crate::overlay::Overlay;

impl CapsuleFs {
    /// The blocks of `range` (block indexes, clipped to the image) that are mapped, not
    /// overlaid, and that `keep` wants. What a read brings along is only a help, so a block
    /// whose map cannot be resolved (a page neither cached nor fetchable: offline, or the
    /// server gone) ends the list there rather than failing the read that asked.
    fn blocks_in(&self, image: &Image, chain: &[(Hash, Layer)], overlay: Option<&Overlay>, range: Range<u64>, keep: impl Fn(u64, &Entry) -> bool) -> Vec<Hash> {
        let mut out = Vec::new();
        for j in range.start..range.end.min(image.block_count()) {
            if overlay.is_some_and(|o| o.state(j) != crate::overlay::NONE) {
                continue;
            }
            match self.resolve_entry(chain, j) {
                Ok(Some(e)) if keep(j, &e) => out.extend(e.block()),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("blocks brought along stop at block {j}: {e}");
                    break;
                }
            }
        }
        out
    }

    /// Every block of the file that is mapped, not overlaid and not here.
    pub(super) fn whole_plan(&self, image: &Image, chain: &[(Hash, Layer)], overlay: Option<&Overlay>) -> Vec<Hash> {
        self.blocks_in(image, chain, overlay, 0..image.block_count(), |_, e| !self.is_here(e))
    }

    /// The other blocks of block `i`'s aligned group of `n` that a fetch could bring along:
    /// mapped, not overlaid, not here.
    pub(super) fn cluster_plan(&self, image: &Image, chain: &[(Hash, Layer)], overlay: Option<&Overlay>, i: u64, n: u64) -> Vec<Hash> {
        let start = i - i % n;
        self.blocks_in(image, chain, overlay, start..start + n, |j, e| j != i && !self.is_here(e))
    }

    /// Up to `n` blocks after block `last`: mapped, not overlaid, not here.
    pub(super) fn neighbour_plan(&self, image: &Image, chain: &[(Hash, Layer)], overlay: Option<&Overlay>, last: u64, n: u64) -> Vec<Hash> {
        self.blocks_in(image, chain, overlay, last + 1..last + 1 + n, |_, e| !self.is_here(e))
    }

    /// Blocks to fetch ahead of this read, if its stream earned readahead
    /// ([`capsule_fetch::readahead`]): mapped, not overlaid, not here.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn readahead_plan(
        &self,
        image: &Image,
        chain: &[(Hash, Layer)],
        overlay: Option<&Overlay>,
        state: &Mutex<Readahead>,
        offset: u64,
        end: u64,
        missed: bool,
    ) -> Vec<Hash> {
        let budget = self.engine.readahead_budget(MAX_READAHEAD_BYTES, image.block_size());
        let range = state.lock().unwrap_or_else(|p| p.into_inner()).on_read(std::time::Instant::now(), offset, end - offset, missed, budget);
        let Some((from, to)) = range else { return Vec::new() };
        self.blocks_in(image, chain, overlay, blocks_ahead(from, to, image.block_size()), |_, e| !self.is_here(e))
    }

    /// Names the blocks after a read that found all its own blocks here to the engine, to
    /// be decoded on other threads before the reader gets there, once its stream reads
    /// sequentially ([`capsule_fetch::Engine::decode_ahead`]; blocks not in the cache are
    /// skipped there, off the reader's thread). The window is what the stream reads in
    /// [`DECODE_AHEAD_HORIZON`], so a slow reader holds little memory.
    pub(super) fn decode_ahead(&self, image: &Image, chain: &[(Hash, Layer)], overlay: Option<&Overlay>, state: &Mutex<Readahead>, offset: u64, end: u64) {
        let bs = image.block_size();
        let budget = capsule_fetch::readahead::Budget { horizon: DECODE_AHEAD_HORIZON, link_rate: None, max_window: DECODE_AHEAD_BYTES, block_size: bs };
        // Always "missed": decoding what is here costs no link bytes, so any sequential
        // stream earns it.
        let range = state.lock().unwrap_or_else(|p| p.into_inner()).on_read(std::time::Instant::now(), offset, end - offset, true, budget);
        let Some((from, to)) = range else { return };
        self.engine.decode_ahead(&self.blocks_in(image, chain, overlay, blocks_ahead(from, to, bs), |_, _| true));
    }
}

/// Pages a RAM fault fetches at once when the cluster is left to the link: a round trip
/// costs what a few bandwidth-delay products of extra pages cost, and a guest's first
/// touches after a resume are loosely clustered, so on a long link a fault brings its
/// aligned group along (4 bandwidth-delay products' worth, 4 to 16 pages); on a LAN (under
/// 2 ms) round trips are cheap and only the faulting page travels.
pub fn auto_cluster(rtt: Option<Duration>, bandwidth: Option<f64>, block_size: u64) -> u64 {
    let Some(rtt) = rtt else { return 1 };
    if rtt < Duration::from_millis(2) {
        return 1;
    }
    // Before a bandwidth is measured, assume a 10 Mbit/s link.
    let bdp = bandwidth.unwrap_or(1.25e6) * rtt.as_secs_f64();
    let pages = (4.0 * bdp / block_size.max(1) as f64).max(1.0) as u64;
    pages.next_power_of_two().clamp(4, 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_fault_clusters_follow_the_link() {
        let ms = Duration::from_millis;
        assert_eq!(auto_cluster(None, None, 4096), 1, "nothing measured yet");
        assert_eq!(auto_cluster(Some(ms(0)), Some(1e9), 4096), 1, "loopback");
        assert_eq!(auto_cluster(Some(ms(1)), Some(1e8), 4096), 1, "a LAN");
        assert_eq!(auto_cluster(Some(ms(40)), Some(2e6 / 8.0), 4096), 16, "2 Mbit/s, 40 ms: 10 KB BDP, 4 of them");
        assert_eq!(auto_cluster(Some(ms(40)), Some(0.384e6 / 8.0), 4096), 4, "384 kbit/s keeps the floor");
        assert_eq!(auto_cluster(Some(ms(200)), Some(1.25e7), 4096), 16, "capped");
    }
}
