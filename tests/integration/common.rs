//! Fixtures shared by the integration tests.

use std::path::{Path, PathBuf};

use phi3d_proto::v1::{ChatEvent, ChatRequest, CompleteRequest, Done, GenerationOptions, Message, Role, chat_event};
use phi3d_tests::harness::{Daemon, DaemonBuilder};
use phi3d_tests::model_gen::{ModelSpec, ensure_model};
use tonic::Status;
use tonic::codec::Streaming;

pub const PHI3D: &str = env!("CARGO_BIN_EXE_phi3d");

/// The tiny generated Phi-3 model, written once per build directory.
pub fn tiny_model() -> PathBuf {
    ensure_model(Path::new(env!("CARGO_TARGET_TMPDIR")), &ModelSpec::tiny()).expect("generate the tiny model")
}

pub fn tiny_daemon() -> DaemonBuilder {
    DaemonBuilder::new(PHI3D, tiny_model())
}

/// A daemon with the tiny model, SERVING.
pub async fn daemon() -> Daemon {
    tiny_daemon().start().await
}

pub fn user(text: &str) -> Message {
    Message { role: Role::User as i32, content: text.to_owned(), ..Message::default() }
}

pub fn chat_request(text: &str, options: GenerationOptions) -> ChatRequest {
    ChatRequest { request_id: String::new(), messages: vec![user(text)], options: Some(options), tools: None }
}

pub fn complete_request(prompt: &str, options: GenerationOptions) -> CompleteRequest {
    CompleteRequest { request_id: String::new(), prompt: prompt.to_owned(), options: Some(options) }
}

/// Greedy decoding of exactly `max_tokens` tokens (end-of-generation ignored).
pub fn exactly(max_tokens: u32) -> GenerationOptions {
    GenerationOptions { max_tokens, temperature: Some(0.0), ignore_eos: true, ..GenerationOptions::default() }
}

/// A whole streamed reply.
#[derive(Debug)]
pub struct Reply {
    pub events: Vec<ChatEvent>,
    pub deltas: Vec<String>,
    pub done: Done,
}

impl Reply {
    pub fn text(&self) -> String {
        self.deltas.concat()
    }
}

/// Reads a stream to its end, checking the framing every stream must have: `started` first,
/// `done` last and only once.
pub async fn collect(mut stream: Streaming<ChatEvent>) -> Result<Reply, Status> {
    let mut events = Vec::new();
    while let Some(event) = stream.message().await? {
        events.push(event);
    }
    assert!(
        matches!(events.first().and_then(|event| event.event.as_ref()), Some(chat_event::Event::Started(_))),
        "the first event must be `started`: {events:?}"
    );
    let mut deltas = Vec::new();
    let mut done = None;
    for event in &events[1..] {
        assert!(done.is_none(), "`done` must be the last event: {events:?}");
        match event.event.clone() {
            Some(chat_event::Event::Delta(delta)) => deltas.push(delta.text),
            Some(chat_event::Event::Done(end)) => done = Some(end),
            other => panic!("unexpected event {other:?}"),
        }
    }
    let done = done.unwrap_or_else(|| panic!("the stream ended without `done`: {events:?}"));
    Ok(Reply { events, deltas, done })
}

/// A stream read to its end in the background, so that a test can hold a long request open
/// without letting its unread messages pile up in the client (h2 closes a connection that
/// buffers too many small frames). Aborting the task drops the stream, like a client leaving.
pub fn in_background(stream: Streaming<ChatEvent>) -> tokio::task::JoinHandle<Result<Reply, Status>> {
    tokio::spawn(collect(stream))
}

/// Waits until the daemon reports at least `active` slots generating.
pub async fn wait_active(daemon: &Daemon, active: u32) {
    let mut admin = daemon.admin().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = admin.get_status(phi3d_proto::v1::GetStatusRequest {}).await.unwrap().into_inner();
        let generating = status
            .slot_status
            .iter()
            .filter(|slot| slot.state == phi3d_proto::v1::slot_status::State::Generating as i32)
            .count() as u32;
        if generating >= active {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{active} requests never ran together: {status:?}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// A free loopback address for an HTTP listener.
pub fn http_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// A CA, a server certificate for localhost signed by it, a client certificate signed by it,
/// and a client certificate from another CA, as PEM files in `dir`.
pub struct Certificates {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

pub fn make_certificates(dir: &Path) -> Certificates {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let authority = |name: &str| {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let ca = authority("phi3d test CA");
    let rogue_ca = authority("someone else's CA");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let leaf = |names: Vec<String>, issuer: &CertifiedIssuer<'_, KeyPair>, stem: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, issuer).unwrap();
        (write(&format!("{stem}.pem"), cert.pem()), write(&format!("{stem}-key.pem"), key.serialize_pem()))
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], &ca, "server");
    let (client_cert, client_key) = leaf(vec!["client.example".into()], &ca, "client");
    let (rogue_cert, rogue_key) = leaf(vec!["rogue.example".into()], &rogue_ca, "rogue");
    Certificates { ca: write("ca.pem", ca.pem()), server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key }
}
