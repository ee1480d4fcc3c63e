//! The scheduler against the simulated link: deterministic, in virtual time.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use capsule_fetch::readahead::{blocks_ahead, Budget, Readahead};
use capsule_fetch::sched::SchedConfig;
use capsule_fetch::sim::{hashes, Link, Sim};
use capsule_fetch::{FetchErrorKind, Urgency};

const BLOCK: u64 = 32 << 10;

fn sim(link: Link, n: usize, seed: u64) -> (Sim, Vec<capsule_fetch::Hash>) {
    let hs = hashes(n, seed);
    let blocks: Vec<_> = hs.iter().map(|h| (*h, BLOCK)).collect();
    (Sim::new(link, SchedConfig { block_bytes_guess: BLOCK, ..SchedConfig::default() }, &blocks, seed), hs)
}

fn goodput(link: Link, n: usize, seed: u64) -> f64 {
    let (mut s, hs) = sim(link, n, seed);
    s.want(&hs, Urgency::Background);
    let took = s.run_until_done(&hs, Duration::from_secs(3600));
    assert!(hs.iter().all(|h| s.delivered.contains_key(h)), "every block arrived");
    (n as u64 * BLOCK) as f64 / took.as_secs_f64() / link.bytes_per_sec
}

#[test]
fn bulk_transfers_fill_the_link() {
    // The big bandwidth-delay product needs a longer transfer to amortise the window's growth.
    for (mbit, rtt, loss, n) in
        [(2.0, 40, 0.0, 1000), (10.0, 40, 0.0, 2000), (50.0, 40, 0.0, 2000), (10.0, 40, 0.005, 2000), (50.0, 40, 0.005, 2000), (100.0, 200, 0.0, 6000)]
    {
        let link = Link { loss, ..Link::mbit(mbit, rtt) };
        let g = goodput(link, n, 7);
        assert!(g >= 0.9, "{mbit} Mbit/s, {rtt} ms, loss {loss}: goodput {g:.2} of the link");
    }
}

#[test]
fn the_window_follows_the_bandwidth_delay_product() {
    let (mut s, hs) = sim(Link::mbit(100.0, 200), 3000, 3);
    s.want(&hs, Urgency::Background);
    s.run_until(s.now + Duration::from_secs(3));
    // 12.5 MB/s x 0.2 s x 2 = 5 MB.
    let w = s.sched.window();
    assert!((4_000_000..=7_000_000).contains(&w), "window {w}");
    let (mut slow, hs) = sim(Link::mbit(2.0, 40), 300, 3);
    slow.want(&hs, Urgency::Background);
    slow.run_until(slow.now + Duration::from_secs(3));
    // 250 KB/s x (2 x 168 ms, the round trip with a block's own transfer, + 25 ms) = 90 KB:
    // about three blocks, so a demand block never waits behind more than that.
    let w = slow.sched.window();
    assert!((SchedConfig::default().min_window_bytes..=3 * BLOCK).contains(&w), "2 Mbit/s window {w}");
}

fn demand_latency_under(background: Urgency, buffer: Duration) -> (Duration, Duration) {
    let link = Link { buffer, ..Link::mbit(10.0, 40) };
    let (mut s, hs) = sim(link, 600, 11);
    let (bulk, wanted) = hs.split_at(590);
    s.want(bulk, background);
    s.run_until(s.now + Duration::from_secs(2));
    s.want(&wanted[..1], Urgency::Demand);
    let took = s.run_until_done(&wanted[..1], Duration::from_secs(60));
    let block_time = Duration::from_secs_f64(BLOCK as f64 / link.bytes_per_sec);
    (took, link.rtt + block_time * 3)
}

#[test]
fn demand_goes_ahead_of_background_and_readahead() {
    for level in [Urgency::Background, Urgency::Readahead] {
        let (took, bound) = demand_latency_under(level, Duration::ZERO);
        assert!(took <= bound, "a demand block behind {level:?} took {took:?} (bound {bound:?})");
    }
}

#[test]
fn a_bloated_buffer_holds_no_more_than_the_window_ahead_of_demand() {
    // A sender that fills a second of router buffer (as QUIC did over the benchmarks'
    // relay): only the client's window bounds what a demand block waits behind, so the
    // window follows the link's base round trip, not one its own queue inflated.
    for level in [Urgency::Background, Urgency::Readahead] {
        let (took, bound) = demand_latency_under(level, Duration::from_secs(1));
        let bound = bound + Duration::from_millis(30);
        assert!(took <= bound, "a demand block behind {level:?} in a bloated buffer took {took:?} (bound {bound:?})");
    }
    let g = goodput(Link { buffer: Duration::from_secs(1), ..Link::mbit(10.0, 40) }, 2000, 5);
    assert!(g >= 0.9, "bulk still fills the link: {g:.2}");
}

#[test]
fn a_missing_block_fails_alone() {
    let (mut s, hs) = sim(Link::mbit(10.0, 40), 8, 5);
    s.missing.insert(hs[2]);
    s.want(&hs[..6], Urgency::Readahead);
    s.want(&hs[1..2], Urgency::Demand);
    s.run_until_done(&hs[..6], Duration::from_secs(60));
    assert_eq!(s.failed.get(&hs[2]).map(|e| e.kind), Some(FetchErrorKind::NotFound));
    for (i, h) in hs[..6].iter().enumerate() {
        if i != 2 {
            assert!(s.delivered.contains_key(h), "block {i} arrived despite its missing neighbour");
        }
    }
    assert_eq!(s.delivered[&hs[1]].1, Urgency::Demand, "the reader's block counts as demand");
}

