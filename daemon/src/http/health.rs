//! `GET /health`: whether a load balancer in front of several boards (deploy/haproxy/) should
//! send this daemon new requests. 200 `{"status":"ok"}` while it serves; 503 while the model
//! loads or waits for what it needs (an RPC worker), from the moment it is told to stop (SIGTERM; during `shutdown_delay_seconds` it
//! still takes requests, so that none fails while the balancer's checks notice, then it drains)
//! and after the model failed. It says nothing else about the daemon, so it needs no token, as
//! llama-server's `/health` does not.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::HttpState;
use crate::engine::LoadState;

/// What `/health` reports, in order of precedence: stopping outranks everything.
#[derive(Debug, PartialEq, Eq)]
enum Health {
    Ok,
    /// Waiting for an RPC worker; which one is said to tokens holders only (`GetStatus`), as
    /// an unauthenticated page must not point at an unauthenticated service.
    Waiting,
    Loading { percent: u32 },
    Stopping,
    Failed,
}

impl Health {
    fn of(state: &LoadState, stopping: bool) -> Health {
        if stopping {
            return Health::Stopping;
        }
        match state {
            LoadState::Ready(_) => Health::Ok,
            LoadState::Waiting { .. } => Health::Waiting,
            LoadState::Loading { percent } => Health::Loading { percent: *percent },
            LoadState::Failed(_) => Health::Failed,
        }
    }

    fn status(&self) -> StatusCode {
        if *self == Health::Ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
    }

    fn body(&self) -> serde_json::Value {
        match self {
            Health::Ok => serde_json::json!({ "status": "ok" }),
            Health::Waiting => serde_json::json!({ "status": "waiting", "message": "waiting for an RPC worker to answer" }),
            Health::Loading { percent } => {
                serde_json::json!({ "status": "loading", "message": format!("loading the model, {percent}%") })
            }
            Health::Stopping => serde_json::json!({ "status": "stopping", "message": "shutting down: send new requests elsewhere" }),
            Health::Failed => serde_json::json!({ "status": "failed", "message": "the model failed; phi3d is stopping" }),
        }
    }
}

pub async fn health(State(state): State<HttpState>) -> Response {
    let health = Health::of(&state.engine.state(), state.inference.is_stopping());
    (health.status(), axum::Json(health.body())).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_loaded_model_that_takes_requests_is_healthy() {
        assert_eq!(Health::of(&LoadState::Loading { percent: 40 }, false), Health::Loading { percent: 40 });
        assert_eq!(Health::of(&LoadState::Loading { percent: 40 }, true), Health::Stopping);
        assert_eq!(Health::of(&LoadState::Failed("gone".into()), false), Health::Failed);
        let waiting = Health::of(&LoadState::Waiting { reason: "rpc worker 10.8.0.2:50052 does not answer".into() }, false);
        assert_eq!(waiting.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(waiting.body()["status"], "waiting");
        assert!(!waiting.body().to_string().contains("10.8.0.2"), "the worker's address is for token holders only");
        assert_eq!(Health::Loading { percent: 40 }.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Health::Stopping.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Health::Failed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Health::Ok.status(), StatusCode::OK);
        assert_eq!(Health::Ok.body()["status"], "ok");
        assert_eq!(Health::Stopping.body()["status"], "stopping");
    }
}
