//! The one error type of `capsule-images`: a small matchable [`ErrorKind`], a human context
//! chain ("capsule demo: disk root: block 17 (hash 3fa4..)") so every message names what
//! and where, and the cause as a real `source()`.

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
    /// A sealed capsule or block, and not the key that opens it.
    NoKey,
}

/// An error with its kind, what it concerns, and the underlying cause if any (its
/// `source()`, so a caller can match a full disk by `io::ErrorKind`, not by text).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
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

    /// What and where, without the cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message and every cause, `: `-separated (for crates that carry it as text).
    pub fn report(&self) -> String {
        let mut out = self.message.clone();
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            out.push_str(&format!(": {e}"));
            next = e.source();
        }
        out
    }

    /// The message and the cause, for a crate whose own error carries them on.
    pub fn into_parts(self) -> (String, Option<Box<dyn std::error::Error + Send + Sync + 'static>>) {
        (self.message, self.source)
    }

    /// The operating-system error under this one, if any.
    pub fn io_error(&self) -> Option<&std::io::Error> {
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return Some(io);
            }
            next = e.source();
        }
        None
    }

    /// A local disk ran full (ENOSPC somewhere down the chain).
    pub fn is_storage_full(&self) -> bool {
        self.io_error().is_some_and(|e| e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28))
    }

    /// Prefixes `outer` ("capsule demo", "disk root") to the message.
    #[must_use]
    pub fn context(mut self, outer: impl fmt::Display) -> Self {
        self.message = format!("{outer}: {}", self.message);
        self
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_full_disk_is_known_by_its_source_not_its_text() {
        let full = Error::io("writing block 3fa4", std::io::Error::from_raw_os_error(28)).context("capsule demo");
        assert!(full.is_storage_full());
        assert_eq!(full.to_string(), "capsule demo: writing block 3fa4");
        assert!(full.report().starts_with("capsule demo: writing block 3fa4: "), "{}", full.report());
        // The words alone are not a full disk.
        assert!(!Error::new(ErrorKind::Io, "No space left on device").is_storage_full());
        assert!(!Error::io("x", std::io::Error::from_raw_os_error(5)).is_storage_full());
    }
}
