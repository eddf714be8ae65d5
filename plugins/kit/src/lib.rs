//! What the bundled plugins have in common: the single-threaded stdio transport they serve on
//! and, with the `testing` feature, the MCP client their integration tests drive them with.

pub mod stdio;
#[cfg(feature = "testing")]
pub mod testing;
