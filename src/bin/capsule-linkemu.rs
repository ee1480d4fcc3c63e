//! `capsule-linkemu`: a UDP or TCP relay that makes a link slow, lossy or cut, for tests and
//! benchmarks (this kernel has no netem). Rate limits come from `tc tbf` in a network
//! namespace; this adds what tbf cannot: delay, loss, and cuts on command.
//!
//! ```text
//! capsule-linkemu --listen 127.0.0.1:7071 --to 127.0.0.1:7070 [--delay-ms 20] [--loss 0.5]
//!                 [--cut-file PATH]
//! capsule-linkemu --tcp --listen 127.0.0.1:7071 --to 127.0.0.1:7070 [--delay-ms 20]
//!                 [--cut-file PATH]
//! ```
//! UDP: each datagram is delayed by `--delay-ms` in each direction (the RTT grows by twice
//! that), dropped with probability `--loss` percent, and dropped while `--cut-file` exists.
//!
//! TCP (`--tcp`, for peers such as qemu-nbd and rsync): each accepted connection is relayed
//! to a new connection to `--to`; the bytes read in each direction are released to the other
//! side `--delay-ms` later, in order, so every request/response round trip grows by twice
//! the delay. While `--cut-file` exists nothing is released (the connection stalls, as TCP
//! does over a dead link, and resumes after). Loss is refused: TCP's own retransmission
//! below the relay would hide it. Caveat: the relay delays data, not the kernel's ACKs, so
//! TCP's congestion control sees the link's own RTT, not the added delay.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where a delayed datagram goes.
enum Dest {
    /// To the server, through this client's upstream socket.
    Up(Arc<UdpSocket>),
    /// Back to a client, through the listening socket.
    Down(SocketAddr),
}

/// Datagrams waiting out the delay. One delay for all, so arrival order is due order.
struct DelayLine {
    queue: Mutex<VecDeque<(Instant, Vec<u8>, Dest)>>,
    ready: Condvar,
    delay: Duration,
}

impl DelayLine {
    fn start(delay: Duration, front: Arc<UdpSocket>) -> Arc<Self> {
        let line = Arc::new(Self { queue: Mutex::new(VecDeque::new()), ready: Condvar::new(), delay });
        let l = line.clone();
        std::thread::spawn(move || loop {
            let (due, data, dest) = {
                let mut q = l.queue.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(item) = q.pop_front() {
                        break item;
                    }
                    q = l.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let _ = match dest {
                Dest::Up(sock) => sock.send(&data),
                Dest::Down(client) => front.send_to(&data, client),
            };
        });
        line
    }

    fn push(&self, data: Vec<u8>, dest: Dest) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push_back((Instant::now() + self.delay, data, dest));
        self.ready.notify_one();
    }
}

/// Loss decisions: xorshift, seeded, so runs are repeatable.
struct Rng(u64);

