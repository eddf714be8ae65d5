//! The daemon's life: resolve the model, listen, load in the background, serve, shut down.
//!
//! The listener is up before the model is loaded (a 2 GB model takes a while from an SD
//! card): health answers NOT_SERVING and inference answers UNAVAILABLE with the load progress
//! until the model is warm. systemd hears about each step (`systemd`), SIGHUP reloads the
//! configuration (`reload`), and a shutdown signal refuses new requests, lets those in flight
//! finish within `shutdown_grace_seconds` (`drain`), cancels the rest, lets the streams end,
//! stops the server and then the worker thread.

use std::future::Future;
use std::sync::Arc;

use phi3d_proto::v1::admin_server::AdminServer;
use phi3d_proto::v1::inference_server::InferenceServer;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::interceptor::InterceptedService;
use tokio_util::task::AbortOnDropHandle;
use tonic_health::ServingStatus;

use crate::auth::Authenticator;
use crate::auth::tokens::TokenStore;
use crate::config::{Config, ConfigSource};
use crate::listeners::connections::{ConnectionLimits, Gate, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, TrackRequests};
use crate::listeners::{Door, Listeners};
use crate::metrics::Metrics;
use crate::plugins::PluginRegistry;
use crate::sandbox::KernelSupport;
use crate::engine::{Engine, EngineConfig};
use crate::service::admin::AdminService;
use crate::service::inference::InferenceService;
use crate::service::limits::Limits;
use crate::service::live::LiveSettings;
use crate::service::requests::Requests;
use crate::systemd::Notifier;

/// The gRPC service names whose health follows the model.
const MODEL_SERVICES: [&str; 2] = ["", "phi3d.v1.Inference"];

