//! A deterministic simulated link and server for the scheduler, in virtual time (as
//! quinn-proto tests its state machine with a simulated pair, without sockets).
//!
//! The server serves batches one block at a time, highest urgency first and round robin
//! among batches of equal urgency (as QUIC stream priorities do), serialising each block at
//! the link's bandwidth; a block reaches the client half a round trip after it was sent,
//! or a full round trip later if it was "lost" (retransmitted). With a `buffer`, the
//! sender runs that far ahead of the link into a first-in first-out queue (a bloated
//! router buffer that the congestion controller fills): priorities then act only on what
//! enters the queue, and whatever is queued delays a demand block. A missing block ends its
//! batch with "not found" (as the real server does); a corrupt block arrives damaged.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use capsule_images::Hash;

use crate::sched::{Arrival, Rejection, SchedConfig, Scheduler};
use crate::{BatchRequest, FetchError, FetchErrorKind, Urgency};

/// The link.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Round trip.
    pub rtt: Duration,
    /// Bytes per second, each way.
    pub bytes_per_sec: f64,
    /// Probability that a block needs a retransmission (one more round trip).
    pub loss: f64,
    /// Link time the sender may queue ahead of the bottleneck (zero: it sends each block
    /// just in time, by priority).
    pub buffer: Duration,
}

impl Link {
    /// `mbit` Mbit/s with `rtt_ms` of round trip and no loss.
    pub fn mbit(mbit: f64, rtt_ms: u64) -> Self {
        Self { rtt: Duration::from_millis(rtt_ms), bytes_per_sec: mbit * 1e6 / 8.0, loss: 0.0, buffer: Duration::ZERO }
    }
}

#[derive(Debug)]
enum Event {
    RequestArrives(BatchRequest),
    ServerFree,
    Block { batch: u64, hash: Hash, bytes: u64, corrupt: bool },
    End { batch: u64, result: Result<(), FetchError> },
}

#[derive(Debug)]
struct Serving {
    id: u64,
    urgency: Urgency,
    left: std::collections::VecDeque<Hash>,
    /// When it was last served: round robin goes to the least recent.
    turn: u64,
    last_arrival: Instant,
}

/// The simulation: a scheduler, a link, a server.
#[derive(Debug)]
pub struct Sim {
    /// Virtual now.
    pub now: Instant,
    /// The scheduler under test.
    pub sched: Scheduler,
    link: Link,
    rng: u64,
    sizes: HashMap<Hash, u64>,
    /// Blocks the server lacks.
    pub missing: HashSet<Hash>,
    /// Blocks the server sends damaged, with how many more times.
    pub corrupt: HashMap<Hash, u32>,
    /// The server accepts requests and never answers.
    pub silent: bool,
    serving: Vec<Serving>,
    server_busy: bool,
    /// When the bottleneck has sent everything queued so far.
    link_free_at: Instant,
    turn: u64,
    events: BinaryHeap<Reverse<(Instant, u64)>>,
    payloads: HashMap<u64, Event>,
    seq: u64,
    /// When each block arrived, and at which urgency it was wanted.
    pub delivered: HashMap<Hash, (Instant, Urgency)>,
    /// Blocks that failed for good.
    pub failed: HashMap<Hash, FetchError>,
    /// Bytes that crossed the link towards the client.
    pub wire_bytes: u64,
    /// Blocks that arrived unwanted (duplicates).
    pub unwanted: u64,
    /// Batches sent.
    pub batches: u64,
    /// Time the server had nothing to send.
    pub server_idle: Duration,
    idle_since: Option<Instant>,
}

impl Sim {
    /// A server holding `blocks` (hash, encoded size) behind `link`.
    pub fn new(link: Link, cfg: SchedConfig, blocks: &[(Hash, u64)], seed: u64) -> Self {
        // The transport tells the path's round trip, as QUIC does to the real engine.
        let mut sched = Scheduler::new(cfg);
        sched.on_path_rtt(link.rtt);
        Self {
            now: Instant::now(),
            sched,
            link,
            rng: seed | 1,
            sizes: blocks.iter().copied().collect(),
            missing: HashSet::new(),
            corrupt: HashMap::new(),
            silent: false,
            serving: Vec::new(),
            server_busy: false,
            link_free_at: Instant::now(),
            turn: 0,
            events: BinaryHeap::new(),
            payloads: HashMap::new(),
            seq: 0,
            delivered: HashMap::new(),
            failed: HashMap::new(),
            wire_bytes: 0,
            unwanted: 0,
            batches: 0,
            server_idle: Duration::ZERO,
            idle_since: None,
        }
    }

