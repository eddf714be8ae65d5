//! Loading the model: mmap the GGUF with progress reports (a shutdown aborts it), check the
//! memory plan, create the llama context, and describe what was loaded.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use tokio_util::sync::CancellationToken;

use super::rpc::{LayerSpan, WorkerDevice};
use super::sequence_layout::SequenceLayout;
use super::memory_plan::{KvType, MemoryPlan, ModelShape, human_bytes};

/// Renders a pinned system prompt as the chat path renders a request's first turn, so that the
/// tokens match a request's prefix exactly.
pub type PrefixRenderer = fn(&LoadedModel, &str) -> Result<Vec<LlamaToken>, String>;

/// What the worker needs to load and run the model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    pub ctx_size: u32,
    pub batch_size: u32,
    pub threads: super::threads::ThreadPolicy,
    pub mlock: bool,
    /// Layers offloaded to the GPU; only a build with a GPU backend has one to offload to.
    pub gpu_layers: u32,
    /// llama.cpp RPC workers (`host:port`) the last layers are placed on, and how many layers
    /// (`None`: an even share); the portable builds have no RPC backend.
    pub rpc_workers: Vec<String>,
    pub rpc_layers: Option<u32>,
    pub queue_size: u32,
    /// Sequences decoded together; each is one slot.
    pub slots: u32,
    pub kv_type: KvType,
    /// System prompts decoded at start-up and never evicted.
    pub pinned_prompts: Vec<PathBuf>,
    pub render_prefix: PrefixRenderer,
    /// Where the prompt cache is saved across restarts, and how many bytes it may take there
    /// (0: not saved).
    pub prompt_cache_dir: PathBuf,
    pub prompt_cache_disk_bytes: u64,
    /// RAM for cached prompts evicted from the KV cache; `None`: from the memory plan.
    pub prompt_cache_ram_bytes: Option<u64>,
    /// Sequences kept as prompt cache entries beside the slots.
    pub prompt_cache_entries: u32,
    /// Shortest run reused past a changed span (0: exact prefixes only).
    pub prompt_cache_min_chunk: usize,
    /// Longest draft from the prompt checked per step (lookup decoding; 0: off).
    pub lookup_draft_max: usize,
    /// Stops a load in progress (shutdown).
    pub cancel: CancellationToken,
    /// Told of each generation's tokens and timings as it ends.
    pub observer: std::sync::Arc<dyn super::observer::Observer>,
}

/// A loaded model and what clients may know about it. Shared read-only between the worker
/// (which owns the context) and the async side (which tokenizes and renders chat templates).
pub struct LoadedModel {
    pub model: LlamaModel,
    pub chat_template: Option<LlamaChatTemplate>,
    pub info: ModelInfo,
    /// The most text one token stands for, in bytes (its raw vocabulary text, which is never
    /// shorter than the text it covers): a prompt longer than the context times this cannot
    /// fit, and is refused before the tokenizer, which cannot be interrupted, spends seconds on it.
    pub longest_token_bytes: usize,
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
    pub memory_plan: Option<MemoryPlan>,
    /// Where each layer lives: this board, or an RPC worker.
    pub placement: Vec<LayerSpan>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load model {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("{0}")]
    DoesNotFit(String),
    #[error("cannot create the llama context (ctx_size {ctx_size}, {need} of KV cache): {reason}")]
    Context { ctx_size: u32, need: String, reason: String },
    #[error("warm-up decode failed: {0}")]
    WarmUp(String),
    #[error("shutdown requested while the model was loading")]
    Cancelled,
}

