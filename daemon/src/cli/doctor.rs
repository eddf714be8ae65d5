//! `phi3d doctor`: what this device offers and whether the configured set-up fits it, from
//! the same configuration `serve` reads. One line per finding (`ok`, `note`, `warn`, `FAIL`);
//! any FAIL makes the exit status non-zero, so that a deployment script can stop on it.
//!
//! It reuses what `serve` itself decides with: the kernel probe of the plugin sandbox, the
//! memory plan (the model's shape is read without loading its weights) and llama.cpp's CPU
//! features. Nothing is downloaded and nothing is bound for long.

use std::net::TcpListener;
use std::path::Path;


use crate::config::{Config, ConfigSource};
use crate::engine::memory_plan::{MemoryPlan, ModelShape, human_bytes, memory_budget};
use crate::sandbox::KernelSupport;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Note,
    Warn,
    Fail,
}

#[derive(Default)]
struct Report {
    failures: usize,
}

impl Report {
    fn line(&mut self, level: Level, topic: &str, text: impl AsRef<str>) {
        let label = match level {
            Level::Ok => "ok  ",
            Level::Note => "note",
            Level::Warn => "warn",
            Level::Fail => {
                self.failures += 1;
                "FAIL"
            }
        };
        println!("{label}  {topic}: {}", text.as_ref());
    }
}

pub fn run(source: ConfigSource) -> anyhow::Result<()> {
    let config = source.load()?;
    // llama.cpp's own lines (it reads the model's header below) only when they matter.
    crate::logging::init("error,llama-cpp-2=error");
    let mut report = Report::default();
    let file = if source.path.exists() { "read" } else { "not present; defaults, environment and flags" };
    report.line(Level::Ok, "config", format!("{} ({file})", source.path.display()));
    sandbox(&mut report, &config);
    cpu(&mut report, &config);
    rpc(&mut report, &config);
    memory(&mut report, &config);
    listener(&mut report, &config);
    open_files(&mut report, &config);
    directories(&mut report, &config);
    systemd(&mut report);
    if report.failures > 0 {
        anyhow::bail!("the configured set-up does not fit this device: {} FAIL line(s) above", report.failures);
    }
    println!("the configured set-up fits this device");
    Ok(())
}

fn sandbox(report: &mut Report, config: &Config) {
    let support = KernelSupport::probe();
    let strict = config.sandbox_require == crate::sandbox::Requirement::Strict;
    // Under `strict` a missing feature keeps the plugins that ask for it from starting.
    let missing = if strict { Level::Fail } else { Level::Warn };
    match (support.landlock_abi, &support.landlock_unavailable) {
        (Some(abi), _) => report.line(Level::Ok, "sandbox", format!("Landlock ABI {abi}")),
        (None, why) => report.line(
            missing,
            "sandbox",
            format!("no Landlock ({}): plugins' file access is not confined", why.as_deref().unwrap_or("unavailable")),
        ),
    }
    let feature = |available: bool, what: &str, without: &str| {
        if available { (Level::Ok, what.to_owned()) } else { (missing, format!("no {what}: {without}")) }
    };
    for (level, text) in [
        feature(support.seccomp, "seccomp filters", "plugins' system calls are not filtered"),
        feature(support.user_namespaces, "user namespaces", "plugins cannot get a network namespace unless phi3d is root"),
        feature(support.network_namespaces, "network namespaces", "plugins without network keep the host's"),
    ] {
        report.line(level, "sandbox", text);
    }
    if support.running_as_root {
        report.line(Level::Note, "sandbox", "running as root: each plugin runs as a uid of its own");
    } else {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        report.line(Level::Note, "sandbox", format!("running as uid {uid}: plugins share it (see deploy/README.md)"));
    }
}

