//! What the engine tells whoever watches it: each generation as it ends.
//!
//! The engine is the bottom layer: it knows nothing of metrics or transports. Whoever
//! wants to count what happened (the metrics module) implements [`Observer`] and is handed in
//! through `EngineConfig`; the present state (slots, cells, load) is read from
//! [`super::Engine`] instead, so only events that would otherwise be lost pass through here.

use super::task::Completion;

/// Told by the worker thread, so it must be quick and never block: a count, not a write to a
/// client or the network.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// A generation ended with `Done` (for every API and every tool step alike).
    fn generation_ended(&self, done: &Completion);
}
