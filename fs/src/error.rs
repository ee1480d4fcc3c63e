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

/// An error naming what and where.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// An I/O error about `what`; a full disk is `NoSpace`.
    pub fn io(what: impl fmt::Display, e: std::io::Error) -> Self {
        let kind = if e.raw_os_error() == Some(libc::ENOSPC) { ErrorKind::NoSpace } else { ErrorKind::Io };
        Self { kind, message: format!("{what}: {e}") }
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
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
            K::NotFound => ErrorKind::Missing,
            K::Io | K::External => ErrorKind::Io,
            _ => ErrorKind::Invalid,
        };
        let kind = if e.is_storage_full() { ErrorKind::NoSpace } else { kind };
        Self { kind, message: e.report() }
    }
}

impl From<FetchError> for Error {
    fn from(e: FetchError) -> Self {
        Self { kind: ErrorKind::Fetch(e.kind), message: e.message }
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
