//! # capsule-net (stub; filled by the QUIC block service issue)
//!
//! Will hold the wire protocol and the QUIC transport:
//! - a versioned, framed codec (magic, version, checksum, size caps before allocating)
//!   and per-request state machines, free of I/O and tested with a simulated pair;
//! - a thin quinn + rustls layer for `capsule serve`, `push` and `pull`;
//! - a client implementing the `BlockSource` interface that `capsule-fs` defines.
//!
//! Blocks travel in the store's encoding (`capsule_images::block`), compressed as stored,
//! so a server never recompresses.
