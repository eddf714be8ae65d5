//! What serving costs: the same GGUF run in-process through llama-cpp-2 (the baseline) and
//! through the real `phi3d serve` binary over gRPC, side by side, with the ratio phi3d/baseline
//! for every figure.
//!
//! ```text
//! cargo bench -p phi3d --bench serving
//! cargo bench -p phi3d --bench serving -- --model /path/to/model.gguf --prompt-tokens 128 \
//!     --gen-tokens 32 --threads 2 --runs 3
//! ```
//!
//! Without `--model` the tiny generated Phi-3 model is used (written once into Cargo's target
//! directory), so a fresh clone measures in seconds; the figures that matter come from a model
//! of the real Phi-3-mini shape (`phi3d-gen-model --shape phi3-mini --quantize q4_0 FILE`).
//! Every option can also be set with a `PHI3D_BENCH_*` variable.
//!
//! Both sides get the same model, threads, context, batch and prompt tokens, and the same
//! context settings as the daemon's worker (n_ubatch = n_batch, one sequence, unified KV cache),
//! so the ratio is what the daemon adds: process start, gRPC, tokenization, queueing, streaming.
//! Each run loads the baseline model and starts a fresh daemon, one after the other (never at
//! once, so they do not compete for cores); the figures are:
//!
//! - startup: baseline: load the model, create the context and decode one token (the warm-up
//!   the daemon does too); phi3d: from spawning the process to health SERVING;
//! - prompt tok/s: prompt tokens over the time to decode them in batch-size chunks (phi3d: the
//!   server's `Done.timings.prompt_ms`, the only view of it there is);
//! - first token: baseline: from the first prompt decode to the first sampled token; phi3d:
//!   from sending `Complete` to the first delta, as a client sees it;
//! - decode tok/s: the tokens after the first over the time from the first to the last
//!   (phi3d: from the first delta to `Done`);
//! - decode tok/s, server formula: all generated tokens over the time from the end of the
//!   prompt to the last token, which is how `Done.timings.tokens_per_second` is computed;
//! - total: from the first prompt decode (phi3d: sending the request) to the last token
//!   (phi3d: `Done`);
//! - resident memory: baseline: how much the bench process grew by loading the model and
//!   running it (what llama.cpp holds); phi3d: the daemon's whole resident set, so the
//!   difference is what the daemon adds.
//!
//! Generation is greedy with end-of-generation ignored, so both sides produce exactly the
//! requested number of tokens, and the same text; a difference is reported. The daemon holds
//! back a delta while a UTF-8 character is split across tokens, so with a model that emits
//! byte tokens the first delta can come a token late. The model file is read once before the
//! runs, so every load comes from the page cache.

#[path = "serving/drafts.rs"]
mod drafts;
#[path = "serving/neighbours.rs"]
mod neighbours;
#[path = "serving/prompt_cache.rs"]
mod prompt_cache;
#[path = "serving/rpc_split.rs"]
mod rpc_split;
#[path = "serving/scenarios.rs"]
mod scenarios;

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use phi3d_proto::v1::inference_client::InferenceClient;
use phi3d_proto::v1::{CompleteRequest, GenerationOptions, chat_event};
use phi3d_tests::model_gen::{ModelSpec, ensure_model};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const PHI3D: &str = env!("CARGO_BIN_EXE_phi3d");

