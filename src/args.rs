//! The arguments several commands share (connection, sizes, mount and run options).

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

#[derive(clap::Args, Debug, Clone)]
pub struct MountArgs {
    /// capsule://HOST:PORT/NAME, or a capsule NAME in the local store
    pub source: String,
    /// Where the capsule's files appear
    pub mountpoint: PathBuf,
    /// Block cache shared by all mounts [default: $CAPSULE_CACHE, else ~/.cache/capsule]
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Bound of the block cache (LRU eviction beyond it)
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "10G")]
    pub cache_size: u64,
    /// Refuse writes
    #[arg(long)]
    pub read_only: bool,
    /// A local file whose blocks count as present (an older image, an ISO); repeatable
    #[arg(long = "seed", value_name = "PATH")]
    pub seeds: Vec<PathBuf>,
    /// Stay in the foreground (default: detach once mounted; logs go to CACHE/logs/)
    #[arg(long)]
    pub foreground: bool,
    /// Seconds a read of a missing block waits for a lost server before failing with EIO
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub stall_timeout: u64,
    /// Never touch the network: serve what the cache holds, fail other reads at once
    #[arg(long)]
    pub offline: bool,
    /// Record the blocks this mount's readers touch, in order, as working-set profile NAME
    /// (saved at unmount; pushed and pulled with the capsule)
    #[arg(long, value_name = "NAME")]
    pub record_profile: Option<String>,
    /// Fetch in the background, below demand reads: the profile's blocks, or all blocks
    #[arg(long, value_enum, default_value_t = PrefetchMode::None)]
    pub prefetch: PrefetchMode,
    /// The profile `--prefetch profile|auto` uses [default: `resume` for a suspended
    /// capsule, else `boot`]
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// Kernel readahead in bytes [default: 128 KiB, the kernel's own; 0 with
    /// --record-profile, so that a profile lists what readers read, not what the kernel read
    /// ahead for them]; more (1048576) speeds up sequential copies; `capsule run` sets 0 so
    /// guest-RAM faults read one page
    #[arg(long, value_name = "BYTES")]
    pub kernel_readahead: Option<u32>,
    /// A guest-RAM fault also fetches the rest of its aligned group of N pages (fewer round
    /// trips, more bytes); 0: sized from the measured round trip and bandwidth
    #[arg(long, value_name = "N", default_value_t = 0, hide = true)]
    pub memory_cluster: u32,
    /// Prepare for a VM run (`capsule run` sets it): drop RAM an earlier run left; for a
    /// suspended capsule, refuse to mount over an earlier resume's changes
    #[arg(long, hide = true)]
    pub prepare_run: bool,
    /// With --prepare-run: drop an earlier resume's uncommitted changes instead of refusing
    #[arg(long, hide = true)]
    pub discard_changes: bool,
    /// Print where it is mounted, the daemon's pid and log as JSON
    #[arg(long)]
    pub json: bool,
    /// The key of an encrypted capsule [default: the key of the id it names, from the key
    /// directory]
    #[arg(long, value_name = "NAME")]
    pub key: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefetchMode {
    /// Fetch on demand only
    None,
    /// The working-set profile's blocks, in order
    Profile,
    /// The profile's blocks, then every other block
    All,
    /// The guest RAM image's blocks, lowest address first (for a resume over a link whose
    /// round trips, not its bandwidth, are the limit)
    Memory,
    /// `profile` if the capsule has that profile (learnt from an earlier run and pushed with
    /// it), else nothing: `capsule run`'s default
    Auto,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// Bearer token [default: $CAPSULE_TOKEN]
    #[arg(long, env = "CAPSULE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Pin the server's certificate SHA-256 instead of trusting on first use
    #[arg(long, value_name = "HEX")]
    pub server_fingerprint: Option<String>,
    /// Seconds to wait for a server to answer before giving up
    #[arg(long, value_name = "SECS", default_value_t = capsule_net::client::DEFAULT_CONNECT_TIMEOUT.as_secs_f64())]
    pub connect_timeout: f64,
}