fn cpu(report: &mut Report, config: &Config) {
    if let Some(board) = crate::engine::backend::board() {
        report.line(Level::Note, "board", board);
    }
    if let Err(reason) = crate::engine::backend::load() {
        return report.line(Level::Fail, "cpu", reason);
    }
    let features = crate::engine::cpu_features();
    let has = |name: &str| features.split_whitespace().any(|feature| feature.eq_ignore_ascii_case(name));
    let variant = crate::engine::backend::cpu_variant();
    // A build that picks its kernels at run time already has the best this CPU can run.
    let (level, hint) = match (std::env::consts::ARCH, &variant) {
        ("aarch64", Some(_)) if !has("DOTPROD") => (Level::Note, "; this CPU has no dotprod (a Pi 4's Cortex-A72)"),
        ("aarch64", None) if !has("DOTPROD") => (Level::Warn, "; no dotprod: build on the board (target-cpu=native)"),
        ("x86_64", Some(_)) if !has("AVX2") => (Level::Note, "; this CPU has no AVX2"),
        ("x86_64", None) if !has("AVX2") => (Level::Warn, "; no AVX2: build on this machine (target-cpu=native)"),
        _ => (Level::Ok, ""),
    };
    let picked = variant.map(|variant| format!(" (CPU variant {variant}, picked at run time)")).unwrap_or_default();
    report.line(level, "cpu", format!("llama.cpp kernels use {features}{picked}{hint}; inference threads {}", config.threads));
    let gpu_backend = if cfg!(feature = "cuda") {
        Some("CUDA")
    } else if cfg!(feature = "vulkan") {
        Some("Vulkan")
    } else {
        None
    };
    match (config.gpu_layers, gpu_backend) {
        (0, Some(backend)) => report.line(Level::Note, "gpu", format!("built with {backend}, but gpu_layers is 0")),
        (0, None) => report.line(Level::Note, "gpu", "CPU only (no GPU backend built in)"),
        (layers, Some(backend)) => report.line(Level::Ok, "gpu", format!("{layers} layers offloaded through {backend}")),
        (layers, None) => report.line(
            Level::Fail,
            "gpu",
            format!("gpu_layers is {layers} but this build has no GPU backend; rebuild with --features cuda (or vulkan)"),
        ),
    }
}

/// The RPC workers: whether this build can use them and whether each answers.
fn rpc(report: &mut Report, config: &Config) {
    if config.rpc_workers.is_empty() {
        if crate::engine::rpc::available() {
            report.line(Level::Note, "rpc", "built with llama.cpp's RPC backend; no rpc_workers configured");
        }
        return;
    }
    if !crate::engine::rpc::available() {
        return report.line(Level::Fail, "rpc", crate::engine::rpc::NOT_BUILT);
    }
    report.line(
        Level::Note,
        "rpc",
        "llama.cpp's RPC protocol is unauthenticated: the workers belong on a private link (deploy/README.md)",
    );
    for endpoint in &config.rpc_workers {
        match crate::engine::rpc::probe(endpoint) {
            Ok(()) => report.line(Level::Ok, "rpc", format!("worker {endpoint} answers")),
            Err(_) => report.line(
                Level::Warn,
                "rpc",
                format!("worker {endpoint} does not answer; serve waits for it, NOT_SERVING (start `phi3d rpc-worker` there)"),
            ),
        }
    }
}

fn memory(report: &mut Report, config: &Config) {
    let resolved = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| err.to_string())
        .and_then(|runtime| runtime.block_on(crate::model::resolve(&config.model, &config.model_dir, true)));
    let is_path = matches!(crate::model::ModelRef::parse(&config.model), Ok(crate::model::ModelRef::File(_)));
    let path = match resolved {
        Ok(path) => path,
        // A path is never downloaded, and offline nothing is.
        Err(reason) if config.offline || is_path => return report.line(Level::Fail, "model", reason),
        Err(reason) => {
            return report.line(
                Level::Warn,
                "model",
                format!("{reason}; `phi3d serve` would download it (or run `phi3d pull`), so memory cannot be checked yet"),
            );
        }
    };
    report.line(Level::Ok, "model", path.display().to_string());
    let shape = match read_shape(&path) {
        Ok(shape) => shape,
        Err(reason) => return report.line(Level::Fail, "model", reason),
    };
    // With RPC workers, this board holds and plans for its own layers only.
    let shape = if config.rpc_workers.is_empty() {
        shape
    } else {
        let n_layer = shape.n_layer as u32;
        let rpc_layers = match crate::engine::rpc::settle_layers(config.rpc_layers, n_layer, config.rpc_workers.len()) {
            Ok(rpc_layers) => rpc_layers,
            Err(reason) => return report.line(Level::Fail, "rpc", reason),
        };
        report.line(
            Level::Note,
            "rpc",
            format!("{} of the model's {n_layer} layers here, {rpc_layers} (and the output layer) on the workers", n_layer - rpc_layers),
        );
        shape.local_part(u64::from(n_layer - rpc_layers))
    };
    let plan = MemoryPlan::new(&shape, config.ctx_size, config.batch_size, config.kv_type, memory_budget());
    let needs = format!(
        "ctx_size {} with kv_type {} needs {} (weights {}, KV cache {}, compute {})",
        plan.ctx_size,
        plan.kv_type,
        human_bytes(plan.total_bytes()),
        human_bytes(plan.weights_bytes),
        human_bytes(plan.kv_cache_bytes),
        human_bytes(plan.compute_bytes)
    );
    match plan.budget_bytes {
        None => report.line(Level::Warn, "memory", format!("{needs}; the memory available is unknown")),
        Some(budget) if plan.fits() => {
            report.line(Level::Ok, "memory", format!("{needs} of {} available", human_bytes(budget)))
        }
        Some(_) => report.line(Level::Fail, "memory", crate::engine::loader::does_not_fit(&plan, &shape, config.batch_size)),
    }
    if config.mlock {
        mlock_limit(report, plan.weights_bytes);
    }
}

