//! The `phi3d.v1.Admin` service: what the daemon is running and how busy it is.

use std::time::Instant;

use phi3d_proto::v1::admin_server::Admin;
use phi3d_proto::v1::{GetStatusRequest, GetStatusResponse, ModelInfo};
use tonic::{Request, Response, Status};

use crate::engine::{Engine, LoadState};

pub struct AdminService {
    engine: Engine,
    started_at: Instant,
    /// What the configuration asked for, reported while the model is not loaded yet.
    model_path: String,
}

impl AdminService {
    pub fn new(engine: Engine, model_path: String) -> Self {
        AdminService { engine, started_at: Instant::now(), model_path }
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
}

impl AdminService {
    fn unloaded(&self) -> ModelInfo {
        ModelInfo { path: self.model_path.clone(), loaded: false, ..ModelInfo::default() }
    }
}
