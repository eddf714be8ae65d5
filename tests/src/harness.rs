//! Runs the real `phi3d` binary on a free loopback port for integration tests, and hands out
//! gRPC clients connected to it.
//!
//! The daemon's stderr is collected so that a failing test can show what the daemon said,
//! and the process is killed when the [`Daemon`] is dropped, whatever the test did.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
}

impl DaemonBuilder {
    pub fn new(binary: impl Into<PathBuf>, model: impl Into<PathBuf>) -> Self {
        DaemonBuilder {
            binary: binary.into(),
            model: model.into(),
            args: Vec::new(),
            env: Vec::new(),
            config: String::new(),
        }
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

    /// Starts the daemon and returns once its port accepts connections (the model may still
    /// be loading).
    pub async fn spawn(self) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("phi3d.toml");
        std::fs::write(&config, &self.config).expect("write config");
        let addr = free_port();
        let mut command = Command::new(&self.binary);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--model")
            .arg(&self.model)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--threads")
            .arg("1")
            .args(&self.args)
            .env("PHI3D_LOG", "info,phi3d=debug")
            // The prompt cache saved at exit stays with this daemon unless a test shares one.
            .env("PHI3D_PROMPT_CACHE_DIR", dir.path().join("prompt-cache"))
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn phi3d");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        let mut daemon = Daemon { child, addr, stderr, config_path: config, _dir: dir };
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

fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr")
}

impl Daemon {
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
                return status;
            }
            assert!(Instant::now() < deadline, "phi3d did not stop within {timeout:?}:\n{}", self.stderr());
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
