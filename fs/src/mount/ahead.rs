//! What a read brings along besides its own blocks: earned readahead for disks, the
//! whole file for the kernel and initrd, the aligned group of a RAM fault.

use std::sync::Mutex;
use std::time::Duration;

use capsule_fetch::readahead::{blocks_ahead, Readahead};
use capsule_images::{Hash, Image, Layer};

use super::{CapsuleFs, DECODE_AHEAD_BYTES, DECODE_AHEAD_HORIZON, MAX_READAHEAD_BYTES};
use crate::error::Result;
use crate::overlay::Overlay;

impl CapsuleFs {
    /// Every block of the file that is mapped, not overlaid and not here.
    pub(super) fn whole_plan(&self, image: &Image, chain: &[(Hash, Layer)], overlay: Option<&Overlay>) -> Result<Vec<Hash>> {
        let mut out = Vec::new();
        for j in 0..image.block_count() {
            if overlay.is_some_and(|o| o.state(j) != crate::overlay::NONE) {
                continue;
            }
            if let Some(e) = self.resolve_entry(chain, j)? {
                if !self.is_here(&e) {
                    out.extend(e.block());
                }
            }
        }
        Ok(out)
    }

    /// The other blocks of block `i`'s aligned group of `n` that a fetch could bring along:
    /// mapped, not overlaid, not here.
    pub(super) fn cluster_plan(&self, image: &Image, chain: &[(Hash, Layer)], overlay: Option<&Overlay>, i: u64, n: u64) -> Result<Vec<Hash>> {
        let start = i - i % n;
        let mut out = Vec::new();
        for j in start..(start + n).min(image.block_count()) {
            if j == i || overlay.is_some_and(|o| o.state(j) != crate::overlay::NONE) {
                continue;
            }
            if let Some(e) = self.resolve_entry(chain, j)? {
                let h = e.block().unwrap_or(Hash([0; 32]));
                if !self.is_here(&e) && !out.contains(&h) {
                    out.push(h);
                }
            }
        }
        Ok(out)
    }

    /// Up to `n` blocks after block `last`: mapped, not overlaid, not here.
    pub(super) fn neighbour_plan(&self, image: &Image, chain: &[(Hash, Layer)], overlay: Option<&Overlay>, last: u64, n: u64) -> Result<Vec<Hash>> {
        let mut out = Vec::new();
        for j in last + 1..(last + 1 + n).min(image.block_count()) {
            if overlay.is_some_and(|o| o.state(j) != crate::overlay::NONE) {
                continue;
            }
            if let Some(e) = self.resolve_entry(chain, j)? {
                let h = e.block().unwrap_or(Hash([0; 32]));
                if !self.is_here(&e) && !out.contains(&h) {
                    out.push(h);
                }
            }
        }
        Ok(out)
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
    ) -> Result<Vec<Hash>> {
        let range = state.lock().unwrap_or_else(|p| p.into_inner()).on_read(
            std::time::Instant::now(),
            offset,
            end - offset,
            missed,
            self.engine.readahead_budget(MAX_READAHEAD_BYTES, image.block_size()),
        );
        let Some((from, to)) = range else { return Ok(Vec::new()) };
        let bs = image.block_size();
        let mut ahead = Vec::new();
        let blocks = blocks_ahead(from, to, bs);
        for i in blocks.start..blocks.end.min(image.block_count()) {
            if overlay.is_some_and(|o| o.state(i) != crate::overlay::NONE) {
                continue;
            }
            if let Some(e) = self.resolve_entry(chain, i)? {
                if !self.is_here(&e) {
                    ahead.extend(e.block());
                }
            }
        }
        Ok(ahead)
    }
}

impl CapsuleFs {
    /// Names the blocks after this read that the local cache holds to the engine, to be
    /// decoded on other threads before the reader gets there, once its stream reads
    /// sequentially ([`capsule_fetch::Engine::decode_ahead`]). The window is what the
    /// stream reads in [`DECODE_AHEAD_HORIZON`], so a slow reader holds little memory.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn decode_ahead(&self, image: &Image, chain: &[(Hash, Layer)], overlay: Option<&Overlay>, state: &Mutex<Readahead>, offset: u64, end: u64) {
        let bs = image.block_size();
        let budget = capsule_fetch::readahead::Budget { horizon: DECODE_AHEAD_HORIZON, link_rate: None, max_window: DECODE_AHEAD_BYTES, block_size: bs };
        // Always "missed": decoding what is here costs no link bytes, so any sequential
        // stream earns it.
        let range = state.lock().unwrap_or_else(|p| p.into_inner()).on_read(std::time::Instant::now(), offset, end - offset, true, budget);
        let Some((from, to)) = range else { return };
        let mut ahead = Vec::new();
        let blocks = blocks_ahead(from, to, bs);
        for i in blocks.start..blocks.end.min(image.block_count()) {
            if overlay.is_some_and(|o| o.state(i) != crate::overlay::NONE) {
                continue;
            }
            match self.resolve_entry(chain, i) {
                Ok(entry) => ahead.extend(entry.and_then(|e| e.block()).filter(|h| self.engine.is_local(h))),
                // A map page not here (offline, or the server gone): what comes before it
                // is still worth decoding, and the read itself must not fail for it.
                Err(e) => {
                    tracing::debug!("decoding ahead stops at block {i}: {e}");
                    break;
                }
            }
        }
        self.engine.decode_ahead(&ahead);
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
