//! llama.cpp's RPC backend: one model spread over several boards. `serve` connects to the
//! `rpc_workers` and places the last `rpc_layers` layers on their devices; `phi3d rpc-worker`
//! serves this board's devices to such a daemon. A build from source has the backend
//! (.cargo/config.toml configures llama.cpp with `GGML_RPC=ON`); the portable builds leave it out,
//! and [`available`] says at run time which this is.
//!
//! llama.cpp's RPC client aborts the whole process when a worker stops answering (it asserts
//! on every reply). phi3d turns that abort into an engine failure: [`on_worker_lost`] installs
//! ggml's abort callback, which, for an abort raised by the RPC client, hands the reason to the
//! engine and parks the thread that hit it (llama.cpp's dispatcher thread, or the engine's own
//! for a call it makes directly; the engine's thread then waits on the parked one). Neither may
//! return into llama.cpp; the daemon ends the requests in flight with UNAVAILABLE and stops, for
//! its supervisor to start it again, and a fresh start waits, NOT_SERVING, until every worker
//! answers ([`wait_until_reachable`]). Any other abort stays an abort. A worker serves one
//! client at a time and llama.cpp's first request to it waits without a limit, so [`connect`]
//! fails the engine the same way when the workers have not answered within [`HANDSHAKE_LIMIT`].
//!
//! The protocol has no authentication and llama.cpp calls its server a proof of concept for
//! trusted networks; the listen rule that keeps a worker off open networks is `cli::rpc_worker`'s.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long one reachability probe waits for a worker's TCP handshake.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long connecting to the workers (llama.cpp's handshake and device query, milliseconds
/// on a link) may take before the engine fails: a worker that accepted the connection but
/// serves another client (another daemon, or a connection left by a board that lost power)
/// never answers.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(30);

/// Where a run of the model's layers lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpan {
    /// `this board`, or the worker's endpoint.
    pub device: String,
    /// The first and last repeating layer, both included; `None` when the device holds only
    /// the output layer.
    pub layers: Option<(u32, u32)>,
    /// Whether the device holds the output layer (the logits).
    pub output: bool,
}

/// A worker device the model may use: its endpoint and what it reports.
#[derive(Debug, Clone)]
pub struct WorkerDevice {
    pub endpoint: String,
    /// The device's index in llama.cpp's device list (`LlamaModelParams::with_devices`).
    pub index: usize,
    pub free_bytes: u64,
}

/// The layers a share of the boards takes by default: the workers together get as many
/// layers as they are boards out of all boards (this one included), so every board holds about
/// the same. Phi-3-mini's 32 layers and one worker: 16 here, 16 there.
pub fn default_rpc_layers(n_layer: u32, workers: usize) -> u32 {
    if workers == 0 {
        return 0;
    }
    let boards = workers as u64 + 1;
    ((u64::from(n_layer) * workers as u64 + boards / 2) / boards) as u32
}

/// The layers on the workers: as configured, or the even share; never more than the model has.
pub fn settle_layers(configured: Option<u32>, n_layer: u32, workers: usize) -> Result<u32, String> {
    let rpc_layers = configured.unwrap_or_else(|| default_rpc_layers(n_layer, workers));
    if rpc_layers > n_layer {
        return Err(format!("rpc_layers is {rpc_layers} but the model has {n_layer} layers; use at most {n_layer}"));
    }
    Ok(rpc_layers)
}

