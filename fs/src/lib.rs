//! # capsule-fs
//!
//! `capsule mount`: a fuser filesystem presenting a capsule's images as files
//! ([`mount`]), a persistent content-addressed cache shared by all mounts ([`cache`]), a
//! local copy-on-write layer for writes ([`overlay`]) that [`commit`] turns into a child
//! capsule. Errors become errnos in one place ([`error::errno`]).
//!
//! The mount asks the fetch engine (`capsule-fetch`) for the blocks it lacks; the engine
//! asks a `BlockSource`, which `capsule-net` implements over QUIC, so this crate never
//! depends on quinn, nor `capsule-net` on this one. [`blocks`] gives the engine the cache
//! and seeds, and fetches map pages when a read first needs them.

pub mod blocks;
pub mod cache;
pub mod commit;
pub mod error;
pub mod layout;
pub mod mount;
pub mod mountinfo;
pub mod overlay;
pub mod pack;
pub mod pins;
pub mod recorder;
pub mod seed;
