//! One running plugin: a sandboxed child process and the MCP client session over its stdio.
//!
//! The child is started with [`sandbox::confine`] applied, which puts it in a process group
//! of its own, so that stopping it ([`sandbox::kill_group`]) also takes down whatever it
//! spawned in the background. The session uses the MCP `initialize` handshake at the newest
//! protocol version that has one, lists the tools, and calls them; a
//! `notifications/tools/list_changed` marks the cached tool list stale so that the next
//! listing asks again.
//!
//! Every way a hostile plugin can misbehave ends in a [`Fault`]: it exits, closes its output,
//! prints something that is not JSON-RPC or an over-long line ([`super::transport`]), or
//! does not answer in time. A faulted process is killed and never used again; the supervisor
//! ([`super::plugin`]) starts a new one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientCapabilities, ClientConfig, Implementation,
    JsonObject, PaginatedRequestParams, ProtocolVersion, Tool,
};
use rmcp::service::{ClientInitializeError, NotificationContext, RunningService};
use rmcp::{ClientHandler, RoleClient, ServiceError};
use tokio::io::BufReader;
use tokio::process::Command;

use super::manifest::Manifest;
use super::stderr::{self, StderrTail};
use super::transport::{Fault, StdioTransport};
use crate::sandbox;

/// The smallest cap on one JSON-RPC line from a plugin: room for a long tool list.
const MIN_LINE_BYTES: usize = 1 << 20;
/// Pages of `tools/list` followed before a plugin is considered to be stalling.
const MAX_TOOL_PAGES: usize = 32;
/// Tools one plugin may offer; more would swamp the model's prompt anyway.
const MAX_TOOLS: usize = 256;
/// How long to wait for the exit reason after the connection dropped mid-call.
const EXIT_REASON_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the last stderr lines of a process that failed.
const STDERR_GRACE: Duration = Duration::from_millis(500);

/// How a call to a running plugin ended.
#[derive(Debug)]
pub enum CallOutcome {
    /// The tool answered (its result may still say `is_error`).
    Answered(CallToolResult),
    /// The plugin refused the request with a JSON-RPC error; it is still healthy.
    Refused(String),
    /// The plugin did not answer within the timeout and was stopped.
    TimedOut,
    /// The plugin died or broke the protocol during the call, and was stopped.
    Crashed(String),
}

/// A started plugin process with an initialized MCP session.
pub struct PluginProcess {
    child: ChildHandle,
    session: RunningService<RoleClient, Handler>,
    tools_stale: Arc<AtomicBool>,
    tools: tokio::sync::Mutex<Vec<Tool>>,
    protections: Vec<String>,
}

