//! Runs the real `phi3d` binary on a free loopback port for integration tests, and hands out
//! gRPC clients connected to it.
//!
//! The daemon's stderr is collected so that a failing test can show what the daemon said,
//! and the process is killed when the [`Daemon`] is dropped, whatever the test did.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phi3d_proto::v1::admin_client::AdminClient;
use phi3d_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;
use tonic_health_client::{HealthCheckRequest, HealthClient, ServingStatus};

/// The health-check client types, re-exported so that tests need no extra dependency.
pub mod tonic_health_client {
    pub use tonic_health::pb::health_check_response::ServingStatus;
    pub use tonic_health::pb::health_client::HealthClient;
    pub use tonic_health::pb::HealthCheckRequest;
}

/// A running daemon.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    /// Set once the daemon's stderr has ended (after it exits, with every line in `stderr`).
    stderr_ended: Arc<AtomicBool>,
    /// The config file the daemon reads (again on SIGHUP).
    pub config_path: PathBuf,
    /// Holds the daemon's config file and anything else it needs on disk.
    _dir: tempfile::TempDir,
}

/// How to start a daemon: `serve --model MODEL` plus any flags and environment.
pub struct DaemonBuilder {
    binary: PathBuf,
    model: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    config: String,
    /// Listening sockets handed over as systemd does (descriptors 3, 4, …), and the TCP
    /// address among them that the harness waits on.
    activation: Option<(Vec<std::os::fd::OwnedFd>, SocketAddr)>,
    listen_ip: std::net::IpAddr,
    /// Whether the daemon gets an empty plugins folder (the default, so that a test sees only
    /// the plugins it installs) or none, to find its plugins as a new user's daemon would.
    empty_plugins_dir: bool,
    /// `--threads` (1: the tiny model gains nothing from more); None leaves the daemon's
    /// default, threads chosen per step.
    threads: Option<u32>,
}

impl DaemonBuilder {
    pub fn new(binary: impl Into<PathBuf>, model: impl Into<PathBuf>) -> Self {
        DaemonBuilder {
            binary: binary.into(),
            model: model.into(),
            args: Vec::new(),
            env: Vec::new(),
            config: String::new(),
            activation: None,
            listen_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            empty_plugins_dir: true,
            threads: Some(1),
        }
    }

    /// `--threads COUNT`, or None for the daemon's default (chosen per step).
    pub fn threads(mut self, threads: Option<u32>) -> Self {
        self.threads = threads;
        self
    }

    /// Listens on `ip` (e.g. 0.0.0.0, reachable from the network) instead of loopback.
    pub fn listen_ip(mut self, ip: std::net::IpAddr) -> Self {
        self.listen_ip = ip;
        self
    }

    /// Passes `sockets` the way systemd's socket activation does; `addr` is the TCP one.
    pub fn socket_activation(mut self, sockets: Vec<std::os::fd::OwnedFd>, addr: SocketAddr) -> Self {
        self.activation = Some((sockets, addr));
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The TOML text of the config file the daemon gets (empty by default, so that a
    /// machine's /etc/phi3d/phi3d.toml never leaks into a test).
    pub fn config(mut self, toml: impl Into<String>) -> Self {
        self.config = toml.into();
        self
    }

    /// Leaves `plugins_dir` unset, so that the daemon uses the default folder or, where that
    /// does not exist, the bundled plugins.
    pub fn unconfigured_plugins_dir(mut self) -> Self {
        self.empty_plugins_dir = false;
        self
    }

    /// Starts the daemon and returns once its port accepts connections (the model may still
    /// be loading).
    pub async fn spawn(self) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("phi3d.toml");
        std::fs::write(&config, &self.config).expect("write config");
        let addr = self.activation.as_ref().map_or_else(|| free_port(self.listen_ip), |(_, addr)| *addr);
        let mut command = match &self.activation {
            None => Command::new(&self.binary),
            Some((sockets, _)) => activated(&self.binary, sockets),
        };
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--model")
            .arg(&self.model)
            .arg("--listen")
            .arg(addr.to_string())
            .args(self.threads.iter().flat_map(|threads| ["--threads".to_owned(), threads.to_string()]))
            .args(&self.args)
            .env("PHI3D_LOG", "info,phi3d=debug")
            // The prompt cache saved at exit stays with this daemon unless a test shares one.
            .env("PHI3D_PROMPT_CACHE_DIR", dir.path().join("prompt-cache"))
            // Nor does a machine's /etc/phi3d/tokens.toml: tokens are off until a test makes this file.
            .env("PHI3D_TOKEN_FILE", dir.path().join("tokens.toml"))
            .env_remove("RUST_LOG")
            .env_remove("PHI3D_PLUGINS_DIR");
        if self.empty_plugins_dir {
            // A --plugins-dir among the test's own arguments wins over this.
            let plugins = dir.path().join("plugins");
            std::fs::create_dir(&plugins).expect("create the plugins folder");
            command.env("PHI3D_PLUGINS_DIR", plugins);
        }
        command
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn phi3d");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        let stderr_ended = Arc::new(AtomicBool::new(false));
        let ended = stderr_ended.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
            ended.store(true, Ordering::Release);
        });
        let mut daemon = Daemon { child, addr, stderr, stderr_ended, config_path: config, _dir: dir };
        daemon.wait_for_port().await;
        daemon
    }

    /// Starts the daemon and waits until health reports SERVING.
    pub async fn start(self) -> Daemon {
        let daemon = self.spawn().await;
        daemon.wait_serving(Duration::from_secs(60)).await;
        daemon
    }
}

