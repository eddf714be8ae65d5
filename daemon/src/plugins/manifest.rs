//! One plugin manifest: a TOML file that says what to run and what it may touch.
//!
//! ```toml
//! name = "clock"                    # optional; defaults to the file stem
//! command = "phi3d-plugin-clock"    # absolute, relative to this file's folder, or a bare name
//! args = []
//! start = "lazy"                    # "lazy" (default) or "startup"
//! [env]                             # the ONLY environment the plugin gets
//! TZ = "Europe/Berlin"
//! [permissions]                     # every default is the strictest
//! read = []                         # paths readable (and executable)
//! write = []                        # paths writable
//! network = "none"                  # "none" | "loopback" | ["host:port", ...]
//! memory_mb = 256
//! cpu_seconds = 5
//! timeout_seconds = 10              # wall clock per call
//! max_output_bytes = 65536
//! max_concurrent_calls = 1
//! max_processes = 1
//! max_open_files = 64
//! max_file_size_mb = 0
//! ```
//!
//! The file is read with serde (`deny_unknown_fields`), and every error names the file, the
//! line and the dotted field (`clock.toml:12: permissions.network: ...`, the field found by
//! `serde_path_to_error`): an operator editing a manifest on a device sees exactly which line
//! to fix. Unknown keys are rejected, because a misspelt permission silently falling back to a
//! default is a security surprise.
//!
//! The command is resolved when the manifest is loaded, so a missing binary is reported at
//! once instead of at the first tool call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::sandbox::{Confinement, HostPort, NetworkPolicy};
use crate::toml_lines::{self, key_line, line_of};

/// A mebibyte: the unit of `memory_mb` and `max_file_size_mb`.
const MIB: u64 = 1024 * 1024;

/// A parsed and validated manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The file it was read from.
    pub file: PathBuf,
    /// The plugin's name: the prefix of its tools' qualified names (`name.tool`).
    pub name: String,
    /// The resolved, absolute program to run.
    pub command: PathBuf,
    /// The name it runs under (`argv[0]`) when that is not `command`: phi3d itself serving a
    /// bundled plugin (see `plugins::bundled`).
    pub arg0: Option<String>,
    pub args: Vec<String>,
    pub start: StartMode,
    /// The complete environment of the plugin; nothing is inherited from phi3d.
    pub env: BTreeMap<String, String>,
    pub permissions: Permissions,
}

/// When a plugin's process is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// At the first call or tool listing that needs it.
    Lazy,
    /// As soon as the manifest is loaded.
    Startup,
}

/// What the sandboxed plugin may do, and the limits phi3d enforces around its calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// What the sandbox enforces, in the sandbox's own type, so that what the manifest says is
    /// exactly what is enforced. Relative paths in the file were resolved against its folder.
    pub confinement: Confinement,
    /// Wall-clock limit of one call (and of the start-up handshake).
    pub timeout: Duration,
    /// The longest tool result the model reads, in bytes of text; a longer one is cut and
    /// marked as an error.
    pub max_output_bytes: usize,
    /// Calls to the plugin in flight at once; further calls wait for a slot until their deadline.
    pub max_concurrent_calls: usize,
}

impl Default for Permissions {
    /// The strictest settings: what a manifest without `[permissions]` gets.
    fn default() -> Self {
        Permissions {
            confinement: Confinement {
                read_paths: Vec::new(),
                write_paths: Vec::new(),
                network: NetworkPolicy::None,
                unix_sockets: Vec::new(),
                memory_bytes: 256 * MIB,
                cpu_seconds: 5,
                max_processes: 1,
                max_open_files: 64,
                max_file_bytes: 0,
            },
            timeout: Duration::from_secs(10),
            max_output_bytes: 65536,
            max_concurrent_calls: 1,
        }
    }
}

/// Why a manifest was rejected: the file, the line and the field (if one is to blame) and
/// what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{}{}: {}{message}",
    file.display(),
    line.map(|line| format!(":{line}")).unwrap_or_default(),
    field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default()
)]
pub struct ManifestError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

