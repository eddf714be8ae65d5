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

/// What the filter allows beyond its fixed deny-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Options {
    /// Sockets of families other than AF_UNIX (the plugin has some network).
    pub(super) network_sockets: bool,
    /// AF_UNIX sockets made with `socket` (the manifest names Unix socket paths). `socketpair`
    /// is always allowed: it connects nothing outside the plugin.
    pub(super) unix_sockets: bool,
    /// Signals only to the plugin itself (`kill(0, ..)`, its own pid and process group, its own
    /// threads): for plugins that share phi3d's uid on kernels without Landlock signal scoping.
    pub(super) own_signals_only: bool,
}

/// Stands in the compiled filter for the plugin's pid, which is only known in the child.
const SELF_PID: u32 = 0x7e57_0001;
/// Stands in the compiled filter for minus the plugin's pid (its process group, for `kill`).
const MINUS_SELF_PID: u32 = 0x7e57_0002;

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
    /// `no_new_privs`, which the kernel requires of an unprivileged caller. The placeholders for
    /// the child's own pid are filled in first, in place (no allocation).
    pub(super) fn apply(&mut self) -> Result<(), StepError> {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() } as u32;
        for program in &mut self.programs {
            for instruction in program.iter_mut() {
                if instruction.code == (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16 {
                    if instruction.k == SELF_PID {
                        instruction.k = pid;
                    } else if instruction.k == MINUS_SELF_PID {
                        instruction.k = pid.wrapping_neg();
                    }
                }
            }
            seccompiler::apply_filter(program).map_err(|_| StepError::last("installing the seccomp filter"))?;
        }
        Ok(())
    }
}

/// Builds the filters; `None` on an architecture seccompiler cannot target.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(super) fn build(_options: Options) -> Result<Option<Filters>, SandboxError> {
    Ok(None)
}

