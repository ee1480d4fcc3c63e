//! A mount outlives its daemon (a crash, `kill -9`, an out-of-memory kill, an upgrade).
//!
//! `capsule mount --foreground` (what a detached mount and `capsule run` start) is a small
//! supervisor: it starts the daemon (this binary again, `CAPSULE_MOUNT_ROLE` in its
//! environment and a socket to the supervisor as its stdin), and keeps a copy of the
//! `/dev/fuse` descriptor the daemon mounted with. While the supervisor holds it, the kernel
//! keeps the connection, and the requests the dead daemon had read and not answered, when
//! the daemon dies. If the mount is still there, the supervisor starts a successor on the
//! same descriptor: it rebuilds its state from disk (cache, pins, overlay, metadata), asks
//! the kernel to resend the unanswered requests (`FUSE_NOTIFY_RESEND`, Linux 6.9), and
//! serves. Every request of this file system is idempotent (reads, writes at an offset,
//! zeroing a range), so one the dead daemon had half done is simply done again.
//! `capsule takeover MOUNTPOINT` replaces a live daemon the same way, on the binary now at
//! the path the mount was started from (the upgrade path: install, then take over).

use std::ffi::OsString;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsule_images::Hash;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

const ROLE_ENV: &str = "CAPSULE_MOUNT_ROLE";
/// More daemon deaths than this within [`CRASH_WINDOW`]: a daemon that cannot stay up (a
/// request that kills every successor) ends the mount instead of looping.
const MAX_DEATHS: usize = 10;
const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// `FUSE_NOTIFY_RESEND` in `enum fuse_notify_code` (Linux 6.9).
const FUSE_NOTIFY_RESEND: i32 = 7;
const FUSE_INIT: u32 = 26;

/// What this `capsule mount --foreground` process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not started by a supervisor: become one.
    Supervisor,
    /// The first daemon: mounts, and hands the supervisor a copy of the descriptor.
    First,
    /// A successor: serves the descriptor the supervisor hands it.
    Successor,
}

pub fn role() -> Role {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok("first") => Role::First,
        Ok("successor") => Role::Successor,
        _ => Role::Supervisor,
    }
}

/// What a successor gets from its supervisor.
#[derive(Debug)]
pub struct Handoff {
    /// The capsule the mount shows (a name may point elsewhere by now).
    pub id: Hash,
    /// The canonical mount point (resolving it again would ask the dead daemon).
    pub mountpoint: PathBuf,
    pub fuse: OwnedFd,
}

/// The daemon's end of the socket to its supervisor (its stdin).
fn supervisor_socket() -> Result<OwnedFd> {
    std::io::stdin().as_fd().try_clone_to_owned().context("the supervisor's socket (stdin)")
}

/// In a successor: the descriptor and capsule to serve.
pub fn receive_handoff() -> Result<Handoff> {
    let sock = supervisor_socket()?;
    let (text, fd) = recv(&sock)?.context("the supervisor closed its socket before the handoff")?;
    let mut words = text.splitn(3, ' ');
    match (words.next(), words.next(), words.next(), fd) {
        (Some("fuse"), Some(id), Some(path), Some(fuse)) => {
            Ok(Handoff { id: id.parse::<Hash>().with_context(|| format!("handoff names capsule {id:?}"))?, mountpoint: path.into(), fuse })
        }
        _ => bail!("unexpected handoff from the supervisor: {text:?}"),
    }
}

/// In the first daemon, once mounted: the supervisor keeps a copy of the connection.
pub fn report_mounted(fuse: BorrowedFd<'_>, id: &Hash) -> Result<()> {
    send(&supervisor_socket()?, &format!("mounted {}", id.to_hex()), Some(fuse)).context("handing the FUSE descriptor to the supervisor")
}

/// In a successor, once serving.
pub fn report_serving() -> Result<()> {
    send(&supervisor_socket()?, "serving", None).context("telling the supervisor")
}

/// A fuser session on a connection another process initialised. fuser's `from_fd` insists
/// on reading `FUSE_INIT` first, which the kernel sent once, to the first daemon: the
/// session does its handshake on a socket fed a stand-in `FUSE_INIT` (the reply goes
/// nowhere; the kernel keeps what it negotiated with the first daemon), then the socket's
/// descriptor number is pointed at the FUSE connection before the session reads anything.
pub fn resume_session<FS: fuser::Filesystem>(fs: FS, fuse: &OwnedFd, config: &fuser::Config) -> Result<fuser::Session<FS>> {
    let (session_end, feeder) = rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
    rustix::io::write(&feeder, &stand_in_init())?;
    let session = fuser::Session::from_fd(fs, session_end, config.acl, config.clone()).context("handshake with the stand-in FUSE_INIT")?;
    let raw = session.as_fd().as_raw_fd();
    // SAFETY: `raw` is the session's open descriptor, alive as long as `session`;
    // ManuallyDrop leaves closing it to the session.
    #[allow(unsafe_code)]
    let mut target = std::mem::ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(raw) });
    rustix::io::dup3(fuse, &mut target, rustix::io::DupFlags::CLOEXEC).context("moving the session onto the FUSE connection")?;
    Ok(session)
}

