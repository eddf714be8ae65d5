//! The serving scenarios beyond one stream: concurrent streams, the home-automation turn
//! (cold, with its prefix cached, after a restart), and the same against llama.cpp's own
//! llama-server when `LLAMA_SERVER` names its binary.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use futures::StreamExt;
use phi3d_proto::v1::inference_client::InferenceClient;
use phi3d_proto::v1::{ChatRequest, CompleteRequest, GenerationOptions, Message, Role, chat_event};
use tonic::transport::Channel;

use super::{Daemon, Setup, free_port, ms, wait_serving};

/// One request's view: time to first token and the tokens after it per second.
#[derive(Debug, Clone, Copy)]
pub struct StreamFigures {
    pub first_token_ms: f64,
    pub decode_tok_s: f64,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    /// Prompt tokens reused after a changed span by moving their cells (phi3d only).
    pub shifted_tokens: u32,
}

impl StreamFigures {
    /// From when the request was sent, its first text arrived and it ended.
    fn new(sent: Instant, first: Instant, done_at: Instant, generate: usize, prompt_tokens: u32, cached: u32, shifted: u32) -> Self {
        StreamFigures {
            first_token_ms: ms(first - sent),
            decode_tok_s: (generate - 1) as f64 / (done_at - first).as_secs_f64(),
            prompt_tokens,
            cached_tokens: cached,
            shifted_tokens: shifted,
        }
    }
}

/// What a scenario needs from a server: phi3d over gRPC or llama-server over HTTP.
pub trait Server {
    /// A raw completion of `prompt` (BOS added, specials parsed), greedy, `generate` tokens.
    async fn complete(&self, prompt: &str, generate: usize) -> anyhow::Result<StreamFigures>;
    /// A chat turn: the system prompt and one user line, greedy, `generate` tokens.
    async fn chat(&self, system: &str, user: &str, generate: usize) -> anyhow::Result<StreamFigures>;
}

pub struct Phi3d {
    pub daemon: Daemon,
    channel: Channel,
}

impl Phi3d {
    pub async fn start(setup: &Setup, slots: u32, cache_dir: &Path) -> anyhow::Result<Phi3d> {
        Self::start_with(setup, slots, cache_dir, Some(setup.threads), &[]).await
    }

    /// With `threads` fixed, or (None) in the daemon's default: chosen per step; `flags`: more
    /// `serve` flags.
    pub async fn start_with(setup: &Setup, slots: u32, cache_dir: &Path, threads: Option<u32>, flags: &[&str]) -> anyhow::Result<Phi3d> {
        let addr = free_port()?;
        let mut extra = vec![
            "--slots".to_owned(),
            slots.to_string(),
            "--prompt-cache-dir".to_owned(),
            cache_dir.display().to_string(),
        ];
        extra.extend(flags.iter().map(|&flag| flag.to_owned()));
        let mut daemon = Daemon::spawn(setup, addr, threads, &extra)?;
        let channel = wait_serving(&mut daemon, addr).await?;
        Ok(Phi3d { daemon, channel })
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn options(generate: usize) -> Option<GenerationOptions> {
        Some(GenerationOptions {
            max_tokens: generate as u32,
            temperature: Some(0.0),
            repeat_penalty: Some(1.0),
            ignore_eos: true,
            ..GenerationOptions::default()
        })
    }

    /// A chat turn of whole messages (the system prompt, earlier exchanges, the new user line),
    /// greedy, `generate` tokens: its figures and the text it generated.
    pub async fn converse(&self, messages: &[Message], generate: usize) -> anyhow::Result<(StreamFigures, String)> {
        let request = ChatRequest {
            request_id: String::new(),
            messages: messages.to_vec(),
            options: Self::options(generate),
            tools: None,
        };
        let sent = Instant::now();
        let stream = InferenceClient::new(self.channel.clone()).chat(request).await?.into_inner();
        self.read(stream, sent, generate).await
    }

    /// The request's figures and the text it generated.
    async fn read(
        &self,
        stream: tonic::codec::Streaming<phi3d_proto::v1::ChatEvent>,
        sent: Instant,
        generate: usize,
    ) -> anyhow::Result<(StreamFigures, String)> {
        let streamed = until_done(stream).await?;
        let usage = streamed.done.usage.unwrap_or_default();
        let figures = StreamFigures::new(
            sent,
            streamed.first,
            streamed.done_at,
            generate,
            usage.prompt_tokens,
            usage.cached_prompt_tokens,
            usage.shifted_prompt_tokens,
        );
        Ok((figures, streamed.done.text))
    }
}

/// A phi3d reply read to its end: when its first text and its `Done` arrived, and the `Done`.
pub struct Streamed {
    pub first: Instant,
    pub done_at: Instant,
    pub done: phi3d_proto::v1::Done,
}

/// Reads a phi3d stream to its `Done`.
pub async fn until_done(mut stream: tonic::codec::Streaming<phi3d_proto::v1::ChatEvent>) -> anyhow::Result<Streamed> {
    let mut first = None;
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(chat_event::Event::Delta(_)) => {
                first.get_or_insert_with(Instant::now);
            }
            Some(chat_event::Event::Done(done)) => {
                return Ok(Streamed { first: first.context("no text")?, done_at: Instant::now(), done });
            }
            _ => {}
        }
    }
    bail!("the stream ended without Done")
}

