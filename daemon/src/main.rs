//! The `phi3d` binary; everything lives in the library (see `cli`). Started under the name of
//! a bundled plugin, it serves that plugin instead (see `plugins::bundled`).

fn main() -> std::process::ExitCode {
    phi3d::plugins::bundled::run_if_invoked().unwrap_or_else(phi3d::cli::main)
}
