//! Earned readahead: a stream that really reads sequentially gets a window ahead of it
//! that grows with the rate it reads at; a random reader gets none.
//!
//! A file keeps a few streams (a guest runs several readers at once). A read that starts
//! where a stream ended (within a small slack: the kernel skips pages it holds) continues
//! it; after [`EARN_AFTER`] such continuations the stream reads ahead
//! `rate × horizon` bytes, where `horizon` is what a fetch takes to come back (a couple
//! of round trips) — just enough to hide the link, not a fixed guess that doubles the
//! bytes of a reader who stops. Any other read starts a new stream, replacing the
//! longest idle one.

use std::time::{Duration, Instant};

/// Sequential continuations a stream needs before it gets any readahead.
pub const EARN_AFTER: u32 = 1;
/// A read this far past where a stream ended still continues it.
pub const SLACK: u64 = 128 << 10;
/// Streams tracked per file.
pub const STREAMS: usize = 4;

#[derive(Debug, Clone)]
struct Stream {
    /// Where the stream's next read is expected.
    next: u64,
    started: Instant,
    last: Instant,
    bytes: u64,
    hits: u32,
    /// Everything below this was already asked for.
    ahead_to: u64,
}

/// What the link allows a window: how long a fetch takes to come back, the link's measured
/// rate (`None`: unknown), a cap, and the unit of fetching.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Time from asking to having ([`horizon`]).
    pub horizon: Duration,
    /// Bytes per second the link delivers.
    pub link_rate: Option<f64>,
    /// Most bytes ahead of one stream.
    pub max_window: u64,
    /// A window ends on a multiple of this (the block size): it fetches only blocks it
    /// covers whole. On a slow link a window is less than a block (2 Mbit/s, 40 ms: 43 KB)
    /// and gets none; rounded up (and at least the read's own length, as it was) it fetched
    /// a block past the end of every small file a guest read twice in a row.
    pub block_size: u64,
}

impl Budget {
    /// The budget the link's measurements allow: the path's round trip (a recent request's
    /// held 150-600 ms of the link's own queue during a 2 Mbit/s cold boot, and the windows
    /// it allowed fetched 1,083 blocks where the path's fetched 1,014-1,028), and the link's
    /// capacity once a second of traffic showed it (the best 250 ms overstated a 2 Mbit/s
    /// link 2.6 times).
    pub fn for_link(est: &crate::sched::Estimator, max_window: u64, block_size: u64) -> Self {
        Self { horizon: horizon(est.window_rtt()), link_rate: est.capacity().or_else(|| est.bandwidth()), max_window, block_size }
    }
}

/// What a fetch takes to come back, for a readahead window: the path's round trip (not a
/// recent request's, which holds the queue the link's own traffic built) and then some.
/// A guest's reads come in bursts, and readahead that arrives a little early costs
/// nothing, while one that arrives late costs a round trip.
pub fn horizon(rtt: Option<Duration>) -> Duration {
    rtt.unwrap_or(Duration::from_millis(5)) * 3 + Duration::from_millis(50)
}

/// One file's readers.
#[derive(Debug, Default, Clone)]
pub struct Readahead {
    streams: Vec<Stream>,
}

impl Readahead {
    /// Notes a read of `len` bytes at `offset`; returns the byte range to fetch ahead of
    /// it, if the stream earned one, within `budget`. `missed`: the read needed a fetch. A stream reading
    /// what is already here gets no new window unless it is consuming one it was given
    /// (a warmed working set must not drag in its neighbours).
    ///
    /// The window is what the stream would read, at the lesser of its own rate and the
    /// link's, while a fetch comes back: a reader faster than the link cannot use more.
    pub fn on_read(&mut self, now: Instant, offset: u64, len: u64, missed: bool, budget: Budget) -> Option<(u64, u64)> {
        let Budget { horizon, link_rate, max_window, block_size } = budget;
        let end = offset.saturating_add(len);
        let hit = self.streams.iter_mut().find(|s| offset >= s.next.saturating_sub(len) && offset <= s.next.saturating_add(SLACK));
        let Some(s) = hit else {
            let fresh = Stream { next: end, started: now, last: now, bytes: len, hits: 0, ahead_to: end };
            if self.streams.len() < STREAMS {
                self.streams.push(fresh);
            } else if let Some(idle) = self.streams.iter_mut().min_by_key(|s| s.last) {
                *idle = fresh;
            }
            return None;
        };
        let in_window = s.ahead_to > s.next;
        s.hits += 1;
        s.bytes += len;
        s.next = s.next.max(end);
        s.last = now;
        if s.hits < EARN_AFTER || !(missed || in_window) {
            return None;
        }
        // The rate since the stream began, including the time it waited for fetches: a
        // reader held up by the link earns a window that lets it go faster, a reader that
        // is slow on its own (a guest parsing what it read) earns a small one.
        let secs = now.saturating_duration_since(s.started).as_secs_f64().max(1e-3);
        let rate = (s.bytes as f64 / secs).min(link_rate.unwrap_or(f64::INFINITY));
        let window = ((rate * horizon.as_secs_f64()) as u64).min(max_window);
        // Topped up once half the window is consumed, not on every read: a window moved a
        // read at a time asked for a block or two per request, and on a fast path the
        // requests' own cost held a cold sequential read back.
        if s.ahead_to.saturating_sub(s.next) > window / 2 {
            return None;
        }
        let from = s.ahead_to.max(s.next);
        let to = s.next.saturating_add(window) / block_size.max(1) * block_size.max(1);
        if to <= from {
            return None;
        }
        s.ahead_to = to;
        Some((from, to))
    }
}

