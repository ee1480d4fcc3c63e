//! A QMP client: JSON lines over QEMU's Unix socket, synchronous, one command at a time.
//!
//! ```text
//!  <- {"QMP": {"version": ..., "capabilities": [...]}}      greeting
//!  -> {"execute": "qmp_capabilities"}                      leave negotiation mode
//!  <- {"return": {}}
//!  -> {"execute": CMD, "arguments": {...}}
//!  <- {"event": ...}   (any number, kept in `events`)
//!  <- {"return": ...} | {"error": {"class": ..., "desc": ...}}
//! ```
//! QEMU serves one QMP client per socket at a time: hold a connection only while using it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, ErrorKind, Result};

/// Longest reply line accepted (query-machines / query-qmp-schema are the big ones).
const MAX_LINE: usize = 8 << 20;

/// The balloon's QOM id, spelled once: the command line names the device with it and QMP
/// reaches it by [`BALLOON_PATH`].
macro_rules! balloon_id {
    () => {
        "balloon0"
    };
}
/// `id=` of the virtio-balloon device on every QEMU command line.
pub const BALLOON_ID: &str = balloon_id!();
/// Where QMP finds that device.
pub const BALLOON_PATH: &str = concat!("/machine/peripheral/", balloon_id!());

/// The QMP commands Capsule sends, with their arguments typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// Pause the vCPUs.
    Stop,
    /// Resume the vCPUs.
    Cont,
    /// Exit QEMU at once (disks flushed).
    Quit,
    /// ACPI power button: the guest shuts itself down.
    SystemPowerdown,
    /// Ask the guest to shrink (or grow back) to this many bytes of RAM.
    Balloon { bytes: u64 },
    /// The balloon's current size.
    QueryBalloon,
    /// Read a QOM property.
    QomGet { path: &'a str, property: &'a str },
    /// Set the balloon's statistics polling interval (seconds; 0 stops it).
    BalloonStatsInterval { seconds: u32 },
    /// Which migration capabilities this QEMU has.
    QueryMigrateCapabilities,
    /// Turn these migration capabilities on.
    MigrateSetCapabilities(&'a [&'a str]),
    /// Save the machine into a file (through `exec:cat`).
    MigrateToFile(&'a Path),
    /// Load the machine from a file (QEMU started with `-incoming defer`).
    MigrateIncomingFromFile(&'a Path),
    /// Migration status.
    QueryMigrate,
    /// The machine types and their aliases.
    QueryMachines,
}

impl Command<'_> {
    /// The QMP command name.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Stop => "stop",
            Command::Cont => "cont",
            Command::Quit => "quit",
            Command::SystemPowerdown => "system_powerdown",
            Command::Balloon { .. } => "balloon",
            Command::QueryBalloon => "query-balloon",
            Command::QomGet { .. } => "qom-get",
            Command::BalloonStatsInterval { .. } => "qom-set",
            Command::QueryMigrateCapabilities => "query-migrate-capabilities",
            Command::MigrateSetCapabilities(_) => "migrate-set-capabilities",
            Command::MigrateToFile(_) => "migrate",
            Command::MigrateIncomingFromFile(_) => "migrate-incoming",
            Command::QueryMigrate => "query-migrate",
            Command::QueryMachines => "query-machines",
        }
    }

    /// Its `arguments` object, if it has one.
    pub fn arguments(&self) -> Option<Value> {
        let quoted = |p: &Path| crate::qemu::shell_quote(&p.display().to_string());
        match *self {
            Command::Balloon { bytes } => Some(json!({ "value": bytes })),
            Command::QomGet { path, property } => Some(json!({ "path": path, "property": property })),
            Command::BalloonStatsInterval { seconds } => Some(json!({"path": BALLOON_PATH, "property": "guest-stats-polling-interval", "value": seconds})),
            Command::MigrateSetCapabilities(names) => {
                Some(json!({ "capabilities": names.iter().map(|n| json!({"capability": n, "state": true})).collect::<Vec<_>>() }))
            }
            Command::MigrateToFile(p) => Some(json!({ "uri": format!("exec:cat > {}", quoted(p)) })),
            Command::MigrateIncomingFromFile(p) => Some(json!({ "uri": format!("exec:cat {}", quoted(p)) })),
            _ => None,
        }
    }
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// QEMU's version from the greeting: (major, minor, micro).
    pub version: (u64, u64, u64),
    /// Events received while waiting for replies, oldest first.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to `socket`, retrying until `wait` passes (QEMU creates it as it starts).
    pub fn connect(socket: &Path, wait: Duration) -> Result<Self> {
        Self::connect_while(socket, wait, || true)
    }

    /// Like `connect`, giving up as soon as `alive()` says the hypervisor is gone.
    pub fn connect_while(socket: &Path, wait: Duration, mut alive: impl FnMut() -> bool) -> Result<Self> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if !alive() => return Err(Error::io(format!("QMP socket {} (the hypervisor exited)", socket.display()), e)),
                Err(e) if start.elapsed() < wait => {
                    tracing::debug!("QMP {}: {e}; retrying", socket.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(Error::io(format!("QMP socket {}", socket.display()), e)),
            }
        };
        Self::over_stream(stream, &socket.display().to_string())
    }

    /// A session over a connected stream (`label` names it in errors): greeting, then
    /// `qmp_capabilities`.
    pub fn over_stream(stream: UnixStream, label: &str) -> Result<Self> {
        // A hypervisor that stops answering must not hang the caller forever.
        stream.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| Error::io("QMP socket", e))?;
        let writer = stream.try_clone().map_err(|e| Error::io("QMP socket", e))?;
        let mut qmp = Self { reader: BufReader::new(stream), writer, version: (0, 0, 0), events: Vec::new() };
        let greeting = qmp.read_message()?;
        let v = &greeting["QMP"]["version"]["qemu"];
        if greeting.get("QMP").is_none() {
            return Err(Error::new(ErrorKind::Invalid, format!("{label}: not a QMP greeting: {greeting}")));
        }
        qmp.version = (v["major"].as_u64().unwrap_or(0), v["minor"].as_u64().unwrap_or(0), v["micro"].as_u64().unwrap_or(0));
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = (&mut self.reader).take(MAX_LINE as u64).read_line(&mut line).map_err(|e| Error::io("reading QMP", e))?;
            if n == 0 {
                return Err(Error::new(ErrorKind::Io, "QMP connection closed by QEMU"));
            }
            if !line.ends_with('\n') && n >= MAX_LINE {
                return Err(Error::new(ErrorKind::Invalid, format!("QMP message longer than {MAX_LINE} bytes")));
            }
            if !line.trim().is_empty() {
                return serde_json::from_str(&line).map_err(|e| Error::new(ErrorKind::Invalid, format!("malformed QMP message ({e}): {}", line.trim())));
            }
        }
    }

    /// Runs `command` with `arguments`; a QMP error names the command that failed. Callers
    /// outside this crate use the typed [`Command`]s.
    pub(crate) fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| Error::new(ErrorKind::Invalid, e.to_string()))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).map_err(|e| Error::io(format!("sending QMP {command}"), e))?;
        loop {
            let reply = self.read_message().map_err(|e| e.context(format!("QMP {command}")))?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(err) = reply.get("error") {
                return Err(Error::new(
                    ErrorKind::Qmp,
                    format!("QMP {command} failed: {}: {}", err["class"].as_str().unwrap_or("?"), err["desc"].as_str().unwrap_or("?")),
                ));
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            return Err(Error::new(ErrorKind::Invalid, format!("QMP {command}: unexpected reply {reply}")));
        }
    }

    /// Runs one typed command; its reply as QEMU sent it.
    pub fn run(&mut self, command: Command<'_>) -> Result<Value> {
        self.execute(command.name(), command.arguments())
    }

    /// Names of the migration capabilities this QEMU knows.
    pub fn migration_capabilities(&mut self) -> Result<Vec<String>> {
        let caps = self.run(Command::QueryMigrateCapabilities)?;
        Ok(caps.as_array().map(|a| a.iter().filter_map(|c| c["capability"].as_str().map(String::from)).collect()).unwrap_or_default())
    }

    /// Turns migration capabilities on.
    pub fn set_capabilities(&mut self, names: &[&str]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        self.run(Command::MigrateSetCapabilities(names))?;
        Ok(())
    }

    /// The guest's current RAM as the balloon sees it, in bytes.
    pub fn balloon_actual(&mut self) -> Result<u64> {
        let reply = self.run(Command::QueryBalloon)?;
        reply["actual"].as_u64().ok_or_else(|| Error::new(ErrorKind::Invalid, format!("QMP query-balloon: no \"actual\" in {reply}")))
    }

    /// The memory the guest could give up by its own account (its available memory, from
    /// the balloon's statistics), if its driver reports it.
    pub fn guest_available(&mut self) -> Option<u64> {
        let stats = self.run(Command::QomGet { path: BALLOON_PATH, property: "guest-stats" }).ok()?;
        stats["stats"]["stat-available-memory"].as_i64().filter(|&v| v > 0).map(|v| v as u64)
    }

    /// Polls `query-migrate` until it completes; fails on `failed`/`cancelled` or after `limit`.
    pub fn wait_migration(&mut self, limit: Duration) -> Result<Value> {
        let start = Instant::now();
        loop {
            let info = self.run(Command::QueryMigrate)?;
            match info["status"].as_str().unwrap_or("") {
                "completed" => return Ok(info),
                s @ ("failed" | "cancelled") => {
                    let why = info["error-desc"].as_str().unwrap_or("no reason given");
                    return Err(Error::new(ErrorKind::Qmp, format!("migration {s}: {why}")));
                }
                _ => {}
            }
            if start.elapsed() > limit {
                return Err(Error::new(ErrorKind::Timeout, format!("migration not done after {} s: {info}", limit.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The versioned machine type the `pc` (or other) alias stands for, e.g. `pc-i440fx-7.2`:
    /// a resume must use the same one.
    pub fn resolve_machine(&mut self, alias: &str) -> Result<String> {
        let machines = self.run(Command::QueryMachines)?;
        for m in machines.as_array().into_iter().flatten() {
            if m["alias"].as_str() == Some(alias) || m["name"].as_str() == Some(alias) {
                if let Some(name) = m["name"].as_str() {
                    return Ok(name.to_string());
                }
            }
        }
        Err(Error::new(ErrorKind::Unsupported, format!("this QEMU has no machine type {alias:?}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted QMP peer: answers each command from `replies` in order.
    fn fake_qemu(path: &Path, replies: Vec<&'static str>) -> std::thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            writeln!(w, r#"{{"QMP": {{"version": {{"qemu": {{"micro": 22, "minor": 2, "major": 7}}}}, "capabilities": []}}}}"#).unwrap();
            let mut got = Vec::new();
            for reply in std::iter::once(r#"{"return": {}}"#).chain(replies) {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                got.push(line.trim().to_string());
                writeln!(w, "{reply}").unwrap();
            }
            got
        })
    }

    #[test]
    fn negotiates_skips_events_and_names_failed_commands() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let peer = fake_qemu(
            &sock,
            vec!["{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"paused\"}}", r#"{"error": {"class": "GenericError", "desc": "no such balloon"}}"#],
        );
        let mut qmp = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.version, (7, 2, 22));
        assert_eq!(qmp.execute("query-status", None).unwrap()["status"], "paused");
        assert_eq!(qmp.events.len(), 1);
        let err = qmp.execute("balloon", Some(json!({"value": 1}))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Qmp);
        assert!(err.to_string().contains("QMP balloon failed") && err.to_string().contains("no such balloon"), "{err}");
        drop(qmp);
        let sent = peer.join().unwrap();
        assert_eq!(sent[0], r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(sent[2], r#"{"arguments":{"value":1},"execute":"balloon"}"#);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"this is not json\n").unwrap();
        });
        let err = Qmp::connect(&sock, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        t.join().unwrap();
    }
}

/// A scripted QMP peer for tests: greets, then answers each command in turn with the
/// scripted reply if its name is the one expected (else with an error), and hands back
/// everything it received.
#[cfg(test)]
pub(crate) mod test_peer {
    #![allow(clippy::unwrap_used)]
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::path::Path;

    use serde_json::Value;

    /// One step: the command expected and the reply line(s) to send.
    pub(crate) fn expect(command: &'static str, reply: &'static str) -> (&'static str, &'static str) {
        (command, reply)
    }

    pub(crate) struct Peer(std::thread::JoinHandle<Vec<Value>>);

    impl Peer {
        pub(crate) fn spawn(path: &Path, script: Vec<(&'static str, &'static str)>) -> Self {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path).unwrap();
            Peer(std::thread::spawn(move || {
                let (stream, _) = listener.accept().unwrap();
                let mut w = stream.try_clone().unwrap();
                let mut r = BufReader::new(stream);
                writeln!(w, r#"{{"QMP": {{"version": {{"qemu": {{"micro": 22, "minor": 2, "major": 7}}}}, "capabilities": []}}}}"#).unwrap();
                let mut got = Vec::new();
                for (want, reply) in std::iter::once(("qmp_capabilities", r#"{"return": {}}"#)).chain(script) {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let msg: Value = serde_json::from_str(&line).unwrap();
                    let ok = msg["execute"] == want;
                    got.push(msg);
                    if ok {
                        writeln!(w, "{reply}").unwrap();
                    } else {
                        writeln!(w, r#"{{"error": {{"class": "GenericError", "desc": "script expected {want}"}}}}"#).unwrap();
                    }
                }
                got
            }))
        }

        /// What the client sent, in order (index 0 is `qmp_capabilities`).
        pub(crate) fn join(self) -> Vec<Value> {
            self.0.join().unwrap()
        }
    }
}
