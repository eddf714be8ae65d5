//! The daemon's life: start, serve, shut down, each step readable in [`serve`].
//!
//! Start: resolve the model, open the listeners (up before the model is loaded: a 2 GB model
//! takes a while from an SD card), start the plugins and the engine, which loads in the
//! background. Health answers NOT_SERVING and inference UNAVAILABLE with the load progress
//! until the model is warm ([`ModelHealth`]). systemd hears about each step (`systemd`) and
//! SIGHUP reloads the configuration (`reload`) from the first moment.
//!
//! Shut down ([`Stopper`], as mini-redis's `Shutdown`): a shutdown signal (after
//! `shutdown_delay_seconds`, in which health says stopping and requests are still taken), or the
//! engine's failure, refuses new requests, lets those in flight finish within `shutdown_grace_seconds`
//! (`drain`), cancels the rest, lets the streams end, stops the servers, the plugins and then
//! the worker thread.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use phi3d_proto::v1::admin_server::AdminServer;
use phi3d_proto::v1::inference_server::InferenceServer;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ServerTlsConfig;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

use crate::auth::Authenticator;
use crate::auth::tokens::TokenStore;
use crate::config::{Config, ConfigSource};
use crate::engine::{Engine, EngineConfig};
use crate::listeners::connections::{ConnectionLimits, Gate, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_STREAMS_PER_CONNECTION, TrackRequests};
use crate::listeners::{Door, Listeners};
use crate::metrics::Metrics;
use crate::plugins::PluginRegistry;
use crate::sandbox::KernelSupport;
use crate::service::admin::AdminService;
use crate::service::inference::InferenceService;
use crate::service::limits::Limits;
use crate::service::live::LiveSettings;
use crate::service::requests::Requests;
use crate::systemd::Notifier;

/// The gRPC service names whose health follows the model.
const MODEL_SERVICES: [&str; 2] = ["", "phi3d.v1.Inference"];

/// How long shutdown waits for the worker to end and save the prompt cache.
const WORKER_EXIT_LIMIT: Duration = Duration::from_secs(60);

/// How long a stop after the engine's failure waits for the worker: it has nothing to save.
const FAILED_WORKER_EXIT_LIMIT: Duration = Duration::from_secs(2);

