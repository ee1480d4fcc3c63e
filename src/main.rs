//! `capsule`: the command-line front end. Library crates do the work; this file parses
//! arguments, shows progress and prints results.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use capsule_images::{self as images, CapsuleSpec};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use serde_json::json;

/// `eprint!`/`eprintln!` that never panic: a mount daemon's stderr is its log file, on a
/// disk that may be full (a panic there would end the mount).
macro_rules! note {
    ($($arg:tt)*) => {{ use std::io::Write as _; let _ = writeln!(std::io::stderr(), $($arg)*); }};
}
macro_rules! note_raw {
    ($($arg:tt)*) => {{ use std::io::Write as _; let _ = write!(std::io::stderr(), $($arg)*); }};
}

mod args;
mod backend;
mod chv;
mod exit;
mod keys;
mod mount;
mod offline;
mod progress;
mod remote;
mod report;
mod retain;
mod run;
mod serve;
mod status;
mod supervise;

use args::{parse_block_size, parse_size, ConnArgs, ExportFormat, MountArgs};
use remote::{connect, open_store, push, runtime};
use report::{export, human, inspect_json, print_import, print_inspect, print_transfer, report_verify};
use run::LAUNCH_ARG;

/// The environment Capsule reads, shown under every `--help`.
const ENVIRONMENT: &str = "\
Environment:
  CAPSULE_STORE             store directory (--store)
  CAPSULE_CACHE             block cache of mounts and runs (--cache)
  CAPSULE_RUN_DIR           where runs keep their state [default: $XDG_RUNTIME_DIR/capsule/runs]
  CAPSULE_TOKEN             bearer token for a server (--token)
  CAPSULE_QEMU              QEMU binary for `capsule run` (--qemu)
  CAPSULE_CLOUD_HYPERVISOR  cloud-hypervisor binary
  CAPSULE_LOG               log filter (tracing syntax: warn, info, debug, capsule_fs=trace)

Exit codes:
  0 success; 1 Capsule failed; 2 bad usage; 3 `verify` found damage;
  64+N `run`: the hypervisor exited with status N; 125 `run`: it was killed by a signal";

