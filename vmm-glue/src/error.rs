//! The one error type of `capsule-vmm-glue`: a matchable kind plus what and where.

use std::fmt;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Talking to the hypervisor's socket or files failed.
    Io,
    /// The hypervisor answered a QMP command with an error.
    Qmp,
    /// The hypervisor lacks something this needs (a capability, a binary).
    Unsupported,
    /// Waited too long.
    Timeout,
    /// Malformed input (a snapshot directory, a reply).
    Invalid,
    /// No such run.
    NotFound,
    /// Someone else holds it (a run id in use, a suspend in progress).
    Busy,
}

/// An error naming what failed and where, with its cause as `source()`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<std::io::Error>,
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    /// An I/O error about `what`.
    pub fn io(what: impl fmt::Display, e: std::io::Error) -> Self {
        Self { kind: ErrorKind::Io, message: what.to_string(), source: Some(e) }
    }

    /// The kind, for callers that branch on it.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message and its cause, `: `-separated.
    pub fn report(&self) -> String {
        match &self.source {
            Some(e) => format!("{}: {e}", self.message),
            None => self.message.clone(),
        }
    }

    /// Prefixes `outer` to the message, keeping kind and cause.
    #[must_use]
    pub fn context(mut self, outer: impl fmt::Display) -> Self {
        self.message = format!("{outer}: {}", self.message);
        self
    }
}
