//! Logging through `tracing`, with llama.cpp's own log lines routed into it.
//!
//! llama.cpp is chatty at info level (every tensor, every buffer), so its lines are kept to
//! warnings unless the filter names their target, `llama-cpp-2`, itself.
//!
//! Under systemd (stderr is the journal: `systemd::journal`) events go to journald natively,
//! each field its own journal field (`REQUEST_ID`, `PLUGIN`, `TOOL`, ...), so that
//! `journalctl -u phi3d PLUGIN=clock` finds a plugin's lines; elsewhere they are text on stderr.
//! The filter can be replaced while the daemon runs (a reload changing `log`).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The installed filter, for [`set_filter`].
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the subscriber; `RUST_LOG` wins over `filter` (the `log` config key).
pub fn init(filter: &str) {
    let filter = parse(filter).unwrap_or_else(|(directives, err)| {
        eprintln!("warning: log filter `{directives}` is invalid ({err}); using `info`");
        EnvFilter::new("info,llama-cpp-2=warn")
    });
    let (filter, handle) = reload::Layer::new(filter);
    let journald = if crate::systemd::journal::stderr_is_journal() {
        tracing_journald::layer()
            // Fields under their own names (REQUEST_ID, not the default F_REQUEST_ID).
            .map(|layer| layer.with_field_prefix(None).with_syslog_identifier("phi3d".into()))
            .inspect_err(|err| eprintln!("warning: cannot log to journald ({err}); logging to stderr"))
            .ok()
    } else {
        None
    };
    let stderr = journald.is_none().then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    tracing_subscriber::registry().with(filter).with(journald).with(stderr).init();
    let _ = FILTER.set(handle);
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
}

/// Replaces the filter of the running subscriber; the reason when `filter` is not a valid one
/// (the old filter then stays). `RUST_LOG`, when set, still wins.
pub fn set_filter(filter: &str) -> Result<(), String> {
    let filter = parse(filter).map_err(|(directives, err)| format!("`{directives}` is not a valid filter: {err}"))?;
    let handle = FILTER.get().ok_or("logging is not initialised")?;
    handle.reload(filter).map_err(|err| err.to_string())
}

/// Checks a filter without installing it.
pub fn check_filter(filter: &str) -> Result<(), String> {
    parse(filter).map(drop).map_err(|(directives, err)| format!("`{directives}` is not a valid filter: {err}"))
}

fn parse(filter: &str) -> Result<EnvFilter, (String, String)> {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    let directives =
        if directives.contains("llama-cpp-2") { directives } else { format!("{directives},llama-cpp-2=warn") };
    EnvFilter::try_new(&directives).map_err(|err| (directives, err.to_string()))
}