/// `fuse_in_header` + `fuse_init_in` of ABI 7.31 (no extended flags).
fn stand_in_init() -> Vec<u8> {
    let mut m = Vec::with_capacity(104);
    m.extend_from_slice(&104u32.to_le_bytes()); // len
    m.extend_from_slice(&FUSE_INIT.to_le_bytes()); // opcode
    m.extend_from_slice(&1u64.to_le_bytes()); // unique
    m.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    m.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    m.extend_from_slice(&7u32.to_le_bytes()); // major
    m.extend_from_slice(&31u32.to_le_bytes()); // minor
    m.extend_from_slice(&(1u32 << 20).to_le_bytes()); // max_readahead
    m.extend_from_slice(&[0u8; 52]); // flags, flags2, unused
    m
}

/// Asks the kernel to queue again the requests read from this connection and not answered
/// (a dead daemon's). Without it (Linux before 6.9) they would wait forever: the error says so.
pub fn resend_unanswered(fuse: &OwnedFd) -> Result<()> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes());
    rustix::io::write(fuse, &h).context("FUSE_NOTIFY_RESEND (Linux 6.9 or later): the requests the dead daemon had read cannot be resent")?;
    Ok(())
}

fn send(sock: &OwnedFd, text: &str, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    rustix::net::sendmsg(sock, &[IoSlice::new(text.as_bytes())], &mut control, SendFlags::NOSIGNAL)?;
    Ok(())
}

/// One message and the descriptor it carries; `None` once the peer closed.
fn recv(sock: &OwnedFd) -> std::io::Result<Option<(String, Option<OwnedFd>)>> {
    let mut buf = [0u8; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(sock, &mut [IoSliceMut::new(&mut buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fd = None;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    if msg.bytes == 0 && fd.is_none() {
        return Ok(None);
    }
    Ok(Some((String::from_utf8_lossy(&buf[..msg.bytes.min(buf.len())]).into_owned(), fd)))
}

enum Event {
    Message(u64, String, Option<OwnedFd>),
    Exited(u64, ExitStatus),
    Signal(i32),
}

fn kill(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Runs the mount's daemons, one after another, for as long as the mount lives.
pub fn supervise(mountpoint: &Path) -> Result<()> {
    let mountpoint = mountpoint.canonicalize().with_context(|| format!("mount point {}", mountpoint.display()))?;
    // Daemons start from this path, read again each time: a binary installed there since
    // (an upgrade) serves from the next takeover on.
    let exe = std::env::current_exe()?;
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (tx, rx) = mpsc::channel::<Event>();
    {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1])?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for signal in signals.forever() {
                if tx.send(Event::Signal(signal)).is_err() {
                    break;
                }
            }
        });
    }
    let mut fuse: Option<(Hash, OwnedFd)> = None;
    let mut deaths: Vec<Instant> = Vec::new();
    let mut stopping = false;
    // When the last daemon ended: the mount's requests wait from then until a successor serves.
    let mut gap_from: Option<Instant> = None;
    for generation in 1u64.. {
        let (ours, theirs) = rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
        let role = if fuse.is_some() { "successor" } else { "first" };
        let child = Command::new(&exe)
            .args(&argv)
            .env(ROLE_ENV, role)
            .stdin(Stdio::from(theirs))
            .spawn()
            .with_context(|| format!("starting the mount daemon {}", exe.display()))?;
        let pid = child.id();
        if let Some((id, fd)) = &fuse {
            // A failure means the successor died already: its exit is the next event.
            let _ = send(&ours, &format!("fuse {} {}", id.to_hex(), mountpoint.display()), Some(fd.as_fd()));
        }
        {
            let exits = tx.clone();
            let mut child = child;
            std::thread::spawn(move || {
                if let Ok(status) = child.wait() {
                    let _ = exits.send(Event::Exited(generation, status));
                }
            });
            let tx = tx.clone();
            std::thread::spawn(move || {
                while let Ok(Some((text, fd))) = recv(&ours) {
                    if tx.send(Event::Message(generation, text, fd)).is_err() {
                        break;
                    }
                }
            });
        }
        let mut takeover = false;
        let status = loop {
            match rx.recv().context("supervisor events")? {
                Event::Message(g, text, fd) if g == generation => match (text.split_once(' '), fd) {
                    (Some(("mounted", id)), Some(fd)) if fuse.is_none() => {
                        fuse = Some((id.parse::<Hash>().with_context(|| format!("daemon reported capsule {id:?}"))?, fd));
                    }
                    _ if text == "serving" => {
                        let gap = gap_from.take().map(|t| t.elapsed().as_millis()).unwrap_or_default();
                        note!("capsule: daemon {pid} took over the mount ({gap} ms without a daemon)");
                    }
                    _ => note!("capsule: unexpected message from daemon {pid}: {text:?}"),
                },
                Event::Exited(g, status) if g == generation => break status,
                Event::Signal(signal_hook::consts::SIGUSR1) if fuse.is_some() && !stopping => {
                    note!("capsule: takeover asked: replacing daemon {pid} with {}", exe.display());
                    takeover = true;
                    kill(pid, rustix::process::Signal::KILL);
                }
                Event::Signal(signal_hook::consts::SIGUSR1) => {}
                Event::Signal(_) => {
                    // The daemon unmounts on SIGTERM, then ends with success.
                    stopping = true;
                    kill(pid, rustix::process::Signal::TERM);
                }
                _ => {} // from an earlier daemon
            }
        };
        gap_from = Some(Instant::now());
        if status.success() {
            return Ok(());
        }
        if fuse.is_none() {
            bail!("the mount daemon failed before mounting ({status})");
        }
        if !crate::mount::is_capsule_mount(&mountpoint) {
            note!("capsule: daemon {pid} ended ({status}) and {} is no longer mounted", mountpoint.display());
            return Ok(());
        }
        if stopping {
            abort_and_unmount(fuse, &mountpoint);
            return Ok(());
        }
        if !takeover {
            let now = Instant::now();
            deaths.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
            deaths.push(now);
            if deaths.len() > MAX_DEATHS {
                abort_and_unmount(fuse, &mountpoint);
                bail!("the mount daemon died {} times within {} s; gave up and detached {}", deaths.len(), CRASH_WINDOW.as_secs(), mountpoint.display());
            }
            note!("capsule: mount daemon {pid} died ({status}); starting a successor");
            // The first death restarts at once; a daemon dying again and again, less often.
            std::thread::sleep(Duration::from_millis(50) * (deaths.len() as u32 - 1));
        }
    }
    unreachable!("generations do not run out")
}

/// With no daemon left: closing the connection's last descriptor aborts it, so what waits
/// on it fails (ENOTCONN) instead of hanging, and so would an unmount that looks at the
/// mount point first (umount(8) does); then the mount goes.
fn abort_and_unmount(fuse: Option<(Hash, OwnedFd)>, mountpoint: &Path) {
    drop(fuse);
    unmount_path(mountpoint);
}

/// Unmounts `mountpoint`, detaching it lazily if busy.
pub fn unmount_path(mountpoint: &Path) {
    let ok = Command::new("fusermount3").arg("-u").arg(mountpoint).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
        || Command::new("umount").arg(mountpoint).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("fusermount3").arg("-uz").arg(mountpoint).status();
        let _ = Command::new("umount").arg("-l").arg(mountpoint).stderr(Stdio::null()).status();
    }
}

