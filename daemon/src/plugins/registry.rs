//! Every plugin of the plugins folder, kept in step with its manifests while phi3d runs.
//!
//! On start every `*.toml` of the folder is loaded and the folder is watched. After each
//! change the folder is rescanned and compared with what runs:
//!
//! - a new manifest adds its plugin (started at once if `start = "startup"`);
//! - a changed manifest (content or modification time, so `touch` restarts a plugin) replaces
//!   it: the new version serves new calls at once, the old process is stopped when its calls
//!   in flight have finished or timed out;
//! - a removed manifest retires its plugin the same way;
//! - a bad manifest is rejected with a log line naming the file and field, and nothing else
//!   changes: if an earlier version of it was loaded, that version keeps running, because
//!   a typo while editing should not take a working tool away;
//! - two manifests claiming one plugin name: the one already loaded (or else the first by
//!   file name) wins, the other is rejected.
//!
//! A missing folder means no plugins (phi3d runs without tools); it is not watched, so
//! creating it later needs a reload (SIGHUP) or a restart. So does any change when the folder
//! cannot be watched (inotify limits), which is logged.
//!
//! A reload ([`PluginRegistry::reload`]) rescans, and may point the registry at another folder
//! (plugins of the old one retire as if their manifests were removed) or change the sandbox
//! requirement (every plugin is then replaced, so that the new one applies).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::manifest::{CommandSearch, Manifest, ManifestError, StartMode};
use super::plugin::Plugin;
use super::watch;
use crate::sandbox;

/// How long to let a burst of file events settle before rescanning.
const SETTLE: Duration = Duration::from_millis(150);

/// One tool as the model and the tool loop see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolInfo {
    /// The plugin offering it.
    pub plugin: String,
    /// Its MCP name within the plugin.
    pub name: String,
    /// `plugin.name`: what the model calls.
    pub qualified_name: String,
    pub description: String,
    /// The JSON schema of its arguments (an object schema).
    pub input_schema: serde_json::Value,
    /// What the sandbox enforces on its plugin, one line per protection.
    pub protections: Vec<String>,
}

/// A tool a plugin lists that is not offered to the model, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedTool {
    pub plugin: String,
    /// `plugin.name`, as the plugin named it.
    pub qualified_name: String,
    pub reason: String,
}

/// Every plugin's tools: those offered and those skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolListing {
    pub tools: Vec<ToolInfo>,
    pub skipped: Vec<SkippedTool>,
}

/// How a call ended. Failures of every kind (unknown tool, plugin error, timeout, crash, cut
/// output) are `is_error` with a message written for the model to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutcome {
    pub content: String,
    pub is_error: bool,
    pub duration: Duration,
}

/// Why the registry could not start.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read the plugins folder {}: {source}", dir.display())]
    ReadDir { dir: PathBuf, source: std::io::Error },
}

/// The plugins; cheap to clone (all clones share one set).
#[derive(Clone)]
pub struct PluginRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    dir: RwLock<PathBuf>,
    support: sandbox::KernelSupport,
    requirement: RwLock<sandbox::Requirement>,
    uids: sandbox::UidAllocator,
    search: CommandSearch,
    /// Loaded plugins by manifest file. Never held across an await.
    plugins: RwLock<BTreeMap<PathBuf, Loaded>>,
    /// The last error logged per rejected file, so a rescan does not repeat it.
    rejected: Mutex<HashMap<PathBuf, String>>,
    /// Serialises rescans.
    rescan: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    /// Stops watching the current folder (a child of `shutdown`).
    watching: Mutex<CancellationToken>,
    /// Counts every call by plugin and outcome.
    metrics: crate::metrics::Metrics,
}

/// Dropping the last handle without [`PluginRegistry::shutdown`] still stops the watcher; the
/// plugins' processes are killed as their last users let go of them.
impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Clone)]
struct Loaded {
    plugin: Arc<Plugin>,
    modified: Option<SystemTime>,
}

