//! What a plugin may do: the [`Confinement`] it declares, the [`Policy`] it is spawned under,
//! and how hard to insist on it ([`Requirement`]) when the kernel cannot enforce all of it.
//!
//! A policy only grants. The filesystem outside the listed paths (and the few system files
//! any program needs to start) is off limits, and every resource is bounded: there is no
//! "unlimited", because a plugin is untrusted code.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What a plugin may touch and how much it may use, as the plugin declares it: the part of a
/// [`Policy`] known before the plugin is spawned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Confinement {
    /// Files and directory trees the plugin may read and execute.
    pub read_paths: Vec<PathBuf>,
    /// Files and directory trees the plugin may read and change, but not execute from, so that
    /// it cannot write itself a program and run it.
    pub write_paths: Vec<PathBuf>,
    /// The network the plugin may reach.
    pub network: NetworkPolicy,
    /// Unix socket files the plugin may connect to. Empty: `socket(AF_UNIX)` fails (socketpair
    /// still works). The kernel cannot filter `connect()` by path, so a non-empty list allows
    /// every Unix socket, and is reported as missing protection.
    pub unix_sockets: Vec<PathBuf>,
    /// Address space (RLIMIT_AS): virtual memory, which is more than the memory in use.
    pub memory_bytes: u64,
    /// CPU time over the plugin's whole life (RLIMIT_CPU), not per call.
    pub cpu_seconds: u64,
    /// Processes and threads (RLIMIT_NPROC). The kernel counts every one owned by the plugin's
    /// uid, which is why each plugin gets a uid of its own when phi3d is root
    /// ([`Policy::run_as`]).
    pub max_processes: u64,
    /// Open file descriptors (RLIMIT_NOFILE).
    pub max_open_files: u64,
    /// Largest file the plugin may write (RLIMIT_FSIZE).
    pub max_file_bytes: u64,
}

/// The confinement of one plugin process: its [`Confinement`], and what is only known when it
/// is spawned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub confinement: Confinement,
    /// The plugin's whole environment: phi3d's own is never passed on.
    pub env: Vec<(String, String)>,
    /// The uid and gid the plugin runs as when phi3d is root (see [`crate::sandbox::UidAllocator`]).
    pub run_as: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum NetworkPolicy {
    /// No network at all.
    None,
    /// Only the plugin's own loopback interface, in a network namespace of its own.
    Loopback,
    /// TCP connections to these endpoints. Landlock filters by port only, so the host is not
    /// enforced: any host on a listed port is reachable.
    Connect(Vec<HostPort>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

/// What to do when the kernel cannot enforce the whole policy: the config's `sandbox.require`
/// (`strict` or `best-effort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Requirement {
    /// Refuse to run the plugin.
    Strict,
    /// Run it with what the kernel can give, and report what is missing.
    BestEffort,
}

impl NetworkPolicy {
    /// The distinct ports a [`NetworkPolicy::Connect`] lists, in order; none for the others.
    pub fn connect_ports(&self) -> Vec<u16> {
        let NetworkPolicy::Connect(endpoints) = self else { return Vec::new() };
        let mut ports: Vec<u16> = endpoints.iter().map(|endpoint| endpoint.port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_ports_are_sorted_and_distinct() {
        let endpoint = |host: &str, port| HostPort { host: host.to_owned(), port };
        let network = NetworkPolicy::Connect(vec![endpoint("b", 443), endpoint("a", 80), endpoint("c", 443)]);
        assert_eq!(network.connect_ports(), [80, 443]);
        assert!(NetworkPolicy::Loopback.connect_ports().is_empty());
        assert!(NetworkPolicy::None.connect_ports().is_empty());
    }
}
