//! Downloading a catalogue model from the Hugging Face hub into the model directory.
//!
//! A model file is a few gigabytes fetched over whatever link a Raspberry Pi has, so the
//! download is built to survive interruption and never to leave a bad file behind:
//!
//! 1. Ask the hub's tree API what it states about the file: its size and SHA-256 (from the
//!    file's LFS pointer). Without both, the download could not be verified, so it is refused.
//! 2. Fetch `{endpoint}/{repo}/resolve/main/{file}` into `<model_dir>/<file>.part`. If a
//!    `.part` is already there, hash what it holds and ask only for the rest with `Range`;
//!    a hub that answers 200 instead of 206 gets a fresh start.
//! 3. Check the size and SHA-256 of the whole `.part` against what the hub stated; on a
//!    mismatch delete it (resuming from corrupt bytes would only repeat the failure).
//! 4. Only then rename it to `<model_dir>/<file>`, so the final name never holds a partial or
//!    unverified file and its presence alone means "downloaded".

use std::error::Error as StdError;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWriteExt, BufWriter};

use super::catalogue::CatalogueEntry;
use crate::engine::memory_plan::human_bytes;

/// The public hub, used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How a download shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressStyle {
    /// A live progress bar on stderr, for a person at a terminal.
    Bar,
    /// `tracing` info lines every ~10% or 10 s, for logs and pipes where a bar is noise.
    LogLines,
}

/// Where to download from and how.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The hub's base URL, without a trailing slash (`HF_ENDPOINT`, as in Hugging Face's own
    /// tools, so a mirror can be used).
    pub endpoint: String,
    /// A Hugging Face access token (`HF_TOKEN`), for gated or private repositories.
    pub token: Option<String>,
    pub progress: ProgressStyle,
    /// Told how far the download has got, for a watcher other than the log (the Ollama
    /// bridge's `/api/pull` streams it to its client).
    pub observer: Option<tokio::sync::watch::Sender<Transfer>>,
}

/// How far a download has got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transfer {
    /// The SHA-256 the hub states for the file; empty until the hub has been asked.
    pub sha256: String,
    /// The file's size in bytes, as the hub states it.
    pub total: u64,
    /// The bytes held so far, those of an earlier attempt included.
    pub completed: u64,
}

impl HubOptions {
    /// Options from `HF_ENDPOINT` and `HF_TOKEN`, with a progress bar only when stderr is a
    /// terminal.
    pub fn from_env() -> Self {
        let var = |name| {
            std::env::var(name)
                .ok()
                .filter(|v: &String| !v.trim().is_empty())
        };
        HubOptions {
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim().trim_end_matches('/').to_owned())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
            token: var("HF_TOKEN").map(|t| t.trim().to_owned()),
            progress: if std::io::stderr().is_terminal() {
                ProgressStyle::Bar
            } else {
                ProgressStyle::LogLines
            },
            observer: None,
        }
    }
}

/// Why a download failed; each message says what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    // `error`, not `source`: the message already includes it, and a source would repeat it
    // in `{:#}` renderings.
    #[error("cannot use {}: {error}; check that the model directory is writable and has free space", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot set up an HTTP client: {detail}")]
    Client { detail: String },
    #[error(
        "cannot reach the model hub at {url}: {detail}; check the network connection and HF_ENDPOINT, or run with --offline once the model is downloaded"
    )]
    Unreachable { url: String, detail: String },
    #[error(
        "the hub wants authentication for {repo} ({status}); set HF_TOKEN to a Hugging Face access token that can read it"
    )]
    AuthRequired { repo: String, status: StatusCode },
    #[error(
        "the hub refused HF_TOKEN for {repo} ({status}); check that the token is valid and that its account has accepted the repository's terms"
    )]
    TokenRejected { repo: String, status: StatusCode },
    #[error(
        "the hub has no {url} (404); the catalogue entry may be out of date, or HF_ENDPOINT does not point at a Hugging Face hub"
    )]
    NotFound { url: String },
    #[error("the hub answered {status} for {url}; try again later")]
    Status { url: String, status: StatusCode },
    #[error(
        "the hub's file list for {repo} is not what phi3d understands ({detail}); check HF_ENDPOINT"
    )]
    BadListing { repo: String, detail: String },
    #[error("the hub does not list {file} in {repo}; the catalogue entry may be out of date")]
    NotListed { repo: String, file: String },
    #[error(
        "the hub states no LFS size and SHA-256 for {file} in {repo}, so a download could not be verified; refusing it"
    )]
    NoChecksum { repo: String, file: String },
    #[error(
        "the download of {file} stopped after {received} of {expected} bytes ({detail}); run the same command again to resume"
    )]
    Interrupted {
        file: String,
        received: u64,
        expected: u64,
        detail: String,
    },
    #[error(
        "the hub answered a resume of {file} with the wrong range ({content_range}); the partial download was deleted, run the same command again to start over"
    )]
    BadResume { file: String, content_range: String },
    #[error(
        "the download of {file} has {actual} bytes but the hub states {expected}; the partial download was deleted, run the same command again"
    )]
    SizeMismatch {
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "sha256 mismatch for {file}: the hub states {expected} but the download has {actual}; the corrupt download was deleted, run the same command again"
    )]
    HashMismatch {
        file: String,
        expected: String,
        actual: String,
    },
}

