//! Who may use the daemon: a network listener needs authentication, bearer tokens guard every
//! RPC but health (created, revoked and checked through the CLI), TLS and mutual TLS with
//! certificates made here, the Unix socket and sockets passed by socket activation, and the
//! per-request and per-client limits.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use phi3d_proto::v1::admin_client::AdminClient;
use phi3d_proto::v1::inference_client::InferenceClient;
use phi3d_proto::v1::{CancelRequest, ChatRequest, GetStatusRequest};
use phi3d_tests::harness::tonic_health_client::{HealthCheckRequest, HealthClient, ServingStatus};
use phi3d_tests::harness::{Daemon, run};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::common::{PHI3D, chat_request, collect, exactly, in_background, make_certificates, tiny_daemon, tiny_model, user};

/// `phi3d token ACTION NAME` on `file`; stdout when it succeeds.
fn token_cli(file: &Path, args: &[&str]) -> String {
    let mut all = vec!["token"];
    all.extend_from_slice(args);
    all.extend(["--token-file", file.to_str().unwrap()]);
    let output = run(Path::new(PHI3D), &all, &[]);
    assert!(output.status.success(), "phi3d {all:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn status_code(daemon: &Daemon, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut admin = daemon.admin().await;
    let request = match token {
        Some(token) => with_token(GetStatusRequest {}, token),
        None => tonic::Request::new(GetStatusRequest {}),
    };
    admin.get_status(request).await.map(|_| ())
}

#[tokio::test]
async fn a_network_listener_needs_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("phi3d.toml");
    std::fs::write(&config, "").unwrap();
    let tokens = dir.path().join("tokens.toml");
    let model = tiny_model();
    let args = ["serve", "--config", config.to_str().unwrap(), "--model", model.to_str().unwrap(), "--listen", "0.0.0.0:0"];
    let env = [("PHI3D_TOKEN_FILE", tokens.to_str().unwrap()), ("PHI3D_PROMPT_CACHE_DIR", dir.path().to_str().unwrap())];
    let refused = run(Path::new(PHI3D), &args, &env);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("can be reached from the network, but no authentication is configured")
            && stderr.contains("phi3d token create")
            && stderr.contains("allow_unauthenticated_network"),
        "{stderr}"
    );

    // With a token it serves the network; with the override, it serves it without one.
    let all_interfaces = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let with_tokens_first = {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens.toml");
        token_cli(&file, &["create", "kitchen"]);
        let daemon = tiny_daemon().listen_ip(all_interfaces).env("PHI3D_TOKEN_FILE", file.to_str().unwrap()).spawn().await;
        (daemon, dir)
    };
    assert!(status_code(&with_tokens_first.0, None).await.unwrap_err().code() == Code::Unauthenticated);
    let open = tiny_daemon().listen_ip(all_interfaces).arg("--allow-unauthenticated-network").start().await;
    assert!(open.stderr().contains("anyone on the network can use this phi3d"), "{}", open.stderr());
    assert!(status_code(&open, None).await.is_ok());
}

#[tokio::test]
async fn tokens_guard_every_rpc_but_health_and_revocation_is_immediate() {
    let daemon = tiny_daemon().start().await;
    let file = daemon.dir().join("tokens.toml");
    assert!(status_code(&daemon, None).await.is_ok(), "no token file: tokens are off");

    // The first token locks the running daemon at once.
    let token = token_cli(&file, &["create", "homeassistant"]);
    assert!(token.starts_with("phi3d_"), "{token}");
    let missing = status_code(&daemon, None).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(missing.message().contains("requires a token") && missing.message().contains("--token"), "{missing:?}");
    let wrong = status_code(&daemon, Some("phi3d_0123")).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(wrong.message().contains("not valid"), "{wrong:?}");
    let mut inference = daemon.inference().await;
    let malformed = {
        let mut request = tonic::Request::new(chat_request("hi", exactly(2)));
        request.metadata_mut().insert("authorization", token.parse().unwrap());
        inference.chat(request).await.unwrap_err()
    };
    assert!(malformed.message().contains("Bearer <token>"), "{malformed:?}");
    assert!(status_code(&daemon, Some(&token)).await.is_ok());
    let stream = inference.chat(with_token(chat_request("hi", exactly(3)), &token)).await.unwrap().into_inner();
    assert_eq!(collect(stream).await.unwrap().done.usage.unwrap().completion_tokens, 3);

    // Health stays open to the supervisor and load balancers.
    let mut health = HealthClient::new(daemon.channel().await);
    let serving = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(serving.status, ServingStatus::Serving as i32);

    // The CLI sends the token it is given.
    let url = daemon.url();
    let status = run(Path::new(PHI3D), &["status", "--addr", &url, "--token", &token], &[]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let refused = run(Path::new(PHI3D), &["status", "--addr", &url], &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("Unauthenticated") && stderr.contains("--token"), "{stderr}");
    let by_env = run(Path::new(PHI3D), &["status", "--addr", &url], &[("PHI3D_TOKEN", &token)]);
    assert!(by_env.status.success(), "{}", String::from_utf8_lossy(&by_env.stderr));

    token_cli(&file, &["revoke", "homeassistant"]);
    let revoked = status_code(&daemon, Some(&token)).await.unwrap_err();
    assert_eq!(revoked.code(), Code::Unauthenticated);
    assert!(revoked.message().contains("`homeassistant` was revoked"), "{revoked:?}");
    let listing = token_cli(&file, &["list"]);
    assert!(listing.contains("homeassistant") && listing.contains("revoked"), "{listing}");
    assert!(!std::fs::read_to_string(&file).unwrap().contains(&token["phi3d_".len()..]), "only digests are stored");
}

async fn tls_channel(port: u16, ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
    }
    let endpoint = Endpoint::from_shared(format!("https://localhost:{port}")).unwrap().tls_config(tls).unwrap();
    endpoint.connect().await.map_err(|err| format!("{err:?}"))
}

