//! The command line's definition: every command, its options and its help. `main.rs`
//! dispatches; the modules named after commands do the work.

use std::path::PathBuf;

use capsule_images as images;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::args::{parse_block_size, parse_size, ConnArgs, ExportFormat, MountArgs};
use crate::{args, backend, keys, offline};

/// The environment Capsule reads, shown under every `--help`.
const ENVIRONMENT: &str = "\
Environment:
  CAPSULE_STORE             store directory (--store)
  CAPSULE_CACHE             block cache of mounts and runs (--cache)
  CAPSULE_RUN_DIR           where runs keep their state [default: $XDG_RUNTIME_DIR/capsule/runs]
  CAPSULE_TOKEN             bearer token for a server (--token)
  CAPSULE_CONFIG_DIR        where known_servers (trusted server certificates) is kept
                            [default: ~/.config/capsule]
  CAPSULE_KEY_DIR           keys of encrypted capsules [default: ~/.config/capsule/keys]
  CAPSULE_QEMU              QEMU binary for `capsule run` (--qemu)
  CAPSULE_CLOUD_HYPERVISOR  cloud-hypervisor binary
  CAPSULE_LOG               log filter (tracing syntax: warn, info, debug, capsule_fs=trace)

Exit codes:
  0 success; 1 Capsule failed; 2 bad usage; 3 `verify` found damage;
  64+N `run`: the hypervisor exited with status N; 125 `run`: it was killed by a signal";

