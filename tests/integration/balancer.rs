//! Several boards behind one address: the shipped HAProxy configuration
//! (`deploy/haproxy/haproxy.cfg`, its addresses swapped for loopback ports) in front of two
//! phi3d daemons. Requests are spread and each client keeps its board, so that its second turn
//! finds its prefix cached there; a board told to stop (SIGTERM, with the recommended
//! `shutdown_delay_seconds`) is drained with no failed request, HTTP or gRPC; a board that dies
//! is taken out within the health interval; `/health` needs no token. Without haproxy
//! (`apt-get install haproxy`) the tests skip, saying so (and fail with `PHI3D_TEST_STRICT=1`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use phi3d_proto::v1::inference_client::InferenceClient;
use phi3d_proto::v1::{ChatRequest, Message, Role, StopReason, chat_event};
use phi3d_tests::harness::{Daemon, DaemonBuilder};
use phi3d_tests::skip::skip;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::common::{collect, complete_request, exactly, http_address, tiny_daemon, user};

/// The header (gRPC metadata) a client may set to choose its affinity key.
const CLIENT_HEADER: &str = "x-phi3d-client";
/// The header the configuration adds to every response: the board that answered.
const BOARD_HEADER: &str = "x-phi3d-board";

/// HAProxy, found on PATH or where Debian puts it.
fn haproxy_binary() -> Option<PathBuf> {
    ["haproxy", "/usr/sbin/haproxy"].into_iter().map(PathBuf::from).find(|binary| {
        Command::new(binary).arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|status| status.success())
    })
}

/// A phi3d daemon with an HTTP listener.
struct Board {
    daemon: Daemon,
    http: String,
}

impl Board {
    async fn start(builder: DaemonBuilder) -> Board {
        let http = http_address();
        let daemon = builder.arg("--http-listen").arg(&http).start().await;
        Board { daemon, http }
    }

    fn grpc(&self) -> String {
        self.daemon.addr.to_string()
    }
}

/// HAProxy running the shipped configuration; killed when dropped.
struct Proxy {
    child: Child,
    log: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Each (backend, board) as HAProxy's stats page says it is: `"<status> <last check>"`.
type States = HashMap<(String, String), String>;

/// Whether HAProxy has taken `board` out of every backend.
fn is_out(states: &States, board: &str) -> bool {
    states.iter().all(|((_, server), state)| server != board || state.starts_with("DOWN"))
}

/// Two boards and the balancer in front of them.
struct Farm {
    boards: Vec<Board>,
    proxy: Proxy,
    http: String,
    grpc: String,
    stats: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// The shipped configuration with the example boards and the public ports replaced by these;
/// each replaced line must be there, so that the test follows the file it vouches for.
fn configuration(boards: &[Board], http: &str, grpc: &str, stats: &str) -> String {
    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy/haproxy.cfg"))
        .expect("read deploy/haproxy/haproxy.cfg");
    let mut replacements = vec![
        ("bind :11434".to_owned(), format!("bind {http}")),
        ("bind :50051 proto h2".to_owned(), format!("bind {grpc} proto h2")),
        ("127.0.0.1:8404".to_owned(), stats.to_owned()),
    ];
    for (index, board) in boards.iter().enumerate() {
        let example = format!("192.168.1.{}", 21 + index);
        let http_port = board.http.rsplit(':').next().unwrap();
        replacements.push((format!("{example}:11434 check"), format!("{} check", board.http)));
        replacements.push((
            format!("{example}:50051 proto h2 check port 11434"),
            format!("{} proto h2 check port {http_port}", board.grpc()),
        ));
    }
    let mut configuration = shipped;
    for (example, local) in replacements {
        assert!(configuration.contains(&example), "deploy/haproxy/haproxy.cfg no longer has `{example}`");
        configuration = configuration.replace(&example, &local);
    }
    configuration
}

impl Farm {
    /// Two boards started with `board`, and HAProxy once both are checked healthy; `None` (the
    /// test skips) without haproxy.
    async fn start(board: impl Fn() -> DaemonBuilder) -> Option<Farm> {
        let Some(haproxy) = haproxy_binary() else {
            skip("haproxy is not installed (apt-get install haproxy)");
            return None;
        };
        let boards = vec![Board::start(board()).await, Board::start(board()).await];
        let (http, grpc, stats) = (http_address(), http_address(), http_address());
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(&config, configuration(&boards, &http, &grpc, &stats)).expect("write haproxy.cfg");
        let check = Command::new(&haproxy).arg("-c").arg("-f").arg(&config).output().expect("run haproxy -c");
        assert!(check.status.success(), "haproxy -c: {}", String::from_utf8_lossy(&check.stderr));
        let log = dir.path().join("haproxy.log");
        let log_file = std::fs::File::create(&log).expect("create the haproxy log");
        let mut command = Command::new(&haproxy);
        // HAProxy dies with the test process, even one that is killed.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("start haproxy");
        let proxy = Proxy { child, log };
        // reqwest is built without a default TLS provider (phi3d installs ring's before its hub client).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("HTTP client");
        let farm = Farm { boards, proxy, http, grpc, stats, client, _dir: dir };
        farm.wait_for(|states| states.values().all(|state| state == "UP L7OK"), "every board checked healthy").await;
        Some(farm)
    }

