//! The Landlock ruleset: which files the plugin may read, execute and write, and (from ABI 4)
//! which TCP ports it may connect to.
//!
//! The ruleset is built in the parent, where opening paths and allocating are fine; the child
//! only calls `landlock_restrict_self` with its file descriptor. All access rights the kernel's
//! ABI knows are handled, so anything not granted below is denied. Granted are:
//!
//! - read and execute: the policy's read paths, the executable itself, and what a dynamically
//!   linked program needs to start (`/usr`, `/lib`, `/lib64`, `/bin`, `/etc/ld.so.cache`,
//!   `/etc/ld.so.preload`), plus `/etc/localtime` for clocks. Not the rest of `/etc`: it holds
//!   secrets (`/etc/shadow`, keys, tokens in service configs). Not `/proc/self` either: a rule
//!   names an inode, and `/proc/self` resolved here is phi3d's own directory, environment and
//!   all, not the plugin's. Programs cope without /proc; a policy can still list it.
//! - read, for [`NetworkPolicy::Connect`] only: the resolver's configuration (`/etc/hosts`,
//!   `/etc/resolv.conf` and friends), since the policy names hosts. None of it is secret.
//! - read and write, but not execute: the policy's write paths, so the plugin cannot write a
//!   program and run it; and `/dev/null`, `/dev/zero`, `/dev/urandom`.
//! - TCP: with [`NetworkPolicy::Connect`], connecting to the listed ports (whatever the host:
//!   Landlock knows ports only); with [`NetworkPolicy::None`], nothing. Binding is never
//!   allowed. With [`NetworkPolicy::Loopback`] TCP is left to the network namespace.
//! - from ABI 6, signals and abstract Unix sockets are scoped: the plugin cannot signal or
//!   connect to anything outside its own sandbox, phi3d included.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, Scope,
};

use super::SandboxError;
use super::child::{StepError, check};
use super::policy::{Confinement, NetworkPolicy};
use super::protections::LandlockProtection;

/// What any dynamically linked program needs to read to start, and the local time zone.
/// Missing ones (`/lib64` on aarch64, `/etc/ld.so.preload` usually) are skipped.
const SYSTEM_READ: &[&str] =
    &["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", "/etc/ld.so.preload", "/etc/localtime"];

/// What the C library reads to resolve a host name.
const NAME_RESOLUTION: &[&str] =
    &["/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf"];

/// Devices every program may use.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom"];

/// A created ruleset, ready for the child to enforce.
pub(super) struct Rules {
    ruleset: OwnedFd,
}

/// Builds the ruleset for `confinement` on a kernel with Landlock ABI `abi`.
pub(super) fn prepare(
    confinement: &Confinement,
    abi: i32,
    executable: &Path,
) -> Result<(Rules, LandlockProtection), SandboxError> {
    let abi_version = ABI::from(abi);
    let all = AccessFs::from_all(abi_version);
    let read = AccessFs::from_read(abi_version);
    let write = all & !AccessFs::Execute;

    let mut ruleset = Ruleset::default().set_compatibility(CompatLevel::HardRequirement).handle_access(all)?;
    let restrict_tcp = abi >= 4 && confinement.network != NetworkPolicy::Loopback;
    if restrict_tcp {
        ruleset = ruleset.handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)?;
    }
    let scoped = abi >= 6;
    if scoped {
        ruleset = ruleset.scope(Scope::AbstractUnixSocket | Scope::Signal)?;
    }
    let mut created = ruleset.create()?;

    let mut read_paths: Vec<PathBuf> = vec![executable.to_owned()];
    read_paths.extend(SYSTEM_READ.iter().map(PathBuf::from).filter(|path| path.exists()));
    if matches!(confinement.network, NetworkPolicy::Connect(_)) {
        read_paths.extend(NAME_RESOLUTION.iter().map(PathBuf::from).filter(|path| path.exists()));
    }
    read_paths.extend(confinement.read_paths.iter().cloned());
    let mut write_paths: Vec<PathBuf> = confinement.write_paths.clone();
    write_paths.extend(DEVICES.iter().map(PathBuf::from).filter(|path| path.exists()));
    dedup_in_order(&mut read_paths);
    dedup_in_order(&mut write_paths);

    let file = AccessFs::from_file(abi_version);
    for path in &read_paths {
        created = add_path_rule(created, path, read, file)?;
    }
    for path in &write_paths {
        created = add_path_rule(created, path, write, file)?;
    }
    let tcp_connect_ports = restrict_tcp.then(|| confinement.network.connect_ports());
    for port in tcp_connect_ports.iter().flatten() {
        created = created.add_rule(NetPort::new(*port, AccessNet::ConnectTcp))?;
    }

    let ruleset = Option::<OwnedFd>::from(created).ok_or_else(|| {
        // With a hard requirement the crate errs rather than build a dummy ruleset; this only
        // guards against a crate that stops doing so.
        SandboxError::Unavailable(vec!["filesystem confinement (Landlock created no ruleset)".to_owned()])
    })?;
    let report = LandlockProtection { abi, read: read_paths, write: write_paths, tcp_connect_ports, scoped };
    Ok((Rules { ruleset }, report))
}

