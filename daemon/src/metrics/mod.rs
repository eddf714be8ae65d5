//! Prometheus metrics, served as text at `GET /metrics` on the HTTP listener.
//!
//! Counters and histograms are recorded where things happen: requests by the gRPC layer
//! (`grpc`) and the HTTP middleware, generations as the engine reports each one ending (the
//! metrics are its [`crate::engine::Observer`]), plugin calls by the registry. Gauges that
//! describe the present (queue, slots, KV cells, load state, memory) are read from the engine
//! when a scrape asks, so they are never stale.

pub mod grpc;

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::status::SlotPhase;
use crate::engine::task::{Completion, StopReason};
use crate::engine::{Engine, LoadState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// grpc, ollama or openai.
    api: &'static str,
    /// The gRPC method or the HTTP path.
    endpoint: String,
    /// The gRPC status code name, or the HTTP status code.
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    plugin: String,
    /// ok or error.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StopLabels {
    stop_reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    /// hit (some of the prompt was already in the KV cache) or miss.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DraftLabels {
    /// accepted (the sampler picked the drafted token) or rejected.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
}

/// Every metric phi3d exports. Cheap to clone: the handles share one registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    generations: Family<StopLabels, Counter>,
    prompt_tokens: Counter,
    cached_prompt_tokens: Counter,
    shifted_prompt_tokens: Counter,
    generated_tokens: Counter,
    draft_tokens: Family<DraftLabels, Counter>,
    prompt_cache_lookups: Family<ResultLabels, Counter>,
    time_to_first_token: Histogram,
    tokens_per_second: Histogram,
    plugin_calls: Family<PluginLabels, Counter>,
    queue_depth: Gauge,
    slots: Family<PhaseLabels, Gauge>,
    kv_cells_used: Gauge,
    kv_cells_total: Gauge,
    prompt_cache_ram_entries: Gauge,
    prompt_cache_ram_bytes: Gauge,
    inference_threads: Family<StepLabels, Gauge>,
    inference_threads_max: Gauge,
    recent_decode_speed: Gauge<f64, std::sync::atomic::AtomicU64>,
    model_state: Family<StateLabels, Gauge>,
    model_load_percent: Gauge,
    model_layers: Family<DeviceLabels, Gauge>,
    resident_memory: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("phi3d");
        let inner = Inner {
            requests: Family::default(),
            generations: Family::default(),
            prompt_tokens: Counter::default(),
            cached_prompt_tokens: Counter::default(),
            shifted_prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            draft_tokens: Family::default(),
            prompt_cache_lookups: Family::default(),
            // 50 ms to about 100 s: a cached turn on a desktop to a cold 4k prompt on a Pi.
            time_to_first_token: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.05, 2.0, 12)),
            tokens_per_second: Histogram::new([1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0]),
            plugin_calls: Family::default(),
            queue_depth: Gauge::default(),
            slots: Family::default(),
            kv_cells_used: Gauge::default(),
            kv_cells_total: Gauge::default(),
            prompt_cache_ram_entries: Gauge::default(),
            prompt_cache_ram_bytes: Gauge::default(),
            inference_threads: Family::default(),
            inference_threads_max: Gauge::default(),
            recent_decode_speed: Gauge::default(),
            model_state: Family::default(),
            model_load_percent: Gauge::default(),
            model_layers: Family::default(),
            resident_memory: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests by API, endpoint and status code", inner.requests.clone());
        registry.register("generations", "Generations (a tool turn has one per step) by stop reason", inner.generations.clone());
        registry.register("prompt_tokens", "Prompt tokens of every generation, cached ones included", inner.prompt_tokens.clone());
        registry.register("cached_prompt_tokens", "Prompt tokens found in the prompt cache as an exact prefix, not decoded again", inner.cached_prompt_tokens.clone());
        registry.register(
            "shifted_prompt_tokens",
            "Prompt tokens reused from the prompt cache past a changed span (moved to new positions), not decoded again",
            inner.shifted_prompt_tokens.clone(),
        );
        registry.register("generated_tokens", "Tokens generated", inner.generated_tokens.clone());
        registry.register(
            "draft_tokens",
            "Tokens guessed from the prompt and checked beside a sampled token (lookup decoding): picked by the sampler (accepted) or not (rejected)",
            inner.draft_tokens.clone(),
        );
        registry.register("prompt_cache_lookups", "Generations whose prompt was found as a cached prefix (hit), also reused past a changed span (shifted), or not at all (miss)", inner.prompt_cache_lookups.clone());
        registry.register(
            "time_to_first_token_seconds",
            "From a generation's arrival in the queue to its first token",
            inner.time_to_first_token.clone(),
        );
        registry.register("generation_tokens_per_second", "Decoding speed of each generation", inner.tokens_per_second.clone());
        registry.register("plugin_calls", "Plugin tool calls by plugin and outcome", inner.plugin_calls.clone());
        registry.register("queue_depth", "Generations waiting for a slot", inner.queue_depth.clone());
        registry.register("slots", "Slots by phase: idle, reading (the prompt) or generating", inner.slots.clone());
        registry.register("kv_cells_used", "KV cache cells holding tokens", inner.kv_cells_used.clone());
        registry.register("kv_cells_total", "KV cache cells in all", inner.kv_cells_total.clone());
        registry.register(
            "prompt_cache_ram_entries",
            "Cached prompts evicted from the KV cache and kept in RAM",
            inner.prompt_cache_ram_entries.clone(),
        );
        registry.register("prompt_cache_ram_bytes", "Bytes the prompts kept in RAM take", inner.prompt_cache_ram_bytes.clone());
        registry.register(
            "inference_threads",
            "Threads decodes use now: steps of one token (single) and of several (batch)",
            inner.inference_threads.clone(),
        );
        registry.register("inference_threads_max", "The most threads a decode may use", inner.inference_threads_max.clone());
        registry.register(
            "recent_decode_tokens_per_second",
            "Tokens generated per second over the last decode steps; drops when other programs take the cores",
            inner.recent_decode_speed.clone(),
        );
        registry.register(
            "model_state",
            "1 for the model's load state: waiting (for an RPC worker), loading, ready or failed",
            inner.model_state.clone(),
        );
        registry.register(
            "model_layers",
            "The model's repeating layers on each device: this board, or an RPC worker (host:port)",
            inner.model_layers.clone(),
        );
        registry.register("model_load_percent", "How far loading the model got", inner.model_load_percent.clone());
        registry.register("process_resident_memory_bytes", "phi3d's resident memory", inner.resident_memory.clone());
        Metrics { inner: Arc::new(Inner { registry, ..inner }) }
    }
}

