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

use std::collections::{BTreeMap, BTreeSet};

use super::child::{StepError, check};
use super::protections::UserProtection;

/// `nobody`: the identity of tests and of a policy that names no plugin.
pub const UNPRIVILEGED_UID: u32 = 65534;
/// The gid that goes with [`UNPRIVILEGED_UID`]: `nogroup`/`nobody`.
pub const UNPRIVILEGED_GID: u32 = 65534;

/// systemd's range for dynamic users (61184–65519): ids no distribution hands to real users.
const DYNAMIC_IDS: std::ops::Range<u32> = 61184..65520;

/// Every uid an allocator of this process has handed out, so that two registries (tests run
/// several side by side) never share one.
static HANDED_OUT: std::sync::Mutex<BTreeSet<u32>> = std::sync::Mutex::new(BTreeSet::new());

/// Hands out the uids (and gids) plugins run as when phi3d is root, one per plugin name: the
/// same for a name as long as the allocator lives (restarts and reloads of the plugin keep it),
/// and never one that another plugin, a user in the user database (systemd's dynamic users
/// included, while they exist) or a live process has. The search starts at a hash of the name
/// (FNV-1a), so a plugin usually gets the same uid across runs of phi3d. Since a uid is the
/// plugin's alone, stopping it may kill every process of that uid ([`super::kill_user`]).
#[derive(Debug, Default)]
pub struct UidAllocator {
    assigned: std::sync::Mutex<BTreeMap<String, u32>>,
}

impl UidAllocator {
    pub fn new() -> Self {
        Self::default()
    }

    /// The uid of the plugin `name`, allocated on first use.
    pub fn uid(&self, name: &str) -> u32 {
        let mut assigned = self.assigned.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(&uid) = assigned.get(name) {
            return uid;
        }
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let live = process_uids();
        let uid = allocate(name, |uid| handed_out.contains(&uid) || live.contains(&uid) || user_exists(uid));
        handed_out.insert(uid);
        assigned.insert(name.to_owned(), uid);
        uid
    }
}

impl Drop for UidAllocator {
    fn drop(&mut self) {
        let assigned = self.assigned.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for uid in assigned.values() {
            handed_out.remove(uid);
        }
    }
}

/// The first id of the dynamic range, from the hash of `name` on, that is not `taken`.
fn allocate(name: &str, taken: impl Fn(u32) -> bool) -> u32 {
    let hash = name.bytes().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193));
    let size = DYNAMIC_IDS.end - DYNAMIC_IDS.start;
    let first = hash % size;
    (0..size)
        .map(|step| DYNAMIC_IDS.start + (first + step) % size)
        .find(|&uid| !taken(uid))
        .unwrap_or(DYNAMIC_IDS.start + first)
}

/// Whether the user database knows `uid` (through NSS, so systemd's live dynamic users too).
fn user_exists(uid: u32) -> bool {
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 4096];
    let mut found = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into the entry and buffer we own, of the sizes given.
    let ret = unsafe { libc::getpwuid_r(uid, &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found) };
    ret == 0 && !found.is_null()
}

/// The uids of every live process.
fn process_uids() -> BTreeSet<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir("/proc") else { return BTreeSet::new() };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_str().is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|entry| entry.metadata().ok().map(|metadata| metadata.uid()))
        .collect()
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
            phi3d_tests::skip(format!("the switch itself: it needs root, and this test runs as uid {}", report.uid));
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
    fn colliding_names_and_ids_in_use_are_skipped() {
        // Two names whose hashes land on the same id get different ids.
        let mut seen = BTreeMap::new();
        let (a, b) = (0..10_000)
            .map(|i| format!("plugin{i}"))
            .find_map(|name| {
                let uid = allocate(&name, |_| false);
                seen.insert(uid, name.clone()).map(|earlier| (earlier, name))
            })
            .expect("10000 names in 4336 ids must collide");
        let allocator = UidAllocator::new();
        let first = allocator.uid(&a);
        let second = allocator.uid(&b);
        assert_ne!(first, second, "{a} and {b}");
        assert_eq!(allocator.uid(&a), first, "stable");
        // Another allocator (another registry) never hands out the same ids.
        let other = UidAllocator::new();
        assert!(![first, second].contains(&other.uid(&a)));
        // An id that a live process or a user has is skipped.
        let hashed = allocate("clock", |_| false);
        assert_ne!(allocate("clock", |uid| uid == hashed), hashed);
        assert!(DYNAMIC_IDS.contains(&allocate("clock", |uid| uid == hashed)));
        assert!(user_exists(0), "root is in the user database");
        // SAFETY: geteuid has no preconditions.
        assert!(process_uids().contains(&unsafe { libc::geteuid() }));
    }

    #[test]
    fn plugins_get_stable_distinct_ids_in_the_dynamic_range() {
        let allocator = UidAllocator::new();
        let clock = allocator.uid("clock");
        assert_eq!(clock, allocator.uid("clock"));
        assert_ne!(clock, allocator.uid("homeassistant"));
        for name in ["clock", "homeassistant", "", "a-very-long-plugin-name"] {
            assert!(DYNAMIC_IDS.contains(&allocator.uid(name)), "{name}");
        }
    }
}
