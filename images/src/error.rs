//! The one error type of `capsule-images`: a small matchable [`ErrorKind`] plus a
//! human context chain ("capsule demo: disk root: block 17 (hash 3fa4..)") so every
//! message names what and where.

use std::fmt;

/// What went wrong, coarse enough to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operating system refused a read or write.
    Io,
    /// Stored or received bytes fail a magic, version, checksum or hash check.
    Corrupt,
    /// A capsule, ref, block or object is not in the store.
    NotFound,
    /// The caller asked for something malformed (bad name, bad block size, ...).
    InvalidInput,
    /// A declared size exceeds its cap; nothing was allocated for it.
    TooLarge,
    /// A compare-and-swap on a ref lost against another writer.
    Conflict,
    /// An external tool (qemu-img) failed.
    External,
}

/// An error with its kind, what it concerns, and the underlying cause if any.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` described by `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    /// An I/O error about `what` (a path, usually).
    pub fn io(what: impl fmt::Display, err: std::io::Error) -> Self {
        let kind = if err.kind() == std::io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::Io };
        Self { kind, message: what.to_string(), source: Some(Box::new(err)) }
    }

    /// Shorthand for [`ErrorKind::Corrupt`].
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for [`ErrorKind::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// The matchable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Prefixes `outer` ("capsule demo", "disk root") to the message.
    #[must_use]
    pub fn context(mut self, outer: impl fmt::Display) -> Self {
        self.message = format!("{outer}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The source is already part of Display; do not repeat it in chains.
        None
    }
}

/// Adds context to results of this crate.
pub trait ResultExt<T> {
    /// Prefixes `outer` to the error message, lazily.
    fn with_context<D: fmt::Display>(self, outer: impl FnOnce() -> D) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn with_context<D: fmt::Display>(self, outer: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.context(outer()))
    }
}
