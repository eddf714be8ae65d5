//! The HTTP bridges: Ollama's and OpenAI's APIs, for the clients people already run (Home
//! Assistant's Ollama integration, the `ollama` and `openai` libraries).
//!
//! A bridge request becomes a `ChatRequest` handed to the same `InferenceService` the gRPC
//! listener uses, with the caller as its `Client`: validation, limits, the queue, slots, the
//! prompt cache and tools are exactly gRPC's. Each API keeps its own wire shapes and its own
//! error shape, in its own file.
//!
//! The listener runs its own accept loop (`serve`): each connection is admitted and watched by
//! `listeners::connections` (per-client and total caps, header, body and idle deadlines),
//! served over TLS (and client certificates) when the config has them, as gRPC is, by hyper's
//! HTTP/1.1-or-HTTP/2 connection builder; `browsers` keeps web pages out.

pub mod body;
pub mod browsers;
pub mod health;
pub mod ollama;
pub mod openai;
pub mod pull;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use phi3d_proto::v1::{ChatEvent, ChatRequest, ClientTool, Done, ToolCall, ToolChoice, ToolOptions, ToolResult, chat_event};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::auth::Client;
use crate::auth::tokens::TokenStore;
use crate::engine::{Engine, LoadState};
use crate::service::inference::{EventStream, InferenceService};

/// What every handler shares.
#[derive(Clone)]
pub struct HttpState {
    pub inference: Arc<InferenceService>,
    pub engine: Engine,
    pub tokens: Arc<TokenStore>,
    /// The name clients know the model by: the catalogue name or the file's stem.
    pub model_name: String,
    /// The plugin tools offered to HTTP clients (`http_plugin_tools`): names, or `*` for all.
    pub plugin_tools: Vec<String>,
    pub metrics: crate::metrics::Metrics,
    /// Ollama's `/api/pull`: where models go and the one pull at a time.
    pub puller: Arc<pull::Puller>,
}

/// Which error shape a path's clients expect.
#[derive(Debug, Clone, Copy)]
enum Api {
    Ollama,
    OpenAi,
}

impl Api {
    fn of(path: &str) -> Api {
        if path.starts_with("/api/") { Api::Ollama } else { Api::OpenAi }
    }
}

/// A refusal in the caller's API's shape.
#[derive(Debug)]
pub struct ApiError {
    api: Api,
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(api: Api, status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { api, status, message: message.into() }
    }

