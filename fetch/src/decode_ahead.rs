//! Decoding ahead of a sequential reader. A block the local cache holds costs its reader a
//! decompression and a hash (about 1 ms for 64 KiB), on the reader's own thread: a warm
//! sequential read of the Debian guest's disk ran on one core. Blocks named here are read
//! from the cache, decoded and verified on other threads into the memory cache, where the
//! reader then finds them.

use std::collections::{HashSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::engine::Engine;
use crate::Hash;

/// Blocks waiting to be decoded ahead, at most. Names past it are dropped: their reader
/// decodes them itself, as it would without this.
const MAX_QUEUED: usize = 512;

/// Blocks named for decoding ahead, in the order named.
#[derive(Default)]
pub(crate) struct DecodeAheadQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    blocks: VecDeque<Hash>,
    queued: HashSet<Hash>,
    closed: bool,
}

impl DecodeAheadQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues those of `hashes` not queued already, while there is room.
    pub(crate) fn push(&self, hashes: impl IntoIterator<Item = Hash>) {
        let mut st = self.lock();
        let mut added = false;
        for h in hashes {
            if st.blocks.len() >= MAX_QUEUED {
                break;
            }
            if st.queued.insert(h) {
                st.blocks.push_back(h);
                added = true;
            }
        }
        drop(st);
        if added {
            self.ready.notify_all();
        }
    }

    /// The next block to decode; `None` once closed.
    fn pop(&self) -> Option<Hash> {
        let mut st = self.lock();
        loop {
            if st.closed {
                return None;
            }
            if let Some(h) = st.blocks.pop_front() {
                st.queued.remove(&h);
                return Some(h);
            }
            st = self.ready.wait_timeout(st, Duration::from_secs(1)).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// A decoding thread: until the queue closes or the engine is gone.
pub(crate) fn decode_ahead_loop(queue: &DecodeAheadQueue, engine: &Weak<Engine>) {
    while let Some(hash) = queue.pop() {
        let Some(engine) = engine.upgrade() else { return };
        engine.decode_into_memory(&hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_keeps_order_drops_repeats_and_stops_at_its_cap() {
        let q = DecodeAheadQueue::default();
        let h = |i: u32| Hash::of(&i.to_le_bytes());
        q.push([h(1), h(2), h(1)]);
        assert_eq!(q.pop(), Some(h(1)));
        q.push([h(1)]);
        assert_eq!(q.pop(), Some(h(2)));
        assert_eq!(q.pop(), Some(h(1)));
        q.push((0..MAX_QUEUED as u32 + 10).map(h));
        assert_eq!(q.lock().blocks.len(), MAX_QUEUED);
        q.close();
        assert_eq!(q.pop(), None, "closed: the threads end");
    }
}
