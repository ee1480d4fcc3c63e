//! `capsule key`: owners' keys for encrypted capsules, and finding the key a capsule needs.

use anyhow::{Context, Result};
use capsule_images::{keys, Hash, Key, Manifest};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Make a key in the key directory (~/.config/capsule/keys, or $CAPSULE_KEY_DIR), mode 0600
    Create {
        /// Its name (`capsule import --key NAME`)
        name: String,
        /// Mix a per-owner convergence secret into every block key: blocks dedup only among
        /// this key's capsules, and nobody without the key can test whether the server holds
        /// a block they can guess (confirmation of a file)
        #[arg(long)]
        convergence_secret: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// List the keys: name, id (what an encrypted capsule names), convergence secret
    List {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

/// A key as `key create --json` and `key list --json` show it (never its bytes).
#[derive(Debug, serde::Serialize)]
struct KeyRow<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    convergence_secret: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a std::path::Path>,
    /// The key file could not be read (why).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, serde::Serialize)]
struct KeyList<'a> {
    dir: &'a std::path::Path,
    keys: Vec<KeyRow<'a>>,
}

pub fn run(command: KeyCommand) -> Result<()> {
    let dir = keys::key_dir();
    match command {
        KeyCommand::Create { name, convergence_secret, json } => {
            let key = keys::create(&dir, &name, convergence_secret)?;
            let path = dir.join(&name);
            crate::report::print_json_or(
                json,
                &KeyRow { name: &name, id: Some(key.id().to_string()), convergence_secret: Some(convergence_secret), path: Some(&path), error: None },
                || format!("created key {name} (id {}) in {}; keep a copy: capsules encrypted with it cannot be read without it", key.id(), path.display()),
            )?;
        }
        KeyCommand::List { json } => {
            let list = keys::list(&dir)?;
            if json {
                let keys: Vec<KeyRow> = list
                    .iter()
                    .map(|(name, k)| match k {
                        Ok(k) => {
                            KeyRow { name, id: Some(k.id().to_string()), convergence_secret: Some(k.convergence_secret().is_some()), path: None, error: None }
                        }
                        Err(e) => KeyRow { name, id: None, convergence_secret: None, path: None, error: Some(e.to_string()) },
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&KeyList { dir: &dir, keys })?);
            } else {
                println!("{:<24} {:<16}  convergence secret", "NAME", "ID");
                for (name, k) in &list {
                    match k {
                        Ok(k) => println!("{name:<24} {:<16}  {}", k.id().to_string(), if k.convergence_secret().is_some() { "yes" } else { "no" }),
                        Err(e) => println!("{name:<24} (unreadable: {e})"),
                    }
                }
            }
        }
    }
    Ok(())
}

/// Key `name` from the key directory (`capsule import --key NAME`).
pub fn load(name: &str) -> Result<Key> {
    keys::load(&keys::key_dir(), name).with_context(|| format!("--key {name}"))
}

/// The key that opens capsule `id`: `name` if given, else the key of the id it names;
/// `None` for a capsule that is not encrypted.
pub fn for_capsule(name: Option<&str>, manifest: &Manifest, id: &Hash) -> Result<Option<Key>> {
    Ok(keys::key_for(&keys::key_dir(), name, manifest.sealing.as_ref(), &format!("{} ({})", manifest.name, id.short()))?)
}