    /// A gRPC status from the shared service, as the HTTP status that means the same.
    fn from_status(api: Api, status: &tonic::Status) -> Self {
        use tonic::Code;
        let http = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            // A tool turn whose model replies could not be used: retrying the same request
            // (as clients do for a 5xx) would spend the same budget again.
            Code::Aborted => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(api, http, status.message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.api {
            Api::Ollama => serde_json::json!({ "error": self.message }),
            Api::OpenAi => serde_json::json!({ "error": {
                "message": self.message,
                "type": openai::error_type(self.status),
                "code": openai::error_code(self.status),
            }}),
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl HttpState {
    /// Runs a chat through the shared service as `client` (HTTP clients send no deadline).
    async fn chat(&self, api: Api, client: Client, request: ChatRequest) -> Result<EventStream, ApiError> {
        self.inference.run_chat(&client, request, None).await.map_err(|status| ApiError::from_status(api, &status))
    }

    /// The tools a bridge request offers: the client's own plus the plugin tools that
    /// `http_plugin_tools` offers HTTP clients. The config's default `tool_choice` is for gRPC
    /// clients: a bridge request has AUTO when it has anything to call and NONE otherwise,
    /// unless the client chose. Structured output leaves the plugin tools out, as a tool step's
    /// grammar would replace the schema's.
    fn tool_options(&self, mut options: ToolOptions, structured: bool) -> ToolOptions {
        let offer_plugins = !self.plugin_tools.is_empty() && !structured;
        if !offer_plugins {
            options.client_tools_only = true;
        } else if self.plugin_tools.iter().all(|name| name != "*") {
            options.allow = self.plugin_tools.clone();
        }
        if options.choice == ToolChoice::Unspecified as i32 && options.force.is_empty() {
            let anything = offer_plugins || !options.client_tools.is_empty();
            options.choice = if anything { ToolChoice::Auto } else { ToolChoice::None } as i32;
        }
        options
    }

    /// A bridge request as the client sent it, with the plugin tools this server offers HTTP
    /// clients added (see [`HttpState::tool_options`]).
    fn with_plugin_tools(&self, mut request: ChatRequest) -> ChatRequest {
        let structured = request.options.as_ref().is_some_and(|options| !options.json_schema.is_empty());
        request.tools = Some(self.tool_options(request.tools.take().unwrap_or_default(), structured));
        request
    }

    /// The loaded model's facts, or `None` while it loads.
    fn model(&self) -> Option<Arc<crate::engine::LoadedModel>> {
        match self.engine.state() {
            LoadState::Ready(model) => Some(model),
            _ => None,
        }
    }
}

/// Bearer tokens, as on gRPC: 401 in the API's shape when one is needed and missing or wrong.
async fn authenticate(State(state): State<HttpState>, mut request: Request, next: Next) -> Response {
    let api = Api::of(request.uri().path());
    let header = request.headers().get(axum::http::header::AUTHORIZATION).and_then(|value| value.to_str().ok());
    let token = header.and_then(crate::auth::bearer);
    let client = match state.tokens.check(token) {
        Ok(Some(name)) => Client::Token(name),
        Ok(None) => match request.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(peer)) => Client::Address(peer.ip().to_canonical()),
            None => Client::Unknown,
        },
        Err(rejection) => {
            tracing::warn!(path = request.uri().path(), reason = %rejection, "HTTP request refused");
            return ApiError::new(api, StatusCode::UNAUTHORIZED, rejection.to_string()).into_response();
        }
    };
    request.extensions_mut().insert(client);
    next.run(request).await
}

/// Counts each request by API, route and status for `phi3d_requests_total`. Paths that match
/// no route count as `other`, so that a client cannot grow the label set at will.
async fn count(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let api = match path {
        "/metrics" => "metrics",
        "/health" => "health",
        _ if path.starts_with("/api/") => "ollama",
        _ => "openai",
    };
    let endpoint = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "other".to_owned(), |matched| matched.as_str().to_owned());
    let response = next.run(request).await;
    state.metrics.request(api, &endpoint, response.status().as_str());
    response
}

/// `GET /metrics`: the OpenMetrics text format (what prometheus-client writes, and Prometheus
/// reads), behind the same tokens as everything else.
async fn metrics(State(state): State<HttpState>) -> Response {
    let text = state.metrics.render(&state.engine);
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
        .into_response()
}

/// Ollama's own server reads every POST body as JSON, and its users' curl lines rely on it
/// (`curl -d` says `application/x-www-form-urlencoded`): so does phi3d, whatever the body claims,
/// for clients that are not browsers (`browsers::guard` has refused a browser's non-JSON body).
async fn bodies_are_json(mut request: Request) -> Request {
    if request.method() == axum::http::Method::POST {
        request
            .headers_mut()
            .insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
    }
    request
}

/// How the HTTP listener takes connections: which ones (`gate`), over what (`tls`), and what
/// browsers may do on it.
pub struct Admission {
    pub gate: crate::listeners::connections::Gate,
    /// The same certificate, key and client CA as gRPC's; `None`: plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub browsers: browsers::Browsers,
}

/// Serves the bridges on `listener` until `stopping` is cancelled, then lets the connections
/// finish (the server bounds that wait).
pub async fn serve(
    listener: tokio::net::TcpListener,
    door: Admission,
    state: HttpState,
    stopping: CancellationToken,
) -> std::io::Result<()> {
    use crate::listeners::connections::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_STREAMS_PER_CONNECTION, accept_failed};
    let router = axum::Router::new()
        .merge(ollama::routes())
        .merge(openai::routes())
        .route("/metrics", axum::routing::get(metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        // After the token check's layer: a load balancer's health check carries no token.
        .route("/health", axum::routing::get(health::health))
        .layer(axum::middleware::map_request(bodies_are_json))
        // Before the token check, and before bodies_are_json rewrites the content type.
        .layer(axum::middleware::from_fn_with_state(door.browsers.clone(), browsers::guard))
        // Outside the token check, so that refusals count too; on every route and the fallback.
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .layer(axum::extract::DefaultBodyLimit::max(state.inference.max_request_bytes()))
        .with_state(state);
    let limits = door.gate.limits();
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // The gate's deadlines come first; hyper's own header timeout (it starts when a kept-alive
    // connection goes idle) only backs them up.
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_timeout + limits.idle_timeout);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let builder = Arc::new(builder);
    let acceptor = door.tls.map(tokio_rustls::TlsAcceptor::from);
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopping.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                accept_failed(&err).await;
                continue;
            }
        };
        // A client at its cap: the stream is closed here, at once.
        let Some(watched) = door.gate.admit(stream) else { continue };
        let activity = watched.activity();
        let connection = Connection {
            peer,
            activity,
            builder: builder.clone(),
            router: router.clone(),
            body_timeout: limits.body_timeout,
            stopping: stopping.clone(),
        };
        match acceptor.clone() {
            None => connections.spawn(connection.serve(watched)),
            Some(acceptor) => connections.spawn(async move {
                match acceptor.accept(watched).await {
                    Ok(tls) => connection.serve(tls).await,
                    Err(err) => tracing::debug!(%peer, error = %err, "HTTP: TLS handshake failed"),
                }
            }),
        };
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// One accepted connection of the HTTP listener.
struct Connection {
    peer: SocketAddr,
    activity: Arc<crate::listeners::connections::Activity>,
    builder: Arc<hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>>,
    router: axum::Router,
    body_timeout: std::time::Duration,
    stopping: CancellationToken,
}