impl PluginRegistry {
    /// Loads every manifest of `dir`, starts the `startup` plugins (in the background) and
    /// watches the folder until [`PluginRegistry::shutdown`].
    pub async fn start(
        dir: PathBuf,
        support: sandbox::KernelSupport,
        requirement: sandbox::Requirement,
        metrics: crate::metrics::Metrics,
    ) -> Result<PluginRegistry, RegistryError> {
        let shutdown = CancellationToken::new();
        let registry = PluginRegistry {
            inner: Arc::new(Inner {
                dir: RwLock::new(dir.clone()),
                support,
                requirement: RwLock::new(requirement),
                uids: sandbox::UidAllocator::new(),
                search: CommandSearch::from_env(),
                plugins: RwLock::new(BTreeMap::new()),
                rejected: Mutex::new(HashMap::new()),
                rescan: tokio::sync::Mutex::new(()),
                watching: Mutex::new(shutdown.child_token()),
                shutdown,
                metrics,
            }),
        };
        registry.watch_and_scan(&dir).await?;
        Ok(registry)
    }

    /// Watches `dir` (until the folder changes or shutdown) and loads its manifests.
    async fn watch_and_scan(&self, dir: &std::path::Path) -> Result<(), RegistryError> {
        if !dir.is_dir() {
            tracing::warn!(dir = %dir.display(), "the plugins folder does not exist; running without tools");
            return self.rescan().await;
        }
        // Watch before the first scan, so that nothing written in between is missed. Without a
        // watch (the kernel's inotify limits reached) the plugins still work, only not reloaded.
        let watching = watch::watch(dir);
        self.rescan().await?;
        match watching {
            Ok((watcher, changes)) => {
                let weak = Arc::downgrade(&self.inner);
                let stop = self.inner.watching.lock().unwrap_or_else(|e| e.into_inner()).clone();
                tokio::spawn(PluginRegistry::follow(weak, stop, watcher, changes));
            }
            Err(error) => tracing::error!(
                dir = %dir.display(),
                "cannot watch the plugins folder ({error}); changes to it take effect at the next reload"
            ),
        }
        Ok(())
    }

    /// Applies a reloaded configuration: rescans the folder (another one if `dir` changed,
    /// whose plugins then replace the old folder's) and, if the sandbox requirement changed,
    /// replaces every plugin so that it applies. Calls in flight finish on the old plugins.
    pub async fn reload(&self, dir: PathBuf, requirement: sandbox::Requirement) -> Result<(), RegistryError> {
        let old_requirement =
            std::mem::replace(&mut *self.inner.requirement.write().unwrap_or_else(|e| e.into_inner()), requirement);
        if old_requirement != requirement {
            // Forgetting when the manifests were read makes the rescan load each one anew.
            for loaded in self.inner.plugins.write().unwrap_or_else(|e| e.into_inner()).values_mut() {
                loaded.modified = None;
            }
        }
        let old_dir = std::mem::replace(&mut *self.inner.dir.write().unwrap_or_else(|e| e.into_inner()), dir.clone());
        if old_dir == dir {
            return self.rescan().await;
        }
        let fresh = self.inner.shutdown.child_token();
        std::mem::replace(&mut *self.inner.watching.lock().unwrap_or_else(|e| e.into_inner()), fresh).cancel();
        self.watch_and_scan(&dir).await
    }

