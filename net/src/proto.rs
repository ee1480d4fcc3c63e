//! Request and response messages (postcard inside `frame` control frames).
//!
//! Exchanges, one per QUIC bidirectional stream (C: client, S: server):
//!
//! ```text
//!  ListRefs/GetRef/Missing*/UpdateRef   C: Request              S: Response
//!  GetObjects                           C: Request              S: Object* End | Response(Error)
//!  GetBlocks                            C: Request              S: Block* End | Response(Error)
//!  GetPath                              C: Request              S: Object* [Block] End | Response(Error)
//!  PutObjects / PutBlocks               C: Request Object*/Block* End     S: Response(Stored)
//! ```
//! Every request carries the client's bearer token (or none for public reads).

use capsule_images::map::MapRoot;
use capsule_images::Hash;
use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;

/// Most hashes in one request (1 MiB of control payload holds ~32K).
pub const MAX_BATCH: usize = 16_384;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Refs whose names start with `prefix` (and that the token may see).
    ListRefs { prefix: String },
    /// The capsule id a ref names.
    GetRef { name: String },
    /// Metadata objects (manifests, layers, map pages) by id.
    GetObjects { ids: Vec<Hash> },
    /// Blocks by hash, each sent as stored (compressed where that helped).
    GetBlocks { hashes: Vec<Hash> },
    /// Which of these blocks does the server lack?
    MissingBlocks { hashes: Vec<Hash> },
    /// Which of these objects does the server lack?
    MissingObjects { ids: Vec<Hash> },
    /// Object frames follow, then End.
    PutObjects,
    /// Block frames follow, then End.
    PutBlocks,
    /// Point `name` at `new` if it names `old` now (`None`: absent).
    UpdateRef { name: String, old: Option<Hash>, new: Hash },
    /// Working-set profiles recorded for a capsule.
    ListProfiles { capsule: Hash },
    /// Name profile object `id` (sent before with PutObjects) as `name` of `capsule`.
    SetProfile { capsule: Hash, name: String, id: Hash },
    /// The map pages on the way from page `root` (a subtree) down to block `index`, top
    /// first, and with `with_block` the block it maps: a read of a region whose pages the
    /// client lacks costs one round trip instead of one per tree level plus the block.
    GetPath { root: MapRoot, index: u64, with_block: bool },
}

impl Request {
    /// Hashes named by the request, for batch-size checks.
    pub fn batch_len(&self) -> usize {
        match self {
            Request::GetObjects { ids } | Request::MissingObjects { ids } => ids.len(),
            Request::GetBlocks { hashes } | Request::MissingBlocks { hashes } => hashes.len(),
            _ => 0,
        }
    }

    /// True if it changes the server.
    pub fn is_write(&self) -> bool {
        matches!(self, Request::PutObjects | Request::PutBlocks | Request::UpdateRef { .. } | Request::SetProfile { .. })
    }
}

/// The first frame of every stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHeader {
    /// Bearer token (`capsule token create`), if any.
    pub token: Option<String>,
    /// 0 for bulk transfers (push, pull, warming); higher for demand reads, which the
    /// server then sends ahead of bulk streams.
    pub priority: u8,
    /// What is asked.
    pub request: Request,
}

/// What a server answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `ListRefs`.
    Refs(Vec<(String, Hash)>),
    /// Answer to `GetRef`.
    Ref(Option<Hash>),
    /// Answer to `ListProfiles`: (name, profile object id).
    Profiles(Vec<(String, Hash)>),
    /// Answer to `Missing*`: the subset the server lacks, in request order.
    Missing(Vec<Hash>),
    /// Answer to `Put*` (how many were new) and `UpdateRef` (0).
    Stored { new: u64 },
    /// The request failed.
    Error { kind: ErrorKind, message: String },
}
