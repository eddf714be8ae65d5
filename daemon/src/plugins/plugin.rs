//! One plugin over its lifetime: the manifest, the process serving it now, restarts after
//! crashes, the concurrency limit, and retirement when its manifest changes or goes away.
//!
//! A process is started lazily (at the first call or listing) or at once for
//! `start = "startup"`. When it fails (crash, timeout, protocol violation, failed start) it is
//! replaced on next use, but not sooner than a backoff after the failure: 1 s, doubling with
//! each failure in a row up to 60 s, and reset by a successful call. A call waits out a
//! backoff that ends before its deadline and fails fast otherwise; a listing never waits
//! and shows the last tools known, so a restarting plugin does not vanish from the prompt.
//! A call's deadline is its timeout from when it was made: a free call slot, a backoff and a
//! start are waited for within it, not on top of it.
//!
//! Retiring waits until the calls in flight have finished (each is bounded by its timeout)
//! and only then stops the process, so a hot reload never cuts a call off.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rmcp::model::Tool;
use tokio::sync::{Mutex, Semaphore};

use super::manifest::Manifest;
use super::output;
use super::process::{CallOutcome, PluginProcess};
use crate::sandbox;

/// The first restart delay after a failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Extra time a retirement gives in-flight calls beyond their own timeout.
const RETIRE_GRACE: Duration = Duration::from_secs(5);

/// The result of one call, before the registry adds timing and audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallResult {
    pub content: String,
    pub is_error: bool,
}

impl CallResult {
    fn error(content: String) -> Self {
        CallResult { content, is_error: true }
    }
}

/// A plugin, whether or not its process is running.
pub struct Plugin {
    manifest: Manifest,
    support: sandbox::KernelSupport,
    requirement: sandbox::Requirement,
    run_as: u32,
    permits: Arc<Semaphore>,
    state: Mutex<State>,
    /// Failures in a row; sets the backoff.
    failures: AtomicU32,
    retired: AtomicBool,
    /// The last listing, for listings while no process can answer (crashed, restarting, or
    /// starting: a start holds `state`, and a listing never waits for it). Never held across
    /// an await.
    last_listing: std::sync::Mutex<Option<Listing>>,
}

#[derive(Default)]
struct State {
    process: Option<Arc<PluginProcess>>,
    /// When and why the last process (or start) failed.
    last_failure: Option<(Instant, String)>,
}

/// The tools and protections of the last process that listed them.
type Listing = (Vec<Tool>, Vec<String>);

