//! One worker per core over a shared job counter; the first error stops the others.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// Runs `work` on one thread per core. Each call gets a stop flag to poll between jobs;
/// it is raised as soon as any worker fails. Returns every worker's output, or the first
/// error.
pub(crate) fn run_workers<T: Send>(threads: usize, work: &(dyn Fn(&AtomicBool) -> Result<T> + Sync)) -> Result<Vec<T>> {
    let threads = if threads == 0 { std::thread::available_parallelism().map_or(2, |n| n.get()) } else { threads };
    let stop = AtomicBool::new(false);
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let r = work(&stop);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::invalid("worker thread panicked")))).collect()
    });
    results.into_iter().collect()
}