    fn random(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn at(&mut self, t: Instant, e: Event) {
        self.seq += 1;
        self.events.push(Reverse((t, self.seq)));
        self.payloads.insert(self.seq, e);
    }

    /// Wants blocks at `urgency` now, and sends what the scheduler lets go.
    pub fn want(&mut self, hashes: &[Hash], urgency: Urgency) {
        for h in hashes {
            if !self.delivered.contains_key(h) {
                self.sched.want(*h, urgency);
            }
        }
        self.pump();
    }

    fn pump(&mut self) {
        while let Some(b) = self.sched.poll_batch(self.now) {
            self.batches += 1;
            let t = self.now + self.link.rtt / 2;
            self.at(t, Event::RequestArrives(b));
        }
    }

    fn serve_next(&mut self) {
        if self.server_busy {
            return;
        }
        let Some(top) = self.serving.iter().map(|s| s.urgency).max() else {
            self.idle_since.get_or_insert(self.now);
            return;
        };
        if let Some(t) = self.idle_since.take() {
            self.server_idle += self.now.duration_since(t);
        }
        let Some(pos) = self.serving.iter().enumerate().filter(|(_, s)| s.urgency == top).min_by_key(|(_, s)| (s.turn, s.id)).map(|(i, _)| i) else { return };
        let Some(hash) = self.serving[pos].left.pop_front() else { return };
        let id = self.serving[pos].id;
        if self.missing.contains(&hash) {
            let t = self.now + self.link.rtt / 2;
            self.serving.remove(pos);
            self.at(t, Event::End { batch: id, result: Err(FetchError::new(FetchErrorKind::NotFound, format!("no block {hash}"))) });
            self.serve_next();
            return;
        }
        let bytes = self.sizes.get(&hash).copied().unwrap_or(65536);
        let send = Duration::from_secs_f64(bytes as f64 / self.link.bytes_per_sec);
        let sent = self.now.max(self.link_free_at) + send;
        self.link_free_at = sent;
        let lost = self.random() < self.link.loss;
        let mut arrives = sent + self.link.rtt / 2 + if lost { self.link.rtt } else { Duration::ZERO };
        // One stream delivers in order: a retransmission holds up the blocks behind it.
        arrives = arrives.max(self.serving[pos].last_arrival);
        self.serving[pos].last_arrival = arrives;
        self.turn += 1;
        self.serving[pos].turn = self.turn;
        let corrupt = match self.corrupt.get_mut(&hash) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        self.wire_bytes += bytes;
        self.at(arrives, Event::Block { batch: id, hash, bytes, corrupt });
        if self.serving[pos].left.is_empty() {
            let s = self.serving.remove(pos);
            self.at(arrives, Event::End { batch: s.id, result: Ok(()) });
        }
        self.server_busy = true;
        // The next block enters the queue once what is queued drains below the buffer.
        let free = sent.checked_sub(self.link.buffer).unwrap_or(self.now).max(self.now);
        self.at(free, Event::ServerFree);
    }

    fn handle(&mut self, e: Event) {
        match e {
            Event::RequestArrives(b) => {
                if !self.silent {
                    self.serving.push(Serving { id: b.id, urgency: b.urgency, left: b.hashes.into(), turn: self.turn, last_arrival: self.now });
                    self.serve_next();
                }
            }
            Event::ServerFree => {
                self.server_busy = false;
                self.serve_next();
            }
            Event::Block { batch, hash, bytes, corrupt } => {
                if corrupt {
                    if let Rejection::Failed(e) = self.sched.on_corrupt(self.now, batch, &hash, "simulated damage") {
                        self.failed.insert(hash, e);
                    }
                } else {
                    match self.sched.on_block(self.now, batch, &hash, bytes) {
                        Arrival::Wanted(u) => {
                            self.delivered.insert(hash, (self.now, u));
                        }

                        Arrival::Unwanted => {
                            self.unwanted += 1;
                        }
                    }
                }
            }
            Event::End { batch, result } => {
                for (h, e) in self.sched.on_end(self.now, batch, result) {
                    self.failed.insert(h, e);
                }
            }
        }
        self.pump();
    }

    /// Runs events until `until` (virtual), handling the scheduler's timers on the way.
    pub fn run_until(&mut self, until: Instant) {
        loop {
            let next_event = self.events.peek().map(|Reverse((t, _))| *t);
            let next_timer = self.sched.next_deadline();
            let next = match (next_event, next_timer) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match next {
                Some(t) if t <= until => {
                    self.now = self.now.max(t);
                    if next_event == Some(t) {
                        if let Some(Reverse((_, seq))) = self.events.pop() {
                            if let Some(e) = self.payloads.remove(&seq) {
                                self.handle(e);
                            }
                        }
                    } else {
                        let (_, failed) = self.sched.expire(self.now);
                        for (h, e) in failed {
                            self.failed.insert(h, e);
                        }
                        self.pump();
                    }
                }
                _ => {
                    self.now = self.now.max(until);
                    return;
                }
            }
        }
    }

    /// Runs until every block of `hashes` arrived or failed, or `limit` passed; returns
    /// the virtual time that took.
    pub fn run_until_done(&mut self, hashes: &[Hash], limit: Duration) -> Duration {
        let start = self.now;
        let step = Duration::from_millis(1);
        while !hashes.iter().all(|h| self.delivered.contains_key(h) || self.failed.contains_key(h)) {
            if self.now.duration_since(start) >= limit {
                break;
            }
            let next = self.events.peek().map(|Reverse((t, _))| *t).unwrap_or(self.now + step);
            let next = self.sched.next_deadline().map_or(next, |d| d.min(next)).max(self.now + Duration::from_micros(1));
            self.run_until(next);
        }
        self.now.duration_since(start)
    }
}

/// `n` distinct block hashes.
pub fn hashes(n: usize, salt: u64) -> Vec<Hash> {
    (0..n as u64).map(|i| Hash::of(&[i.to_le_bytes(), salt.to_le_bytes()].concat())).collect()
}