impl Server for Phi3d {
    async fn complete(&self, prompt: &str, generate: usize) -> anyhow::Result<StreamFigures> {
        let request = CompleteRequest { request_id: String::new(), prompt: prompt.to_owned(), options: Self::options(generate) };
        let sent = Instant::now();
        let stream = InferenceClient::new(self.channel.clone()).complete(request).await?.into_inner();
        Ok(self.read(stream, sent, generate).await?.0)
    }

    async fn chat(&self, system: &str, user: &str, generate: usize) -> anyhow::Result<StreamFigures> {
        Ok(self.converse(&[message(Role::System, system), message(Role::User, user)], generate).await?.0)
    }
}

/// A chat message: `content` in the voice of `role`.
pub fn message(role: Role, content: &str) -> Message {
    Message { role: role as i32, content: content.to_owned(), ..Message::default() }
}

/// llama-server, started with the same model, threads, context and batch, `--parallel`
/// equal to phi3d's slots, a unified KV cache and prompt caching.
pub struct LlamaServer {
    child: std::process::Child,
    base: String,
    http: reqwest::Client,
}

impl LlamaServer {
    pub async fn start(binary: &Path, setup: &Setup, slots: u32) -> anyhow::Result<LlamaServer> {
        Self::start_with(binary, setup, slots, &[]).await
    }

    /// With more llama-server flags (its prompt reuse: `--cache-reuse`, `--cache-ram`).
    pub async fn start_with(binary: &Path, setup: &Setup, slots: u32, flags: &[&str]) -> anyhow::Result<LlamaServer> {
        // reqwest is built without a default TLS provider (phi3d picks ring); plain HTTP here,
        // but the client still wants one installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let addr = free_port()?;
        let log = std::fs::File::create(std::env::temp_dir().join("phi3d-bench-llama-server.log"))?;
        let child = std::process::Command::new(binary)
            .args(["-m", &setup.model.display().to_string()])
            .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
            .args(["-t", &setup.threads.to_string(), "-tb", &setup.threads.to_string()])
            .args(["-c", &setup.ctx_size.to_string()])
            .args(["-b", &setup.batch_size.to_string(), "-ub", &setup.batch_size.to_string()])
            .args(["--parallel", &slots.to_string(), "--kv-unified", "--cache-prompt", "--no-webui"])
            .args(flags)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        // Owned at once, so that any failure below still kills it.
        let mut server = LlamaServer { child, base: format!("http://{addr}"), http: reqwest::Client::builder().pool_max_idle_per_host(0).build()? };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Ok(response) = server.http.get(format!("{}/health", server.base)).send().await
                && response.status().is_success()
            {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("llama-server exited with {status}; see {}", std::env::temp_dir().join("phi3d-bench-llama-server.log").display());
            }
            ensure!(Instant::now() < deadline, "llama-server did not become healthy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether `binary --help` lists `flag` (llama-server's options vary by version).
    pub fn supports(binary: &Path, flag: &str) -> bool {
        std::process::Command::new(binary)
            .arg("--help")
            .output()
            .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains(flag))
    }

    /// Sends `body` to `path`; the response, once its status says success.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<reqwest::Response> {
        let response = self.http.post(format!("{}{path}", self.base)).json(body).send().await?;
        if !response.status().is_success() {
            bail!("llama-server answered {}: {}", response.status(), response.text().await.unwrap_or_default());
        }
        Ok(response)
    }