impl PluginProcess {
    /// Spawns the plugin under its sandbox, initializes MCP and lists its tools, all within
    /// the manifest's timeout.
    pub async fn start(
        manifest: &Manifest,
        support: &sandbox::KernelSupport,
        requirement: sandbox::Requirement,
        run_as: u32,
    ) -> Result<PluginProcess, String> {
        let mut command = Command::new(&manifest.command);
        if let Some(arg0) = &manifest.arg0 {
            command.arg0(arg0);
        }
        command
            .args(&manifest.args)
            .current_dir("/")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let protections = sandbox::confine(&mut command, &policy(manifest, run_as), support, requirement)
            .map_err(|e| format!("cannot sandbox it: {e}"))?;
        let mut child = command.spawn().map_err(|e| format!("cannot start {}: {e}", manifest.command.display()))?;
        let (Some(pid), Some(stdin), Some(stdout), Some(stderr_pipe)) = (
            child.id().and_then(|pid| i32::try_from(pid).ok()),
            child.stdin.take(),
            child.stdout.take(),
            child.stderr.take(),
        ) else {
            return Err("it was started without its pipes".into());
        };
        if !protections.missing.is_empty() {
            tracing::warn!(plugin = manifest.name, missing = ?protections.missing, "plugin runs with a weaker sandbox");
        }
        tracing::info!(plugin = manifest.name, pid, %protections, "plugin started");

        sandbox::watch_group(pid);
        let handle = ChildHandle {
            name: manifest.name.clone(),
            pgid: pid,
            own_uid: protections.user.switched_from_root.then_some(protections.user.uid),
            fault: Fault::default(),
            stderr: StderrTail::default(),
            group_gone: Arc::new(AtomicBool::new(false)),
        };
        tokio::spawn(stderr::drain(manifest.name.clone(), BufReader::new(stderr_pipe), handle.stderr.clone()));
        tokio::spawn(watch_exit(manifest.name.clone(), child, pid, handle.fault.clone(), handle.group_gone.clone()));

        let max_line = MIN_LINE_BYTES.max(manifest.permissions.max_output_bytes.saturating_mul(4));
        let transport = StdioTransport::new(BufReader::new(stdout), stdin, max_line, handle.fault.clone());
        let tools_stale = Arc::new(AtomicBool::new(false));
        let handler = Handler { tools_stale: tools_stale.clone() };
        // One timeout covers the whole start: handshake and first listing.
        let timeout = manifest.permissions.timeout;
        let deadline = tokio::time::Instant::now() + timeout;

        let handshake = tokio::select! {
            session = rmcp::serve_client(handler, transport) => session.map_err(|e| {
                let lost = matches!(e, ClientInitializeError::ConnectionClosed(_) | ClientInitializeError::TransportError { .. });
                (format!("the MCP handshake failed: {e}"), lost)
            }),
            () = handle.fault.wait() => Err((String::new(), true)),
            () = tokio::time::sleep_until(deadline) => {
                Err((format!("it did not complete the MCP handshake within {} s", timeout.as_secs()), false))
            }
        };
        let session = match handshake {
            Ok(session) => session,
            Err((error, connection_lost)) => return Err(handle.fail(error, connection_lost).await),
        };
        let process = PluginProcess {
            child: handle,
            session,
            tools_stale,
            tools: tokio::sync::Mutex::new(Vec::new()),
            protections: protections.summary(),
        };
        let listed = process.fetch_tools(timeout, deadline).await?;
        *process.tools.lock().await = listed;
        Ok(process)
    }

    /// What the sandbox enforces on this process, one line per protection.
    pub fn protections(&self) -> &[String] {
        &self.protections
    }

    /// When and why the process became unusable (`None` while it is usable).
    pub fn failure(&self) -> Option<(Instant, String)> {
        let (at, reason) = match self.child.fault.get() {
            Some(fault) => fault,
            None if self.session.is_closed() => (Instant::now(), "it closed the MCP connection".into()),
            None => return None,
        };
        Some((at, self.child.with_stderr(reason)))
    }

    /// The tools, listed again if the plugin said they changed.
    pub async fn tools(&self, timeout: Duration) -> Result<Vec<Tool>, String> {
        let mut tools = self.tools.lock().await;
        if self.tools_stale.swap(false, Ordering::SeqCst) {
            match self.fetch_tools(timeout, tokio::time::Instant::now() + timeout).await {
                Ok(listed) => *tools = listed,
                Err(error) => {
                    self.tools_stale.store(true, Ordering::SeqCst);
                    return Err(error);
                }
            }
        }
        Ok(tools.clone())
    }

