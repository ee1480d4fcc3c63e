//! A Bloom filter over one pack's block hashes, so a lookup among many packs searches
//! about one index instead of every pack's. Block hashes are BLAKE3 digests, uniform
//! already: the probes are slices of the hash itself, nothing is hashed again.

use crate::hash::Hash;

/// Probes per hash: with 10 to 20 bits per hash, under 1% false positives.
const PROBES: usize = 7;

#[derive(Debug)]
pub(crate) struct HashFilter {
    bits: Vec<u64>,
    mask: u32,
}

impl HashFilter {
    /// A filter holding `hashes`: at least 10 bits each, rounded up to a power of two.
    pub(crate) fn new<'a>(hashes: impl ExactSizeIterator<Item = &'a Hash>) -> Self {
        let nbits = (hashes.len().max(1) * 10).next_power_of_two().max(64);
        let mut filter = Self { bits: vec![0; nbits / 64], mask: u32::try_from(nbits - 1).unwrap_or(u32::MAX) };
        for h in hashes {
            for bit in probes(filter.mask, h) {
                filter.bits[bit / 64] |= 1 << (bit % 64);
            }
        }
        filter
    }

    /// False if the pack surely lacks `h`.
    pub(crate) fn may_hold(&self, h: &Hash) -> bool {
        probes(self.mask, h).into_iter().all(|bit| self.bits[bit / 64] & (1 << (bit % 64)) != 0)
    }
}

/// The filter's bits for `h`: its first `PROBES` little-endian u32s under `mask`.
fn probes(mask: u32, h: &Hash) -> [usize; PROBES] {
    std::array::from_fn(|i| (u32::from_le_bytes(h.0[i * 4..i * 4 + 4].try_into().expect("4 bytes")) & mask) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_passes_and_few_strangers_do() {
        let members: Vec<Hash> = (0..10_000u32).map(|i| Hash::of(&i.to_le_bytes())).collect();
        let filter = HashFilter::new(members.iter());
        assert!(members.iter().all(|h| filter.may_hold(h)));
        let false_positives = (10_000..110_000u32).filter(|i| filter.may_hold(&Hash::of(&i.to_le_bytes()))).count();
        assert!(false_positives < 1_000, "{false_positives} of 100,000 strangers passed");
        assert!(!HashFilter::new([].iter()).may_hold(&members[0]));
    }
}
