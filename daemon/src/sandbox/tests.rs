//! End-to-end checks of [`confine`] against the real kernel: real child processes (`sh`,
//! coreutils, util-linux, and this test binary itself playing a hostile plugin) try to get out,
//! and must fail.
//!
//! A test that needs a kernel feature skips, saying why, when the kernel lacks it (and fails
//! instead with `PHI3D_TEST_STRICT=1`, as in CI: see `phi3d_tests::skip`). The tests
//! take turns: RLIMIT_NPROC counts every process of the plugin's uid, so plugins running side
//! by side would eat into each other's process limit.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::*;

/// Makes the tests below take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Set in the environment of this test binary when it runs as the hostile plugin.
const HOSTILE: &str = "PHI3D_SANDBOX_HOSTILE";
/// The hostile plugin's argument (an address to connect to).
const HOSTILE_ARG: &str = "PHI3D_SANDBOX_HOSTILE_ARG";

fn support() -> &'static KernelSupport {
    static SUPPORT: OnceLock<KernelSupport> = OnceLock::new();
    SUPPORT.get_or_init(|| {
        let support = KernelSupport::probe();
        eprintln!("kernel support: {support}");
        support
    })
}

fn default_confinement() -> Confinement {
    Confinement {
        read_paths: Vec::new(),
        write_paths: Vec::new(),
        network: NetworkPolicy::None,
        unix_sockets: Vec::new(),
        memory_bytes: 1 << 30,
        cpu_seconds: 30,
        max_processes: 32,
        max_open_files: 64,
        max_file_bytes: 16 << 20,
    }
}

/// A plugin confined so, with no environment and the unprivileged uid.
fn policy_with(confinement: Confinement) -> Policy {
    Policy { confinement, env: Vec::new(), run_as: crate::sandbox::UNPRIVILEGED_UID }
}

fn default_policy() -> Policy {
    policy_with(default_confinement())
}

/// A directory that the plugin's uid may read and write as far as file permissions go, so that
/// only the sandbox stands in its way.
fn open_dir(parent: &Path, name: &str) -> std::path::PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("file"), "contents").unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(dir.join("file"), std::fs::Permissions::from_mode(0o666)).unwrap();
    dir
}

/// A temporary directory that the plugin's uid can enter.
fn temp_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Kills the plugin's process group however the test ends, so that nothing outlives it.
struct GroupGuard(i32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    protections: Protections,
}

fn confined(program: &str, args: &[&str], policy: &Policy) -> (Command, Protections) {
    let mut command = Command::new(program);
    command.args(args).current_dir("/").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let protections = confine(&mut command, policy, support(), Requirement::BestEffort).expect("confine");
    (command, protections)
}

/// Runs `program` confined by `policy` to the end (a minute at most).
async fn run(program: &str, args: &[&str], policy: &Policy) -> Finished {
    let (mut command, protections) = confined(program, args, policy);
    let child = command.spawn().expect("spawn the confined program");
    let _guard = GroupGuard(child.id().unwrap() as i32);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the confined program ran for over a minute")
        .unwrap();
    let finished = Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        protections,
    };
    eprintln!("{program} {args:?}: {}\nstdout: {}\nstderr: {}", finished.status, finished.stdout, finished.stderr);
    finished
}

/// Runs this test binary as the hostile plugin doing `what`, and returns its answers.
async fn run_hostile(what: &str, arg: &str, mut policy: Policy) -> (Finished, HashMap<String, String>) {
    policy.env.push((HOSTILE.to_owned(), what.to_owned()));
    policy.env.push((HOSTILE_ARG.to_owned(), arg.to_owned()));
    let exe = std::env::current_exe().unwrap();
    let args = ["--exact", "sandbox::tests::hostile_plugin", "--nocapture", "--test-threads=1"];
    let finished = run(exe.to_str().unwrap(), &args, &policy).await;
    let answers = finished
        .stdout
        .lines()
        // The harness may print its own words on the same line.
        .filter_map(|line| line.split_once("hostile: ")?.1.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
    (finished, answers)
}

fn answer<'a>(answers: &'a HashMap<String, String>, key: &str) -> &'a str {
    answers.get(key).unwrap_or_else(|| panic!("the hostile plugin did not answer {key}: {answers:?}"))
}

