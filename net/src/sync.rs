//! Push and pull: the paper's hashed copy. The receiver says which hashes it lacks and only
//! those travel, so sending an update costs about the size of the update.

use std::collections::HashSet;

use capsule_images::envelope::{peek_kind, ObjectKind};
use capsule_images::map::{MapPage, PageSource};
use capsule_images::{Hash, Progress, Store};
use futures_util::StreamExt;
use serde::Serialize;

use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};
use crate::proto::MAX_BATCH;

/// Blocks per put/get stream: large enough to keep the pipe full, small enough to bound memory.
const BLOCK_BATCH: usize = 64;
/// Batches in flight at once.
const PARALLEL_BATCHES: usize = 4;
/// Bounds on one push request: the blocks of 4 requests are in memory at once.
const PUSH_REQUEST_BYTES: u64 = 8 << 20;
const PUSH_REQUEST_BLOCKS: usize = 1024;

/// What a push or pull moved.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TransferReport {
    /// Sum of the capsule's image sizes.
    pub logical_bytes: u64,
    /// UDP bytes sent on the connection.
    pub wire_sent: u64,
    /// UDP bytes received on the connection.
    pub wire_received: u64,
    /// Distinct blocks the capsule (with ancestors) reaches.
    pub blocks_total: u64,
    /// Blocks that travelled.
    pub blocks_transferred: u64,
    /// Blocks skipped because the other side had them.
    pub blocks_skipped: u64,
    /// Encoded bytes of the blocks that travelled.
    pub block_bytes: u64,
    /// Metadata objects that travelled.
    pub objects_transferred: u64,
}

/// `blocks` cut into a push's requests: consecutive runs of at most PUSH_REQUEST_BYTES (by
/// `sizes`, their stored sizes) and PUSH_REQUEST_BLOCKS, each at least one block.
fn push_requests<'a>(blocks: &'a [Hash], sizes: &'a [u64]) -> impl Iterator<Item = &'a [Hash]> + 'a {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= blocks.len() {
            return None;
        }
        let (mut end, mut bytes) = (start, 0);
        while end < blocks.len() && end - start < PUSH_REQUEST_BLOCKS && (end == start || bytes + sizes[end] <= PUSH_REQUEST_BYTES) {
            bytes += sizes[end];
            end += 1;
        }
        let run = &blocks[start..end];
        start = end;
        Some(run)
    })
}

fn logical_bytes(store: &Store, id: &Hash) -> Result<u64> {
    Ok(store.manifest(id)?.images().iter().map(|(_, i)| i.size).sum())
}

/// Sends local capsule `local` to the server as `remote_name`; only what the server
/// lacks travels. The remote ref moves last, by compare-and-swap.
pub async fn push(store: &Store, local: &str, client: &Client, remote_name: &str, progress: &dyn Progress) -> Result<TransferReport> {
    let id = store.resolve(local)?;
    let (objects, blocks) = store.closure(&id)?;
    let old = client.get_ref(remote_name).await?;
    let mut report = TransferReport { logical_bytes: logical_bytes(store, &id)?, blocks_total: blocks.len() as u64, ..Default::default() };

    let mut missing_blocks = Vec::new();
    for chunk in blocks.chunks(MAX_BATCH) {
        missing_blocks.extend(client.missing(chunk.to_vec(), false).await?);
    }
    let mut missing_objects = Vec::new();
    for chunk in objects.chunks(MAX_BATCH) {
        missing_objects.extend(client.missing(chunk.to_vec(), true).await?);
    }
    report.blocks_skipped = report.blocks_total - missing_blocks.len() as u64;

    let sizes: Vec<u64> = missing_blocks.iter().map(|h| store.block_stored_size(h).unwrap_or(0)).collect();
    progress.begin("push", sizes.iter().sum());
    // Requests of up to PUSH_REQUEST_BYTES, several in flight: one at a time left the link
    // idle a round trip per request, and a server stores each request's blocks in one pack.
    let mut requests = futures_util::stream::iter(push_requests(&missing_blocks, &sizes).map(|chunk| async move {
        let batch = tokio::task::block_in_place(|| chunk.iter().map(|h| Ok((*h, store.read_encoded_block(h)?))).collect::<Result<Vec<_>>>())?;
        let bytes: u64 = batch.iter().map(|(_, e)| e.len() as u64).sum();
        client.put_blocks(batch).await?;
        Ok::<_, Error>((chunk.len() as u64, bytes))
    }))
    .buffered(PARALLEL_BATCHES);
    while let Some(sent) = requests.next().await {
        let (blocks, bytes) = sent?;
        report.blocks_transferred += blocks;
        report.block_bytes += bytes;
        progress.advance(bytes);
    }
    drop(requests);
    progress.end();
    // Pages before layers before manifests, for readability of the server's log only:
    // the server checks completeness when the ref moves.
    let mut objs = Vec::with_capacity(missing_objects.len());
    for id in &missing_objects {
        let bytes = store.read_object(id)?;
        let kind = peek_kind(&bytes).ok_or_else(|| Error::new(ErrorKind::Corrupt, format!("local object {id} is damaged")))?;
        objs.push((kind, *id, bytes));
    }
    objs.sort_by_key(|(k, _, _)| std::cmp::Reverse(*k as u8));
    report.objects_transferred = objs.len() as u64;
    for chunk in objs.chunks(256) {
        client.put_objects(chunk.to_vec()).await?;
    }
    client.update_ref(remote_name, old, id).await.map_err(|e| {
        if e.kind() == ErrorKind::Conflict {
            Error::new(ErrorKind::Conflict, format!("push of {local} to {remote_name} lost a race: {e}; pull, then push again"))
        } else {
            e
        }
    })?;
    // Profiles travel with the capsule: the next machine can warm from them.
    for (name, pid) in store.list_profiles(&id)? {
        if !client.missing(vec![pid], true).await?.is_empty() {
            client.put_objects(vec![(ObjectKind::Profile, pid, store.read_object(&pid)?)]).await?;
        }
        client.set_profile(&id, &name, &pid).await?;
    }
    (report.wire_sent, report.wire_received) = client.wire_bytes();
    Ok(report)
}

