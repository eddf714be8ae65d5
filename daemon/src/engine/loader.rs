//! Loading the model: mmap the GGUF with progress reports, check the memory budget, create the
//! llama context, and describe what was loaded.
//!
//! Memory is the scarce resource on a Raspberry Pi: the KV cache of Phi-3-mini costs 384 KiB
//! per token, so the budget is checked before llama.cpp allocates and the error says what to
//! lower.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatTemplate, LlamaModel};

/// What the worker needs to load and run the model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    pub ctx_size: u32,
    pub batch_size: u32,
    pub threads: u32,
    pub mlock: bool,
    pub queue_size: u32,
    /// Sequences decoded together; each is one slot.
    pub slots: u32,
}

/// A loaded model and what clients may know about it. Shared read-only between the worker
/// (which owns the context) and the async side (which tokenizes and renders chat templates).
pub struct LoadedModel {
    pub model: LlamaModel,
    pub chat_template: Option<LlamaChatTemplate>,
    pub info: ModelInfo,
}

#[derive(Debug, Clone, Default)]
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub architecture: String,
    pub parameters: u64,
    pub size_bytes: u64,
    pub trained_context_length: u32,
    pub context_length: u32,
    pub chat_template: String,
    pub kv_cache_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load model {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error(
        "ctx_size {ctx_size} needs {need} of KV cache but only {available} of memory is available; \
         lower ctx_size (e.g. --ctx-size {suggestion}) or free memory"
    )]
    OutOfMemory { ctx_size: u32, need: String, available: String, suggestion: u32 },
    #[error("cannot create the llama context (ctx_size {ctx_size}, {need} of KV cache): {reason}")]
    Context { ctx_size: u32, need: String, reason: String },
    #[error("warm-up decode failed: {0}")]
    WarmUp(String),
}

/// Loads the GGUF, reporting progress in percent through `on_progress`.
pub fn load_model(
    backend: &LlamaBackend,
    config: &EngineConfig,
    mut on_progress: impl FnMut(u32) + 'static,
) -> Result<LoadedModel, LoadError> {
    let path = &config.model_path;
    let params = LlamaModelParams::default()
        .with_use_mlock(config.mlock)
        .with_progress_callback(move |fraction| {
            on_progress((fraction * 100.0).round().clamp(0.0, 100.0) as u32);
            true
        });
    let model = LlamaModel::load_from_file(backend, path, &params).map_err(|err| LoadError::Model {
        path: path.clone(),
        reason: format!("{err} (is it a GGUF file that llama.cpp supports? run with --log debug for llama.cpp's reason)"),
    })?;
    let chat_template = model.chat_template(None).ok();
    let kv_cache_bytes = kv_cache_bytes(&model, config.ctx_size);
    let info = ModelInfo {
        name: model.meta_val_str("general.name").unwrap_or_else(|_| file_stem(path)),
        path: path.clone(),
        architecture: model.meta_val_str("general.architecture").unwrap_or_default(),
        parameters: model.n_params(),
        size_bytes: model.size(),
        trained_context_length: model.n_ctx_train(),
        context_length: config.ctx_size,
        chat_template: chat_template
            .as_ref()
            .and_then(|template| template.to_string().ok())
            .unwrap_or_default(),
        kv_cache_bytes,
    };
    Ok(LoadedModel { model, chat_template, info })
}

/// Creates the one context the worker owns, after checking that its KV cache fits in memory.
pub fn create_context<'m>(
    backend: &LlamaBackend,
    loaded: &'m LoadedModel,
    config: &EngineConfig,
) -> Result<LlamaContext<'m>, LoadError> {
    let need = loaded.info.kv_cache_bytes;
    if let Some(available) = available_memory_bytes()
        && need > available
    {
        let per_token = need / u64::from(config.ctx_size).max(1);
        let fits = (available / per_token.max(1)).clamp(64, u64::from(u32::MAX)) as u32;
        return Err(LoadError::OutOfMemory {
            ctx_size: config.ctx_size,
            need: human_bytes(need),
            available: human_bytes(available),
            // The largest power of two that fits: llama.cpp pads contexts anyway.
            suggestion: 1 << (31 - fits.leading_zeros()),
        });
    }
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.ctx_size))
        .with_n_batch(config.batch_size)
        .with_n_ubatch(config.batch_size)
        .with_n_seq_max(config.slots)
        .with_n_threads(config.threads as i32)
        .with_n_threads_batch(config.threads as i32)
        // Slots share one KV buffer so that prompt prefixes can later be copied between them
        // (llama.cpp aborts on partial sequence copies without it).
        .with_kv_unified(true);
    loaded.model.new_context(backend, params).map_err(|err| LoadError::Context {
        ctx_size: config.ctx_size,
        need: human_bytes(need),
        reason: err.to_string(),
    })
}

/// f16 K and V for every layer and position: Phi-3-mini (no GQA) costs 384 KiB per token.
pub fn kv_cache_bytes(model: &LlamaModel, ctx_size: u32) -> u64 {
    let n_head = u64::from(model.n_head().max(1));
    let head_dim = model.n_embd() as u64 / n_head;
    let kv_width = head_dim * u64::from(model.n_head_kv());
    let f16_bytes = 2;
    2 * u64::from(model.n_layer()) * kv_width * f16_bytes * u64::from(ctx_size)
}

/// `MemAvailable` from /proc/meminfo: what can be allocated without swapping.
fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn bytes_read_like_a_person_writes_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(384 * 1024), "384.0 KiB");
        assert_eq!(human_bytes(3 * 512 * 1024 * 1024), "1.5 GiB");
    }
}
