//! The phi3d gRPC contract, package `phi3d.v1`, generated from `proto/phi3d/v1/phi3d.proto`.
//!
//! Any Rust client can depend on this crate to talk to a phi3d daemon:
//! `phi3d_proto::v1::inference_client::InferenceClient`.

pub mod v1 {
    tonic::include_proto!("phi3d.v1");

    /// The encoded `FileDescriptorSet` of `phi3d.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("phi3d_descriptor");
}