/// Loads the GGUF, reporting progress in percent through `on_progress`.
pub fn load_model(
    backend: &LlamaBackend,
    config: &EngineConfig,
    mut on_progress: impl FnMut(u32) + 'static,
) -> Result<LoadedModel, LoadError> {
    let path = &config.model_path;
    // Measured before the weights are mapped, so that they count against it.
    let budget = super::memory_plan::memory_budget();
    let workers = match config.rpc_workers.is_empty() {
        true => None,
        false => Some(place_on_workers(backend, config)?),
    };
    // With workers, this board maps its share of the file only.
    let file_size = match &workers {
        Some(workers) => workers.local_part(&workers.shape).weights_bytes,
        None => std::fs::metadata(path).map(|meta| meta.len()).unwrap_or(0),
    };
    if let Some(budget) = budget
        && file_size > budget
    {
        return Err(LoadError::DoesNotFit(format!(
            "the model's weights alone need {} but only {} of memory is available; choose a smaller \
             quantization of the model or free memory",
            human_bytes(file_size),
            human_bytes(budget)
        )));
    }
    let cancel = config.cancel.clone();
    let mut params = LlamaModelParams::default()
        .with_use_mlock(config.mlock)
        .with_n_gpu_layers(workers.as_ref().map_or(config.gpu_layers, |workers| workers.rpc_layers + 1))
        .with_progress_callback(move |fraction| {
            on_progress((fraction * 100.0).round().clamp(0.0, 100.0) as u32);
            // Returning false makes llama.cpp abandon the load.
            !cancel.is_cancelled()
        });
    if let Some(workers) = &workers {
        let indices: Vec<usize> = workers.devices.iter().map(|device| device.index).collect();
        params = params.with_devices(&indices).map_err(|err| LoadError::Model {
            path: path.clone(),
            reason: format!("llama.cpp refuses the rpc workers' devices: {err}"),
        })?;
    }
    let model = LlamaModel::load_from_file(backend, path, &params).map_err(|err| {
        if config.cancel.is_cancelled() {
            return LoadError::Cancelled;
        }
        LoadError::Model {
            path: path.clone(),
            reason: format!("{err} (is it a GGUF file that llama.cpp supports? run with --log debug for llama.cpp's reason)"),
        }
    })?;
    let chat_template = model.chat_template(None).ok();
    let full_shape = ModelShape::of(&model);
    // The plan counts this board's part: its layers' weights and KV cache.
    let shape = match &workers {
        Some(workers) => workers.local_part(&full_shape),
        None => full_shape,
    };
    let head_size = shape.n_embd / shape.n_head;
    if config.kv_type != KvType::F16 && head_size % 32 != 0 {
        return Err(LoadError::DoesNotFit(format!(
            "kv_type {} stores blocks of 32 values, but this model's attention heads are {head_size} wide; \
             use kv_type f16 for it",
            config.kv_type
        )));
    }
    let plan = MemoryPlan::new(&shape, config.ctx_size, config.batch_size, config.kv_type, budget);
    if !plan.fits() {
        return Err(LoadError::DoesNotFit(does_not_fit(&plan, &shape, config.batch_size)));
    }
    let kv_cache_bytes = plan.kv_cache_bytes;
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
        memory_plan: Some(plan),
        placement: match &workers {
            Some(workers) => workers.placement(),
            None => super::rpc::placement(full_shape.n_layer as u32, 0, &[]),
        },
    };
    let vocab = model.vocab();
    let longest_token_bytes =
        vocab.tokens().filter_map(|token| vocab.text(token)).map(|text| text.to_bytes().len()).max().unwrap_or(1).max(1);
    Ok(LoadedModel { model, chat_template, info, longest_token_bytes })
}

/// The model's shape, read by llama.cpp without allocating (or reading) the weights; they are
/// counted by the file's size, which is what mmap maps.
pub fn read_shape(backend: &LlamaBackend, path: &Path) -> Result<ModelShape, String> {
    let params = LlamaModelParams::default().with_no_alloc(true).with_n_gpu_layers(0);
    let model = LlamaModel::load_from_file(backend, path, &params)
        .map_err(|err| format!("cannot read {}: {err} (is it a GGUF file llama.cpp supports?)", path.display()))?;
    let weights_bytes = std::fs::metadata(path).map(|meta| meta.len()).unwrap_or(0);
    Ok(ModelShape { weights_bytes, ..ModelShape::of(&model) })
}

/// The RPC workers connected, the model's shape as read before loading, and how many of its
/// layers the workers take.
struct Workers {
    devices: Vec<WorkerDevice>,
    shape: ModelShape,
    rpc_layers: u32,
}

