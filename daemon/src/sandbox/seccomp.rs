//! The seccomp filter: system calls no tool needs fail with EPERM.
//!
//! It is a deny-list, not an allow-list, on purpose: plugins are arbitrary programs (Rust,
//! Python, shell scripts) and must run unchanged, so everything ordinary stays allowed, and what
//! is denied is what lets a process escape or attack the kernel: debugging other processes,
//! mounts, namespaces (also through `clone` flags), kernel modules and kexec, BPF, perf,
//! keyrings, userfaultfd, io_uring (whose operations bypass system-call filtering altogether),
//! setting the clock, and `setsid`/`setpgid`, which would let a child leave the process group
//! the supervisor kills. With [`NetworkPolicy::None`](super::NetworkPolicy::None) sockets are
//! limited to AF_UNIX, which isolates the plugin from the network even without a namespace.
//!
//! `clone3` passes its flags in memory, where a filter cannot look, so it fails with ENOSYS
//! instead: the C library then falls back to `clone`, whose flags are checked. That needs its
//! own filter, as a seccompiler filter has one action for all its matches; the kernel runs
//! every installed filter and the strictest answer wins.
//!
//! The filters are compiled in the parent; the child only installs them, last of all the
//! layers, since the earlier ones use `unshare` themselves. seccompiler's filters kill a process
//! that makes system calls for another architecture (32-bit compat calls), so those cannot be
//! used to slip past the list.

use super::SandboxError;
use super::child::StepError;
use super::protections::SeccompProtection;

/// Compiled filters, ready for the child to install.
pub(super) struct Filters {
    programs: Vec<seccompiler::BpfProgram>,
    report: SeccompProtection,
}

impl Filters {
    pub(super) fn report(&self) -> SeccompProtection {
        self.report.clone()
    }

    /// Installs the filters on the calling process. Runs in the forked child, after
    /// `no_new_privs`, which the kernel requires of an unprivileged caller.
    pub(super) fn apply(&self) -> Result<(), StepError> {
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(|_| StepError::last("installing the seccomp filter"))?;
        }
        Ok(())
    }
}

/// Builds the filters; `None` on an architecture seccompiler cannot target.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(super) fn build(_unix_sockets_only: bool) -> Result<Option<Filters>, SandboxError> {
    Ok(None)
}

/// Builds the filters; `None` on an architecture seccompiler cannot target.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(super) fn build(unix_sockets_only: bool) -> Result<Option<Filters>, SandboxError> {
    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };

    let unconditional = COMMON_DENIED.iter().chain(arch::DENIED);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = unconditional.clone().map(|&(_, nr)| (nr, Vec::new())).collect();
    let mut denied: Vec<&'static str> = unconditional.map(|&(name, _)| name).collect();

    // One rule per flag, since a rule can only test masked bits for equality: any one of them
    // set makes the call fail. The flags are the first argument on both architectures.
    let namespace_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, namespace_rules);
    denied.push("clone with namespace flags");

    if unix_sockets_only {
        let not_unix = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?;
        rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![not_unix])?]);
        denied.push("socket other than AF_UNIX");
    }

    let deny = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch::TARGET)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch::TARGET,
    )?;
    denied.push("clone3 (fails with ENOSYS, so that libc falls back to clone)");
    let mut programs = vec![BpfProgram::try_from(deny)?, BpfProgram::try_from(clone3)?];
    programs.extend(arch::extra_programs());
    denied.extend(arch::EXTRA_DENIED);
    Ok(Some(Filters { programs, report: SeccompProtection { denied, unix_sockets_only } }))
}

/// The `clone` flags that create namespaces. CLONE_NEWTIME is not among them: `clone` rejects
/// it anyway, and its bit is part of the exit-signal byte there.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

/// System calls denied on both architectures, whatever their arguments.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const COMMON_DENIED: &[(&str, libc::c_long)] = &[
    // Reading or changing other processes.
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    // Mounts, through the old API and the new one, and changing the root.
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    // Namespaces.
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    // Leaving the process group that the supervisor kills.
    ("setsid", libc::SYS_setsid),
    ("setpgid", libc::SYS_setpgid),
    // Changing the kernel or the machine.
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    // Kernel attack surface that no tool needs.
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("personality", libc::SYS_personality),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("syslog", libc::SYS_syslog),
    // io_uring performs operations without system calls, out of this filter's sight.
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
];

