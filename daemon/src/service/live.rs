//! The request defaults that a reload (SIGHUP) may change while the daemon runs: each request
//! reads the current ones when it arrives, so a request in flight keeps what it started with.

use phi3d_proto::v1::ToolChoice;
use tokio::sync::watch;

use super::validate::Defaults;
use crate::config::Config;

#[derive(Debug, Clone, Copy)]
pub struct LiveSettings {
    pub defaults: Defaults,
    pub tool_choice: ToolChoice,
}

impl LiveSettings {
    pub fn of(config: &Config) -> LiveSettings {
        LiveSettings {
            defaults: Defaults {
                max_tokens: config.max_tokens,
                tool_call_max_tokens: config.tool_call_max_tokens,
                max_tool_steps: config.max_tool_steps,
                max_tokens_limit: config.max_tokens_limit,
                schema_limits: config.schema_limits,
            },
            tool_choice: config.tool_choice,
        }
    }
}

/// Where the services read the current settings; the reload publishes new ones.
pub type LiveReader = watch::Receiver<LiveSettings>;
pub type LivePublisher = watch::Sender<LiveSettings>;