impl Workers {
    /// This board's part of `shape`: the layers the workers do not take.
    fn local_part(&self, shape: &ModelShape) -> ModelShape {
        shape.local_part(shape.n_layer - u64::from(self.rpc_layers))
    }

    fn placement(&self) -> Vec<LayerSpan> {
        let devices: Vec<(String, u64)> =
            self.devices.iter().map(|device| (device.endpoint.clone(), device.free_bytes)).collect();
        super::rpc::placement(self.shape.n_layer as u32, self.rpc_layers, &devices)
    }
}

/// Reads the model's shape (without its weights), settles `rpc_layers` and connects to the
/// workers, whose devices llama.cpp then knows.
fn place_on_workers(backend: &LlamaBackend, config: &EngineConfig) -> Result<Workers, LoadError> {
    let path = &config.model_path;
    let shape = read_shape(backend, path).map_err(|reason| LoadError::Model { path: path.clone(), reason })?;
    let rpc_layers = super::rpc::settle_layers(config.rpc_layers, shape.n_layer as u32, config.rpc_workers.len())
        .map_err(LoadError::DoesNotFit)?;
    let devices = super::rpc::connect(&config.rpc_workers)
        .map_err(|reason| LoadError::Model { path: path.clone(), reason })?;
    Ok(Workers { devices, shape, rpc_layers })
}

/// The refusal: what the plan needs against what there is, and a configuration that fits.
pub fn does_not_fit(plan: &MemoryPlan, shape: &ModelShape, batch_size: u32) -> String {
    let budget = plan.budget_bytes.unwrap_or(0);
    let mut message = format!(
        "ctx_size {} with kv_type {} needs {} (weights {}, KV cache {}, compute {}) but only {} of memory \
         is available",
        plan.ctx_size,
        plan.kv_type,
        human_bytes(plan.total_bytes()),
        human_bytes(plan.weights_bytes),
        human_bytes(plan.kv_cache_bytes),
        human_bytes(plan.compute_bytes),
        human_bytes(budget),
    );
    match plan.suggestion(shape, batch_size) {
        Some((ctx_size, kv_type)) => {
            let fitting = MemoryPlan::new(shape, ctx_size, batch_size.min(ctx_size), kv_type, plan.budget_bytes);
            message.push_str(&format!(
                "; this fits: --ctx-size {ctx_size} --kv-type {kv_type} (needs {})",
                human_bytes(fitting.total_bytes())
            ));
        }
        None => message.push_str("; no context fits: choose a smaller quantization of the model or free memory"),
    }
    message
}

/// Creates the one context the worker owns.
pub fn create_context<'m>(
    backend: &LlamaBackend,
    loaded: &'m LoadedModel,
    config: &EngineConfig,
) -> Result<LlamaContext<'m>, LoadError> {
    let layout = SequenceLayout::new(config.slots, config.pinned_prompts.len(), config.prompt_cache_entries);
    let sequences = layout.count();
    // llama.cpp reserves one output per sequence and asserts that a batch can hold them all;
    // the worker still feeds at most batch_size tokens per step.
    let n_batch = config.batch_size.max(sequences);
    let mut params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.ctx_size))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_seq_max(sequences)
        .with_n_threads(config.threads.max() as i32)
        .with_n_threads_batch(config.threads.max() as i32)
        .with_type_k(config.kv_type.ggml())
        .with_type_v(config.kv_type.ggml())
        // Slots share one KV buffer so that prompt prefixes can be copied between them
        // (llama.cpp aborts on partial sequence copies without it), and a copy shares cells.
        .with_kv_unified(true);
    if config.kv_type != KvType::F16 {
        // llama.cpp needs flash attention for a quantized V cache.
        params = params.with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED);
    }
    loaded.model.new_context(backend, params).map_err(|err| LoadError::Context {
        ctx_size: config.ctx_size,
        need: human_bytes(loaded.info.kv_cache_bytes),
        reason: err.to_string(),
    })
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default()
}
