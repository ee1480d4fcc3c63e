//! Opening the local store and talking to a server.

use std::path::PathBuf;

use anyhow::{Context, Result};
use capsule_images::Store;

use crate::args::ConnArgs;
use crate::progress;

pub fn open_store(dir: Option<PathBuf>) -> Result<Store> {
    let dir = dir.unwrap_or_else(Store::default_dir);
    Store::open(&dir).with_context(|| format!("opening store {}", dir.display()))
}

/// The store at `dir` (default: [`Store::default_dir`]) if one is there; never makes one.
pub fn open_existing_store(dir: Option<PathBuf>) -> Result<Store> {
    let dir = dir.unwrap_or_else(Store::default_dir);
    if !dir.join("format").is_file() {
        anyhow::bail!("no capsule store at {} (check --store or CAPSULE_STORE)", dir.display());
    }
    open_store(Some(dir))
}

/// The store at `dir` if one is there, `None` if none is; a store that is there but will
/// not open (another format version, say) is an error, not an empty listing.
pub fn open_store_if_any(dir: Option<PathBuf>) -> Result<Option<Store>> {
    let dir = dir.unwrap_or_else(Store::default_dir);
    if !dir.join("format").is_file() {
        return Ok(None);
    }
    open_store(Some(dir)).map(Some)
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Closes a metadata connection on its own thread, beside the caller's work, which should
/// not wait for the close; the thread takes the runtime the connection runs on.
pub fn close_in_background(runtime: tokio::runtime::Runtime, client: capsule_net::Client) {
    std::thread::spawn(move || runtime.block_on(client.close()));
}

/// Pushes local capsule `name` to `remote` (capsule://HOST:PORT[/REMOTENAME]).
pub fn push(store: &Store, name: &str, remote: &str, conn: &ConnArgs) -> Result<capsule_net::TransferReport> {
    let url = capsule_net::RemoteUrl::parse(remote)?;
    let remote_name = url.name.clone().unwrap_or_else(|| name.to_string());
    runtime()?.block_on(async {
        let client = connect(&url, conn).await?;
        let r = capsule_net::push(store, name, &client, &remote_name, &progress::Bar::new()).await;
        client.close().await;
        r.with_context(|| format!("pushing {name} to {remote}"))
    })
}

/// A server slower than this to answer gets a note, so a user is not left in silence
/// until `--connect-timeout`.
const SLOW_ANSWER: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn connect(url: &capsule_net::RemoteUrl, conn: &ConnArgs) -> Result<capsule_net::Client> {
    let options = conn.options();
    let connecting = capsule_net::Client::connect(url, &options);
    tokio::pin!(connecting);
    let client = tokio::select! {
        r = &mut connecting => r?,
        _ = tokio::time::sleep(SLOW_ANSWER) => {
            if !progress::is_quiet() {
                note!("capsule: no answer yet from {}; waiting up to {} s (--connect-timeout)", url.host_port(), conn.connect_timeout);
            }
            connecting.await?
        }
    };
    if client.newly_trusted {
        eprintln!("capsule: trusting new server {} with certificate SHA-256 {} (recorded in known_servers)", url.host_port(), client.fingerprint);
    }
    Ok(client)
}

/// Pulls `remote` (capsule://HOST:PORT/NAME) into `store` as `local` (default: the remote
/// name); returns the local name, the capsule's id and what travelled.
pub fn pull(store: &Store, remote: &str, local: Option<String>, conn: &ConnArgs) -> Result<(String, capsule_images::Hash, capsule_net::TransferReport)> {
    let url = capsule_net::RemoteUrl::parse(remote)?;
    let remote_name = url.name.clone().with_context(|| format!("{remote}: name the capsule: capsule://HOST:PORT/NAME"))?;
    let local = local.unwrap_or_else(|| remote_name.clone());
    let (id, report) = runtime()?.block_on(async {
        let client = connect(&url, conn).await?;
        let r = capsule_net::pull(&client, &remote_name, store, &local, &progress::Bar::new()).await;
        client.close().await;
        r.with_context(|| format!("pulling {remote}"))
    })?;
    Ok((local, id, report))
}
