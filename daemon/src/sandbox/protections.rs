//! What is actually in effect for one plugin, for its start-up log line and its status report.
//!
//! [`confine`](super::confine) fills this in from the layers it has set up, never from what the
//! policy asked for; whatever the policy implied but the kernel could not give is spelled out
//! in [`Protections::missing`].

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Protections {
    /// setuid binaries and file capabilities grant nothing.
    pub no_new_privs: bool,
    /// phi3d's environment is not passed on.
    pub env_scrubbed: bool,
    /// Names (not values: they may be secrets) of the variables the plugin gets.
    pub env_vars: Vec<String>,
    /// The plugin leads a process group of its own, which the supervisor kills as a whole.
    pub own_process_group: bool,
    pub rlimits: Vec<Rlimit>,
    pub user: UserProtection,
    pub landlock: Option<LandlockProtection>,
    pub seccomp: Option<SeccompProtection>,
    pub network_namespace: Option<NamespaceProtection>,
    /// What the policy implies that the kernel could not give.
    pub missing: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rlimit {
    pub resource: &'static str,
    /// Bytes, seconds or a count, as the resource has it; the soft limit where they differ.
    pub value: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserProtection {
    pub uid: u32,
    pub gid: u32,
    /// phi3d is root and the plugin dropped to `uid`/`gid` with no supplementary groups; when
    /// false, the plugin runs as phi3d's own (non-root) user.
    pub switched_from_root: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LandlockProtection {
    pub abi: i32,
    /// Readable and executable, each with everything beneath it.
    pub read: Vec<PathBuf>,
    /// Readable and writable but not executable, each with everything beneath it.
    pub write: Vec<PathBuf>,
    /// `Some` when Landlock restricts TCP: connecting is allowed to these ports only (on any
    /// host) and binding to none. `None` when it leaves TCP alone.
    pub tcp_connect_ports: Option<Vec<u16>>,
    /// Signals and abstract Unix sockets cannot reach outside the sandbox (ABI 6 and later).
    pub scoped: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeccompProtection {
    /// The system calls (and argument patterns) that fail.
    pub denied: Vec<&'static str>,
    /// Sockets of families other than AF_UNIX can be made (the plugin has some network).
    pub network_sockets: bool,
    /// `socket(AF_UNIX)` works (the manifest names Unix sockets); `socketpair` always does.
    pub unix_sockets: bool,
    /// Signals reach only the plugin itself and its process group.
    pub own_signals_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceProtection {
    /// Created inside a user namespace, because phi3d is not root.
    pub user_namespace: bool,
    /// `lo` is up; otherwise the namespace has no working interface at all.
    pub loopback_up: bool,
}

impl Protections {
    /// One line per protection, missing ones last and marked as such.
    pub fn summary(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let user = &self.user;
        lines.push(if user.switched_from_root {
            format!("user: uid {} gid {}, no supplementary groups (dropped from root)", user.uid, user.gid)
        } else {
            format!("user: phi3d's own uid {} gid {} (phi3d is not root, so no switch)", user.uid, user.gid)
        });
        if self.no_new_privs {
            lines.push("no_new_privs: set".to_owned());
        }
        if self.env_scrubbed {
            lines.push(format!("environment: only {}", self.env_vars.join(", ")));
        }
        if self.own_process_group {
            lines.push("process group: its own, killed as a whole".to_owned());
        }
        let limits: Vec<String> =
            self.rlimits.iter().map(|limit| format!("{} {}", limit.resource, limit.value)).collect();
        lines.push(format!("rlimits: {}", limits.join(", ")));
        if let Some(landlock) = &self.landlock {
            lines.push(landlock_line(landlock));
        }
        if let Some(seccomp) = &self.seccomp {
            let sockets = match (seccomp.network_sockets, seccomp.unix_sockets) {
                (false, false) => "none (socketpair only)",
                (false, true) => "AF_UNIX only",
                (true, false) => "no AF_UNIX (socketpair only)",
                (true, true) => "any family",
            };
            lines.push(format!("seccomp: denied {}; sockets: {sockets}", seccomp.denied.join(", ")));
        }
        lines.push(match &self.network_namespace {
            Some(NamespaceProtection { loopback_up: true, .. }) => {
                "network namespace: private, loopback only".to_owned()
            }
            Some(_) => "network namespace: private, no interface up".to_owned(),
            None => "network namespace: the host's".to_owned(),
        });
        lines.extend(self.missing.iter().map(|missing| format!("MISSING: {missing}")));
        lines
    }
}

fn landlock_line(landlock: &LandlockProtection) -> String {
    let paths = |paths: &[PathBuf]| paths.iter().map(|path| path.display().to_string()).collect::<Vec<_>>().join(", ");
    let tcp = match &landlock.tcp_connect_ports {
        None => "TCP not restricted by Landlock".to_owned(),
        Some(ports) if ports.is_empty() => "TCP: no connect, no bind".to_owned(),
        Some(ports) => {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            format!(
                "TCP: connect to port {} only, on any host (hosts are not enforced; UDP is not filtered), no bind",
                ports.join(", ")
            )
        }
    };
    let scoped =
        if landlock.scoped { "signals and abstract sockets scoped" } else { "signals and abstract sockets NOT scoped" };
    format!(
        "landlock ABI {}: read+execute {}; read+write {}; {tcp}; {scoped}",
        landlock.abi,
        paths(&landlock.read),
        paths(&landlock.write)
    )
}

/// The summary on one line.
impl fmt::Display for Protections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary().join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protections() -> Protections {
        Protections {
            no_new_privs: true,
            env_scrubbed: true,
            env_vars: vec!["PATH".into(), "TZ".into()],
            own_process_group: true,
            rlimits: vec![Rlimit { resource: "processes", value: 8 }],
            user: UserProtection { uid: 65534, gid: 65534, switched_from_root: true },
            landlock: Some(LandlockProtection {
                abi: 4,
                read: vec!["/usr".into(), "/srv/data".into()],
                write: vec!["/var/tmp/x".into()],
                tcp_connect_ports: Some(vec![8123]),
                scoped: false,
            }),
            seccomp: Some(SeccompProtection {
                denied: vec!["ptrace", "mount"],
                network_sockets: true,
                unix_sockets: false,
                own_signals_only: false,
            }),
            network_namespace: None,
            missing: vec!["loopback-only network (needs a network namespace)".into()],
        }
    }

    #[test]
    fn summary_has_one_line_per_protection_and_missing_ones_last() {
        let lines = protections().summary();
        assert_eq!(lines[0], "user: uid 65534 gid 65534, no supplementary groups (dropped from root)");
        assert!(lines.contains(&"environment: only PATH, TZ".to_owned()));
        assert!(lines.contains(&"rlimits: processes 8".to_owned()));
        assert!(lines.contains(&"seccomp: denied ptrace, mount; sockets: no AF_UNIX (socketpair only)".to_owned()));
        assert!(lines.contains(&"network namespace: the host's".to_owned()));
        let landlock = lines.iter().find(|line| line.starts_with("landlock ABI 4:")).unwrap();
        assert!(landlock.contains("read+execute /usr, /srv/data; read+write /var/tmp/x"), "{landlock}");
        assert!(
            landlock.contains("connect to port 8123 only, on any host (hosts are not enforced; UDP is not filtered), no bind"),
            "{landlock}"
        );
        assert!(landlock.contains("NOT scoped"), "{landlock}");
        assert_eq!(lines.last().unwrap(), "MISSING: loopback-only network (needs a network namespace)");
    }

    #[test]
    fn display_is_the_summary_on_one_line() {
        let mut protections = protections();
        protections.landlock = None;
        protections.missing.clear();
        let line = protections.to_string();
        assert_eq!(line, protections.summary().join("; "));
        assert!(!line.contains('\n') && !line.contains("landlock") && !line.contains("MISSING"));
    }
}
