//! The `phi3d.v1.Admin` service: what the daemon is running, how busy it is, and which tools
//! its plugins offer under which protections.

use std::time::Instant;

use phi3d_proto::v1::admin_server::Admin;
use phi3d_proto::v1::{
    GetStatusRequest, GetStatusResponse, InferenceThreads, LayerPlacement, ListToolsRequest, ListToolsResponse, MemoryPlan, ModelInfo,
    SkippedTool,
    SlotStatus, ToolDescription, slot_status,
};
use tonic::{Request, Response, Status};

use crate::engine::status::SlotPhase;
use crate::engine::{Engine, LoadState};
use crate::plugins::PluginRegistry;

pub struct AdminService {
    engine: Engine,
    started_at: Instant,
    /// What the configuration asked for, reported while the model is not loaded yet.
    model_path: String,
    plugins: PluginRegistry,
    /// What the kernel offers plugins, as probed at start-up.
    sandbox_support: String,
}

impl AdminService {
    pub fn new(engine: Engine, model_path: String, plugins: PluginRegistry, sandbox_support: String) -> Self {
        AdminService { engine, started_at: Instant::now(), model_path, plugins, sandbox_support }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(&self, _: Request<GetStatusRequest>) -> Result<Response<GetStatusResponse>, Status> {
        let (model, load_progress_percent, kv_cache_bytes, layers, waiting_for) = match self.engine.state() {
            LoadState::Ready(loaded) => {
                let info = &loaded.info;
                let model = ModelInfo {
                    name: info.name.clone(),
                    path: info.path.display().to_string(),
                    architecture: info.architecture.clone(),
                    parameters: info.parameters,
                    size_bytes: info.size_bytes,
                    context_length: info.context_length,
                    loaded: true,
                    trained_context_length: info.trained_context_length,
                    chat_template: info.chat_template.clone(),
                };
                let layers = info.placement.iter().map(layer_placement).collect();
                (model, 100, info.kv_cache_bytes, layers, String::new())
            }
            LoadState::Loading { percent } => (self.unloaded(), percent, 0, Vec::new(), String::new()),
            LoadState::Waiting { reason } => (self.unloaded(), 0, 0, Vec::new(), reason),
            LoadState::Failed(_) => (self.unloaded(), 0, 0, Vec::new(), String::new()),
        };
        let status = self.engine.status();
        let slot_status = status
            .slots
            .iter()
            .enumerate()
            .map(|(index, slot)| SlotStatus {
                index: index as u32,
                state: match slot.phase {
                    SlotPhase::Idle => slot_status::State::Idle,
                    SlotPhase::Reading => slot_status::State::Reading,
                    SlotPhase::Generating => slot_status::State::Generating,
                } as i32,
                tokens: slot.tokens,
                request_id: slot.request_id.clone(),
            })
            .collect();
        let memory_plan = status.memory_plan.map(|plan| MemoryPlan {
            weights_bytes: plan.weights_bytes,
            kv_cache_bytes: plan.kv_cache_bytes,
            compute_bytes: plan.compute_bytes,
            total_bytes: plan.total_bytes(),
            budget_bytes: plan.budget_bytes.unwrap_or(0),
            kv_type: plan.kv_type.to_string(),
        });
        Ok(Response::new(GetStatusResponse {
            slot_status,
            kv_cells_used: status.kv_cells_used,
            kv_cells_total: status.kv_cells_total,
            cache_entries_in_memory: status.cache_entries_in_memory,
            cache_entries_on_disk: status.cache_entries_on_disk,
            cache_entries_in_ram: status.cache_entries_in_ram,
            cache_ram_bytes: status.cache_ram_bytes,
            cache_ram_budget_bytes: status.cache_ram_budget_bytes,
            memory_plan,
            cpu_features: crate::engine::cpu_features(),
            cpu_variant: crate::engine::backend::cpu_variant().unwrap_or_default(),
            board: crate::engine::backend::board().unwrap_or_default(),
            model: Some(model),
            queue_depth: self.engine.queue_depth() as u32,
            active_requests: self.engine.active_requests() as u32,
            uptime_seconds: self.started_at.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            load_progress_percent,
            kv_cache_bytes,
            slots: self.engine.slots(),
            threads: Some(InferenceThreads {
                single: status.threads.single,
                batch: status.threads.batch,
                max: status.threads.max,
                adaptive: status.threads.adaptive,
            }),
            recent_decode_tokens_per_second: status.recent_decode_tokens_per_second,
            layers,
            waiting_for,
        }))
    }

    async fn list_tools(&self, _: Request<ListToolsRequest>) -> Result<Response<ListToolsResponse>, Status> {
        let listing = self.plugins.listing().await;
        let tools = listing
            .tools
            .into_iter()
            .map(|tool| ToolDescription {
                name: tool.qualified_name,
                plugin: tool.plugin,
                description: tool.description,
                input_schema_json: tool.input_schema.to_string(),
                protections: tool.protections,
            })
            .collect();
        let skipped = listing
            .skipped
            .into_iter()
            .map(|tool| SkippedTool { name: tool.qualified_name, plugin: tool.plugin, reason: tool.reason })
            .collect();
        Ok(Response::new(ListToolsResponse { tools, sandbox_support: self.sandbox_support.clone(), skipped }))
    }
}

fn layer_placement(span: &crate::engine::rpc::LayerSpan) -> LayerPlacement {
    let (first_layer, last_layer) = span.layers.unwrap_or_default();
    LayerPlacement {
        device: span.device.clone(),
        has_layers: span.layers.is_some(),
        first_layer,
        last_layer,
        output: span.output,
    }
}

impl AdminService {
    fn unloaded(&self) -> ModelInfo {
        ModelInfo { path: self.model_path.clone(), loaded: false, ..ModelInfo::default() }
    }
}
