//! SIGHUP: read the configuration again (file < environment < flags, as at start-up) and
//! apply what can change without dropping the model or a request in flight.
//!
//! Live keys take effect at once: `log`, `plugins_dir` and `sandbox.require` (the plugins are
//! rescanned on every reload), `tool_choice`, `max_tokens`, `tool_call_max_tokens`,
//! `max_tool_steps`, `shutdown_grace_seconds` and `shutdown_delay_seconds`. Every other key shapes the model, the
//! context or the listeners: a change to one is logged as needing a restart and the running
//! value is kept. A configuration that does not parse or validate is refused whole, with the
//! reason, and the running one stays.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Config, ConfigSource};
use crate::engine::{Engine, LoadState};
use crate::plugins::PluginRegistry;
use crate::service::live::{LivePublisher, LiveSettings};
use crate::systemd::Notifier;

/// Everything a reload may touch.
pub struct Reloader {
    pub source: ConfigSource,
    /// The configuration in effect; the shutdown reads its grace period here.
    pub current: watch::Sender<Config>,
    pub live: LivePublisher,
    pub plugins: PluginRegistry,
    pub engine: Engine,
    pub notifier: Arc<Notifier>,
}

/// Every field of [`Config`], once: those a reload applies (with the key a log line names) and
/// those that need a restart. Writes the three functions below from the two lists; a field in
/// neither list does not compile (the pattern in `with_live_keys` is exhaustive), so that a new
/// key cannot be forgotten here.
macro_rules! reload_keys {
    (
        live { $($live:ident => $name:literal),* $(,)? }
        restart { $($restart:ident),* $(,)? }
    ) => {
        /// The restart-only keys whose value differs between `running` and `wanted`.
        fn restart_keys_changed(running: &Config, wanted: &Config) -> Vec<&'static str> {
            let mut changed = Vec::new();
            $(if running.$restart != wanted.$restart { changed.push(stringify!($restart)); })*
            changed
        }

        /// The live keys whose value differs.
        fn live_keys_changed(running: &Config, wanted: &Config) -> Vec<&'static str> {
            let mut changed = Vec::new();
            $(if running.$live != wanted.$live { changed.push($name); })*
            changed
        }

        /// `running` with the live keys of `wanted`.
        fn with_live_keys(running: &Config, wanted: &Config) -> Config {
            let Config { $($live: _,)* $($restart: _,)* } = running;
            Config { $($live: wanted.$live.clone(),)* ..running.clone() }
        }
    };
}
reload_keys! {
    live {
        log => "log",
        plugins_dir => "plugins_dir",
        sandbox_require => "sandbox.require",
        tool_choice => "tool_choice",
        max_tokens => "max_tokens",
        tool_call_max_tokens => "tool_call_max_tokens",
        max_tool_steps => "max_tool_steps",
        max_tokens_limit => "max_tokens_limit",
        schema_limits => "schema_max_*",
        shutdown_grace_seconds => "shutdown_grace_seconds",
        shutdown_delay_seconds => "shutdown_delay_seconds",
    }
    restart {
        model, model_dir, listen, threads, ctx_size, batch_size, queue_size, mlock, offline, slots, kv_type,
        pinned_prompts, prompt_cache_dir, prompt_cache_disk_mb, prompt_cache_entries, prompt_cache_min_chunk, prompt_cache_ram_mb, lookup_draft_max, gpu_layers, rpc_workers, rpc_layers, unix_socket, unix_socket_mode,
        unix_socket_group, token_file, tls, allow_unauthenticated_network, max_request_bytes, max_prompt_tokens,
        max_streams_per_client, http_listen, http_plugin_tools, compile_timeout,
        header_timeout_seconds, body_timeout_seconds, idle_timeout_seconds, max_connections_per_client, max_connections,
        http_allowed_origins, http_allowed_hosts,
    }
}

