//! Logging through `tracing`, with llama.cpp's own log lines routed into it.
//!
//! llama.cpp is chatty at info level (every tensor, every buffer), so its lines are kept to
//! warnings unless the filter names their target, `llama-cpp-2`, itself.

use tracing_subscriber::EnvFilter;

/// Installs the subscriber; `RUST_LOG` wins over `filter` (the `log` config key).
pub fn init(filter: &str) {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    let directives =
        if directives.contains("llama-cpp-2") { directives } else { format!("{directives},llama-cpp-2=warn") };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|err| {
        eprintln!("warning: log filter `{directives}` is invalid ({err}); using `info`");
        EnvFilter::new("info,llama-cpp-2=warn")
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
}
