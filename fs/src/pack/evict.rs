//! Eviction of whole packs, safe against other processes (see the parent module): a
//! pack another process appends to is left, and a victim's pinned blocks are copied out
//! and synced before it is unlinked.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use rustix::fs::{flock, FlockOperation};
use tracing::warn;

use super::{pinned_in, scan, PackCache, State, FILE_HEADER};

/// Unlocks a pack an evictor locked, whatever way the eviction ends.
struct PackLock<'a>(&'a File);

impl Drop for PackLock<'_> {
    fn drop(&mut self) {
        let _ = flock(self.0, FlockOperation::Unlock);
    }
}

/// True if `path` still names the file `file` has open (another evictor may have unlinked it).
fn still_named(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl PackCache {
    pub(super) fn evict_locked(&self, st: &mut State, limit: u64) {
        // Under the bound with pins counted in, nothing goes: no look at the pins (a stat
        // per inserted block otherwise).
        if st.total <= limit {
            return;
        }
        st.refresh_pins();
        // Packs this pass leaves: another process appends to them, or a pinned block in
        // them could not be copied out.
        let mut spared = HashSet::new();
        while st.total - st.pinned_total > limit {
            // The least recently used pack that holds more than pinned blocks: evicting one
            // that holds only them would free nothing the bound counts.
            // Oldest first, and the pins of a pack counted only until one qualifies (counting
            // them walks its blocks).
            let mut order: Vec<(u64, u32)> = st.packs.iter().filter(|(id, _)| !spared.contains(*id)).map(|(&id, p)| (p.last_use, id)).collect();
            order.sort_unstable();
            let victim = order.into_iter().map(|(_, id)| id).find(|id| st.packs[id].valid > FILE_HEADER + pinned_in(st, *id, &st.packs[id]));
            let Some(id) = victim else { return };
            if !self.evict_pack(st, id) {
                spared.insert(id);
            }
        }
    }

    /// Evicts pack `id` unless another process appends to it: its pinned blocks first
    /// verified, copied into this process's pack and synced, then the file unlinked.
    /// False if the pack stays.
    fn evict_pack(&self, st: &mut State, id: u32) -> bool {
        let (name, file) = {
            let p = &st.packs[&id];
            (p.name.clone(), p.file.clone())
        };
        let path = self.dir.join(&name);
        // Our own active pack is locked through this same descriptor: that succeeds.
        if let Err(e) = flock(&*file, FlockOperation::NonBlockingLockExclusive) {
            if e != rustix::io::Errno::WOULDBLOCK {
                warn!("cache: cannot lock pack {name} to evict it: {e}");
            }
            return false;
        }
        let _unlock = PackLock(&file);
        if st.active == Some(id) {
            st.active = None;
        }
        if !still_named(&file, &path) {
            // Another process evicted it, after copying its pinned blocks out.
            st.drop_pack(id);
            return true;
        }
        // To its end as it is now: its writer may have appended past our last scan.
        let len = file.metadata().map_or(0, |m| m.len());
        let (records, _) = scan(&file, FILE_HEADER, len);
        let mut copied = HashSet::new();
        let mut dests = HashSet::new();
        for (h, offset, len) in records {
            if !st.pins.contains(&h) || copied.contains(&h) {
                continue;
            }
            // A copy in the pack this process appends to is safe (we hold its lock); any
            // other copy our index knows may be in a pack someone else is evicting.
            if st.active.is_some() && st.index.get(&h).map(|l| l.pack) == st.active {
                continue;
            }
            let mut encoded = vec![0u8; len as usize];
            if let Err(e) = file.read_exact_at(&mut encoded, offset) {
                warn!("cache: keeping pack {name}: cannot read its pinned block {h}: {e}");
                return false;
            }
            if let Err(e) = capsule_images::block::decode(&h, &encoded) {
                // Not the block: nothing to keep; a read fetches it again.
                warn!("cache: pinned block {h} in pack {name} is damaged; not kept: {}", e.report());
                continue;
            }
            match self.append(st, &h, &encoded) {
                Ok(loc) => {
                    st.remove_entry(&h);
                    st.add(h, loc);
                    dests.insert(loc.pack);
                    copied.insert(h);
                }
                Err(e) => {
                    warn!("cache: keeping pack {name}: cannot copy its pinned block {h} out: {}", e.report());
                    return false;
                }
            }
        }
        // The copies durable (with the directory entries of packs made for them) before
        // the only other copy goes.
        for dest in dests.iter().filter_map(|d| st.packs.get(d)) {
            if let Err(e) = dest.file.sync_data() {
                warn!("cache: keeping pack {name}: cannot sync {} after copying pinned blocks into it: {e}", dest.name);
                return false;
            }
        }
        if !dests.is_empty() {
            if let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all()) {
                warn!("cache: keeping pack {name}: cannot sync {}: {e}", self.dir.display());
                return false;
            }
        }
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("cache: cannot evict pack {name}: {e}");
                return false;
            }
        }
        st.drop_pack(id);
        true
    }
}