fn read_shape(path: &Path) -> Result<ModelShape, String> {
    crate::engine::loader::read_shape(crate::engine::backend::load()?, path)
}

fn mlock_limit(report: &mut Report, weights: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit, which `limit` is.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    // rlim_t is 32 bits on 32-bit ARM.
    let current = u64::from(limit.rlim_cur);
    if limit.rlim_cur == libc::RLIM_INFINITY || current >= weights {
        report.line(Level::Ok, "memory", "mlock is on and RLIMIT_MEMLOCK allows the weights");
    } else {
        report.line(
            Level::Fail,
            "memory",
            format!(
                "mlock is on but RLIMIT_MEMLOCK is {}; set LimitMEMLOCK=infinity in the unit (or ulimit -l unlimited)",
                human_bytes(current)
            ),
        );
    }
}

fn listener(report: &mut Report, config: &Config) {
    // The rule `serve` applies (listeners::Listeners::check_exposure), read through the same
    // token store: tokens are in use once the token file exists; client certificates count too.
    let tokens = match crate::auth::tokens::TokenStore::open(config.token_file.clone()) {
        Ok(store) => store.required(),
        Err(err) => {
            report.line(Level::Fail, "token_file", format!("{err}; phi3d refuses to start with it"));
            true
        }
    };
    let certificates = config.tls.client_ca.is_some();
    let credentials = match (tokens, certificates) {
        (true, true) => format!("callers need a token (from {}) and a client certificate", config.token_file.display()),
        (true, false) => format!("callers need a token (from {})", config.token_file.display()),
        (false, true) => "callers need a client certificate (tls_client_ca)".to_owned(),
        (false, false) => String::new(),
    };
    let listeners = [("listen", Some(config.listen)), ("http_listen", config.http_listen)];
    for (key, addr) in listeners.into_iter().filter_map(|(key, addr)| addr.map(|addr| (key, addr))) {
        if addr.ip().is_loopback() {
            report.line(Level::Ok, key, format!("{addr}: loopback only, not reachable from the network"));
        } else if !credentials.is_empty() {
            report.line(Level::Ok, key, format!("{addr}: reachable from the network; {credentials}"));
        } else if config.allow_unauthenticated_network {
            report.line(
                Level::Warn,
                key,
                format!("{addr}: reachable from the network, and anyone who reaches it can use it without credentials"),
            );
        } else {
            report.line(
                Level::Fail,
                key,
                format!(
                    "{addr}: reachable from the network without credentials, so phi3d refuses to start; create a \
                     token (`phi3d token create NAME`), set tls_client_ca, or listen on 127.0.0.1"
                ),
            );
        }
        match TcpListener::bind(addr) {
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
                report.line(Level::Note, key, format!("{addr} is in use (a phi3d already running?)"))
            }
            Err(err) => report.line(Level::Fail, key, format!("cannot bind {addr}: {err}")),
        }
    }
    let tls = if config.tls.cert.is_some() {
        "TLS on every TCP listener (gRPC and the HTTP APIs)"
    } else {
        "no TLS (plaintext gRPC and HTTP)"
    };
    report.line(Level::Note, "tls", tls.to_owned());
    if let Some(socket) = &config.unix_socket {
        report.line(Level::Ok, "unix_socket", format!("{} (mode {:o})", socket.display(), config.unix_socket_mode));
    }
}