#[derive(Parser)]
#[command(about = "Compare phi3d over gRPC with llama-cpp-2 in-process on the same model")]
struct Options {
    /// GGUF model (default: the tiny generated Phi-3 model).
    #[arg(long, env = "PHI3D_BENCH_MODEL")]
    model: Option<PathBuf>,
    /// Prompt length in tokens, BOS included.
    #[arg(long, env = "PHI3D_BENCH_PROMPT_TOKENS", default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens to generate.
    #[arg(long, env = "PHI3D_BENCH_GEN_TOKENS", default_value_t = 64)]
    gen_tokens: usize,
    /// Inference threads (default: physical cores, as the daemon; 1 for the tiny model).
    #[arg(long, env = "PHI3D_BENCH_THREADS")]
    threads: Option<u32>,
    /// Context size in tokens.
    #[arg(long, env = "PHI3D_BENCH_CTX_SIZE", default_value_t = 4096)]
    ctx_size: u32,
    /// Prompt tokens per decode step.
    #[arg(long, env = "PHI3D_BENCH_BATCH_SIZE", default_value_t = 512)]
    batch_size: u32,
    /// How many times to measure both sides; the last table is the median.
    #[arg(long, env = "PHI3D_BENCH_RUNS", default_value_t = 3)]
    runs: usize,
    /// Slots for the concurrent-stream, home-automation and cache-burst scenarios (llama-server's
    /// --parallel).
    #[arg(long, env = "PHI3D_BENCH_SLOTS", default_value_t = 4)]
    slots: u32,
    /// Concurrent stream counts to measure.
    #[arg(long, env = "PHI3D_BENCH_STREAMS", value_delimiter = ',', default_values_t = [1, 2, 4])]
    streams: Vec<usize>,
    /// Size of the home-automation turn's fixed system prompt, in tokens (about).
    #[arg(long, env = "PHI3D_BENCH_HOME_TOKENS", default_value_t = 900)]
    home_tokens: usize,
    /// The phi3d binary to measure (default: this build's), e.g. an older build to compare
    /// figures before and after a change.
    #[arg(long, env = "PHI3D_BENCH_PHI3D", default_value = PHI3D)]
    phi3d: PathBuf,
    /// llama.cpp's llama-server binary, to measure the same scenarios against it.
    #[arg(long, env = "LLAMA_SERVER")]
    llama_server: Option<PathBuf>,
    /// Which parts to run: `single` (the baseline against phi3d, one stream), `shared`
    /// (concurrent streams and the home-automation turn), `neighbours` (a process busy beside
    /// each side), `cache-burst` (the home turn's cache after a burst that takes every slot and
    /// after a restart), `cache-time` (the home turn with the time at the start of its prompt),
    /// `cache-chunk` (what each --prompt-cache-min-chunk saves on a follow-up with a changed
    /// time, changed device states or a dropped turn, and whether its reply stays exact),
    /// `drafts` (decode of a reply that copies its prompt, with and without drafts from it),
    /// `rpc-split` (the single run with half the layers on a `phi3d rpc-worker` over loopback,
    /// against all of them here).
    #[arg(long, env = "PHI3D_BENCH_SCENARIOS", value_delimiter = ',', default_values_t = ["single".to_owned(), "shared".to_owned(), "neighbours".to_owned()])]
    scenarios: Vec<String>,
    /// Neighbour loads for the neighbour scenario, in cores (default: 0, 0.5, 1, and all cores
    /// but one on machines with more than two).
    #[arg(long, env = "PHI3D_BENCH_NEIGHBOURS", value_delimiter = ',')]
    neighbours: Vec<f64>,
    /// The neighbour's niceness (e.g. 10: it yields to the sides measured).
    #[arg(long, env = "PHI3D_BENCH_NEIGHBOUR_NICE", default_value_t = 0)]
    neighbour_nice: i32,
    /// Run as the neighbour itself (the bench starts itself this way).
    #[arg(long = "neighbour-cores", hide = true)]
    neighbour_cores: Option<f64>,
    /// Passed by `cargo bench` to every bench target; nothing to do with it.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The settings both sides run with.
#[derive(Clone)]
struct Setup {
    /// The daemon under test.
    phi3d: PathBuf,
    model: PathBuf,
    threads: u32,
    ctx_size: u32,
    batch_size: u32,
    gen_tokens: usize,
    /// The prompt as sent to phi3d, and the tokens the daemon makes of it.
    prompt: String,
    tokens: Vec<LlamaToken>,
}

/// The figures of one side of one run, in the order of [`METRICS`].
type Figures = [f64; METRICS.len()];

const METRICS: [&str; 7] = [
    "startup, ms",
    "prompt, tok/s",
    "first token, ms",
    "decode, tok/s",
    "decode (server formula), tok/s",
    "total, ms",
    "resident memory, MiB",
];

/// One side of one run: its figures and the text it generated.
struct Measured {
    figures: Figures,
    text: String,
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    if let Some(cores) = options.neighbour_cores {
        neighbours::be_a_neighbour(cores);
    }
    let wanted = |scenario: &str| options.scenarios.iter().any(|name| name == scenario);
    for name in &options.scenarios {
        ensure!(
            ["single", "shared", "neighbours", "cache-burst", "cache-time", "cache-chunk", "drafts", "rpc-split"].contains(&name.as_str()),
            "--scenarios: unknown scenario {name:?}; the scenarios are single, shared, neighbours, cache-burst, cache-time, cache-chunk, drafts and rpc-split"
        );
    }
    ensure!(options.runs > 0, "--runs must be at least 1");
    ensure!(
        options.gen_tokens >= 2,
        "--gen-tokens must be at least 2 (decode speed needs a token after the first)"
    );
    ensure!(
        options.prompt_tokens + options.gen_tokens <= options.ctx_size as usize,
        "--prompt-tokens + --gen-tokens must fit in --ctx-size {}",
        options.ctx_size
    );
    let (model, default_threads) = match options.model {
        Some(path) => (path, num_cpus::get_physical() as u32),
        // The tiny model is too small to split: more threads would only wait on each other,
        // which on a busy machine makes it slower by orders of magnitude.
        None => (
            ensure_model(Path::new(env!("CARGO_TARGET_TMPDIR")), &ModelSpec::tiny())?,
            1,
        ),
    };
    let mut backend = LlamaBackend::init()?;
    // llama.cpp logs hundreds of lines per load; the bench prints its own.
    backend.void_logs();

