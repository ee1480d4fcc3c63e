//! Where a read's blocks come from when the capsule is encrypted: map entries with a
//! sealed block's masked plaintext hash, seeds matched by that hash, and the opening of a
//! fetched ciphertext (see `capsule_images::seal`).

use capsule_images::{Entry, Hash, Layer};

use super::CapsuleFs;
use crate::error::Result;

impl CapsuleFs {
    /// Block `i`'s entry if it names a stored block (`None` for zero).
    pub(super) fn resolve_entry(&self, chain: &[(Hash, Layer)], i: u64) -> Result<Option<Entry>> {
        // A map path brings its block along only where no seed may hold it: a seeded
        // block must not travel (`blocks_fetched` counts it).
        let offer_to = self.local.seeds_empty().then_some(&*self.engine);
        Ok(self.pages.resolve_entry(chain, i, offer_to)?.filter(|e| e.block().is_some()))
    }

    /// A sealed block's plaintext from a seed, matched by its plaintext hash (the seeds
    /// are indexed by plaintext hashes; the stored name is the ciphertext's).
    pub(super) fn sealed_from_seed(&self, entry: &Entry) -> Option<Vec<u8>> {
        match (entry, &self.key) {
            (Entry::Sealed { name, masked_plain }, Some(k)) if !self.local.seeds_empty() => self.local.seed(&k.plain_hash(name, masked_plain)),
            _ => None,
        }
    }

    /// True if block `h` (an entry's stored name) needs no fetch: cached, or a sealed
    /// block a seed holds.
    pub(super) fn is_here(&self, entry: &Entry) -> bool {
        entry.block().is_some_and(|h| self.engine.is_local(&h))
            || match (entry, &self.key) {
                (Entry::Sealed { name, masked_plain }, Some(k)) if !self.local.seeds_empty() => self.local.seed_has(&k.plain_hash(name, masked_plain)),
                _ => false,
            }
    }

    /// The plaintext of a stored block: a sealed one decrypted and checked (a failed tag is
    /// a corrupt block: EIO, never other bytes).
    pub(super) fn open(&self, entry: &Entry, stored: &[u8]) -> Result<Vec<u8>> {
        Ok(capsule_images::image::open_block(entry, self.key.as_ref(), stored.to_vec())?)
    }
}
