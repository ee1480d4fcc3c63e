//! The scheduler: which blocks go in which batch, and when. No I/O and no clock: every
//! call takes `now`, so the same sequence of events always gives the same decisions (the
//! simulated link in [`crate::sim`] drives it in tests, the engine drives it for real).
//!
//! - One want per hash, whatever number of readers wait for it (single flight).
//! - Demand goes out at once, in batches of what is queued; readahead, then background,
//!   only while the bytes they have in flight stay under a window of about two
//!   bandwidth-delay products, measured, so bulk fills the link but does not bury it.
//! - A link failure requeues what was lost and backs off; a batch that brings nothing for
//!   `batch_stall` is abandoned; a block the source lacks fails alone (a multi-block batch
//!   that fails "not found" is retried block by block, so one missing readahead block
//!   never fails a demand read); a corrupt demand block is asked once more.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use capsule_images::Hash;

use crate::{BatchRequest, FetchError, FetchErrorKind, Urgency};

/// Tuning of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    /// Most blocks in one batch.
    pub max_batch_blocks: usize,
    /// Least bytes background and readahead may keep in flight (on links whose
    /// bandwidth-delay product is tiny; two mean blocks if that is more).
    pub min_window_bytes: u64,
    /// Bytes background and readahead may keep in flight before a bandwidth is measured.
    pub initial_window_bytes: u64,
    /// Most of the fast-link floor (50 ms of the best rate seen).
    pub lan_window_bytes: u64,
    /// Most bytes background and readahead may keep in flight.
    pub max_window_bytes: u64,
    /// Link time the window holds beyond two round trips.
    pub queue_allowance: Duration,
    /// Encoded size of a block until sizes are measured.
    pub block_bytes_guess: u64,
    /// A batch that delivers nothing for this long is abandoned and its blocks retried.
    pub batch_stall: Duration,
    /// Wait after a first link failure; doubles up to `max_backoff`.
    pub first_backoff: Duration,
    /// Longest wait between attempts on a failing link.
    pub max_backoff: Duration,
    /// Attempts per block before a corrupt or stalled block fails its readers.
    pub max_attempts: u8,
}

impl Default for SchedConfig {
    fn default() -> Self {
        Self {
            max_batch_blocks: 64,
            min_window_bytes: 64 << 10,
            initial_window_bytes: 256 << 10,
            lan_window_bytes: 1 << 20,
            max_window_bytes: 64 << 20,
            queue_allowance: Duration::from_millis(25),
            block_bytes_guess: 64 << 10,
            batch_stall: Duration::from_secs(30),
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_attempts: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    InFlight(u64),
}

#[derive(Debug)]
struct Want {
    urgency: Urgency,
    state: State,
    attempts: u8,
    /// Ask for it in a batch of its own (its batch failed "not found" as a whole).
    solo: bool,
}

#[derive(Debug)]
struct Batch {
    hashes: Vec<Hash>,
    undelivered: usize,
    urgency: Urgency,
    sent: Instant,
    last_progress: Instant,
    got_first: bool,
    /// Bytes counted against the bulk window (0 for demand batches).
    window_bytes: u64,
}

/// What became of a block that arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Wanted: hand it out. The urgency is the highest any reader asked for.
    Wanted(Urgency),
    /// Nobody wants it any more (a duplicate, or from an abandoned batch).
    Unwanted,
}

/// What became of a block that failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Asked again.
    Retried,
    /// Its readers fail with this.
    Failed(FetchError),
    /// Nobody wanted it; dropped.
    Dropped,
}

/// Round trip and bandwidth, as measured from batches.
#[derive(Debug, Default)]
pub struct Estimator {
    rtt_samples: VecDeque<Duration>,
    /// (time, cumulative bytes delivered), the last couple of seconds.
    deliveries: VecDeque<(Instant, u64)>,
    delivered: u64,
    /// (time, rate in bytes/s): a max filter over the last few seconds.
    rates: VecDeque<(Instant, f64)>,
    /// Mean encoded block size, exponentially weighted.
    block_bytes: Option<f64>,
    /// The best rate ever measured: what the link carries when something fills it.
    peak_rate: Option<f64>,
    /// The best rate ever measured over [`CAPACITY_SPAN`] or more: the link's capacity,
    /// without the bursts a receiver starved of CPU shows over short spans.
    capacity: Option<f64>,
    /// The smallest round trip ever measured: the link's own, without the queue that
    /// traffic builds in front of it.
    base_rtt: Option<Duration>,
    /// The network round trip the source's transport measured, if it tells.
    path_rtt: Option<Duration>,
}