/// The processes in process group `pgid`, from /proc, with their state letter ('Z' for the
/// dead but not yet reaped, which still count against RLIMIT_NPROC).
fn group_members(pgid: i32) -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command name in parentheses: state, ppid, pgrp.
            let (_, rest) = stat.rsplit_once(')')?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            (fields.get(2)?.parse::<i32>().ok()? == pgid).then(|| (pid, fields[0].to_owned()))
        })
        .collect()
}

/// The live processes in process group `pgid`.
fn live_group_members(pgid: i32) -> Vec<i32> {
    group_members(pgid).into_iter().filter(|(_, state)| state != "Z").map(|(pid, _)| pid).collect()
}

/// A kernel with none of the optional features.
fn bare_kernel() -> KernelSupport {
    KernelSupport {
        landlock_abi: None,
        landlock_unavailable: Some("not enabled at boot".into()),
        seccomp: false,
        user_namespaces: false,
        network_namespaces: false,
        running_as_root: support().running_as_root,
    }
}

#[test]
fn strict_refuses_what_the_kernel_cannot_give_and_leaves_the_command_alone() {
    let mut command = Command::new("/bin/true");
    let error = confine(&mut command, &default_policy(), &bare_kernel(), Requirement::Strict).unwrap_err();
    let message = error.to_string();
    for missing in
        ["filesystem confinement (Landlock: not enabled at boot)", "system call filtering", "network isolation"]
    {
        assert!(message.contains(missing), "{message}");
    }
    assert_eq!(command.as_std().get_envs().count(), 0);
    assert!(command.as_std().get_current_dir().is_none());
}

#[test]
fn best_effort_reports_exactly_what_is_missing() {
    let mut command = Command::new("/bin/true");
    let protections = confine(&mut command, &default_policy(), &bare_kernel(), Requirement::BestEffort).unwrap();
    assert_eq!(protections.landlock, None);
    assert_eq!(protections.seccomp, None);
    assert_eq!(protections.network_namespace, None);
    let expected = if support().running_as_root { 4 } else { 5 };
    assert_eq!(protections.missing.len(), expected, "{:?}", protections.missing);
    assert!(protections.to_string().contains("MISSING: blocking the host's Unix sockets"));
    assert_eq!(protections.rlimits.len(), 6);
    assert!(protections.to_string().contains("MISSING: network isolation"));

    let loopback = policy_with(Confinement { network: NetworkPolicy::Loopback, ..default_confinement() });
    let protections = confine(&mut command, &loopback, &bare_kernel(), Requirement::BestEffort).unwrap();
    assert!(protections.missing.iter().any(|m| m.starts_with("loopback-only network")), "{:?}", protections.missing);
}

#[test]
fn a_shared_uid_needs_seccomp_or_landlock_scoping_for_signal_isolation() {
    let shared_uid = KernelSupport { running_as_root: false, ..bare_kernel() };
    let error =
        confine(&mut Command::new("/bin/true"), &default_policy(), &shared_uid, Requirement::Strict).unwrap_err();
    assert!(error.to_string().contains("signal isolation"), "{error}");
    // With seccomp, the filter restricts signals and nothing about them is missing.
    let with_seccomp = KernelSupport { seccomp: true, ..shared_uid.clone() };
    let protections =
        confine(&mut Command::new("/bin/true"), &default_policy(), &with_seccomp, Requirement::BestEffort).unwrap();
    assert!(protections.seccomp.unwrap().own_signals_only);
    assert!(!protections.missing.iter().any(|m| m.contains("signal")), "{:?}", protections.missing);
    // Root gives each plugin a uid of its own: the kernel keeps signals apart.
    let root = KernelSupport { running_as_root: true, seccomp: true, ..bare_kernel() };
    let protections =
        confine(&mut Command::new("/bin/true"), &default_policy(), &root, Requirement::BestEffort).unwrap();
    assert!(!protections.seccomp.unwrap().own_signals_only);
}

