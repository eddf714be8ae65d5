//! A fake Hugging Face hub for tests: the two endpoints `phi3d pull` uses, served from memory
//! on 127.0.0.1, with knobs for the failures a real download meets.
//!
//! Endpoints, as the real hub has them:
//! - `GET /api/models/{owner}/{name}/tree/main`: a JSON array describing the repository's
//!   files; LFS files carry `lfs.size` and `lfs.oid` (the SHA-256 of the content).
//! - `GET /{owner}/{name}/resolve/main/{file}`: the file's bytes, honouring
//!   `Range: bytes=START-[END]` with `206 Partial Content` and `Content-Range`.
//!
//! The server runs on its own thread and tokio runtime, so that synchronous tests (which run
//! the `phi3d` binary as a subprocess) and `#[tokio::test]`s can both use it. Every request is
//! recorded, so a test can check what the client asked for (e.g. that a resume asked only for
//! the missing bytes, or that offline mode asked for nothing).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
// axum's streaming bodies need a `Stream`; tonic (already a dependency) re-exports tokio-stream,
// which saves this crate a dependency of its own.
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

/// One file the fake hub serves, and how truthfully.
#[derive(Debug, Clone)]
pub struct FakeFile {
    repo: String,
    path: String,
    bytes: Bytes,
    stated_sha256: String,
    served: Bytes,
    lfs: bool,
}

impl FakeFile {
    /// `bytes` served as `path` in `repo` (`owner/name`), listed as an LFS file with its true
    /// size and SHA-256.
    pub fn new(repo: impl Into<String>, path: impl Into<String>, bytes: Vec<u8>) -> Self {
        let bytes = Bytes::from(bytes);
        FakeFile {
            repo: repo.into(),
            path: path.into(),
            stated_sha256: hex::encode(Sha256::digest(&bytes)),
            served: bytes.clone(),
            bytes,
            lfs: true,
        }
    }

    /// Make the tree API state `sha256_hex` instead of the true digest, as if the content
    /// had changed under the client or the listing were wrong.
    pub fn stating_sha256(mut self, sha256_hex: &str) -> Self {
        self.stated_sha256 = sha256_hex.to_owned();
        self
    }

    /// Serve the file with one byte flipped in the middle (same length), while the listing
    /// still states the true SHA-256: a download corrupted in transit.
    pub fn serving_corrupted(mut self) -> Self {
        let mut bytes = self.bytes.to_vec();
        if let Some(mid) = bytes.len().checked_sub(1).map(|last| last / 2) {
            bytes[mid] ^= 0xff;
        }
        self.served = Bytes::from(bytes);
        self
    }

    /// List the file as a plain git file, without the `lfs` size and digest.
    pub fn without_lfs(mut self) -> Self {
        self.lfs = false;
        self
    }

    /// The SHA-256 of the true content, in lowercase hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(&self.bytes))
    }

    /// The true content.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// One request the fake hub received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    /// The request path, without the query.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// Whether this request was answered with file bytes (a download, full or partial).
    pub download: bool,
}

#[derive(Default)]
struct Knobs {
    token: Option<String>,
    cut_next_after: Option<u64>,
    redirect: bool,
}

struct Shared {
    files: Vec<FakeFile>,
    knobs: Mutex<Knobs>,
    seen: Mutex<Vec<SeenRequest>>,
}