const RTT_SAMPLES: usize = 32;
const RATE_SPAN: Duration = Duration::from_secs(3);
/// The shortest span a capacity sample covers. During a cold boot at 2 Mbit/s the rate
/// over 250 ms reached 2.6 times the link's (bursts: blocks verified in clumps while the
/// TCG guest held the CPUs, and tbf's bucket), and neighbours judged by it cost the boot
/// 56 blocks it did not read against a run without neighbours (1.5 MB, 6 s of that link).
const CAPACITY_SPAN: Duration = Duration::from_secs(1);
const RATE_MIN_SPAN: Duration = Duration::from_millis(250);

impl Estimator {
    fn on_rtt(&mut self, sample: Duration) {
        self.base_rtt = Some(self.base_rtt.map_or(sample, |b| b.min(sample)));
        if self.rtt_samples.len() == RTT_SAMPLES {
            self.rtt_samples.pop_front();
        }
        self.rtt_samples.push_back(sample);
    }

    fn on_bytes(&mut self, now: Instant, bytes: u64) {
        self.delivered += bytes;
        self.block_bytes = Some(match self.block_bytes {
            None => bytes as f64,
            Some(m) => m * 0.9 + bytes as f64 * 0.1,
        });
        while self.deliveries.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > RATE_SPAN) {
            self.deliveries.pop_front();
        }
        self.deliveries.push_back((now, self.delivered));
        // A rate over at least four round trips and 250 ms: shorter spans measure bursts
        // (a receiver starved of CPU reads a socket buffer's worth at once).
        let rtt = self.rtt();
        if let Some(rate) = self.rate_over(now, rtt.map_or(RATE_MIN_SPAN, |r| (r * 4).max(RATE_MIN_SPAN))) {
            while self.rates.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > RATE_SPAN) {
                self.rates.pop_front();
            }
            self.rates.push_back((now, rate));
            self.peak_rate = Some(self.peak_rate.map_or(rate, |p| p.max(rate)));
        }
        if let Some(rate) = self.rate_over(now, rtt.map_or(CAPACITY_SPAN, |r| (r * 8).max(CAPACITY_SPAN))) {
            self.capacity = Some(self.capacity.map_or(rate, |c| c.max(rate)));
        }
    }

    /// Bytes per second delivered since the latest delivery at least `span` before `now`.
    /// A binary search: this runs per block under the engine's lock, and on loopback
    /// three seconds of deliveries are thousands of entries.
    fn rate_over(&self, now: Instant, span: Duration) -> Option<f64> {
        let older = self.deliveries.partition_point(|(t, _)| now.saturating_duration_since(*t) >= span);
        let (t, cumulative) = *self.deliveries.get(older.checked_sub(1)?)?;
        let secs = now.saturating_duration_since(t).as_secs_f64();
        (secs > 0.0).then(|| (self.delivered - cumulative) as f64 / secs)
    }

    /// The smallest recent round trip (request sent to first block back).
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt_samples.iter().min().copied()
    }

    /// The round trip the window covers: the transport's path round trip where the source
    /// tells it, else the smallest request-to-first-block sample (which also holds that
    /// block's own transfer).
    pub fn window_rtt(&self) -> Option<Duration> {
        match (self.path_rtt, self.base_rtt) {
            (Some(p), Some(b)) => Some(p.min(b)),
            (p, b) => p.or(b),
        }
    }

    /// The best recent delivery rate, bytes per second.
    pub fn bandwidth(&self) -> Option<f64> {
        self.rates.iter().map(|(_, r)| *r).fold(None, |m, r| Some(m.map_or(r, |m: f64| m.max(r))))
    }

    /// The best delivery rate measured since the start, bytes per second: the link's
    /// capacity as far as anything showed it, when recent traffic (one demand block per
    /// round trip) would understate it.
    pub fn peak_bandwidth(&self) -> Option<f64> {
        self.peak_rate
    }

    /// The best delivery rate measured over a second or more, bytes per second: the link's
    /// capacity, for decisions a short burst must not sway (whether a neighbour pays).
    pub fn capacity(&self) -> Option<f64> {
        self.capacity
    }

    /// Mean encoded block size seen.
    pub fn block_bytes(&self) -> Option<f64> {
        self.block_bytes
    }
}