#[cfg(target_arch = "aarch64")]
mod arch {
    use seccompiler::{BpfProgram, TargetArch};

    pub(super) const TARGET: TargetArch = TargetArch::aarch64;

    pub(super) const DENIED: &[(&str, libc::c_long)] = &[];

    pub(super) const EXTRA_DENIED: &[&str] = &[];

    pub(super) fn extra_programs() -> Vec<BpfProgram> {
        Vec::new()
    }
}

#[cfg(target_arch = "x86_64")]
mod arch {
    use seccompiler::{BpfProgram, TargetArch, sock_filter};

    pub(super) const TARGET: TargetArch = TargetArch::x86_64;

    /// Direct access to I/O ports.
    pub(super) const DENIED: &[(&str, libc::c_long)] = &[("iopl", libc::SYS_iopl), ("ioperm", libc::SYS_ioperm)];

    pub(super) const EXTRA_DENIED: &[&str] = &["x32 system calls"];

    /// x32 system calls carry the x86_64 architecture tag but have bit 30 set in their number,
    /// so a deny-list of x86_64 numbers would not match them. Kernels built without x32 fail
    /// them anyway; this makes sure of it.
    pub(super) fn extra_programs() -> Vec<BpfProgram> {
        const X32_SYSCALL_BIT: u32 = 0x4000_0000;
        let instruction = |code: u32, jt: u8, jf: u8, k: u32| sock_filter { code: code as u16, jt, jf, k };
        vec![vec![
            // Load the system call number, the first field of struct seccomp_data.
            instruction(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
            instruction(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, 0, 1, X32_SYSCALL_BIT),
            instruction(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
            instruction(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        ]]
    }
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::super::identity::set_no_new_privs;
    use super::super::probe::{KernelSupport, in_child};
    use super::*;

    /// The errno of a raw system call that is expected to fail, or 0 if it succeeded.
    fn errno_of(ret: libc::c_long) -> i32 {
        // SAFETY: reads this thread's errno.
        if ret < 0 { unsafe { *libc::__errno_location() } } else { 0 }
    }

    #[test]
    fn report_names_what_is_denied() {
        let filters = build(true).unwrap().unwrap();
        let report = filters.report();
        for name in
            ["ptrace", "mount", "unshare", "setsid", "setpgid", "bpf", "io_uring_setup", "clone with namespace flags"]
        {
            assert!(report.denied.contains(&name), "{name} missing from {:?}", report.denied);
        }
        assert!(report.unix_sockets_only);
        assert!(!build(false).unwrap().unwrap().report().unix_sockets_only);
    }

    #[test]
    fn denied_calls_fail_in_the_child_and_ordinary_ones_work() {
        if !KernelSupport::probe().seccomp {
            eprintln!("SKIPPED: this kernel has no seccomp filters");
            return;
        }
        let filters = build(true).unwrap().unwrap();
        // SAFETY (child): raw system calls only. The calls that are expected to fail would,
        // should they succeed, only change the throwaway child (a new user namespace, its own
        // session), except clone and fork, whose children exit at once.
        assert!(in_child(|| unsafe {
            if set_no_new_privs().is_err() || filters.apply().is_err() {
                return false;
            }
            let fork_works = match libc::fork() {
                0 => libc::_exit(0),
                pid if pid > 0 => {
                    let mut status = 0;
                    libc::waitpid(pid, &mut status, 0) == pid && libc::WIFEXITED(status)
                }
                _ => false,
            };
            let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
            let cloned = libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0);
            if cloned == 0 {
                libc::_exit(0);
            }
            let clone_newuser = errno_of(cloned);
            let unix = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            fork_works
                && unix >= 0
                && errno_of(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER)) == libc::EPERM
                && errno_of(libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0)) == libc::EPERM
                && errno_of(libc::syscall(libc::SYS_setpgid, 0, 0)) == libc::EPERM
                && errno_of(libc::syscall(libc::SYS_clone3, std::ptr::null::<libc::c_void>(), 0)) == libc::ENOSYS
                && clone_newuser == libc::EPERM
                && errno_of(libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0)) == libc::EPERM
        }));
    }
}
