//! Reading an image through its layer chain.

use crate::error::{Error, Result, ResultExt};
use crate::hash::Hash;
use crate::manifest::{Image, Layer, MAX_CHAIN};
use crate::map::{self, Entry};
use crate::store::Store;

/// An image opened for reading: its layer chain loaded, map pages fetched on demand.
#[derive(Debug)]
pub struct ImageReader<'s> {
    store: &'s Store,
    image: Image,
    /// Top first.
    chain: Vec<(Hash, Layer)>,
}

impl<'s> ImageReader<'s> {
    /// Loads the layer chain of `image` (layers only; no map page is read yet).
    pub fn open(store: &'s Store, image: Image) -> Result<Self> {
        image.validate()?;
        let mut chain = Vec::new();
        let mut next = image.top;
        while let Some(id) = next {
            if chain.len() >= MAX_CHAIN {
                return Err(Error::corrupt(format!("layer chain from {} longer than {MAX_CHAIN}", image.top.map(|h| h.short()).unwrap_or_default())));
            }
            let layer = store.layer(&id).with_context(|| format!("layer {id}"))?;
            if layer.block_size_log2 != image.block_size_log2 {
                return Err(Error::corrupt(format!(
                    "layer {id} has block size 2^{} but its image uses 2^{}",
                    layer.block_size_log2, image.block_size_log2
                )));
            }
            next = layer.parent;
            chain.push((id, layer));
        }
        Ok(Self { store, image, chain })
    }

    /// The image this reads.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The layers, top first.
    pub fn chain(&self) -> &[(Hash, Layer)] {
        &self.chain
    }

    /// The store behind it.
    pub fn store(&self) -> &'s Store {
        self.store
    }

    /// The content hash of block `index` from the topmost layer mapping it, ignoring the
    /// image size; `None` means zero.
    pub fn resolve_in_chain(&self, index: u64) -> Result<Option<Hash>> {
        for (id, layer) in &self.chain {
            match map::lookup(self.store, &layer.map, index).with_context(|| format!("layer {id}, block {index}"))? {
                Some(Entry::Data(h)) => return Ok(Some(h)),
                Some(Entry::Zero) => return Ok(None),
                None => {}
            }
        }
        Ok(None)
    }

    /// The content hash of block `index`, `None` for zero (or past the end).
    pub fn resolve(&self, index: u64) -> Result<Option<Hash>> {
        if index >= self.image.block_count() {
            return Ok(None);
        }
        self.resolve_in_chain(index)
    }

    /// Block `index` as the guest sees it: `block_size` bytes (zero-padded past the end).
    pub fn read_block(&self, index: u64) -> Result<Vec<u8>> {
        match self.resolve(index)? {
            None => Ok(vec![0; self.image.block_size() as usize]),
            Some(h) => {
                let data = self.store.get_block(&h).with_context(|| format!("block {index}"))?;
                if data.len() as u64 != self.image.block_size() {
                    return Err(Error::corrupt(format!(
                        "block {index} ({h}) is {} bytes, image block size is {}",
                        data.len(),
                        self.image.block_size()
                    )));
                }
                Ok(data)
            }
        }
    }
}
