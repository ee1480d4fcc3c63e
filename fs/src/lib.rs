//! # capsule-fs (stub; filled by the FUSE mount issue)
//!
//! Will hold `capsule mount`: a fuser filesystem presenting a capsule's images as files,
//! a persistent content-addressed cache shared by all mounts, and a local copy-on-write
//! layer for writes. It will define the `BlockSource` trait it consumes (fetch a set of
//! hashes, get verified blocks); `capsule-net` and the local store implement it, so this
//! crate never depends on quinn. Errno mapping lives in one place here.
