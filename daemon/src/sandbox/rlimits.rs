//! Resource limits: the one layer every kernel has, so it bounds a plugin even where nothing
//! else can be enforced.
//!
//! Each limit is set as both soft and hard limit, so the plugin cannot raise it again, except
//! CPU time: its hard limit is one second above the soft one, so that a plugin first gets
//! SIGXCPU (a clear cause of death) and SIGKILL only if it ignores that. A limit above phi3d's
//! own hard limit could not be set without privileges, so it is lowered to that, and the
//! report says what is really in effect.

use super::child::{StepError, check};
use super::policy::Confinement;
use super::protections::Rlimit;

/// The type of the resource argument of `setrlimit`, which glibc and musl spell differently.
#[cfg(target_env = "gnu")]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type Resource = libc::c_int;

/// The limited resources and their names, in the order [`Limits`] keeps their values.
const RESOURCES: [(Resource, &str); 6] = [
    (libc::RLIMIT_AS, "address space"),
    (libc::RLIMIT_CPU, "CPU time"),
    (libc::RLIMIT_NPROC, "processes"),
    (libc::RLIMIT_NOFILE, "open files"),
    (libc::RLIMIT_FSIZE, "file size"),
    (libc::RLIMIT_CORE, "core dump size"),
];

/// The limits, in the order of [`RESOURCES`], prepared in the parent.
pub(super) struct Limits {
    values: [libc::rlimit; 6],
}

impl Limits {
    pub(super) fn prepare(confinement: &Confinement) -> Limits {
        let wanted = [
            (confinement.memory_bytes, confinement.memory_bytes),
            (confinement.cpu_seconds, confinement.cpu_seconds.saturating_add(1)),
            (confinement.max_processes, confinement.max_processes),
            (confinement.max_open_files, confinement.max_open_files),
            (confinement.max_file_bytes, confinement.max_file_bytes),
            (0, 0),
        ];
        let values = std::array::from_fn(|i| {
            let (soft, hard) = wanted[i];
            let hard = to_rlim(hard).min(current_hard_limit(RESOURCES[i].0));
            libc::rlimit { rlim_cur: to_rlim(soft).min(hard), rlim_max: hard }
        });
        Limits { values }
    }

    // rlim_t is u64 here but u32 on 32-bit ARM.
    #[allow(clippy::useless_conversion)]
    pub(super) fn report(&self) -> Vec<Rlimit> {
        self.values
            .iter()
            .zip(RESOURCES)
            .map(|(value, (_, name))| Rlimit { resource: name, value: value.rlim_cur.into() })
            .collect()
    }

    /// Sets the limits on the calling process. Runs in the forked child.
    pub(super) fn apply(&self) -> Result<(), StepError> {
        for (value, (resource, _)) in self.values.iter().zip(RESOURCES) {
            // SAFETY: setrlimit reads the rlimit it is given and changes only this process.
            check(unsafe { libc::setrlimit(resource, value) }, "setrlimit")?;
        }
        Ok(())
    }
}

/// `value` as an rlim_t, which is 32 bits on 32-bit ARM: a larger value means no limit there.
fn to_rlim(value: u64) -> libc::rlim_t {
    libc::rlim_t::try_from(value).unwrap_or(libc::RLIM_INFINITY)
}

/// phi3d's own hard limit for `resource`: unprivileged, the child cannot go above it.
fn current_hard_limit(resource: Resource) -> libc::rlim_t {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: getrlimit writes into the local it is given.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
        return libc::RLIM_INFINITY;
    }
    limit.rlim_max
}

#[cfg(test)]
mod tests {
    use super::super::policy::NetworkPolicy;
    use super::super::probe::in_child;
    use super::*;

    fn confinement() -> Confinement {
        Confinement {
            read_paths: Vec::new(),
            write_paths: Vec::new(),
            network: NetworkPolicy::None,
            unix_sockets: Vec::new(),
            memory_bytes: 256 << 20,
            cpu_seconds: 5,
            max_processes: 8,
            max_open_files: 32,
            max_file_bytes: 1 << 20,
        }
    }

    #[test]
    fn limits_are_hard_except_cpu_which_leaves_room_for_sigxcpu() {
        let limits = Limits::prepare(&confinement());
        let by_name = |name: &str| limits.values[RESOURCES.iter().position(|(_, n)| *n == name).unwrap()];
        assert_eq!(by_name("CPU time").rlim_cur, 5);
        assert_eq!(by_name("CPU time").rlim_max, 6.min(current_hard_limit(libc::RLIMIT_CPU)));
        assert_eq!(by_name("core dump size").rlim_max, 0);
        let reported: Vec<(&str, u64)> = limits.report().iter().map(|r| (r.resource, r.value)).collect();
        assert_eq!(
            reported,
            [
                ("address space", 256 << 20),
                ("CPU time", 5),
                ("processes", 8),
                ("open files", 32),
                ("file size", 1 << 20),
                ("core dump size", 0)
            ]
        );
    }

    #[test]
    fn limits_never_exceed_phi3ds_own_hard_limits() {
        let mut confinement = confinement();
        confinement.max_open_files = u64::MAX;
        let limits = Limits::prepare(&confinement);
        assert_eq!(limits.values[3].rlim_max, current_hard_limit(libc::RLIMIT_NOFILE));
    }

    #[test]
    fn apply_sets_them_in_the_child() {
        let limits = Limits::prepare(&confinement());
        // SAFETY (child): setrlimit and getrlimit only.
        assert!(in_child(|| {
            let mut nofile = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            limits.apply().is_ok()
                && unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) } == 0
                && nofile.rlim_cur == 32
                && nofile.rlim_max == 32
        }));
    }
}
