//! The one error type of `capsule-store-s3`.

use std::fmt;

/// What went wrong, coarse enough to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object or ref is not in the bucket.
    NotFound,
    /// A ref moved under a compare-and-swap, or another server is moving it right now.
    Conflict,
    /// Bytes in the bucket that fail their hash or do not parse.
    Corrupt,
    /// The object store did not answer, or answered with an error.
    Unavailable,
    /// Bad input: a malformed `s3://` URL, name or setting.
    InvalidInput,
}

/// An error with its kind, a message naming what and where, and the store's error if any.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    /// The matchable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// An object store error about `what`; a missing object becomes `NotFound`.
    pub(crate) fn store(what: impl fmt::Display, e: object_store::Error) -> Self {
        let kind = match e {
            object_store::Error::NotFound { .. } => ErrorKind::NotFound,
            object_store::Error::InvalidPath { .. } => ErrorKind::InvalidInput,
            _ => ErrorKind::Unavailable,
        };
        // object_store's message names the path and the HTTP status; the causes below it
        // (connection refused, a TLS or signing problem) are worth a line too.
        let mut message = format!("{what}: {e}");
        let mut cause = std::error::Error::source(&e);
        let mut depth = 0;
        while let Some(c) = cause {
            let text = c.to_string();
            if !message.contains(&text) && depth < 4 {
                message = format!("{message}: {text}");
            }
            cause = c.source();
            depth += 1;
        }
        Self { kind, message, source: Some(Box::new(e)) }
    }

    /// A capsule-images error (a damaged object, a bad name) about something in the bucket.
    pub(crate) fn images(e: capsule_images::Error) -> Self {
        let kind = match e.kind() {
            capsule_images::ErrorKind::NotFound => ErrorKind::NotFound,
            capsule_images::ErrorKind::InvalidInput | capsule_images::ErrorKind::NoKey => ErrorKind::InvalidInput,
            capsule_images::ErrorKind::Conflict => ErrorKind::Conflict,
            capsule_images::ErrorKind::Io | capsule_images::ErrorKind::External => ErrorKind::Unavailable,
            capsule_images::ErrorKind::Corrupt | capsule_images::ErrorKind::TooLarge => ErrorKind::Corrupt,
        };
        Self { kind, message: e.to_string(), source: Some(Box::new(e)) }
    }

    /// Adds an outer layer of context.
    pub fn context(mut self, outer: impl fmt::Display) -> Self {
        self.message = format!("{outer}: {}", self.message);
        self
    }
}

impl From<Error> for capsule_images::Error {
    fn from(e: Error) -> Self {
        use capsule_images::ErrorKind as Images;
        let kind = match e.kind {
            ErrorKind::NotFound => Images::NotFound,
            ErrorKind::Conflict => Images::Conflict,
            ErrorKind::Corrupt => Images::Corrupt,
            ErrorKind::Unavailable => Images::Io,
            ErrorKind::InvalidInput => Images::InvalidInput,
        };
        capsule_images::Error::new(kind, e.message)
    }
}

impl From<Error> for capsule_net::Error {
    fn from(e: Error) -> Self {
        use capsule_net::ErrorKind as Net;
        let kind = match e.kind {
            ErrorKind::NotFound => Net::NotFound,
            ErrorKind::Conflict => Net::Conflict,
            ErrorKind::Corrupt => Net::Corrupt,
            ErrorKind::Unavailable => Net::Unavailable,
            ErrorKind::InvalidInput => Net::InvalidInput,
        };
        capsule_net::Error::new(kind, e.message)
    }
}
