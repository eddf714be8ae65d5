//! Whether stderr is connected to the journal.
//!
//! systemd sets `JOURNAL_STREAM=DEVICE:INODE` for a service whose stderr it connects to
//! journald; the variable alone is not enough (a child whose stderr was redirected inherits
//! it), so stderr itself must be that very stream.

/// True when stderr is the stream `JOURNAL_STREAM` names.
pub fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((device, inode)) = stream.to_str().and_then(|text| text.split_once(':')) else { return false };
    let (Ok(device), Ok(inode)) = (device.parse::<u64>(), inode.parse::<u64>()) else { return false };
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat for fd 2, which `stat` is.
    if unsafe { libc::fstat(libc::STDERR_FILENO, &mut stat) } != 0 {
        return false;
    }
    stat.st_dev as u64 == device && stat.st_ino as u64 == inode
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_journal_stream_that_is_not_stderr_is_not_the_journal() {
        // The test's stderr is whatever cargo gave it; a made-up stream is never it. (Tests
        // run in one process, so the variable is only read, never set, here.)
        if std::env::var_os("JOURNAL_STREAM").is_none() {
            assert!(!super::stderr_is_journal());
        }
    }
}