#[derive(Parser, Debug)]
#[command(name = "capsule", version, about = "Move whole virtual machines over slow links and run them before they arrive", after_help = ENVIRONMENT)]
pub struct Cli {
    /// Store directory [default: $CAPSULE_STORE, else ~/.local/share/capsule]
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// More log lines on stderr (-v info, -vv debug); CAPSULE_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only errors on stderr: no progress, no notes
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once
pub enum Command {
    /// Import disks (raw or qcow2 chains), memory, device state and boot files as a capsule
    Import(ImportArgs),
    /// Import a Cloud Hypervisor snapshot directory (config.json, state.json, memory-ranges
    /// and the disks its config names) as a capsule; mounted, it is a snapshot directory again
    ImportSnapshot {
        /// Name of the new capsule
        name: String,
        /// The directory `cloud-hypervisor` wrote with `vm.snapshot`
        dir: PathBuf,
        /// Block size, a power of two from 4K to 1M [default: 64K]
        #[arg(long, value_name = "SIZE", value_parser = parse_block_size)]
        block_size: Option<u8>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// List capsules in the store
    Ls {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Show a capsule's manifest, layers and sizes
    Inspect {
        name: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Check every object and block of a capsule (or, without NAME, of every ref and every file)
    Verify {
        name: Option<String>,
        /// Move the copies found damaged into STORE/damaged/, so their blocks count as missing
        /// and the next push or pull of a capsule holding them stores them again
        #[arg(long, conflicts_with = "name")]
        repair: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Write a capsule's files to a directory
    Export {
        name: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The key of an encrypted capsule [default: the key of the id it names]
        #[arg(long, value_name = "NAME")]
        key: Option<String>,
        #[arg(long, value_enum, default_value_t = ExportFormat::Raw)]
        format: ExportFormat,
        /// Print the files written as JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove blocks and objects that no ref reaches (in the store, or in a bucket with --backend)
    Gc {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        backend: backend::BackendArgs,
        /// With --backend: unreachable blocks and objects younger than this stay (pushes in
        /// progress write their blocks before their ref)
        #[arg(long, value_name = "SECONDS", default_value_t = capsule_store_s3::gc::DEFAULT_GRACE.as_secs_f64())]
        grace: f64,
        /// With --backend: wait between publishing what will go and reading the refs again;
        /// longer than the servers' fence window plus one write to the bucket
        #[arg(long, value_name = "SECONDS", default_value_t = capsule_store_s3::gc::DEFAULT_SETTLE.as_secs_f64())]
        settle: f64,
    },
    /// Remove refs (their blocks go at the next gc, unless a remaining capsule still reads
    /// through them: --flatten makes those stand alone)
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        /// Flatten the oldest remaining capsule of each chain that reads through a removed one
        /// (see `capsule flatten`), so `gc` frees what only the removed ones read
        #[arg(long)]
        flatten: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Make a capsule stand alone: one layer per image holding its whole map, no parent (same
    /// bytes, blocks unchanged), and every capsule built on it moved onto the new one; then
    /// `gc` frees what only its ancestors read. Ids change: commit writable mounts first
    Flatten {
        name: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Mount a capsule: its disks, memory and boot files appear as files, fetched on first read
    Mount(MountArgs),
    /// Unmount a capsule mount
    Umount {
        mountpoint: PathBuf,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Restart a mount's daemon on the binary now installed where it started, its guests running on
    Takeover {
        mountpoint: PathBuf,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Fetch every block a capsule's files read (through its ancestors' layers) into the cache; --pin pins them (`warm --all`, and pinning)
    Prefetch {
        #[command(flatten)]
        target: offline::CacheTarget,
        /// Pin every block so the capsule runs with no network (until `capsule unpin`)
        #[arg(long, alias = "offline")]
        pin: bool,
    },
    /// Fetch a capsule's blocks ahead of need, below demand reads in priority
    Warm {
        #[command(flatten)]
        target: offline::CacheTarget,
        /// The working-set profile's blocks first, in the order they were first touched
        #[arg(long, value_name = "NAME")]
        profile: Option<String>,
        /// Then every other block
        #[arg(long)]
        all: bool,
    },
    /// Release a capsule pinned by `prefetch --pin`
    Unpin {
        #[command(flatten)]
        target: offline::CacheTarget,
    },
    /// Resident and pinned % per file of a capsule in the cache, or of a mount
    Status {
        /// capsule://HOST:PORT/NAME, a capsule id, or a mount point
        source: String,
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
        /// Of a mount: one JSON line per interval (time, bytes fetched on demand and ahead of
        /// need, rate, resident %, stalls) until it is unmounted
        #[arg(long)]
        watch: bool,
        /// Seconds between --watch lines
        #[arg(long, value_name = "SECS", default_value_t = 1.0, requires = "watch")]
        interval: f64,
    },
    /// Turn a writable mount's changes into a child capsule in the local store
    Commit {
        mountpoint: PathBuf,
        /// Name of the new capsule
        name: String,
        /// The key of an encrypted capsule [default: the key of the id it names]
        #[arg(long, value_name = "NAME")]
        key: Option<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Run a capsule in an unmodified hypervisor straight from a mount (cold boot, or resume
    /// a suspended capsule); ends when the guest powers off
    Run(args::RunArgs),
    /// Save a running capsule as a child capsule: device state plus only the changed disk
    /// and RAM blocks, after shrinking the guest to what it uses
    Suspend(args::SuspendArgs),
    /// List the runs on this machine (id, capsule, QEMU pid, mount)
    Ps {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Stop a run: the guest is asked to power off (ACPI), then QEMU quits, then it is killed
    Stop {
        /// The run: its id, its directory, or its QMP socket
        run: String,
        /// Seconds to wait for the run to end
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) of capsule or of one of its commands
    Man {
        /// A command (`capsule man run`); default: capsule itself
        command: Option<String>,
    },
    /// Keys for encrypted capsules (`import --key`)
    Key {
        #[command(subcommand)]
        command: keys::KeyCommand,
    },
    /// Serve this store's capsules over QUIC
    Serve {
        /// UDP address to listen on
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
        /// Allow reads without a token
        #[arg(long)]
        public_read: bool,
        /// Most concurrent connections; more are refused
        #[arg(long, default_value_t = capsule_net::server::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Most concurrent connections from one IP address; more are refused
        #[arg(long, value_name = "N", default_value_t = capsule_net::server::DEFAULT_MAX_PER_IP)]
        max_connections_per_ip: usize,
        /// Seconds a client has to send a whole request header (on a stream, and on a new
        /// connection: its first request)
        #[arg(long, value_name = "SECS", default_value_t = capsule_net::server::DEFAULT_HEADER_TIMEOUT.as_secs_f64())]
        header_timeout: f64,
        #[command(flatten)]
        backend: backend::BackendArgs,
        /// Print one JSON line once listening (address, certificate fingerprint, limits)
        #[arg(long)]
        json: bool,
    },
    /// Manage access tokens of this store's server
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Send a capsule to a server; only blocks it lacks travel
    Push {
        /// Local capsule
        name: String,
        /// capsule://HOST:PORT[/REMOTENAME] (default remote name: the local one)
        remote: String,
        #[command(flatten)]
        conn: ConnArgs,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Fetch a capsule (and its ancestors) from a server; only blocks this store lacks travel
    Pull {
        /// capsule://HOST:PORT/NAME
        remote: String,
        /// Local name [default: the remote name]
        #[arg(long = "as", value_name = "LOCALNAME")]
        local: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token; only its hash is kept, so copy it now
    Create {
        #[arg(long, value_enum)]
        scope: ScopeArg,
        /// Capsule names the token covers: PREFIX itself and PREFIX/... (whole segments:
        /// `team` does not cover `teamX`); empty for all
        #[arg(long, default_value = "")]
        prefix: String,
        /// Print the token, its id, scope and prefix as JSON
        #[arg(long)]
        json: bool,
    },
    /// List issued tokens: id, scope, prefix, creation time (never the tokens)
    List {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by the id `create` and `list` show; the server refuses it at once
    Revoke {
        id: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeArg {
    Read,
    Write,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormatArg {
    Raw,
    Qcow2,
}

/// Commands that never open a store: `--store` is hidden from their help, completions
/// and man pages (still accepted, as scripts pass it to every command).
const STORELESS: &[&str] = &["takeover", "umount", "prefetch", "warm", "unpin", "status", "ps", "stop", "completions", "man", "key"];

/// The command line's definition, `--store` hidden where it would do nothing.
pub fn cli_command() -> clap::Command {
    let mut cmd = Cli::command();
    for name in STORELESS {
        // A subcommand's own arg of a global's id stops the global's copy reaching it.
        let hidden = clap::Arg::new("store").long("store").value_name("DIR").value_parser(clap::value_parser!(PathBuf)).global(true).hide(true);
        cmd = cmd.mut_subcommand(name, |s| s.arg(hidden));
    }
    cmd.build();
    cmd
}

/// `capsule import`.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// Name of the new capsule (a ref in the store)
    pub name: String,
    /// A disk: [DISKNAME=]PATH (raw, or qcow2 with its backing chain); repeatable
    #[arg(long = "disk", value_name = "[NAME=]PATH", required = true)]
    pub disks: Vec<String>,
    /// What the disk files are; never guessed (a file that looks like qcow2 needs this)
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub disk_format: Option<DiskFormatArg>,
    /// A backing file a qcow2 disk may name (each file of its chain); repeatable.
    /// A backing file not named here is refused, never opened
    #[arg(long = "backing-file", value_name = "PATH")]
    pub backing_files: Vec<PathBuf>,
    /// Guest RAM image
    #[arg(long, value_name = "PATH")]
    pub memory: Option<PathBuf>,
    /// Hypervisor device state (e.g. a QEMU migration stream)
    #[arg(long, value_name = "PATH")]
    pub devstate: Option<PathBuf>,
    /// Kernel for direct boot
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Derive from this capsule: same-named disks store only blocks that differ
    #[arg(long, value_name = "NAME")]
    pub parent: Option<String>,
    /// Block size, a power of two from 4K to 1M [default: parent's, else 64K]
    #[arg(long, value_name = "SIZE", value_parser = parse_block_size)]
    pub block_size: Option<u8>,
    /// zstd level of the new blocks, 1 to 19: higher imports slower and moves fewer
    /// bytes to every client (19: about 13% fewer than 3 on a Linux disk)
    #[arg(long, value_name = "N", default_value_t = images::block::DEFAULT_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=images::block::MAX_LEVEL as i64))]
    pub compress_level: i32,
    /// Virtual CPUs for the VM description
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest RAM for the VM description (e.g. 256M)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub ram: Option<u64>,
    /// Preferred hypervisor (qemu, cloud-hypervisor)
    #[arg(long)]
    pub hypervisor: Option<String>,
    /// Extra hint KEY=VALUE for the VM description; repeatable
    #[arg(long = "hint", value_name = "KEY=VALUE")]
    pub hints: Vec<String>,
    /// Encrypt the capsule with this key (`capsule key create NAME`): the server stores
    /// only ciphertext; equal blocks still dedup (see `key create --convergence-secret`)
    #[arg(long, value_name = "NAME")]
    pub key: Option<String>,
    /// Print the import report as JSON
    #[arg(long)]
    pub json: bool,
}