/// Where each layer lives, as llama.cpp assigns them: the last `rpc_layers` repeating layers
/// and the output layer go to the workers' devices (llama.cpp counts the output layer as the
/// first one to offload), split among the devices in proportion to their free memory; the rest
/// stay on this board. `rpc_layers` is at most `n_layer`.
pub fn placement(n_layer: u32, rpc_layers: u32, devices: &[(String, u64)]) -> Vec<LayerSpan> {
    let rpc_layers = rpc_layers.min(n_layer);
    let mut spans = Vec::new();
    let local_end = n_layer - rpc_layers;
    if devices.is_empty() {
        return vec![LayerSpan { device: "this board".into(), layers: (n_layer > 0).then(|| (0, n_layer - 1)), output: true }];
    }
    if local_end > 0 {
        spans.push(LayerSpan { device: "this board".into(), layers: Some((0, local_end - 1)), output: false });
    }
    // llama.cpp: n_gpu_layers = rpc_layers + 1 (the output layer); layer il (il == n_layer is
    // the output) goes to the device whose cumulative share of free memory first exceeds
    // (il - start) / offloaded.
    let offloaded = rpc_layers + 1;
    let start = n_layer + 1 - offloaded;
    let total: f64 = devices.iter().map(|(_, free)| (*free).max(1) as f64).sum();
    let mut cumulative = 0.0;
    let splits: Vec<f64> = devices
        .iter()
        .map(|(_, free)| {
            cumulative += (*free).max(1) as f64 / total;
            cumulative
        })
        .collect();
    for il in start..=n_layer {
        let position = f64::from(il - start) / f64::from(offloaded);
        let device = splits.iter().position(|split| *split > position).unwrap_or(devices.len() - 1);
        let name = &devices[device].0;
        let is_output = il == n_layer;
        match spans.last_mut() {
            Some(span) if span.device == *name => {
                if is_output {
                    span.output = true;
                } else {
                    span.layers = Some(span.layers.map_or((il, il), |(first, _)| (first, il)));
                }
            }
            _ => spans.push(LayerSpan {
                device: name.clone(),
                layers: (!is_output).then_some((il, il)),
                output: is_output,
            }),
        }
    }
    spans
}

