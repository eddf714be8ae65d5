//! One model on two "boards" over loopback, through llama.cpp's RPC backend:
//! a real `phi3d rpc-worker` process holds the tiny model's last layer and its output layer,
//! and a `serve` with `--rpc-worker` holds the rest. Its greedy text is the text of a daemon
//! that holds every layer; the status and metrics say where each layer lives; a worker killed
//! mid-reply ends that reply with UNAVAILABLE and stops the daemon (for its supervisor to
//! restart), and a daemon started while the worker is away waits, NOT_SERVING, until it is
//! back; `rpc-worker` refuses addresses off loopback unless their link is named.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use phi3d_proto::v1::GetStatusRequest;
use phi3d_tests::harness::{Daemon, run};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::{PHI3D, collect, complete_request, exactly, http_address, tiny_daemon, wait_active};

/// `phi3d rpc-worker` on a loopback port; killed when dropped (and if the test process dies).
struct Worker {
    child: Child,
    endpoint: String,
}

impl Worker {
    fn start(endpoint: &str) -> Worker {
        let mut command = Command::new(PHI3D);
        command
            .args(["rpc-worker", "--listen", endpoint, "--threads", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; the worker dies with the test.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().expect("start phi3d rpc-worker");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(endpoint).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("rpc-worker exited ({status}) before it listened; `phi3d rpc-worker` run by hand says why");
            }
            assert!(Instant::now() < deadline, "rpc-worker did not listen on {endpoint}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Worker { child, endpoint: endpoint.to_owned() }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn split_daemon(worker: &str, http: &str) -> phi3d_tests::harness::DaemonBuilder {
    tiny_daemon().arg("--rpc-worker").arg(worker).arg("--http-listen").arg(http).threads(Some(1))
}

/// A plain-HTTP GET: its status and body.
async fn http_get(url: &str) -> (u16, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::get(url).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn greedy(daemon: &Daemon, prompt: &str, tokens: u32) -> String {
    let stream = daemon.inference().await.complete(complete_request(prompt, exactly(tokens))).await.unwrap().into_inner();
    collect(stream).await.unwrap().text()
}

#[tokio::test]
async fn a_model_split_over_a_worker_writes_what_it_writes_alone() {
    let worker = Worker::start(&http_address());
    let http = http_address();
    let split = split_daemon(&worker.endpoint, &http).start().await;
    let local = tiny_daemon().threads(Some(1)).start().await;
    for prompt in ["The kitchen light is", "Turn on the porch lamp and", "light.living_room, light.kitchen, switch."] {
        let (alone, spread) = (greedy(&local, prompt, 48).await, greedy(&split, prompt, 48).await);
        assert!(!alone.is_empty());
        assert_eq!(spread, alone, "the split model wrote other text for {prompt:?}");
    }

    let status = split.admin().await.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    let places: Vec<(String, bool, u32, u32, bool)> = status
        .layers
        .iter()
        .map(|span| (span.device.clone(), span.has_layers, span.first_layer, span.last_layer, span.output))
        .collect();
    assert_eq!(
        places,
        [("this board".to_owned(), true, 0, 0, false), (worker.endpoint.clone(), true, 1, 1, true)],
        "the tiny model's two layers: one here, one (with the output layer) on the worker"
    );
    let cli = run(std::path::Path::new(PHI3D), &["status", "--addr", &split.url()], &[]);
    let printed = String::from_utf8_lossy(&cli.stdout);
    assert!(printed.contains(&format!("layers     1-1 and the output layer on {}", worker.endpoint)), "{printed}");
    let (_, metrics) = http_get(&format!("http://{http}/metrics")).await;
    let line = format!("phi3d_model_layers{{device=\"{}\"}} 1", worker.endpoint);
    assert!(metrics.contains(&line), "no `{line}` in /metrics:\n{metrics}");
}

#[tokio::test]
async fn a_lost_worker_ends_the_reply_with_unavailable_and_a_restart_waits_for_it() {
    let endpoint = http_address();
    let mut worker = Worker::start(&endpoint);
    let http = http_address();
    let mut daemon = split_daemon(&endpoint, &http).start().await;
    let stream = daemon.inference().await.complete(complete_request("Tell me about", exactly(4000))).await.unwrap().into_inner();
    let reply = tokio::spawn(collect(stream));
    wait_active(&daemon, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.kill();

    let ended = tokio::time::timeout(Duration::from_secs(20), reply).await.expect("the reply ended").unwrap();
    let status = ended.expect_err("a reply whose layers' worker died cannot finish");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("rpc worker"), "{status:?}");
    // The daemon stops for its supervisor to restart it, saying why.
    let exit = daemon.wait_exit(Duration::from_secs(30)).await;
    assert!(!exit.success(), "{exit:?}");
    assert!(daemon.stderr().contains("stopped answering"), "{}", daemon.stderr());

    // Restarted while the worker is away: up, NOT_SERVING, saying what it waits for.
    let http = http_address();
    let daemon = split_daemon(&endpoint, &http).spawn().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(daemon.health_status().await, ServingStatus::NotServing);
    let (code, body) = http_get(&format!("http://{http}/health")).await;
    assert_eq!(code, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "waiting", "{body}");
    assert!(!body.to_string().contains(&endpoint), "/health needs no token and must not point at the worker: {body}");
    let status = daemon.admin().await.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert!(status.waiting_for.contains("does not answer"), "{status:?}");
    let refused = daemon.inference().await.complete(complete_request("hi", exactly(4))).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(refused.message().contains(&endpoint), "{refused:?}");

    // The worker back: the daemon loads and serves.
    let _worker = Worker::start(&endpoint);
    daemon.wait_serving(Duration::from_secs(60)).await;
    assert!(!greedy(&daemon, "The porch light", 8).await.is_empty());
}

#[tokio::test]
async fn rpc_worker_serves_loopback_and_named_links_only() {
    for (args, expected) in [
        (vec!["--listen", "0.0.0.0:50052"], "every network"),
        (vec!["--listen", "10.200.0.7:50052"], "--allow-rpc-on"),
        (vec!["--listen", "10.200.0.7:50052", "--allow-rpc-on", "no-such-interface0"], "no interface of that name"),
        (vec!["--listen", "198.51.100.7:50052", "--allow-rpc-on", "198.51.100.0/24"], "not a private address"),
        (vec!["--listen", "[::1]:50052"], "IPv4"),
    ] {
        let mut all = vec!["rpc-worker"];
        all.extend(&args);
        let output = run(std::path::Path::new(PHI3D), &all, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was served");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // The refusal of an unknown interface lists this machine's, as getifaddrs gives them.
    let output = run(std::path::Path::new(PHI3D), &["rpc-worker", "--listen", "10.200.0.7:50052", "--allow-rpc-on", "nope0"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let listed = stderr.split("(interfaces: ").nth(1).unwrap_or_else(|| panic!("no interface list: {stderr}"));
    assert!(listed.split([',', ')', ' ', '\n']).any(|name| name == "lo"), "loopback is not listed: {stderr}");
}