    /// All pages of `tools/list`, by `deadline` (`timeout` is the manifest's, for the message).
    /// A plugin that cannot list its tools is of no use: on failure it is stopped, so that it
    /// is restarted.
    async fn fetch_tools(&self, timeout: Duration, deadline: tokio::time::Instant) -> Result<Vec<Tool>, String> {
        let peer = self.session.peer();
        let listing = async {
            let mut tools = Vec::new();
            let mut cursor = None;
            for _ in 0..MAX_TOOL_PAGES {
                let page = peer
                    .list_tools(Some(PaginatedRequestParams::default().with_cursor(cursor)))
                    .await
                    .map_err(|e| (e.to_string(), lost_connection(&e)))?;
                tools.extend(page.tools);
                if tools.len() > MAX_TOOLS {
                    return Err((format!("it offers more than {MAX_TOOLS} tools"), false));
                }
                cursor = page.next_cursor;
                if cursor.is_none() {
                    return Ok(tools);
                }
            }
            Err((format!("its tool list did not end after {MAX_TOOL_PAGES} pages"), false))
        };
        let listed = tokio::select! {
            listed = listing => listed,
            () = self.child.fault.wait() => Err((String::new(), true)),
            () = tokio::time::sleep_until(deadline) => {
                Err((format!("it did not list its tools within {} s", timeout.as_secs()), false))
            }
        };
        match listed {
            Ok(tools) => Ok(tools),
            Err((error, connection_lost)) => Err(self.fail(error, connection_lost).await),
        }
    }

    /// Calls one tool, to answer by `deadline`; past it the whole process group is killed.
    /// `timeout` is the manifest's, for the message.
    pub async fn call(
        &self,
        tool: &str,
        arguments: Option<JsonObject>,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> CallOutcome {
        let mut params = CallToolRequestParams::new(tool.to_string());
        params.arguments = arguments;
        let answer = tokio::select! {
            answer = self.session.peer().call_tool_once(params) => answer,
            () = self.child.fault.wait() => Err(ServiceError::TransportClosed),
            () = tokio::time::sleep_until(deadline) => {
                self.kill(&format!("a call to {tool} did not answer within {} s", timeout.as_secs()));
                return CallOutcome::TimedOut;
            }
        };
        match answer {
            Ok(CallToolResponse::Complete(result)) => CallOutcome::Answered(result),
            Ok(_) => CallOutcome::Refused(
                "the plugin asked for more input or deferred the call as a task, which phi3d does not support".into(),
            ),
            Err(ServiceError::McpError(error)) => CallOutcome::Refused(error.message.into_owned()),
            Err(error) => {
                let connection_lost = lost_connection(&error);
                CallOutcome::Crashed(self.fail(error.to_string(), connection_lost).await)
            }
        }
    }

    /// Stops the process and everything it spawned; `reason` is what later errors will say.
    pub fn kill(&self, reason: &str) {
        self.session.cancellation_token().cancel();
        self.child.kill(reason);
    }

    /// [`kill`](Self::kill), and with a uid of its own, every process of that uid too. Only for
    /// the plugin's supervisor, while no other process of the plugin can be running.
    pub fn kill_all(&self, reason: &str) {
        self.kill(reason);
        if let Some(uid) = self.child.own_uid {
            sandbox::kill_user(uid);
        }
    }

    async fn fail(&self, error: String, connection_lost: bool) -> String {
        self.session.cancellation_token().cancel();
        self.child.fail(error, connection_lost).await
    }
}

/// The child process as seen from outside: its group, how it failed, its stderr.
struct ChildHandle {
    name: String,
    pgid: i32,
    /// The uid the plugin runs as when it is its own (phi3d is root).
    own_uid: Option<u32>,
    fault: Fault,
    stderr: StderrTail,
    /// Set once the group was killed after the leader exited: from then on the group id may be
    /// reused by an unrelated process, so it must not be signalled again.
    group_gone: Arc<AtomicBool>,
}

impl ChildHandle {
    /// Records `reason` (unless a reason is already known) and kills the process group.
    fn kill(&self, reason: &str) {
        self.fault.set(reason);
        if !self.group_gone.load(Ordering::SeqCst) {
            sandbox::kill_group(self.pgid);
        }
    }

    /// Stops the process after a failure and explains it, with the last stderr lines. When the
    /// connection was lost, the exit watcher usually records why a moment later, so it is
    /// waited for briefly; otherwise `error` is the reason.
    async fn fail(&self, error: String, connection_lost: bool) -> String {
        if connection_lost && !self.fault.is_set() {
            let _ = tokio::time::timeout(EXIT_REASON_GRACE, self.fault.wait()).await;
        }
        self.kill(if error.is_empty() { "it stopped" } else { &error });
        self.stderr.settle(STDERR_GRACE).await;
        self.with_stderr(self.fault.reason().unwrap_or(error))
    }