/// The scheduler's state. See the module comment.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedConfig,
    wants: HashMap<Hash, Want>,
    /// One queue per urgency; an entry is live only if its want is queued at that urgency
    /// (an upgrade leaves a stale entry behind, skipped when popped).
    queues: [VecDeque<Hash>; 3],
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    bulk_in_flight: u64,
    est: Estimator,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: Option<FetchError>,
}

impl Scheduler {
    /// An idle scheduler.
    pub fn new(cfg: SchedConfig) -> Self {
        let backoff = cfg.first_backoff;
        Self {
            cfg,
            wants: HashMap::new(),
            queues: Default::default(),
            batches: HashMap::new(),
            next_batch: 1,
            bulk_in_flight: 0,
            est: Estimator::default(),
            retry_at: None,
            backoff,
            last_error: None,
        }
    }

    /// The source's transport measured the path's round trip as `rtt`.
    pub fn on_path_rtt(&mut self, rtt: Duration) {
        self.est.path_rtt = Some(rtt);
    }

    /// The measurements.
    pub fn estimator(&self) -> &Estimator {
        &self.est
    }

    /// The last link failure, until something arrives again.
    pub fn last_error(&self) -> Option<&FetchError> {
        self.last_error.as_ref()
    }

    /// True if `hash` is wanted (queued or in flight).
    pub fn is_wanted(&self, hash: &Hash) -> bool {
        self.wants.contains_key(hash)
    }

    /// Blocks wanted and not yet here.
    pub fn wanted(&self) -> usize {
        self.wants.len()
    }

    /// Batches in flight.
    pub fn batches_in_flight(&self) -> usize {
        self.batches.len()
    }

    /// Bytes readahead and background may have in flight now: two bandwidth-delay
    /// products of the measured rate and [`Estimator::window_rtt`], plus `queue_allowance`
    /// of link time, within the configured bounds. Not the recent round trip: a sender that
    /// fills a deep router buffer inflates every recent sample, a window sized from them
    /// lets more in, and a demand block waits behind all of it (a second and more at 10
    /// Mbit/s over the benchmarks' relay).
    pub fn window(&self) -> u64 {
        let (Some(bw), Some(rtt)) = (self.est.bandwidth(), self.est.window_rtt()) else {
            return self.cfg.initial_window_bytes.clamp(self.cfg.min_window_bytes, self.cfg.max_window_bytes);
        };
        let bdp = (bw * (rtt.as_secs_f64() * 2.0 + self.cfg.queue_allowance.as_secs_f64())) as u64;
        // The floor: two blocks, and on a fast link (loopback, a LAN) 50 ms of its best rate
        // up to `lan_window_bytes`: there the round trip is the receiver's own work, which the
        // path's round trip leaves out, and a window below it starves the link.
        let fast = self.est.peak_bandwidth().map_or(0, |p| (p * 0.05) as u64).min(self.cfg.lan_window_bytes);
        let floor = self.cfg.min_window_bytes.max(2 * self.block_bytes()).max(fast);
        bdp.clamp(floor, self.cfg.max_window_bytes.max(floor))
    }

    fn block_bytes(&self) -> u64 {
        self.est.block_bytes().map_or(self.cfg.block_bytes_guess, |b| b as u64).max(1)
    }

    /// Someone needs `hash` at `urgency`. Returns true if it was not wanted before.
    pub fn want(&mut self, hash: Hash, urgency: Urgency) -> bool {
        match self.wants.get_mut(&hash) {
            None => {
                self.wants.insert(hash, Want { urgency, state: State::Queued, attempts: 0, solo: false });
                self.queues[urgency as usize].push_back(hash);
                true
            }
            Some(w) => {
                if urgency > w.urgency {
                    w.urgency = urgency;
                    if w.state == State::Queued {
                        self.queues[urgency as usize].push_back(hash);
                    }
                }
                false
            }
        }
    }

    /// How urgently `hash` is wanted, if it is.
    pub fn urgency_of(&self, hash: &Hash) -> Option<Urgency> {
        self.wants.get(hash).map(|w| w.urgency)
    }