#[test]
fn unix_socket_paths_cannot_be_enforced_so_strict_refuses_them() {
    let kernel = KernelSupport { seccomp: true, running_as_root: true, ..bare_kernel() };
    let policy = policy_with(Confinement { unix_sockets: vec!["/run/some.sock".into()], ..default_confinement() });
    let protections = confine(&mut Command::new("/bin/true"), &policy, &kernel, Requirement::BestEffort).unwrap();
    assert!(protections.seccomp.as_ref().unwrap().unix_sockets);
    assert!(protections.missing.iter().any(|m| m.contains("limiting Unix sockets")), "{:?}", protections.missing);
    let error = confine(&mut Command::new("/bin/true"), &policy, &kernel, Requirement::Strict).unwrap_err();
    assert!(error.to_string().contains("Unix sockets"), "{error}");
}

#[test]
fn no_network_needs_only_one_of_namespace_and_seccomp() {
    let kernel = KernelSupport { seccomp: true, ..bare_kernel() };
    let protections =
        confine(&mut Command::new("/bin/true"), &default_policy(), &kernel, Requirement::BestEffort).unwrap();
    let seccomp = protections.seccomp.unwrap();
    assert!(!seccomp.network_sockets && !seccomp.unix_sockets);
    assert!(!protections.missing.iter().any(|m| m.contains("network")), "{:?}", protections.missing);
}

#[test]
fn connect_without_landlock_network_rules_is_missing_port_filtering() {
    if support().landlock_abi.is_none() {
        phi3d_tests::skip("building a Landlock ruleset needs Landlock");
        return;
    }
    let kernel = KernelSupport { landlock_abi: Some(3), landlock_unavailable: None, seccomp: true, ..bare_kernel() };
    let connect = NetworkPolicy::Connect(vec![HostPort { host: "example.org".into(), port: 443 }]);
    let policy = policy_with(Confinement { network: connect, ..default_confinement() });
    let error = confine(&mut Command::new("/bin/true"), &policy, &kernel, Requirement::Strict).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the kernel cannot give TCP port filtering (needs Landlock ABI 4 or later; the kernel has 3)"
    );
}

#[test]
fn the_environment_is_replaced_and_bad_names_refused() {
    let mut command = Command::new("true");
    let policy = Policy { env: vec![("TZ".into(), "UTC".into())], ..default_policy() };
    confine(&mut command, &policy, &bare_kernel(), Requirement::BestEffort).unwrap();
    let env: Vec<_> = command.as_std().get_envs().map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned))).collect();
    assert_eq!(env, [("PATH".into(), Some(DEFAULT_PATH.into())), ("TZ".into(), Some("UTC".into()))]);

    for bad in ["", "A=B", "NUL\0"] {
        let policy = Policy { env: vec![(bad.to_owned(), "x".into())], ..default_policy() };
        let error = confine(&mut Command::new("true"), &policy, &bare_kernel(), Requirement::BestEffort).unwrap_err();
        assert!(matches!(error, SandboxError::EnvName(_)), "{error}");
    }
}

#[test]
fn the_executable_is_found_on_the_policys_path() {
    let sh = Path::new("/bin/sh").canonicalize().unwrap();
    assert_eq!(resolve_executable(&std::process::Command::new("sh"), DEFAULT_PATH).unwrap(), sh);
    assert_eq!(resolve_executable(&std::process::Command::new("/bin/sh"), "/nowhere").unwrap(), sh);
    let error = resolve_executable(&std::process::Command::new("sh"), "/nowhere").unwrap_err();
    assert_eq!(error.to_string(), "cannot find the executable sh (looked in PATH=/nowhere)");
}