impl ConnArgs {
    pub fn options(&self) -> capsule_net::ConnectOptions {
        capsule_net::ConnectOptions {
            token: self.token.clone(),
            fingerprint: self.server_fingerprint.clone(),
            known_servers: None,
            connect_timeout: Duration::try_from_secs_f64(self.connect_timeout).ok().filter(|d| !d.is_zero()),
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelArg {
    /// KVM if it really runs a guest here, else TCG
    Auto,
    Kvm,
    Tcg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypervisorArg {
    Qemu,
    CloudHypervisor,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// capsule://HOST:PORT/NAME, a capsule NAME in the local store, or a capsule mount point
    pub source: String,
    /// Hypervisor [default: the capsule's preference, else qemu]
    #[arg(long, value_enum)]
    pub hypervisor: Option<HypervisorArg>,
    /// Accelerator; auto uses KVM only when a guest really runs under it
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Virtual CPUs [default: the capsule's]
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest RAM [default: the capsule's]; another size than the capsule's keeps RAM off
    /// the mount, so the run cannot be suspended
    #[arg(long = "ram", alias = "memory", value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// The guest's serial console on this terminal (QEMU's monitor on Ctrl-A c, quit with Ctrl-A x)
    #[arg(long, conflicts_with = "serial_log")]
    pub console: bool,
    /// Write the guest's serial console to FILE (it is also echoed unless -q/--quiet)
    #[arg(long, value_name = "FILE")]
    pub serial_log: Option<PathBuf>,
    /// Added to the capsule's kernel command line (cold boot only)
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
    /// Mount read-only: disks attached read-only, RAM not on the mount (no suspend)
    #[arg(long)]
    pub read_only: bool,
    /// Block cache [default: $CAPSULE_CACHE, else ~/.cache/capsule]
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Bound of the block cache
    #[arg(long, value_name = "SIZE", default_value = "10G")]
    pub cache_size: String,
    /// When the guest powers off, commit its disk changes as capsule NAME in the local store
    #[arg(long, value_name = "NAME")]
    pub commit: Option<String>,
    /// ... and push that capsule to capsule://HOST:PORT[/NAME]
    #[arg(long, value_name = "URL", requires = "commit")]
    pub push: Option<String>,
    /// Resuming a suspended capsule: drop an earlier resume's uncommitted changes in the cache
    #[arg(long)]
    pub discard_changes: bool,
    /// Keep QEMU's MADV_HUGEPAGE and the kernel's readahead on guest RAM (a baseline for
    /// benchmarks: each fault then reads 2-4 MiB of the mount)
    #[arg(long)]
    pub no_fault_fix: bool,
    /// Never touch the network: run from what the cache holds (`capsule prefetch --pin`)
    #[arg(long)]
    pub offline: bool,
    /// Record the blocks this run touches as working-set profile NAME (saved when it ends)
    #[arg(long, value_name = "NAME")]
    pub record_profile: Option<String>,
    /// Fetch in the background, below the guest's reads: the profile's blocks, or all
    /// [default: auto: the capsule's profile if it has one]
    #[arg(long, value_enum)]
    pub prefetch: Option<PrefetchMode>,
    /// The profile `--prefetch profile|auto` uses [default: `resume` for a suspended
    /// capsule, else `boot`]
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// A local file whose blocks count as present; repeatable
    #[arg(long = "seed", value_name = "PATH")]
    pub seeds: Vec<PathBuf>,
    /// Seconds a read of a missing block waits for a lost server before the guest sees EIO
    #[arg(long, value_name = "SECS")]
    pub stall_timeout: Option<u64>,
    /// A RAM fault also fetches the rest of its aligned group of N pages: fewer round trips
    /// on a high-latency link, more bytes. 0 (the default): sized from the measured round
    /// trip and bandwidth (1 on a LAN, up to 16 on a slow long link)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub memory_cluster: u32,
    /// Print the hypervisor command line and stop
    #[arg(long)]
    pub dry_run: bool,
    /// Print a JSON report when the run ends (id, timings, the guest's exit apart from
    /// Capsule's own failure, bytes fetched, the child committed); the console echo goes
    /// to stderr. With --dry-run: the command line as JSON (binary, arguments, shell line)
    #[arg(long, conflicts_with = "console")]
    pub json: bool,
    /// Name of this run [default: the capsule's name and a number]
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// QEMU binary
    #[arg(long, env = "CAPSULE_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// The key of an encrypted capsule [default: the key of the id it names]
    #[arg(long, value_name = "NAME")]
    pub key: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Passed to the hypervisor as they are
    #[arg(last = true, value_name = "EXTRA")]
    pub extra: Vec<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SuspendArgs {
    /// The run: its id, its directory, or its QMP socket
    pub run: String,
    /// Name of the child capsule in the local store
    pub name: String,
    /// Then push it to capsule://HOST:PORT[/NAME]
    #[arg(long, value_name = "URL")]
    pub push: Option<String>,
    /// Save without shrinking the guest first (a baseline: the child then carries free RAM)
    #[arg(long)]
    pub no_balloon: bool,
    /// The key of an encrypted capsule (its child is encrypted too) [default: the key of
    /// the id it names]
    #[arg(long, value_name = "NAME")]
    pub key: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?} (try 64K, 1M, 2G)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("unknown size unit in {s:?} (use K, M, G, T)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("size {s:?} overflows"))
}

pub fn parse_block_size(s: &str) -> Result<u8, String> {
    let n = parse_size(s)?;
    if !n.is_power_of_two() || !(4096..=1 << 20).contains(&n) {
        return Err(format!("block size {s} must be a power of two from 4K to 1M"));
    }
    Ok(n.trailing_zeros() as u8)
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Raw,
    Qcow2,
}