    /// Stops wanting a queued block nobody waits for any more (no effect once in flight).
    pub fn give_up(&mut self, hash: &Hash) {
        if self.wants.get(hash).is_some_and(|w| w.state == State::Queued) {
            self.wants.remove(hash);
        }
    }

    fn pop_live(&mut self, level: Urgency) -> Option<Hash> {
        while let Some(h) = self.queues[level as usize].pop_front() {
            if self.wants.get(&h).is_some_and(|w| w.state == State::Queued && w.urgency == level) {
                return Some(h);
            }
        }
        None
    }

    fn take(&mut self, level: Urgency, max: usize) -> Vec<Hash> {
        let mut out: Vec<Hash> = Vec::new();
        while out.len() < max {
            let Some(h) = self.pop_live(level) else { break };
            let solo = self.wants.get(&h).is_some_and(|w| w.solo);
            if solo && !out.is_empty() {
                self.queues[level as usize].push_front(h);
                break;
            }
            out.push(h);
            if solo {
                break;
            }
        }
        out
    }

    /// The next batch to send, if any may go now.
    pub fn poll_batch(&mut self, now: Instant) -> Option<BatchRequest> {
        if let Some(t) = self.retry_at {
            if now < t {
                return None;
            }
            self.retry_at = None;
        }
        let max = self.cfg.max_batch_blocks;
        let demand = self.take(Urgency::Demand, max);
        if !demand.is_empty() {
            return Some(self.launch(now, demand, Urgency::Demand, 0));
        }
        let window = self.window();
        if self.bulk_in_flight >= window {
            return None;
        }
        // Several batches per window, so one slow batch does not idle the link.
        let per_block = self.block_bytes();
        let n = ((window / 4) / per_block).clamp(1, max as u64) as usize;
        for level in [Urgency::Readahead, Urgency::Background] {
            let hashes = self.take(level, n);
            if !hashes.is_empty() {
                let bytes = hashes.len() as u64 * per_block;
                return Some(self.launch(now, hashes, level, bytes));
            }
        }
        None
    }

    fn launch(&mut self, now: Instant, hashes: Vec<Hash>, urgency: Urgency, window_bytes: u64) -> BatchRequest {
        let id = self.next_batch;
        self.next_batch += 1;
        for h in &hashes {
            if let Some(w) = self.wants.get_mut(h) {
                w.state = State::InFlight(id);
            }
        }
        self.bulk_in_flight += window_bytes;
        self.batches
            .insert(id, Batch { hashes: hashes.clone(), undelivered: hashes.len(), urgency, sent: now, last_progress: now, got_first: false, window_bytes });
        BatchRequest { id, hashes, urgency }
    }

    /// Bytes of the window a batch still holds for one of its blocks.
    fn release_one(&mut self, batch: u64) {
        if let Some(b) = self.batches.get_mut(&batch) {
            if b.window_bytes > 0 {
                let share = b.window_bytes / b.undelivered.max(1) as u64;
                b.window_bytes -= share;
                self.bulk_in_flight = self.bulk_in_flight.saturating_sub(share);
            }
            b.undelivered = b.undelivered.saturating_sub(1);
        }
    }

    fn progress(&mut self, now: Instant, batch: u64, bytes: u64) {
        if let Some(b) = self.batches.get_mut(&batch) {
            b.last_progress = now;
            if !b.got_first {
                b.got_first = true;
                let sample = now.saturating_duration_since(b.sent);
                self.est.on_rtt(sample);
            }
        }
        self.est.on_bytes(now, bytes);
        self.backoff = self.cfg.first_backoff;
        self.last_error = None;
    }

    /// Block `hash` of `batch` arrived and verified (`bytes`: its encoded size).
    pub fn on_block(&mut self, now: Instant, batch: u64, hash: &Hash, bytes: u64) -> Arrival {
        self.progress(now, batch, bytes);
        if self.batches.get(&batch).is_some_and(|b| b.hashes.contains(hash)) {
            self.release_one(batch);
        }
        match self.wants.remove(hash) {
            Some(w) => Arrival::Wanted(w.urgency),
            None => Arrival::Unwanted,
        }
    }

