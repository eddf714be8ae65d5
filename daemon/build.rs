//! Records the llama-cpp-sys-2 version from Cargo.lock: saved prompt-cache states are keyed by
//! the llama.cpp build that wrote them, and Cargo gives a crate no other way to know a
//! dependency's version.

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
}