    // Loading it once up front also puts the file in the page cache, so that no run pays
    // for the disk and both sides load from memory.
    let loaded = load(&backend, &model)?;
    let (prompt, tokens) = build_prompt(&loaded, options.prompt_tokens)?;
    drop(loaded);
    let setup = Setup {
        phi3d: options.phi3d.clone(),
        model,
        threads: options.threads.unwrap_or(default_threads),
        ctx_size: options.ctx_size,
        batch_size: options.batch_size,
        gen_tokens: options.gen_tokens,
        prompt,
        tokens,
    };

    let size = std::fs::metadata(&setup.model)?.len();
    println!("phi3d       {}", setup.phi3d.display());
    println!(
        "model       {} ({:.2} GB)",
        setup.model.display(),
        size as f64 / 1e9
    );
    println!(
        "settings    prompt {} tokens, generate {}, threads {}, ctx {}, batch {}, runs {}",
        setup.tokens.len(),
        setup.gen_tokens,
        setup.threads,
        setup.ctx_size,
        setup.batch_size,
        options.runs
    );
    println!("load avg    {} (before)", load_average());

    // The client needs no more than one thread, and every other core is left to the daemon.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut baseline_runs = Vec::new();
    let mut phi3d_runs = Vec::new();
    let single_runs = if wanted("single") { options.runs } else { 0 };
    for run in 0..single_runs {
        // Alternating which side goes first keeps a machine that gets busier or quieter during
        // the bench from favouring either side.
        let (baseline, phi3d) = if run % 2 == 0 {
            let baseline = run_baseline(&backend, &setup)?;
            (baseline, runtime.block_on(run_phi3d(&setup))?)
        } else {
            let phi3d = runtime.block_on(run_phi3d(&setup))?;
            (run_baseline(&backend, &setup)?, phi3d)
        };
        println!("\nrun {} of {}", run + 1, options.runs);
        print_table(&baseline.figures, &phi3d.figures);
        if baseline.text != phi3d.text {
            println!("note: phi3d generated different text than the baseline");
        }
        baseline_runs.push(baseline.figures);
        phi3d_runs.push(phi3d.figures);
    }
    if single_runs > 0 {
        println!("\nmedian of {} runs", options.runs);
        print_table(&median(&baseline_runs), &median(&phi3d_runs));
    }