/// How long shutdown waits for clients to disconnect once every request is cancelled.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until `shutdown` completes; an error if the model cannot be loaded. SIGHUP reads
/// `source` again.
pub async fn serve(
    config: Config,
    source: ConfigSource,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // From the first moment on, SIGHUP is a reload, never the default (termination).
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let notifier = Arc::new(Notifier::default());

    // Start: the model's file, the listeners, the plugins, the engine (loading from now on).
    let model_path = crate::model::resolve(&config.model, &config.model_dir, config.offline)
        .await
        .map_err(anyhow::Error::msg)?;
    let listening = Listening::open(&config, &model_path).await?;
    let metrics = Metrics::default();
    let support = KernelSupport::probe();
    tracing::info!(%support, "plugin sandbox");
    let folder = crate::plugins::bundled::plugins_folder(config.plugins_dir.as_deref());
    tracing::info!(dir = %folder.path.display(), "plugins folder: {}", folder.origin);
    let plugins = PluginRegistry::start(folder.path, support.clone(), config.sandbox_require, metrics.clone()).await?;
    // Stopping: every request is cancelled first, so streams end with CANCELLED at once and
    // the graceful shutdown does not wait on them; a model still loading stops loading.
    let stopping = CancellationToken::new();
    let (engine, worker) = Engine::start(engine_config(&config, &model_path, &stopping, &metrics))?;
    let (health, health_service) = ModelHealth::start().await;
    let engine_failed = health.follow(engine.clone(), stopping.clone());

    // The services, each over the same engine, requests and plugins.
    let limits = Limits {
        max_request_bytes: config.max_request_bytes,
        max_prompt_tokens: config.max_prompt_tokens,
        max_streams_per_client: config.max_streams_per_client,
    };
    let requests = Arc::new(Requests::new(limits));
    let (live, live_reader) = watch::channel(LiveSettings::of(&config));
    // Request preparation (schemas, grammars, tokenizing) runs off the runtime, at most two
    // at a time beside the inference threads.
    let offload = crate::offload::Offload::new(2, config.compile_timeout);
    let inference =
        Arc::new(InferenceService::new(engine.clone(), requests.clone(), live_reader, plugins.clone(), offload));
    let admin = AdminService::new(engine.clone(), model_path.display().to_string(), plugins.clone(), support.to_string());
    let grpc = grpc_routes(Routes::new(health_service), inference.clone(), admin, &listening.tokens, limits)?;
    let http = crate::http::HttpState {
        inference,
        engine: engine.clone(),
        tokens: listening.tokens.clone(),
        model_name: model_name(&config.model, &model_path),
        plugin_tools: config.http_plugin_tools.clone(),
        metrics: metrics.clone(),
        puller: Arc::new(crate::http::pull::Puller::new(config.model_dir.clone(), config.offline)),
    };
    let browsers = (config.http_allowed_origins.clone(), config.http_allowed_hosts.clone());

    // systemd: status and readiness, the watchdog, reloads; each ends with the daemon.
    let (current, current_config) = watch::channel(config);
    let reloader = crate::reload::Reloader {
        source,
        current,
        live,
        plugins: plugins.clone(),
        engine: engine.clone(),
        notifier: notifier.clone(),
    };
    let _systemd = systemd_tasks(&engine, &notifier, reloader, hangups);

    // Serve until a shutdown signal or the engine's failure, then drain (the stopper).
    let stopper = Stopper { health, notifier, requests, config: current_config, engine, stopping: stopping.clone() };
    let stopped = tokio::spawn(stopper.run(shutdown, engine_failed));
    let drained = listening.serve(grpc, http, browsers, &metrics, &stopping).await?;

    // Shut down: plugins first, so that a tool call still running keeps no request alive;
    // then the worker, whose engine handles went with the services.
    let engine_error = stopped.await?;
    plugins.shutdown().await;
    // A failed engine's thread may be stuck inside llama.cpp for good (an RPC worker gone).
    let limit = if engine_error.is_some() { FAILED_WORKER_EXIT_LIMIT } else { WORKER_EXIT_LIMIT };
    join_worker(worker, drained, limit).await?;
    match engine_error {
        Some(reason) => anyhow::bail!(reason),
        None => Ok(()),
    }
}

/// What the worker needs from the configuration.
fn engine_config(config: &Config, model_path: &Path, stopping: &CancellationToken, metrics: &Metrics) -> EngineConfig {
    EngineConfig {
        model_path: model_path.to_path_buf(),
        ctx_size: config.ctx_size,
        batch_size: config.batch_size,
        threads: config.threads,
        mlock: config.mlock,
        gpu_layers: config.gpu_layers,
        rpc_workers: config.rpc_workers.clone(),
        rpc_layers: config.rpc_layers,
        queue_size: config.queue_size,
        slots: config.slots,
        kv_type: config.kv_type,
        pinned_prompts: config.pinned_prompts.clone(),
        render_prefix: crate::service::inference::system_prefix_tokens,
        prompt_cache_dir: config.prompt_cache_dir.clone(),
        prompt_cache_disk_bytes: config.prompt_cache_disk_mb.saturating_mul(1_000_000),
        prompt_cache_entries: config.prompt_cache_entries,
        prompt_cache_ram_bytes: config.prompt_cache_ram_mb.map(|mb| mb.saturating_mul(1_000_000)),
        prompt_cache_min_chunk: config.prompt_cache_min_chunk as usize,
        lookup_draft_max: config.lookup_draft_max as usize,
        cancel: stopping.clone(),
        observer: Arc::new(metrics.clone()),
    }
}