    /// Each (backend, board) as the stats page says it is: its status and its last check; none
    /// while the page does not answer.
    async fn states(&self) -> States {
        let Ok(response) = self.client.get(format!("http://{}/stats;csv", self.stats)).send().await else {
            return States::new();
        };
        let csv = response.text().await.unwrap_or_default();
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().trim_start_matches("# ").split(',').collect();
        lines
            .map(|line| header.iter().copied().zip(line.split(',')).collect::<HashMap<_, _>>())
            .filter(|row| row.get("svname").is_some_and(|server| server.starts_with("board")))
            .map(|row| {
                let field = |name: &str| row.get(name).copied().unwrap_or_default().to_owned();
                ((field("pxname"), field("svname")), format!("{} {}", field("status"), field("check_status")))
            })
            .collect()
    }

    async fn wait_for(&self, done: impl Fn(&States) -> bool, what: &str) {
        let started = Instant::now();
        loop {
            let states = self.states().await;
            if states.len() == 2 * self.boards.len() && done(&states) {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "not {what} within 20 s: {states:?}\n{}", self.proxy.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An Ollama-API chat through the balancer as client `key`: the HTTP status, the board
    /// that answered and the body.
    async fn ask(&self, key: &str, text: &str) -> (reqwest::StatusCode, String, Value) {
        let body = json!({
            "model": "tiny", "stream": false, "messages": [{ "role": "user", "content": text }],
            "options": { "num_predict": 4, "seed": 1, "temperature": 0 },
        });
        let response = self
            .client
            .post(format!("http://{}/api/chat", self.http))
            .header(CLIENT_HEADER, key)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|err| panic!("the balancer did not answer: {err}\n{}", self.proxy.log()));
        let status = response.status();
        let board = response.headers().get(BOARD_HEADER).and_then(|value| value.to_str().ok()).unwrap_or("").to_owned();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, board, body)
    }

    /// Two client keys the balancer sends to board1 and board2.
    async fn keys_for_each_board(&self) -> (String, String) {
        let mut found: HashMap<String, String> = HashMap::new();
        for index in 0..64 {
            let key = format!("client-{index}");
            let response = self
                .client
                .get(format!("http://{}/api/version", self.http))
                .header(CLIENT_HEADER, &key)
                .send()
                .await
                .expect("the balancer answers");
            let board = response.headers().get(BOARD_HEADER).expect("the board header").to_str().unwrap().to_owned();
            found.entry(board).or_insert(key);
            if let (Some(first), Some(second)) = (found.get("board1"), found.get("board2")) {
                return (first.clone(), second.clone());
            }
        }
        panic!("64 client keys all went to one board: {found:?}");
    }

    async fn grpc_client(&self) -> InferenceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc)).unwrap().connect().await.expect("connect to the balancer");
        InferenceClient::new(channel)
    }
}

/// A gRPC request carrying the affinity key.
fn as_client<T>(key: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(CLIENT_HEADER, key.parse().unwrap());
    request
}

fn board_of<T>(response: &tonic::Response<T>) -> String {
    response.metadata().get(BOARD_HEADER).and_then(|value| value.to_str().ok()).unwrap_or("").to_owned()
}