    /// Block `hash` of `batch` arrived but failed verification.
    pub fn on_corrupt(&mut self, now: Instant, batch: u64, hash: &Hash, why: &str) -> Rejection {
        self.progress(now, batch, 0);
        if self.batches.get(&batch).is_some_and(|b| b.hashes.contains(hash)) {
            self.release_one(batch);
        }
        let max_attempts = self.cfg.max_attempts;
        match self.wants.get_mut(hash) {
            None => Rejection::Dropped,
            Some(w) if w.urgency == Urgency::Demand && w.attempts + 1 < max_attempts => {
                w.attempts += 1;
                w.state = State::Queued;
                w.solo = true;
                self.queues[Urgency::Demand as usize].push_front(*hash);
                Rejection::Retried
            }
            Some(w) => {
                let urgency = w.urgency;
                self.wants.remove(hash);
                if urgency == Urgency::Demand {
                    Rejection::Failed(FetchError::new(FetchErrorKind::Corrupt, format!("block {hash} arrived corrupt {max_attempts} times: {why}")))
                } else {
                    // Readahead and prefetch are guesses: a bad block is dropped, and a
                    // reader who later needs it asks again as demand.
                    Rejection::Dropped
                }
            }
        }
    }

    /// `batch` is over. Returns the blocks that failed for good, with why.
    pub fn on_end(&mut self, now: Instant, batch: u64, result: Result<(), FetchError>) -> Vec<(Hash, FetchError)> {
        let Some(b) = self.batches.remove(&batch) else { return Vec::new() };
        self.bulk_in_flight = self.bulk_in_flight.saturating_sub(b.window_bytes);
        let lost: Vec<Hash> = b.hashes.iter().copied().filter(|h| self.wants.get(h).is_some_and(|w| w.state == State::InFlight(batch))).collect();
        let mut failed = Vec::new();
        match result {
            Ok(()) => {
                for h in lost {
                    self.wants.remove(&h);
                    failed.push((h, FetchError::new(FetchErrorKind::NotFound, format!("the source ended the batch without block {h}"))));
                }
            }
            Err(e) if e.is_retryable() => {
                for h in lost.into_iter().rev() {
                    self.requeue_front(h);
                }
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(self.cfg.max_backoff);
                self.last_error = Some(e);
            }
            Err(e) if e.kind == FetchErrorKind::NotFound && lost.len() > 1 => {
                // Which one is missing? Ask for each alone.
                for h in lost.into_iter().rev() {
                    if let Some(w) = self.wants.get_mut(&h) {
                        w.solo = true;
                    }
                    self.requeue_front(h);
                }
            }
            Err(e) if e.kind == FetchErrorKind::Corrupt => {
                // A damaged stream: ask again a limited number of times.
                for h in lost.into_iter().rev() {
                    if let Some(f) = self.bump_attempt(&h, &e) {
                        failed.push(f);
                    }
                }
            }
            Err(e) => {
                for h in lost {
                    self.wants.remove(&h);
                    failed.push((h, e.clone()));
                }
            }
        }
        failed
    }

    fn requeue_front(&mut self, h: Hash) {
        if let Some(w) = self.wants.get_mut(&h) {
            w.state = State::Queued;
            self.queues[w.urgency as usize].push_front(h);
        }
    }

    fn bump_attempt(&mut self, h: &Hash, e: &FetchError) -> Option<(Hash, FetchError)> {
        let max_attempts = self.cfg.max_attempts;
        let w = self.wants.get_mut(h)?;
        w.attempts += 1;
        if w.attempts >= max_attempts {
            self.wants.remove(h);
            return Some((*h, FetchError::new(e.kind, format!("block {h}: {max_attempts} attempts failed: {e}"))));
        }
        self.requeue_front(*h);
        None
    }

    /// Abandons batches that delivered nothing for `batch_stall`; their blocks are asked
    /// again (up to the attempt limit). Returns (abandoned batch ids, blocks failed for good).
    pub fn expire(&mut self, now: Instant) -> (Vec<u64>, Vec<(Hash, FetchError)>) {
        let stall = self.cfg.batch_stall;
        let stalled: Vec<u64> = self.batches.iter().filter(|(_, b)| now.saturating_duration_since(b.last_progress) >= stall).map(|(id, _)| *id).collect();
        let mut failed = Vec::new();
        for id in &stalled {
            if let Some(b) = self.batches.remove(id) {
                self.bulk_in_flight = self.bulk_in_flight.saturating_sub(b.window_bytes);
                let e = FetchError::new(FetchErrorKind::Unavailable, format!("no answer for {:.1} s", stall.as_secs_f64()));
                for h in b.hashes.iter().rev() {
                    if self.wants.get(h).is_some_and(|w| w.state == State::InFlight(*id)) {
                        failed.extend(self.bump_attempt(h, &e));
                    }
                }
                self.last_error = Some(e);
            }
        }
        (stalled, failed)
    }

