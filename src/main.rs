//! `capsule`: the command-line front end. Library crates do the work; this file parses
//! arguments, shows progress and prints results.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use capsule_images::{self as images, CapsuleSpec, Store};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

mod chv;
mod mount;
mod offline;
mod progress;
mod report;
mod run;

use report::{export, inspect_json, print_import, print_inspect, report_verify};
pub(crate) use report::{human, print_transfer};

/// First argument of the hidden re-exec that starts QEMU under the no-hugepage filter.
pub(crate) const LAUNCH_ARG: &str = "__launch-qemu";

#[derive(Parser, Debug)]
#[command(name = "capsule", version, about = "Move whole virtual machines over slow links and run them before they arrive")]
struct Cli {
    /// Store directory [default: $CAPSULE_STORE, else ~/.local/share/capsule]
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
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
        #[arg(long, value_enum, default_value_t = ExportFormat::Raw)]
        format: ExportFormat,
    },
    /// Remove blocks and objects that no ref reaches
    Gc,
    /// Remove a ref (its blocks go at the next gc)
    Rm { name: String },
    /// Mount a capsule: its disks, memory and boot files appear as files, fetched on first read
    Mount(MountArgs),
    /// Unmount a capsule mount
    Umount { mountpoint: PathBuf },
    /// Fetch every block of a capsule (and its ancestors) into the cache; --offline pins them
    Prefetch {
        #[command(flatten)]
        target: offline::CacheTarget,
        /// Pin every block so the capsule runs with no network (until `capsule unpin`)
        #[arg(long)]
        offline: bool,
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
    /// Release a capsule pinned by `prefetch --offline`
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
    },
    /// Turn a writable mount's changes into a child capsule in the local store
    Commit {
        mountpoint: PathBuf,
        /// Name of the new capsule
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Run a capsule in an unmodified hypervisor straight from a mount (cold boot, or resume
    /// a suspended capsule); ends when the guest powers off
    Run(run::RunArgs),
    /// Save a running capsule as a child capsule: device state plus only the changed disk
    /// and RAM blocks, after shrinking the guest to what it uses
    Suspend(run::SuspendArgs),
    /// List the runs on this machine (id, capsule, QEMU pid, mount)
    Ps {
        #[arg(long)]
        json: bool,
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
        /// Seconds a client has to send a whole request header on a stream
        #[arg(long, value_name = "SECS", default_value_t = capsule_net::server::DEFAULT_HEADER_TIMEOUT.as_secs_f64())]
        header_timeout: f64,
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
    /// The profile `--prefetch profile` uses
    #[arg(long, value_name = "NAME", default_value = "boot")]
    pub profile: String,
    /// Kernel readahead in bytes; `capsule run` sets 0 so guest-RAM faults read one page
    #[arg(long, value_name = "BYTES", default_value_t = capsule_fs::mount::DEFAULT_KERNEL_READAHEAD)]
    pub kernel_readahead: u32,
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
    #[command(flatten)]
    pub conn: ConnArgs,
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
    Revoke { id: String },
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
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ScopeArg {
    Read,
    Write,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// Bearer token [default: $CAPSULE_TOKEN]
    #[arg(long, env = "CAPSULE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Pin the server's certificate SHA-256 instead of trusting on first use
    #[arg(long, value_name = "HEX")]
    pub server_fingerprint: Option<String>,
}

impl ConnArgs {
    pub fn options(&self) -> capsule_net::ConnectOptions {
        capsule_net::ConnectOptions { token: self.token.clone(), fingerprint: self.server_fingerprint.clone(), known_servers: None }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DiskFormatArg {
    Raw,
    Qcow2,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ExportFormat {
    Raw,
    Qcow2,
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
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

fn parse_block_size(s: &str) -> Result<u8, String> {
    let n = parse_size(s)?;
    if !n.is_power_of_two() || !(4096..=1 << 20).contains(&n) {
        return Err(format!("block size {s} must be a power of two from 4K to 1M"));
    }
    Ok(n.trailing_zeros() as u8)
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == LAUNCH_ARG) {
        return launch_qemu(&argv[2..]);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CAPSULE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capsule: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `capsule __launch-qemu QEMU ARGS...`: install the no-hugepage seccomp filter, then
/// become QEMU (same pid, unmodified binary).
fn launch_qemu(argv: &[std::ffi::OsString]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let Some((binary, args)) = argv.split_first() else {
        eprintln!("capsule: {LAUNCH_ARG} needs a QEMU binary");
        return ExitCode::FAILURE;
    };
    if let Err(e) = capsule_vmm_glue::launcher::disable_hugepage_advice() {
        eprintln!("capsule: {e}");
        return ExitCode::FAILURE;
    }
    let e = std::process::Command::new(binary).args(args).exec();
    eprintln!("capsule: cannot start {}: {e}", binary.to_string_lossy());
    ExitCode::FAILURE
}

pub(crate) fn open_store(dir: Option<PathBuf>) -> Result<Store> {
    let dir = dir.unwrap_or_else(Store::default_dir);
    Store::open(&dir).with_context(|| format!("opening store {}", dir.display()))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Mount(args) => return mount::mount(cli.store.clone(), args.clone()).map(|_| ExitCode::SUCCESS),
        Command::Umount { mountpoint } => return mount::umount(mountpoint).map(|_| ExitCode::SUCCESS),
        Command::Prefetch { target, offline } => return offline::prefetch(target, *offline, None, true).map(|_| ExitCode::SUCCESS),
        Command::Warm { target, profile, all } => {
            if profile.is_none() && !all {
                bail!("capsule warm: say what to fetch: --profile NAME, --all, or both");
            }
            return offline::prefetch(target, false, profile.as_deref(), *all).map(|_| ExitCode::SUCCESS);
        }
        Command::Unpin { target } => return offline::unpin(target).map(|_| ExitCode::SUCCESS),
        Command::Status { source, cache, json } => return offline::status(source, cache.clone(), *json).map(|_| ExitCode::SUCCESS),
        Command::Run(args) => return run::run(cli.store.clone(), args.clone()),
        Command::Suspend(args) => return run::suspend(cli.store.clone(), args.clone()).map(|_| ExitCode::SUCCESS),
        Command::Ps { json } => return run::ps(*json).map(|_| ExitCode::SUCCESS),
        _ => {}
    }
    let store = open_store(cli.store)?;
    match cli.command {
        Command::Mount(_)
        | Command::Umount { .. }
        | Command::Prefetch { .. }
        | Command::Warm { .. }
        | Command::Unpin { .. }
        | Command::Status { .. }
        | Command::Run(_)
        | Command::Suspend(_)
        | Command::Ps { .. } => {
            unreachable!("handled above")
        }
        Command::Commit { mountpoint, name, json } => {
            let report = mount::commit(&store, &mountpoint, &name)?;
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
            cpus,
            ram,
            hypervisor,
            hints,
            json,
        } => {
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
            let report = chv::import_snapshot(&store, &name, &dir, block_size)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_import(&name, &report);
            }
        }
        Command::Ls { json } => {
            let refs = store.list_refs()?;
            if json {
                let list: Vec<_> = refs
                    .iter()
                    .map(|(n, id)| {
                        let m = store.manifest(id).ok();
                        json!({"name": n, "id": id.to_hex(), "parent": m.as_ref().and_then(|m| m.parent).map(|p| p.to_hex()),
                               "created_unix": m.as_ref().map(|m| m.created_unix)})
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
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Export { name, out, format } => {
            let id = store.resolve(&name)?;
            let m = store.manifest(&id).with_context(|| format!("capsule {name}"))?;
            export(&store, &id, &m, &out, format).with_context(|| format!("exporting capsule {name} to {}", out.display()))?;
        }
        Command::Gc => {
            let s = store.gc()?;
            println!(
                "gc: kept {} blocks, removed {} blocks and {} objects, freed {}",
                s.blocks_kept,
                s.blocks_removed,
                s.objects_removed,
                human(s.bytes_freed)
            );
        }
        Command::Serve { listen, public_read, max_connections, header_timeout } => {
            let header_timeout = std::time::Duration::try_from_secs_f64(header_timeout).context("--header-timeout: not a duration in seconds")?;
            serve(store, listen, public_read, max_connections.max(1), header_timeout)?
        }
        Command::Token { command: TokenCommand::Create { scope, prefix, json } } => {
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
        Command::Token { command: TokenCommand::Revoke { id } } => {
            let r = capsule_net::auth::revoke_token(store.root(), &id)?;
            println!("revoked token {} (prefix {:?})", r.id(), r.prefix);
        }
        Command::Push { name, remote, conn, json } => {
            let report = push(&store, &name, &remote, &conn)?;
            print_transfer(json, "pushed", &name, &report, None)?;
        }
        Command::Pull { remote, local, conn, json } => {
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
        Command::Rm { name } => {
            if !store.delete_ref(&name)? {
                bail!("no capsule named {name:?} in store {}", store.root().display());
            }
            println!("removed ref {name}; run `capsule gc` to free its blocks");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Pushes local capsule `name` to `remote` (capsule://HOST:PORT[/REMOTENAME]).
pub(crate) fn push(store: &Store, name: &str, remote: &str, conn: &ConnArgs) -> Result<capsule_net::TransferReport> {
    let url = capsule_net::RemoteUrl::parse(remote)?;
    let remote_name = url.name.clone().unwrap_or_else(|| name.to_string());
    runtime()?.block_on(async {
        let client = connect(&url, conn).await?;
        let r = capsule_net::push(store, name, &client, &remote_name, &progress::Bar::new()).await;
        client.close().await;
        r.with_context(|| format!("pushing {name} to {remote}"))
    })
}

pub(crate) async fn connect(url: &capsule_net::RemoteUrl, conn: &ConnArgs) -> Result<capsule_net::Client> {
    let client = capsule_net::Client::connect(url, &conn.options()).await?;
    if client.newly_trusted {
        eprintln!("capsule: trusting new server {} with certificate SHA-256 {} (recorded in known_servers)", url.host_port(), client.fingerprint);
    }
    Ok(client)
}

fn serve(store: Store, listen: std::net::SocketAddr, public_read: bool, max_connections: usize, header_timeout: std::time::Duration) -> Result<()> {
    let root = store.root().to_path_buf();
    let identity = capsule_net::tls::load_or_create_identity(&root)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let server = capsule_net::Server::bind(identity, listen)?;
        let addr = server.local_addr()?;
        println!("capsule: serving {} on {addr}", root.display());
        println!("capsule: certificate SHA-256 {}", server.fingerprint);
        if public_read {
            println!("capsule: reads need no token (--public-read)");
        }
        let opts = capsule_net::ServeOptions { max_connections, header_timeout, ..capsule_net::ServeOptions::new(addr, public_read, root) };
        let backend: std::sync::Arc<dyn capsule_net::backend::Backend> = std::sync::Arc::new(store);
        tokio::select! {
            r = server.run(backend, opts) => r.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => { println!("capsule: stopping"); Ok(()) }
        }
    })
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
