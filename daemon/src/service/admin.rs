//! The `phi3d.v1.Admin` service: what the daemon is running, how busy it is, and which tools
//! its plugins offer under which protections.

use std::time::Instant;

use phi3d_proto::v1::admin_server::Admin;
use phi3d_proto::v1::{GetStatusRequest, GetStatusResponse, ListToolsRequest, ListToolsResponse, ModelInfo, ToolDescription};
use tonic::{Request, Response, Status};

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
        let (model, load_progress_percent, kv_cache_bytes) = match self.engine.state() {
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
                (model, 100, info.kv_cache_bytes)
            }
            LoadState::Loading { percent } => (self.unloaded(), percent, 0),
            LoadState::Failed(_) => (self.unloaded(), 0, 0),
        };
        Ok(Response::new(GetStatusResponse {
            model: Some(model),
            queue_depth: self.engine.queue_depth() as u32,
            active_requests: self.engine.active_requests() as u32,
            uptime_seconds: self.started_at.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            load_progress_percent,
            kv_cache_bytes,
            slots: self.engine.slots(),
        }))
    }

    async fn list_tools(&self, _: Request<ListToolsRequest>) -> Result<Response<ListToolsResponse>, Status> {
        let tools = self
            .plugins
            .tools()
            .await
            .into_iter()
            .map(|tool| ToolDescription {
                name: tool.qualified_name,
                plugin: tool.plugin,
                description: tool.description,
                input_schema_json: tool.input_schema.to_string(),
                protections: tool.protections,
            })
            .collect();
        Ok(Response::new(ListToolsResponse { tools, sandbox_support: self.sandbox_support.clone() }))
    }
}

impl AdminService {
    fn unloaded(&self) -> ModelInfo {
        ModelInfo { path: self.model_path.clone(), loaded: false, ..ModelInfo::default() }
    }
}