/// Where bare command names are looked for: the phi3d binary's own folder, then `PATH`, then
/// the plugins built into phi3d.
#[derive(Debug, Clone, Default)]
pub struct CommandSearch {
    /// The folder of the running phi3d binary.
    pub exe_dir: Option<PathBuf>,
    /// The folders of `PATH`.
    pub path: Vec<PathBuf>,
    /// The running phi3d binary, which serves a bundled plugin when run under its name.
    pub phi3d: Option<PathBuf>,
}

impl CommandSearch {
    /// The search of the running process: `std::env::current_exe`'s folder, then `PATH`, then
    /// `std::env::current_exe` itself for a bundled plugin.
    pub fn from_env() -> Self {
        let phi3d = std::env::current_exe().ok();
        let exe_dir = phi3d.as_deref().and_then(Path::parent).map(Path::to_path_buf);
        let path = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        CommandSearch { exe_dir, path, phi3d }
    }

    fn find(&self, name: &str) -> Option<PathBuf> {
        self.exe_dir
            .iter()
            .chain(self.path.iter())
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable_file(candidate))
    }
}

/// The file as written: serde's shape of it, checked further by [`Manifest::parse`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    name: Option<String>,
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    start: StartSetting,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    permissions: PermissionsFile,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StartSetting {
    #[default]
    Lazy,
    Startup,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PermissionsFile {
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    network: Option<NetworkSetting>,
    #[serde(default)]
    unix_sockets: Vec<String>,
    memory_mb: Option<i64>,
    cpu_seconds: Option<i64>,
    timeout_seconds: Option<i64>,
    max_output_bytes: Option<i64>,
    max_concurrent_calls: Option<i64>,
    max_processes: Option<i64>,
    max_open_files: Option<i64>,
    max_file_size_mb: Option<i64>,
}

/// `network` as the file writes it: `"none"`, `"loopback"` or a list of `host:port`.
struct NetworkSetting(NetworkPolicy);

impl<'de> Deserialize<'de> for NetworkSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<NetworkSetting, D::Error> {
        struct NetworkVisitor;
        impl<'de> serde::de::Visitor<'de> for NetworkVisitor {
            type Value = NetworkSetting;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"none\", \"loopback\" or a list of host:port")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<NetworkSetting, E> {
                match value {
                    "none" => Ok(NetworkSetting(NetworkPolicy::None)),
                    "loopback" => Ok(NetworkSetting(NetworkPolicy::Loopback)),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<NetworkSetting, A::Error> {
                let mut endpoints = Vec::new();
                while let Some(item) = items.next_element::<String>()? {
                    let endpoint = parse_endpoint(&item).ok_or_else(|| {
                        serde::de::Error::custom(format!("{item:?} is not host:port (port 1 to 65535)"))
                    })?;
                    endpoints.push(endpoint);
                }
                Ok(NetworkSetting(NetworkPolicy::Connect(endpoints)))
            }
        }
        deserializer.deserialize_any(NetworkVisitor)
    }
}

impl Manifest {
    /// Reads and validates one manifest file.
    pub fn load(file: &Path, search: &CommandSearch) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(file).map_err(|e| error(file, None, format!("cannot read: {e}")))?;
        Manifest::parse(file, &text, search)
    }

    /// Validates the text of a manifest that lives (or would live) at `file`; the path gives the
    /// default name and the folder relative paths are resolved against.
    pub fn parse(file: &Path, text: &str, search: &CommandSearch) -> Result<Manifest, ManifestError> {
        let deserializer = toml::Deserializer::parse(text).map_err(|e| syntax_error(file, text, &e))?;
        let parsed: ManifestFile = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.span().map(|span| line_of(text, span.start));
            let message = in_toml_words(inner.message().trim());
            ManifestError { file: file.to_path_buf(), line, field: (field != ".").then_some(field), message }
        })?;
        let at = |field: &str, message: String| ManifestError {
            file: file.to_path_buf(),
            line: key_line(text, field),
            field: Some(field.to_owned()),
            message,
        };
        let folder = file.parent().unwrap_or(Path::new("."));

        let name = match parsed.name {
            Some(name) => name,
            None => file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        validate_name(&name).map_err(|m| at("name", m))?;
        let command = parsed.command.ok_or_else(|| at("command", "missing; say which program to run".into()))?;
        let (command, arg0) = resolve_command(&command, folder, search).map_err(|m| at("command", m))?;
        let start = match parsed.start {
            StartSetting::Lazy => StartMode::Lazy,
            StartSetting::Startup => StartMode::Startup,
        };
        for (key, value) in &parsed.env {
            let field = format!("env.{key}");
            if key.is_empty() || key.contains(['=', '\0']) {
                return Err(at(&field, "a variable name must be non-empty and hold no '=' or NUL".into()));
            }
            if value.contains('\0') {
                return Err(at(&field, "a value must not hold NUL".into()));
            }
        }

        let p = parsed.permissions;
        let defaults = Permissions::default();
        let paths = |key: &str, list: Vec<String>| -> Result<Vec<PathBuf>, ManifestError> {
            list.into_iter()
                .map(|s| {
                    if s.is_empty() || s.contains('\0') {
                        Err(at(&format!("permissions.{key}"), format!("{s:?} is not a path")))
                    } else {
                        Ok(folder.join(s))
                    }
                })
                .collect()
        };
        let number = |key: &str, value: Option<i64>, min: u64, max: u64| -> Result<Option<u64>, ManifestError> {
            match value {
                None => Ok(None),
                Some(n) if (min as i64..=max as i64).contains(&n) => Ok(Some(n as u64)),
                Some(n) => Err(at(&format!("permissions.{key}"), format!("expected a whole number from {min} to {max}, got {n}"))),
            }
        };
        // One key at a time, in the order `PermissionsFile` declares them: of several mistakes,
        // the first is the one reported.
        let sandbox_defaults = &defaults.confinement;
        let read_paths = paths("read", p.read)?;
        let write_paths = paths("write", p.write)?;
        let network = p.network.map_or_else(|| sandbox_defaults.network.clone(), |network| network.0);
        let unix_sockets = paths("unix_sockets", p.unix_sockets)?;
        let memory_bytes =
            number("memory_mb", p.memory_mb, 1, 1 << 20)?.map_or(sandbox_defaults.memory_bytes, |mb| mb * MIB);
        let cpu_seconds = number("cpu_seconds", p.cpu_seconds, 1, 86_400)?.unwrap_or(sandbox_defaults.cpu_seconds);
        let timeout =
            number("timeout_seconds", p.timeout_seconds, 1, 86_400)?.map_or(defaults.timeout, Duration::from_secs);
        let max_output_bytes = number("max_output_bytes", p.max_output_bytes, 1, 1 << 30)?
            .map_or(defaults.max_output_bytes, |n| n as usize);
        let max_concurrent_calls = number("max_concurrent_calls", p.max_concurrent_calls, 1, 1024)?
            .map_or(defaults.max_concurrent_calls, |n| n as usize);
        let max_processes =
            number("max_processes", p.max_processes, 1, 1 << 16)?.unwrap_or(sandbox_defaults.max_processes);
        let max_open_files =
            number("max_open_files", p.max_open_files, 1, 1 << 20)?.unwrap_or(sandbox_defaults.max_open_files);
        let max_file_bytes = number("max_file_size_mb", p.max_file_size_mb, 0, 1 << 20)?
            .map_or(sandbox_defaults.max_file_bytes, |mb| mb * MIB);
        let confinement = Confinement {
            read_paths,
            write_paths,
            network,
            unix_sockets,
            memory_bytes,
            cpu_seconds,
            max_processes,
            max_open_files,
            max_file_bytes,
        };
        let permissions = Permissions { confinement, timeout, max_output_bytes, max_concurrent_calls };
        Ok(Manifest { file: file.to_path_buf(), name, command, arg0, args: parsed.args, start, env: parsed.env, permissions })
    }
}

