//! Entry points for the fuzz tests (`tests/fuzz/http_bodies.rs`): a request body read as
//! `axum::Json` reads it, then mapped by the handlers' own functions, up to the plugin tools the
//! server adds (`HttpState::with_plugin_tools`), which take no input from the client.

use phi3d_proto::v1::ChatRequest;

use super::{ApiError, ChatBody, CompletionBody};

/// `/v1/chat/completions`.
pub fn chat_completions(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let body: ChatBody = serde_json::from_slice(body).map_err(|err| super::invalid(err.to_string()))?;
    super::chat_request(&body)
}

/// `/v1/completions`.
pub fn completions(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let body: CompletionBody = serde_json::from_slice(body).map_err(|err| super::invalid(err.to_string()))?;
    super::completion_request(&body)
}