/// Where `entry` lives once downloaded.
pub fn local_path(entry: &CatalogueEntry, model_dir: &Path) -> PathBuf {
    model_dir.join(entry.file)
}

/// Where `entry` is downloaded to before it is verified.
fn part_path(entry: &CatalogueEntry, model_dir: &Path) -> PathBuf {
    model_dir.join(format!("{}.part", entry.file))
}

/// Downloads `entry` into `model_dir` (created if missing), resuming a previous partial
/// download, and returns the path of the verified file. A file already at the final path is
/// trusted without contacting the hub: only a verified download is ever renamed there.
pub async fn download(
    entry: &CatalogueEntry,
    model_dir: &Path,
    opts: &HubOptions,
) -> Result<PathBuf, HubError> {
    let final_path = local_path(entry, model_dir);
    if final_path.is_file() {
        tracing::info!(path = %final_path.display(), "{} is already downloaded", entry.name);
        return Ok(final_path);
    }
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |error| HubError::Io { path, error }
    };
    tokio::fs::create_dir_all(model_dir)
        .await
        .map_err(io_err(model_dir))?;

    let client = client()?;
    let stated = stated_file(&client, entry, opts).await?;

    let part = part_path(entry, model_dir);
    let mut have = match tokio::fs::metadata(&part).await {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err(&part)(e)),
    };
    if have > stated.size {
        // Longer than the file can be: not a prefix of it, so nothing in it is worth keeping.
        tracing::warn!(path = %part.display(), "discarding a partial download longer than the file");
        remove(&part).await?;
        have = 0;
    }
    let mut hasher = Sha256::new();
    if have > 0 {
        tracing::info!(
            "resuming {} at {} of {}; checking the bytes already downloaded",
            entry.file,
            human_bytes(have),
            human_bytes(stated.size)
        );
        hasher = hash_file(&part).await.map_err(io_err(&part))?;
    }
    if let Some(observer) = &opts.observer {
        observer.send_replace(Transfer { sha256: stated.sha256.clone(), total: stated.size, completed: have });
    }
    if have < stated.size {
        fetch(&client, entry, opts, &part, stated.size, have, &mut hasher).await?;
    }

    let actual_size = tokio::fs::metadata(&part)
        .await
        .map_err(io_err(&part))?
        .len();
    if actual_size != stated.size {
        remove(&part).await?;
        return Err(HubError::SizeMismatch {
            file: entry.file.to_owned(),
            expected: stated.size,
            actual: actual_size,
        });
    }
    let actual_sha = hex::encode(hasher.finalize());
    if actual_sha != stated.sha256 {
        remove(&part).await?;
        return Err(HubError::HashMismatch {
            file: entry.file.to_owned(),
            expected: stated.sha256,
            actual: actual_sha,
        });
    }
    tokio::fs::rename(&part, &final_path)
        .await
        .map_err(io_err(&final_path))?;
    tracing::info!(path = %final_path.display(), sha256 = %actual_sha, "downloaded and verified {}", entry.name);
    Ok(final_path)
}