impl Metrics {
    /// One request answered: `code` is the gRPC status name or the HTTP status number.
    pub fn request(&self, api: &'static str, endpoint: &str, code: &str) {
        let labels = RequestLabels { api, endpoint: endpoint.to_owned(), code: code.to_owned() };
        self.inner.requests.get_or_create(&labels).inc();
    }

    /// A generation ended (in the worker, for every API and every tool step alike).
    pub fn generation(&self, done: &Completion) {
        let inner = &self.inner;
        let stop_reason = match done.stop_reason {
            StopReason::EndOfGeneration => "eos",
            StopReason::StopSequence => "stop_sequence",
            StopReason::MaxTokens => "max_tokens",
            StopReason::Cancelled => "cancelled",
        };
        inner.generations.get_or_create(&StopLabels { stop_reason }).inc();
        inner.prompt_tokens.inc_by(u64::from(done.prompt_tokens));
        inner.cached_prompt_tokens.inc_by(u64::from(done.cached_prompt_tokens));
        inner.shifted_prompt_tokens.inc_by(u64::from(done.shifted_prompt_tokens));
        inner.generated_tokens.inc_by(u64::from(done.completion_tokens));
        let drafts = &done.timings;
        let rejected = drafts.draft_tokens.saturating_sub(drafts.accepted_draft_tokens);
        inner.draft_tokens.get_or_create(&DraftLabels { result: "accepted" }).inc_by(u64::from(drafts.accepted_draft_tokens));
        inner.draft_tokens.get_or_create(&DraftLabels { result: "rejected" }).inc_by(u64::from(rejected));
        let result = match (done.cached_prompt_tokens, done.shifted_prompt_tokens) {
            (0, 0) => "miss",
            (_, 0) => "hit",
            _ => "shifted",
        };
        inner.prompt_cache_lookups.get_or_create(&ResultLabels { result }).inc();
        if done.completion_tokens > 0 {
            let timings = &done.timings;
            inner.time_to_first_token.observe((timings.queued_ms + timings.first_token_ms) / 1000.0);
            if timings.tokens_per_second > 0.0 {
                inner.tokens_per_second.observe(timings.tokens_per_second);
            }
        }
    }

    pub fn plugin_call(&self, plugin: &str, is_error: bool) {
        let labels = PluginLabels { plugin: plugin.to_owned(), outcome: if is_error { "error" } else { "ok" } };
        self.inner.plugin_calls.get_or_create(&labels).inc();
    }

