//! Confinement of plugin processes: what the kernel offers ([`KernelSupport`]), what a plugin
//! may do ([`Confinement`], spawned under a [`Policy`]), and [`confine`], which sets up a
//! `tokio::process::Command` so that the child is locked down before it execs the plugin.
//!
//! The layers, each in its own module, and the order the child applies them in:
//!
//! 1. [`rlimits`]: address space, CPU time, processes, open files, file size, no core dumps;
//!    then every descriptor but the three pipes is marked close-on-exec.
//! 2. [`netns`]: a private network namespace when the plugin needs no network or only
//!    loopback, with `lo` brought up for the latter.
//! 3. [`identity`]: when phi3d is root, the plugin drops to a uid of its own (after the namespace, which
//!    needed root); then the parent-death signal (SIGKILL when phi3d dies; the switch clears
//!    it, so it comes after) and `no_new_privs`, which Landlock and seccomp both require.
//! 4. [`landlock_rules`]: the filesystem (and, from Landlock ABI 4, TCP) allow-list.
//! 5. [`seccomp`]: a deny-list of system calls no tool needs, installed last so that the steps
//!    above may still use `unshare` and friends.
//!
//! Outside the child: [`reaper`] kills what plugins forked when phi3d dies without stopping
//! them, [`kill_user`] kills every process of a plugin's own uid, and [`harden_daemon`] makes
//! phi3d itself non-dumpable.
//!
//! The parent-death signal fires when the *thread* that spawned the plugin exits; plugins are
//! spawned from the runtime's worker threads, which live as long as phi3d.
//!
//! Everything is built in the parent; the child only makes system calls (see [`child`]). A
//! step that fails in the child makes `spawn` fail, so a plugin never runs with less than the
//! [`Protections`] that `confine` returned.

mod child;
mod identity;
mod landlock_rules;
mod netns;
mod policy;
mod probe;
mod protections;
mod reaper;
mod rlimits;
mod seccomp;
#[cfg(test)]
mod tests;

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::process::Command;

pub use identity::{UNPRIVILEGED_GID, UNPRIVILEGED_UID, UidAllocator};
pub use policy::{Confinement, HostPort, NetworkPolicy, Policy, Requirement};
pub use probe::KernelSupport;
pub use reaper::{forget_group, watch_group};
pub use protections::{
    LandlockProtection, NamespaceProtection, Protections, Rlimit, SeccompProtection, UserProtection,
};

/// The `PATH` a plugin gets when its policy sets none: enough to find the usual tools, and
/// nothing under a user's home or `/usr/local`.
pub const DEFAULT_PATH: &str = "/usr/bin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the kernel cannot give {}", .0.join("; "))]
    Unavailable(Vec<String>),
    #[error("cannot open {} for the sandbox rules: {source}", path.display())]
    Path { path: PathBuf, source: io::Error },
    #[error("cannot find the executable {} (looked in PATH={path})", program.display())]
    Executable { program: PathBuf, path: String },
    #[error("invalid environment variable name {0:?}")]
    EnvName(String),
    #[error("building the Landlock ruleset failed: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("building the seccomp filter failed: {0}")]
    Seccomp(#[from] seccompiler::BackendError),
}