/// Health over TLS until SERVING.
async fn wait_serving_tls(channel: Channel) {
    let mut health = HealthClient::new(channel);
    for _ in 0..6000 {
        let status = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status;
        if status == ServingStatus::Serving as i32 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not SERVING over TLS within 60 s");
}

/// A chat over `channel`, or the error status.
async fn chat_over(channel: Channel) -> Result<u32, tonic::Status> {
    let stream = InferenceClient::new(channel).chat(chat_request("hello", exactly(2))).await?.into_inner();
    Ok(collect(stream).await?.done.usage.unwrap().completion_tokens)
}

#[tokio::test]
async fn tls_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certificates(dir.path());
    let tls_args = |builder: phi3d_tests::harness::DaemonBuilder| {
        builder
            .arg("--tls-cert")
            .arg(certs.server_cert.to_str().unwrap())
            .arg("--tls-key")
            .arg(certs.server_key.to_str().unwrap())
    };

    let daemon = tls_args(tiny_daemon()).spawn().await;
    let port = daemon.addr.port();
    let channel = tls_channel(port, &certs.ca, None).await.unwrap();
    wait_serving_tls(channel.clone()).await;
    assert_eq!(chat_over(channel).await.unwrap(), 2);
    let plaintext = Channel::from_shared(daemon.url()).unwrap().connect().await;
    if let Ok(plaintext) = plaintext {
        assert!(chat_over(plaintext).await.is_err(), "plaintext gRPC must not reach a TLS listener");
    }
    // The CLI speaks TLS with the CA it is given, and says what is missing without one.
    let addr = format!("https://localhost:{port}");
    let status = run(Path::new(PHI3D), &["status", "--addr", &addr, "--tls-ca", certs.ca.to_str().unwrap()], &[]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let no_ca = run(Path::new(PHI3D), &["status", "--addr", &addr], &[]);
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("--tls-ca"), "{:?}", no_ca);
    drop(daemon);

    // Mutual TLS is authentication: it may serve the network.
    let daemon = tls_args(tiny_daemon())
        .arg("--tls-client-ca")
        .arg(certs.ca.to_str().unwrap())
        .listen_ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        .spawn()
        .await;
    let port = daemon.addr.port();
    let good = tls_channel(port, &certs.ca, Some((&certs.client_cert, &certs.client_key))).await.unwrap();
    wait_serving_tls(good.clone()).await;
    assert_eq!(chat_over(good).await.unwrap(), 2);
    for identity in [None, Some((certs.rogue_cert.as_path(), certs.rogue_key.as_path()))] {
        // The handshake fails, either at connect or at the first call (TLS 1.3 sends the
        // server's verdict on the client certificate after the client thinks it is done).
        let refused = match tls_channel(port, &certs.ca, identity).await {
            Err(_) => true,
            Ok(channel) => chat_over(channel).await.is_err(),
        };
        assert!(refused, "a client with {identity:?} must be refused");
    }
    let status = run(
        Path::new(PHI3D),
        &[
            "status",
            "--addr",
            &format!("https://localhost:{port}"),
            "--tls-ca",
            certs.ca.to_str().unwrap(),
            "--tls-cert",
            certs.client_cert.to_str().unwrap(),
            "--tls-key",
            certs.client_key.to_str().unwrap(),
        ],
        &[],
    );
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
}

async fn unix_channel(path: &Path) -> Channel {
    let path = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect to the unix socket")
}

#[tokio::test]
async fn the_unix_socket_serves_with_its_mode_and_goes_with_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/phi3d.sock");
    let mut daemon =
        tiny_daemon().arg("--unix-socket").arg(socket.to_str().unwrap()).arg("--unix-socket-mode").arg("600").start().await;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(chat_over(unix_channel(&socket).await).await.unwrap(), 2);
    let addr = format!("unix:{}", socket.display());
    let status = run(Path::new(PHI3D), &["status", "--addr", &addr], &[]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    assert!(!socket.exists(), "the socket file phi3d made goes with it");
}