    /// The text exposition, with the present read from `engine` first.
    pub fn render(&self, engine: &Engine) -> String {
        let inner = &self.inner;
        inner.queue_depth.set(engine.queue_depth() as i64);
        let status = engine.status();
        for (phase, name) in [(SlotPhase::Idle, "idle"), (SlotPhase::Reading, "reading"), (SlotPhase::Generating, "generating")] {
            let count = status.slots.iter().filter(|slot| slot.phase == phase).count();
            inner.slots.get_or_create(&PhaseLabels { phase: name }).set(count as i64);
        }
        inner.kv_cells_used.set(i64::from(status.kv_cells_used));
        inner.kv_cells_total.set(i64::from(status.kv_cells_total));
        inner.prompt_cache_ram_entries.set(i64::from(status.cache_entries_in_ram));
        inner.prompt_cache_ram_bytes.set(i64::try_from(status.cache_ram_bytes).unwrap_or(i64::MAX));
        for (step, count) in [("single", status.threads.single), ("batch", status.threads.batch)] {
            inner.inference_threads.get_or_create(&StepLabels { step }).set(i64::from(count));
        }
        inner.inference_threads_max.set(i64::from(status.threads.max));
        inner.recent_decode_speed.set(status.recent_decode_tokens_per_second);
        let (current, percent) = match engine.state() {
            LoadState::Waiting { .. } => ("waiting", 0),
            LoadState::Loading { percent } => ("loading", i64::from(percent)),
            LoadState::Ready(_) => ("ready", 100),
            LoadState::Failed(_) => ("failed", 0),
        };
        for state in ["waiting", "loading", "ready", "failed"] {
            inner.model_state.get_or_create(&StateLabels { state }).set(i64::from(state == current));
        }
        inner.model_load_percent.set(percent);
        if let LoadState::Ready(loaded) = engine.state() {
            for span in &loaded.info.placement {
                let layers = span.layers.map_or(0, |(first, last)| i64::from(last - first + 1));
                inner.model_layers.get_or_create(&DeviceLabels { device: span.device.clone() }).set(layers);
            }
        }
        if let Some(bytes) = resident_memory_bytes() {
            inner.resident_memory.set(bytes as i64);
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &inner.registry);
        text
    }
}

/// The engine tells the metrics of each generation as it ends; the metrics know the engine,
/// never the other way round.
impl crate::engine::Observer for Metrics {
    fn generation_ended(&self, done: &Completion) {
        self.generation(done);
    }
}

/// The resident set size from `/proc/self/statm`. prometheus-client has no process collector,
/// and this one figure does not justify a crate that reads all of `/proc`.
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page_size).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::task::Timings;

    fn completion(cached: u32, generated: u32) -> Completion {
        Completion {
            stop_reason: StopReason::MaxTokens,
            text: String::new(),
            prompt_tokens: 10,
            cached_prompt_tokens: cached,
            shifted_prompt_tokens: 0,
            completion_tokens: generated,
            timings: Timings { queued_ms: 100.0, first_token_ms: 150.0, tokens_per_second: 12.0, ..Timings::default() },
        }
    }

    #[test]
    fn generations_add_up_in_the_exposition() {
        let metrics = Metrics::default();
        metrics.generation(&completion(0, 5));
        metrics.generation(&completion(8, 3));
        metrics.plugin_call("clock", false);
        metrics.plugin_call("clock", true);
        metrics.request("grpc", "/phi3d.v1.Inference/Chat", "OK");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.inner.registry).unwrap();
        for line in [
            "phi3d_prompt_tokens_total 20",
            "phi3d_cached_prompt_tokens_total 8",
            "phi3d_generated_tokens_total 8",
            "phi3d_prompt_cache_lookups_total{result=\"hit\"} 1",
            "phi3d_prompt_cache_lookups_total{result=\"miss\"} 1",
            "phi3d_generations_total{stop_reason=\"max_tokens\"} 2",
            "phi3d_plugin_calls_total{plugin=\"clock\",outcome=\"error\"} 1",
            "phi3d_requests_total{api=\"grpc\",endpoint=\"/phi3d.v1.Inference/Chat\",code=\"OK\"} 1",
            // 0.25 s to the first token, twice: in the 0.4 s bucket, not in the 0.2 s one.
            "phi3d_time_to_first_token_seconds_bucket{le=\"0.2\"} 0",
            "phi3d_time_to_first_token_seconds_bucket{le=\"0.4\"} 2",
            "phi3d_time_to_first_token_seconds_count 2",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(resident_memory_bytes().is_some_and(|bytes| bytes > 1_000_000));
    }
}
