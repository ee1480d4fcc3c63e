//! `capsule-linkemu`: a UDP relay that makes a link slow, lossy or cut, for tests and
//! benchmarks (this kernel has no netem). Rate limits come from `tc tbf` in a network
//! namespace; this adds what tbf cannot: delay, loss, and cuts on command.
//!
//! ```text
//! capsule-linkemu --listen 127.0.0.1:7071 --to 127.0.0.1:7070 [--delay-ms 20] [--loss 0.5]
//!                 [--cut-file PATH]
//! ```
//! Each datagram is delayed by `--delay-ms` in each direction (the RTT grows by twice
//! that), dropped with probability `--loss` percent, and dropped while `--cut-file` exists.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(to)) = (arg(&args, "--listen"), arg(&args, "--to")) else {
        fail("usage: capsule-linkemu --listen ADDR --to ADDR [--delay-ms N] [--loss PERCENT] [--cut-file PATH]".into())
    };
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