/// A command that starts `binary` with `sockets` as descriptors 3, 4, … and `LISTEN_PID` /
/// `LISTEN_FDS` set, as systemd does. The shell learns the pid the daemon will have (`exec`
/// keeps it), which the parent cannot know before the fork.
fn activated(binary: &Path, sockets: &[std::os::fd::OwnedFd]) -> Command {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"").arg(binary);
    command.env("LISTEN_FDS", sockets.len().to_string());
    let raw: Vec<i32> = sockets.iter().map(|socket| socket.as_raw_fd()).collect();
    // Between fork and exec only async-signal-safe calls: fcntl and dup2. Each socket is first
    // moved above the target range so that no dup2 overwrites one still to be moved.
    unsafe {
        command.pre_exec(move || {
            let mut high = Vec::with_capacity(raw.len());
            for fd in &raw {
                let moved = libc::fcntl(*fd, libc::F_DUPFD, 100);
                if moved < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high.push(moved);
            }
            for (index, fd) in high.iter().enumerate() {
                if libc::dup2(*fd, 3 + index as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    command
}

fn free_port(ip: std::net::IpAddr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).expect("bind a free port");
    listener.local_addr().expect("local addr")
}

impl Daemon {
    /// The daemon's own temporary directory (its config file, prompt cache and token file).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn wait_for_port(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("poll child") {
                panic!("phi3d exited with {status} before listening:\n{}", self.stderr());
            }
            assert!(Instant::now() < deadline, "phi3d did not listen within 60 s:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.expect("connect to phi3d")
    }

    pub async fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    pub async fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }

    /// The overall health status ("" service).
    pub async fn health_status(&self) -> ServingStatus {
        let response = self
            .health()
            .await
            .check(HealthCheckRequest { service: String::new() })
            .await
            .expect("health check");
        ServingStatus::try_from(response.into_inner().status).expect("known status")
    }

    pub async fn wait_serving(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.health_status().await != ServingStatus::Serving {
            assert!(Instant::now() < deadline, "phi3d not SERVING within {timeout:?}:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll child").is_none()
    }

    /// Sends SIGTERM and waits for the exit status (asynchronously, so that this test's own
    /// client connections can close while the daemon drains).
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait_exit(timeout).await
    }

    /// Sends the signal `name` (as `kill -NAME` spells it: TERM, HUP, INT).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
    }

    /// Waits until stderr holds `text` (at least `count` times in all).
    pub async fn wait_for_log(&self, text: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.stderr().matches(text).count() < count {
            assert!(Instant::now() < deadline, "phi3d never logged {text:?} within {timeout:?}:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the exit status, polling so that the test's own tasks keep running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll child") {
                self.wait_stderr_end().await;
                return status;
            }
            assert!(Instant::now() < deadline, "phi3d did not stop within {timeout:?}:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (briefly: a plugin child could keep the pipe open) until the reader thread has
    /// taken every line the exited daemon wrote, so that `stderr()` holds its last words.
    async fn wait_stderr_end(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.stderr_ended.load(Ordering::Acquire) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `phi3d` with `args` to completion (for the CLI and config-error tests).
pub fn run(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(binary)
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run phi3d")
}