    /// Rescans after every change until shutdown, or until the last handle to the registry is
    /// dropped (so it holds the registry only weakly). Holds the watcher so it lives as long.
    async fn follow(
        registry: Weak<Inner>,
        shutdown: CancellationToken,
        watcher: notify::RecommendedWatcher,
        mut changes: tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let _watcher = watcher;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                change = changes.recv() => if change.is_none() { return },
            }
            tokio::time::sleep(SETTLE).await;
            while changes.try_recv().is_ok() {}
            let Some(inner) = registry.upgrade() else { return };
            if let Err(error) = (PluginRegistry { inner }).rescan().await {
                tracing::error!("{error}");
            }
        }
    }

    /// Brings the loaded plugins in line with the manifests in the folder.
    async fn rescan(&self) -> Result<(), RegistryError> {
        let _one_at_a_time = self.inner.rescan.lock().await;
        if self.inner.shutdown.is_cancelled() {
            return Ok(());
        }
        let dir = self.inner.dir.read().unwrap_or_else(|e| e.into_inner()).clone();
        // A folder that does not exist holds no plugins (start-up and reload check it first).
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|path| watch::is_manifest(path) && path.is_file())
                .collect(),
            Err(source) if source.kind() == std::io::ErrorKind::NotFound && !self.any_loaded() => Vec::new(),
            Err(source) => return Err(RegistryError::ReadDir { dir, source }),
        };
        files.sort();

        let current = self.inner.plugins.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut next: BTreeMap<PathBuf, Loaded> = BTreeMap::new();
        let mut added = Vec::new();
        let mut errors = HashMap::new();

        // Unchanged files keep their plugins, and their names, first: a newcomer cannot steal a
        // running plugin's name.
        let mut loaded: Vec<(PathBuf, Result<Loaded, ManifestError>)> = Vec::new();
        for file in files {
            let modified = std::fs::metadata(&file).and_then(|m| m.modified()).ok();
            match current.get(&file) {
                Some(old) if old.modified == modified => {
                    next.insert(file, old.clone());
                }
                _ => {
                    let manifest = Manifest::load(&file, &self.inner.search);
                    loaded.push((file, manifest.map(|m| self.loaded(m, modified))));
                }
            }
        }
        // A changed manifest keeps the name its running version holds until it is processed.
        let mut reserved: Vec<(PathBuf, String)> = loaded
            .iter()
            .filter_map(|(file, _)| current.get(file).map(|old| (file.clone(), old.plugin.name().to_string())))
            .collect();
        for (file, result) in loaded {
            reserved.retain(|(reserved_by, _)| *reserved_by != file);
            let taken_by = |name: &str, next: &BTreeMap<PathBuf, Loaded>| {
                let loaded = next.iter().map(|(other, l)| (other, l.plugin.name()));
                let reserved = reserved.iter().map(|(other, n)| (other, n.as_str()));
                loaded.chain(reserved).find(|(other, n)| **other != file && *n == name).map(|(other, _)| other.clone())
            };
            match result {
                Ok(new) => match taken_by(new.plugin.name(), &next) {
                    Some(other) => {
                        let error = ManifestError {
                            file: file.clone(),
                            line: None,
                            field: Some("name".into()),
                            message: format!(
                                "the plugin name {:?} is already used by {}",
                                new.plugin.name(),
                                other.display()
                            ),
                        };
                        errors.insert(file.clone(), error.to_string());
                        if let Some(old) = current.get(&file) {
                            next.insert(file, old.clone());
                        }
                    }
                    None => {
                        if current.get(&file).is_some_and(|old| *old.plugin.manifest() == *new.plugin.manifest()) {
                            // Only touched or rewritten with the same content: still a restart,
                            // as touching a manifest is the way to ask for one.
                            tracing::info!(file = %file.display(), "plugin manifest touched; restarting");
                        }
                        added.push(new.plugin.clone());
                        next.insert(file, new);
                    }
                },
                Err(error) => {
                    errors.insert(file.clone(), error.to_string());
                    if let Some(old) = current.get(&file) {
                        next.insert(file, old.clone());
                    }
                }
            }
        }

        let retired: Vec<Arc<Plugin>> = current
            .iter()
            .filter(|(file, old)| next.get(*file).is_none_or(|new| !Arc::ptr_eq(&new.plugin, &old.plugin)))
            .map(|(_, old)| old.plugin.clone())
            .collect();
        *self.inner.plugins.write().unwrap_or_else(|e| e.into_inner()) = next;

        self.report_rejections(errors);
        for plugin in retired {
            tracing::info!(plugin = plugin.name(), file = %plugin.manifest().file.display(), "plugin unloaded");
            tokio::spawn(async move { plugin.retire().await });
        }
        for plugin in added {
            let manifest = plugin.manifest();
            tracing::info!(plugin = plugin.name(), file = %manifest.file.display(), "plugin loaded");
            if manifest.start == StartMode::Startup {
                tokio::spawn(async move {
                    if let Err(error) = plugin.start().await {
                        tracing::warn!(plugin = plugin.name(), "{error}");
                    }
                });
            }
        }
        Ok(())
    }

    /// The uid the plugin `name` runs as when phi3d is root (its own; see [`sandbox::UidAllocator`]).
    pub fn plugin_uid(&self, name: &str) -> u32 {
        self.inner.uids.uid(name)
    }

    fn loaded(&self, manifest: Manifest, modified: Option<SystemTime>) -> Loaded {
        let run_as = self.inner.uids.uid(&manifest.name);
        let requirement = *self.inner.requirement.read().unwrap_or_else(|e| e.into_inner());
        let plugin = Plugin::new(manifest, self.inner.support.clone(), requirement, run_as);
        Loaded { plugin: Arc::new(plugin), modified }
    }

    /// Logs each rejection once (until its message changes or the file is fixed).
    fn report_rejections(&self, errors: HashMap<PathBuf, String>) {
        let mut rejected = self.inner.rejected.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = self.inner.plugins.read().unwrap_or_else(|e| e.into_inner());
        for (file, error) in &errors {
            if rejected.get(file) != Some(error) {
                let kept = if loaded.contains_key(file) { "; its previous version keeps running" } else { "" };
                tracing::error!(target: "phi3d::plugins", "plugin manifest rejected: {error}{kept}");
            }
        }
        *rejected = errors;
    }

    fn any_loaded(&self) -> bool {
        !self.inner.plugins.read().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    fn plugins(&self) -> Vec<Arc<Plugin>> {
        let plugins = self.inner.plugins.read().unwrap_or_else(|e| e.into_inner());
        plugins.values().map(|l| l.plugin.clone()).collect()
    }

    fn plugin(&self, name: &str) -> Option<Arc<Plugin>> {
        self.plugins().into_iter().find(|p| p.name() == name)
    }

    /// Every tool of every plugin, sorted by qualified name (see [`PluginRegistry::listing`]).
    pub async fn tools(&self) -> Vec<ToolInfo> {
        self.listing().await.tools
    }

    /// Every tool of every plugin, sorted by qualified name, and the tools left out: a name
    /// that is not an MCP tool name, or an input schema that does not compile (each logged
    /// once per listing; the plugin's other tools are still offered). Starts lazy plugins
    /// that have not run yet (their tools are only known by asking them). A plugin that cannot
    /// list its tools is left out, with a log line.
    pub async fn listing(&self) -> ToolListing {
        if self.inner.shutdown.is_cancelled() {
            return ToolListing::default();
        }
        let plugins = self.plugins();
        let listings = futures::future::join_all(plugins.iter().map(|p| p.tools())).await;
        let mut listing = ToolListing::default();
        for (plugin, plugin_listing) in plugins.iter().zip(listings) {
            let (listed, protections) = match plugin_listing {
                Ok(plugin_listing) => plugin_listing,
                Err(error) => {
                    // Each failure was logged when it happened; a listing repeats it quietly.
                    tracing::debug!(plugin = plugin.name(), "tools left out: {error}");
                    continue;
                }
            };
            for tool in listed {
                let qualified_name = format!("{}.{}", plugin.name(), tool.name);
                let input_schema = serde_json::Value::Object((*tool.input_schema).clone());
                let problem = if !valid_tool_name(&tool.name) {
                    Some("its name is not [A-Za-z0-9_.-]{1,64}".to_owned())
                } else {
                    jsonschema::validator_for(&input_schema)
                        .err()
                        .map(|err| format!("its input schema is not a valid JSON schema: {err}"))
                };
                if let Some(reason) = problem {
                    tracing::warn!(plugin = plugin.name(), tool = %tool.name.escape_debug(), "tool skipped: {reason}");
                    listing.skipped.push(SkippedTool { plugin: plugin.name().to_string(), qualified_name, reason });
                    continue;
                }
                listing.tools.push(ToolInfo {
                    plugin: plugin.name().to_string(),
                    qualified_name,
                    name: tool.name.to_string(),
                    description: tool.description.as_deref().unwrap_or_default().to_string(),
                    input_schema,
                    protections: protections.clone(),
                });
            }
        }
        listing.tools.sort_by(|a, b| a.qualified_name.cmp(&b.qualified_name));
        listing.tools.dedup_by(|a, b| a.qualified_name == b.qualified_name);
        listing.skipped.sort_by(|a, b| a.qualified_name.cmp(&b.qualified_name));
        listing
    }

    /// Calls a tool by its qualified name (`plugin.tool`). Every failure is an `is_error`
    /// outcome. Never hangs: everything the call needs (starting the plugin and listing its
    /// tools, a free call slot, waiting out a restart backoff, the call itself) shares one
    /// deadline, the plugin's `timeout_seconds` from now. Each call is logged for audit
    /// (target `phi3d::audit`).
    pub async fn call(&self, qualified_name: &str, arguments: serde_json::Value) -> ToolOutcome {
        let started = Instant::now();
        let (plugin_name, tool) = qualified_name.split_once('.').unwrap_or((qualified_name, ""));
        let result = match self.plugin(plugin_name) {
            _ if self.inner.shutdown.is_cancelled() => Err("phi3d is shutting down".to_string()),
            Some(plugin) => {
                let timeout = plugin.manifest().permissions.timeout;
                let deadline = tokio::time::Instant::now() + timeout;
                match tokio::time::timeout_at(deadline, plugin.tools()).await {
                    Ok(Ok((tools, _))) if tools.iter().any(|t| t.name == tool) => {
                        Ok(plugin.call(tool, qualified_name, arguments, deadline).await)
                    }
                    Ok(Ok(_)) => Err(self.unknown(qualified_name).await),
                    Ok(Err(error)) => Err(format!("the tool {qualified_name} is not available: {error}")),
                    Err(_) => Err(format!(
                        "the tool {qualified_name} is not available: its plugin did not start within {} s",
                        timeout.as_secs()
                    )),
                }
            }
            None => Err(self.unknown(qualified_name).await),
        };
        let (content, is_error) = match result {
            Ok(result) => (result.content, result.is_error),
            Err(message) => (message, true),
        };
        let duration = started.elapsed();
        // Only installed plugins get a label of their own, so the label set stays bounded.
        let label = if self.plugin(plugin_name).is_some() { plugin_name } else { "unknown" };
        self.inner.metrics.plugin_call(label, is_error);
        tracing::info!(
            target: "phi3d::audit",
            plugin = plugin_name,
            tool,
            duration_ms = duration.as_millis() as u64,
            success = !is_error,
            "tool call"
        );
        ToolOutcome { content, is_error, duration }
    }

    async fn unknown(&self, qualified_name: &str) -> String {
        let known: Vec<String> = self.tools().await.into_iter().map(|t| t.qualified_name).collect();
        if known.is_empty() {
            format!("there is no tool {qualified_name:?}; no tools are available")
        } else {
            format!("there is no tool {qualified_name:?}; the tools are: {}", known.join(", "))
        }
    }

    /// Stops watching and kills every plugin's process group, calls in flight or not.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        // Wait out a rescan in progress, so no plugin is added behind our back.
        let _rescan = self.inner.rescan.lock().await;
        let plugins = std::mem::take(&mut *self.inner.plugins.write().unwrap_or_else(|e| e.into_inner()));
        futures::future::join_all(plugins.values().map(|l| l.plugin.stop())).await;
    }
}

/// The MCP tool name rules (letters, digits, `_`, `-`, `.`), within a length the prompt can
/// afford.
fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names() {
        assert!(valid_tool_name("get_time.v2-beta"));
        assert!(!valid_tool_name(""));
        assert!(!valid_tool_name("a b"));
        assert!(!valid_tool_name("ignore previous\ninstructions"));
        assert!(!valid_tool_name(&"x".repeat(65)));
    }
}
