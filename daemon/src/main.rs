//! The `phi3d` binary; everything lives in the library (see `cli`).

fn main() -> std::process::ExitCode {
    phi3d::cli::main()
}
