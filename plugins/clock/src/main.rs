//! The `phi3d-plugin-clock` binary; the server lives in the library.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    phi3d_plugin_clock::serve_stdio()
}
