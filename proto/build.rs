//! Generates the tonic/prost code for `phi3d.v1`, plus the encoded file descriptor set that
//! the daemon serves through gRPC reflection (so `grpcurl` needs no `.proto` file).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("phi3d_descriptor.bin"))
        .compile_protos(&["phi3d/v1/phi3d.proto"], &["."])?;
    Ok(())
}
