//! llama.cpp's backend: initialised once per process, for the worker and for `doctor` alike
//! (llama.cpp refuses a second initialisation).

use llama_cpp_2::llama_backend::LlamaBackend;

pub fn backend() -> &'static LlamaBackend {
    static BACKEND: std::sync::OnceLock<LlamaBackend> = std::sync::OnceLock::new();
    BACKEND.get_or_init(|| LlamaBackend::init().expect("llama.cpp backend initialises once"))
}
