//! What one request and one client may ask of the daemon, so that no caller can take the
//! model from the others: the size of a request, the length of its prompt and reply, and the
//! streams a client has open at once. Each refusal names the limit and its config key.

use tonic::Status;

/// The configured limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_request_bytes: u32,
    pub max_prompt_tokens: u32,
    pub max_streams_per_client: u32,
}

impl Default for Limits {
    /// No limit beyond the context; for the services' unit tests.
    fn default() -> Self {
        Limits { max_request_bytes: u32::MAX, max_prompt_tokens: u32::MAX, max_streams_per_client: u32::MAX }
    }
}

impl Limits {
    /// tonic refuses larger messages before decoding them (OUT_OF_RANGE, its own words);
    /// between the limit and this, the request is decoded and refused here by name. The slack
    /// keeps a request just over the limit from getting tonic's less helpful error.
    pub fn decoding_limit(&self) -> usize {
        (self.max_request_bytes as usize).saturating_mul(2).max(64 * 1024)
    }

    /// RESOURCE_EXHAUSTED when a request is larger than `max_request_bytes`.
    pub fn check_size(&self, request: &impl prost::Message) -> Result<(), Status> {
        let size = request.encoded_len();
        if size > self.max_request_bytes as usize {
            return Err(Status::resource_exhausted(format!(
                "the request is {size} bytes; this phi3d accepts at most {} (max_request_bytes)",
                self.max_request_bytes
            )));
        }
        Ok(())
    }
}
