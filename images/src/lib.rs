//! # capsule-images
//!
//! The capsule format, the local content-addressed store, importers and exporters.
//!
//! A capsule is a [`Manifest`] naming images (disks, memory, device state, boot files).
//! An image is a chain of [`Layer`]s; each layer maps block index -> block hash (or zero)
//! through a tree of map pages. Blocks and metadata are named by their BLAKE3 hash, so a
//! capsule id verifies everything below it. See `docs/format.md` for the byte layouts.

pub mod block;
pub mod envelope;
pub mod error;
pub mod export;
pub mod flatten;
pub mod hash;
pub mod image;
pub mod import;
pub mod ingest;
pub mod keys;
pub mod manifest;
pub mod map;
pub mod packed;
mod parallel;
pub mod qcow2;
pub mod seal;
pub mod slot;
pub mod store;
pub mod verify;
pub mod vm_file;
mod walk;

pub use error::{Error, ErrorKind, Result};
pub use hash::Hash;
pub use image::ImageReader;
pub use import::{import_capsule, CapsuleSpec, DiskFormat, ImportReport, ImportStats, NoProgress, Progress, DEFAULT_BLOCK_SIZE_LOG2};
pub use manifest::{BootFiles, Disk, Image, Layer, Manifest, Profile, VmDescription};
pub use map::Entry;
pub use seal::{Key, KeyId, Sealing};
pub use slot::{LayoutFn, MountLayout, Slot};
pub use store::Store;
pub use verify::{verify_capsule, verify_store_files, VerifyReport};
pub use vm_file::{MountInfo, VmFile};