    /// Streams one request's server-sent events; figures as phi3d's.
    async fn stream(&self, path: &str, body: serde_json::Value, generate: usize) -> anyhow::Result<StreamFigures> {
        let sent = Instant::now();
        let response = self.post(path, &body).await?;
        let mut bytes = response.bytes_stream();
        let mut first = None;
        let (mut cached, mut prompt_tokens) = (0, 0);
        let mut buffer = String::new();
        while let Some(chunk) = bytes.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk?));
            while let Some(end) = buffer.find('\n') {
                let line: String = buffer.drain(..=end).collect();
                let Some(data) = line.trim().strip_prefix("data: ") else { continue };
                if data == "[DONE]" {
                    continue;
                }
                let event: serde_json::Value = serde_json::from_str(data)?;
                let text = event["content"].as_str().or_else(|| event["choices"][0]["delta"]["content"].as_str());
                if text.is_some_and(|text| !text.is_empty()) {
                    first.get_or_insert_with(Instant::now);
                }
                if let Some(n) = event["timings"]["cache_n"].as_u64() {
                    cached = n as u32;
                    prompt_tokens = cached + event["timings"]["prompt_n"].as_u64().unwrap_or(0) as u32;
                }
            }
        }
        let done_at = Instant::now();
        let first = first.context("llama-server streamed no text")?;
        // Its cache_n is where prompt processing started: tokens it reused after a changed span
        // (--cache-reuse) are counted there too, so none show as shifted.
        Ok(StreamFigures::new(sent, first, done_at, generate, prompt_tokens, cached, 0))
    }
}

impl Server for LlamaServer {
    async fn complete(&self, prompt: &str, generate: usize) -> anyhow::Result<StreamFigures> {
        let body = serde_json::json!({
            "prompt": prompt, "n_predict": generate, "temperature": 0.0, "ignore_eos": true,
            "stream": true, "cache_prompt": true, "repeat_penalty": 1.0,
        });
        self.stream("/completion", body, generate).await
    }

    async fn chat(&self, system: &str, user: &str, generate: usize) -> anyhow::Result<StreamFigures> {
        let body = serde_json::json!({
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": generate, "temperature": 0.0, "ignore_eos": true, "stream": true,
            "cache_prompt": true, "timings_per_token": true,
        });
        self.stream("/v1/chat/completions", body, generate).await
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Aggregate and per-stream generation with `n` concurrent streams of distinct prompts.
pub async fn concurrent(server: &impl Server, prompts: &[String], n: usize, generate: usize) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let figures = futures::future::try_join_all(prompts.iter().take(n).map(|prompt| server.complete(prompt, generate))).await?;
    let wall = started.elapsed().as_secs_f64();
    let aggregate = (n * generate) as f64 / wall;
    let per_stream = figures.iter().map(|figures| figures.decode_tok_s).sum::<f64>() / n as f64;
    Ok((aggregate, per_stream))
}

/// The home-automation turn's three times to first token: cold, with the prefix cached (a
/// different user line), and after a restart (another user line).
pub struct HomeTurn {
    pub cold: StreamFigures,
    pub cached: StreamFigures,
    pub restarted: StreamFigures,
}

/// A fixed system prompt of about `tokens` tokens: the instructions and the state of a house.
pub fn house_prompt(tokens: usize) -> String {
    let rooms = ["kitchen", "hall", "living room", "bedroom", "office", "garden", "garage", "bathroom"];
    let kinds = ["light", "switch", "sensor", "cover", "climate"];
    let mut text = String::from(
        "You are the voice assistant of a smart home. Answer in one short sentence. When the user asks \
         to change a device, name the device and the new state. The devices and their states:\n",
    );
    let mut index = 0;
    // Text like this takes about 1.8 characters a token with the Phi-3 vocabulary.
    while text.len() * 10 / 18 < tokens {
        let (room, kind) = (rooms[index % rooms.len()], kinds[index % kinds.len()]);
        text.push_str(&format!("- {kind}.{}_{index} ({room}): {}\n", room.replace(' ', "_"), if index % 3 == 0 { "on" } else { "off" }));
        index += 1;
    }
    text
}

/// `house` (a [`house_prompt`]) with `count` devices, spread evenly through its list, switched to
/// the other state, as when a few of them were turned on or off since the last turn. The text
/// changes in `count` places and stays the same between them.
pub fn switch_devices(house: &str, count: usize) -> String {
    let devices = house.lines().filter(|line| line.starts_with("- ")).count();
    // The middle device of each of `count` equal stretches of the list.
    let switched: Vec<usize> = (0..count).map(|k| (2 * k + 1) * devices / (2 * count)).collect();
    let mut text = String::with_capacity(house.len() + count);
    let mut device = 0;
    for line in house.split_inclusive('\n') {
        let is_device = line.starts_with("- ");
        if is_device && switched.contains(&device) {
            let (name, state) = line.trim_end().rsplit_once(": ").expect("house_prompt writes each device as `- name (room): state`");
            text.push_str(&format!("{name}: {}\n", if state == "on" { "off" } else { "on" }));
        } else {
            text.push_str(line);
        }
        device += usize::from(is_device);
    }
    text
}
