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

/// An error: its matchable kind, what and where (the message, context prefixed), and the
/// cause as a real `source()` (a socket's or the store's error).
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
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    /// An error of `kind` about `what`, caused by `source`.
    pub fn with_source(kind: ErrorKind, what: impl fmt::Display, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { kind, message: what.to_string(), source: Some(Box::new(source)) }
    }

    /// Shorthand for a protocol error.
    pub fn protocol(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Protocol, message)
    }

    /// The matchable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What and where, without the cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message and every cause, `: `-separated (for logs and the wire).
    pub fn report(&self) -> String {
        let mut out = self.message.clone();
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            out.push_str(&format!(": {e}"));
            next = e.source();
        }
        out
    }

    /// Prefixes context.
    #[must_use]
    pub fn context(mut self, outer: impl fmt::Display) -> Self {
        self.message = format!("{outer}: {}", self.message);
        self
    }
}

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
        let (message, source) = e.into_parts();
        Self { kind, message, source }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::with_source(ErrorKind::Io, "I/O", e)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_cause_is_a_source_and_the_report_carries_it() {
        let e = Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset)).context("reading a frame");
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.to_string(), "reading a frame: I/O");
        assert!(std::error::Error::source(&e).unwrap().downcast_ref::<std::io::Error>().is_some());
        assert!(e.report().starts_with("reading a frame: I/O: "), "{}", e.report());
        let store = Error::from(capsule_images::Error::io("block 3fa4", std::io::Error::from_raw_os_error(28)));
        assert_eq!(store.kind(), ErrorKind::Io);
        assert_eq!(store.to_string(), "block 3fa4");
        assert!(store.report().contains("(os error 28)"), "{}", store.report());
    }
}