    let streams = options.streams.clone();
    let peer = options.llama_server.clone();
    if wanted("shared") {
        runtime.block_on(more_scenarios(&setup, options.slots, &streams, options.home_tokens, peer.as_deref()))?;
    }
    if wanted("neighbours") {
        let loads = if options.neighbours.is_empty() { neighbours::default_loads() } else { options.neighbours.clone() };
        runtime.block_on(neighbours::run(&backend, &setup, &loads, options.neighbour_nice, options.runs, peer.as_deref()))?;
    }
    if wanted("cache-burst") {
        runtime.block_on(prompt_cache::burst(&setup, options.slots, options.home_tokens, peer.as_deref()))?;
    }
    if wanted("cache-time") {
        runtime.block_on(prompt_cache::time(&setup, options.home_tokens, peer.as_deref()))?;
    }
    if wanted("cache-chunk") {
        // phi3d only: llama-server's --cache-reuse has no minimum chunk of the same meaning.
        runtime.block_on(prompt_cache::chunk(&setup, options.home_tokens))?;
    }
    if wanted("drafts") {
        runtime.block_on(drafts::run(&setup, options.runs, peer.as_deref()))?;
    }
    if wanted("rpc-split") {
        runtime.block_on(rpc_split::run(&setup, options.runs))?;
    }
    println!("\nload avg    {} (after)", load_average());
    Ok(())
}

/// Concurrent streams and the home-automation turn, on phi3d and, when given, llama-server.
async fn more_scenarios(
    setup: &Setup,
    slots: u32,
    streams: &[usize],
    home_tokens: usize,
    llama_server: Option<&Path>,
) -> anyhow::Result<()> {
    use scenarios::{HomeTurn, LlamaServer, Phi3d, Server, concurrent, house_prompt};
    let most = streams.iter().copied().max().unwrap_or(1);
    // Distinct prompts, so that no stream finds another's in the cache.
    let prompts: Vec<String> = (0..most).map(|index| format!("Story {index}: {}", setup.prompt)).collect();
    let generate = setup.gen_tokens;
    let house = house_prompt(home_tokens);

    async fn measure_streams(server: &impl Server, prompts: &[String], streams: &[usize], generate: usize) -> anyhow::Result<Vec<(f64, f64)>> {
        let mut out = Vec::new();
        for &n in streams {
            out.push(concurrent(server, prompts, n, generate).await?);
        }
        Ok(out)
    }

    let cache = tempfile::tempdir()?;
    let phi3d = Phi3d::start(setup, slots, cache.path()).await?;
    let phi3d_streams = measure_streams(&phi3d, &prompts, streams, generate).await?;
    drop(phi3d);

    let home_gen = 8;
    let cold_cache = tempfile::tempdir()?;
    let mut phi3d = Phi3d::start(setup, slots, cold_cache.path()).await?;
    let cold = phi3d.chat(&house, "Turn off the kitchen lights.", home_gen).await?;
    let cached = phi3d.chat(&house, "Is the garage door open?", home_gen).await?;
    phi3d.daemon.terminate().await?;
    let phi3d = Phi3d::start(setup, slots, cold_cache.path()).await?;
    let restarted = phi3d.chat(&house, "Dim the bedroom lights.", home_gen).await?;
    drop(phi3d);
    let phi3d_home = HomeTurn { cold, cached, restarted };

    let peer = match llama_server {
        Some(binary) => {
            let server = LlamaServer::start(binary, setup, slots).await?;
            let peer_streams = measure_streams(&server, &prompts, streams, generate).await?;
            drop(server);
            let server = LlamaServer::start(binary, setup, slots).await?;
            let cold = server.chat(&house, "Turn off the kitchen lights.", home_gen).await?;
            let cached = server.chat(&house, "Is the garage door open?", home_gen).await?;
            drop(server);
            let server = LlamaServer::start(binary, setup, slots).await?;
            let restarted = server.chat(&house, "Dim the bedroom lights.", home_gen).await?;
            drop(server);
            Some((peer_streams, HomeTurn { cold, cached, restarted }))
        }
        None => {
            println!("\nllama-server: skipped (set LLAMA_SERVER=/path/to/llama-server to compare with it)");
            None
        }
    };

    println!("\nconcurrent streams ({slots} slots, {generate} tokens each, distinct prompts): generated tok/s");
    println!("{:<10}{:>14}{:>14}{:>10}{:>16}{:>16}{:>10}", "streams", "phi3d total", "per stream", "vs 1", "llama-server", "per stream", "phi3d/ls");
    for (index, &n) in streams.iter().enumerate() {
        let (aggregate, per_stream) = phi3d_streams[index];
        let scale = aggregate / phi3d_streams[0].0;
        match &peer {
            Some((peer_streams, _)) => {
                let (peer_aggregate, peer_per_stream) = peer_streams[index];
                println!(
                    "{n:<10}{aggregate:>14.2}{per_stream:>14.2}{scale:>10.2}{peer_aggregate:>16.2}{peer_per_stream:>16.2}{:>10.2}",
                    aggregate / peer_aggregate
                );
            }
            None => println!("{n:<10}{aggregate:>14.2}{per_stream:>14.2}{scale:>10.2}"),
        }
    }
    if let Some((peer_streams, _)) = &peer {
        let scales: Vec<String> = peer_streams.iter().map(|(a, _)| format!("{:.2}", a / peer_streams[0].0)).collect();
        println!("llama-server vs 1 stream: {}", scales.join(", "));
    }

    println!(
        "\nhome-automation turn (system prompt {} tokens + one user line, {home_gen} tokens): time to first token, ms",
        phi3d_home.cold.prompt_tokens
    );
    println!("{:<28}{:>10}{:>10}{:>10}{:>14}{:>10}{:>10}", "", "phi3d", "of cold", "cached", "llama-server", "of cold", "cached");
    let rows: [(&str, fn(&HomeTurn) -> scenarios::StreamFigures); 3] =
        [("cold", |turn| turn.cold), ("prefix cached", |turn| turn.cached), ("after a restart", |turn| turn.restarted)];
    for (name, pick) in rows {
        let mine = pick(&phi3d_home);
        let line = format!(
            "{name:<28}{:>10.0}{:>10.3}{:>10}",
            mine.first_token_ms,
            mine.first_token_ms / phi3d_home.cold.first_token_ms,
            mine.cached_tokens
        );
        match &peer {
            Some((_, peer_home)) => {
                let theirs = pick(peer_home);
                println!(
                    "{line}{:>14.0}{:>10.3}{:>10}",
                    theirs.first_token_ms,
                    theirs.first_token_ms / peer_home.cold.first_token_ms,
                    theirs.cached_tokens
                );
            }
            None => println!("{line}"),
        }
    }
    Ok(())
}

fn load(backend: &LlamaBackend, path: &Path) -> anyhow::Result<LlamaModel> {
    LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
        .with_context(|| format!("llama.cpp cannot load {}", path.display()))
}

/// Common words, each one token in the real Phi-3 vocabulary and in the generated one.
const WORDS: [&str; 24] = [
    "the", "of", "and", "to", "in", "is", "that", "it", "was", "for", "on", "are", "with", "as",
    "they", "be", "at", "one", "have", "this", "from", "by", "but", "what",
];

/// A prompt that the daemon turns into exactly `count` tokens (tokenized as `Complete` does:
/// BOS added, special tokens parsed). Words are chosen, as far as the vocabulary allows, to be
/// one token each, so the word count follows from the token count; the rest is corrected by
/// adding or dropping words.
fn build_prompt(model: &LlamaModel, count: usize) -> anyhow::Result<(String, Vec<LlamaToken>)> {
    let vocab = model.vocab();
    let tokenize = |words: &[&str]| vocab.tokenize(words.join(" ").as_bytes(), true, true);
    let special = tokenize(&[]).len();
    let mut single: Vec<&str> = WORDS
        .iter()
        .copied()
        .filter(|word| tokenize(&[word]).len() == special + 1)
        .collect();
    if single.is_empty() {
        single = WORDS.to_vec();
    }
    // A stride through the list, so that the prompt is not one phrase over and over.
    let word = |i: usize| single[(i * 7) % single.len()];
    let mut words: Vec<&str> = (0..count.saturating_sub(special)).map(word).collect();
    for _ in 0..count {
        let tokens = tokenize(&words);
        match tokens.len().cmp(&count) {
            std::cmp::Ordering::Equal => return Ok((words.join(" "), tokens)),
            std::cmp::Ordering::Less => words.push(word(words.len())),
            std::cmp::Ordering::Greater => {
                words.pop();
            }
        }
    }
    bail!("cannot make a prompt of exactly {count} tokens with this model's vocabulary")
}

fn context_params(setup: &Setup) -> LlamaContextParams {
    // The daemon's worker context (engine::loader::create_context) with its one slot.
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(setup.ctx_size))
        .with_n_batch(setup.batch_size)
        .with_n_ubatch(setup.batch_size)
        .with_n_seq_max(1)
        .with_n_threads(setup.threads as i32)
        .with_n_threads_batch(setup.threads as i32)
        .with_kv_unified(true)
}

