//! A private network namespace for plugins that need no network, or only loopback.
//!
//! A new network namespace holds nothing but a `lo` interface that is down, so nothing inside
//! can reach anything outside, by any protocol. Neither of the other layers can promise that:
//! Landlock filters only TCP, and seccomp cannot see the address a socket connects to.
//!
//! Root creates the namespace directly. Anyone else needs CAP_SYS_ADMIN over it, which only a
//! new user namespace grants, so the child creates both at once and maps its own uid and gid
//! into the user namespace. The maps are identity maps: the plugin keeps its uid, and since that
//! uid is not 0, `execve` drops the capabilities that creating the user namespace handed out.

use std::ffi::CStr;

use super::child::{StepError, check};
use super::protections::NamespaceProtection;

/// A namespace to enter, prepared in the parent.
pub(super) struct NetNamespace {
    /// `Some` when a user namespace is needed, i.e. phi3d is not root.
    user_maps: Option<UserMaps>,
    /// Whether to bring `lo` up.
    loopback: bool,
}

/// The lines to write to `/proc/self/{uid,gid}_map`, formatted before the fork.
struct UserMaps {
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
}

impl NetNamespace {
    pub(super) fn prepare(running_as_root: bool, loopback: bool) -> NetNamespace {
        let user_maps = (!running_as_root).then(|| {
            // SAFETY: geteuid and getegid have no preconditions.
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            UserMaps {
                uid_map: format!("{uid} {uid} 1\n").into_bytes(),
                gid_map: format!("{gid} {gid} 1\n").into_bytes(),
            }
        });
        NetNamespace { user_maps, loopback }
    }

    pub(super) fn report(&self) -> NamespaceProtection {
        NamespaceProtection { user_namespace: self.user_maps.is_some(), loopback_up: self.loopback }
    }

    /// Moves the calling process into the new namespace(s). Runs in the forked child.
    pub(super) fn enter(&self) -> Result<(), StepError> {
        match &self.user_maps {
            // SAFETY (both unshare calls): unshare only changes the calling process.
            None => check(unsafe { libc::unshare(libc::CLONE_NEWNET) }, "unshare(CLONE_NEWNET)")?,
            Some(maps) => {
                check(
                    unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) },
                    "unshare(CLONE_NEWUSER | CLONE_NEWNET)",
                )?;
                write_proc_file(c"/proc/self/uid_map", &maps.uid_map, "writing /proc/self/uid_map")?;
                // The kernel refuses an unprivileged gid map unless setgroups is denied first,
                // which keeps the process from dropping a group that denies it access.
                write_proc_file(c"/proc/self/setgroups", b"deny", "writing /proc/self/setgroups")?;
                write_proc_file(c"/proc/self/gid_map", &maps.gid_map, "writing /proc/self/gid_map")?;
            }
        }
        if self.loopback { loopback_up() } else { Ok(()) }
    }
}

/// Writes `contents` to a /proc file in one `write`, as the kernel requires for id maps.
fn write_proc_file(path: &CStr, contents: &[u8], step: &'static str) -> Result<(), StepError> {
    // SAFETY: `path` is NUL-terminated; the fd is closed on every path below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    check(fd, step)?;
    // SAFETY: writes from a live buffer of the given length.
    let written = unsafe { libc::write(fd, contents.as_ptr().cast(), contents.len()) };
    let result =
        if usize::try_from(written).is_ok_and(|n| n == contents.len()) { Ok(()) } else { Err(StepError::last(step)) };
    // SAFETY: closes the fd opened above, once.
    unsafe { libc::close(fd) };
    result
}

/// Sets IFF_UP on `lo`, the way `ip link set lo up` does.
fn loopback_up() -> Result<(), StepError> {
    // SAFETY: creates a socket that is closed on every path below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, "socket() to configure lo")?;
    // SAFETY: an all-zero ifreq is valid; the name is NUL-terminated within IFNAMSIZ.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    let result = (|| {
        // SAFETY: SIOCGIFFLAGS fills the flags member of the ifreq it is given.
        check(
            unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS as libc::Ioctl, &mut request as *mut libc::ifreq) },
            "SIOCGIFFLAGS on lo",
        )?;
        // SAFETY: the flags member is the one SIOCGIFFLAGS has just set.
        unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: SIOCSIFFLAGS only reads the ifreq.
        check(
            unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS as libc::Ioctl, &request as *const libc::ifreq) },
            "SIOCSIFFLAGS on lo",
        )
    })();
    // SAFETY: closes the socket opened above, once.
    unsafe { libc::close(fd) };
    result
}

#[cfg(test)]
mod tests {
    use super::super::probe::{KernelSupport, in_child};
    use super::*;

    /// The inode of the network namespace the calling process is in.
    fn namespace_inode() -> libc::ino_t {
        // SAFETY: stat writes into a zeroed local; the path is NUL-terminated.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // This also runs in forked children, which must not panic: 0 never matches the host's.
        if unsafe { libc::stat(c"/proc/self/ns/net".as_ptr(), &mut st) } != 0 {
            return 0;
        }
        st.st_ino
    }

    /// Whether `lo`, as seen by the calling process, is up.
    fn loopback_is_up() -> bool {
        // SAFETY: as in `loopback_up`, without the SIOCSIFFLAGS.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            let mut request: libc::ifreq = std::mem::zeroed();
            request.ifr_name[0] = b'l' as libc::c_char;
            request.ifr_name[1] = b'o' as libc::c_char;
            let ok = libc::ioctl(fd, libc::SIOCGIFFLAGS as libc::Ioctl, &mut request as *mut libc::ifreq) == 0;
            libc::close(fd);
            ok && request.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short != 0
        }
    }

    #[test]
    fn enter_gives_a_new_namespace_with_lo_up_only_when_asked() {
        let support = KernelSupport::probe();
        if !support.network_namespaces {
            phi3d_tests::skip(format!("this kernel gives this process no network namespaces ({support})"));
            return;
        }
        let host = namespace_inode();
        for loopback in [true, false] {
            let namespace = NetNamespace::prepare(support.running_as_root, loopback);
            assert_eq!(namespace.report().loopback_up, loopback);
            assert_eq!(namespace.report().user_namespace, !support.running_as_root);
            assert!(in_child(|| namespace.enter().is_ok()
                && namespace_inode() != host
                && loopback_is_up() == loopback));
        }
    }
}