#[tokio::test]
async fn requests_are_spread_and_each_client_keeps_its_board() {
    let Some(farm) = Farm::start(tiny_daemon).await else { return };
    let mut boards_seen = BTreeSet::new();
    for index in 0..12 {
        let key = format!("home-{index}");
        let (status, first, body) = farm.ask(&key, "What time is it?").await;
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
        assert!(body["done"].as_bool().unwrap_or(false), "{body}");
        let (status, second, _) = farm.ask(&key, "And the date?").await;
        assert_eq!(status, reqwest::StatusCode::OK);
        assert_eq!(first, second, "client {key} moved from {first} to {second}");
        boards_seen.insert(first);
    }
    assert_eq!(boards_seen, BTreeSet::from(["board1".to_owned(), "board2".to_owned()]), "twelve clients were not spread");

    // A Home Assistant's conversation over gRPC: its second turn goes to the board that read the
    // first, whose prompt cache holds the shared prefix.
    let system = "You are the voice assistant of a house with lights in the kitchen, the hall and the garden. ".repeat(6);
    let mut messages = vec![Message { role: Role::System as i32, content: system, ..Message::default() }, user("Turn on the kitchen light")];
    let mut client = farm.grpc_client().await;
    let first = client
        .chat(as_client("kitchen-tablet", ChatRequest { request_id: String::new(), messages: messages.clone(), options: Some(exactly(4)), tools: None }))
        .await
        .expect("the first turn");
    let first_board = board_of(&first);
    let reply = collect(first.into_inner()).await.expect("the first turn's stream");
    messages.push(Message { role: Role::Assistant as i32, content: reply.text(), ..Message::default() });
    messages.push(user("And the hall"));
    let second = client
        .chat(as_client("kitchen-tablet", ChatRequest { request_id: String::new(), messages, options: Some(exactly(4)), tools: None }))
        .await
        .expect("the second turn");
    assert_eq!(board_of(&second), first_board, "the second turn went to another board");
    assert!(!first_board.is_empty(), "the balancer names the board");
    let usage = collect(second.into_inner()).await.expect("the second turn's stream").done.usage.unwrap_or_default();
    assert!(usage.cached_prompt_tokens > 0, "the second turn found nothing cached on {first_board}: {usage:?}");
}