impl Rules {
    /// Enforces the ruleset on the calling process. Runs in the forked child, after
    /// `no_new_privs`, which the kernel requires of an unprivileged caller.
    pub(super) fn restrict(&self) -> Result<(), StepError> {
        // SAFETY: passes a ruleset fd this struct owns; the call changes only this process.
        check(
            unsafe { libc::syscall(libc::SYS_landlock_restrict_self, self.ruleset.as_raw_fd(), 0u32) },
            "landlock_restrict_self",
        )
    }
}

/// Adds a rule granting `access` beneath `path`, narrowed to `file_access` when `path` is not a
/// directory (the kernel rejects directory rights on files).
fn add_path_rule(
    ruleset: RulesetCreated,
    path: &Path,
    access: BitFlags<AccessFs>,
    file_access: BitFlags<AccessFs>,
) -> Result<RulesetCreated, SandboxError> {
    let path_error = |source| SandboxError::Path { path: path.to_owned(), source };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| path_error(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: `c_path` is NUL-terminated; a returned fd is owned by the OwnedFd at once.
    let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(path_error(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fstat writes into a zeroed local; O_PATH descriptors support fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(path_error(std::io::Error::last_os_error()));
    }
    let access = if st.st_mode & libc::S_IFMT == libc::S_IFDIR { access } else { access & file_access };
    Ok(ruleset.add_rule(PathBeneath::new(fd, access))?)
}

fn dedup_in_order(paths: &mut Vec<PathBuf>) {
    let mut seen = std::collections::HashSet::new();
    paths.retain(|path| seen.insert(path.clone()));
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStringExt;
    use std::os::unix::fs::PermissionsExt;

    use super::super::identity::set_no_new_privs;
    use super::super::policy::HostPort;
    use super::super::probe::{KernelSupport, in_child};
    use super::*;

    fn confinement(read: &Path, write: &Path, network: NetworkPolicy) -> Confinement {
        Confinement {
            read_paths: vec![read.to_owned()],
            write_paths: vec![write.to_owned()],
            network,
            unix_sockets: Vec::new(),
            memory_bytes: 1 << 30,
            cpu_seconds: 10,
            max_processes: 16,
            max_open_files: 64,
            max_file_bytes: 1 << 20,
        }
    }

    /// Opens `path` with `flags` and closes it again: the errno, or 0 when it opened.
    fn open_errno(path: &CString, flags: libc::c_int) -> i32 {
        // SAFETY: open/close on a NUL-terminated path; errno is read at once.
        unsafe {
            let fd = libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0o644);
            if fd < 0 {
                return *libc::__errno_location();
            }
            libc::close(fd);
            0
        }
    }

    #[test]
    fn report_lists_every_rule_and_tcp_follows_the_network_policy() {
        let Some(abi) = KernelSupport::probe().landlock_abi else {
            phi3d_tests::skip("Landlock is unavailable here");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let executable = Path::new("/bin/sh").canonicalize().unwrap();
        let connect = NetworkPolicy::Connect(vec![HostPort { host: "localhost".into(), port: 8123 }]);
        let (_, report) = prepare(&confinement(dir.path(), dir.path(), connect), abi, &executable).unwrap();
        assert_eq!(report.abi, abi);
        assert_eq!(report.read[0], executable);
        assert!(report.read.contains(&PathBuf::from("/usr")));
        assert!(report.read.contains(&dir.path().to_owned()));
        assert!(!report.read.iter().any(|path| path == Path::new("/etc")));
        assert!(report.write.contains(&dir.path().to_owned()));
        assert!(report.write.contains(&PathBuf::from("/dev/null")));
        assert_eq!(report.tcp_connect_ports, (abi >= 4).then(|| vec![8123]));
        assert_eq!(report.scoped, abi >= 6);
        let hosts = PathBuf::from("/etc/hosts");
        assert_eq!(report.read.contains(&hosts), hosts.exists());

        let loopback = confinement(dir.path(), dir.path(), NetworkPolicy::Loopback);
        let (_, report) = prepare(&loopback, abi, &executable).unwrap();
        assert_eq!(report.tcp_connect_ports, None);
        assert!(!report.read.contains(&hosts));
        let (_, report) = prepare(&confinement(dir.path(), dir.path(), NetworkPolicy::None), abi, &executable).unwrap();
        assert_eq!(report.tcp_connect_ports, (abi >= 4).then(Vec::new));
    }

    #[test]
    fn a_missing_policy_path_is_an_error_naming_it() {
        let Some(abi) = KernelSupport::probe().landlock_abi else {
            phi3d_tests::skip("Landlock is unavailable here");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir");
        let error = prepare(&confinement(&missing, dir.path(), NetworkPolicy::None), abi, Path::new("/bin/sh"))
            .err()
            .expect("a missing read path must be refused");
        assert!(matches!(&error, SandboxError::Path { path, .. } if *path == missing), "{error}");
    }

    #[test]
    fn restrict_confines_the_child_to_the_rules() {
        let Some(abi) = KernelSupport::probe().landlock_abi else {
            phi3d_tests::skip("Landlock is unavailable here");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let (read, write, outside) = (dir.path().join("read"), dir.path().join("write"), dir.path().join("outside"));
        for sub in [&read, &write, &outside] {
            std::fs::create_dir(sub).unwrap();
            std::fs::write(sub.join("file"), "x").unwrap();
            std::fs::set_permissions(sub, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let (rules, _) = prepare(&confinement(&read, &write, NetworkPolicy::None), abi, Path::new("/bin/sh")).unwrap();
        let c = |path: PathBuf| CString::new(path.into_os_string().into_vec()).unwrap();
        let (read_file, write_file, outside_file) =
            (c(read.join("file")), c(write.join("file")), c(outside.join("file")));
        let (write_new, outside_new, passwd) = (c(write.join("new")), c(outside.join("new")), c("/etc/passwd".into()));
        // SAFETY (child): open/close/prctl/landlock system calls only, on prepared buffers.
        assert!(in_child(|| {
            set_no_new_privs().is_ok()
                && rules.restrict().is_ok()
                && open_errno(&read_file, libc::O_RDONLY) == 0
                && open_errno(&read_file, libc::O_WRONLY) == libc::EACCES
                && open_errno(&write_file, libc::O_RDWR) == 0
                && open_errno(&write_new, libc::O_WRONLY | libc::O_CREAT) == 0
                && open_errno(&outside_file, libc::O_RDONLY) == libc::EACCES
                && open_errno(&outside_new, libc::O_WRONLY | libc::O_CREAT) == libc::EACCES
                && open_errno(&passwd, libc::O_RDONLY) == libc::EACCES
        }));
        assert!(write.join("new").exists());
        assert!(!outside.join("new").exists());
    }
}