fn client() -> Result<reqwest::Client, HubError> {
    // reqwest is built without a default TLS provider; the first caller installs ring's, and
    // a second install failing only means one is already there.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("phi3d/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        // Per read, not for the whole transfer: a stalled connection fails (and can be
        // resumed) instead of hanging, while a slow but moving one is left alone.
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| HubError::Client {
            detail: error_chain(&e),
        })
}

/// What the hub states about a file: the facts a download is checked against.
#[derive(Debug, PartialEq, Eq)]
struct StatedFile {
    size: u64,
    sha256: String,
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    lfs: Option<LfsPointer>,
}

#[derive(Deserialize)]
struct LfsPointer {
    oid: String,
    size: u64,
}

/// Sends `request` with the bearer token when there is one; turns transport failures and
/// non-success statuses into errors.
async fn send(
    request: reqwest::RequestBuilder,
    url: &str,
    entry: &CatalogueEntry,
    opts: &HubOptions,
) -> Result<reqwest::Response, HubError> {
    let request = match &opts.token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let response = request.send().await.map_err(|e| HubError::Unreachable {
        url: url.to_owned(),
        detail: error_chain(&e),
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let repo = entry.repo.to_owned();
    Err(match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if opts.token.is_some() => {
            HubError::TokenRejected { repo, status }
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => HubError::AuthRequired { repo, status },
        StatusCode::NOT_FOUND => HubError::NotFound {
            url: url.to_owned(),
        },
        _ => HubError::Status {
            url: url.to_owned(),
            status,
        },
    })
}

async fn stated_file(
    client: &reqwest::Client,
    entry: &CatalogueEntry,
    opts: &HubOptions,
) -> Result<StatedFile, HubError> {
    let url = format!("{}/api/models/{}/tree/main", opts.endpoint, entry.repo);
    let response = send(client.get(&url), &url, entry, opts).await?;
    let body = response.bytes().await.map_err(|e| HubError::Unreachable {
        url: url.clone(),
        detail: error_chain(&e),
    })?;
    let listing: Vec<TreeEntry> =
        serde_json::from_slice(&body).map_err(|e| HubError::BadListing {
            repo: entry.repo.to_owned(),
            detail: e.to_string(),
        })?;
    pick_stated(entry, listing)
}

fn pick_stated(entry: &CatalogueEntry, listing: Vec<TreeEntry>) -> Result<StatedFile, HubError> {
    let listed = listing
        .into_iter()
        .find(|e| e.kind == "file" && e.path == entry.file)
        .ok_or_else(|| HubError::NotListed {
            repo: entry.repo.to_owned(),
            file: entry.file.to_owned(),
        })?;
    let lfs = listed.lfs.ok_or_else(|| HubError::NoChecksum {
        repo: entry.repo.to_owned(),
        file: entry.file.to_owned(),
    })?;
    let sha256 = lfs.oid.to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(HubError::BadListing {
            repo: entry.repo.to_owned(),
            detail: format!("lfs.oid of {} is not a SHA-256: {:?}", entry.file, lfs.oid),
        });
    }
    Ok(StatedFile {
        size: lfs.size,
        sha256,
    })
}

/// Appends the rest of the file (from byte `have`) to `part`, feeding `hasher`, which on entry
/// holds the hash of the first `have` bytes.
async fn fetch(
    client: &reqwest::Client,
    entry: &CatalogueEntry,
    opts: &HubOptions,
    part: &Path,
    size: u64,
    have: u64,
    hasher: &mut Sha256,
) -> Result<(), HubError> {
    let url = format!(
        "{}/{}/resolve/main/{}",
        opts.endpoint, entry.repo, entry.file
    );
    let mut request = client.get(&url);
    if have > 0 {
        request = request.header(RANGE, format!("bytes={have}-"));
    }
    let mut response = match send(request, &url, entry, opts).await {
        // The hub has no bytes past `have`, though its listing says the file is longer: the
        // partial file cannot be trusted as a prefix, so start over next time.
        Err(HubError::Status { status, .. }) if status == StatusCode::RANGE_NOT_SATISFIABLE => {
            remove(part).await?;
            return Err(HubError::BadResume {
                file: entry.file.to_owned(),
                content_range: status.to_string(),
            });
        }
        result => result?,
    };

    let resumed = have > 0 && response.status() == StatusCode::PARTIAL_CONTENT;
    if resumed {
        let content_range = response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        if content_range_start(&content_range) != Some(have) {
            remove(part).await?;
            return Err(HubError::BadResume {
                file: entry.file.to_owned(),
                content_range,
            });
        }
    } else if have > 0 {
        tracing::info!(
            "the hub does not resume downloads; starting {} over",
            entry.file
        );
        *hasher = Sha256::new();
    }
    let start = if resumed { have } else { 0 };

    let io_err = |error| HubError::Io {
        path: part.to_owned(),
        error,
    };
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(part)
        .await
        .map_err(io_err)?;
    // Large writes: tokio runs each file write on a blocking thread, so small ones cost dearly
    // on a Pi.
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut progress = Progress::new(opts.progress, entry.file, size, start);
    let mut written = start;
    let interrupted = |received, detail| HubError::Interrupted {
        file: entry.file.to_owned(),
        received,
        expected: size,
        detail,
    };

    let outcome = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if written + chunk.len() as u64 > size {
                    // More than the hub said the file holds: stop before it fills the disk.
                    break Err(Stop::Oversize(written + chunk.len() as u64));
                }
                if let Err(e) = out.write_all(&chunk).await {
                    break Err(Stop::Failed(io_err(e)));
                }
                hasher.update(&chunk);
                written += chunk.len() as u64;
                progress.advance(written);
                if let Some(observer) = &opts.observer {
                    observer.send_modify(|transfer| transfer.completed = written);
                }
            }
            // A connection closed cleanly but early is an interruption too: what arrived is a
            // good prefix to resume from.
            Ok(None) if written < size => {
                break Err(Stop::Failed(interrupted(
                    written,
                    "the hub closed the connection early".into(),
                )));
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(Stop::Failed(interrupted(written, error_chain(&e)))),
        }
    };
    progress.finish();
    // Flush on every path: after an interruption the bytes received are what the next attempt
    // resumes from.
    let flushed = async {
        out.flush().await?;
        out.get_ref().sync_all().await
    }
    .await;
    match outcome {
        Ok(()) => flushed.map_err(io_err),
        Err(Stop::Failed(e)) => Err(e),
        Err(Stop::Oversize(actual)) => {
            remove(part).await?;
            Err(HubError::SizeMismatch {
                file: entry.file.to_owned(),
                expected: size,
                actual,
            })
        }
    }
}