/// A TOML syntax error, on one line (its own Display is a multi-line snippet).
fn syntax_error(file: &Path, text: &str, e: &toml::de::Error) -> ManifestError {
    let line = e.span().map_or(1, |span| line_of(text, span.start));
    ManifestError {
        file: file.to_path_buf(),
        line: Some(line),
        field: None,
        message: format!("invalid TOML: {}", toml_lines::message(e)),
    }
}

/// serde's message in the words of TOML: tables, lists, whole numbers, keys. (Its "unknown
/// field `x`, expected one of ..." already lists the valid keys.)
fn in_toml_words(message: &str) -> String {
    let message = message.replace('\n', " ");
    // A list where a table belongs reaches a struct as a sequence of the wrong length.
    if message.starts_with("invalid length") && message.contains("expected struct") {
        return "expected a table, got a list".to_owned();
    }
    message
        .replacen("unknown field", "unknown key", 1)
        .replace("expected a sequence", "expected a list")
        .replace("expected a map", "expected a table")
        .replace("expected i64", "expected a whole number")
}

/// `host:port`, with IPv6 hosts in brackets (`[::1]:8123`).
fn parse_endpoint(s: &str) -> Option<HostPort> {
    let (host, port) = s.rsplit_once(':')?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    let port: u16 = port.parse().ok()?;
    let host_ok =
        !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    (host_ok && port != 0).then(|| HostPort { host: host.to_string(), port })
}