/// What `capsule takeover` did (`--json` prints it).
#[derive(Debug, serde::Serialize)]
pub struct Takeover {
    pub mountpoint: PathBuf,
    pub old_pid: u32,
    pub new_pid: u32,
    /// The binary the new daemon runs.
    pub exe: PathBuf,
}

/// `capsule takeover MOUNTPOINT`: the mount's supervisor replaces its daemon with one running
/// the binary now at the path the mount started from; returns once the new daemon serves.
pub fn takeover(mountpoint: &Path) -> Result<Takeover> {
    let read_pid = || -> Result<u32> { Ok(capsule_fs::mount::read_info(mountpoint)?.pid) };
    let old = read_pid()?;
    let stat = std::fs::read_to_string(format!("/proc/{old}/stat")).with_context(|| format!("daemon {old} of {}", mountpoint.display()))?;
    // Fields after the command name (which may hold spaces): state, ppid, ...
    let supervisor: u32 = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse().ok()).context("daemon's parent")?;
    let environ = std::fs::read(format!("/proc/{old}/environ")).unwrap_or_default();
    if !environ.split(|b| *b == 0).any(|v| v.starts_with(ROLE_ENV.as_bytes())) {
        bail!("daemon {old} of {} has no supervisor (an older capsule mounted it): unmount and mount again", mountpoint.display());
    }
    kill(supervisor, rustix::process::Signal::USR1);
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(new) = read_pid() {
            if new != old {
                let exe = std::fs::read_link(format!("/proc/{new}/exe")).unwrap_or_default();
                return Ok(Takeover { mountpoint: mountpoint.to_path_buf(), old_pid: old, new_pid: new, exe });
            }
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("{}: no new daemon within 60 s; see the mount's log", mountpoint.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stand_in_init_is_one_whole_request() {
        let m = stand_in_init();
        assert_eq!(m.len(), 104);
        assert_eq!(u32::from_le_bytes(m[0..4].try_into().unwrap_or_default()), 104);
        assert_eq!(u32::from_le_bytes(m[4..8].try_into().unwrap_or_default()), FUSE_INIT);
    }
}