/// How the transfer loop ended when it did not complete.
enum Stop {
    Failed(HubError),
    Oversize(u64),
}

/// The first byte of a `Content-Range: bytes START-END/TOTAL` header.
fn content_range_start(value: &str) -> Option<u64> {
    value
        .strip_prefix("bytes ")?
        .split_once('-')?
        .0
        .trim()
        .parse()
        .ok()
}

async fn remove(path: &Path) -> Result<(), HubError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(HubError::Io {
            path: path.to_owned(),
            error: e,
        }),
        _ => Ok(()),
    }
}

/// The SHA-256 state after the whole of `path`, computed off the async threads (a resumed
/// partial file can be gigabytes).
async fn hash_file(path: &Path) -> std::io::Result<Sha256> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match file.read(&mut buf)? {
                0 => return Ok(hasher),
                n => hasher.update(&buf[..n]),
            }
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// An error and its causes on one line: reqwest's own message ("error sending request") says
/// little without them.
fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = e.source();
    }
    text
}

/// Download progress, drawn as a bar or logged as lines.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines(LineProgress),
}

struct LineProgress {
    file: String,
    total: u64,
    /// Where this attempt started, so the rate counts only bytes fetched now.
    start: u64,
    started: Instant,
    last_logged: Instant,
    /// The tenth of the file last reported, to log at each 10% step.
    last_tenth: u64,
}

