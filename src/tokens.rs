//! `capsule token create|list|revoke`: access tokens of this store's server.

use anyhow::Result;
use capsule_images::Store;
use capsule_net::auth::{self, Scope, TokenRecord};
use serde::Serialize;

use crate::cli::{ScopeArg, TokenCommand};
use crate::report::{print_json_or, print_json_or_with};

/// A token as `list` shows it (never the token itself).
#[derive(Debug, Serialize)]
struct Listed<'a> {
    id: &'a str,
    scope: Scope,
    prefix: &'a str,
    created_unix: u64,
}

impl<'a> From<&'a TokenRecord> for Listed<'a> {
    fn from(r: &'a TokenRecord) -> Self {
        Self { id: r.id(), scope: r.scope, prefix: &r.prefix, created_unix: r.created_unix }
    }
}

#[derive(Debug, Serialize)]
struct Created<'a> {
    token: &'a str,
    id: &'a str,
    scope: Scope,
    prefix: &'a str,
}

#[derive(Debug, Serialize)]
struct Revoked<'a> {
    revoked: &'a str,
    prefix: &'a str,
}

pub fn run(store: &Store, command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create { scope, prefix, json } => {
            let scope = match scope {
                ScopeArg::Read => Scope::Read,
                ScopeArg::Write => Scope::Write,
            };
            let (token, record) = auth::create_token(store.root(), scope, &prefix)?;
            let created = Created { token: &token, id: record.id(), scope: record.scope, prefix: &record.prefix };
            print_json_or_with(json, &created, || {
                // stdout is the token alone (scripts capture it); the id goes to a person.
                println!("{token}");
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    eprintln!(
                        "capsule: token id {} ({:?}, prefix {:?}); revoke with: capsule token revoke {}",
                        created.id, record.scope, record.prefix, created.id
                    );
                }
            })
        }
        TokenCommand::List { json } => {
            let tokens = auth::list_tokens(store.root())?;
            let list: Vec<Listed> = tokens.iter().map(Listed::from).collect();
            print_json_or_with(json, &list, || {
                for t in &list {
                    let scope = match t.scope {
                        Scope::Read => "read",
                        Scope::Write => "write",
                    };
                    println!("{}  {scope:5}  {:20}  created {}", t.id, if t.prefix.is_empty() { "(all)" } else { t.prefix }, t.created_unix);
                }
            })
        }
        TokenCommand::Revoke { id, json } => {
            let r = auth::revoke_token(store.root(), &id)?;
            print_json_or(json, &Revoked { revoked: r.id(), prefix: &r.prefix }, || format!("revoked token {} (prefix {:?})", r.id(), r.prefix))
        }
    }
}
