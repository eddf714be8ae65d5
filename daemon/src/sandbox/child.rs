//! Error handling for the code that runs in the forked child, between `fork` and `exec`.
//!
//! phi3d is multi-threaded, so until it execs, the child of a fork may make only
//! async-signal-safe calls: another thread may have held the allocator's lock (or any other)
//! at the moment of the fork, and nobody is left in the child to release it. So every step's
//! data is prepared in the parent, the steps only make system calls, and errors here are a
//! static step name plus an errno. `spawn` reports only the errno of a failed step, so the step
//! also names itself on the child's stderr, which the supervisor captures.

use std::io;

/// A step that failed in the child: which one, and the errno it got.
#[derive(Debug)]
pub(super) struct StepError {
    step: &'static str,
    errno: i32,
}

impl StepError {
    /// The error of the system call that has just failed.
    pub(super) fn last(step: &'static str) -> Self {
        StepError { step, errno: io::Error::last_os_error().raw_os_error().unwrap_or(0) }
    }

    /// Says which step failed on stderr and turns the failure into what `pre_exec` returns.
    pub(super) fn into_io(self) -> io::Error {
        for part in [b"phi3d sandbox: ".as_slice(), self.step.as_bytes(), b" failed\n"] {
            // SAFETY: writes from a live buffer of the given length; a failed write to stderr
            // cannot be reported anywhere else, so it is ignored.
            unsafe { libc::write(libc::STDERR_FILENO, part.as_ptr().cast(), part.len()) };
        }
        io::Error::from_raw_os_error(self.errno)
    }
}

/// Turns the return value of a libc call or raw system call (negative on failure, errno set)
/// into a `Result`.
pub(super) fn check(ret: impl Into<i64>, step: &'static str) -> Result<(), StepError> {
    if ret.into() < 0 { Err(StepError::last(step)) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_passes_success_and_captures_errno_of_failure() {
        assert!(check(0, "nothing").is_ok());
        // SAFETY: closing an fd that is certainly not open only sets errno.
        let ret = unsafe { libc::close(-1) };
        let error = check(ret, "close(-1)").unwrap_err();
        assert_eq!(error.step, "close(-1)");
        assert_eq!(error.errno, libc::EBADF);
        assert_eq!(error.into_io().raw_os_error(), Some(libc::EBADF));
    }
}