#[tokio::test]
async fn files_outside_the_read_paths_cannot_be_read() {
    let _turn = ONE_AT_A_TIME.lock().await;
    if support().landlock_abi.is_none() {
        phi3d_tests::skip(format!("no Landlock here ({support:?})", support = support().landlock_unavailable));
        return;
    }
    let dir = temp_dir();
    let (inside, outside) = (open_dir(dir.path(), "inside"), open_dir(dir.path(), "outside"));
    let policy = policy_with(Confinement { read_paths: vec![inside.clone()], ..default_confinement() });
    let script =
        r#"for f in "$@"; do if cat -- "$f" >/dev/null 2>&1; then echo "$f: ok"; else echo "$f: denied"; fi; done"#;
    let (inside_file, outside_file) = (inside.join("file"), outside.join("file"));
    let args = [
        "-c",
        script,
        "sh",
        inside_file.to_str().unwrap(),
        outside_file.to_str().unwrap(),
        "/etc/shadow",
        "/etc/passwd",
    ];
    let finished = run("/bin/sh", &args, &policy).await;
    assert!(finished.protections.landlock.is_some());
    let expected = format!(
        "{}: ok\n{}: denied\n/etc/shadow: denied\n/etc/passwd: denied\n",
        inside_file.display(),
        outside_file.display()
    );
    assert_eq!(finished.stdout, expected);
}

#[tokio::test]
async fn only_the_write_paths_can_be_written_and_nothing_written_can_be_run() {
    let _turn = ONE_AT_A_TIME.lock().await;
    if support().landlock_abi.is_none() {
        phi3d_tests::skip(format!("no Landlock here ({support:?})", support = support().landlock_unavailable));
        return;
    }
    let dir = temp_dir();
    let (inside, outside) = (open_dir(dir.path(), "inside"), open_dir(dir.path(), "outside"));
    let policy = policy_with(Confinement { write_paths: vec![inside.clone()], ..default_confinement() });
    let script = r#"for d in "$@"; do if echo new > "$d/new" 2>/dev/null; then echo "write: ok"; else echo "write: denied"; fi; done
        cp /bin/true "$1/true" && "$1/true" 2>/dev/null && echo "exec: ok" || echo "exec: denied""#;
    let args = ["-c", script, "sh", inside.to_str().unwrap(), outside.to_str().unwrap()];
    let finished = run("/bin/sh", &args, &policy).await;
    assert_eq!(finished.stdout, "write: ok\nwrite: denied\nexec: denied\n");
    assert_eq!(std::fs::read_to_string(inside.join("new")).unwrap(), "new\n");
    assert!(!outside.join("new").exists());
}

#[tokio::test]
async fn tcp_connects_only_to_the_allowed_port() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let allowed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (allowed_addr, other_addr) = (allowed.local_addr().unwrap(), other.local_addr().unwrap());

    if support().seccomp || support().network_namespaces {
        // No network at all: the socket is refused (seccomp) or has nowhere to go (namespace).
        let (_, answers) = run_hostile("connect", &allowed_addr.to_string(), default_policy()).await;
        assert_ne!(answer(&answers, "connect"), "ok");
    } else {
        phi3d_tests::skip("the no-network case: neither seccomp nor network namespaces here");
    }

    if support().landlock_abi.is_none_or(|abi| abi < 4) {
        phi3d_tests::skip(format!(
            "the port filter: it needs Landlock ABI 4 or later, and here it is {:?}",
            support().landlock_abi
        ));
        return;
    }
    let connect = NetworkPolicy::Connect(vec![HostPort { host: "127.0.0.1".into(), port: allowed_addr.port() }]);
    let policy = policy_with(Confinement { network: connect, ..default_confinement() });
    let (finished, answers) = run_hostile("connect", &allowed_addr.to_string(), policy.clone()).await;
    assert_eq!(finished.protections.landlock.unwrap().tcp_connect_ports, Some(vec![allowed_addr.port()]));
    assert_eq!(answer(&answers, "connect"), "ok");
    let (_, answers) = run_hostile("connect", &other_addr.to_string(), policy).await;
    assert_eq!(answer(&answers, "connect"), format!("errno {}", libc::EACCES));
}