/// The baseline: llama-cpp-2 driven directly, the least any server could do.
fn run_baseline(backend: &LlamaBackend, setup: &Setup) -> anyhow::Result<Measured> {
    let resident_before = resident_mib("self");
    let started = Instant::now();
    let model = load(backend, &setup.model)?;
    let mut ctx = model.new_context(backend, context_params(setup))?;
    let vocab = model.vocab();
    let mut batch = LlamaBatch::new(setup.batch_size as usize, 1);
    // The daemon's warm-up, so that neither side's first decode pays llama.cpp's lazy setup.
    batch.add(vocab.bos(), 0, &[0], true)?;
    ctx.decode(&mut batch)?;
    ctx.clear_kv_cache();
    let startup = started.elapsed();

    let begin = Instant::now();
    let last = setup.tokens.len() - 1;
    for (chunk_index, chunk) in setup.tokens.chunks(setup.batch_size as usize).enumerate() {
        batch.clear();
        for (i, &token) in chunk.iter().enumerate() {
            let position = chunk_index * setup.batch_size as usize + i;
            batch.add(token, position as i32, &[0], position == last)?;
        }
        ctx.decode(&mut batch)?;
    }
    let prompt_done = Instant::now();

    let mut sampler = LlamaSampler::greedy();
    let mut logits_index = batch.n_tokens() - 1;
    let mut bytes = Vec::new();
    let mut first_token = None;
    // Each sampled token takes the next position; the last one is sampled but, as in the
    // daemon, never decoded.
    let last_position = setup.tokens.len() + setup.gen_tokens - 1;
    for position in setup.tokens.len()..=last_position {
        let token = sampler.sample(&ctx, logits_index);
        bytes.extend(vocab.token_to_piece(token, false, None));
        first_token.get_or_insert_with(Instant::now);
        if position == last_position {
            break;
        }
        batch.clear();
        batch.add(token, position as i32, &[0], true)?;
        ctx.decode(&mut batch)?;
        logits_index = 0;
    }
    let end = Instant::now();
    let first_token = first_token.expect("at least two tokens are generated");

    let prompt = prompt_done - begin;
    let figures = [
        ms(startup),
        per_second(setup.tokens.len(), prompt),
        ms(first_token - begin),
        per_second(setup.gen_tokens - 1, end - first_token),
        per_second(setup.gen_tokens, end - prompt_done),
        ms(end - begin),
        // What llama.cpp holds for this model and context: the baseline's own growth.
        resident_mib("self") - resident_before,
    ];
    Ok(Measured {
        figures,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// A `phi3d serve` process, killed when dropped.
struct Daemon {
    child: Child,
    /// Holds the daemon's empty config file and its stderr log.
    dir: tempfile::TempDir,
}

impl Daemon {
    /// `threads`: fixed, or None for the daemon's default (chosen per step).
    fn spawn(setup: &Setup, addr: SocketAddr, threads: Option<u32>, extra: &[String]) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir()?;
        // An empty config file, so that a machine's /etc/phi3d/phi3d.toml cannot change the
        // settings under test.
        let config = dir.path().join("phi3d.toml");
        std::fs::write(&config, "")?;
        let log = File::create(dir.path().join("stderr.log"))?;
        let child = Command::new(&setup.phi3d)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--model")
            .arg(&setup.model)
            .arg("--listen")
            .arg(addr.to_string())
            .args(threads.iter().flat_map(|threads| ["--threads".to_owned(), threads.to_string()]))
            .arg("--ctx-size")
            .arg(setup.ctx_size.to_string())
            .arg("--batch-size")
            .arg(setup.batch_size.to_string())
            .args(extra)
            .env("PHI3D_LOG", "warn")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning phi3d")?;
        Ok(Daemon { child, dir })
    }

    /// SIGTERM, then waits for the exit (the daemon saves its prompt cache on the way out).
    async fn terminate(&mut self) -> anyhow::Result<()> {
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status()?;
        let deadline = Instant::now() + STARTUP_LIMIT;
        while self.child.try_wait()?.is_none() {
            ensure!(Instant::now() < deadline, "phi3d did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Fails if the daemon has exited, with what it logged.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log =
                std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
            bail!("phi3d exited with {status}:\n{log}");
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long a daemon may take to load the model (a multi-GB model from a slow disk).
const STARTUP_LIMIT: Duration = Duration::from_secs(300);
/// How often to poll while the daemon starts: fine enough for the tiny model's startup of a
/// few tens of milliseconds, and too rare to take noticeable CPU from the loading daemon.
const POLL: Duration = Duration::from_millis(2);

async fn run_phi3d(setup: &Setup) -> anyhow::Result<Measured> {
    run_phi3d_with(setup, &[]).await
}

/// [`run_phi3d`] with `more` flags for the daemon.
async fn run_phi3d_with(setup: &Setup, more: &[String]) -> anyhow::Result<Measured> {
    let addr = free_port()?;
    let started = Instant::now();
    // One slot, as the baseline has one sequence; nothing saved between runs.
    let mut extra = vec!["--slots".to_owned(), "1".to_owned(), "--prompt-cache-disk-mb".to_owned(), "0".to_owned()];
    extra.extend_from_slice(more);
    let mut daemon = Daemon::spawn(setup, addr, Some(setup.threads), &extra)?;
    let channel = wait_serving(&mut daemon, addr).await?;
    let startup = started.elapsed();

    let request = CompleteRequest {
        request_id: String::new(),
        prompt: setup.prompt.clone(),
        options: Some(GenerationOptions {
            max_tokens: setup.gen_tokens as u32,
            temperature: Some(0.0),
            // The server's default penalty would add a sampler the baseline does not have.
            repeat_penalty: Some(1.0),
            ignore_eos: true,
            ..GenerationOptions::default()
        }),
    };
    let mut client = InferenceClient::new(channel);
    let sent = Instant::now();
    let mut stream = client.complete(request).await?.into_inner();
    let mut first_delta = None;
    let mut done = None;
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(chat_event::Event::Delta(_)) => {
                first_delta.get_or_insert_with(Instant::now);
            }
            Some(chat_event::Event::Done(end)) => done = Some((end, Instant::now())),
            _ => {}
        }
    }
    let (done, done_at) = done.context("the stream ended without Done")?;
    let usage = done.usage.unwrap_or_default();
    let timings = done.timings.unwrap_or_default();
    ensure!(
        usage.prompt_tokens as usize == setup.tokens.len()
            && usage.completion_tokens as usize == setup.gen_tokens,
        "phi3d read {} prompt tokens and generated {}; the baseline {} and {}",
        usage.prompt_tokens,
        usage.completion_tokens,
        setup.tokens.len(),
        setup.gen_tokens
    );
    let first_delta = first_delta.context("phi3d streamed no text")?;

    let figures = [
        ms(startup),
        per_second(
            setup.tokens.len(),
            Duration::from_secs_f64(timings.prompt_ms / 1000.0),
        ),
        ms(first_delta - sent),
        per_second(setup.gen_tokens - 1, done_at - first_delta),
        timings.tokens_per_second,
        ms(done_at - sent),
        resident_mib(&daemon.child.id().to_string()),
    ];
    Ok(Measured {
        figures,
        text: done.text,
    })
}

/// Waits until the daemon listens and reports SERVING; the channel to it.
async fn wait_serving(daemon: &mut Daemon, addr: SocketAddr) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + STARTUP_LIMIT;
    // The daemon binds its port before loading the model, then reports NOT_SERVING until the
    // model is warm.
    let channel = loop {
        if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))?.connect().await {
            break channel;
        }
        daemon.check_running()?;
        ensure!(Instant::now() < deadline, "phi3d did not listen within {STARTUP_LIMIT:?}");
        tokio::time::sleep(POLL).await;
    };
    let mut health = HealthClient::new(channel.clone());
    loop {
        let status = health.check(HealthCheckRequest { service: String::new() }).await?.into_inner().status;
        if status == ServingStatus::Serving as i32 {
            return Ok(channel);
        }
        daemon.check_running()?;
        ensure!(Instant::now() < deadline, "phi3d was not SERVING within {STARTUP_LIMIT:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// A loopback port that was free a moment ago (the daemon binds it right after).
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn per_second(tokens: usize, duration: Duration) -> f64 {
    tokens as f64 / duration.as_secs_f64()
}

/// The median of each metric over the runs.
fn median(runs: &[Figures]) -> Figures {
    std::array::from_fn(|metric| median_value(runs.iter().map(|figures| figures[metric]).collect()))
}

/// The median of `values` (the mean of the middle two for an even count).
fn median_value(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn print_table(baseline: &Figures, phi3d: &Figures) {
    println!("{:<32}{:>10}{:>10}{:>8}", "", "baseline", "phi3d", "ratio");
    for (i, name) in METRICS.iter().enumerate() {
        println!(
            "{name:<32}{:>10.2}{:>10.2}{:>8.2}",
            baseline[i],
            phi3d[i],
            phi3d[i] / baseline[i]
        );
    }
    let memory = METRICS.len() - 1;
    println!("{:<32}{:>10.1}", "daemon memory beyond it, MiB", phi3d[memory] - baseline[memory]);
}

/// VmRSS of a process (`self` or a pid), in MiB.
fn resident_mib(process: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// The 1, 5 and 15 minute load averages, to judge how busy the machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}