/// The listeners as opened at start-up, and what every connection to them goes through.
struct Listening {
    listeners: Listeners,
    tokens: Arc<TokenStore>,
    tls: Option<ServerTlsConfig>,
    /// The HTTP bridges get the same TLS and client certificates as gRPC.
    http_tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnectionLimits,
    gate: Gate,
}

impl Listening {
    /// Opens the listeners, judges each by the network rule, raises the open-file limit.
    async fn open(config: &Config, model_path: &Path) -> anyhow::Result<Listening> {
        let tokens = Arc::new(TokenStore::open(config.token_file.clone()).map_err(anyhow::Error::msg)?);
        let tls = config.tls.server_config()?;
        let listeners = Listeners::open(config).await?;
        let http_tls = if listeners.http.is_some() { config.tls.rustls_config()? } else { None };
        // Each listener is judged by what it itself requires.
        let certificates = config.tls.client_ca.is_some();
        let grpc_door = Door { tokens: tokens.required(), client_certificates: tls.is_some() && certificates };
        let http_door = Door { tokens: tokens.required(), client_certificates: http_tls.is_some() && certificates };
        listeners.check_exposure(grpc_door, http_door, config.allow_unauthenticated_network)?;
        // Every connection is a descriptor: the soft limit goes up to the hard one (LimitNOFILE=).
        let limits = ConnectionLimits::of(config);
        let (open_files, hard_open_files) = crate::listeners::connections::raise_fd_limit();
        let needed = limits.descriptors_needed();
        if open_files < needed {
            tracing::warn!(
                open_files,
                hard_open_files,
                needed,
                "the open-file limit is below what max_connections needs; raise LimitNOFILE= in the unit \
                 (or ulimit -n), or lower max_connections"
            );
        }
        tracing::info!(
            tcp = ?listeners.tcp_addresses(),
            unix = ?config.unix_socket.as_ref().filter(|_| !listeners.activated),
            tls = tls.is_some(),
            client_certificates = certificates,
            http_tls = http_tls.is_some(),
            tokens = tokens.required(),
            open_files,
            model = %model_path.display(),
            "listening"
        );
        Ok(Listening { listeners, tokens, tls, http_tls, limits, gate: Gate::new(limits) })
    }

    /// Serves gRPC on the TCP and Unix listeners and the HTTP bridges until `stopping`, then
    /// gives the clients [`DRAIN_TIMEOUT`] to go; whether they did.
    async fn serve(
        self,
        grpc: Routes,
        http: crate::http::HttpState,
        (origins, hosts): (Vec<String>, Vec<String>),
        metrics: &Metrics,
        stopping: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let Listening { listeners, tls, http_tls, limits, gate, .. } = self;
        let count = crate::metrics::grpc::CountRequests { metrics: metrics.clone() };
        let track = TrackRequests { gate: gate.clone() };
        let routes = |builder: tonic::transport::Server| {
            builder
                .layer(count.clone())
                // In flight on its connection (for the idle deadline), its body under body_timeout.
                .layer(track.clone())
                .add_routes(grpc.clone())
        };
        // The socket file is removed when this binding goes, after the servers have stopped.
        let Listeners { tcp, unix, http: http_listener, socket_file: _socket_file, .. } = listeners;
        let tcp_server = async {
            if tcp.is_empty() {
                return anyhow::Ok(());
            }
            // HTTP/2 pings drop a peer that stopped answering.
            let mut builder = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
                .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
                .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION));
            if let Some(tls) = tls {
                builder = builder.tls_config(tls.timeout(limits.header_timeout))?;
            }
            // Each connection through the gate: per-client and total caps, the header and idle
            // deadlines, and TCP_NODELAY (streams are many small messages: without it each one
            // may wait ~40 ms on the previous one's acknowledgement; measured: +20 ms on the
            // first token).
            let incoming = crate::listeners::connections::incoming(tcp, gate.clone());
            routes(builder).serve_with_incoming_shutdown(incoming, stopping.clone().cancelled_owned()).await?;
            anyhow::Ok(())
        };
        let unix_server = async {
            if unix.is_empty() {
                return anyhow::Ok(());
            }
            let incoming = futures::stream::select_all(unix.into_iter().map(UnixListenerStream::new));
            routes(tonic::transport::Server::builder().max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION)))
                .serve_with_incoming_shutdown(incoming, stopping.clone().cancelled_owned())
                .await?;
            anyhow::Ok(())
        };
        let http_server = async {
            if let Some(listener) = http_listener {
                tracing::info!(addr = %listener.local_addr()?, "serving the Ollama and OpenAI APIs");
                let loopback = listener.local_addr()?.ip().to_canonical().is_loopback();
                let door = crate::http::Admission {
                    gate: gate.clone(),
                    tls: http_tls,
                    browsers: crate::http::browsers::Browsers::new(&origins, &hosts, loopback),
                };
                crate::http::serve(listener, door, http, stopping.clone()).await?;
            }
            anyhow::Ok(())
        };
        let server = futures::future::try_join3(tcp_server, unix_server, http_server);
        // A client that keeps its connection open must not hold the daemon up forever.
        let drain_limit = async {
            stopping.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        };
        tokio::select! {
            served = server => served.map(|_| true),
            () = drain_limit => {
                tracing::warn!("clients still connected after {DRAIN_TIMEOUT:?}; closing anyway");
                Ok(false)
            }
        }
    }
}