/// A running fake hub; it stops when dropped.
pub struct FakeHub {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Where a redirected download is served from; stands in for the hub's CDN.
const CDN_PREFIX: &str = "/_cdn/";

/// How long a cut response waits between its last bytes and the cut, so that those bytes are
/// flushed to the client before the connection goes.
const CUT_DELAY: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock must not hide the panic behind a poison error.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeHub {
    /// Start serving `files` on an ephemeral port of 127.0.0.1.
    pub fn start(files: Vec<FakeFile>) -> FakeHub {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("listener address");
        let shared = Arc::new(Shared {
            files,
            knobs: Mutex::new(Knobs::default()),
            seen: Mutex::new(Vec::new()),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let thread = std::thread::Builder::new()
            .name("fake-hub".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake hub runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    // Not a graceful shutdown: a client that keeps a connection open must not
                    // keep the test waiting. Dropping the runtime ends every connection.
                    tokio::select! {
                        result = axum::serve(listener, app) => result.expect("fake hub server"),
                        _ = stopped => {}
                    }
                });
            })
            .expect("spawn fake hub thread");
        FakeHub {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The base URL to give the client as `HF_ENDPOINT`, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, answer 401 to any tree or resolve request that lacks
    /// `Authorization: Bearer {token}`.
    pub fn require_token(&self, token: &str) {
        lock(&self.shared.knobs).token = Some(token.to_owned());
    }

    /// Cut the connection of the next download response after `bytes` bytes of its body (the
    /// headers still promise the whole body). Later downloads are served whole.
    pub fn cut_next_download_after(&self, bytes: u64) {
        lock(&self.shared.knobs).cut_next_after = Some(bytes);
    }

    /// Answer resolve requests with a 302 to another URL that serves the bytes, as the real hub
    /// redirects to its CDN.
    pub fn redirect_downloads(&self, on: bool) {
        lock(&self.shared.knobs).redirect = on;
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.shared.seen).clone()
    }

    /// How many requests were received so far.
    pub fn request_count(&self) -> usize {
        lock(&self.shared.seen).len()
    }

    /// The requests that were answered with file bytes, oldest first.
    pub fn downloads(&self) -> Vec<SeenRequest> {
        self.requests().into_iter().filter(|r| r.download).collect()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let headers = request.headers();
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut seen = SeenRequest {
        method: request.method().to_string(),
        path: path.clone(),
        range: text(header::RANGE),
        authorization: text(header::AUTHORIZATION),
        download: false,
    };
    let response = route(&shared, &mut seen, request.headers());
    lock(&shared.seen).push(seen);
    response
}

fn route(shared: &Shared, seen: &mut SeenRequest, headers: &HeaderMap) -> Response {
    if seen.method != "GET" {
        return (StatusCode::METHOD_NOT_ALLOWED, "only GET is faked").into_response();
    }
    if let Some(cdn_path) = seen.path.strip_prefix(CDN_PREFIX) {
        // The CDN takes no token: the real one is reached through signed URLs.
        return match find_by_cdn_path(shared, cdn_path) {
            Some(file) => serve(shared, seen, file, headers),
            None => not_found(),
        };
    }
    let authorized = {
        let knobs = lock(&shared.knobs);
        match &knobs.token {
            None => true,
            Some(token) => seen.authorization.as_deref() == Some(&format!("Bearer {token}")),
        }
    };
    let segments: Vec<&str> = seen.path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "models", owner, name, "tree", "main"] => {
            if !authorized {
                return unauthorized();
            }
            tree(shared, &format!("{owner}/{name}"))
        }
        [owner, name, "resolve", "main", file @ ..] => {
            if !authorized {
                return unauthorized();
            }
            let repo = format!("{owner}/{name}");
            let file = file.join("/");
            let Some(found) = shared
                .files
                .iter()
                .find(|f| f.repo == repo && f.path == file)
            else {
                return not_found();
            };
            if lock(&shared.knobs).redirect {
                let location = format!("{CDN_PREFIX}{repo}/{file}");
                return (StatusCode::FOUND, [(header::LOCATION, location)]).into_response();
            }
            serve(shared, seen, found, headers)
        }
        _ => not_found(),
    }
}

fn find_by_cdn_path<'a>(shared: &'a Shared, cdn_path: &str) -> Option<&'a FakeFile> {
    shared.files.iter().find(|f| {
        cdn_path
            .strip_prefix(f.repo.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|file| file == f.path)
    })
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "Entry not found").into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "Invalid credentials in Authorization header",
    )
        .into_response()
}

/// The tree listing of `repo`, shaped like the real hub's (a `.gitattributes` included, so a
/// client must pick its file out of several entries).
fn tree(shared: &Shared, repo: &str) -> Response {
    let files: Vec<&FakeFile> = shared.files.iter().filter(|f| f.repo == repo).collect();
    if files.is_empty() {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    }
    let mut entries = vec![serde_json::json!({
        "type": "file",
        "oid": "a6344aac8c09253b3b630fb776ae94478aa0275b",
        "size": 1519,
        "path": ".gitattributes",
    })];
    for f in files {
        // A git object id is a SHA-1; any 40 hex digits do for a client that ignores it.
        let oid = &f.sha256_hex()[..40];
        let mut entry = serde_json::json!({
            "type": "file",
            "oid": oid,
            "size": f.bytes.len(),
            "path": f.path,
        });
        if f.lfs {
            entry["lfs"] = serde_json::json!({
                "oid": f.stated_sha256,
                "size": f.bytes.len(),
                "pointerSize": 135,
            });
        }
        entries.push(entry);
    }
    axum::Json(serde_json::Value::Array(entries)).into_response()
}