impl Rng {
    fn drop(&mut self, percent: f64) -> bool {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        percent > 0.0 && ((self.0 % 1_000_000) as f64) < percent * 10_000.0
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn fail(msg: String) -> ! {
    eprintln!("capsule-linkemu: {msg}");
    std::process::exit(2)
}

/// Bytes of one TCP direction waiting out the delay; `None` is the reader's end of stream.
struct Pipe {
    state: Mutex<PipeState>,
    changed: Condvar,
}

struct PipeState {
    chunks: VecDeque<(Instant, Option<Vec<u8>>)>,
    bytes: usize,
    closed: bool,
}

/// Queued bytes per direction before the reader stops reading: enough for a fast
/// bandwidth-delay product, small enough that TCP flow control, not memory, absorbs a cut.
const PIPE_CAP: usize = 8 << 20;

impl Pipe {
    fn new() -> Arc<Self> {
        Arc::new(Self { state: Mutex::new(PipeState { chunks: VecDeque::new(), bytes: 0, closed: false }), changed: Condvar::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a chunk due `delay` from now; false once the writer has given up.
    fn push(&self, chunk: Option<Vec<u8>>, delay: Duration) -> bool {
        let mut st = self.lock();
        while st.bytes >= PIPE_CAP && !st.closed {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.closed {
            return false;
        }
        st.bytes += chunk.as_ref().map_or(0, Vec::len);
        st.chunks.push_back((Instant::now() + delay, chunk));
        self.changed.notify_all();
        true
    }

    fn pop(&self) -> (Instant, Option<Vec<u8>>) {
        let mut st = self.lock();
        loop {
            if let Some(item) = st.chunks.pop_front() {
                st.bytes -= item.1.as_ref().map_or(0, Vec::len);
                self.changed.notify_all();
                return item;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// One direction of a relayed connection: read `from` into a pipe, and release each chunk
/// into `to` when it is due and the link is not cut.
fn tcp_direction(from: TcpStream, to: TcpStream, delay: Duration, cut: Arc<AtomicBool>) {
    let pipe = Pipe::new();
    let reader_pipe = pipe.clone();
    let reader_from = from.try_clone();
    std::thread::spawn(move || {
        let Ok(mut from) = reader_from else { return reader_pipe.close() };
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    reader_pipe.push(None, delay);
                    return;
                }
                Ok(n) => {
                    if !reader_pipe.push(Some(buf[..n].to_vec()), delay) {
                        return;
                    }
                }
            }
        }
    });
    let mut to = to;
    loop {
        let (due, chunk) = pipe.pop();
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        while cut.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        match chunk {
            Some(data) if to.write_all(&data).is_ok() => {}
            Some(_) => {
                // The receiver is gone: end both directions, as a router would with a reset.
                pipe.close();
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            None => {
                // Half-close in order: the peer sees end of stream after the last byte.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

/// Accept forever on `listener`, relaying each connection to a new one to `to`.
fn tcp_relay(listener: TcpListener, to: SocketAddr, delay: Duration, cut: Arc<AtomicBool>) {
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let upstream = match TcpStream::connect(to) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("capsule-linkemu: connect {to}: {e}");
                continue; // dropping `client` closes it: the peer sees a refused service
            }
        };
        // Small requests must not wait for Nagle on top of the emulated delay.
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else { continue };
        let cut2 = cut.clone();
        std::thread::spawn(move || tcp_direction(client, upstream, delay, cut2));
        let cut2 = cut.clone();
        std::thread::spawn(move || tcp_direction(u2, c2, delay, cut2));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(to)) = (arg(&args, "--listen"), arg(&args, "--to")) else {
        fail("usage: capsule-linkemu [--tcp] --listen ADDR --to ADDR [--delay-ms N] [--loss PERCENT] [--cut-file PATH]".into())
    };
    let tcp = args.iter().any(|a| a == "--tcp");
    let listen: SocketAddr = listen.parse().unwrap_or_else(|e| fail(format!("bad --listen {listen:?}: {e}")));
    let to: SocketAddr = to.parse().unwrap_or_else(|e| fail(format!("bad --to {to:?}: {e}")));
    let delay = Duration::from_millis(arg(&args, "--delay-ms").map(|v| v.parse().unwrap_or_else(|_| fail("bad --delay-ms".into()))).unwrap_or(0));
    let loss: f64 = arg(&args, "--loss").map(|v| v.parse().unwrap_or_else(|_| fail("bad --loss".into()))).unwrap_or(0.0);
    let cut = Arc::new(AtomicBool::new(false));
    if let Some(path) = arg(&args, "--cut-file").map(PathBuf::from) {
        let cut = cut.clone();
        std::thread::spawn(move || loop {
            let now = path.exists();
            if cut.swap(now, Ordering::Relaxed) != now {
                eprintln!("capsule-linkemu: link {}", if now { "cut" } else { "restored" });
            }
            std::thread::sleep(Duration::from_millis(50));
        });
    }
    if tcp {
        if loss != 0.0 {
            fail("--loss cannot be used with --tcp: the relay sees a reliable byte stream (TCP retransmits below it); emulate loss with the UDP mode".into());
        }
        let listener = TcpListener::bind(listen).unwrap_or_else(|e| fail(format!("cannot listen on {listen}: {e}")));
        eprintln!("capsule-linkemu: tcp {listen} -> {to}, delay {delay:?} each way");
        tcp_relay(listener, to, delay, cut);
        return;
    }
    let front = Arc::new(UdpSocket::bind(listen).unwrap_or_else(|e| fail(format!("cannot listen on {listen}: {e}"))));
    eprintln!("capsule-linkemu: {listen} -> {to}, delay {delay:?} each way, loss {loss}%");
    let line = DelayLine::start(delay, front.clone());

    // One upstream socket per client, so the server's replies find their way back.
    let mut uplinks: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf) else { continue };
        if cut.load(Ordering::Relaxed) || rng.drop(loss) {
            continue;
        }
        let up = uplinks.entry(client).or_insert_with(|| {
            let sock = Arc::new(UdpSocket::bind(SocketAddr::new(to.ip(), 0)).unwrap_or_else(|e| fail(format!("upstream socket: {e}"))));
            sock.connect(to).unwrap_or_else(|e| fail(format!("connect {to}: {e}")));
            let (reader, line, cut) = (sock.clone(), line.clone(), cut.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(client.port()));
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = reader.recv(&mut buf) {
                    if !cut.load(Ordering::Relaxed) && !rng.drop(loss) {
                        line.push(buf[..n].to_vec(), Dest::Down(client));
                    }
                }
            });
            sock
        });
        line.push(buf[..n].to_vec(), Dest::Up(up.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay on an ephemeral loopback port in front of `to`.
    fn relay(to: SocketAddr, delay: Duration, cut: Arc<AtomicBool>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || tcp_relay(listener, to, delay, cut));
        addr
    }

    /// An upstream that echoes every connection back until end of stream.
    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                std::thread::spawn(move || {
                    let mut back = conn.try_clone().unwrap();
                    let _ = std::io::copy(&mut conn, &mut back);
                    let _ = back.shutdown(Shutdown::Write);
                });
            }
        });
        addr
    }

    fn round_trip(conn: &mut TcpStream) -> Duration {
        let t = Instant::now();
        conn.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        conn.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        t.elapsed()
    }

    #[test]
    fn tcp_round_trip_grows_by_twice_the_delay() {
        let delay = Duration::from_millis(40);
        let addr = relay(echo_server(), delay, Arc::new(AtomicBool::new(false)));
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.set_nodelay(true).unwrap();
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let rtt = round_trip(&mut conn);
            assert!(rtt >= 2 * delay, "round trip {rtt:?} < 2 x {delay:?}");
            best = best.min(rtt);
        }
        // The best of five: a loaded CI machine once held one round trip 640 ms.
        assert!(best < 2 * delay + Duration::from_millis(200), "round trips all far above 2 x {delay:?}: best {best:?}");
    }

    #[test]
    fn tcp_relays_10_mib_intact_both_ways_and_half_closes() {
        let addr = relay(echo_server(), Duration::from_millis(5), Arc::new(AtomicBool::new(false)));
        let conn = TcpStream::connect(addr).unwrap();
        // Pseudo-random payload, so a reordered or dropped chunk cannot go unnoticed.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..10 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut writer = conn.try_clone().unwrap();
        let sent = data.clone();
        let w = std::thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        (&conn).read_to_end(&mut got).unwrap(); // ends only if the half-close came through
        w.join().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "relayed bytes differ");
    }

    #[test]
    fn tcp_cut_stalls_then_resumes() {
        let cut = Arc::new(AtomicBool::new(false));
        let addr = relay(echo_server(), Duration::from_millis(5), cut.clone());
        let mut conn = TcpStream::connect(addr).unwrap();
        round_trip(&mut conn);
        cut.store(true, Ordering::Relaxed);
        let restore = {
            let cut = cut.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                cut.store(false, Ordering::Relaxed);
            })
        };
        let rtt = round_trip(&mut conn);
        restore.join().unwrap();
        assert!(rtt >= Duration::from_millis(250), "a cut link answered in {rtt:?}");
    }
}