    fn with_stderr(&self, reason: String) -> String {
        match self.stderr.summary() {
            Some(tail) => format!("{reason} (its last stderr: {tail})"),
            None => reason,
        }
    }
}

/// Whoever lets go of the child last (a replaced process, or a start abandoned half way
/// because its caller went away) kills it.
impl Drop for ChildHandle {
    fn drop(&mut self) {
        tracing::debug!(plugin = self.name, pid = self.pgid, "plugin process released");
        self.kill("the plugin was stopped");
    }
}

/// Reaps the plugin when it exits, records how, and kills what it left running in its group.
async fn watch_exit(
    plugin: String,
    mut child: tokio::process::Child,
    pgid: i32,
    fault: Fault,
    group_gone: Arc<AtomicBool>,
) {
    // Kill the rest of the group while the exited leader is still an unreaped zombie: until it
    // is reaped its id cannot be handed to another process group. Only kernels without pidfds
    // (before 5.3) get the small race of killing right after the reap.
    let exited_unreaped = exited(pgid).await.is_ok();
    if exited_unreaped {
        sandbox::kill_group(pgid);
        group_gone.store(true, Ordering::SeqCst);
        sandbox::forget_group(pgid);
    }
    let status = child.wait().await;
    if !exited_unreaped {
        sandbox::kill_group(pgid);
        group_gone.store(true, Ordering::SeqCst);
        sandbox::forget_group(pgid);
    }
    let how = match status {
        Ok(status) => describe_exit(status),
        Err(error) => format!("waiting for it failed: {error}"),
    };
    tracing::info!(plugin, pid = pgid, "plugin process ended: {how}");
    fault.set(how);
}

/// Resolves once the process `pid` (our unreaped child) has exited, without reaping it.
async fn exited(pid: i32) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open only reads its two integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // A pidfd turns readable when its process exits.
    // SAFETY: the AsyncFd owns the descriptor, which stays open until it is dropped.
    let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    fd.readable().await.map(drop)
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("it exited with status {code}"),
        (None, Some(libc::SIGKILL)) => "it was killed (SIGKILL: stopped by phi3d, or over its CPU time)".into(),
        (None, Some(libc::SIGXCPU)) => "it used up its CPU time (SIGXCPU)".into(),
        (None, Some(libc::SIGSYS)) => "it made a system call its sandbox forbids (SIGSYS)".into(),
        (None, Some(libc::SIGSEGV)) => "it crashed (SIGSEGV; out of memory under its limit, or a bug)".into(),
        (None, Some(signal)) => format!("it was killed by signal {signal}"),
        (None, None) => format!("it ended ({status})"),
    }
}

/// Whether a request failed because the connection to the plugin is gone.
fn lost_connection(error: &ServiceError) -> bool {
    matches!(error, ServiceError::TransportClosed | ServiceError::TransportSend(_))
}

/// The sandbox policy a manifest asks for, run as `run_as`.
fn policy(manifest: &Manifest, run_as: u32) -> sandbox::Policy {
    sandbox::Policy {
        confinement: manifest.permissions.confinement.clone(),
        env: manifest.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        run_as,
    }
}

/// phi3d's side of the MCP session: it offers no capabilities of its own and only listens for
/// the tool list changing.
struct Handler {
    tools_stale: Arc<AtomicBool>,
}

impl ClientHandler for Handler {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(ClientCapabilities::default(), Implementation::new("phi3d", env!("CARGO_PKG_VERSION")))
            // The handshake that stdio MCP servers in the wild speak; rmcp negotiates from here.
            .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.tools_stale.store(true, Ordering::SeqCst);
    }
}