#[tokio::test]
async fn a_board_told_to_stop_is_drained_with_no_failed_request() {
    // The delay the docs recommend behind this configuration: longer than two failed checks.
    let board = || {
        tiny_daemon()
            .arg("--ctx-size")
            .arg("4096")
            .arg("--shutdown-grace-seconds")
            .arg("120")
            .arg("--shutdown-delay-seconds")
            .arg("3")
    };
    let Some(mut farm) = Farm::start(board).await else { return };
    let (to_board1, to_board2) = farm.keys_for_each_board().await;

    // A long reply on board1, through the balancer, by a gRPC client whose key goes there.
    let mut client = farm.grpc_client().await;
    let mut long = None;
    for index in 0..64 {
        let key = format!("long-{index}");
        let response = client.complete(as_client(&key, complete_request("Go on:", exactly(3000)))).await.expect("the long request");
        if board_of(&response) == "board1" {
            long = Some((key, response.into_inner()));
            break;
        }
    }
    let (grpc_to_board1, mut long) = long.expect("a gRPC client key that goes to board1");
    loop {
        let event = long.message().await.unwrap().expect("the long reply ended early");
        if matches!(event.event, Some(chat_event::Event::Delta(_))) {
            break;
        }
    }

    let stopping = Instant::now();
    farm.boards[0].daemon.signal("TERM");
    farm.boards[0].daemon.wait_for_log("still taking requests while load balancers take this daemon out", 1, Duration::from_secs(10)).await;
    // The board says it is stopping, to anyone who checks.
    let health = farm.client.get(format!("http://{}/health", farm.boards[0].http)).send().await.expect("board1's /health");
    assert_eq!(health.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "stopping");

    // Requests keep coming, board1's clients among them, over HTTP and gRPC, until the balancer
    // has taken board1 out and a while after: every one is answered, by board1 while its delay
    // lasts and by board2 once it is out.
    let mut board1_out = None;
    let mut answered_by = Vec::new();
    for round in 0.. {
        for key in [&to_board1, &to_board2] {
            let (status, board, body) = farm.ask(key, &format!("Question {round}")).await;
            assert_eq!(status, reqwest::StatusCode::OK, "a request failed while board1 stopped: {body}\n{}", farm.proxy.log());
            if key == &to_board1 {
                answered_by.push(board);
            }
        }
        let response = client
            .complete(as_client(&grpc_to_board1, complete_request("Short:", exactly(4))))
            .await
            .unwrap_or_else(|status| panic!("a gRPC request failed while board1 stopped: {status:?}"));
        collect(response.into_inner()).await.unwrap_or_else(|status| panic!("a gRPC reply failed while board1 stopped: {status:?}"));
        let states = farm.states().await;
        if board1_out.is_none() && is_out(&states, "board1") {
            board1_out = Some(stopping.elapsed());
        }
        if board1_out.is_some_and(|out| stopping.elapsed() > out + Duration::from_secs(2)) {
            break;
        }
        assert!(stopping.elapsed() < Duration::from_secs(30), "board1 was not taken out: {states:?}\n{}", farm.proxy.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = board1_out.unwrap();
    assert_eq!(answered_by.first().map(String::as_str), Some("board1"), "board1 refused requests during its delay: {answered_by:?}");
    assert_eq!(answered_by.last().map(String::as_str), Some("board2"), "{answered_by:?}");

    // The reply in flight runs to its end on the stopping board.
    let mut done = None;
    while let Some(event) = long.message().await.expect("the long reply ends with done, not an error") {
        if let Some(chat_event::Event::Done(end)) = event.event {
            done = Some(end);
        }
    }
    let done = done.expect("the long reply's done");
    assert_eq!(done.stop_reason, StopReason::MaxTokens as i32, "{:?}", done.usage);
    eprintln!(
        "board1 left the rotation {:.1} s after SIGTERM; {} requests of board1's HTTP client, answered by {}; \
         the long reply ({} tokens) finished {:.1} s after SIGTERM",
        out.as_secs_f64(),
        answered_by.len(),
        answered_by.join(" "),
        done.usage.unwrap_or_default().completion_tokens,
        stopping.elapsed().as_secs_f64(),
    );
    drop(client);
    let exit = farm.boards[0].daemon.wait_exit(Duration::from_secs(30)).await;
    assert!(exit.success(), "board1 exit {exit}:\n{}", farm.boards[0].daemon.stderr());
    let (status, board, _) = farm.ask(&to_board1, "Still there?").await;
    assert_eq!((status, board.as_str()), (reqwest::StatusCode::OK, "board2"));
}

#[tokio::test]
async fn health_needs_no_token_and_tells_nothing_else() {
    let board = Board::start(tiny_daemon()).await;
    let tokens = board.daemon.dir().join("tokens.toml");
    let created = Command::new(crate::common::PHI3D)
        .args(["token", "create", "kitchen", "--token-file"])
        .arg(&tokens)
        .output()
        .expect("phi3d token create");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let locked = client.get(format!("http://{}/api/tags", board.http)).send().await.unwrap();
    assert_eq!(locked.status(), reqwest::StatusCode::UNAUTHORIZED, "tokens are on");
    for authorization in [None, Some("Bearer phi3d_wrong"), Some("garbage")] {
        let mut request = client.get(format!("http://{}/health", board.http));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK, "{authorization:?}");
        assert_eq!(response.json::<Value>().await.unwrap(), json!({ "status": "ok" }), "{authorization:?}");
    }
    // A web page on another origin learns nothing, as on every other path.
    let foreign = client.get(format!("http://{}/health", board.http)).header("origin", "http://evil.example").send().await.unwrap();
    assert_eq!(foreign.status(), reqwest::StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_board_that_dies_is_taken_out_within_the_health_interval() {
    let Some(mut farm) = Farm::start(tiny_daemon).await else { return };
    let (_, to_board2) = farm.keys_for_each_board().await;
    farm.boards[1].daemon.signal("KILL");
    let died = Instant::now();
    let exit = farm.boards[1].daemon.wait_exit(Duration::from_secs(10)).await;
    assert!(!exit.success());
    // Its clients are answered by the other board at once: the refused connection is retried.
    let (status, board, body) = farm.ask(&to_board2, "Are you there?").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}\n{}", farm.proxy.log());
    assert_eq!(board, "board1");
    farm.wait_for(|states| is_out(states, "board2"), "board2 out").await;
    let out = died.elapsed();
    // Checked every second, out after two failures: 2 s, plus a check in progress and a slow machine.
    assert!(out < Duration::from_secs(5), "board2 was taken out only {out:?} after it died");
    eprintln!("board2 was taken out {:.1} s after it died", out.as_secs_f64());
}
