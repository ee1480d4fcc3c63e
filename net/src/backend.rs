//! What the server serves from: a trait, so an object store can stand in for the local
//! store later without touching the protocol.

use capsule_images::envelope::ObjectKind;
use capsule_images::{Hash, Store};

use crate::error::{Error, ErrorKind, Result};

/// Block, object and ref storage behind `capsule serve`.
pub trait Backend: Send + Sync + 'static {
    /// A block as stored (its encoding, compressed or raw).
    fn read_encoded_block(&self, hash: &Hash) -> Result<Vec<u8>>;
    /// [`Self::read_encoded_block`] from a copy checked against its hash: a client asked
    /// again for a block it was sent, which may have arrived corrupt. A backend with more
    /// than one copy reads the next when one does not verify, and stops counting it.
    fn read_checked_block(&self, hash: &Hash) -> Result<Vec<u8>> {
        let encoded = self.read_encoded_block(hash)?;
        capsule_images::block::decode(hash, &encoded).map_err(|e| Error::new(ErrorKind::Corrupt, format!("block {hash} is damaged on the server: {e}")))?;
        Ok(encoded)
    }
    /// True if the block is present.
    fn has_block(&self, hash: &Hash) -> bool;
    /// The blocks among `hashes` that are absent, in their order.
    fn missing_blocks(&self, hashes: Vec<Hash>) -> Vec<Hash> {
        hashes.into_iter().filter(|h| !self.has_block(h)).collect()
    }
    /// Stores a block after verifying it; true if it was new.
    fn put_encoded_block(&self, hash: &Hash, encoded: &[u8]) -> Result<bool>;
    /// A batch for the blocks of one upload, stored together when it finishes, where
    /// the backend does better so than block by block; `None` stores each on its own.
    fn block_batch(&self) -> Option<Box<dyn BlockBatch>> {
        None
    }
    /// An object's envelope.
    fn read_object(&self, id: &Hash) -> Result<Vec<u8>>;
    /// True if the object is present.
    fn has_object(&self, id: &Hash) -> bool;
    /// Stores an object after checking its id and envelope; true if it was new.
    fn put_encoded_object(&self, kind: ObjectKind, id: &Hash, bytes: &[u8]) -> Result<bool>;
    /// Refs, sorted.
    fn list_refs(&self) -> Result<Vec<(String, Hash)>>;
    /// A ref's target.
    fn read_ref(&self, name: &str) -> Result<Option<Hash>>;
    /// Moves a ref from `old` to `new`, refusing if the capsule is incomplete here.
    fn update_ref(&self, name: &str, old: Option<&Hash>, new: &Hash) -> Result<()>;
    /// Housekeeping after a ref update was answered (a store merges small packs); its
    /// cost is not the client's wait.
    fn tidy(&self) {}
    /// Profiles of a capsule: (name, object id).
    fn list_profiles(&self, capsule: &Hash) -> Result<Vec<(String, Hash)>> {
        let _ = capsule;
        Ok(Vec::new())
    }
    /// Names a stored profile object for its capsule.
    fn set_profile(&self, capsule: &Hash, name: &str, id: &Hash) -> Result<()> {
        let _ = (capsule, name, id);
        Err(Error::new(ErrorKind::InvalidInput, "this server keeps no profiles"))
    }
}

/// Blocks stored together: durable and readable once [`BlockBatch::finish`] returns,
/// nothing if it is dropped before.
pub trait BlockBatch: Send {
    /// Adds a block already verified against its hash; false if the batch had it.
    fn put(&mut self, hash: &Hash, encoded: &[u8]) -> Result<bool>;
    /// Makes the batch's blocks durable and readable.
    fn finish(self: Box<Self>) -> Result<()>;
}

impl BlockBatch for capsule_images::packed::PackBatch {
    fn put(&mut self, hash: &Hash, encoded: &[u8]) -> Result<bool> {
        Ok(self.add_new(hash, encoded)?)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        capsule_images::packed::PackBatch::finish(*self)?;
        Ok(())
    }
}

impl Backend for Store {
    fn read_encoded_block(&self, hash: &Hash) -> Result<Vec<u8>> {
        Ok(Store::read_encoded_block(self, hash)?)
    }

    fn read_checked_block(&self, hash: &Hash) -> Result<Vec<u8>> {
        Ok(Store::read_verified_encoded_block(self, hash)?)
    }

    fn has_block(&self, hash: &Hash) -> bool {
        Store::has_block(self, hash)
    }

    fn missing_blocks(&self, hashes: Vec<Hash>) -> Vec<Hash> {
        Store::missing_blocks(self, hashes)
    }

    fn put_encoded_block(&self, hash: &Hash, encoded: &[u8]) -> Result<bool> {
        Ok(Store::put_encoded_block(self, hash, encoded)?)
    }

    fn tidy(&self) {
        self.tidy_packs();
    }

    /// A pushed request's blocks go into one pack: one fsync instead of one per block file.
    fn block_batch(&self) -> Option<Box<dyn BlockBatch>> {
        Some(Box::new(self.pack_batch()))
    }

    fn read_object(&self, id: &Hash) -> Result<Vec<u8>> {
        Ok(Store::read_object(self, id)?)
    }

    fn has_object(&self, id: &Hash) -> bool {
        Store::has_object(self, id)
    }

    fn put_encoded_object(&self, kind: ObjectKind, id: &Hash, bytes: &[u8]) -> Result<bool> {
        Ok(Store::put_encoded_object(self, kind, id, bytes)?)
    }

    fn list_refs(&self) -> Result<Vec<(String, Hash)>> {
        Ok(Store::list_refs(self)?)
    }

    fn read_ref(&self, name: &str) -> Result<Option<Hash>> {
        Ok(Store::read_ref(self, name)?)
    }

    fn update_ref(&self, name: &str, old: Option<&Hash>, new: &Hash) -> Result<()> {
        // A ref must never name a capsule this server cannot serve whole.
        let incomplete = |e: &dyn std::fmt::Display| Error::new(ErrorKind::NotFound, format!("capsule {new} is incomplete on the server: {e}"));
        let (_, blocks) = self.closure(new).map_err(|e| incomplete(&e))?;
        if let Some(first) = Store::missing_blocks(self, blocks.iter().copied()).first() {
            return Err(incomplete(&format_args!("{} missing", self.block_place(new, first))));
        }
        self.cas_ref(name, old, new)?;
        // Blocks that arrived as files (from a client without batches, or copied into the
        // store by hand) are packed: a cold read of the capsule is then sequential.
        self.pack_walked_capsule(new, &blocks);
        Ok(())
    }

    fn list_profiles(&self, capsule: &Hash) -> Result<Vec<(String, Hash)>> {
        Ok(Store::list_profiles(self, capsule)?)
    }

    fn set_profile(&self, capsule: &Hash, name: &str, id: &Hash) -> Result<()> {
        Ok(Store::set_profile(self, capsule, name, id)?)
    }
}