impl Connection {
    /// Serves HTTP/1.1 or HTTP/2 on `io` until the client leaves or a deadline passes; at
    /// shutdown, finishes what is in flight and closes.
    async fn serve<IO>(self, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use crate::listeners::connections::{DeadlineBody, GuardedBody};
        use tower::ServiceExt;
        let Connection { peer, activity, builder, router, body_timeout, stopping } = self;
        let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            // In flight from its headers until its response body is sent or dropped.
            let guard = activity.begin();
            let mut request = request.map(|body| axum::body::Body::new(DeadlineBody::new(body, body_timeout)));
            request.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                let response = match router.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok::<_, std::convert::Infallible>(response.map(|body| GuardedBody::new(body, Some(guard))))
            }
        });
        let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
        tokio::pin!(connection);
        let served = tokio::select! {
            served = connection.as_mut() => served,
            () = stopping.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(err) = served {
            tracing::debug!(%peer, error = %err, "HTTP connection ended");
        }
    }
}

/// A reply read to its end, for the APIs' non-streamed answers.
struct WholeReply {
    done: Done,
    /// The client-side tool calls, for the client to run.
    calls: Vec<ToolCall>,
    /// What the client is shown: the answer, with a line for each plugin call phi3d ran.
    text: String,
}

async fn whole_reply(api: Api, mut events: EventStream) -> Result<WholeReply, ApiError> {
    let mut calls = Vec::new();
    let mut text = String::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(ChatEvent { event: Some(chat_event::Event::ToolCall(call)) }) if call.client_side => calls.push(call),
            Ok(ChatEvent { event: Some(chat_event::Event::Delta(delta)) }) => text.push_str(&delta.text),
            Ok(ChatEvent { event: Some(chat_event::Event::ToolResult(result)) }) => text.push_str(&plugin_result_text(&result)),
            Ok(ChatEvent { event: Some(chat_event::Event::Done(done)) }) => return Ok(WholeReply { done, calls, text }),
            Ok(_) => {}
            Err(status) => return Err(ApiError::from_status(api, &status)),
        }
    }
    Err(ApiError::new(api, StatusCode::INTERNAL_SERVER_ERROR, "the reply ended without finishing"))
}

/// The longest plugin result shown to an HTTP client; the model still sees all of it.
const SHOWN_RESULT_CHARS: usize = 300;

/// A plugin call phi3d ran, as a line of content: Ollama's and OpenAI's replies have no place
/// for a tool step the server ran itself, and a plain client should still see what happened.
fn plugin_result_text(result: &ToolResult) -> String {
    let mut content: String = result.content.chars().take(SHOWN_RESULT_CHARS).collect();
    if content.len() < result.content.len() {
        content.push('…');
    }
    let outcome = if result.is_error { " failed" } else { "" };
    // A call the model garbled has no tool name.
    let name = if result.name.is_empty() { "tool call" } else { &result.name };
    format!("[{name}{outcome}: {}]\n", content.trim())
}

/// Stop strings as both APIs send them: one string or a list of strings; `key` names the
/// field in the error.
fn stop_strings(api: Api, key: &str, value: Option<&Value>) -> Result<Vec<String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(stop)) => Ok(vec![stop.clone()]),
        Some(Value::Array(stops)) => Ok(stops.iter().filter_map(|stop| stop.as_str().map(str::to_owned)).collect()),
        Some(other) => Err(ApiError::new(
            api,
            StatusCode::BAD_REQUEST,
            format!("{key} must be a string or a list of strings, got {other}"),
        )),
    }
}

/// Seconds since the epoch, for the APIs' `created` fields.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

/// A request's `tools` (OpenAI's function shape, which Ollama took over) as phi3d client
/// tools, run by the caller.
fn client_tools(api: Api, tools: &[Value]) -> Result<Vec<ClientTool>, ApiError> {
    tools
        .iter()
        .enumerate()
        .map(|(index, tool)| {
            let function = tool.get("function").unwrap_or(tool);
            let name = function.get("name").and_then(Value::as_str).unwrap_or_default();
            if name.is_empty() {
                return Err(ApiError::new(api, StatusCode::BAD_REQUEST, format!("tools[{index}].function.name is missing")));
            }
            let parameters = function.get("parameters").cloned().unwrap_or_else(|| serde_json::json!({"type": "object"}));
            Ok(ClientTool {
                name: name.to_owned(),
                description: function.get("description").and_then(Value::as_str).unwrap_or_default().to_owned(),
                parameters_json: parameters.to_string(),
            })
        })
        .collect()
}