#[tokio::test]
async fn loopback_reaches_only_the_plugins_own_loopback() {
    let _turn = ONE_AT_A_TIME.lock().await;
    if !support().network_namespaces {
        phi3d_tests::skip("no network namespaces here");
        return;
    }
    let host_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_addr = host_listener.local_addr().unwrap().to_string();
    let policy = policy_with(Confinement { network: NetworkPolicy::Loopback, ..default_confinement() });
    let (finished, answers) = run_hostile("loopback", &host_addr, policy).await;
    assert_eq!(
        finished.protections.network_namespace,
        Some(NamespaceProtection { user_namespace: !support().running_as_root, loopback_up: true })
    );
    assert_eq!(answer(&answers, "own_loopback"), "ok");
    assert_eq!(answer(&answers, "host_loopback"), format!("errno {}", libc::ECONNREFUSED));
}

#[tokio::test]
async fn dangerous_system_calls_fail_with_eperm_and_ordinary_ones_work() {
    let _turn = ONE_AT_A_TIME.lock().await;
    if !support().seccomp {
        phi3d_tests::skip("this kernel has no seccomp filters");
        return;
    }
    let (finished, answers) = run_hostile("syscalls", "", default_policy()).await;
    assert!(finished.status.success(), "the hostile plugin itself must run unchanged");
    let eperm = format!("errno {}", libc::EPERM);
    for call in [
        "ptrace",
        "unshare_user",
        "unshare_net",
        "clone_newuser",
        "mount",
        "setpgid",
        "setsid_in_child",
        "io_uring_setup",
        "bpf",
        "socket_inet",
        "socket_unix",
    ] {
        assert_eq!(answer(&answers, call), eperm, "{call}");
    }
    for ordinary in ["thread", "fork", "socketpair"] {
        assert_eq!(answer(&answers, ordinary), "ok", "{ordinary}");
    }

    // The same through ordinary tools.
    let script = "unshare -U true; echo \"unshare: $?\"; setsid true; echo \"setsid: $?\"";
    let finished = run("/bin/sh", &["-c", script], &default_policy()).await;
    assert_eq!(finished.stdout, "unshare: 1\nsetsid: 1\n");
    assert_eq!(finished.stderr.matches("Operation not permitted").count(), 2, "{}", finished.stderr);
}

#[tokio::test]
async fn root_runs_plugins_as_nobody() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let finished = run("/bin/sh", &["-c", "id -u; id -g; id -G"], &default_policy()).await;
    let expected = if support().running_as_root {
        (UNPRIVILEGED_UID, UNPRIVILEGED_GID)
    } else {
        // SAFETY: geteuid and getegid have no preconditions.
        unsafe { (libc::geteuid(), libc::getegid()) }
    };
    let mut lines = finished.stdout.lines();
    assert_eq!(lines.next(), Some(expected.0.to_string().as_str()));
    assert_eq!(lines.next(), Some(expected.1.to_string().as_str()));
    if support().running_as_root {
        // No supplementary groups: just the primary group.
        assert_eq!(lines.next(), Some(expected.1.to_string().as_str()));
    }
    assert_eq!(finished.protections.user.switched_from_root, support().running_as_root);
}

