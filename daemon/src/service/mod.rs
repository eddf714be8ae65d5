//! The tonic services. They validate requests, turn them into engine tasks and map engine
//! events and errors to `phi3d.v1` messages and gRPC statuses; no llama.cpp state lives here.

pub mod admin;
pub mod convert;
pub mod request_scope;
pub mod inference;
pub mod limits;
pub mod live;
pub mod requests;
pub mod tool_options;
pub mod validate;