/// Every connection is a descriptor: `serve` raises the soft open-file limit to the hard one
/// (the unit's `LimitNOFILE=`), which must hold `max_connections` plus phi3d's own files.
fn open_files(report: &mut Report, config: &Config) {
    use crate::listeners::connections::{ConnectionLimits, FD_RESERVE, fd_limits};
    let limits = ConnectionLimits::of(config);
    let needed = limits.descriptors_needed();
    let (soft, hard) = fd_limits();
    let shown = |limit: u64| if limit == u64::MAX { "unlimited".to_owned() } else { limit.to_string() };
    let caps = format!(
        "max_connections {} (max_connections_per_client {}) + {FD_RESERVE} of phi3d's own need {needed} open files",
        limits.total, limits.per_client
    );
    if hard >= needed {
        report.line(
            Level::Ok,
            "open files",
            format!("{caps}; the limit is {} (serve raises it from {} to the hard limit)", shown(hard), shown(soft)),
        );
    } else {
        report.line(
            Level::Fail,
            "open files",
            format!(
                "{caps}, but the hard limit is {}: set LimitNOFILE={needed} or more in the unit (or ulimit -Hn), \
                 or lower max_connections",
                shown(hard)
            ),
        );
    }
    if limits.per_client > limits.total {
        report.line(Level::Note, "max_connections_per_client", "above max_connections, so only the total applies");
    }
}

fn directories(report: &mut Report, config: &Config) {
    for (key, dir) in [("model_dir", &config.model_dir), ("prompt_cache_dir", &config.prompt_cache_dir)] {
        match nearest_existing(dir) {
            Some(existing) if writable(existing) => report.line(Level::Ok, key, dir.display().to_string()),
            Some(existing) => report.line(
                Level::Warn,
                key,
                format!("{}: {} is not writable by this user", dir.display(), existing.display()),
            ),
            None => report.line(Level::Warn, key, format!("{}: no part of it exists", dir.display())),
        }
    }
    let folder = crate::plugins::bundled::plugins_folder(config.plugins_dir.as_deref());
    let manifests = std::fs::read_dir(&folder.path).map(|entries| {
        entries.filter_map(Result::ok).filter(|entry| entry.path().extension().is_some_and(|ext| ext == "toml")).count()
    });
    match manifests {
        Ok(count) => report.line(Level::Ok, "plugins_dir", format!("{}: {count} manifest(s) ({})", folder.path.display(), folder.origin)),
        Err(_) => report.line(
            Level::Note,
            "plugins_dir",
            format!("{} does not exist: no tools", folder.path.display()),
        ),
    }
}

/// The folder itself, or the closest parent that exists (where it would be created).
fn nearest_existing(dir: &Path) -> Option<&Path> {
    dir.ancestors().find(|path| path.exists())
}

fn writable(path: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: access only reads the NUL-terminated path.
    unsafe { libc::access(path.as_ptr(), libc::W_OK) == 0 }
}

fn systemd(report: &mut Report) {
    let set = |name: &str| std::env::var_os(name).is_some();
    if !set("INVOCATION_ID") {
        report.line(
            Level::Note,
            "systemd",
            "not run by systemd here: `phi3d serve` from this shell logs to stderr and notifies no one",
        );
    } else {
        let notify = if set("NOTIFY_SOCKET") { "readiness notifications" } else { "no NOTIFY_SOCKET (not Type=notify)" };
        let watchdog = match crate::systemd::watchdog::ping_period() {
            Some(period) => format!("watchdog pings every {period:?}"),
            None => "no watchdog".to_owned(),
        };
        let journal = if crate::systemd::journal::stderr_is_journal() { "logs to journald" } else { "logs to stderr" };
        report.line(Level::Ok, "systemd", format!("{notify}, {watchdog}, {journal}"));
    }
    for unit in ["/lib/systemd/system/phi3d.service", "/etc/systemd/system/phi3d.service"] {
        if Path::new(unit).is_file() {
            report.line(Level::Note, "systemd", format!("unit installed: {unit}"));
        }
    }
}