/// Sets `command` up to run confined by `policy`, as far as `support` says the kernel can.
///
/// The environment is replaced by the policy's (plus `PATH`=[`DEFAULT_PATH`] if it sets none),
/// the child gets its own process group (see [`kill_group`]) and is killed when its handle is
/// dropped, and the layers listed in the module documentation are applied between fork and
/// exec. With [`Requirement::Strict`] anything the policy implies but the kernel cannot give is
/// an error naming it and `command` is left untouched; with [`Requirement::BestEffort`] it is
/// listed in [`Protections::missing`] for the caller to warn about.
pub fn confine(
    command: &mut Command,
    policy: &Policy,
    support: &KernelSupport,
    requirement: Requirement,
) -> Result<Protections, SandboxError> {
    let env = environment(policy)?;
    let search_path = env.iter().find(|(name, _)| name == "PATH").map_or(DEFAULT_PATH, |(_, value)| value.as_str());
    let executable = resolve_executable(command.as_std(), search_path)?;
    let mut missing = Vec::new();
    let confinement = &policy.confinement;

    let limits = rlimits::Limits::prepare(confinement);
    let identity = identity::Identity::prepare(support.running_as_root, policy.run_as);

    let wants_namespace = matches!(confinement.network, NetworkPolicy::None | NetworkPolicy::Loopback);
    let namespace = (wants_namespace && support.network_namespaces).then(|| {
        netns::NetNamespace::prepare(support.running_as_root, confinement.network == NetworkPolicy::Loopback)
    });

    let landlock = match support.landlock_abi {
        Some(abi) => Some(landlock_rules::prepare(confinement, abi, &executable)?),
        None => {
            let why = support.landlock_unavailable.as_deref().unwrap_or("unavailable");
            missing.push(format!("filesystem confinement (Landlock: {why})"));
            None
        }
    };

    let scoped = landlock.as_ref().is_some_and(|(_, report)| report.scoped);
    let options = seccomp::Options {
        network_sockets: confinement.network != NetworkPolicy::None,
        unix_sockets: !confinement.unix_sockets.is_empty(),
        // With a uid of its own the kernel already keeps the plugin from signalling phi3d or
        // other plugins, and so does Landlock's signal scoping (ABI 6).
        own_signals_only: !support.running_as_root && !scoped,
    };
    let seccomp = if !support.seccomp {
        missing.push("system call filtering (the kernel has no seccomp filters)".to_owned());
        None
    } else {
        match seccomp::build(options)? {
            Some(filters) => Some(filters),
            None => {
                missing.push(format!("system call filtering (no seccomp filter for {})", std::env::consts::ARCH));
                None
            }
        }
    };
    if seccomp.is_none() {
        missing.push("blocking the host's Unix sockets and executable memory files (needs seccomp)".to_owned());
        if options.own_signals_only {
            missing.push(
                "signal isolation: the plugin shares phi3d's uid and could signal phi3d and other plugins \
                 (needs seccomp, Landlock ABI 6 or phi3d running as root)"
                    .to_owned(),
            );
        }
    }
    if !confinement.unix_sockets.is_empty() {
        missing.push(
            "limiting Unix sockets to the listed paths (the kernel cannot filter connect() by path: \
             any Unix socket the plugin can name is reachable)"
                .to_owned(),
        );
    }

    let tcp_ports_filtered = landlock.as_ref().is_some_and(|(_, report)| report.tcp_connect_ports.is_some());
    match &confinement.network {
        NetworkPolicy::None if namespace.is_none() && seccomp.is_none() => missing.push(
            "network isolation (no network namespace and no seccomp; Landlock alone would block only TCP)".to_owned(),
        ),
        NetworkPolicy::Loopback if namespace.is_none() => {
            missing.push("loopback-only network (needs a network namespace)".to_owned())
        }
        NetworkPolicy::Connect(_) if !tcp_ports_filtered => {
            let abi = support.landlock_abi.map_or_else(|| "none".to_owned(), |abi| abi.to_string());
            missing.push(format!("TCP port filtering (needs Landlock ABI 4 or later; the kernel has {abi})"))
        }
        _ => {}
    }

    if requirement == Requirement::Strict && !missing.is_empty() {
        return Err(SandboxError::Unavailable(missing));
    }

    let protections = Protections {
        no_new_privs: true,
        env_scrubbed: true,
        env_vars: env.iter().map(|(name, _)| name.clone()).collect(),
        own_process_group: true,
        rlimits: limits.report(),
        user: identity.report(),
        landlock: landlock.as_ref().map(|(_, report)| report.clone()),
        seccomp: seccomp.as_ref().map(seccomp::Filters::report),
        network_namespace: namespace.as_ref().map(netns::NetNamespace::report),
        missing,
    };

    command.env_clear().envs(env).process_group(0).kill_on_drop(true);
    let mut steps = ChildSteps {
        parent: std::process::id() as libc::pid_t,
        limits,
        namespace,
        identity,
        landlock: landlock.map(|(rules, _)| rules),
        seccomp,
    };
    // SAFETY: `ChildSteps::run` only makes async-signal-safe system calls on data prepared
    // above; it allocates nothing and takes no locks (see `child`).
    unsafe {
        command.pre_exec(move || steps.run());
    }
    Ok(protections)
}

/// Makes phi3d itself harder to reach for plugins that share its uid: not dumpable, so that
/// its /proc files (`environ`, which may hold `HF_TOKEN`, and `mem`) belong to root and no
/// process of its uid may ptrace it. Call it once, early in `serve`.
pub fn harden_daemon() {
    // SAFETY: prctl only changes a flag of the calling process.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot make phi3d non-dumpable");
    }
}

/// SIGKILLs every process in the group `pgid`: a plugin and whatever it left running.
///
/// Call it before the group leader is reaped, or while other members may still be alive: once
/// the whole group is gone its id can be reused. Refuses (and logs) ids that would hit phi3d
/// itself or everything (0, 1, negative, phi3d's own group).
pub fn kill_group(pgid: i32) {
    // SAFETY: getpgrp has no preconditions.
    if pgid <= 1 || pgid == unsafe { libc::getpgrp() } {
        tracing::error!(pgid, "refusing to kill this process group: it is not a plugin's");
        return;
    }
    // SAFETY: killpg only sends a signal.
    if unsafe { libc::killpg(pgid, libc::SIGKILL) } != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, %error, "killing the plugin's process group failed");
        }
    }
}