/// Builds the filters; `None` on an architecture seccompiler cannot target.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(super) fn build(options: Options) -> Result<Option<Filters>, SandboxError> {
    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };

    let unconditional = COMMON_DENIED.iter().chain(arch::DENIED);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = unconditional.clone().map(|&(_, nr)| (nr, Vec::new())).collect();
    let mut denied: Vec<&'static str> = unconditional.map(|&(name, _)| name).collect();
    let dword = |arg: u8, op: SeccompCmpOp, value: u32| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, u64::from(value))
    };

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

    // Sockets. A network namespace isolates abstract Unix sockets but not the host's socket
    // files, and Landlock does not stop connect() on those; so `socket(AF_UNIX)` is refused
    // unless the manifest asks for Unix sockets. `socketpair` stays allowed.
    let af_unix = libc::AF_UNIX as u32;
    match (options.network_sockets, options.unix_sockets) {
        (false, false) => {
            rules.insert(libc::SYS_socket, Vec::new());
            denied.push("socket (socketpair still works)");
        }
        (false, true) => {
            rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![dword(0, SeccompCmpOp::Ne, af_unix)?])?]);
            denied.push("socket other than AF_UNIX");
        }
        (true, false) => {
            rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![dword(0, SeccompCmpOp::Eq, af_unix)?])?]);
            denied.push("socket(AF_UNIX) (socketpair still works)");
        }
        (true, true) => {}
    }

    // Write, never execute: a memory file must be sealed non-executable from the start, and
    // nothing may be executed through a bare file descriptor.
    let noexec_seal: u32 = libc::MFD_NOEXEC_SEAL;
    let not_sealed = dword(1, SeccompCmpOp::MaskedEq(u64::from(noexec_seal)), 0)?;
    rules.insert(libc::SYS_memfd_create, vec![SeccompRule::new(vec![not_sealed])?]);
    denied.push("memfd_create without MFD_NOEXEC_SEAL");
    let empty_path = libc::AT_EMPTY_PATH as u32;
    let by_fd = dword(4, SeccompCmpOp::MaskedEq(u64::from(empty_path)), empty_path)?;
    rules.insert(libc::SYS_execveat, vec![SeccompRule::new(vec![by_fd])?]);
    denied.push("execveat of a file descriptor (AT_EMPTY_PATH)");

    if options.own_signals_only {
        let not_self = || dword(0, SeccompCmpOp::Ne, SELF_PID);
        rules.insert(
            libc::SYS_kill,
            vec![SeccompRule::new(vec![
                dword(0, SeccompCmpOp::Ne, 0)?,
                not_self()?,
                dword(0, SeccompCmpOp::Ne, MINUS_SELF_PID)?,
            ])?],
        );
        for nr in [libc::SYS_tgkill, libc::SYS_tkill, libc::SYS_rt_sigqueueinfo, libc::SYS_rt_tgsigqueueinfo, libc::SYS_pidfd_open] {
            rules.insert(nr, vec![SeccompRule::new(vec![not_self()?])?]);
        }
        denied.push("signals to any process but the plugin itself and its process group");
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
    let report = SeccompProtection {
        denied,
        network_sockets: options.network_sockets,
        unix_sockets: options.unix_sockets,
        own_signals_only: options.own_signals_only,
    };
    Ok(Some(Filters { programs, report }))
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

    const NO_NETWORK: Options = Options { network_sockets: false, unix_sockets: false, own_signals_only: false };

    #[test]
    fn report_names_what_is_denied() {
        let filters = build(NO_NETWORK).unwrap().unwrap();
        let report = filters.report();
        for name in [
            "ptrace",
            "mount",
            "unshare",
            "setsid",
            "setpgid",
            "bpf",
            "io_uring_setup",
            "clone with namespace flags",
            "socket (socketpair still works)",
            "memfd_create without MFD_NOEXEC_SEAL",
            "execveat of a file descriptor (AT_EMPTY_PATH)",
        ] {
            assert!(report.denied.contains(&name), "{name} missing from {:?}", report.denied);
        }
        assert!(!report.network_sockets && !report.unix_sockets && !report.own_signals_only);
        let network = build(Options { network_sockets: true, ..NO_NETWORK }).unwrap().unwrap().report();
        assert!(network.denied.contains(&"socket(AF_UNIX) (socketpair still works)"), "{:?}", network.denied);
        let signals = build(Options { own_signals_only: true, ..NO_NETWORK }).unwrap().unwrap().report();
        assert!(signals.own_signals_only);
    }

    /// Installs `filters` in a forked child and runs `check` there.
    fn confined_child(filters: Filters, check: impl Fn() -> bool) -> bool {
        let filters = std::cell::RefCell::new(filters);
        in_child(move || set_no_new_privs().is_ok() && filters.borrow_mut().apply().is_ok() && check())
    }

    fn unix_socket_at(path: &std::ffi::CStr) -> (i32, i32) {
        // SAFETY: raw socket calls on a local address structure.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return (fd, errno_of(fd as libc::c_long));
            }
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (slot, byte) in addr.sun_path.iter_mut().zip(path.to_bytes()) {
                *slot = *byte as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            let ret = libc::connect(fd, (&raw const addr).cast(), len);
            (ret, errno_of(ret as libc::c_long))
        }
    }

    #[test]
    fn host_unix_sockets_are_out_of_reach_unless_asked_for_and_socketpair_works() {
        if !KernelSupport::probe().seccomp {
            phi3d_tests::skip("this kernel has no seccomp filters");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let path = std::ffi::CString::new(path.into_os_string().into_encoded_bytes()).unwrap();
        // Unfiltered, the connect works: the test would prove nothing otherwise.
        assert!(in_child(|| unix_socket_at(&path).0 == 0));
        let socketpair_works = || {
            let mut fds = [0; 2];
            // SAFETY: socketpair writes two descriptors into the local array.
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) == 0 }
        };
        for network_sockets in [false, true] {
            let options = Options { network_sockets, ..NO_NETWORK };
            assert!(
                confined_child(build(options).unwrap().unwrap(), || unix_socket_at(&path) == (-1, libc::EPERM)
                    && socketpair_works()),
                "{options:?}"
            );
        }
        let asked = Options { unix_sockets: true, ..NO_NETWORK };
        assert!(confined_child(build(asked).unwrap().unwrap(), || unix_socket_at(&path).0 == 0));
    }

    #[test]
    fn memory_files_cannot_be_executed() {
        if !KernelSupport::probe().seccomp {
            phi3d_tests::skip("this kernel has no seccomp filters");
            return;
        }
        let filters = build(NO_NETWORK).unwrap().unwrap();
        // SAFETY (child): raw system calls on static strings; a successful execveat of /bin/true
        // would replace the child, which then exits 0 and fails the check.
        assert!(confined_child(filters, || unsafe {
            let plain = libc::syscall(libc::SYS_memfd_create, c"plain".as_ptr(), 0);
            let plain_errno = errno_of(plain);
            let exec = libc::syscall(libc::SYS_memfd_create, c"exec".as_ptr(), 0x0010 /* MFD_EXEC */);
            let exec_errno = errno_of(exec);
            let sealed = libc::syscall(libc::SYS_memfd_create, c"sealed".as_ptr(), libc::MFD_NOEXEC_SEAL);
            let program = libc::open(c"/bin/true".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            let argv = [c"true".as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null::<libc::c_char>()];
            let by_fd = libc::syscall(
                libc::SYS_execveat,
                program,
                c"".as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            plain_errno == libc::EPERM
                && exec_errno == libc::EPERM
                && sealed >= 0
                && program >= 0
                && errno_of(by_fd) == libc::EPERM
        }));
    }

    #[test]
    fn with_own_signals_only_nothing_outside_the_plugin_can_be_signalled() {
        if !KernelSupport::probe().seccomp {
            phi3d_tests::skip("this kernel has no seccomp filters");
            return;
        }
        // A bystander of the same uid, outside the plugin's process group.
        let mut bystander = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let bystander_pid = bystander.id() as libc::pid_t;
        // SAFETY: getpid has no preconditions.
        let phi3d = unsafe { libc::getpid() };
        let filters = build(Options { own_signals_only: true, ..NO_NETWORK }).unwrap().unwrap();
        // SAFETY (child): signal 0 only checks permission; the other calls signal the child itself.
        let confined = confined_child(filters, || unsafe {
            let me = libc::getpid();
            errno_of(libc::kill(phi3d, 0).into()) == libc::EPERM
                && errno_of(libc::kill(bystander_pid, libc::SIGKILL).into()) == libc::EPERM
                && errno_of(libc::kill(-1, 0).into()) == libc::EPERM
                && errno_of(libc::syscall(libc::SYS_tgkill, phi3d, phi3d, 0)) == libc::EPERM
                && errno_of(libc::syscall(libc::SYS_pidfd_open, phi3d, 0)) == libc::EPERM
                && libc::kill(me, 0) == 0
                && libc::kill(0, 0) == 0
                && libc::syscall(libc::SYS_tgkill, me, libc::syscall(libc::SYS_gettid), 0) == 0
                && libc::syscall(libc::SYS_pidfd_open, me, 0) >= 0
        });
        let alive = bystander.try_wait().unwrap().is_none();
        let _ = bystander.kill();
        let _ = bystander.wait();
        assert!(confined, "a signal check failed in the confined child");
        assert!(alive, "the bystander was killed");
    }

    #[test]
    fn denied_calls_fail_in_the_child_and_ordinary_ones_work() {
        if !KernelSupport::probe().seccomp {
            phi3d_tests::skip("this kernel has no seccomp filters");
            return;
        }
        let filters = std::cell::RefCell::new(build(Options { unix_sockets: true, ..NO_NETWORK }).unwrap().unwrap());
        // SAFETY (child): raw system calls only. The calls that are expected to fail would,
        // should they succeed, only change the throwaway child (a new user namespace, its own
        // session), except clone and fork, whose children exit at once.
        assert!(in_child(|| unsafe {
            if set_no_new_privs().is_err() || filters.borrow_mut().apply().is_err() {
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
