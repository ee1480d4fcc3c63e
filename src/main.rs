//! `capsule`: the command-line front end. The crates do the work; `cli.rs` defines the
//! command line, this file dispatches each command to its module, which calls the crates
//! and prints.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::FromArgMatches;
use serde::Serialize;

#[macro_use]
mod notes;
mod args;
mod backend;
mod catalog;
mod chv;
mod cli;
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
mod suspend;
mod tokens;

use cli::{cli_command, Cli, Command};
use remote::{open_existing_store, open_store};
use report::{print_json_or, print_transfer};
use run::LAUNCH_ARG;

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

#[derive(Debug, Serialize)]
struct Unmounted<'a> {
    unmounted: &'a Path,
}

#[derive(Debug, Serialize)]
struct Stopped {
    stopped: String,
}

fn run(cli: Cli) -> Result<ExitCode> {
    let store = cli.store.clone();
    let open = || open_store(store.clone());
    // Commands that only read a store must not make one where a typo points.
    let open_existing = || open_existing_store(store.clone());
    match cli.command {
        Command::Import(args) => catalog::import(&open()?, args)?,
        Command::ImportSnapshot { name, dir, block_size, json } => catalog::import_snapshot(&open()?, &name, &dir, block_size, json)?,
        Command::Ls { json } => catalog::ls(remote::open_store_if_any(store.clone())?, json)?,
        Command::Inspect { name, json } => catalog::inspect(&open_existing()?, &name, json)?,
        Command::Verify { name, repair, json } => return catalog::verify(&open_existing()?, name.as_deref(), repair, json),
        Command::Export { name, out, key, format, json } => catalog::export_capsule(&open_existing()?, &name, &out, key.as_deref(), format, json)?,
        Command::Gc { json, backend, grace, settle } => catalog::gc(open, &backend, grace, settle, json)?,
        Command::Rm { names, flatten, json } => retain::rm(&open()?, &names, flatten, json)?,
        Command::Flatten { name, json } => retain::flatten(&open()?, &name, json)?,
        Command::Mount(args) => mount::mount(store, args)?,
        Command::Umount { mountpoint, json } => {
            mount::umount(&mountpoint)?;
            print_json_or(json, &Unmounted { unmounted: &mountpoint }, || format!("unmounted {}", mountpoint.display()))?;
        }
        Command::Takeover { mountpoint, json } => {
            let t = supervise::takeover(&mountpoint)?;
            print_json_or(json, &t, || format!("{}: daemon {} replaced by {} ({})", t.mountpoint.display(), t.old_pid, t.new_pid, t.exe.display()))?;
        }
        Command::Commit { mountpoint, name, key, json } => mount::commit_command(&open()?, &mountpoint, &name, key.as_deref(), json)?,
        Command::Prefetch { target, pin } => offline::prefetch(&target, pin, None, true)?,
        Command::Warm { target, profile, all } => {
            if profile.is_none() && !all {
                bail!("capsule warm: say what to fetch: --profile NAME, --all, or both");
            }
            offline::prefetch(&target, false, profile.as_deref(), all)?
        }
        Command::Unpin { target } => offline::unpin(&target)?,
        Command::Status { source, watch: true, interval, .. } => {
            let every = Duration::try_from_secs_f64(interval).ok().filter(|d| !d.is_zero()).context("--interval: a positive number of seconds")?;
            status::watch(Path::new(&source), every)?
        }
        Command::Status { source, cache, json, .. } => offline::status(&source, cache, json)?,
        Command::Run(args) => return run::run(store, args, cli.quiet),
        Command::Suspend(args) => suspend::suspend(store, args)?,
        Command::Ps { json } => suspend::ps(json)?,
        Command::Stop { run, timeout, json } => {
            let id = suspend::stop(&run, Duration::from_secs(timeout))?;
            print_json_or(json, &Stopped { stopped: id.clone() }, || format!("stopped {id}"))?;
        }
        Command::Completions { shell } => clap_complete::generate(shell, &mut cli_command(), "capsule", &mut std::io::stdout()),
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
        Command::Token { command } => tokens::run(&open()?, command)?,
        Command::Serve { listen, public_read, max_connections, max_connections_per_ip, header_timeout, backend, json } => {
            let header_timeout = Duration::try_from_secs_f64(header_timeout).context("--header-timeout: not a duration in seconds")?;
            let limits = serve::Limits { max_connections: max_connections.max(1), max_connections_per_ip: max_connections_per_ip.max(1), header_timeout };
            serve::serve(open()?, &backend, listen, public_read, limits, json)?
        }
        Command::Push { name, remote, conn, json } => {
            let report = remote::push(&open()?, &name, &remote, &conn)?;
            print_transfer(json, "pushed", &name, &report, None)?;
        }
        Command::Pull { remote, local, conn, json } => {
            let (local, id, report) = remote::pull(&open()?, &remote, local, &conn)?;
            print_transfer(json, "pulled", &local, &report, Some(id))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