/// Fetches the profiles the server has for capsule `id` into `store`; returns their names.
pub async fn pull_profiles(client: &Client, id: &Hash, store: &Store) -> Result<Vec<String>> {
    let listed = client.list_profiles(id).await?;
    let wanted: Vec<Hash> = listed.iter().map(|(_, p)| *p).filter(|p| !store.has_object(p)).collect();
    if !wanted.is_empty() {
        for (kind, pid, bytes) in client.get_objects(wanted).await? {
            if kind != ObjectKind::Profile {
                return Err(Error::protocol(format!("object {pid} is a {}, not a profile", kind.name())));
            }
            store.put_encoded_object(kind, &pid, &bytes)?;
        }
    }
    let mut names = Vec::new();
    for (name, pid) in listed {
        store.set_profile(id, &name, &pid)?;
        names.push(name);
    }
    Ok(names)
}

/// Fetches what a mount needs before its first read: the manifests of capsule `id` and its
/// ancestors, the layers of their images and the root page of each layer's map, not the
/// pages below (a mount fetches those when a read needs them). Returns how many objects
/// travelled.
pub async fn pull_head(client: &Client, id: &Hash, store: &Store) -> Result<u64> {
    let mut fetched = 0u64;
    let mut next = Some(*id);
    let mut seen = HashSet::new();
    while let Some(mid) = next.take() {
        if !seen.insert(mid) || seen.len() > capsule_images::manifest::MAX_CHAIN {
            return Err(Error::new(ErrorKind::Corrupt, format!("capsule {id}: ancestry loops or exceeds {} generations", capsule_images::manifest::MAX_CHAIN)));
        }
        if !store.has_object(&mid) {
            fetched += store_objects(client, store, vec![mid], ObjectKind::Manifest).await?;
        }
        let m = store.manifest(&mid)?;
        // Each image's layer chain, level by level, all images at once; then the root
        // page of each layer's map, so a first read needs only the pages below it.
        let mut layers: Vec<Hash> = m.images().into_iter().filter_map(|(_, i)| i.top).collect();
        let mut roots = Vec::new();
        let mut depth = 0;
        while !layers.is_empty() {
            depth += 1;
            if depth > capsule_images::manifest::MAX_CHAIN {
                return Err(Error::new(ErrorKind::Corrupt, format!("capsule {mid}: a layer chain exceeds {}", capsule_images::manifest::MAX_CHAIN)));
            }
            let wanted: Vec<Hash> = layers.iter().filter(|h| !store.has_object(h)).copied().collect();
            if !wanted.is_empty() {
                fetched += store_objects(client, store, wanted, ObjectKind::Layer).await?;
            }
            let mut parents = Vec::new();
            for l in &layers {
                let layer = store.layer(l)?;
                parents.extend(layer.parent);
                roots.extend(layer.map.root.filter(|r| !store.has_object(r)));
            }
            parents.sort_unstable();
            parents.dedup();
            layers = parents;
        }
        roots.sort_unstable();
        roots.dedup();
        if !roots.is_empty() {
            fetched += store_objects(client, store, roots, ObjectKind::MapPage).await?;
        }
        next = m.parent;
    }
    Ok(fetched)
}

async fn store_objects(client: &Client, store: &Store, ids: Vec<Hash>, expect: ObjectKind) -> Result<u64> {
    let mut n = 0;
    for (kind, oid, bytes) in client.get_objects(ids).await? {
        if kind != expect {
            return Err(Error::protocol(format!("object {oid} is a {}, not a {}", kind.name(), expect.name())));
        }
        store.put_encoded_object(kind, &oid, &bytes).map_err(|e| Error::from(e).context(format!("object {oid} from the server")))?;
        n += 1;
    }
    Ok(n)
}