/// How long shutdown waits for the worker to end and save the prompt cache.
const WORKER_EXIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long shutdown waits for clients to disconnect once every request is cancelled.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    let model_path = crate::model::resolve(&config.model, &config.model_dir, config.offline)
        .await
        .map_err(anyhow::Error::msg)?;
    let tokens = Arc::new(TokenStore::open(config.token_file.clone()).map_err(anyhow::Error::msg)?);
    let tls = config.tls.server_config()?;
    let listeners = Listeners::open(&config).await?;
    // The HTTP bridges get the same TLS and client certificates as gRPC.
    let http_tls = if listeners.http.is_some() { config.tls.rustls_config()? } else { None };
    // Each listener is judged by what it itself requires.
    let grpc_door = Door { tokens: tokens.required(), client_certificates: tls.is_some() && config.tls.client_ca.is_some() };
    let http_door =
        Door { tokens: tokens.required(), client_certificates: http_tls.is_some() && config.tls.client_ca.is_some() };
    listeners.check_exposure(grpc_door, http_door, config.allow_unauthenticated_network)?;
    // Every connection is a descriptor: the soft limit goes up to the hard one (LimitNOFILE=).
    let connection_limits = ConnectionLimits::of(&config);
    let (open_files, hard_open_files) = crate::listeners::connections::raise_fd_limit();
    let needed = connection_limits.descriptors_needed();
    if open_files < needed {
        tracing::warn!(
            open_files,
            hard_open_files,
            needed,
            "the open-file limit is below what max_connections needs; raise LimitNOFILE= in the unit \
             (or ulimit -n), or lower max_connections"
        );
    }
    let gate = Gate::new(connection_limits);
    tracing::info!(
        tcp = ?listeners.tcp_addresses(),
        unix = ?config.unix_socket.as_ref().filter(|_| !listeners.activated),
        tls = tls.is_some(),
        client_certificates = config.tls.client_ca.is_some(),
        http_tls = http_tls.is_some(),
        tokens = tokens.required(),
        open_files,
        model = %model_path.display(),
        "listening"
    );

    let support = KernelSupport::probe();
    tracing::info!(%support, "plugin sandbox");
    let requirement = config.sandbox_require;
    let folder = crate::plugins::bundled::plugins_folder(config.plugins_dir.as_deref());
    tracing::info!(dir = %folder.path.display(), "plugins folder: {}", folder.origin);
    let metrics = Metrics::default();
    let plugins = PluginRegistry::start(folder.path, support.clone(), requirement, metrics.clone()).await?;

    // Stopping: every request is cancelled first, so streams end with CANCELLED at once and
    // the graceful shutdown does not wait on them; a model still loading stops loading.
    let stopping = tokio_util::sync::CancellationToken::new();
    let (engine, worker) = Engine::start(EngineConfig {
        model_path: model_path.clone(),
        ctx_size: config.ctx_size,
        batch_size: config.batch_size,
        threads: config.threads,
        mlock: config.mlock,
        gpu_layers: config.gpu_layers,
        queue_size: config.queue_size,
        slots: config.slots,
        kv_type: config.kv_type,
        pinned_prompts: config.pinned_prompts.clone(),
        render_prefix: crate::service::inference::system_prefix_tokens,
        prompt_cache_dir: config.prompt_cache_dir.clone(),
        prompt_cache_disk_bytes: config.prompt_cache_disk_mb.saturating_mul(1_000_000),
        cancel: stopping.clone(),
        observer: Arc::new(metrics.clone()),
    })?;

    let (health, health_service) = tonic_health::server::health_reporter();
    for service in MODEL_SERVICES {
        health.set_service_status(service, ServingStatus::NotServing).await;
    }
    health.set_service_status("phi3d.v1.Admin", ServingStatus::Serving).await;
    let draining_health = health.clone();

    let limits = Limits {
        max_request_bytes: config.max_request_bytes,
        max_prompt_tokens: config.max_prompt_tokens,
        max_streams_per_client: config.max_streams_per_client,
    };
    let requests = Arc::new(Requests::new(limits));
    let (engine_failed_tx, engine_failed) = tokio::sync::oneshot::channel();
    let watch_engine = engine.clone();
    let watch_stopping = stopping.clone();
    tokio::spawn(async move {
        let reason = match watch_engine.loaded().await {
            Ok(model) => {
                for service in MODEL_SERVICES {
                    health.set_service_status(service, ServingStatus::Serving).await;
                }
                tracing::info!(model = %model.info.name, "serving");
                // A worker that dies takes the model with it: say so, and stop, so that the
                // supervisor restarts the daemon. The handle goes at shutdown, so that the
                // queue closes and the worker can end.
                let reason = tokio::select! {
                    reason = watch_engine.failed() => reason,
                    () = watch_stopping.cancelled() => return,
                };
                for service in MODEL_SERVICES {
                    health.set_service_status(service, ServingStatus::NotServing).await;
                }
                tracing::error!("{reason}");
                reason
            }
            Err(reason) => reason,
        };
        let _ = engine_failed_tx.send(reason);
    });

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(phi3d_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(phi3d_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let (live, live_reader) = tokio::sync::watch::channel(LiveSettings::of(&config));
    let compile_timeout = config.compile_timeout;
    // Request preparation (schemas, grammars, tokenizing) runs off the runtime, at most two
    // at a time beside the inference threads.
    let offload = crate::offload::Offload::new(2, compile_timeout);
    let inference =
        Arc::new(InferenceService::new(engine.clone(), requests.clone(), live_reader, plugins.clone(), offload));
    let admin = AdminService::new(engine.clone(), model_path.display().to_string(), plugins.clone(), support.to_string());

    let http_state = crate::http::HttpState {
        inference: inference.clone(),
        engine: engine.clone(),
        tokens: tokens.clone(),
        model_name: model_name(&config.model, &model_path),
        plugin_tools: config.http_plugin_tools.clone(),
        metrics: metrics.clone(),
        puller: Arc::new(crate::http::pull::Puller::new(config.model_dir.clone(), config.offline)),
    };

    let config_origins = config.http_allowed_origins.clone();
    let config_hosts = config.http_allowed_hosts.clone();
    // systemd: status and readiness, the watchdog, reloads; each ends with the daemon.
    let (current, current_config) = tokio::sync::watch::channel(config);
    let _status = AbortOnDropHandle::new(tokio::spawn(crate::systemd::status::report(engine.clone(), notifier.clone())));
    let _watchdog = crate::systemd::watchdog::ping_period().map(|period| {
        tracing::info!(?period, "systemd watchdog on");
        AbortOnDropHandle::new(tokio::spawn(crate::systemd::watchdog::run(engine.clone(), notifier.clone(), period)))
    });
    let reloader = crate::reload::Reloader {
        source,
        current,
        live,
        plugins: plugins.clone(),
        engine: engine.clone(),
        notifier: notifier.clone(),
    };
    let _reloads = AbortOnDropHandle::new(tokio::spawn(reloader.run(hangups)));

    let stopper = stopping.clone();
    // Closing the queue does not keep anything alive; open client connections still hold
    // engine handles, so the queue must be closed explicitly for the worker to end.
    let closer = engine;
    let engine_error = tokio::spawn(async move {
        let engine_error = tokio::select! {
            () = shutdown => {
                tracing::info!("shutting down");
                notifier.stopping();
                for service in MODEL_SERVICES {
                    draining_health.set_service_status(service, ServingStatus::NotServing).await;
                }
                let grace = current_config.borrow().shutdown_grace_seconds;
                crate::drain::drain(&requests, std::time::Duration::from_secs(grace)).await;
                None
            }
            Ok(reason) = engine_failed => Some(reason),
        };
        requests.cancel_all();
        closer.close();
        stopper.cancel();
        engine_error
    });

    // Every service but health answers only callers the authenticator lets through.
    let auth = Authenticator::new(tokens);
    let inference = InterceptedService::new(
        InferenceServer::from_arc(inference).max_decoding_message_size(limits.decoding_limit()),
        auth.clone(),
    );
    let admin = InterceptedService::new(AdminServer::new(admin), auth.clone());
    let reflection = InterceptedService::new(reflection, auth.clone());
    let reflection_alpha = InterceptedService::new(reflection_alpha, auth);
    let count = crate::metrics::grpc::CountRequests { metrics };
    let track = TrackRequests { gate: gate.clone() };
    let routes = |builder: tonic::transport::Server| {
        builder
            .layer(count.clone())
            // In flight on its connection (for the idle deadline), its body under body_timeout.
            .layer(track.clone())
            .add_service(health_service.clone())
            .add_service(reflection.clone())
            .add_service(reflection_alpha.clone())
            .add_service(inference.clone())
            .add_service(admin.clone())
    };
    // The socket file is removed when this binding goes, after the servers have stopped.
    let Listeners { tcp, unix, http, socket_file: _socket_file, .. } = listeners;
    let tcp_server = async {
        if tcp.is_empty() {
            return anyhow::Ok(());
        }
        // HTTP/2 pings drop a peer that stopped answering.
        let mut builder = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
        if let Some(tls) = tls {
            builder = builder.tls_config(tls.timeout(connection_limits.header_timeout))?;
        }
        // Each connection through the gate: per-client and total caps, the header and idle
        // deadlines, and TCP_NODELAY (streams are many small messages: without it each one may
        // wait ~40 ms on the previous one's acknowledgement; measured: +20 ms on the first token).
        let incoming = crate::listeners::connections::incoming(tcp, gate.clone());
        routes(builder).serve_with_incoming_shutdown(incoming, stopping.clone().cancelled_owned()).await?;
        anyhow::Ok(())
    };
    let unix_server = async {
        if unix.is_empty() {
            return anyhow::Ok(());
        }
        let incoming = futures::stream::select_all(unix.into_iter().map(UnixListenerStream::new));
        routes(tonic::transport::Server::builder())
            .serve_with_incoming_shutdown(incoming, stopping.clone().cancelled_owned())
            .await?;
        anyhow::Ok(())
    };
    let http_server = async {
        if let Some(listener) = http {
            tracing::info!(addr = %listener.local_addr()?, "serving the Ollama and OpenAI APIs");
            let loopback = listener.local_addr()?.ip().to_canonical().is_loopback();
            let door = crate::http::Admission {
                gate: gate.clone(),
                tls: http_tls,
                browsers: crate::http::browsers::Browsers::new(
                    &config_origins,
                    &config_hosts,
                    loopback,
                ),
            };
            crate::http::serve(listener, door, http_state, stopping.clone()).await?;
        }
        anyhow::Ok(())
    };
    let server = futures::future::try_join3(tcp_server, unix_server, http_server);
    // A client that keeps its connection open must not hold the daemon up forever.
    let drain_limit = async {
        stopping.cancelled().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    let drained = tokio::select! {
        served = server => {
            served?;
            true
        }
        () = drain_limit => {
            tracing::warn!("clients still connected after {DRAIN_TIMEOUT:?}; closing anyway");
            false
        }
    };
    // Plugins go first: a tool call still running must not keep a request alive.
    plugins.shutdown().await;
    // Every engine handle went with the services, so the worker ends once its slots are free
    // (their tasks were cancelled above) and the prompt cache is saved; a slow disk gets a
    // while for that, a wedged worker does not hold the exit forever.
    let joined = tokio::time::timeout(WORKER_EXIT_LIMIT, tokio::task::spawn_blocking(move || worker.join())).await;
    match joined {
        Ok(joined) => joined?.map_err(|_| anyhow::anyhow!("the worker thread panicked"))?,
        Err(_) => tracing::warn!(
            drained,
            "the inference thread did not stop within {WORKER_EXIT_LIMIT:?}; exiting without it"
        ),
    }
    if let Some(reason) = engine_error.await? {
        anyhow::bail!(reason);
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
