//! Standard input and output as non-blocking pipes driven by the runtime's reactor.
//!
//! phi3d starts plugins with pipes on stdin and stdout under a process limit that counts
//! threads. Tokio's `stdin()`/`stdout()` do every read and write on a blocking-pool thread,
//! and rmcp's `stdio_pipes()` reopens the pipes through `/proc/self/fd`, which a sandbox can
//! refuse (a pipe created by another user, or no `/proc`) before falling back to those threads.
//! Duplicating the descriptors needs neither, so the plugin stays on its single thread.

use std::os::fd::AsFd;

use tokio::net::unix::pipe::{Receiver, Sender};

/// The process's stdin and stdout as a transport, or `None` when either is not a pipe.
///
/// Must run inside the runtime. The duplicates share their open file description with fds 0
/// and 1, so those become non-blocking too; nothing else in the plugin touches them.
pub fn pipes() -> Option<(Receiver, Sender)> {
    let input = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    let output = std::io::stdout().as_fd().try_clone_to_owned().ok()?;
    Some((
        Receiver::from_owned_fd(input).ok()?,
        Sender::from_owned_fd(output).ok()?,
    ))
}
