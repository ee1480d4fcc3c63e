//! The one error type of `capsule-fs`, and the one place errors become errnos.

use std::fmt;

use capsule_fetch::{FetchError, FetchErrorKind};

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Local file trouble (cache, overlay).
    Io,
    /// The block is not in the store and nothing can fetch it.
    Missing,
    /// The block source failed.
    Fetch(FetchErrorKind),
    /// Stored bytes failed verification.
    Corrupt,
    /// A write on a read-only mount or file.
    ReadOnly,
    /// A write past the end of a fixed-size image.
    TooBig,
    /// The local disk is full.
    NoSpace,
    /// Anything else the caller got wrong.
    Invalid,
}

/// An error: its matchable kind, what and where (the message, context prefixed), and the
/// cause as a real `source()` (an operating-system error, say).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    /// An I/O error about `what`; a full disk is `NoSpace`.
    pub fn io(what: impl fmt::Display, e: std::io::Error) -> Self {
        let kind = if e.raw_os_error() == Some(libc::ENOSPC) { ErrorKind::NoSpace } else { ErrorKind::Io };
        Self { kind, message: what.to_string(), source: Some(Box::new(e)) }
    }

    /// A new error caused by `source`.
    pub fn caused_by(kind: ErrorKind, message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { kind, message: message.into(), source: Some(Box::new(source)) }
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What and where, without the cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message and every cause, `: `-separated (for logs).
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
            K::NotFound => ErrorKind::Missing,
            K::Io | K::External => ErrorKind::Io,
            _ => ErrorKind::Invalid,
        };
        let kind = if e.is_storage_full() { ErrorKind::NoSpace } else { kind };
        let (message, source) = e.into_parts();
        Self { kind, message, source }
    }
}

impl From<FetchError> for Error {
    fn from(e: FetchError) -> Self {
        Self::new(ErrorKind::Fetch(e.kind), e.message)
    }
}

/// The errno a reader or writer sees. Data errors are EIO: never wrong bytes.
pub fn errno(e: &Error) -> fuser::Errno {
    match e.kind() {
        ErrorKind::ReadOnly => fuser::Errno::EROFS,
        ErrorKind::TooBig => fuser::Errno::from_i32(libc::EFBIG),
        ErrorKind::NoSpace => fuser::Errno::from_i32(libc::ENOSPC),
        ErrorKind::Invalid => fuser::Errno::EINVAL,
        ErrorKind::Io | ErrorKind::Missing | ErrorKind::Fetch(_) | ErrorKind::Corrupt => fuser::Errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_store_error_keeps_its_cause_as_the_source_and_a_full_disk_its_kind() {
        let full = capsule_images::Error::io("writing block 3fa4", std::io::Error::from_raw_os_error(libc::ENOSPC));
        let e = Error::from(full).context("overlay of root.raw");
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.to_string(), "overlay of root.raw: writing block 3fa4");
        let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>()).unwrap();
        assert_eq!(io.raw_os_error(), Some(libc::ENOSPC));
        assert!(e.report().starts_with("overlay of root.raw: writing block 3fa4: "), "{}", e.report());
    }
}
