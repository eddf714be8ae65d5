//! The `phi3d-plugin-homeassistant` binary; the server lives in the library.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    phi3d_plugin_homeassistant::serve_stdio()
}