/// SIGKILLs every process of `uid`: what a plugin running as a uid of its own left anywhere.
///
/// Only for a uid that a [`UidAllocator`] gave one plugin, and only when phi3d is root; refuses
/// (and logs) root, `nobody` and phi3d's own uid. A forked child takes the uid and sends
/// `kill(-1, SIGKILL)`, which reaches exactly that uid's processes.
pub fn kill_user(uid: u32) {
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    if uid == 0 || uid == UNPRIVILEGED_UID || uid == own || own != 0 {
        tracing::error!(uid, "refusing to kill every process of this uid: it is not a plugin's own");
        return;
    }
    // SAFETY (child): credential calls and kill only, on plain integers.
    let killed = probe::in_child(|| unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setresgid(uid, uid, uid) == 0
            && libc::setresuid(uid, uid, uid) == 0
            && (libc::kill(-1, libc::SIGKILL) == 0 || *libc::__errno_location() == libc::ESRCH)
    });
    if !killed {
        tracing::warn!(uid, "killing the processes of the plugin's uid failed");
    }
}

/// The layers the child applies, in order, between fork and exec.
struct ChildSteps {
    /// phi3d's pid, to check that it is still the parent once the parent-death signal is set.
    parent: libc::pid_t,
    limits: rlimits::Limits,
    namespace: Option<netns::NetNamespace>,
    identity: identity::Identity,
    landlock: Option<landlock_rules::Rules>,
    seccomp: Option<seccomp::Filters>,
}

impl ChildSteps {
    fn run(&mut self) -> io::Result<()> {
        let result = (|| {
            // phi3d itself is not dumpable (see `harden_daemon`), which its forks inherit until
            // they exec; the child must own its /proc files to write its id maps.
            // SAFETY: prctl only changes a flag of the calling process.
            child::check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) }, "prctl(PR_SET_DUMPABLE)")?;
            self.limits.apply()?;
            close_inherited_descriptors()?;
            if let Some(namespace) = &self.namespace {
                namespace.enter()?;
            }
            self.identity.apply()?;
            // After the identity switch, which clears it: the plugin is SIGKILLed when phi3d
            // dies, however it dies. Should phi3d have died already, the child gives up here.
            // SAFETY: prctl and getppid only concern the calling process.
            child::check(
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) },
                "prctl(PR_SET_PDEATHSIG)",
            )?;
            if unsafe { libc::getppid() } != self.parent {
                return Err(child::StepError::last("checking that phi3d is still running"));
            }
            identity::set_no_new_privs()?;
            if let Some(landlock) = &self.landlock {
                landlock.restrict()?;
            }
            if let Some(seccomp) = &mut self.seccomp {
                seccomp.apply()?;
            }
            Ok(())
        })();
        result.map_err(child::StepError::into_io)
    }
}

/// Marks every descriptor above stderr close-on-exec, so that the plugin gets only its three
/// pipes and none of what phi3d itself inherited (a service manager's sockets, a lock file).
/// Marked rather than closed: the standard library reports a failed exec through a descriptor
/// of its own, which must stay open until the exec. Runs in the forked child.
fn close_inherited_descriptors() -> Result<(), child::StepError> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only changes the calling process's descriptor flags (Linux 5.11).
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) } == 0 {
        return Ok(());
    }
    // Older kernels: one descriptor at a time, up to the limit rlimits just set.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the local; fcntl only changes descriptor flags.
    unsafe {
        child::check(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), "getrlimit(RLIMIT_NOFILE)")?;
        for fd in 3..limit.rlim_cur.min(1 << 16) as libc::c_int {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

/// The policy's environment plus the default `PATH`, with names the kernel would mangle refused.
fn environment(policy: &Policy) -> Result<Vec<(String, String)>, SandboxError> {
    let mut env = policy.env.clone();
    if let Some((name, _)) =
        env.iter().find(|(name, value)| name.is_empty() || name.contains(['=', '\0']) || value.contains('\0'))
    {
        return Err(SandboxError::EnvName(name.clone()));
    }
    if !env.iter().any(|(name, _)| name == "PATH") {
        env.push(("PATH".to_owned(), DEFAULT_PATH.to_owned()));
    }
    Ok(env)
}

/// The file `command` will exec, found the way `execvp` will find it, so that Landlock can
/// allow executing exactly that file.
fn resolve_executable(command: &std::process::Command, search_path: &str) -> Result<PathBuf, SandboxError> {
    let program = Path::new(command.get_program());
    let not_found = || SandboxError::Executable { program: program.to_owned(), path: search_path.to_owned() };
    let candidate = if program.as_os_str().as_bytes().contains(&b'/') {
        match command.get_current_dir() {
            Some(dir) if program.is_relative() => dir.join(program),
            _ => program.to_owned(),
        }
    } else {
        std::env::split_paths(OsStr::new(search_path))
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
            .ok_or_else(not_found)?
    };
    candidate.canonicalize().map_err(|_| not_found())
}