/// The blocks a window `from..to` from [`Readahead::on_read`] fetches: from the first
/// that starts at or after `from` (the reader fetches the one it is in) to `to`, which ends
/// on a block.
pub fn blocks_ahead(from: u64, to: u64, block_size: u64) -> std::ops::Range<u64> {
    from.div_ceil(block_size)..to / block_size
}

/// Neighbours of missed blocks, earned like readahead. A booting guest's reads jump about,
/// but a block it misses is often followed by the next one soon after (70% of first
/// touches in a Debian boot's trace). A file starts without neighbours; it earns them when
/// a miss lands just after the previous one (or spans blocks), and keeps them while at
/// least half of the last neighbours sent were read; a random reader never earns any.
/// Positions are block indexes.
#[derive(Debug, Default)]
pub struct Neighbours {
    on: bool,
    last_miss: Option<u64>,
    /// The last neighbours sent, and whether a read has touched each since.
    sent: std::collections::VecDeque<(u64, bool)>,
}

/// Neighbours whose use decides whether a file keeps getting them.
const NEIGHBOUR_WINDOW: usize = 16;
/// Neighbours sent before their use is judged.
const NEIGHBOUR_PROBATION: usize = 8;

impl Neighbours {
    /// A read of blocks `first..=last`: neighbours sent among them count as used.
    pub fn on_read(&mut self, first: u64, last: u64) {
        for (b, used) in self.sent.iter_mut() {
            if (first..=last).contains(b) {
                *used = true;
            }
        }
    }

    /// A read missed blocks `lo..=hi`: may neighbours follow it? The caller sends them
    /// (and names them with [`Neighbours::sent`]) only if so.
    pub fn on_miss(&mut self, lo: u64, hi: u64) -> bool {
        if !self.on && (hi > lo || self.last_miss.is_some_and(|m| m + 1 == lo)) {
            self.on = true;
            self.sent.clear();
        }
        if self.on && self.sent.len() >= NEIGHBOUR_PROBATION {
            let used = self.sent.iter().filter(|(_, u)| *u).count();
            if used * 2 < self.sent.len() {
                self.on = false;
            }
        }
        self.last_miss = Some(hi);
        self.on
    }

    /// Neighbour `block` was sent.
    pub fn sent(&mut self, block: u64) {
        if self.sent.len() == NEIGHBOUR_WINDOW {
            self.sent.pop_front();
        }
        self.sent.push_back((block, false));
    }
}

