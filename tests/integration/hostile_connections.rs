//! Hostile connections and browsers, over real sockets: connections that say nothing, trickle
//! their headers or body, or idle after a request are closed within the configured deadlines;
//! one client's connections are capped while another client is still served; the HTTP
//! listener requires the same client certificates as gRPC; web pages (a foreign `Origin`, a
//! rebound `Host`, a non-JSON body from a browser) are refused, while loopback pages and curl
//! still work.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phi3d_tests::harness::Daemon;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::{make_certificates, tiny_daemon};

/// A free loopback address for the HTTP listener.
fn http_address() -> SocketAddr {
    crate::common::http_address().parse().unwrap()
}

/// Reads until the peer closes (or fails) and returns what came and how long it took; panics
/// when the connection is still open after `limit`.
async fn read_until_closed(stream: &mut (impl AsyncRead + Unpin), limit: Duration, what: &str, daemon: &Daemon) -> (String, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buffer)).await {
            Err(_) => panic!("{what}: still open after {limit:?}; received {:?}\n{}", String::from_utf8_lossy(&received), daemon.stderr()),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&received).into_owned(), started.elapsed()),
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`; the whole response as text.
async fn exchange(stream: &mut (impl AsyncRead + AsyncWrite + Unpin), request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

async fn http(address: SocketAddr, request: &str) -> String {
    exchange(&mut TcpStream::connect(address).await.unwrap(), request).await
}

/// A request's text: `headers` are extra lines, each ending in \r\n.
fn request(method: &str, path: &str, headers: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn status(response: &str) -> u16 {
    response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("no HTTP status in {response:?}"))
}

/// Writes `bytes` one at a time, `pause` apart, until the peer closes.
fn trickle(mut writer: tokio::net::tcp::OwnedWriteHalf, bytes: Vec<u8>, pause: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for byte in bytes.iter().cycle() {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
    })
}

#[tokio::test]
async fn silent_trickling_and_idle_connections_are_closed_in_time() {
    let address = http_address();
    let daemon = tiny_daemon()
        .args_for_test(&["--http-listen", &address.to_string(), "--header-timeout-seconds", "1"])
        .args_for_test(&["--body-timeout-seconds", "2", "--idle-timeout-seconds", "2"])
        .start()
        .await;
    // Headers within 1 s, bodies within 2 s, idle 2 s: each connection below must go in < 6 s.
    let limit = Duration::from_secs(6);

    for (name, target) in [("HTTP", address), ("gRPC", daemon.addr)] {
        let mut silent = TcpStream::connect(target).await.unwrap();
        let (_, took) = read_until_closed(&mut silent, limit, &format!("a silent {name} connection"), &daemon).await;
        assert!(took >= Duration::from_millis(500), "{name}: closed before its header timeout ({took:?})");
    }

    // Headers one byte at a time, never finished (on gRPC: the HTTP/2 preface).
    for (name, target, text) in [
        ("HTTP", address, b"GET /api/tags HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec()),
        ("gRPC", daemon.addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
    ] {
        let (mut reader, writer) = TcpStream::connect(target).await.unwrap().into_split();
        let writing = trickle(writer, text, Duration::from_millis(200));
        read_until_closed(&mut reader, limit, &format!("{name} headers trickled"), &daemon).await;
        writing.abort();
    }

    // A body one byte at a time: the request ends with an error and the connection closes.
    let (mut reader, mut writer) = TcpStream::connect(address).await.unwrap().into_split();
    writer
        .write_all(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n{")
        .await
        .unwrap();
    let writing = trickle(writer, b" ".to_vec(), Duration::from_millis(200));
    let (response, _) = read_until_closed(&mut reader, limit, "an HTTP body trickled", &daemon).await;
    writing.abort();
    assert!(response.is_empty() || (400..500).contains(&status(&response)), "{response}");

    // Kept alive after an answer, then idle: closed after the idle timeout.
    let mut idle = TcpStream::connect(address).await.unwrap();
    idle.write_all(b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let (response, _) = read_until_closed(&mut idle, limit, "an idle kept-alive connection", &daemon).await;
    assert_eq!(status(&response), 200, "{response}");

    // A request in flight is served whole.
    let body = r#"{"model":"phi3-test-tiny","prompt":"hi","stream":true,"options":{"num_predict":4}}"#;
    let response = http(address, &request("POST", "/api/generate", "Content-Type: application/json\r\n", body)).await;
    assert_eq!(status(&response), 200, "{response}");

    // Meanwhile everyone else is served.
    assert_eq!(status(&http(address, &request("GET", "/api/tags", "", "")).await), 200);
}

/// A connection from `source` (any 127.x.y.z address is this machine's).
async fn connect_from(source: &str, target: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(target).await.unwrap()
}

#[tokio::test]
async fn one_client_cannot_take_every_connection() {
    let address = http_address();
    let daemon = tiny_daemon()
        .args_for_test(&["--http-listen", &address.to_string(), "--max-connections-per-client", "8"])
        .args_for_test(&["--header-timeout-seconds", "60", "--idle-timeout-seconds", "60"])
        .start()
        .await;
    // The harness's own health checks close their connections; let them go.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut hoard = Vec::new();
    for _ in 0..8 {
        hoard.push(connect_from("127.0.0.1", address).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The ninth from the same client, on either listener, is closed without an answer.
    for target in [address, daemon.addr] {
        let mut extra = connect_from("127.0.0.1", target).await;
        let _ = extra.write_all(request("GET", "/api/tags", "", "").as_bytes()).await;
        let (response, _) = read_until_closed(&mut extra, Duration::from_secs(5), "a connection over the cap", &daemon).await;
        assert!(!response.starts_with("HTTP/1.1 200"), "served over the cap: {response}");
    }
    // The daemon logs before it closes, but the harness reads its stderr on another thread.
    daemon.wait_for_log("max_connections_per_client", 1, Duration::from_secs(5)).await;

    // Another client is served meanwhile, on HTTP and on gRPC.
    let mut other = connect_from("127.0.0.2", address).await;
    let response = exchange(&mut other, &request("GET", "/api/tags", "", "")).await;
    assert_eq!(status(&response), 200, "{response}");
    let mut grpc = connect_from("127.0.0.2", daemon.addr).await;
    grpc.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let mut settings = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), grpc.read_exact(&mut settings)).await.unwrap().unwrap();
    assert_eq!(settings[3], 4, "the server's SETTINGS frame: {settings:?}");

    // Once the hoard closes, the first client is served again.
    drop(hoard);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = http(address, &request("GET", "/api/tags", "", "")).await;
    assert_eq!(status(&response), 200, "{response}");
}

/// A TLS connection to `address` trusting `ca`, with a client certificate or none.
async fn tls_connect(
    address: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert).unwrap().map(Result::unwrap).collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = TcpStream::connect(address).await?;
    connector.connect(ServerName::try_from("localhost").unwrap(), stream).await
}

#[tokio::test]
async fn the_http_listener_requires_the_same_client_certificates_as_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certificates(dir.path());
    // Reachable from the network, with client certificates as its only authentication: it
    // may start only because the HTTP listener requires them too.
    let port = http_address().port();
    let daemon = tiny_daemon()
        .args_for_test(&["--http-listen", &format!("0.0.0.0:{port}")])
        .args_for_test(&["--tls-cert", certs.server_cert.to_str().unwrap(), "--tls-key", certs.server_key.to_str().unwrap()])
        .args_for_test(&["--tls-client-ca", certs.ca.to_str().unwrap()])
        .spawn()
        .await;
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let tags = request("GET", "/api/tags", "", "");

    // With a client certificate: served (once the listener is up).
    let deadline = Instant::now() + Duration::from_secs(60);
    let response = loop {
        if let Ok(mut stream) = tls_connect(address, &certs.ca, Some((&certs.client_cert, &certs.client_key))).await {
            let response = exchange(&mut stream, &tags).await;
            if response.starts_with("HTTP/1.1 200") {
                break response;
            }
        }
        assert!(Instant::now() < deadline, "no HTTPS answer with a client certificate:\n{}", daemon.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(response.contains("phi3-test-tiny"), "{response}");

    // Plain text: no HTTP answer at all.
    let plain = http(address, &tags).await;
    assert!(!plain.starts_with("HTTP/"), "served in plain text: {plain}");

    // TLS without a client certificate: refused in the handshake or at the first read.
    if let Ok(mut stream) = tls_connect(address, &certs.ca, None).await {
        let response = exchange(&mut stream, &tags).await;
        assert!(!response.starts_with("HTTP/"), "served without a client certificate: {response}");
    }
}

#[tokio::test]
async fn browsers_are_kept_out_and_loopback_pages_and_curl_still_work() {
    let address = http_address();
    let daemon = tiny_daemon()
        .args_for_test(&["--http-listen", &address.to_string(), "--http-allowed-origin", "https://ha.example:8123"])
        .start()
        .await;
    let generate = r#"{"model":"phi3-test-tiny","prompt":"hi","stream":false,"options":{"num_predict":2}}"#;
    let chat = r#"{"model":"phi3-test-tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    let pull = r#"{"model":"phi-3-mini-4k-instruct"}"#;
    let evil = "Origin: http://evil.example\r\nContent-Type: text/plain\r\n";

    // A page elsewhere posting text/plain (no preflight) on each API, the download included.
    for (path, body) in [("/api/generate", generate), ("/v1/chat/completions", chat), ("/api/pull", pull)] {
        let response = http(address, &request("POST", path, evil, body)).await;
        assert_eq!(status(&response), 403, "{path}: {response}");
        assert!(response.contains("http_allowed_origins"), "{path}: the refusal says which key: {response}");
        let shape = if path.starts_with("/api/") { r#"{"error":""# } else { r#"{"error":{"message":"# };
        assert!(response.contains(shape), "{path}: the API's error shape: {response}");
    }
    // DNS rebinding: a page under another name reaching the loopback listener.
    let rebound = format!("GET /api/tags HTTP/1.1\r\nHost: rebind.attacker.example:{}\r\nConnection: close\r\n\r\n", address.port());
    let response = http(address, &rebound).await;
    assert_eq!(status(&response), 403, "{response}");
    assert!(response.contains("http_allowed_hosts"), "{response}");
    // Even an allowed (loopback) page may not send a body browsers send without asking.
    let simple = "Origin: http://localhost:3000\r\nContent-Type: text/plain\r\n";
    assert_eq!(status(&http(address, &request("POST", "/api/generate", simple, generate)).await), 415);
    let cross_site = "Sec-Fetch-Site: cross-site\r\nContent-Type: application/x-www-form-urlencoded\r\n";
    assert_eq!(status(&http(address, &request("POST", "/api/generate", cross_site, generate)).await), 403);

    // A loopback page sending JSON is served, with CORS.
    let local = "Origin: http://localhost:3000\r\nContent-Type: application/json\r\n";
    let response = http(address, &request("POST", "/api/generate", local, generate)).await;
    assert_eq!(status(&response), 200, "{response}\n{}", daemon.stderr());
    assert!(response.to_ascii_lowercase().contains("access-control-allow-origin: http://localhost:3000"), "{response}");
    // A configured origin: its preflight is answered, then its JSON served.
    let preflight = "Origin: https://ha.example:8123\r\nAccess-Control-Request-Method: POST\r\n\
                     Access-Control-Request-Headers: content-type, authorization\r\n";
    let response = http(address, &request("OPTIONS", "/v1/chat/completions", preflight, "")).await;
    assert_eq!(status(&response), 204, "{response}");
    assert!(response.to_ascii_lowercase().contains("access-control-allow-origin: https://ha.example:8123"), "{response}");
    let configured = "Origin: https://ha.example:8123\r\nContent-Type: application/json\r\n";
    assert_eq!(status(&http(address, &request("POST", "/v1/chat/completions", configured, chat)).await), 200);

    // curl -d: a form content type and no Origin is read as JSON, as Ollama does.
    let curl = "Content-Type: application/x-www-form-urlencoded\r\nUser-Agent: curl/8.5.0\r\n";
    let response = http(address, &request("POST", "/api/generate", curl, generate)).await;
    assert_eq!(status(&response), 200, "{response}");
    assert!(response.contains(r#""done":true"#), "{response}");
    // And a local Host with a port, as every client sends it.
    let local_host = format!("GET /api/tags HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\r\n", address.port());
    assert_eq!(status(&http(address, &local_host).await), 200);
}

/// `DaemonBuilder::arg` for several at once.
trait ArgsForTest {
    fn args_for_test(self, args: &[&str]) -> Self;
}

impl ArgsForTest for phi3d_tests::harness::DaemonBuilder {
    fn args_for_test(self, args: &[&str]) -> Self {
        args.iter().fold(self, |builder, arg| builder.arg(*arg))
    }
}