/// The gRPC services after `health`: every one behind the authenticator.
fn grpc_routes(
    health: Routes,
    inference: Arc<InferenceService>,
    admin: AdminService,
    tokens: &Arc<TokenStore>,
    limits: Limits,
) -> anyhow::Result<Routes> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(phi3d_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(phi3d_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let auth = Authenticator::new(tokens.clone());
    let inference = InferenceServer::from_arc(inference).max_decoding_message_size(limits.decoding_limit());
    Ok(health
        .add_service(InterceptedService::new(reflection, auth.clone()))
        .add_service(InterceptedService::new(reflection_alpha, auth.clone()))
        .add_service(InterceptedService::new(inference, auth.clone()))
        .add_service(InterceptedService::new(AdminServer::new(admin), auth)))
}

/// The health of the services that follow the model: NOT_SERVING until it is warm, SERVING
/// while it serves, NOT_SERVING again once it fails or the daemon stops. Admin is SERVING
/// throughout.
#[derive(Clone)]
struct ModelHealth(HealthReporter);

impl ModelHealth {
    /// The reporter, NOT_SERVING, and the health service it reports through.
    async fn start() -> (ModelHealth, HealthServer<impl Health>) {
        let (reporter, service) = tonic_health::server::health_reporter();
        let health = ModelHealth(reporter);
        health.set(ServingStatus::NotServing).await;
        health.0.set_service_status("phi3d.v1.Admin", ServingStatus::Serving).await;
        (health, service)
    }

    async fn set(&self, status: ServingStatus) {
        for service in MODEL_SERVICES {
            self.0.set_service_status(service, status).await;
        }
    }

    /// Follows the engine: SERVING once the model is warm. A model that fails to load, or a
    /// worker that dies (taking the model with it), is NOT_SERVING and its reason comes out of
    /// the returned channel, so that the daemon stops and its supervisor restarts it. Quiet
    /// after `stopping`, whose shutdown closes the engine itself.
    fn follow(&self, engine: Engine, stopping: CancellationToken) -> oneshot::Receiver<String> {
        let (failed_tx, failed) = oneshot::channel();
        let health = self.clone();
        tokio::spawn(async move {
            let reason = match engine.loaded().await {
                Ok(model) => {
                    health.set(ServingStatus::Serving).await;
                    tracing::info!(model = %model.info.name, "serving");
                    let reason = tokio::select! {
                        reason = engine.failed() => reason,
                        () = stopping.cancelled() => return,
                    };
                    health.set(ServingStatus::NotServing).await;
                    tracing::error!("{reason}");
                    reason
                }
                Err(reason) => reason,
            };
            let _ = failed_tx.send(reason);
        });
        failed
    }
}

/// Status lines and readiness, watchdog pings, reloads on SIGHUP: each runs until the
/// returned handles are dropped, with the daemon.
fn systemd_tasks(
    engine: &Engine,
    notifier: &Arc<Notifier>,
    reloader: crate::reload::Reloader,
    hangups: tokio::signal::unix::Signal,
) -> Vec<AbortOnDropHandle<()>> {
    let status = crate::systemd::status::report(engine.clone(), notifier.clone());
    let mut tasks = vec![AbortOnDropHandle::new(tokio::spawn(status))];
    if let Some(period) = crate::systemd::watchdog::ping_period() {
        tracing::info!(?period, "systemd watchdog on");
        let watchdog = crate::systemd::watchdog::run(engine.clone(), notifier.clone(), period);
        tasks.push(AbortOnDropHandle::new(tokio::spawn(watchdog)));
    }
    tasks.push(AbortOnDropHandle::new(tokio::spawn(reloader.run(hangups))));
    tasks
}

/// The shutdown order, once a shutdown signal comes or the engine fails.
struct Stopper {
    health: ModelHealth,
    notifier: Arc<Notifier>,
    requests: Arc<Requests>,
    /// The configuration in effect: the grace period is read when it is needed.
    config: watch::Receiver<Config>,
    /// Closing the queue does not keep anything alive; open client connections still hold
    /// engine handles, so the queue must be closed explicitly for the worker to end.
    engine: Engine,
    stopping: CancellationToken,
}

impl Stopper {
    /// On `shutdown`: NOT_SERVING and STOPPING=1, requests still taken for
    /// `shutdown_delay_seconds`, then the requests in flight drained. Either way,
    /// then: whatever is left cancelled, the queue closed, `stopping` cancelled. The engine's
    /// failure, when that was the cause.
    async fn run(self, shutdown: impl Future<Output = ()>, engine_failed: oneshot::Receiver<String>) -> Option<String> {
        let engine_error = tokio::select! {
            () = shutdown => {
                tracing::info!("shutting down");
                self.notifier.stopping();
                self.health.set(ServingStatus::NotServing).await;
                self.requests.announce_stop();
                let delay = self.config.borrow().shutdown_delay_seconds;
                if delay > 0 {
                    tracing::info!(delay_seconds = delay, "stopping: still taking requests while load balancers take this daemon out");
                    tokio::time::sleep(Duration::from_secs(delay)).await;
                }
                let grace = self.config.borrow().shutdown_grace_seconds;
                crate::drain::drain(&self.requests, Duration::from_secs(grace)).await;
                None
            }
            Ok(reason) = engine_failed => Some(reason),
        };
        self.requests.cancel_all();
        self.engine.close();
        self.stopping.cancel();
        engine_error
    }
}

/// Waits for the worker to end (its slots free, the prompt cache saved); a slow disk gets a
/// while for that, a wedged worker does not hold the exit forever.
async fn join_worker(worker: std::thread::JoinHandle<()>, drained: bool, limit: Duration) -> anyhow::Result<()> {
    let joined = tokio::time::timeout(limit, tokio::task::spawn_blocking(move || worker.join())).await;
    match joined {
        Ok(joined) => joined?.map_err(|_| anyhow::anyhow!("the worker thread panicked"))?,
        Err(_) => tracing::warn!(
            drained,
            "the inference thread did not stop within {limit:?}; exiting without it"
        ),
    }
    Ok(())
}

/// The name the HTTP APIs list the model by: its catalogue name, or its file's stem.
fn model_name(configured: &str, path: &std::path::Path) -> String {
    match crate::model::ModelRef::parse(configured) {
        Ok(crate::model::ModelRef::Catalogue(entry)) => entry.name.to_owned(),
        _ => path.file_stem().map_or_else(|| "phi3d".to_owned(), |stem| stem.to_string_lossy().into_owned()),
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