/// How often a download logs when it is too slow to cross a 10% step.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Progress {
    fn new(style: ProgressStyle, file: &str, total: u64, start: u64) -> Progress {
        match style {
            ProgressStyle::Bar => {
                let bar = indicatif::ProgressBar::new(total).with_position(start);
                let template = "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";
                if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_message(file.to_owned());
                // From here on the rate counts this attempt's bytes only.
                bar.reset_elapsed();
                Progress::Bar(bar)
            }
            ProgressStyle::LogLines => {
                if start == 0 {
                    tracing::info!("downloading {file} ({})", human_bytes(total));
                } else {
                    tracing::info!(
                        "downloading the remaining {} of {file} ({})",
                        human_bytes(total - start),
                        human_bytes(total)
                    );
                }
                let now = Instant::now();
                Progress::Lines(LineProgress {
                    file: file.to_owned(),
                    total,
                    start,
                    started: now,
                    last_logged: now,
                    last_tenth: tenth(start, total),
                })
            }
        }
    }

    fn advance(&mut self, done: u64) {
        match self {
            Progress::Bar(bar) => bar.set_position(done),
            Progress::Lines(lines) => {
                let now = Instant::now();
                let tenth = tenth(done, lines.total);
                if tenth > lines.last_tenth || now.duration_since(lines.last_logged) >= LOG_EVERY {
                    lines.last_tenth = tenth;
                    lines.last_logged = now;
                    lines.log(done, now);
                }
            }
        }
    }

    fn finish(self) {
        // Cleared, not left drawn: the line that follows (the result, or the error that says
        // how far it got) would otherwise be appended to the bar's line.
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

impl LineProgress {
    fn log(&self, done: u64, now: Instant) {
        let secs = now.duration_since(self.started).as_secs_f64().max(1e-3);
        let rate = ((done - self.start) as f64 / secs) as u64;
        let percent = if self.total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / self.total as f64
        };
        tracing::info!(
            "downloading {}: {} of {} ({percent:.0}%), {}/s",
            self.file,
            human_bytes(done),
            human_bytes(self.total),
            human_bytes(rate)
        );
    }
}