#[test]
fn corrupt_blocks_are_asked_again_for_readers_and_dropped_for_readahead() {
    let (mut s, hs) = sim(Link::mbit(10.0, 40), 4, 9);
    s.corrupt.insert(hs[0], 1);
    s.corrupt.insert(hs[1], 100);
    s.corrupt.insert(hs[2], 1);
    s.want(&hs[..2], Urgency::Demand);
    s.want(&hs[2..3], Urgency::Readahead);
    s.run_until_done(&hs[..2], Duration::from_secs(60));
    s.run_until(s.now + Duration::from_secs(5));
    assert!(s.delivered.contains_key(&hs[0]), "corrupt once: served on the retry");
    assert_eq!(s.failed.get(&hs[1]).map(|e| e.kind), Some(FetchErrorKind::Corrupt), "always corrupt: fails");
    assert!(!s.delivered.contains_key(&hs[2]) && !s.failed.contains_key(&hs[2]), "readahead: dropped quietly");
}

#[test]
fn a_silent_server_fails_the_wait_after_the_stall_limit() {
    let hs = hashes(2, 1);
    let cfg = SchedConfig { batch_stall: Duration::from_secs(2), max_attempts: 2, ..SchedConfig::default() };
    let mut s = Sim::new(Link::mbit(10.0, 40), cfg, &[(hs[0], BLOCK)], 1);
    s.silent = true;
    s.want(&hs[..1], Urgency::Demand);
    let took = s.run_until_done(&hs[..1], Duration::from_secs(60));
    assert_eq!(s.failed.get(&hs[0]).map(|e| e.kind), Some(FetchErrorKind::Unavailable));
    assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(5), "two stalls of 2 s: {took:?}");
}

/// A reader that reads `blocks` in order, thinking `think` after each; with `readahead`,
/// it tells a [`Readahead`] about each read as the mount does. Returns (time, blocks the
/// readahead asked for).
fn read_in_order(s: &mut Sim, blocks: &[capsule_fetch::Hash], order: &[usize], think: Duration, readahead: bool) -> Duration {
    let start = s.now;
    let mut ra = Readahead::default();
    for &i in order {
        if readahead {
            if let Some((from, to)) =
                ra.on_read(s.now, i as u64 * BLOCK, BLOCK, !s.delivered.contains_key(&blocks[i]), Budget::for_link(s.sched.estimator(), 8 << 20, BLOCK))
            {
                let range = blocks_ahead(from, to, BLOCK);
                let ahead: Vec<_> = (range.start as usize..(range.end as usize).min(blocks.len())).map(|j| blocks[j]).collect();
                s.want(&ahead, Urgency::Readahead);
            }
        }
        if !s.delivered.contains_key(&blocks[i]) {
            s.want(&blocks[i..=i], Urgency::Demand);
            s.run_until_done(&blocks[i..=i], Duration::from_secs(60));
        }
        let t = s.now + think;
        s.run_until(t);
    }
    s.now.duration_since(start)
}

#[test]
fn a_sequential_reader_earns_readahead_and_goes_faster_without_extra_bytes() {
    let link = Link::mbit(10.0, 40);
    let order: Vec<usize> = (0..200).collect();
    let (mut plain, hs) = sim(link, 200, 21);
    let without = read_in_order(&mut plain, &hs, &order, Duration::from_millis(2), false);
    let (mut ahead, hs) = sim(link, 200, 21);
    let with = read_in_order(&mut ahead, &hs, &order, Duration::from_millis(2), true);
    assert!(with.as_secs_f64() <= 0.5 * without.as_secs_f64(), "readahead: {with:?}, without: {without:?}");
    let link_time = 200.0 * BLOCK as f64 / link.bytes_per_sec;
    assert!(with.as_secs_f64() <= 1.2 * link_time + 0.5, "close to the link's limit: {with:?} vs {link_time:.1} s");
    assert_eq!(ahead.wire_bytes, 200 * BLOCK, "no block travelled twice or needlessly");
}

#[test]
fn a_random_reader_gets_no_readahead() {
    let link = Link::mbit(10.0, 40);
    // Random reads over a large disk (a guest's scattered small reads).
    let mut order: Vec<usize> = (0..20_000).collect();
    let mut x = 99u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let (mut s, hs) = sim(link, 20_000, 23);
    read_in_order(&mut s, &hs, &order[..100], Duration::from_millis(2), true);
    assert_eq!(s.wire_bytes, 100 * BLOCK, "only the blocks read travelled");
    assert!(s.delivered.values().all(|(_, u)| *u == Urgency::Demand));
}

#[test]
fn the_same_events_give_the_same_schedule() {
    let run = || {
        let (mut s, hs) = sim(Link { loss: 0.01, ..Link::mbit(10.0, 40) }, 500, 77);
        s.want(&hs[..400], Urgency::Background);
        s.run_until(s.now + Duration::from_secs(1));
        s.want(&hs[400..], Urgency::Demand);
        let t = s.run_until_done(&hs, Duration::from_secs(600));
        (t, s.batches, s.wire_bytes)
    };
    assert_eq!(run(), run());
}