impl Plugin {
    /// `run_as`: the plugin's own uid, used when phi3d is root.
    pub fn new(
        manifest: Manifest,
        support: sandbox::KernelSupport,
        requirement: sandbox::Requirement,
        run_as: u32,
    ) -> Self {
        Plugin {
            run_as,
            permits: Arc::new(Semaphore::new(manifest.permissions.max_concurrent_calls)),
            manifest,
            support,
            requirement,
            state: Mutex::new(State::default()),
            failures: AtomicU32::new(0),
            retired: AtomicBool::new(false),
            last_listing: std::sync::Mutex::new(None),
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// Starts the process now if it is not running (for `start = "startup"`).
    pub async fn start(&self) -> Result<(), String> {
        self.process(Duration::ZERO).await.map(drop)
    }

    /// The tools and the protections they run under; starts the process if needed. While the
    /// plugin cannot answer (crashed, restarting, or starting for another caller), the tools
    /// it last listed stand in, at once.
    pub async fn tools(&self) -> Result<Listing, String> {
        let last = || self.last_listing.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        if self.state.try_lock().is_err() {
            return last().ok_or_else(|| "it is starting".to_owned());
        }
        let listed = match self.process(Duration::ZERO).await {
            Ok(process) => {
                let tools = process.tools(self.manifest.permissions.timeout).await;
                tools.map(|tools| (tools, process.protections().to_vec()))
            }
            Err(error) => Err(error),
        };
        match listed {
            Ok(listing) => {
                *self.last_listing.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(listing.clone());
                Ok(listing)
            }
            Err(error) => match last() {
                Some(listing) if !listing.0.is_empty() => Ok(listing),
                _ => Err(error),
            },
        }
    }

    /// Calls `tool` (its MCP name) as `qualified` (`plugin.tool`, for messages), by `deadline`:
    /// waiting for a free call slot, for a restart backoff and for the start of a process all
    /// come out of the call's time, so the call ends by then whatever the plugin does.
    pub async fn call(
        &self,
        tool: &str,
        qualified: &str,
        arguments: serde_json::Value,
        deadline: tokio::time::Instant,
    ) -> CallResult {
        let permissions = &self.manifest.permissions;
        let timeout = permissions.timeout;
        let arguments = match arguments {
            serde_json::Value::Object(map) => Some(map),
            serde_json::Value::Null => None,
            other => {
                return CallResult::error(format!("the arguments of {qualified} must be a JSON object, got {other}"));
            }
        };
        let Ok(Ok(_permit)) = tokio::time::timeout_at(deadline, self.permits.acquire()).await else {
            return CallResult::error(format!(
                "the tool {qualified} is busy ({} calls in flight); try again later",
                permissions.max_concurrent_calls
            ));
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // A start abandoned at the deadline is stopped (whoever lets go of a process last kills it).
        let process = match tokio::time::timeout_at(deadline, self.process(left)).await {
            Ok(Ok(process)) => process,
            Ok(Err(error)) => return CallResult::error(format!("the tool {qualified} is not available: {error}")),
            Err(_) => {
                return CallResult::error(format!(
                    "the tool {qualified} is not available: its plugin did not start within {} s",
                    timeout.as_secs()
                ));
            }
        };
        match process.call(tool, arguments, deadline, timeout).await {
            CallOutcome::Answered(result) => {
                self.failures.store(0, Ordering::SeqCst);
                let (content, cut) = output::render(&result, permissions.max_output_bytes);
                CallResult { content, is_error: cut || result.is_error == Some(true) }
            }
            CallOutcome::Refused(message) => CallResult::error(format!("the tool {qualified} failed: {message}")),
            CallOutcome::TimedOut => CallResult::error(format!(
                "the tool {qualified} did not answer within {} s and was stopped",
                timeout.as_secs()
            )),
            CallOutcome::Crashed(reason) => CallResult::error(format!(
                "the plugin {} stopped during the call to {qualified}: {reason}",
                self.name()
            )),
        }
    }

    /// The running process, starting one if there is none. A restart backoff still running is
    /// waited out if it ends within `max_wait`, else this fails at once.
    async fn process(&self, max_wait: Duration) -> Result<Arc<PluginProcess>, String> {
        loop {
            let mut state = self.state.lock().await;
            if self.retired.load(Ordering::SeqCst) {
                return Err("the plugin was removed or replaced".into());
            }
            if let Some(process) = &state.process {
                match process.failure() {
                    None => return Ok(process.clone()),
                    Some((at, reason)) => {
                        // Stops what may be left of it (a plugin that closed its output but runs on).
                        process.kill_all(&reason);
                        state.process = None;
                        self.record_failure(&mut state, at, reason);
                    }
                }
            }
            if let Some((at, reason)) = &state.last_failure {
                let ready = *at + self.backoff();
                let wait = ready.saturating_duration_since(Instant::now());
                if wait > max_wait {
                    return Err(format!(
                        "{reason}; it will be restarted when used again in {} s",
                        wait.as_secs_f32().ceil()
                    ));
                }
                if !wait.is_zero() {
                    // Waited out without the state, so that listings and the plugin's removal
                    // are not held up; then everything is checked again.
                    drop(state);
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            return match PluginProcess::start(&self.manifest, &self.support, self.requirement, self.run_as).await {
                // Retired while starting: the process is dropped, which stops it.
                Ok(_) if self.retired.load(Ordering::SeqCst) => Err("the plugin was removed or replaced".into()),
                Ok(process) => {
                    let process = Arc::new(process);
                    state.last_failure = None;
                    state.process = Some(process.clone());
                    Ok(process)
                }
                Err(reason) => {
                    let reason = format!("it failed to start: {reason}");
                    self.record_failure(&mut state, Instant::now(), reason.clone());
                    Err(reason)
                }
            };
        }
    }

    /// Counts a failure at `at` (when it happened, not when it was noticed: a plugin that
    /// died long ago is restarted without a pointless wait).
    fn record_failure(&self, state: &mut State, at: Instant, reason: String) {
        let failures = self.failures.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::warn!(plugin = self.name(), failures, "plugin failed: {reason}");
        state.last_failure = Some((at, reason));
    }

    /// The restart delay after the failures so far.
    fn backoff(&self) -> Duration {
        let doublings = self.failures.load(Ordering::SeqCst).saturating_sub(1).min(16);
        (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
    }

    /// Refuses new work, lets the calls in flight finish (or time out), then stops the process.
    pub async fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        let all = u32::try_from(self.manifest.permissions.max_concurrent_calls).unwrap_or(u32::MAX);
        let drained =
            tokio::time::timeout(self.manifest.permissions.timeout + RETIRE_GRACE, self.permits.acquire_many(all))
                .await;
        if drained.is_err() {
            tracing::warn!(plugin = self.name(), "calls still in flight at retirement; stopping it anyway");
        }
        if let Some(process) = self.state.lock().await.process.take() {
            // Only the group: a new version of the plugin may already run under the same uid.
            process.kill("the plugin was removed or replaced");
        }
    }

    /// Stops the process at once, calls in flight or not (phi3d is shutting down).
    pub async fn stop(&self) {
        self.retired.store(true, Ordering::SeqCst);
        if let Some(process) = self.state.lock().await.process.take() {
            process.kill_all("phi3d is shutting down");
        }
    }
}
