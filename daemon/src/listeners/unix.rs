//! The Unix socket listener: created with the configured mode and group before anyone can
//! connect, a stale socket file from a crash replaced, a live one never stolen.

use std::ffi::CString;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// The socket file phi3d created; removed when dropped.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds `path` with permissions `mode` (e.g. 0o660) and, when given, group `group`.
pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> anyhow::Result<(UnixListener, SocketFile)> {
    let shown = path.display();
    let gid = group.map(group_id).transpose()?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!("unix_socket: {shown} is in use by another server; stop it or choose another path");
            }
            std::fs::remove_file(path).map_err(|err| anyhow::anyhow!("unix_socket: cannot replace stale {shown}: {err}"))?;
        }
        Ok(_) => anyhow::bail!("unix_socket: {shown} exists and is not a socket; choose another path"),
        Err(_) => {}
    }
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|err| anyhow::anyhow!("unix_socket: cannot create {}: {err}", parent.display()))?;
    }
    // The file is created owner-only and opened up afterwards: connections queue from the
    // moment of bind, so a socket born with the default umask would let anyone in before the
    // mode below is applied. The umask is the process's, but nothing else creates files
    // while the listeners are opened.
    let previous = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    unsafe { libc::umask(previous) };
    let listener = bound.map_err(|err| anyhow::anyhow!("unix_socket: cannot bind {shown}: {err}"))?;
    let file = SocketFile(path.to_owned());
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|err| anyhow::anyhow!("unix_socket_group: cannot give {shown} to group {}: {err}", group.unwrap_or_default()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|err| anyhow::anyhow!("unix_socket_mode: cannot set {mode:o} on {shown}: {err}"))?;
    listener.set_nonblocking(true)?;
    Ok((UnixListener::from_std(listener)?, file))
}

/// A group's id, by name or number.
fn group_id(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = CString::new(group).map_err(|_| anyhow::anyhow!("unix_socket_group: `{group}` is not a group name"))?;
    // getgrnam_r because getgrnam's static buffer is not safe with other threads running; the
    // standard library has no group lookup, and one call does not justify a crate.
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found) };
    if rc != 0 || found.is_null() {
        anyhow::bail!("unix_socket_group: no group is named `{group}`; create it (groupadd) or give its number");
    }
    Ok(entry.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_gets_its_mode_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/phi3d.sock");
        let (listener, file) = bind(&path, 0o660, Some("0")).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert!(bind(&path, 0o660, None).unwrap_err().to_string().contains("in use"));
        drop(listener);
        std::mem::forget(file);
        let (_listener, file) = bind(&path, 0o600, None).expect("a stale socket is replaced");
        drop(file);
        assert!(!path.exists(), "the socket file goes with phi3d");
        std::fs::write(&path, "").unwrap();
        assert!(bind(&path, 0o600, None).unwrap_err().to_string().contains("not a socket"));
        assert!(group_id("no-such-group-here").unwrap_err().to_string().contains("no group"));
    }
}