fn tenth(done: u64, total: u64) -> u64 {
    if total == 0 {
        10
    } else {
        (done as u128 * 10 / total as u128) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phi3d_tests::fake_hub::{FakeFile, FakeHub};

    const ENTRY: CatalogueEntry = CatalogueEntry {
        name: "test-model",
        repo: "tester/Test-GGUF",
        file: "test-q4.gguf",
        context_length: 4096,
        quantization: "Q4_K_M",
        description: "a test model",
    };

    /// Deterministic, incompressible-looking content.
    fn content(len: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn opts(hub: &FakeHub) -> HubOptions {
        HubOptions {
            endpoint: hub.endpoint(),
            token: None,
            progress: ProgressStyle::LogLines,
            observer: None,
        }
    }

    fn served(file: FakeFile) -> FakeHub {
        FakeHub::start(vec![file])
    }

    fn part_len(dir: &Path) -> u64 {
        std::fs::metadata(part_path(&ENTRY, dir))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn downloads_verifies_and_renames() {
        let bytes = content(300_000);
        let hub = served(FakeFile::new(ENTRY.repo, ENTRY.file, bytes.clone()));
        let dir = tempfile::tempdir().unwrap();
        let model_dir = dir.path().join("models/nested");

        let path = download(&ENTRY, &model_dir, &opts(&hub)).await.unwrap();
        assert_eq!(path, local_path(&ENTRY, &model_dir));
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert!(!part_path(&ENTRY, &model_dir).exists());
        let paths: Vec<String> = hub.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(
            paths,
            [
                format!("/api/models/{}/tree/main", ENTRY.repo),
                format!("/{}/resolve/main/{}", ENTRY.repo, ENTRY.file),
            ]
        );
        assert_eq!(hub.downloads()[0].range, None);

        // Present already: no second download, not even a question to the hub.
        download(&ENTRY, &model_dir, &opts(&hub)).await.unwrap();
        assert_eq!(hub.request_count(), 2);
    }

    #[tokio::test]
    async fn an_interrupted_download_resumes_with_a_range_for_the_rest() {
        let bytes = content(2_000_000);
        let hub = served(FakeFile::new(ENTRY.repo, ENTRY.file, bytes.clone()));
        let dir = tempfile::tempdir().unwrap();
        hub.cut_next_download_after(700_000);

        let err = download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap_err();
        assert!(
            matches!(
                err,
                HubError::Interrupted {
                    expected: 2_000_000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("run the same command again to resume"),
            "{err}"
        );
        let kept = part_len(dir.path());
        assert!(kept > 0 && kept <= 700_000, "kept {kept}");
        assert!(!local_path(&ENTRY, dir.path()).exists());

        let path = download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), bytes);
        let downloads = hub.downloads();
        assert_eq!(downloads.len(), 2);
        assert_eq!(downloads[1].range, Some(format!("bytes={kept}-")));
    }

    #[tokio::test]
    async fn a_resume_follows_the_hubs_redirect_with_its_range() {
        let bytes = content(500_000);
        let hub = served(FakeFile::new(ENTRY.repo, ENTRY.file, bytes.clone()));
        hub.redirect_downloads(true);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(part_path(&ENTRY, dir.path()), &bytes[..123_456]).unwrap();

        let path = download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), bytes);
        let downloads = hub.downloads();
        assert_eq!(downloads.len(), 1);
        assert!(
            downloads[0].path.starts_with("/_cdn/"),
            "{:?}",
            downloads[0]
        );
        assert_eq!(downloads[0].range.as_deref(), Some("bytes=123456-"));
    }

    #[tokio::test]
    async fn an_observer_sees_the_stated_digest_and_every_byte_arrive() {
        let file = FakeFile::new(ENTRY.repo, ENTRY.file, content(300_000));
        let sha256 = file.sha256_hex();
        let hub = served(file);
        let dir = tempfile::tempdir().unwrap();
        let (observer, watched) = tokio::sync::watch::channel(Transfer::default());
        let opts = HubOptions { observer: Some(observer), ..opts(&hub) };
        download(&ENTRY, dir.path(), &opts).await.unwrap();
        assert_eq!(*watched.borrow(), Transfer { sha256, total: 300_000, completed: 300_000 });
    }

    #[tokio::test]
    async fn a_complete_part_is_verified_without_downloading() {
        let bytes = content(50_000);
        let hub = served(FakeFile::new(ENTRY.repo, ENTRY.file, bytes.clone()));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(part_path(&ENTRY, dir.path()), &bytes).unwrap();

        download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap();
        assert!(hub.downloads().is_empty());
        assert_eq!(
            std::fs::read(local_path(&ENTRY, dir.path())).unwrap(),
            bytes
        );
    }

    #[tokio::test]
    async fn an_overlong_part_is_discarded() {
        let bytes = content(50_000);
        let hub = served(FakeFile::new(ENTRY.repo, ENTRY.file, bytes.clone()));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(part_path(&ENTRY, dir.path()), content(60_000)).unwrap();

        download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap();
        assert_eq!(hub.downloads()[0].range, None);
        assert_eq!(
            std::fs::read(local_path(&ENTRY, dir.path())).unwrap(),
            bytes
        );
    }

    #[tokio::test]
    async fn a_part_with_wrong_bytes_fails_verification_and_is_deleted() {
        let bytes = content(80_000);
        let hub = served(FakeFile::new(ENTRY.repo, ENTRY.file, bytes.clone()));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(part_path(&ENTRY, dir.path()), vec![0u8; 10_000]).unwrap();

        let err = download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap_err();
        assert!(matches!(err, HubError::HashMismatch { .. }), "{err}");
        assert!(!part_path(&ENTRY, dir.path()).exists());
        assert!(!local_path(&ENTRY, dir.path()).exists());
        // Deleting the bad part lets the next attempt start clean and succeed.
        download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap();
    }

    #[tokio::test]
    async fn a_wrong_stated_sha256_is_reported_with_both_digests() {
        let bytes = content(100_000);
        let stated = "ab".repeat(32);
        let file = FakeFile::new(ENTRY.repo, ENTRY.file, bytes.clone()).stating_sha256(&stated);
        let actual = file.sha256_hex();
        let hub = served(file);
        let dir = tempfile::tempdir().unwrap();

        let err = download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap_err();
        let message = err.to_string();
        assert!(message.contains("sha256 mismatch"), "{message}");
        assert!(
            message.contains(&stated) && message.contains(&actual),
            "{message}"
        );
        assert!(!part_path(&ENTRY, dir.path()).exists());
        assert!(!local_path(&ENTRY, dir.path()).exists());
    }

    #[tokio::test]
    async fn corrupted_bytes_are_caught() {
        let file = FakeFile::new(ENTRY.repo, ENTRY.file, content(100_000)).serving_corrupted();
        let hub = served(file);
        let dir = tempfile::tempdir().unwrap();
        let err = download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap_err();
        assert!(matches!(err, HubError::HashMismatch { .. }), "{err}");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing left behind"
        );
    }

    #[tokio::test]
    async fn files_the_hub_does_not_list_or_cannot_vouch_for_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let hub = served(FakeFile::new(ENTRY.repo, "other.gguf", content(10)));
        let err = download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap_err();
        assert!(matches!(err, HubError::NotListed { .. }), "{err}");

        let hub = served(FakeFile::new(ENTRY.repo, ENTRY.file, content(10)).without_lfs());
        let err = download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap_err();
        assert!(matches!(err, HubError::NoChecksum { .. }), "{err}");
        assert!(hub.downloads().is_empty());

        let hub = served(FakeFile::new("someone/else", ENTRY.file, content(10)));
        let err = download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap_err();
        assert!(matches!(err, HubError::NotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn the_token_is_sent_as_a_bearer_and_its_absence_explained() {
        let bytes = content(10_000);
        let hub = served(FakeFile::new(ENTRY.repo, ENTRY.file, bytes.clone()));
        hub.require_token("hf_abc");
        let dir = tempfile::tempdir().unwrap();

        let err = download(&ENTRY, dir.path(), &opts(&hub)).await.unwrap_err();
        assert!(matches!(err, HubError::AuthRequired { .. }), "{err}");
        assert!(err.to_string().contains("set HF_TOKEN"), "{err}");

        let wrong = HubOptions {
            token: Some("hf_wrong".into()),
            ..opts(&hub)
        };
        let err = download(&ENTRY, dir.path(), &wrong).await.unwrap_err();
        assert!(matches!(err, HubError::TokenRejected { .. }), "{err}");

        let right = HubOptions {
            token: Some("hf_abc".into()),
            ..opts(&hub)
        };
        let path = download(&ENTRY, dir.path(), &right).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), bytes);
        assert!(
            hub.requests()
                .iter()
                .rev()
                .take(2)
                .all(|r| r.authorization.as_deref() == Some("Bearer hf_abc"))
        );
    }

    #[tokio::test]
    async fn an_unreachable_hub_says_where_it_looked() {
        // Bind and drop a listener to get a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let opts = HubOptions {
            endpoint: format!("http://127.0.0.1:{port}"),
            token: None,
            progress: ProgressStyle::LogLines,
            observer: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let err = download(&ENTRY, dir.path(), &opts).await.unwrap_err();
        assert!(matches!(err, HubError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains(&opts.endpoint), "{err}");
    }

    #[test]
    fn listing_entries_are_matched_by_path_and_need_an_lfs_sha256() {
        let listing = |json: &str| serde_json::from_str::<Vec<TreeEntry>>(json).unwrap();
        let sha = "AB".repeat(32);
        let json = format!(
            r#"[{{"type":"directory","path":"test-q4.gguf","oid":"x","size":0}},
                {{"type":"file","path":"test-q4.gguf","oid":"1234","size":7,
                  "lfs":{{"oid":"{sha}","size":7,"pointerSize":130}}}}]"#
        );
        let stated = pick_stated(&ENTRY, listing(&json)).unwrap();
        assert_eq!(
            stated,
            StatedFile {
                size: 7,
                sha256: sha.to_ascii_lowercase()
            }
        );

        let json =
            r#"[{"type":"file","path":"test-q4.gguf","size":7,"lfs":{"oid":"abc","size":7}}]"#;
        assert!(matches!(
            pick_stated(&ENTRY, listing(json)),
            Err(HubError::BadListing { .. })
        ));
    }

    #[test]
    fn content_range_start_reads_the_first_byte() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes */200"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    #[test]
    fn tenths_step_through_the_file() {
        assert_eq!(tenth(0, 1000), 0);
        assert_eq!(tenth(99, 1000), 0);
        assert_eq!(tenth(100, 1000), 1);
        assert_eq!(tenth(1000, 1000), 10);
        assert_eq!(tenth(u64::MAX, u64::MAX), 10);
    }
}
