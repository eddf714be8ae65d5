//! Drives a built plugin binary over stdio the way phi3d does: an rmcp client on the child's
//! pipes, with the environment cleared except for what the test passes, as a manifest's `[env]`
//! would. Calls check the result's error flag, so a test states only what it expects to see.

use rmcp::{
    RoleClient, ServiceExt,
    model::{CallToolRequestParams, CallToolResult},
    service::RunningService,
    transport::{ConfigureCommandExt, TokioChildProcess},
};
use serde_json::Value;

/// A running plugin and the MCP session with it.
pub struct Plugin {
    pub client: RunningService<RoleClient, ()>,
}

/// Starts `program` with exactly the environment `env`, lets `setup` adjust the command (see
/// [`confine`]), and completes the MCP handshake.
pub async fn spawn(
    program: &str,
    env: &[(&str, &str)],
    setup: impl FnOnce(&mut tokio::process::Command),
) -> Plugin {
    let command = tokio::process::Command::new(program).configure(|cmd| {
        cmd.env_clear().envs(env.iter().copied());
        setup(cmd);
    });
    let transport = TokioChildProcess::new(command).expect("spawn the plugin");
    let client = ().serve(transport).await.expect("MCP initialize");
    Plugin { client }
}

/// Starts the plugin under RLIMIT_NPROC = 1, as phi3d's `max_processes = 1` sets it, so that
/// any thread it tried to start would fail. Root is exempt from that limit, so as root the
/// plugin also drops to the `nobody` user and group (65534).
pub fn confine(cmd: &mut tokio::process::Command) {
    // SAFETY: between fork and exec the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(|| {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            if libc::geteuid() == 0 {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(65534))?;
                check(libc::setuid(65534))?;
            }
            check(libc::setrlimit(
                libc::RLIMIT_NPROC,
                &libc::rlimit {
                    rlim_cur: 1,
                    rlim_max: 1,
                },
            ))
        });
    }
}

impl Plugin {
    /// Calls `tool`; only a protocol-level failure panics, a tool error is returned.
    async fn call(&self, tool: &str, arguments: Value) -> CallToolResult {
        let Value::Object(arguments) = arguments else {
            panic!("arguments must be an object")
        };
        self.client
            .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments))
            .await
            .unwrap_or_else(|e| panic!("tools/call {tool} failed at the protocol level: {e}"))
    }

    /// The whole result of a call that must succeed, for a test that checks more of it than
    /// [`Plugin::ok`] hands back.
    pub async fn succeeded(&self, tool: &str, arguments: Value) -> CallToolResult {
        let result = self.call(tool, arguments).await;
        assert_eq!(
            result.is_error,
            Some(false),
            "{tool} failed: {}",
            text(&result)
        );
        result
    }

    /// Text and structured content of a call that must succeed.
    pub async fn ok(&self, tool: &str, arguments: Value) -> (String, Value) {
        let result = self.succeeded(tool, arguments).await;
        (
            text(&result),
            result.structured_content.expect("structured content"),
        )
    }

    /// Text of a call that must fail as a tool error.
    pub async fn err(&self, tool: &str, arguments: Value) -> String {
        let result = self.call(tool, arguments).await;
        assert_eq!(
            result.is_error,
            Some(true),
            "{tool} should have failed: {}",
            text(&result)
        );
        text(&result)
    }
}

/// The text blocks of a result, joined.
pub fn text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text())
        .map(|t| t.text.as_str())
        .collect()
}
