//! `capsule key`: owners' keys for encrypted capsules, and finding the key a capsule needs.

use anyhow::{Context, Result};
use capsule_images::{keys, Hash, Key, Manifest};
use clap::Subcommand;
use serde_json::json;

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
        #[arg(long)]
        json: bool,
    },
    /// List the keys: name, id (what an encrypted capsule names), convergence secret
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: KeyCommand) -> Result<()> {
    let dir = keys::key_dir();
    match command {
        KeyCommand::Create { name, convergence_secret, json } => {
            let key = keys::create(&dir, &name, convergence_secret)?;
            let path = dir.join(&name);
            crate::print_json_or(json, &json!({"name": name, "id": key.id().to_string(), "convergence_secret": convergence_secret, "path": path}), || {
                format!("created key {name} (id {}) in {}; keep a copy: capsules encrypted with it cannot be read without it", key.id(), path.display())
            })?;
        }
        KeyCommand::List { json } => {
            let list = keys::list(&dir)?;
            if json {
                let rows: Vec<_> = list
                    .iter()
                    .map(|(name, k)| match k {
                        Ok(k) => json!({"name": name, "id": k.id().to_string(), "convergence_secret": k.convergence_secret().is_some()}),
                        Err(e) => json!({"name": name, "error": e.to_string()}),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&json!({"dir": dir, "keys": rows}))?);
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
