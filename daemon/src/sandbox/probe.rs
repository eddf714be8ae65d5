//! What the running kernel can enforce, found out once at start-up by asking it.
//!
//! Nothing is inferred from the kernel version or its build config: Raspberry Pi OS, for one,
//! builds Landlock into its kernels but leaves it off the boot-time LSM list, and namespaces can
//! be switched off by sysctls, container runtimes or LSMs (Ubuntu's AppArmor lets unprivileged
//! users create user namespaces but takes away the capabilities inside them). So each feature
//! is exercised: Landlock and seccomp are asked for what they support, and namespaces are
//! created, in a short-lived forked child, by the very steps that [`confine`](super::confine)
//! will run.

use std::ffi::c_void;
use std::fmt;

use serde::Serialize;

use super::netns::NetNamespace;

/// `landlock_create_ruleset` flag asking for the highest supported ABI version.
const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;

/// The sandboxing features of the running kernel, as seen by this process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelSupport {
    /// Highest Landlock ABI version, or `None` when Landlock cannot be used.
    pub landlock_abi: Option<i32>,
    /// Why Landlock cannot be used, when it cannot.
    pub landlock_unavailable: Option<String>,
    /// Whether seccomp filters can be installed (and return errno values).
    pub seccomp: bool,
    /// Whether this process can create a user namespace.
    pub user_namespaces: bool,
    /// Whether a plugin can be given a private network namespace with a working loopback
    /// interface: directly when root, through a user namespace otherwise.
    pub network_namespaces: bool,
    /// Whether phi3d runs as root, in which case plugins drop to an unprivileged uid.
    pub running_as_root: bool,
}

impl KernelSupport {
    /// Asks the kernel. Forks twice for the namespace checks; takes a few milliseconds.
    pub fn probe() -> KernelSupport {
        // SAFETY: geteuid has no preconditions.
        let running_as_root = unsafe { libc::geteuid() } == 0;
        let (landlock_abi, landlock_unavailable) = landlock();
        // SAFETY (both closures): unshare is async-signal-safe, and `enter` only makes system
        // calls on data prepared before the fork.
        let user_namespaces = in_child(|| unsafe { libc::unshare(libc::CLONE_NEWUSER) } == 0);
        let namespace = NetNamespace::prepare(running_as_root, true);
        let network_namespaces = in_child(|| namespace.enter().is_ok());
        KernelSupport {
            landlock_abi,
            landlock_unavailable,
            seccomp: seccomp_filters(),
            user_namespaces,
            network_namespaces,
            running_as_root,
        }
    }
}

/// One line for the start-up log.
impl fmt::Display for KernelSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes_no = |available: bool| if available { "yes" } else { "NO" };
        match (self.landlock_abi, &self.landlock_unavailable) {
            (Some(abi), _) => write!(f, "landlock: ABI {abi}")?,
            (None, Some(why)) => write!(f, "landlock: NO ({why})")?,
            (None, None) => write!(f, "landlock: NO")?,
        }
        write!(
            f,
            ", seccomp filters: {}, user namespaces: {}, network namespaces: {}, ",
            yes_no(self.seccomp),
            yes_no(self.user_namespaces),
            yes_no(self.network_namespaces)
        )?;
        if self.running_as_root {
            write!(f, "running as root (each plugin runs as a uid of its own)")
        } else {
            // SAFETY: geteuid has no preconditions.
            write!(f, "running as uid {} (plugins share it)", unsafe { libc::geteuid() })
        }
    }
}

/// The Landlock ABI version, or why there is none.
fn landlock() -> (Option<i32>, Option<String>) {
    // SAFETY: with a null attribute, size 0 and the version flag the call only returns a number.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if version > 0 {
        // A c_long is 64 bits here but 32 on 32-bit ARM.
        #[allow(clippy::useless_conversion)]
        return (i32::try_from(version).ok(), None);
    }
    let why = match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENOSYS) => "not built into this kernel".to_owned(),
        Some(libc::EOPNOTSUPP) => {
            "built into this kernel but not enabled at boot: add landlock to the lsm= kernel parameter".to_owned()
        }
        errno => format!("landlock_create_ruleset failed ({})", std::io::Error::from_raw_os_error(errno.unwrap_or(0))),
    };
    (None, Some(why))
}

/// Whether seccomp can install filters whose action is an errno: the kernel says so for
/// `SECCOMP_GET_ACTION_AVAIL` (Linux 4.14) only when built with seccomp filters.
fn seccomp_filters() -> bool {
    let action: u32 = libc::SECCOMP_RET_ERRNO;
    // SAFETY: the kernel only reads the u32 behind the pointer.
    let ret = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_GET_ACTION_AVAIL, 0u32, &action as *const u32) };
    ret == 0
}

/// Runs `check` in a forked child, so that whatever it changes (namespaces, above all) dies with
/// the child, and returns whether it returned true.
///
/// `check` runs in the child of a multi-threaded process: it must only make async-signal-safe
/// calls (see [`super::child`]).
pub(super) fn in_child(check: impl Fn() -> bool) -> bool {
    // SAFETY: the child runs only `check`, which the caller vouches for, and then _exit, which
    // skips atexit handlers and stdio buffers that belong to the parent.
    match unsafe { libc::fork() } {
        -1 => false,
        0 => unsafe { libc::_exit(if check() { 0 } else { 1 }) },
        pid => {
            let mut status = 0;
            loop {
                // SAFETY: waits for our own child, writing its status into a local.
                if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
                    return libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
                }
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_is_consistent_and_summarised() {
        let support = KernelSupport::probe();
        eprintln!("kernel support here: {support}");
        assert_eq!(support.landlock_abi.is_none(), support.landlock_unavailable.is_some());
        // SAFETY: geteuid has no preconditions.
        assert_eq!(support.running_as_root, unsafe { libc::geteuid() } == 0);
        if !support.running_as_root {
            // Without root a network namespace is only reachable through a user namespace.
            assert!(support.user_namespaces || !support.network_namespaces);
        }
        let line = support.to_string();
        assert!(line.starts_with("landlock: "), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn in_child_reports_the_childs_answer_and_isolates_it() {
        assert!(in_child(|| true));
        assert!(!in_child(|| false));
        // SAFETY: getpid is async-signal-safe.
        let parent = unsafe { libc::getpid() };
        assert!(in_child(|| unsafe { libc::getpid() } != parent));
    }
}
