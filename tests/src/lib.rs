//! Test support for phi3d: generated Phi-3 GGUF models, a fake model hub, and a harness that
//! runs the real `phi3d` binary.

pub mod fake_hub;
pub mod gguf;
pub mod harness;
pub mod model_gen;
pub mod notify_socket;
pub mod skip;
pub mod vocab;

pub use skip::{skip, skip_outside_repository};
