//! Lines to stderr for people, from any module (`note!`, `note_raw!`).

/// `eprint!`/`eprintln!` that never panic: a mount daemon's stderr is its log file, on a
/// disk that may be full (a panic there would end the mount).
macro_rules! note {
    ($($arg:tt)*) => {{ use std::io::Write as _; let _ = writeln!(std::io::stderr(), $($arg)*); }};
}
macro_rules! note_raw {
    ($($arg:tt)*) => {{ use std::io::Write as _; let _ = write!(std::io::stderr(), $($arg)*); }};
}