/// Fetches every metadata object (manifests, layers, map pages) capsule `id` reaches that
/// `store` lacks, level by level, each checked against its id. Returns how many travelled.
pub async fn pull_metadata(client: &Client, id: &Hash, store: &Store) -> Result<u64> {
    let id = *id;
    let mut fetched = 0u64;
    // Metadata, level by level: manifests -> layers -> map pages.
    let mut frontier: Vec<(ObjectKind, Hash)> = vec![(ObjectKind::Manifest, id)];
    let mut seen = HashSet::new();
    while !frontier.is_empty() {
        frontier.retain(|(_, h)| seen.insert(*h));
        let wanted: Vec<Hash> = frontier.iter().filter(|(_, h)| !store.has_object(h)).map(|(_, h)| *h).collect();
        for chunk in wanted.chunks(1024) {
            for (kind, oid, bytes) in client.get_objects(chunk.to_vec()).await? {
                store.put_encoded_object(kind, &oid, &bytes).map_err(|e| Error::from(e).context(format!("object {oid} from the server")))?;
                fetched += 1;
            }
        }
        let mut next = Vec::new();
        for (kind, oid) in frontier.drain(..) {
            match kind {
                ObjectKind::Manifest => {
                    let m = store.manifest(&oid)?;
                    next.extend(m.parent.map(|p| (ObjectKind::Manifest, p)));
                    next.extend(m.images().into_iter().filter_map(|(_, i)| i.top.map(|t| (ObjectKind::Layer, t))));
                }
                ObjectKind::Layer => {
                    let l = store.layer(&oid)?;
                    next.extend(l.parent.map(|p| (ObjectKind::Layer, p)));
                    next.extend(l.map.root.map(|r| (ObjectKind::MapPage, r)));
                }
                ObjectKind::MapPage => {
                    if let MapPage::Node(children) = &*store.page(&oid)? {
                        next.extend(children.iter().map(|(_, c)| (ObjectKind::MapPage, *c)));
                    }
                }
                ObjectKind::Profile => {}
            }
        }
        frontier = next;
    }

    Ok(fetched)
}

/// Fetches remote capsule `remote_name` and its ancestors into `store` as `local_name`;
/// only blocks and objects the store lacks travel, each verified before it is stored.
pub async fn pull(client: &Client, remote_name: &str, store: &Store, local_name: &str, progress: &dyn Progress) -> Result<(Hash, TransferReport)> {
    capsule_images::manifest::check_name(local_name)?;
    let id = client.get_ref(remote_name).await?.ok_or_else(|| Error::new(ErrorKind::NotFound, format!("the server has no capsule named {remote_name:?}")))?;
    let mut report = TransferReport { objects_transferred: pull_metadata(client, &id, store).await?, ..Default::default() };

    let (_, blocks) = store.closure(&id)?;
    report.logical_bytes = logical_bytes(store, &id)?;
    report.blocks_total = blocks.len() as u64;
    let missing = store.missing_blocks(blocks.iter().copied());
    report.blocks_skipped = report.blocks_total - missing.len() as u64;
    progress.begin("pull", missing.len() as u64);
    // Several batches in flight keep the link busy across request round trips.
    let mut batches =
        futures_util::stream::iter(missing.chunks(BLOCK_BATCH).map(|chunk| client.get_blocks(chunk.to_vec(), 0))).buffer_unordered(PARALLEL_BATCHES);
    // get_blocks verified each block against its hash already. They go straight into a
    // pack, fsynced once before the ref names them.
    let mut pack = store.pack_batch();
    while let Some(batch) = batches.next().await {
        let batch = batch?;
        tokio::task::block_in_place(|| batch.iter().try_for_each(|(h, encoded)| pack.add(h, encoded).map(drop)))?;
        report.block_bytes += batch.iter().map(|(_, e)| e.len() as u64).sum::<u64>();
        report.blocks_transferred += batch.len() as u64;
        progress.advance(batch.len() as u64);
    }
    drop(batches);
    tokio::task::block_in_place(|| pack.finish())?;
    progress.end();
    pull_profiles(client, &id, store).await?;
    store.set_ref(local_name, &id)?;
    tokio::task::block_in_place(|| {
        store.pack_walked_capsule(&id, &blocks);
        store.tidy_packs();
    });
    (report.wire_sent, report.wire_received) = client.wire_bytes();
    Ok((id, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_requests_are_cut_by_bytes_and_blocks_and_never_empty() {
        let lens = |blocks: &[Hash], sizes: &[u64]| push_requests(blocks, sizes).map(<[Hash]>::len).collect::<Vec<_>>();
        let hashes: Vec<Hash> = (0..2000u32).map(|i| Hash::of(&i.to_le_bytes())).collect();
        let mib = 1 << 20;
        assert_eq!(lens(&hashes[..10], &[3 * mib; 10]), [2, 2, 2, 2, 2]);
        assert_eq!(lens(&hashes[..3], &[20 * mib, mib, mib]), [1, 2], "a block over the budget goes alone");
        assert_eq!(lens(&hashes, &[100; 2000]), [PUSH_REQUEST_BLOCKS, 2000 - PUSH_REQUEST_BLOCKS]);
        assert!(lens(&[], &[]).is_empty());
    }
}
