//! `capsule serve`: this store's capsules (or an S3 bucket's) over QUIC until Ctrl-C.

use anyhow::Result;
use capsule_images::Store;
use serde::Serialize;

use crate::backend::BackendArgs;
use crate::remote::runtime;

/// The server's resource bounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    #[serde(serialize_with = "secs")]
    pub header_timeout: std::time::Duration,
}

fn secs<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// What `serve --json` prints once it listens: one line, so a script can read it and go on.
#[derive(Debug, Serialize)]
pub struct Serving<'a> {
    /// The UDP address bound (the port chosen if `--listen` said 0).
    pub listening: std::net::SocketAddr,
    /// SHA-256 of the server's certificate, what clients pin with `--server-fingerprint`.
    pub fingerprint: &'a str,
    /// What is served: the store's directory or the bucket.
    pub backend: &'a str,
    /// Reads need no token.
    pub public_read: bool,
    pub limits: Limits,
}

pub fn serve(store: Store, backend: &BackendArgs, listen: std::net::SocketAddr, public_read: bool, limits: Limits, json: bool) -> Result<()> {
    let root = store.root().to_path_buf();
    let identity = capsule_net::tls::load_or_create_identity(&root)?;
    let (backend, what) = backend.open(store)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let server = capsule_net::Server::bind(identity, listen)?;
        let addr = server.local_addr()?;
        if json {
            let ready = Serving { listening: addr, fingerprint: &server.fingerprint, backend: &what, public_read, limits };
            println!("{}", serde_json::to_string(&ready)?);
        } else {
            println!("capsule: serving {what} on {addr}");
            println!("capsule: certificate SHA-256 {}", server.fingerprint);
            if public_read {
                println!("capsule: reads need no token (--public-read)");
            }
        }
        let opts = capsule_net::ServeOptions {
            max_connections: limits.max_connections,
            max_per_ip: limits.max_connections_per_ip,
            header_timeout: limits.header_timeout,
            ..capsule_net::ServeOptions::new(addr, public_read, root)
        };
        tokio::select! {
            r = server.run(backend, opts) => r.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => {
                if !json {
                    println!("capsule: stopping");
                }
                Ok(())
            }
        }
    })
}