/// How many blocks after a missed block its fetch brings along, for a file that earned
/// [`Neighbours`]. A booting guest's reads jump about, but a block it misses is
/// often followed by the next one soon after (70% of the time in a Debian boot's trace:
/// fetching one neighbour per miss cut its requests by a fifth for 15% more blocks). A
/// neighbour pays when its transfer costs less than the round trip it saves at that odds:
/// on a 10 Mbit/s, 40 ms link one block, on faster links two, on 2 Mbit/s or on a LAN
/// (round trips are cheap there) none. `bandwidth` is the link's capacity (the peak
/// measured over a second or more: [`crate::sched::Estimator::capacity`]), not the recent
/// rate, which a reader waiting on round trips keeps low.
pub fn neighbours_on_miss(rtt: Option<Duration>, bandwidth: Option<f64>, encoded_block_bytes: Option<f64>, block_size: u64) -> u64 {
    const USED_ODDS: f64 = 0.7;
    let Some(rtt) = rtt else { return 0 };
    if rtt < Duration::from_millis(2) {
        return 0;
    }
    // Before anything is measured: a 10 Mbit/s link, blocks a third of their size.
    let bdp = bandwidth.unwrap_or(1.25e6) * rtt.as_secs_f64();
    let block = encoded_block_bytes.unwrap_or(block_size as f64 / 3.0).max(1.0);
    ((USED_ODDS * bdp / block) as u64).min(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_disk_block_brings_neighbours_only_where_they_pay() {
        let ms = Duration::from_millis;
        let bs = 64 << 10;
        let block = Some(19_000.0);
        assert_eq!(neighbours_on_miss(None, None, None, bs), 0, "nothing measured yet");
        assert_eq!(neighbours_on_miss(Some(ms(0)), Some(1e9), block, bs), 0, "loopback: round trips are cheap");
        assert_eq!(neighbours_on_miss(Some(ms(40)), Some(1.25e6), block, bs), 1, "10 Mbit/s, 40 ms: one");
        assert_eq!(neighbours_on_miss(Some(ms(40)), Some(6.25e6), block, bs), 2, "50 Mbit/s: capped at two");
        assert_eq!(neighbours_on_miss(Some(ms(40)), Some(0.25e6), block, bs), 0, "2 Mbit/s: a neighbour costs more than it saves");
        assert_eq!(neighbours_on_miss(Some(ms(40)), Some(1.25e6), Some(65536.0), bs), 0, "incompressible blocks at 10 Mbit/s");
    }

    const MS: Duration = Duration::from_millis(1);

    fn b(horizon: Duration, link_rate: Option<f64>, max_window: u64) -> Budget {
        Budget { horizon, link_rate, max_window, block_size: 4096 }
    }

    #[test]
    fn a_window_ends_on_a_block_and_one_under_a_block_fetches_nothing() {
        let bs = 64 << 10;
        let t0 = Instant::now();
        // 128 KiB reads in order at 2 Mbit/s, 40 ms (horizon 170 ms): the window, 42 KB, is
        // under a block.
        let slow = Budget { horizon: horizon(Some(40 * MS)), link_rate: Some(0.25e6), max_window: 8 << 20, block_size: bs };
        let mut ra = Readahead::default();
        for i in 0..20u64 {
            assert_eq!(ra.on_read(t0 + MS * 500 * i as u32, i * 2 * bs, 2 * bs, true, slow), None, "read {i}");
        }
        // At 10 Mbit/s: 212 KB, three whole blocks, and the next window starts where it ended.
        let fast = Budget { link_rate: Some(1.25e6), ..slow };
        let mut ra = Readahead::default();
        let mut last_to: Option<u64> = None;
        for i in 0..20u64 {
            if let Some((from, to)) = ra.on_read(t0 + MS * 50 * i as u32, i * 2 * bs, 2 * bs, true, fast) {
                assert_eq!(to % bs, 0, "ends on a block");
                assert!(blocks_ahead(from, to, bs).end - blocks_ahead(from, to, bs).start <= 3);
                assert!(last_to.is_none_or(|t| from == t.max((i + 1) * 2 * bs)), "no gap, no overlap");
                last_to = Some(to);
            }
        }
        assert!(last_to.is_some(), "a sequential reader at 10 Mbit/s earns readahead");
    }

    #[test]
    fn random_reads_get_no_readahead() {
        let mut ra = Readahead::default();
        let t0 = Instant::now();
        let mut x = 12345u64;
        for i in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = (x % (1 << 30)) & !0xfff;
            assert_eq!(ra.on_read(t0 + MS * i, offset, 4096, true, b(80 * MS, None, 8 << 20)), None, "read {i} at {offset}");
        }
    }

    #[test]
    fn a_sequential_reader_earns_a_window_that_grows_with_its_rate() {
        let len = 64 << 10;
        let (mut slow, mut fast) = (Readahead::default(), Readahead::default());
        let t0 = Instant::now();
        let (mut slow_window, mut fast_window) = (0, 0);
        for i in 0..50u64 {
            // The same stream of reads, one 10x faster than the other.
            if let Some((from, to)) = slow.on_read(t0 + MS * 100 * i as u32, i * len, len, true, b(100 * MS, None, 64 << 20)) {
                assert!(from >= (i + 1) * len, "never behind the reader");
                slow_window = to - (i + 1) * len;
            }
            if let Some((_, to)) = fast.on_read(t0 + MS * 10 * i as u32, i * len, len, true, b(100 * MS, None, 64 << 20)) {
                fast_window = to - (i + 1) * len;
            }
            if i < u64::from(EARN_AFTER) {
                assert_eq!(slow_window, 0, "earned only after {EARN_AFTER} continuations");
            }
        }
        assert!(slow_window > 0, "{slow_window}");
        assert!(fast_window >= 5 * slow_window, "window grows with the rate: fast {fast_window}, slow {slow_window}");
    }

    #[test]
    fn a_reader_faster_than_the_link_gets_no_more_than_the_link_can_bring() {
        let len = 64 << 10;
        let t0 = Instant::now();
        let (mut free, mut capped) = (Readahead::default(), Readahead::default());
        let (mut w_free, mut w_capped) = (0, 0);
        for i in 0..20u64 {
            // 64 KiB per millisecond: 64 MB/s, on a 1.25 MB/s link.
            if let Some((_, to)) = free.on_read(t0 + MS * i as u32, i * len, len, true, b(100 * MS, None, 64 << 20)) {
                w_free = to - (i + 1) * len;
            }
            if let Some((_, to)) = capped.on_read(t0 + MS * i as u32, i * len, len, true, b(100 * MS, Some(1.25e6), 64 << 20)) {
                w_capped = to - (i + 1) * len;
            }
        }
        assert!(w_free > 4 << 20, "{w_free}");
        assert!(w_capped <= 2 * len, "1.25 MB/s x 100 ms is two blocks: {w_capped}");
    }

    #[test]
    fn reads_of_what_is_here_earn_nothing_until_a_miss() {
        let len = 64 << 10;
        let mut ra = Readahead::default();
        let t0 = Instant::now();
        for i in 0..10u64 {
            assert_eq!(ra.on_read(t0 + MS * i as u32, i * len, len, false, b(50 * MS, None, 1 << 20)), None, "read {i} hit the cache");
        }
        assert!(ra.on_read(t0 + MS * 10, 10 * len, len, true, b(50 * MS, None, 1 << 20)).is_some(), "a miss in a sequential stream earns a window");
        // The window (1 MiB, 16 blocks) is topped up once half of it is read, in one range.
        let topped = (11..40u64).find_map(|i| ra.on_read(t0 + MS * i as u32, i * len, len, false, b(50 * MS, None, 1 << 20)).map(|r| (i, r)));
        let (at, (from, to)) = topped.expect("reading through its window extends it");
        assert!((18..=20).contains(&at), "topped up at read {at}, not on every read");
        assert!(to - from >= 8 * len, "a top-up asks for half a window at once: {} bytes", to - from);
    }

    #[test]
    fn ranges_never_overlap_and_interleaved_streams_are_told_apart() {
        let len = 64 << 10;
        let mut ra = Readahead::default();
        let t0 = Instant::now();
        let mut asked: Vec<(u64, u64)> = Vec::new();
        for i in 0..100u64 {
            // Two sequential readers far apart, interleaved.
            for base in [0u64, 1 << 30] {
                if let Some(r) = ra.on_read(t0 + MS * i as u32, base + i * len, len, true, b(50 * MS, None, 1 << 20)) {
                    asked.push(r);
                }
            }
        }
        assert!(asked.iter().any(|(f, _)| *f < 1 << 30) && asked.iter().any(|(f, _)| *f >= 1 << 30), "both streams read ahead");
        asked.sort_unstable();
        for pair in asked.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "overlapping readahead {pair:?}");
        }
    }

    #[test]
    fn neighbours_are_earned_by_adjacent_misses_and_lost_when_unused() {
        let mut n = Neighbours::default();
        assert!(!n.on_miss(100, 100), "a first miss earns nothing");
        assert!(!n.on_miss(7, 7), "nor a jump");
        assert!(n.on_miss(8, 8), "a miss right after the last one earns them");
        // Neighbours that are read keep them on.
        for b in 9..30 {
            n.sent(b + 1);
            n.on_read(b + 1, b + 1);
            assert!(n.on_miss(b + 2, b + 2));
        }
        // Neighbours nobody reads lose them after the probation.
        let mut lost = false;
        for k in 0..20 {
            let b = 1000 + 10 * k;
            if !n.on_miss(b, b) {
                lost = true;
                break;
            }
            n.sent(b + 1);
        }
        assert!(lost, "unused neighbours stop");
        // A random reader: at most a probation's worth, if a chance adjacency earns any.
        let mut random = Neighbours::default();
        let (mut x, mut granted) = (0x9e37_79b9_7f4a_7c15u64, 0);
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x % 16384;
            random.on_read(b, b);
            if random.on_miss(b, b) {
                granted += 1;
                random.sent(b + 1);
            }
        }
        assert!(granted <= NEIGHBOUR_PROBATION + 1, "{granted}");
    }
}