/// Plugin names become the prefix of `plugin.tool`, so they may not hold a dot, and they show
/// up in logs and prompts, so they stay short and plain.
fn validate_name(name: &str) -> Result<(), String> {
    let plain = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if name.is_empty() || name.len() > 64 || !plain {
        return Err(format!("{name:?} is not a plugin name: use 1 to 64 letters, digits, '_' or '-'"));
    }
    Ok(())
}

/// The program to run and, for a bundled plugin served by phi3d itself, the name to run it as.
fn resolve_command(command: &str, folder: &Path, search: &CommandSearch) -> Result<(PathBuf, Option<String>), String> {
    if command.is_empty() || command.contains('\0') {
        return Err(format!("{command:?} is not a program"));
    }
    let path = Path::new(command);
    let resolved = if path.is_absolute() {
        path.to_path_buf()
    } else if command.contains('/') {
        folder.join(path)
    } else {
        if let Some(found) = search.find(command) {
            return Ok((found, None));
        }
        if let Some(phi3d) = search.phi3d.as_ref().filter(|_| super::bundled::is_bundled(command)) {
            return Ok((phi3d.clone(), Some(command.to_owned())));
        }
        let beside = search.exe_dir.as_ref().map(|d| format!("{} or ", d.display())).unwrap_or_default();
        return Err(format!("cannot find {command:?} in {beside}PATH"));
    };
    if is_executable_file(&resolved) {
        Ok((resolved, None))
    } else {
        Err(format!("{} is not an executable file", resolved.display()))
    }
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn error(file: &Path, field: Option<&str>, message: String) -> ManifestError {
    ManifestError { file: file.to_path_buf(), line: None, field: field.map(str::to_string), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder holding an executable `tool` and a search that finds bare `tool` there.
    struct Setup {
        dir: tempfile::TempDir,
        search: CommandSearch,
    }

    fn setup() -> Setup {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let search = CommandSearch { exe_dir: Some(dir.path().to_path_buf()), path: Vec::new(), phi3d: None };
        Setup { dir, search }
    }

    impl Setup {
        fn parse(&self, text: &str) -> Result<Manifest, ManifestError> {
            Manifest::parse(&self.dir.path().join("clock.toml"), text, &self.search)
        }

        fn error(&self, text: &str) -> (Option<String>, String) {
            let e = self.parse(text).expect_err("the manifest should be rejected");
            assert_eq!(e.file, self.dir.path().join("clock.toml"));
            assert!(e.to_string().starts_with(&self.dir.path().join("clock.toml").display().to_string()));
            (e.field, e.message)
        }
    }

    #[test]
    fn defaults_are_the_strictest() {
        let s = setup();
        let m = s.parse("command = \"tool\"").unwrap();
        assert_eq!(m.name, "clock");
        assert_eq!(m.command, s.dir.path().join("tool"));
        assert!(m.args.is_empty());
        assert_eq!(m.start, StartMode::Lazy);
        assert!(m.env.is_empty());
        assert_eq!(m.permissions, Permissions::default());
        let p = &m.permissions;
        let c = &p.confinement;
        assert_eq!(c.network, NetworkPolicy::None);
        assert_eq!(c.memory_bytes, 256 * MIB);
        assert_eq!(p.timeout, Duration::from_secs(10));
        assert_eq!(p.max_output_bytes, 65536);
        assert_eq!((p.max_concurrent_calls, c.max_processes, c.max_open_files), (1, 1, 64));
        assert_eq!((c.cpu_seconds, c.max_file_bytes), (5, 0));
    }

    #[test]
    fn every_field() {
        let s = setup();
        let m = s
            .parse(
                r#"
                name = "my-clock_2"
                command = "./tool"
                args = ["--fast", "x"]
                start = "startup"
                [env]
                TZ = "Europe/Berlin"
                [permissions]
                read = ["/usr/share/zoneinfo", "data"]
                write = ["/tmp/x"]
                network = ["localhost:8123", "[::1]:443", "example.com:80"]
                memory_mb = 64
                cpu_seconds = 2
                timeout_seconds = 3
                max_output_bytes = 100
                max_concurrent_calls = 4
                max_processes = 8
                max_open_files = 16
                max_file_size_mb = 1
                "#,
            )
            .unwrap();
        assert_eq!(m.name, "my-clock_2");
        assert_eq!(m.command, s.dir.path().join("./tool"));
        assert_eq!(m.args, ["--fast", "x"]);
        assert_eq!(m.start, StartMode::Startup);
        assert_eq!(m.env["TZ"], "Europe/Berlin");
        let p = &m.permissions;
        let c = &p.confinement;
        assert_eq!(c.read_paths, [PathBuf::from("/usr/share/zoneinfo"), s.dir.path().join("data")]);
        assert_eq!(c.write_paths, [PathBuf::from("/tmp/x")]);
        let endpoint = |host: &str, port| HostPort { host: host.into(), port };
        assert_eq!(
            c.network,
            NetworkPolicy::Connect(vec![endpoint("localhost", 8123), endpoint("::1", 443), endpoint("example.com", 80)])
        );
        assert_eq!(c.memory_bytes, 64 * MIB);
        assert_eq!(c.cpu_seconds, 2);
        assert_eq!(p.timeout, Duration::from_secs(3));
        assert_eq!(p.max_output_bytes, 100);
        assert_eq!(p.max_concurrent_calls, 4);
        assert_eq!(c.max_processes, 8);
        assert_eq!(c.max_open_files, 16);
        assert_eq!(c.max_file_bytes, MIB);
    }

    #[test]
    fn network_loopback_and_none() {
        let s = setup();
        let net = |v: &str| {
            let manifest = s.parse(&format!("command = \"tool\"\n[permissions]\nnetwork = {v}")).unwrap();
            manifest.permissions.confinement.network
        };
        assert_eq!(net("\"loopback\""), NetworkPolicy::Loopback);
        assert_eq!(net("\"none\""), NetworkPolicy::None);
        assert_eq!(net("[]"), NetworkPolicy::Connect(Vec::new()));
    }

    #[test]
    fn command_lookup() {
        let s = setup();
        let absolute = s.dir.path().join("tool");
        let m = s.parse(&format!("command = {:?}", absolute.display().to_string())).unwrap();
        assert_eq!(m.command, absolute);

        // A bare name falls back to PATH when it is not next to phi3d.
        let on_path = CommandSearch {
            exe_dir: Some(PathBuf::from("/nonexistent")),
            path: vec![s.dir.path().to_path_buf()],
            phi3d: None,
        };
        let m = Manifest::parse(&s.dir.path().join("a.toml"), "command = \"tool\"", &on_path).unwrap();
        assert_eq!(m.command, absolute);

        // A bundled plugin installed nowhere is phi3d itself, run under the plugin's name.
        let built_in = CommandSearch { phi3d: Some(absolute.clone()), ..CommandSearch::default() };
        let m = Manifest::parse(&s.dir.path().join("c.toml"), "command = \"phi3d-plugin-clock\"", &built_in).unwrap();
        assert_eq!((m.command, m.arg0.as_deref()), (absolute.clone(), Some("phi3d-plugin-clock")));
        let (field, _) = s.error("command = \"phi3d-plugin-nothing\"");
        assert_eq!(field.as_deref(), Some("command"));

        let (field, message) = s.error("command = \"no-such-tool\"");
        assert_eq!(field.as_deref(), Some("command"));
        assert!(message.contains("cannot find \"no-such-tool\""), "{message}");

        let (field, message) = s.error("command = \"./missing\"");
        assert_eq!(field.as_deref(), Some("command"));
        assert!(message.contains("is not an executable file"), "{message}");

        // A file without an execute bit is not a program.
        std::fs::write(s.dir.path().join("plain"), "").unwrap();
        let (_, message) = s.error("command = \"./plain\"");
        assert!(message.contains("is not an executable file"), "{message}");
    }

    #[test]
    fn load_reads_the_file() {
        let s = setup();
        let file = s.dir.path().join("weather.toml");
        std::fs::write(&file, "command = \"tool\"").unwrap();
        assert_eq!(Manifest::load(&file, &s.search).unwrap().name, "weather");

        let e = Manifest::load(&s.dir.path().join("gone.toml"), &s.search).unwrap_err();
        assert!(e.message.starts_with("cannot read"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let s = setup();
        let cases: &[(&str, &str, &str)] = &[
            ("command = \"tool\"\nnetwork = 1", "network", "unknown key"),
            ("command = \"tool\"\n[permissions]\nreed = []", "permissions.reed", "unknown key"),
            ("args = []", "command", "missing"),
            ("command = 5", "command", "integer `5`, expected a string"),
            ("command = \"\"", "command", "is not a program"),
            ("name = \"a.b\"\ncommand = \"tool\"", "name", "is not a plugin name"),
            ("name = \"\"\ncommand = \"tool\"", "name", "is not a plugin name"),
            ("name = 1\ncommand = \"tool\"", "name", "expected a string"),
            ("command = \"tool\"\nargs = \"-x\"", "args", "expected a list"),
            ("command = \"tool\"\nargs = [1]", "args[0]", "expected a string"),
            ("command = \"tool\"\nstart = \"later\"", "start", "unknown variant `later`, expected `lazy` or `startup`"),
            ("command = \"tool\"\nenv = 1", "env", "integer `1`, expected a table"),
            ("command = \"tool\"\n[env]\nTZ = 1", "env.TZ", "integer `1`, expected a string"),
            ("command = \"tool\"\npermissions = []", "permissions", "expected a table"),
            ("command = \"tool\"\n[permissions]\nread = \"/\"", "permissions.read", "expected a list"),
            ("command = \"tool\"\n[permissions]\nwrite = [\"\"]", "permissions.write", "is not a path"),
            (
                "command = \"tool\"\n[permissions]\nnetwork = 5",
                "permissions.network",
                "integer `5`, expected \"none\", \"loopback\" or a list of host:port",
            ),
            (
                "command = \"tool\"\n[permissions]\nnetwork = \"all\"",
                "permissions.network",
                "string \"all\", expected \"none\", \"loopback\" or a list of host:port",
            ),
            ("command = \"tool\"\n[permissions]\nnetwork = [1]", "permissions.network[0]", "expected a string"),
            ("command = \"tool\"\n[permissions]\nnetwork = [\"host\"]", "permissions.network", "is not host:port"),
            ("command = \"tool\"\n[permissions]\nnetwork = [\"host:0\"]", "permissions.network", "is not host:port"),
            ("command = \"tool\"\n[permissions]\nnetwork = [\"::1:80\"]", "permissions.network", "is not host:port"),
            ("command = \"tool\"\n[permissions]\nnetwork = [\"a b:80\"]", "permissions.network", "is not host:port"),
            ("command = \"tool\"\n[permissions]\nmemory_mb = 0", "permissions.memory_mb", "from 1 to"),
            ("command = \"tool\"\n[permissions]\ncpu_seconds = -1", "permissions.cpu_seconds", "got -1"),
            ("command = \"tool\"\n[permissions]\ntimeout_seconds = 1.5", "permissions.timeout_seconds", "`1.5`, expected a whole number"),
            (
                "command = \"tool\"\n[permissions]\nmax_output_bytes = \"1k\"",
                "permissions.max_output_bytes",
                "string \"1k\", expected a whole number",
            ),
            (
                "command = \"tool\"\n[permissions]\nmax_concurrent_calls = 0",
                "permissions.max_concurrent_calls",
                "from 1",
            ),
            ("command = \"tool\"\n[permissions]\nmax_processes = 0", "permissions.max_processes", "from 1"),
            ("command = \"tool\"\n[permissions]\nmax_open_files = 0", "permissions.max_open_files", "from 1"),
            ("command = \"tool\"\n[permissions]\nmax_file_size_mb = -2", "permissions.max_file_size_mb", "from 0"),
        ];
        for (text, field, message) in cases {
            let (got_field, got_message) = s.error(text);
            assert_eq!(got_field.as_deref(), Some(*field), "{text}");
            assert!(got_message.contains(message), "{text}: {got_message}");
        }
    }

    #[test]
    fn errors_name_the_line() {
        let s = setup();
        let line = |text: &str| s.parse(text).unwrap_err().line;
        assert_eq!(line("command = \"tool\"\n[permissions]\nreed = []"), Some(3), "an unknown key");
        assert_eq!(line("command = \"tool\"\n\n[permissions]\nread = []\nmemory_mb = \"x\""), Some(5), "a wrong type");
        assert_eq!(line("command = \"tool\"\n[permissions]\nread = []\nmemory_mb = 0"), Some(4), "a value out of range");
        assert_eq!(line("name = \"a.b\"\ncommand = \"tool\""), Some(1));
        assert_eq!(line("args = []\ncommand = \"missing\""), Some(2));
        let e = s.parse("command = \"tool\"\n[permissions]\nreed = []").unwrap_err();
        assert!(e.to_string().ends_with("clock.toml:3: permissions.reed: unknown key `reed`, expected one of `read`, `write`, `network`, `unix_sockets`, `memory_mb`, `cpu_seconds`, `timeout_seconds`, `max_output_bytes`, `max_concurrent_calls`, `max_processes`, `max_open_files`, `max_file_size_mb`"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let s = setup();
        let (field, message) = s.error("command = ");
        assert_eq!(field, None);
        assert!(message.starts_with("invalid TOML"), "{message}");
    }

    #[test]
    fn error_display() {
        let e = error(Path::new("clock.toml"), Some("permissions.network"), "bad".into());
        assert_eq!(e.to_string(), "clock.toml: permissions.network: bad");
        let e = error(Path::new("clock.toml"), None, "cannot read".into());
        assert_eq!(e.to_string(), "clock.toml: cannot read");
    }
}
