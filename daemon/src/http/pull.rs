//! Ollama's `POST /api/pull`, on phi3d's own model download (`model::hub`, as `phi3d pull`).
//!
//! The served model is already here, so pulling it succeeds at once; that is what Home
//! Assistant's Ollama integration does when it checks its model. Another catalogue name is
//! downloaded, verified and resumable exactly as `phi3d pull NAME` does it, into the model
//! directory; serving it takes a restart with `model` set to it, as phi3d keeps one model.
//!
//! The download runs in its own task, so a client that goes away does not cut it short: the
//! next pull finds it done. One pull runs at a time, as two would write the same `.part` file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc, watch};

use super::body::JsonBody;
use super::{Api, ApiError, HttpState};
use crate::model::catalogue::{self, CatalogueEntry};
use crate::model::hub::{self, HubError, HubOptions, ProgressStyle, Transfer};

/// How often a streamed pull reports progress; between reports the figures only accumulate.
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// How long a pull's last line (success or the error) waits for a client that is not reading.
const LAST_LINE_WAIT: Duration = Duration::from_secs(10);

/// Where pulls go, and the lock that keeps them one at a time.
#[derive(Debug)]
pub struct Puller {
    model_dir: PathBuf,
    offline: bool,
    running: Arc<Mutex<()>>,
}

impl Puller {
    pub fn new(model_dir: PathBuf, offline: bool) -> Self {
        Puller { model_dir, offline, running: Arc::default() }
    }
}

#[derive(Deserialize)]
pub(super) struct PullBody {
    #[serde(default)]
    model: Option<String>,
    /// What clients before `model` sent.
    #[serde(default)]
    name: Option<String>,
    /// Ollama streams unless told not to.
    #[serde(default)]
    stream: Option<bool>,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError::new(Api::Ollama, status, message).into_response()
}

pub(super) async fn pull(
    State(state): State<HttpState>,
    JsonBody(body): JsonBody<PullBody>,
) -> Response {
    let stream = body.stream.unwrap_or(true);
    let requested = body.model.or(body.name).unwrap_or_default();
    let name = requested.trim();
    // Ollama names carry a tag; phi3d's models have one version each.
    let name = name.strip_suffix(":latest").unwrap_or(name);
    if name.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, "model is missing: name the model to pull");
    }
    if name == state.model_name {
        return success(stream);
    }
    let Some(entry) = catalogue::lookup(name) else {
        let names: Vec<&str> = catalogue::entries().iter().map(|entry| entry.name).collect();
        return refuse(
            StatusCode::NOT_FOUND,
            format!(
                "phi3d cannot pull `{name}`: it serves `{}` and can download {}",
                state.model_name,
                names.join(", ")
            ),
        );
    };
    let puller = &state.puller;
    if puller.offline && !hub::local_path(entry, &puller.model_dir).is_file() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "phi3d is offline (the offline setting), so it cannot download {}; run `phi3d pull {}` where there is a network",
                entry.name, entry.name
            ),
        );
    }
    let Ok(running) = puller.running.clone().try_lock_owned() else {
        return refuse(StatusCode::CONFLICT, "another pull is under way; try again when it has finished");
    };

    let (lines, received) = if stream {
        let (lines, received) = mpsc::channel(16);
        (Some(lines), Some(received))
    } else {
        (None, None)
    };
    let model_dir = puller.model_dir.clone();
    let download = tokio::spawn(async move {
        let _running = running;
        download(entry, &model_dir, lines).await
    });
    match received {
        Some(received) => {
            let body = tokio_stream::wrappers::ReceiverStream::new(received)
                .map(|line: Value| Ok::<_, std::convert::Infallible>(format!("{line}\n")));
            ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(body))
                .into_response()
        }
        None => match download.await {
            Ok(Ok(())) => success(false),
            Ok(Err(err)) => refuse(http_status(&err), err.to_string()),
            Err(err) => refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("the download stopped: {err}")),
        },
    }
}

fn success(stream: bool) -> Response {
    let line = json!({ "status": "success" });
    if stream {
        ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], format!("{line}\n")).into_response()
    } else {
        Json(line).into_response()
    }
}

/// The local disk is phi3d's own failure; everything else is the hub's or the link's.
fn http_status(err: &HubError) -> StatusCode {
    match err {
        HubError::Io { .. } | HubError::Client { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// Downloads `entry`, telling `lines` (when streaming) how far it has got in Ollama's
/// progress shape, and ending them with success or an error line. A client that stopped
/// listening is not an error: the download goes on. Nor may a client that stops reading hold
/// it up (and with it the one-pull lock): progress lines it has not taken are dropped, and the
/// last line waits only `LAST_LINE_WAIT` for room.
async fn download(entry: &'static CatalogueEntry, model_dir: &std::path::Path, lines: Option<mpsc::Sender<Value>>) -> Result<(), HubError> {
    let say = |line: Value| {
        if let Some(lines) = &lines {
            let _ = lines.try_send(line);
        }
    };
    let say_last = |line: Value| {
        let lines = lines.clone();
        async move {
            if let Some(lines) = lines {
                let _ = tokio::time::timeout(LAST_LINE_WAIT, lines.send(line)).await;
            }
        }
    };
    say(json!({ "status": "pulling manifest" }));
    let (observer, mut watched) = watch::channel(Transfer::default());
    let opts = HubOptions { progress: ProgressStyle::LogLines, observer: Some(observer), ..HubOptions::from_env() };
    let downloading = hub::download(entry, model_dir, &opts);
    tokio::pin!(downloading);
    let mut report = tokio::time::interval(REPORT_EVERY);
    let result = loop {
        tokio::select! {
            result = &mut downloading => break result,
            _ = report.tick(), if lines.is_some() => {
                if watched.has_changed().unwrap_or(false) {
                    let transfer = watched.borrow_and_update().clone();
                    say(progress_line(entry, &transfer));
                }
            }
        }
    };
    match &result {
        Ok(path) => {
            let transfer = watched.borrow().clone();
            if transfer.total > 0 {
                say_last(progress_line(entry, &transfer)).await;
            }
            tracing::info!(path = %path.display(), "pulled {} for an HTTP client; serve it with model = \"{}\"", entry.name, entry.name);
            say_last(json!({ "status": "success" })).await;
        }
        Err(err) => {
            tracing::warn!("pull of {} for an HTTP client failed: {err}", entry.name);
            say_last(json!({ "error": err.to_string() })).await;
        }
    }
    result.map(|_| ())
}

fn progress_line(entry: &CatalogueEntry, transfer: &Transfer) -> Value {
    json!({
        "status": format!("pulling {}", entry.file),
        "digest": format!("sha256:{}", transfer.sha256),
        "total": transfer.total,
        "completed": transfer.completed,
    })
}
