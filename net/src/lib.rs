//! # capsule-net
//!
//! Capsule's QUIC block service: `capsule serve`, `push` and `pull`.
//!
//! - [`frame`]: the wire codec (magic, version, checksum, size caps), free of I/O;
//! - [`proto`]: requests and responses; [`auth`]: tokens, scopes and prefixes (pure);
//! - [`server`], [`client`], [`io`]: the thin quinn + rustls layer;
//! - [`tls`]: the server's self-signed identity, trust on first use, pinning;
//! - [`backend`]: the storage trait the server serves from (the local store today);
//! - [`sync`]: push and pull with hash negotiation: only missing blocks travel;
//! - [`source`]: the client as the fetch engine's `capsule_fetch::BlockSource`: one
//!   stream per batch, connection bounded in time, reconnects after a loss.
//!
//! Blocks travel in the store's encoding (`capsule_images::block`), compressed as stored,
//! so a server never recompresses; every received block is verified against its hash.

pub mod auth;
pub mod backend;
pub mod client;
pub mod congestion;
pub mod error;
pub mod frame;
pub mod io;
pub mod proto;
pub mod server;
pub mod source;
pub mod sync;
pub mod tls;

pub use client::{Client, ConnectOptions, RemoteUrl};
pub use error::{Error, ErrorKind, Result};
pub use server::{ServeOptions, Server};
pub use source::RemoteSource;
pub use sync::{pull, pull_head, pull_metadata, pull_profiles, push, TransferReport};