#[tokio::test]
async fn sockets_passed_by_socket_activation_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let socket = dir.path().join("activated.sock");
    let unix = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut daemon =
        tiny_daemon().socket_activation(vec![tcp.into(), unix.into()], addr).start().await;
    assert!(daemon.stderr().contains("using the sockets systemd passed"), "{}", daemon.stderr());
    assert_eq!(chat_over(daemon.channel().await).await.unwrap(), 2);
    assert_eq!(chat_over(unix_channel(&socket).await).await.unwrap(), 2);
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    assert!(socket.exists(), "a passed socket belongs to systemd and stays");
}

#[tokio::test]
async fn each_limit_is_refused_by_name() {
    let daemon = tiny_daemon()
        .arg("--max-request-bytes")
        .arg("2048")
        .arg("--max-prompt-tokens")
        .arg("40")
        .arg("--max-tokens-limit")
        .arg("20")
        .start()
        .await;
    let mut inference = daemon.inference().await;
    let too_big = inference.chat(chat_request(&"x".repeat(3000), exactly(2))).await.unwrap_err();
    assert_eq!(too_big.code(), Code::ResourceExhausted);
    assert!(too_big.message().contains("max_request_bytes") && too_big.message().contains("2048"), "{too_big:?}");
    let huge = inference.chat(chat_request(&"x".repeat(100_000), exactly(2))).await.unwrap_err();
    assert!(matches!(huge.code(), Code::ResourceExhausted | Code::OutOfRange), "{huge:?}");
    let long_prompt = inference.chat(chat_request(&"one two three ".repeat(30), exactly(2))).await.unwrap_err();
    assert_eq!(long_prompt.code(), Code::InvalidArgument);
    assert!(long_prompt.message().contains("max_prompt_tokens"), "{long_prompt:?}");
    let long_reply = inference.chat(chat_request("hi", exactly(21))).await.unwrap_err();
    assert_eq!(long_reply.code(), Code::InvalidArgument);
    assert!(long_reply.message().contains("max_tokens_limit") && long_reply.message().contains("20"), "{long_reply:?}");
    let stream = inference.chat(chat_request("hi", exactly(20))).await.unwrap().into_inner();
    assert_eq!(collect(stream).await.unwrap().done.usage.unwrap().completion_tokens, 20, "the limit itself is allowed");
}

#[tokio::test]
async fn a_client_has_a_stream_limit_and_cannot_cancel_another_clients_request() {
    let daemon = tiny_daemon()
        .arg("--max-streams-per-client")
        .arg("2")
        .arg("--slots")
        .arg("1")
        .arg("--max-tokens-limit")
        .arg("1000000")
        .start()
        .await;
    let file = daemon.dir().join("tokens.toml");
    let alice = token_cli(&file, &["create", "alice"]);
    let bob = token_cli(&file, &["create", "bob"]);
    let mut inference = daemon.inference().await;
    let long = |id: &str, token: &str| {
        let request = ChatRequest { request_id: id.into(), messages: vec![user("go on")], options: Some(exactly(100_000)), tools: None };
        with_token(request, token)
    };
    // max_tokens is far beyond the context: the replies end when the context is full, long
    // after this test has made its checks and cancelled them.
    let first = in_background(inference.chat(long("alice-1", &alice)).await.unwrap().into_inner());
    let second = in_background(inference.chat(long("alice-2", &alice)).await.unwrap().into_inner());
    let mut admin = AdminClient::new(daemon.channel().await);
    for _ in 0..1000 {
        let status = admin.get_status(with_token(GetStatusRequest {}, &bob)).await.unwrap().into_inner();
        if status.active_requests + status.queue_depth == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let third = inference.chat(long("alice-3", &alice)).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted);
    assert!(third.message().contains("max_streams_per_client") && third.message().contains("alice"), "{third:?}");

    let not_yours = inference.cancel(with_token(CancelRequest { request_id: "alice-1".into() }, &bob)).await.unwrap_err();
    assert_eq!(not_yours.code(), Code::PermissionDenied);
    assert!(not_yours.message().contains("another client"), "{not_yours:?}");
    let status = admin.get_status(with_token(GetStatusRequest {}, &bob)).await.unwrap().into_inner();
    assert_eq!(status.active_requests + status.queue_depth, 2, "bob's cancel disturbed nothing");

    for id in ["alice-1", "alice-2"] {
        let found = inference.cancel(with_token(CancelRequest { request_id: id.into() }, &alice)).await.unwrap();
        assert!(found.into_inner().found);
    }
    for stream in [first, second] {
        let reply = stream.await.unwrap().unwrap();
        assert_eq!(reply.done.stop_reason, phi3d_proto::v1::StopReason::Cancelled as i32);
    }
    let again = inference.chat(with_token(chat_request("hi", exactly(2)), &alice)).await.unwrap().into_inner();
    assert!(collect(again).await.is_ok(), "finished streams give their places back");
}