#[tokio::test]
async fn descriptors_phi3d_inherited_do_not_reach_the_plugin() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let file = tempfile::tempfile().unwrap();
    // A descriptor without close-on-exec, as a service manager or a lock holder passes them.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: dup returns a new descriptor of this process, closed again below.
    let inherited = unsafe { libc::dup(fd) };
    assert!(inherited > 2);
    let finished = run("/bin/sh", &["-c", &format!("[ -e /proc/self/fd/{inherited} ] && echo open || echo closed")], &default_policy()).await;
    // SAFETY: closes the descriptor dup'ed above.
    unsafe { libc::close(inherited) };
    assert_eq!(finished.stdout, "closed\n", "{}", finished.stderr);
}

#[tokio::test]
async fn the_environment_is_only_what_the_policy_passes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let policy = Policy { env: vec![("PHI3D_GREETING".into(), "hello".into())], ..default_policy() };
    let finished = run("/usr/bin/env", &[], &policy).await;
    let mut lines: Vec<&str> = finished.stdout.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["PATH=/usr/bin:/bin", "PHI3D_GREETING=hello"]);
    assert_eq!(finished.protections.env_vars, ["PHI3D_GREETING", "PATH"]);
}

#[tokio::test]
async fn a_memory_hog_is_stopped_by_the_address_space_limit() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let policy = policy_with(Confinement { memory_bytes: 64 << 20, ..default_confinement() });
    let small = run("/bin/dd", &["if=/dev/zero", "of=/dev/null", "bs=1M", "count=1"], &policy).await;
    assert!(small.status.success(), "{}", small.stderr);
    let hog = run("/bin/dd", &["if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"], &policy).await;
    assert!(!hog.status.success());
    assert!(hog.stderr.contains("memory exhausted"), "{}", hog.stderr);
}

