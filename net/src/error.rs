//! The one error type of `capsule-net`.

use std::fmt;

/// What went wrong, coarse enough to match on (and to send over the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ErrorKind {
    /// Socket, TLS or local file trouble.
    Io,
    /// A malformed, oversized or unexpected frame.
    Protocol,
    /// No token, a wrong token, a wrong scope or prefix. Says nothing about what exists.
    Denied,
    /// The name or hash is not there (only said to those allowed to know).
    NotFound,
    /// A ref moved under a compare-and-swap.
    Conflict,
    /// Bytes that fail their hash or checksum.
    Corrupt,
    /// The server's certificate is not the one expected.
    Fingerprint,
    /// The peer gave up or the link is gone.
    Unavailable,
    /// Bad input from the user (a malformed URL, ...).
    InvalidInput,
}

/// An error with its kind and a message naming what and where.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// Shorthand for a protocol error.
    pub fn protocol(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Protocol, message)
    }

    /// The matchable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message alone.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes context.
    #[must_use]
    pub fn context(mut self, outer: impl fmt::Display) -> Self {
        self.message = format!("{outer}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<capsule_images::Error> for Error {
    fn from(e: capsule_images::Error) -> Self {
        use capsule_images::ErrorKind as K;
        let kind = match e.kind() {
            K::Corrupt => ErrorKind::Corrupt,
            K::NotFound => ErrorKind::NotFound,
            K::Conflict => ErrorKind::Conflict,
            K::InvalidInput | K::TooLarge | K::NoKey => ErrorKind::InvalidInput,
            K::Io | K::External => ErrorKind::Io,
        };
        Self::new(kind, e.report())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::new(ErrorKind::Io, e.to_string())
    }
}
