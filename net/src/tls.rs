//! TLS identities and trust: a self-signed server certificate kept in the store, and
//! clients that trust it on first use (like ssh) or by a pinned SHA-256 fingerprint.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};

/// ALPN protocol name.
pub const ALPN: &[u8] = b"capsule/1";

fn io_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Io, format!("{what}: {e}"))
}

/// Lower-case hex SHA-256 of a certificate.
pub fn fingerprint(cert: &[u8]) -> String {
    Sha256::digest(cert).iter().map(|b| format!("{b:02x}")).collect()
}

/// The server's certificate and key.
#[derive(Debug)]
pub struct Identity {
    /// DER certificate.
    pub cert: CertificateDer<'static>,
    /// DER PKCS#8 key.
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the certificate.
    pub fingerprint: String,
}

/// Loads `STORE/server/{cert,key}.der`, creating them on first start.
pub fn load_or_create_identity(store_root: &Path) -> Result<Identity> {
    let dir = store_root.join("server");
    let (cert_path, key_path) = (dir.join("cert.der"), dir.join("key.der"));
    if !cert_path.exists() || !key_path.exists() {
        std::fs::create_dir_all(&dir).map_err(|e| io_err(dir.display(), e))?;
        let generated = rcgen::generate_simple_self_signed(vec!["capsule".to_string(), "localhost".to_string()])
            .map_err(|e| io_err("generating the server certificate", e))?;
        let tmp_key = dir.join("key.der.tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp_key).map_err(|e| io_err(tmp_key.display(), e))?;
            f.write_all(&generated.key_pair.serialize_der()).and_then(|_| f.sync_all()).map_err(|e| io_err(tmp_key.display(), e))?;
        }
        std::fs::rename(&tmp_key, &key_path).map_err(|e| io_err(key_path.display(), e))?;
        let tmp_cert = dir.join("cert.der.tmp");
        std::fs::write(&tmp_cert, generated.cert.der()).and_then(|_| std::fs::rename(&tmp_cert, &cert_path)).map_err(|e| io_err(cert_path.display(), e))?;
    }
    let cert = std::fs::read(&cert_path).map_err(|e| io_err(cert_path.display(), e))?;
    let key = std::fs::read(&key_path).map_err(|e| io_err(key_path.display(), e))?;
    Ok(Identity { fingerprint: fingerprint(&cert), cert: CertificateDer::from(cert), key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)) })
}

/// The rustls crypto provider used on both sides.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly one certificate fingerprint, or (trust on first use) any, recording what it saw.
#[derive(Debug)]
pub struct FingerprintVerifier {
    expected: Option<String>,
    seen: Mutex<Option<String>>,
    provider: Arc<CryptoProvider>,
}

impl FingerprintVerifier {
    /// Expects `expected`, or accepts any certificate if `None`.
    pub fn new(expected: Option<String>) -> Self {
        Self { expected: expected.map(|e| e.to_ascii_lowercase().replace(':', "")), seen: Mutex::new(None), provider: provider() }
    }

    /// The fingerprint the server presented, once a handshake got that far.
    pub fn seen(&self) -> Option<String> {
        self.seen.lock().ok().and_then(|s| s.clone())
    }

    /// What was expected.
    pub fn expected(&self) -> Option<&str> {
        self.expected.as_deref()
    }
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity.as_ref());
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(fp.clone());
        }
        match &self.expected {
            Some(e) if *e != fp => Err(rustls::Error::General(format!("certificate fingerprint {fp} is not the expected {e}"))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// `$CAPSULE_CONFIG_DIR/known_servers`, else `~/.config/capsule/known_servers`.
pub fn default_known_servers() -> PathBuf {
    let dir = std::env::var_os("CAPSULE_CONFIG_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(".config"));
        base.join("capsule")
    });
    dir.join("known_servers")
}

/// The fingerprint recorded for `host_port`, if any. Lines: `HOST:PORT FINGERPRINT`.
pub fn known_fingerprint(path: &Path, host_port: &str) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.lines().filter_map(|l| l.split_once(' ')).find(|(h, _)| *h == host_port).map(|(_, f)| f.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path.display(), e)),
    }
}

/// Records `host_port FINGERPRINT` (trust on first use).
pub fn remember(path: &Path, host_port: &str, fp: &str) -> Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir.display(), e))?;
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| io_err(path.display(), e))?;
    writeln!(f, "{host_port} {fp}").map_err(|e| io_err(path.display(), e))
}