#[tokio::test]
async fn an_endless_loop_is_stopped_by_the_cpu_limit() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let policy = policy_with(Confinement { cpu_seconds: 1, ..default_confinement() });
    let started = Instant::now();
    let finished = run("/bin/sh", &["-c", "while :; do :; done"], &policy).await;
    assert!(
        matches!(finished.status.signal(), Some(libc::SIGXCPU | libc::SIGKILL)),
        "the loop ended by {}",
        finished.status
    );
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_fork_bomb_is_stopped_by_the_process_limit() {
    let _turn = ONE_AT_A_TIME.lock().await;
    if !support().running_as_root {
        // The kernel counts every process of the uid, phi3d's own threads included, and the
        // test harness has a thread per test: there is no meaningful small limit to test.
        phi3d_tests::skip("without root, plugins share phi3d's uid and so its process count");
        return;
    }
    const LIMIT: u64 = 8;
    // Bounded (at most 2^11 processes) so that even a broken limit cannot take the machine down.
    let bomb = r#"b() { if [ "$1" -lt 10 ]; then b $(($1 + 1)) & b $(($1 + 1)) & fi; sleep 3; }; b 0; wait"#;
    let policy = policy_with(Confinement { max_processes: LIMIT, ..default_confinement() });
    let (mut command, _) = confined("/bin/sh", &["-c", bomb], &policy);
    let child = command.spawn().unwrap();
    let pgid = child.id().unwrap() as i32;
    let guard = GroupGuard(pgid);
    let mut most = 0;
    let sampling = Instant::now();
    while sampling.elapsed() < Duration::from_millis(1500) {
        most = most.max(group_members(pgid).len());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(guard);
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("at most {most} processes, zombies included; stderr: {stderr}");
    assert!(most as u64 <= LIMIT, "{most} processes in the group");
    assert!(stderr.contains("fork"), "no fork failed: {stderr}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !live_group_members(pgid).is_empty() {
        assert!(Instant::now() < deadline, "the bomb survived kill_group");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn kill_group_kills_what_the_plugin_left_behind() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (mut command, protections) =
        confined("/bin/sh", &["-c", "sleep 300 >/dev/null 2>&1 & echo $!"], &default_policy());
    assert!(protections.own_process_group);
    let child = command.spawn().unwrap();
    let pgid = child.id().unwrap() as i32;
    let guard = GroupGuard(pgid);
    let output = child.wait_with_output().await.unwrap();
    let orphan: i32 = String::from_utf8_lossy(&output.stdout).trim().parse().unwrap();
    assert_eq!(live_group_members(pgid), [orphan], "the background sleep outlives its parent, in the group");
    drop(guard);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !live_group_members(pgid).is_empty() {
        assert!(Instant::now() < deadline, "the orphan survived kill_group");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Not a test: the hostile plugin that the tests above run, confined, from this same test
/// binary. Run by the harness, without its environment variable, it does nothing.
#[test]
fn hostile_plugin() {
    let Ok(what) = std::env::var(HOSTILE) else { return };
    let arg = std::env::var(HOSTILE_ARG).unwrap_or_default();
    match what.as_str() {
        "connect" => say("connect", connect(&arg)),
        "loopback" => {
            let own = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            say("own_loopback", connect(&own.local_addr().unwrap().to_string()));
            say("host_loopback", connect(&arg));
        }
        "syscalls" => hostile_syscalls(),
        other => panic!("unknown hostile action {other}"),
    }
}

fn say(key: &str, value: String) {
    println!("hostile: {key}={value}");
}

fn connect(addr: &str) -> String {
    match std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3)) {
        Ok(_) => "ok".to_owned(),
        Err(error) => format!("errno {}", error.raw_os_error().unwrap_or(-1)),
    }
}

/// "ok", or the errno of a system call that returned a negative value.
fn outcome(ret: impl Into<i64>) -> String {
    if ret.into() < 0 {
        format!("errno {}", std::io::Error::last_os_error().raw_os_error().unwrap_or(-1))
    } else {
        "ok".to_owned()
    }
}

/// Forks; the child runs `f` and exits with its errno (0 for success); returns the outcome.
fn in_forked_child<R: Into<i64>>(f: impl Fn() -> R) -> String {
    // SAFETY: the child only makes the system call in `f` and exits; the parent waits for it.
    unsafe {
        match libc::fork() {
            -1 => outcome(-1),
            0 => libc::_exit(if f().into() < 0 { *libc::__errno_location() } else { 0 }),
            pid => {
                let mut status = 0;
                libc::waitpid(pid, &mut status, 0);
                match libc::WEXITSTATUS(status) {
                    0 => "ok".to_owned(),
                    errno => format!("errno {errno}"),
                }
            }
        }
    }
}

/// Tries what the seccomp filter denies, and what it must not.
fn hostile_syscalls() {
    // SAFETY (all): raw system calls on local buffers. Should a denied call succeed, it only
    // changes this throwaway process; a cloned child exits at once.
    unsafe {
        say("ptrace", outcome(libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0)));
        say("unshare_user", outcome(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER)));
        say("unshare_net", outcome(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNET)));
        let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
        let cloned = libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0);
        if cloned == 0 {
            libc::_exit(0);
        }
        say("clone_newuser", outcome(cloned));
        let mount = libc::mount(c"none".as_ptr(), c"/tmp".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null());
        say("mount", outcome(mount));
        say("setpgid", outcome(libc::syscall(libc::SYS_setpgid, 0, 0)));
        // The plugin leads its group, and a leader may never setsid; a child could, unfiltered.
        say("setsid_in_child", in_forked_child(|| libc::syscall(libc::SYS_setsid)));
        let mut params = [0u64; 16];
        say("io_uring_setup", outcome(libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr())));
        say("bpf", outcome(libc::syscall(libc::SYS_bpf, 0, std::ptr::null::<libc::c_void>(), 0)));
        let inet = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        say("socket_inet", outcome(inet));
        let unix = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        say("socket_unix", outcome(unix));
        let mut pair = [0; 2];
        say("socketpair", outcome(libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr())));
        say("fork", in_forked_child(|| 0));
    }
    let thread = std::thread::spawn(|| 7).join();
    say("thread", if matches!(thread, Ok(7)) { "ok".to_owned() } else { "failed".to_owned() });
}