/// `bytes=START-` or `bytes=START-END` (the only forms a downloader sends), as inclusive
/// bounds; `None` for anything else.
fn parse_range(value: &str) -> Option<(u64, Option<u64>)> {
    let (start, end) = value.strip_prefix("bytes=")?.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => None,
        end => Some(end.parse().ok()?),
    };
    Some((start, end))
}

fn serve(
    shared: &Shared,
    seen: &mut SeenRequest,
    file: &FakeFile,
    headers: &HeaderMap,
) -> Response {
    let total = file.served.len() as u64;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range.map(parse_range) {
        None => (StatusCode::OK, 0, total),
        Some(Some((start, end))) if start < total && end.is_none_or(|end| end >= start) => {
            let end = end.map_or(total, |end| (end + 1).min(total));
            (StatusCode::PARTIAL_CONTENT, start, end)
        }
        Some(_) => {
            let content_range = format!("bytes */{total}");
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, content_range)],
            )
                .into_response();
        }
    };
    seen.download = true;
    let slice = file.served.slice(start as usize..end as usize);
    let length = slice.len() as u64;

    let cut = lock(&shared.knobs).cut_next_after.take();
    let body = match cut {
        Some(keep) if keep < length => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
            let head = slice.slice(..keep as usize);
            tokio::spawn(async move {
                let _ = tx.send(Ok(head)).await;
                tokio::time::sleep(CUT_DELAY).await;
                let cut = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut by test");
                let _ = tx.send(Err(cut)).await;
            });
            // A body of unknown length with an explicit Content-Length: when the stream fails
            // short of it, hyper drops the connection, which is what a client sees when a
            // download dies mid-way.
            Body::from_stream(ReceiverStream::new(rx))
        }
        _ => Body::from(slice),
    };

    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if status == StatusCode::PARTIAL_CONTENT {
        let content_range = format!("bytes {start}-{}/{total}", end - 1);
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&content_range).unwrap(),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    //! The fake hub on its own, through raw HTTP/1.1 (this crate has no HTTP client), so that
    //! tests of the real client can trust it.

    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    const REPO: &str = "owner/model-GGUF";
    const FILE: &str = "model-Q4.gguf";

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// One request on a fresh connection; reads until the server closes it.
    fn get(hub: &FakeHub, path: &str, extra_headers: &[(&str, &str)]) -> Reply {
        let mut stream = TcpStream::connect(hub.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            hub.addr
        );
        for (name, value) in extra_headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut raw = Vec::new();
        // A cut connection ends in a reset or an early EOF; keep what arrived either way.
        let _ = stream.read_to_end(&mut raw);
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("response head");
        let head = String::from_utf8(raw[..split].to_vec()).unwrap();
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Reply {
            status,
            headers,
            body: raw[split + 4..].to_vec(),
        }
    }

    fn content() -> Vec<u8> {
        (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    fn hub() -> FakeHub {
        FakeHub::start(vec![FakeFile::new(REPO, FILE, content())])
    }

    fn resolve_path() -> String {
        format!("/{REPO}/resolve/main/{FILE}")
    }

    #[test]
    fn tree_states_size_and_sha256_of_lfs_files() {
        let hub = hub();
        let reply = get(&hub, &format!("/api/models/{REPO}/tree/main"), &[]);
        assert_eq!(reply.status, 200);
        let listing: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        let entry = listing
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == FILE)
            .expect("file listed");
        assert_eq!(entry["type"], "file");
        assert_eq!(entry["lfs"]["size"], 100_000);
        assert_eq!(entry["lfs"]["oid"], hex::encode(Sha256::digest(content())));
        assert!(
            listing
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["path"] == ".gitattributes")
        );

        assert_eq!(
            get(&hub, "/api/models/owner/other/tree/main", &[]).status,
            404
        );
    }

    #[test]
    fn tree_can_lie_about_the_digest_or_omit_lfs() {
        let hub = FakeHub::start(vec![
            FakeFile::new(REPO, FILE, content()).stating_sha256(&"0".repeat(64)),
            FakeFile::new(REPO, "plain.gguf", vec![1, 2, 3]).without_lfs(),
        ]);
        let reply = get(&hub, &format!("/api/models/{REPO}/tree/main"), &[]);
        let listing: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        let find = |path: &str| {
            listing
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["path"] == path)
                .unwrap()
                .clone()
        };
        assert_eq!(find(FILE)["lfs"]["oid"], "0".repeat(64));
        assert_eq!(find("plain.gguf")["size"], 3);
        assert!(find("plain.gguf").get("lfs").is_none());
    }

    #[test]
    fn resolve_serves_whole_files_and_ranges() {
        let hub = hub();
        let whole = get(&hub, &resolve_path(), &[]);
        assert_eq!(whole.status, 200);
        assert_eq!(whole.body, content());
        assert_eq!(whole.header("accept-ranges"), Some("bytes"));

        let tail = get(&hub, &resolve_path(), &[("Range", "bytes=60000-")]);
        assert_eq!(tail.status, 206);
        assert_eq!(
            tail.header("content-range"),
            Some("bytes 60000-99999/100000")
        );
        assert_eq!(tail.body, &content()[60_000..]);

        let middle = get(&hub, &resolve_path(), &[("Range", "bytes=10-19")]);
        assert_eq!(middle.status, 206);
        assert_eq!(middle.body, &content()[10..20]);

        let beyond = get(&hub, &resolve_path(), &[("Range", "bytes=100000-")]);
        assert_eq!(beyond.status, 416);
        assert_eq!(beyond.header("content-range"), Some("bytes */100000"));

        assert_eq!(
            get(&hub, &format!("/{REPO}/resolve/main/missing.gguf"), &[]).status,
            404
        );

        let downloads = hub.downloads();
        assert_eq!(downloads.len(), 3, "the 416 and the 404 served no bytes");
        assert_eq!(downloads[1].range.as_deref(), Some("bytes=60000-"));
        assert_eq!(hub.request_count(), 5);
    }

    #[test]
    fn a_cut_response_ends_early_and_only_once() {
        let hub = hub();
        hub.cut_next_download_after(30_000);
        let cut = get(&hub, &resolve_path(), &[]);
        assert_eq!(cut.status, 200);
        assert_eq!(
            cut.header("content-length"),
            Some("100000"),
            "promises the whole file"
        );
        assert_eq!(cut.body, &content()[..30_000]);

        let next = get(&hub, &resolve_path(), &[("Range", "bytes=30000-")]);
        assert_eq!(next.body, &content()[30_000..]);
    }

    #[test]
    fn corrupted_files_keep_their_length_but_not_their_bytes() {
        let file = FakeFile::new(REPO, FILE, content()).serving_corrupted();
        assert_eq!(file.sha256_hex(), hex::encode(Sha256::digest(content())));
        let hub = FakeHub::start(vec![file]);
        let served = get(&hub, &resolve_path(), &[]).body;
        assert_eq!(served.len(), content().len());
        assert_ne!(served, content());
    }

    #[test]
    fn a_required_token_is_checked_on_both_endpoints() {
        let hub = hub();
        hub.require_token("hf_secret");
        let tree = format!("/api/models/{REPO}/tree/main");
        assert_eq!(get(&hub, &tree, &[]).status, 401);
        assert_eq!(
            get(&hub, &resolve_path(), &[("Authorization", "Bearer wrong")]).status,
            401
        );
        let bearer = [("Authorization", "Bearer hf_secret")];
        assert_eq!(get(&hub, &tree, &bearer).status, 200);
        assert_eq!(get(&hub, &resolve_path(), &bearer).status, 200);
        assert_eq!(
            hub.requests()[3].authorization.as_deref(),
            Some("Bearer hf_secret")
        );
    }

    #[test]
    fn redirected_downloads_are_served_by_the_cdn_path() {
        let hub = hub();
        hub.redirect_downloads(true);
        let redirect = get(&hub, &resolve_path(), &[]);
        assert_eq!(redirect.status, 302);
        let location = redirect.header("location").unwrap().to_owned();
        assert!(location.starts_with(CDN_PREFIX), "{location}");
        let served = get(&hub, &location, &[("Range", "bytes=99990-")]);
        assert_eq!(served.status, 206);
        assert_eq!(served.body, &content()[99_990..]);
        assert_eq!(hub.downloads().len(), 1);
    }

    #[test]
    fn parse_range_accepts_only_byte_ranges() {
        assert_eq!(parse_range("bytes=5-"), Some((5, None)));
        assert_eq!(parse_range("bytes=5-9"), Some((5, Some(9))));
        assert_eq!(parse_range("bytes=-5"), None);
        assert_eq!(parse_range("items=1-2"), None);
    }
}