/// The worker's address, resolved (llama.cpp resolves it again itself, IPv4 only).
pub fn resolve(endpoint: &str) -> Result<SocketAddr, String> {
    endpoint
        .to_socket_addrs()
        .map_err(|err| format!("rpc worker `{endpoint}`: {err}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| format!("rpc worker `{endpoint}` has no IPv4 address (llama.cpp's RPC client speaks IPv4 only)"))
}

/// Whether the worker accepts a TCP connection; why not, if it does not.
pub fn probe(endpoint: &str) -> Result<(), String> {
    let address = resolve(endpoint)?;
    TcpStream::connect_timeout(&address, PROBE_TIMEOUT).map_err(|err| format!("rpc worker {endpoint} does not answer: {err}"))?;
    Ok(())
}

/// Waits until every worker accepts a TCP connection, calling `waiting` with the reason while
/// one does not, and giving up when `cancelled` says so. llama.cpp aborts the process if a
/// worker cannot be reached when it connects, so it is only asked to once this has succeeded.
pub fn wait_until_reachable(
    endpoints: &[String],
    mut waiting: impl FnMut(&str),
    cancelled: impl Fn() -> bool,
) -> Result<(), ()> {
    for endpoint in endpoints {
        loop {
            match probe(endpoint) {
                Ok(()) => break,
                Err(reason) => waiting(&reason),
            }
            for _ in 0..10 {
                if cancelled() {
                    return Err(());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(())
}

pub use backend::{available, connect, on_worker_lost, serve_devices};

/// Why a build whose llama.cpp has no RPC backend refuses `rpc_workers` and `rpc-worker`.
pub const NOT_BUILT: &str = "this phi3d's llama.cpp has no RPC backend (the portable builds and their packages \
    leave it out); build phi3d from source on this board with `cargo build --release`, whose .cargo/config.toml \
    turns it on (in a target folder built before that setting, `cargo clean --release -p llama-cpp-sys-2` first; \
    deploy/README.md, \"One model on several boards\")";

mod backend {
    //! The FFI: llama-cpp-sys-2 has no bindings for ggml-rpc.h, so its two entry points are
    //! taken from the RPC backend's registry entry by name, as llama.cpp's own tools do.

    use std::ffi::{CStr, CString, c_char};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, OnceLock};

    use llama_cpp_sys_2::{ggml_backend_dev_t, ggml_backend_reg_t};

    use super::WorkerDevice;

    type AddServer = unsafe extern "C" fn(endpoint: *const c_char) -> ggml_backend_reg_t;
    type StartServer = unsafe extern "C" fn(
        endpoint: *const c_char,
        cache_dir: *const c_char,
        n_threads: usize,
        n_devices: usize,
        devices: *mut ggml_backend_dev_t,
    );

    /// An entry point of the RPC backend, by name.
    fn entry_point(name: &CStr) -> Result<*mut std::ffi::c_void, String> {
        crate::engine::backend::load()?;
        // SAFETY: both names are NUL-terminated strings the registry only reads; a missing
        // backend or entry point is a null pointer, checked below.
        let reg = unsafe { llama_cpp_sys_2::ggml_backend_reg_by_name(c"RPC".as_ptr()) };
        if reg.is_null() {
            return Err(format!("llama.cpp's RPC backend is not registered: {}", super::NOT_BUILT));
        }
        let function = unsafe { llama_cpp_sys_2::ggml_backend_reg_get_proc_address(reg, name.as_ptr()) };
        if function.is_null() {
            return Err(format!("llama.cpp's RPC backend has no {}", name.to_string_lossy()));
        }
        Ok(function)
    }

    /// Whether this llama.cpp has the RPC backend (its build set GGML_RPC=ON). Asked once: a
    /// config reload asks again while the engine may be registering workers with llama.cpp's
    /// registry, which has no lock.
    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| entry_point(c"ggml_backend_rpc_add_server").is_ok())
    }

    /// Connects to each worker and registers its devices with llama.cpp: the workers' devices,
    /// in the order given. Each name is resolved here, once, and llama.cpp is given the
    /// address: it would resolve it again for every connection it opens. Past
    /// [`super::HANDSHAKE_LIMIT`] without an answer the engine fails ([`on_worker_lost`]'s
    /// hook), as this thread may wait inside llama.cpp for good.
    pub fn connect(endpoints: &[String]) -> Result<Vec<WorkerDevice>, String> {
        let address = entry_point(c"ggml_backend_rpc_add_server")?;
        // SAFETY: the registry hands out this entry point with exactly this signature
        // (ggml-rpc.h: ggml_backend_reg_t ggml_backend_rpc_add_server(const char *)).
        let add_server: AddServer = unsafe { std::mem::transmute(address) };
        let mut resolved = Vec::new();
        for endpoint in endpoints {
            let address = super::resolve(endpoint)?;
            if let Some((other, _)) = resolved.iter().find(|(_, known)| *known == address) {
                return Err(format!("rpc workers `{other}` and `{endpoint}` are the same worker ({address}); name it once"));
            }
            resolved.push((endpoint.clone(), address));
        }
        let answered = Arc::new(AtomicBool::new(false));
        let watch = answered.clone();
        let names = endpoints.join(", ");
        std::thread::Builder::new()
            .name("phi3d-rpc-connect".into())
            .spawn(move || {
                std::thread::sleep(super::HANDSHAKE_LIMIT);
                if !watch.load(Ordering::SeqCst) && let Some(lost) = WORKER_LOST.get() {
                    lost(format!(
                        "an rpc worker ({names}) accepted the connection but did not answer within {:?}: a worker \
                         serves one daemon at a time, so another daemon, or a connection left by a board that lost \
                         power, holds it (restart the worker: systemctl restart phi3d-rpc-worker)",
                        super::HANDSHAKE_LIMIT
                    ));
                }
            })
            .map_err(|err| format!("cannot start the connection timer: {err}"))?;
        let registered = register(add_server, &resolved);
        answered.store(true, Ordering::SeqCst);
        registered
    }

    /// Each worker's devices, registered with llama.cpp.
    fn register(add_server: AddServer, workers: &[(String, std::net::SocketAddr)]) -> Result<Vec<WorkerDevice>, String> {
        let mut devices = Vec::new();
        for (endpoint, address) in workers {
            let name = CString::new(address.to_string()).expect("a socket address holds no NUL byte");
            // SAFETY: a NUL-terminated endpoint; llama.cpp copies it.
            let reg = unsafe { add_server(name.as_ptr()) };
            if reg.is_null() {
                return Err(format!("rpc worker {endpoint} offers no device"));
            }
            // SAFETY: `reg` is the live registry entry add_server returned; registering adds
            // its devices to llama.cpp's device list, for the process's life.
            unsafe { llama_cpp_sys_2::ggml_backend_register(reg) };
            let count = unsafe { llama_cpp_sys_2::ggml_backend_reg_dev_count(reg) };
            for i in 0..count {
                let device = unsafe { llama_cpp_sys_2::ggml_backend_reg_dev_get(reg, i) };
                let index = (0..unsafe { llama_cpp_sys_2::ggml_backend_dev_count() })
                    .find(|&j| unsafe { llama_cpp_sys_2::ggml_backend_dev_get(j) } == device)
                    .ok_or_else(|| format!("rpc worker {endpoint}'s device is missing from llama.cpp's list"))?;
                let (mut free, mut total) = (0usize, 0usize);
                // SAFETY: a registered device; the two counts are written once (an RPC call).
                unsafe { llama_cpp_sys_2::ggml_backend_dev_memory(device, &mut free, &mut total) };
                devices.push(WorkerDevice { endpoint: endpoint.clone(), index, free_bytes: free as u64 });
            }
        }
        Ok(devices)
    }

    /// Runs llama.cpp's RPC server on `endpoint` (IPv4:port) for this board's devices (its
    /// GPUs, or its CPU where it has none), with `threads` threads; never returns unless the
    /// server cannot start. `cache_dir` keeps the tensors clients sent, so that a daemon
    /// restarting sends only their hashes.
    pub fn serve_devices(endpoint: &str, threads: usize, cache_dir: Option<&std::path::Path>) -> Result<(), String> {
        let address = entry_point(c"ggml_backend_rpc_start_server")?;
        // SAFETY: the registry hands out this entry point with exactly this signature
        // (ggml-rpc.h: ggml_backend_rpc_start_server).
        let start_server: StartServer = unsafe { std::mem::transmute(address) };
        let mut devices = served_devices();
        if devices.is_empty() {
            return Err("llama.cpp offers no device to serve".into());
        }
        let endpoint = CString::new(endpoint).map_err(|_| "the listen address holds a NUL byte".to_owned())?;
        let cache_dir = match cache_dir {
            Some(dir) => Some(
                CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| "the cache folder holds a NUL byte".to_owned())?,
            ),
            None => None,
        };
        // SAFETY: NUL-terminated strings and a device array that outlive the call (it serves
        // until the process ends); llama.cpp reads them only.
        unsafe {
            start_server(
                endpoint.as_ptr(),
                cache_dir.as_ref().map_or(std::ptr::null(), |dir| dir.as_ptr()),
                threads,
                devices.len(),
                devices.as_mut_ptr(),
            )
        };
        Err("llama.cpp's RPC server stopped (is the address in use or not on this machine?)".into())
    }

    /// The GPUs llama.cpp found, or the CPU where it found none.
    fn served_devices() -> Vec<ggml_backend_dev_t> {
        use llama_cpp_sys_2::{GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU};
        // SAFETY: indices below the count name registered devices; their type is read only.
        let all: Vec<_> = (0..unsafe { llama_cpp_sys_2::ggml_backend_dev_count() })
            .map(|i| unsafe { llama_cpp_sys_2::ggml_backend_dev_get(i) })
            .collect();
        let of_type = |wanted: &[u32]| -> Vec<ggml_backend_dev_t> {
            all.iter().copied().filter(|&dev| wanted.contains(&unsafe { llama_cpp_sys_2::ggml_backend_dev_type(dev) })).collect()
        };
        let gpus = of_type(&[GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU]);
        if gpus.is_empty() { of_type(&[GGML_BACKEND_DEVICE_TYPE_CPU]) } else { gpus }
    }

    static WORKER_LOST: OnceLock<Box<dyn Fn(String) + Send + Sync>> = OnceLock::new();
    static WORKERS: OnceLock<String> = OnceLock::new();

    /// The aborts of llama.cpp's RPC client that mean a worker is gone or unusable: its replies
    /// stopped (or made no sense), it could not be reached, or it speaks another version.
    const WORKER_ABORTS: [&str; 3] = ["Remote RPC server crashed", "Failed to connect to", "RPC handshake failed"];

    /// From now on, an abort raised by llama.cpp's RPC client for a worker calls `lost` with the
    /// reason and parks the thread that raised it, instead of ending the process; so does
    /// [`connect`] past its time limit. Set once per process, by the daemon only when workers
    /// are configured (with the callback set, ggml prints no backtrace for other aborts).
    pub fn on_worker_lost(workers: &[String], lost: impl Fn(String) + Send + Sync + 'static) {
        let _ = WORKERS.set(workers.join(", "));
        if WORKER_LOST.set(Box::new(lost)).is_ok() {
            // SAFETY: the callback is a plain extern "C" function that lives for the program.
            unsafe { llama_cpp_sys_2::ggml_set_abort_callback(Some(abort_callback)) };
        }
    }

    extern "C" fn abort_callback(message: *const c_char) {
        // SAFETY: ggml passes its NUL-terminated message buffer, valid during the call.
        let message = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
        // ggml's message is "FILE:LINE: text"; the text is what a user can read.
        let text = message.split_once(": ").map_or(message.as_str(), |(_, text)| text).trim();
        if !message.contains("ggml-rpc") || !WORKER_ABORTS.iter().any(|abort| text.starts_with(abort)) {
            // What ggml prints itself when no callback is set; it aborts on return.
            eprintln!("{message}");
            return;
        }
        if let Some(lost) = WORKER_LOST.get() {
            let workers = WORKERS.get().map_or("", String::as_str);
            lost(format!("an rpc worker ({workers}) failed or stopped answering, taking the model's layers on it (llama.cpp: {text})"));
        }
        // This thread is inside llama.cpp, which would abort on return: it waits for the
        // process to end instead.
        loop {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(device: &str, layers: Option<(u32, u32)>, output: bool) -> LayerSpan {
        LayerSpan { device: device.into(), layers, output }
    }

    #[test]
    fn boards_share_the_layers_evenly_by_default() {
        assert_eq!(default_rpc_layers(32, 0), 0);
        assert_eq!(default_rpc_layers(32, 1), 16);
        assert_eq!(default_rpc_layers(32, 2), 21);
        assert_eq!(default_rpc_layers(40, 3), 30);
        assert_eq!(default_rpc_layers(2, 1), 1);
    }

    #[test]
    fn one_worker_takes_the_last_layers_and_the_output() {
        let worker = vec![("10.0.0.2:50052".to_owned(), 8 << 30)];
        assert_eq!(
            placement(32, 16, &worker),
            [span("this board", Some((0, 15)), false), span("10.0.0.2:50052", Some((16, 31)), true)]
        );
        assert_eq!(placement(32, 32, &worker), [span("10.0.0.2:50052", Some((0, 31)), true)]);
        assert_eq!(placement(32, 0, &worker), [span("this board", Some((0, 31)), false), span("10.0.0.2:50052", None, true)]);
        // More than the model has is all of it.
        assert_eq!(placement(32, 99, &worker), placement(32, 32, &worker));
    }

    #[test]
    fn workers_split_by_free_memory_as_llama_cpp_does() {
        let workers = vec![("a:1".to_owned(), 4 << 30), ("b:1".to_owned(), 4 << 30)];
        // 17 offloaded (16 layers + output): a gets positions < 0.5, i.e. 9 of them.
        assert_eq!(
            placement(32, 16, &workers),
            [span("this board", Some((0, 15)), false), span("a:1", Some((16, 24)), false), span("b:1", Some((25, 31)), true)]
        );
        let uneven = vec![("a:1".to_owned(), 3 << 30), ("b:1".to_owned(), 1 << 30)];
        let spans = placement(8, 8, &uneven);
        assert_eq!(spans, [span("a:1", Some((0, 6)), false), span("b:1", Some((7, 7)), true)]);
    }

    #[test]
    fn without_workers_everything_is_here() {
        assert_eq!(placement(32, 0, &[]), [span("this board", Some((0, 31)), true)]);
    }

    #[test]
    fn configured_layers_are_kept_within_the_model() {
        assert_eq!(settle_layers(None, 32, 1), Ok(16));
        assert_eq!(settle_layers(Some(32), 32, 1), Ok(32));
        assert!(settle_layers(Some(33), 32, 1).unwrap_err().contains("use at most 32"));
    }

    #[test]
    fn an_endpoint_must_resolve_to_ipv4() {
        assert_eq!(resolve("127.0.0.1:50052").unwrap(), "127.0.0.1:50052".parse().unwrap());
        assert!(resolve("[::1]:50052").unwrap_err().contains("IPv4"));
        assert!(resolve("no-port").is_err());
    }

    #[test]
    fn waiting_reports_a_worker_that_does_not_answer_and_stops_when_cancelled() {
        // A port nothing listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut reasons = Vec::new();
        let result = wait_until_reachable(&[format!("127.0.0.1:{port}")], |reason| reasons.push(reason.to_owned()), || true);
        assert_eq!(result, Err(()));
        assert!(reasons[0].contains("does not answer"), "{reasons:?}");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let live = listener.local_addr().unwrap().to_string();
        assert_eq!(wait_until_reachable(&[live], |_| panic!("it answers"), || false), Ok(()));
    }
}
