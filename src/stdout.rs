//! Writing a one-shot command's output to stdout without panicking when the reader goes away.
//!
//! `println!` panics on a write error, and `veilnet lab status | head -1` closes the pipe early.
//! Rust ignores SIGPIPE (so daemons get EPIPE from a closed socket instead of dying); the
//! commands render their whole output first and write it here, where a closed pipe is the
//! reader's choice, not an error.

use std::io::{ErrorKind, Write};

/// Writes `text` to stdout; a reader that closed the pipe early counts as success.
pub fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// [`print`] with a line break after `text`.
pub fn println(text: &str) -> std::io::Result<()> {
    print(&format!("{text}\n"))
}
