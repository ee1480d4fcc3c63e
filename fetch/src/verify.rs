//! Blocks received and waiting for verification, off the QUIC receiver: a bounded queue
//! that holds each batch's end until its last block is processed.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::engine::Engine;
use crate::{FetchError, FetchErrorKind, Hash};

/// Blocks received and not yet verified. A batch's end is held back until its last
/// queued block is processed, so the scheduler never sees an end before its blocks.
#[derive(Default)]
pub(crate) struct VerifyQueue {
    state: Mutex<VerifyState>,
    ready: Condvar,
    /// Wakes a receiving thread waiting for room.
    room: Condvar,
    /// Verify threads running (0: deliveries are verified on the receiving thread).
    pub(crate) workers: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct VerifyState {
    blocks: std::collections::VecDeque<(u64, Hash, Vec<u8>)>,
    queued_bytes: usize,
    /// Per batch: blocks queued or being verified, and its end if it came first.
    open: HashMap<u64, (usize, Option<Result<(), FetchError>>)>,
    closed: bool,
}

/// Bytes of received blocks waiting for verification before the receiver waits: bounds
/// memory when verification (CPU) is slower than the link.
const VERIFY_QUEUE_BYTES: usize = 32 << 20;

impl VerifyQueue {
    fn lock(&self) -> MutexGuard<'_, VerifyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn push_block(&self, batch: u64, hash: Hash, encoded: Vec<u8>) {
        let mut st = self.lock();
        while st.queued_bytes > VERIFY_QUEUE_BYTES && !st.closed {
            st = self.room.wait_timeout(st, Duration::from_millis(100)).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        if st.closed {
            return;
        }
        st.queued_bytes += encoded.len();
        st.open.entry(batch).or_insert((0, None)).0 += 1;
        st.blocks.push_back((batch, hash, encoded));
        drop(st);
        self.ready.notify_one();
    }

    /// The end to deliver now, or `None` if it waits for the batch's last block.
    pub(crate) fn push_end(&self, batch: u64, result: Result<(), FetchError>) -> Option<Result<(), FetchError>> {
        let mut st = self.lock();
        match st.open.get_mut(&batch) {
            Some(entry) if entry.0 > 0 => {
                entry.1 = Some(result);
                None
            }
            _ => {
                st.open.remove(&batch);
                Some(result)
            }
        }
    }

    /// The next block to verify; `None` once closed.
    pub(crate) fn pop(&self) -> Option<(u64, Hash, Vec<u8>)> {
        let mut st = self.lock();
        loop {
            if st.closed {
                return None;
            }
            if let Some(item) = st.blocks.pop_front() {
                st.queued_bytes -= item.2.len();
                drop(st);
                self.room.notify_all();
                return Some(item);
            }
            st = self.ready.wait_timeout(st, Duration::from_secs(1)).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// A block of `batch` is processed: its end, if that was the last one and it came.
    pub(crate) fn done(&self, batch: u64) -> Option<Result<(), FetchError>> {
        let mut st = self.lock();
        let entry = st.open.get_mut(&batch)?;
        entry.0 -= 1;
        if entry.0 == 0 {
            let end = entry.1.take();
            if end.is_some() {
                st.open.remove(&batch);
            }
            return end;
        }
        None
    }

    /// The batch was abandoned: no end will come, so its entry goes once its queued
    /// blocks are processed (now, if none are).
    pub(crate) fn forget(&self, batch: u64) {
        let mut st = self.lock();
        if let Some(entry) = st.open.get_mut(&batch) {
            if entry.0 == 0 {
                st.open.remove(&batch);
            } else {
                entry.1 = Some(Err(FetchError::new(FetchErrorKind::Unavailable, format!("batch {batch} abandoned"))));
            }
        }
    }

    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
        self.room.notify_all();
    }
}

pub(crate) fn verify_loop(queue: &VerifyQueue, weak: &Weak<Engine>) {
    while let Some((batch, hash, encoded)) = queue.pop() {
        let Some(engine) = weak.upgrade() else { return };
        engine.on_block(batch, hash, encoded);
        if let Some(result) = queue.done(batch) {
            engine.on_end(batch, result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_batch_leaves_nothing_behind_in_the_verify_queue() {
        let q = VerifyQueue::default();
        // Abandoned with a block still queued: its entry goes once that block is done.
        q.push_block(1, Hash([1; 32]), vec![0; 10]);
        q.forget(1);
        assert!(q.pop().is_some());
        assert!(q.done(1).is_some_and(|end| end.is_err()), "the held end reports the abandonment");
        assert!(q.lock().open.is_empty());
        // Abandoned after its blocks were processed, with no end to come.
        q.push_block(2, Hash([2; 32]), vec![0; 10]);
        assert!(q.pop().is_some());
        assert!(q.done(2).is_none());
        q.forget(2);
        assert!(q.lock().open.is_empty());
        // A batch that ends normally is unaffected.
        q.push_block(3, Hash([3; 32]), vec![0; 10]);
        assert!(q.push_end(3, Ok(())).is_none(), "held until its block is processed");
        assert!(q.pop().is_some());
        assert_eq!(q.done(3), Some(Ok(())));
        assert!(q.lock().open.is_empty());
    }
}
