//! Who the plugin runs as, and `no_new_privs`.
//!
//! A plugin never runs as root. When phi3d is root, the child drops every supplementary group
//! and switches to a uid of its own ([`plugin_uid`]); besides taking away root's access to every
//! file, this is what makes RLIMIT_NPROC bite, since the kernel never applies it to root, and
//! the uid being the plugin's own is what keeps one plugin's processes from counting against
//! another's limit. When phi3d is not root the plugin keeps phi3d's uid (it could not switch),
//! and RLIMIT_NPROC then also counts phi3d's own threads.
//!
//! `no_new_privs` keeps setuid binaries and file capabilities from granting the plugin anything
//! on exec, and is what lets an unprivileged process install Landlock and seccomp filters.

use super::child::{StepError, check};
use super::protections::UserProtection;

/// `nobody`: the identity of tests and of a policy that names no plugin.
pub const UNPRIVILEGED_UID: u32 = 65534;
/// The gid that goes with [`UNPRIVILEGED_UID`]: `nogroup`/`nobody`.
pub const UNPRIVILEGED_GID: u32 = 65534;

/// systemd's range for dynamic users (61184–65519): ids no distribution hands to real users.
const DYNAMIC_IDS: std::ops::Range<u32> = 61184..65520;

/// The uid (and gid) the plugin `name` runs as when phi3d is root: stable across restarts and
/// different for different names (FNV-1a over the name), so that the kernel's per-uid process
/// count is the plugin's own.
pub fn plugin_uid(name: &str) -> u32 {
    let hash = name.bytes().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193));
    DYNAMIC_IDS.start + hash % (DYNAMIC_IDS.end - DYNAMIC_IDS.start)
}

/// The identity switch to make in the child, if any.
pub(super) struct Identity {
    /// `Some((uid, gid))` when phi3d is root and the child must switch.
    switch_to: Option<(libc::uid_t, libc::gid_t)>,
}

impl Identity {
    pub(super) fn prepare(running_as_root: bool, run_as: u32) -> Identity {
        Identity { switch_to: running_as_root.then_some((run_as, run_as)) }
    }

    pub(super) fn report(&self) -> UserProtection {
        match self.switch_to {
            Some((uid, gid)) => UserProtection { uid, gid, switched_from_root: true },
            // SAFETY: geteuid and getegid have no preconditions.
            None => unsafe { UserProtection { uid: libc::geteuid(), gid: libc::getegid(), switched_from_root: false } },
        }
    }

    /// Switches to the unprivileged identity, for good: real, effective and saved ids alike.
    /// Runs in the forked child.
    pub(super) fn apply(&self) -> Result<(), StepError> {
        let Some((uid, gid)) = self.switch_to else { return Ok(()) };
        // SAFETY: these calls only change the credentials of the calling process, which is the
        // single-threaded child, so glibc's all-threads credential broadcast has one thread to do.
        unsafe {
            check(libc::setgroups(0, std::ptr::null()), "setgroups([])")?;
            // The gid first: once the uid is not root, the gid can no longer be changed.
            check(libc::setresgid(gid, gid, gid), "setresgid(plugin gid)")?;
            check(libc::setresuid(uid, uid, uid), "setresuid(plugin uid)")
        }
    }
}

/// Sets `no_new_privs` on the calling process. Runs in the forked child.
pub(super) fn set_no_new_privs() -> Result<(), StepError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS only sets a flag on the calling process.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, "prctl(PR_SET_NO_NEW_PRIVS)")
}

#[cfg(test)]
mod tests {
    use super::super::probe::in_child;
    use super::*;

    #[test]
    fn root_switches_to_nobody_for_good_and_others_stay() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let identity = Identity::prepare(root, UNPRIVILEGED_UID);
        let report = identity.report();
        assert_eq!(report.switched_from_root, root);
        if !root {
            eprintln!("SKIPPED the switch itself: it needs root, and this test runs as uid {}", report.uid);
            assert!(identity.apply().is_ok());
            return;
        }
        assert_eq!((report.uid, report.gid), (UNPRIVILEGED_UID, UNPRIVILEGED_GID));
        // SAFETY (child): only credential system calls, no allocation.
        assert!(in_child(|| unsafe {
            let mut groups = [0 as libc::gid_t; 4];
            identity.apply().is_ok()
                && libc::getuid() == UNPRIVILEGED_UID
                && libc::geteuid() == UNPRIVILEGED_UID
                && libc::getgid() == UNPRIVILEGED_GID
                && libc::getgroups(4, groups.as_mut_ptr()) == 0
                // No way back: setuid(0) must fail now.
                && libc::setuid(0) != 0
        }));
    }

    #[test]
    fn no_new_privs_is_set() {
        // SAFETY (child): prctl only.
        assert!(in_child(
            || set_no_new_privs().is_ok() && unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } == 1
        ));
    }

    #[test]
    fn plugins_get_stable_distinct_ids_in_the_dynamic_range() {
        let clock = plugin_uid("clock");
        assert_eq!(clock, plugin_uid("clock"));
        assert_ne!(clock, plugin_uid("homeassistant"));
        for name in ["clock", "homeassistant", "", "a-very-long-plugin-name"] {
            assert!(DYNAMIC_IDS.contains(&plugin_uid(name)), "{name}");
        }
    }
}
