//! Tool plugins: sandboxed MCP servers speaking JSON-RPC over stdio, declared by TOML manifests
//! in the plugins folder.
//!
//! | file | job |
//! |---|---|
//! | `bundled.rs` | the plugins that come with phi3d: built into its binary, their manifests found without configuration |
//! | `manifest.rs` | parse and validate one manifest; errors name the file and the field |
//! | `watch.rs` | notice changes in the plugins folder |
//! | `registry.rs` | [`PluginRegistry`]: every plugin, hot reload, tool listing, calls, audit log |
//! | `plugin.rs` | one plugin over time: lazy start, restart with backoff, concurrency, retirement |
//! | `process.rs` | one sandboxed process and its MCP session: handshake, tools, calls, timeouts |
//! | `transport.rs` | newline-delimited JSON-RPC over the child's stdio, with a line cap; malformed output is a fault |
//! | `stderr.rs` | the child's stderr into the log, bounded |
//! | `output.rs` | a tool result as text for the model, cut at `max_output_bytes` |
//!
//! A plugin is untrusted: whatever it does (hang, crash, flood its output, print garbage,
//! fork, eat memory), a call ends within its timeout with an error result, and phi3d and
//! the other plugins carry on.

pub mod bundled;
mod manifest;
mod output;
mod plugin;
mod process;
mod registry;
mod stderr;
mod transport;
mod watch;

pub use manifest::{CommandSearch, Manifest, ManifestError, Permissions, StartMode};
pub use registry::{PluginRegistry, RegistryError, SkippedTool, ToolInfo, ToolListing, ToolOutcome};
