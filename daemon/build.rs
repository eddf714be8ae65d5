//! Records the llama-cpp-sys-2 version from Cargo.lock: saved prompt-cache states are keyed by
//! the llama.cpp build that wrote them, and Cargo gives a crate no other way to know a
//! dependency's version. Also stops a build with the `rpc` feature whose llama.cpp would be
//! built without its RPC backend.

fn main() {
    let lock = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(&lock).unwrap_or_default();
    let version = text
        .split("[[package]]")
        .find(|package| package.contains("name = \"llama-cpp-sys-2\""))
        .and_then(|package| package.lines().find_map(|line| line.strip_prefix("version = ")))
        .map(|version| version.trim_matches('"').to_owned())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PHI3D_LLAMA_CPP_SYS_VERSION={version}");

    // llama-cpp-sys-2 builds llama.cpp's RPC backend only when GGML_RPC=ON is in the
    // environment (it passes GGML_* variables to CMake); without it the feature would link a
    // llama.cpp that has no RPC backend, and only fail when a worker is configured.
    println!("cargo:rerun-if-env-changed=GGML_RPC");
    if std::env::var_os("CARGO_FEATURE_RPC").is_some() && std::env::var("GGML_RPC").as_deref() != Ok("ON") {
        panic!(
            "the rpc feature needs llama.cpp built with its RPC backend: build with \
             GGML_RPC=ON GGML_RPC_RDMA=OFF cargo build --release --features rpc (deploy/README.md)"
        );
    }
}