/// Why a new configuration cannot be applied, beyond what `Config` validates.
fn refusal(running: &Config, wanted: &Config) -> Option<String> {
    if let Err(reason) = crate::logging::check_filter(&wanted.log) {
        return Some(format!("log: {reason}"));
    }
    if let Some(dir) = wanted.plugins_dir.as_ref().filter(|dir| running.plugins_dir.as_ref() != Some(*dir)) {
        if !dir.is_dir() {
            return Some(format!(
                "plugins_dir: {} is not a folder; create it or point plugins_dir at the manifests",
                dir.display()
            ));
        }
    }
    None
}

impl Reloader {
    /// Reloads on every SIGHUP until the task is dropped. `hangups` is created at start-up, so
    /// that a SIGHUP during the model load is a reload, not the default (termination).
    pub async fn run(self, mut hangups: tokio::signal::unix::Signal) {
        while hangups.recv().await.is_some() {
            self.notifier.reloading();
            self.reload().await;
            let status = match self.engine.state() {
                LoadState::Ready(_) => crate::systemd::status::warm_line(&self.engine),
                _ => "loading model".to_owned(),
            };
            self.notifier.reloaded(&status);
        }
    }

    /// One reload: applied, or refused with the reason, and logged either way.
    pub async fn reload(&self) {
        let path = self.source.path.display().to_string();
        let running = self.current.borrow().clone();
        let wanted = match self.source.load() {
            Ok(wanted) => wanted,
            Err(error) => {
                tracing::error!(config = %path, "reload refused, the running configuration stays: {error}");
                return;
            }
        };
        if let Some(reason) = refusal(&running, &wanted) {
            tracing::error!(config = %path, "reload refused, the running configuration stays: {reason}");
            return;
        }
        for key in restart_keys_changed(&running, &wanted) {
            tracing::warn!(key, "{key} changed but needs a restart; the running value stays until then");
        }
        let changed = live_keys_changed(&running, &wanted);
        let effective = with_live_keys(&running, &wanted);
        if running.log != effective.log
            && let Err(reason) = crate::logging::set_filter(&effective.log)
        {
            tracing::error!("log: {reason}");
        }
        self.live.send_replace(LiveSettings::of(&effective));
        let requirement = effective.sandbox_require;
        let folder = crate::plugins::bundled::plugins_folder(effective.plugins_dir.as_deref());
        if let Err(error) = self.plugins.reload(folder.path, requirement).await {
            tracing::error!("plugins: {error}");
        }
        self.current.send_replace(effective);
        tracing::info!(config = %path, changed = %changed.join(", "), "configuration reloaded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn config(settings: Settings) -> Config {
        Config::from_settings(settings).unwrap()
    }

    #[test]
    fn live_keys_apply_and_restart_keys_keep_their_running_value() {
        let running = config(Settings::default());
        let wanted = config(Settings {
            max_tokens: Some(7),
            ctx_size: Some(1024),
            listen: Some("127.0.0.1:1".into()),
            ..Settings::default()
        });
        // slots, prompt_cache_entries, max_prompt_tokens and max_tokens_limit follow ctx_size
        // unless set: they changed too.
        assert_eq!(
            restart_keys_changed(&running, &wanted),
            ["listen", "ctx_size", "slots", "prompt_cache_entries", "max_prompt_tokens"]
        );
        assert_eq!(live_keys_changed(&running, &wanted), ["max_tokens", "max_tokens_limit"]);
        let effective = with_live_keys(&running, &wanted);
        assert_eq!((effective.max_tokens, effective.ctx_size), (7, running.ctx_size));
        assert_eq!(effective.listen, running.listen);
    }

    #[test]
    fn a_bad_filter_or_a_missing_plugins_folder_is_refused() {
        let running = config(Settings::default());
        let wanted = config(Settings { log: Some("info,=[".into()), ..Settings::default() });
        assert!(refusal(&running, &wanted).is_some_and(|reason| reason.starts_with("log:")));
        let wanted = config(Settings { plugins_dir: Some("/nonexistent/plugins".into()), ..Settings::default() });
        assert!(refusal(&running, &wanted).is_some_and(|reason| reason.starts_with("plugins_dir:")));
    }
}
