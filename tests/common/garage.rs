//! A real 3-node Garage cluster on loopback (replication factor 3, sqlite metadata), set
//! up through Garage's own admin commands and stopped, with its files removed, when dropped.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `garage` binary: `$GARAGE`, else on PATH, else `~/.cargo/bin/garage` (`make setup`
/// installs it there).
pub fn garage_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("GARAGE") {
        return p.into();
    }
    if let Some(found) = std::env::var_os("PATH").and_then(|path| std::env::split_paths(&path).map(|d| d.join("garage")).find(|p| p.is_file())) {
        return found;
    }
    Path::new(&std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo/bin/garage")
}

/// A Garage node process.
pub struct Node {
    child: Option<Child>,
    pub config: PathBuf,
    /// `http://127.0.0.1:PORT` of its S3 API.
    pub s3_endpoint: String,
}

/// Three nodes, one bucket, one key with read and write on it.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    dir: PathBuf,
}

/// A port no other cluster of this process was given, below the kernel's ephemeral range.
/// Asking the kernel for port 0 and releasing it raced: two clusters started by parallel
/// tests once got the same port, and one's S3 client reached the other's K2V API. Ports
/// below 32768 are never handed out for port 0, and the counter is shared by the process.
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let offset = (std::process::id() % 600) * 20;
    loop {
        let port = (20_000 + (offset + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn admin(config: &Path, args: &[&str]) -> String {
    let out = Command::new(garage_binary()).arg("-c").arg(config).args(args).output().expect("run garage");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "garage {args:?} failed:\n{text}");
    text
}

/// Retries an admin command while the cluster settles (nodes connecting, layout spreading).
fn admin_retry(config: &Path, args: &[&str], within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let out = Command::new(garage_binary()).arg("-c").arg(config).args(args).output().expect("run garage");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            return text;
        }
        assert!(Instant::now() < deadline, "garage {args:?} kept failing:\n{text}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

impl Cluster {
    /// Starts the cluster under `dir` and waits until the bucket takes writes.
    pub fn start(dir: &Path) -> Self {
        let secret: String = crate::common::pseudo_random(32, std::process::id() as u64).iter().map(|b| format!("{b:02x}")).collect();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let home = dir.join(format!("garage{i}"));
            std::fs::create_dir_all(&home).unwrap();
            let (rpc, s3, admin_port) = (free_port(), free_port(), free_port());
            let config = home.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{home}/meta\"\ndata_dir = \"{home}/data\"\ndb_engine = \"sqlite\"\nmetadata_fsync = false\ndata_fsync = false\n\
                     replication_factor = 3\nconsistency_mode = \"consistent\"\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                     [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\
                     [admin]\napi_bind_addr = \"127.0.0.1:{admin_port}\"\n",
                    home = home.display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(home.join("log")).unwrap();
            let child = Command::new(garage_binary())
                .arg("-c")
                .arg(&config)
                .arg("server")
                .env("RUST_LOG", "garage=warn")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {} (run `make setup`): {e}", garage_binary().display()));
            nodes.push(Node { child: Some(child), config, s3_endpoint: format!("http://127.0.0.1:{s3}") });
        }
        let mut cluster = Self { nodes, bucket: "capsules".into(), key_id: String::new(), secret: String::new(), dir: dir.to_path_buf() };
        let c0 = cluster.nodes[0].config.clone();
        let ids: Vec<String> =
            cluster.nodes.iter().map(|n| admin_retry(&n.config, &["node", "id", "-q"], Duration::from_secs(30)).trim().to_string()).collect();
        for id in &ids[1..] {
            admin_retry(&c0, &["node", "connect", id], Duration::from_secs(30));
        }
        for id in &ids {
            let short = id.split('@').next().unwrap();
            admin_retry(&c0, &["layout", "assign", "-z", "dc1", "-c", "1G", short], Duration::from_secs(30));
        }
        admin_retry(&c0, &["layout", "apply", "--version", "1"], Duration::from_secs(30));
        admin_retry(&c0, &["bucket", "create", &cluster.bucket], Duration::from_secs(30));
        let key = admin_retry(&c0, &["key", "create", "capsule-test"], Duration::from_secs(30));
        let field = |label: &str| {
            key.lines().find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string())).unwrap_or_else(|| panic!("no {label:?} in:\n{key}"))
        };
        cluster.key_id = field("Key ID:");
        cluster.secret = field("Secret key:");
        admin_retry(&c0, &["bucket", "allow", "--read", "--write", "--owner", &cluster.bucket, "--key", &cluster.key_id], Duration::from_secs(30));
        cluster
    }

    /// `capsule serve --backend s3://BUCKET/PREFIX` against node `node`'s S3 API, with the
    /// key in the environment as the AWS SDKs expect it.
    pub fn serve_args(&self, node: usize, prefix: &str) -> Vec<String> {
        vec![
            "--backend".into(),
            format!("s3://{}/{prefix}", self.bucket),
            "--s3-endpoint".into(),
            self.nodes[node].s3_endpoint.clone(),
            "--s3-region".into(),
            "garage".into(),
        ]
    }

    /// The key as `AWS_*` variables.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![("AWS_ACCESS_KEY_ID", self.key_id.clone()), ("AWS_SECRET_ACCESS_KEY", self.secret.clone())]
    }

    /// Kills node `i` (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of every node's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let text = std::fs::read_to_string(n.config.with_file_name("log")).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            out += &format!("--- garage node {i}\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(self.dir.join("garage0"));
        let _ = std::fs::remove_dir_all(self.dir.join("garage1"));
        let _ = std::fs::remove_dir_all(self.dir.join("garage2"));
    }
}