#[derive(Parser, Debug)]
#[command(name = "capsule", version, about = "Move whole virtual machines over slow links and run them before they arrive", after_help = ENVIRONMENT)]
struct Cli {
    /// Store directory [default: $CAPSULE_STORE, else ~/.local/share/capsule]
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    /// More log lines on stderr (-v info, -vv debug); CAPSULE_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Only errors on stderr: no progress, no notes
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Command {
    /// Import disks (raw or qcow2 chains), memory, device state and boot files as a capsule
    Import {
        /// Name of the new capsule (a ref in the store)
        name: String,
        /// A disk: [DISKNAME=]PATH (raw, or qcow2 with its backing chain); repeatable
        #[arg(long = "disk", value_name = "[NAME=]PATH", required = true)]
        disks: Vec<String>,
        /// What the disk files are; never guessed (a file that looks like qcow2 needs this)
        #[arg(long, value_enum, value_name = "FORMAT")]
        disk_format: Option<DiskFormatArg>,
        /// A backing file a qcow2 disk may name (each file of its chain); repeatable.
        /// A backing file not named here is refused, never opened
        #[arg(long = "backing-file", value_name = "PATH")]
        backing_files: Vec<PathBuf>,
        /// Guest RAM image
        #[arg(long, value_name = "PATH")]
        memory: Option<PathBuf>,
        /// Hypervisor device state (e.g. a QEMU migration stream)
        #[arg(long, value_name = "PATH")]
        devstate: Option<PathBuf>,
        /// Kernel for direct boot
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
        /// Initial ramdisk
        #[arg(long, value_name = "PATH")]
        initrd: Option<PathBuf>,
        /// Kernel command line
        #[arg(long, value_name = "STR")]
        cmdline: Option<String>,
        /// Derive from this capsule: same-named disks store only blocks that differ
        #[arg(long, value_name = "NAME")]
        parent: Option<String>,
        /// Block size, a power of two from 4K to 1M [default: parent's, else 64K]
        #[arg(long, value_name = "SIZE", value_parser = parse_block_size)]
        block_size: Option<u8>,
        /// zstd level of the new blocks, 1 to 19: higher imports slower and moves fewer
        /// bytes to every client (19: about 13% fewer than 3 on a Linux disk)
        #[arg(long, value_name = "N", default_value_t = images::block::DEFAULT_LEVEL,
              value_parser = clap::value_parser!(i32).range(1..=images::block::MAX_LEVEL as i64))]
        compress_level: i32,
        /// Virtual CPUs for the VM description
        #[arg(long)]
        cpus: Option<u32>,
        /// Guest RAM for the VM description (e.g. 256M)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        ram: Option<u64>,
        /// Preferred hypervisor (qemu, cloud-hypervisor)
        #[arg(long)]
        hypervisor: Option<String>,
        /// Extra hint KEY=VALUE for the VM description; repeatable
        #[arg(long = "hint", value_name = "KEY=VALUE")]
        hints: Vec<String>,
        /// Encrypt the capsule with this key (`capsule key create NAME`): the server stores
        /// only ciphertext; equal blocks still dedup (see `key create --convergence-secret`)
        #[arg(long, value_name = "NAME")]
        key: Option<String>,
        /// Print the import report as JSON
        #[arg(long)]
        json: bool,
    },
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
        #[arg(long)]
        json: bool,
    },
    /// List capsules in the store
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a capsule's manifest, layers and sizes
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Check every object and block of a capsule (or, without NAME, of every ref and every file)
    Verify {
        name: Option<String>,
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
        #[arg(long)]
        json: bool,
    },
    /// Make a capsule stand alone: one layer per image holding its whole map, no parent (same
    /// bytes, blocks unchanged), and every capsule built on it moved onto the new one; then
    /// `gc` frees what only its ancestors read. Ids change: commit writable mounts first
    Flatten {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Mount a capsule: its disks, memory and boot files appear as files, fetched on first read
    Mount(MountArgs),
    /// Unmount a capsule mount
    Umount {
        mountpoint: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Restart a mount's daemon on the binary now installed where it started, its guests running on
    Takeover {
        mountpoint: PathBuf,
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
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
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
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by the id `create` and `list` show; the server refuses it at once
    Revoke {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ScopeArg {
    Read,
    Write,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DiskFormatArg {
    Raw,
    Qcow2,
}

/// Commands that never open a store: `--store` is hidden from their help, completions
/// and man pages (still accepted, as scripts pass it to every command).
const STORELESS: &[&str] = &["takeover", "umount", "prefetch", "warm", "unpin", "status", "ps", "stop", "completions", "man"];

/// The command line's definition, `--store` hidden where it would do nothing.
fn cli_command() -> clap::Command {
    let mut cmd = Cli::command();
    for name in STORELESS {
        // A subcommand's own arg of a global's id stops the global's copy reaching it.
        let hidden = clap::Arg::new("store").long("store").value_name("DIR").value_parser(clap::value_parser!(PathBuf)).global(true).hide(true);
        cmd = cmd.mut_subcommand(name, |s| s.arg(hidden));
    }
    cmd.build();
    cmd
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == LAUNCH_ARG) {
        return run::launch_qemu(&argv[2..]);
    }
    let cli = Cli::from_arg_matches(&cli_command().get_matches()).unwrap_or_else(|e| e.exit());
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "info",
        _ => "debug",
    };
    if cli.quiet {
        progress::set_quiet();
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CAPSULE_LOG").unwrap_or_else(|_| level.into()))
        .with_writer(std::io::stderr)
        // A mount daemon logs to a file on the cache's disk: when that is full, a log line
        // is lost, not the thread that logged it (the report of a failed write would panic).
        .log_internal_errors(false)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capsule: error: {e:#}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let open = || open_store(cli.store.clone());
    // Commands that only read a store must not make one where a typo points.
    let open_existing = || remote::open_existing_store(cli.store.clone());
    match cli.command {
        Command::Mount(args) => mount::mount(cli.store.clone(), args)?,
        Command::Takeover { mountpoint, json } => {
            let t = supervise::takeover(&mountpoint)?;
            print_json_or(json, &t, || format!("{}: daemon {} replaced by {} ({})", t.mountpoint.display(), t.old_pid, t.new_pid, t.exe.display()))?;
        }
        Command::Umount { mountpoint, json } => {
            mount::umount(&mountpoint)?;
            print_json_or(json, &json!({"unmounted": mountpoint}), || format!("unmounted {}", mountpoint.display()))?;
        }
        Command::Prefetch { target, pin } => offline::prefetch(&target, pin, None, true)?,
        Command::Warm { target, profile, all } => {
            if profile.is_none() && !all {
                bail!("capsule warm: say what to fetch: --profile NAME, --all, or both");
            }
            offline::prefetch(&target, false, profile.as_deref(), all)?
        }
        Command::Unpin { target } => offline::unpin(&target)?,
        Command::Status { source, watch: true, interval, .. } => {
            let every = std::time::Duration::try_from_secs_f64(interval).ok().filter(|d| !d.is_zero()).context("--interval: a positive number of seconds")?;
            status::watch(std::path::Path::new(&source), every)?
        }
        Command::Status { source, cache, json, .. } => offline::status(&source, cache, json)?,
        Command::Run(args) => return run::run(cli.store.clone(), args, cli.quiet),
        Command::Suspend(args) => run::suspend(cli.store.clone(), args)?,
        Command::Ps { json } => run::ps(json)?,
        Command::Stop { run, timeout, json } => {
            let id = run::stop(&run, std::time::Duration::from_secs(timeout))?;
            print_json_or(json, &json!({"stopped": id}), || format!("stopped {id}"))?;
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut cli_command(), "capsule", &mut std::io::stdout());
        }
        Command::Man { command } => {
            let cmd = cli_command();
            let man = match &command {
                Some(name) => {
                    let sub = cmd.find_subcommand(name).cloned().with_context(|| format!("no command {name:?}; `capsule --help` lists them"))?;
                    clap_mangen::Man::new(sub).title(format!("capsule-{name}"))
                }
                None => clap_mangen::Man::new(cmd),
            };
            man.render(&mut std::io::stdout()).context("writing the man page")?;
        }
        Command::Key { command } => keys::run(command)?,
        Command::Commit { mountpoint, name, key, json } => {
            let report = mount::commit(&open()?, &mountpoint, &name, key.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "committed {} as {name} ({}): {} changed blocks, {} stored",
                    mountpoint.display(),
                    report.id,
                    report.changed_blocks,
                    human(report.stored_bytes)
                );
            }
        }
        Command::Import {
            name,
            disks,
            disk_format,
            backing_files,
            memory,
            devstate,
            kernel,
            initrd,
            cmdline,
            parent,
            block_size,
            compress_level,
            cpus,
            ram,
            hypervisor,
            hints,
            key,
            json,
        } => {
            let store = open()?;
            let key = key.as_deref().map(keys::load).transpose()?;
            store.set_compression_level(compress_level);
            let mut spec = CapsuleSpec {
                name: name.clone(),
                disk_format: disk_format.map(|f| match f {
                    DiskFormatArg::Raw => images::DiskFormat::Raw,
                    DiskFormatArg::Qcow2 => images::DiskFormat::Qcow2,
                }),
                backing_files,
                memory,
                devstate,
                kernel,
                initrd,
                cmdline,
                parent,
                block_size_log2: block_size,
                cpus,
                memory_mib: ram.map(|b| b >> 20),
                hypervisor,
                key,
                ..Default::default()
            };
            for d in &disks {
                spec.disks.push(parse_disk_arg(d)?);
            }
            for h in &hints {
                let (k, v) = h.split_once('=').with_context(|| format!("--hint {h:?}: expected KEY=VALUE"))?;
                spec.hints.push((k.to_string(), v.to_string()));
            }
            let progress = progress::Bar::new();
            let report = images::import_capsule(&store, &spec, &progress).with_context(|| format!("importing capsule {name}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_import(&name, &report);
            }
        }
        Command::ImportSnapshot { name, dir, block_size, json } => {
            let store = open()?;
            let report = chv::import_snapshot(&store, &name, &dir, block_size)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_import(&name, &report);
            }
        }
        Command::Ls { json } => {
            // No store yet lists nothing (and makes none).
            let Ok(store) = open_existing() else {
                if json {
                    println!("[]");
                } else {
                    println!("{:<24} {:<14} {:<14} {:>10}  DISKS", "NAME", "ID", "PARENT", "SIZE");
                }
                return Ok(ExitCode::SUCCESS);
            };
            let refs = store.list_refs()?;
            if json {
                let list: Vec<_> = refs
                    .iter()
                    .map(|(n, id)| {
                        let m = store.manifest(id).ok();
                        json!({"name": n, "id": id.to_hex(), "parent": m.as_ref().and_then(|m| m.parent).map(|p| p.to_hex()),
                               "created_unix": m.as_ref().map(|m| m.created_unix),
                               "size": m.as_ref().map(|m| m.disks.iter().map(|d| d.image.size).sum::<u64>()),
                               "disks": m.as_ref().map(|m| m.disks.iter().map(|d| d.name.clone()).collect::<Vec<_>>()),
                               "damaged": m.is_none()})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<24} {:<14} {:<14} {:>10}  DISKS", "NAME", "ID", "PARENT", "SIZE");
                for (n, id) in refs {
                    match store.manifest(&id) {
                        Ok(m) => {
                            let size: u64 = m.disks.iter().map(|d| d.image.size).sum();
                            let disks: Vec<_> = m.disks.iter().map(|d| d.name.as_str()).collect();
                            let parent = m.parent.map(|p| p.short()).unwrap_or_else(|| "-".into());
                            println!("{n:<24} {:<14} {parent:<14} {:>10}  {}", id.short(), human(size), disks.join(","));
                        }
                        Err(e) => println!("{n:<24} {:<14} DAMAGED: {e}", id.short()),
                    }
                }
            }
        }
        Command::Inspect { name, json } => {
            let store = open_existing()?;
            let id = store.resolve(&name)?;
            let m = store.manifest(&id).with_context(|| format!("capsule {name}"))?;
            let view = inspect_json(&store, &id, &m)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print_inspect(&view);
            }
        }
        Command::Verify { name, json } => {
            let store = open_existing()?;
            let targets = match &name {
                Some(n) => vec![(n.clone(), store.resolve(n)?)],
                None => store.list_refs()?,
            };
            let mut failed = false;
            let mut out = Vec::new();
            for (n, id) in &targets {
                let r = images::verify_capsule(&store, n, id);
                failed |= !r.ok();
                if !json {
                    report_verify(&format!("capsule {n} ({})", id.short()), &r);
                }
                out.push(json!({"name": n, "id": id.to_hex(), "report": r}));
            }
            if name.is_none() {
                let r = images::verify_store_files(&store)?;
                failed |= !r.ok();
                if !json {
                    report_verify(&format!("store {}", store.root().display()), &r);
                }
                out.push(json!({"store": store.root(), "report": r}));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            if failed {
                return Ok(ExitCode::from(exit::DAMAGED));
            }
        }
        Command::Export { name, out, key, format, json } => {
            let store = open_existing()?;
            let id = store.resolve(&name)?;
            let m = store.manifest(&id).with_context(|| format!("capsule {name}"))?;
            let key = keys::for_capsule(key.as_deref(), &m, &id)?;
            let files = export(&store, &id, &m, key.as_ref(), &out, format).with_context(|| format!("exporting capsule {name} to {}", out.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&json!({"name": name, "id": id.to_hex(), "files": files}))?);
            } else {
                for path in files {
                    println!("{}", path.display());
                }
            }
        }
        Command::Gc { json, backend, grace, settle } => {
            let s = match &backend.backend {
                Some(_) => {
                    let secs = |v: f64, what: &str| std::time::Duration::try_from_secs_f64(v).with_context(|| format!("--{what}: not a duration in seconds"));
                    let options = capsule_store_s3::gc::GcOptions { grace: secs(grace, "grace")?, settle: secs(settle, "settle")? };
                    if options.settle <= capsule_store_s3::gc::FENCE_WINDOW {
                        bail!(
                            "--settle {settle} s: must be longer than the servers' fence window ({} s) plus one write",
                            capsule_store_s3::gc::FENCE_WINDOW.as_secs()
                        );
                    }
                    backend.open_s3()?.gc(&options)?
                }
                None => open()?.gc()?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "gc: kept {} blocks, removed {} blocks and {} objects, freed {}",
                s.blocks_kept,
                s.blocks_removed,
                s.objects_removed,
                human(s.bytes_freed)
            );
        }
        Command::Serve { listen, public_read, max_connections, max_connections_per_ip, header_timeout, backend, json } => {
            let store = open()?;
            let header_timeout = std::time::Duration::try_from_secs_f64(header_timeout).context("--header-timeout: not a duration in seconds")?;
            let limits = serve::Limits { max_connections: max_connections.max(1), max_connections_per_ip: max_connections_per_ip.max(1), header_timeout };
            serve::serve(store, &backend, listen, public_read, limits, json)?
        }
        Command::Token { command: TokenCommand::Create { scope, prefix, json } } => {
            let store = open()?;
            let scope = match scope {
                ScopeArg::Read => capsule_net::auth::Scope::Read,
                ScopeArg::Write => capsule_net::auth::Scope::Write,
            };
            let (token, record) = capsule_net::auth::create_token(store.root(), scope, &prefix)?;
            if json {
                println!("{}", serde_json::json!({"token": token, "id": record.id(), "scope": record.scope, "prefix": record.prefix}));
            } else {
                // stdout is the token alone (scripts capture it); the id goes to a person.
                println!("{token}");
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    eprintln!(
                        "capsule: token id {} ({:?}, prefix {:?}); revoke with: capsule token revoke {}",
                        record.id(),
                        record.scope,
                        record.prefix,
                        record.id()
                    );
                }
            }
        }
        Command::Token { command: TokenCommand::List { json } } => {
            let store = open()?;
            let tokens = capsule_net::auth::list_tokens(store.root())?;
            if json {
                let list: Vec<_> =
                    tokens.iter().map(|r| serde_json::json!({"id": r.id(), "scope": r.scope, "prefix": r.prefix, "created_unix": r.created_unix})).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for r in &tokens {
                    let scope = serde_json::to_value(r.scope)?;
                    println!(
                        "{}  {:5}  {:20}  created {}",
                        r.id(),
                        scope.as_str().unwrap_or("?"),
                        if r.prefix.is_empty() { "(all)" } else { &r.prefix },
                        r.created_unix
                    );
                }
            }
        }
        Command::Token { command: TokenCommand::Revoke { id, json } } => {
            let store = open()?;
            let r = capsule_net::auth::revoke_token(store.root(), &id)?;
            print_json_or(json, &json!({"revoked": r.id(), "prefix": r.prefix}), || format!("revoked token {} (prefix {:?})", r.id(), r.prefix))?;
        }
        Command::Push { name, remote, conn, json } => {
            let store = open()?;
            let report = push(&store, &name, &remote, &conn)?;
            print_transfer(json, "pushed", &name, &report, None)?;
        }
        Command::Pull { remote, local, conn, json } => {
            let store = open()?;
            let url = capsule_net::RemoteUrl::parse(&remote)?;
            let remote_name = url.name.clone().with_context(|| format!("{remote}: name the capsule: capsule://HOST:PORT/NAME"))?;
            let local = local.unwrap_or_else(|| remote_name.clone());
            let (id, report) = runtime()?.block_on(async {
                let client = connect(&url, &conn).await?;
                let r = capsule_net::pull(&client, &remote_name, &store, &local, &progress::Bar::new()).await;
                client.close().await;
                r.with_context(|| format!("pulling {remote}"))
            })?;
            print_transfer(json, "pulled", &local, &report, Some(id))?;
        }
        Command::Rm { names, flatten, json } => retain::rm(&open()?, &names, flatten, json)?,
        Command::Flatten { name, json } => retain::flatten(&open()?, &name, json)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `value` as pretty JSON, or the line `text` makes.
pub(crate) fn print_json_or(json: bool, value: &impl serde::Serialize, text: impl FnOnce() -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{}", text());
    }
    Ok(())
}

fn parse_disk_arg(arg: &str) -> Result<(String, PathBuf)> {
    if let Some((name, path)) = arg.split_once('=') {
        if !name.contains('/') {
            return Ok((name.to_string(), PathBuf::from(path)));
        }
    }
    let path = PathBuf::from(arg);
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    let name = name.trim_start_matches('.').to_string();
    if name.is_empty() {
        bail!("--disk {arg:?}: cannot derive a disk name; use NAME=PATH");
    }
    Ok((name, path))
}