    /// When [`Scheduler::poll_batch`] or [`Scheduler::expire`] may next have something
    /// to do without any other event.
    pub fn next_deadline(&self) -> Option<Instant> {
        let stall = self.batches.values().map(|b| b.last_progress + self.cfg.batch_stall).min();
        match (stall, self.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The urgency of the batch, if it is in flight.
    pub fn batch_urgency(&self, batch: u64) -> Option<Urgency> {
        self.batches.get(&batch).map(|b| b.urgency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fast_link_keeps_a_window_its_receiver_can_fill_and_a_slow_one_stays_short() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Loopback: QUIC's round trip is 0.1 ms, the rate 300 MB/s (64 KiB every 0.2 ms).
        let mut fast = Scheduler::new(SchedConfig::default());
        fast.on_path_rtt(Duration::from_micros(100));
        fast.est.on_rtt(ms(2));
        for i in 0..5000u32 {
            fast.est.on_bytes(t0 + Duration::from_micros(200) * i, 65536);
        }
        // Then 4 s at 20 MB/s (a window too small for the receiver's own delay would keep
        // it there: the rate it allows is the rate it measures).
        for i in 1..=1250u32 {
            fast.est.on_bytes(t0 + ms(1000) + ms(3) * i + Duration::from_micros(200) * i, 65536);
        }
        assert!(fast.est.bandwidth().unwrap() < 30e6, "{:?}", fast.est.bandwidth());
        assert!(fast.window() >= 1 << 20, "loopback window {}: the path's round trip leaves out the receiver's work", fast.window());
        // 10 Mbit/s, 40 ms: two blocks or so, so a demand read waits behind little.
        let mut slow = Scheduler::new(SchedConfig::default());
        slow.on_path_rtt(ms(40));
        slow.est.on_rtt(ms(150));
        for i in 0..200u32 {
            slow.est.on_bytes(t0 + ms(52) * i, 65536);
        }
        assert!(slow.window() <= 3 * 65536, "10 Mbit/s window {}", slow.window());
    }

    #[test]
    fn the_peak_rate_outlives_the_burst_that_showed_it() {
        let mut est = Estimator::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // 2 s at 1 MB/s (a 20 KB block every 20 ms), then a block every 200 ms for 10 s.
        for i in 0..100u32 {
            est.on_bytes(t0 + ms(20) * i, 20_000);
        }
        let burst = est.bandwidth().unwrap();
        assert!((0.8e6..1.2e6).contains(&burst), "{burst}");
        for i in 1..=50u32 {
            est.on_bytes(t0 + ms(2000) + ms(200) * i, 20_000);
        }
        let recent = est.bandwidth().unwrap();
        assert!(recent < 0.2e6, "recent traffic is sparse: {recent}");
        assert_eq!(est.peak_bandwidth(), Some(est.peak_rate.unwrap()));
        assert!(est.peak_bandwidth().unwrap() >= burst, "the link's capacity is remembered");
        let capacity = est.capacity().unwrap();
        assert!((0.8e6..1.2e6).contains(&capacity), "{capacity}");
    }

    #[test]
    fn a_burst_does_not_pass_for_the_links_capacity() {
        let mut est = Estimator::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // A 250 KB/s link (a 25 KB block every 100 ms); once, 100 KB more come at one
        // instant (blocks queued while the receiver had no CPU, verified at once).
        for i in 0..50u32 {
            est.on_bytes(t0 + ms(100) * i, 25_000);
            if i == 30 {
                est.on_bytes(t0 + ms(100) * i, 100_000);
            }
        }
        let (peak, capacity) = (est.peak_bandwidth().unwrap(), est.capacity().unwrap());
        assert!(peak > 2.0 * 0.25e6, "a short span sees the burst: {peak}");
        assert!(capacity < 1.5 * 0.25e6, "capacity {capacity} on a 250 KB/s link");
    }
}
