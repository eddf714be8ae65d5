//! The memory plan: what the model and its context need against what the machine allows.
//!
//! Memory is the scarce resource on a Raspberry Pi. Phi-3-mini has no grouped-query
//! attention, so its f16 KV cache costs 384 KiB per token (1.5 GiB at 4096); `q8_0` halves
//! that, `q4_0` quarters it. Before llama.cpp allocates anything, phi3d adds weights, KV cache
//! and compute buffers, compares the sum with the memory available (and the cgroup's
//! `memory.max`, under systemd's `MemoryMax=`), and refuses a configuration that cannot fit
//! with the numbers and one that would.

use std::fmt;
use std::str::FromStr;

use llama_cpp_2::context::params::KvCacheType;
use llama_cpp_2::model::LlamaModel;

/// The element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    #[default]
    F16,
    Q8_0,
    Q4_0,
}

impl KvType {
    pub const ALL: [KvType; 3] = [KvType::F16, KvType::Q8_0, KvType::Q4_0];

    /// Bytes per element, scaled by 32 (ggml's quantized blocks hold 32 elements).
    fn bytes_per_32(self) -> u64 {
        match self {
            KvType::F16 => 64,
            KvType::Q8_0 => 34,
            KvType::Q4_0 => 18,
        }
    }

    pub fn ggml(self) -> KvCacheType {
        match self {
            KvType::F16 => KvCacheType::F16,
            KvType::Q8_0 => KvCacheType::Q8_0,
            KvType::Q4_0 => KvCacheType::Q4_0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }
}

impl fmt::Display for KvType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvType {
    type Err = String;

    fn from_str(text: &str) -> Result<KvType, String> {
        KvType::ALL
            .into_iter()
            .find(|kind| kind.name() == text)
            .ok_or_else(|| format!("`{text}` is not one of f16, q8_0, q4_0"))
    }
}

/// The shape numbers the plan needs, read from the loaded model.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    pub weights_bytes: u64,
    pub n_layer: u64,
    pub n_embd: u64,
    pub n_head: u64,
    pub n_head_kv: u64,
    pub n_vocab: u64,
}

impl ModelShape {
    pub fn of(model: &LlamaModel) -> ModelShape {
        ModelShape {
            weights_bytes: model.size(),
            n_layer: u64::from(model.n_layer()),
            n_embd: model.n_embd() as u64,
            n_head: u64::from(model.n_head().max(1)),
            n_head_kv: u64::from(model.n_head_kv()),
            n_vocab: model.n_vocab() as u64,
        }
    }

    /// This board's part when the other layers live on RPC workers: its layers' share of the
    /// weights (an estimate: the embeddings, which stay here, are counted with the layers) and
    /// their KV cache.
    pub fn local_part(&self, local_layers: u64) -> ModelShape {
        let local_layers = local_layers.min(self.n_layer);
        ModelShape { weights_bytes: self.weights_bytes * local_layers / self.n_layer.max(1), n_layer: local_layers, ..*self }
    }

    /// K and V for every layer, for one token position.
    pub fn kv_bytes_per_token(&self, kv_type: KvType) -> u64 {
        let kv_width = self.n_embd / self.n_head * self.n_head_kv;
        2 * self.n_layer * kv_width * kv_type.bytes_per_32() / 32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    pub compute_bytes: u64,
    pub budget_bytes: Option<u64>,
    pub kv_type: KvType,
    pub ctx_size: u32,
}

impl MemoryPlan {
    pub fn new(shape: &ModelShape, ctx_size: u32, batch_size: u32, kv_type: KvType, budget_bytes: Option<u64>) -> Self {
        MemoryPlan {
            weights_bytes: shape.weights_bytes,
            kv_cache_bytes: shape.kv_bytes_per_token(kv_type) * u64::from(ctx_size),
            compute_bytes: compute_bytes(shape, ctx_size, batch_size, kv_type),
            budget_bytes,
            kv_type,
            ctx_size,
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes + self.kv_cache_bytes + self.compute_bytes
    }

    pub fn fits(&self) -> bool {
        self.budget_bytes.is_none_or(|budget| self.total_bytes() <= budget)
    }

    /// RAM for cached prompts evicted from the KV cache when `prompt_cache_ram_mb` is unset: a
    /// quarter of what the model and its context leave of the budget (the board's neighbours
    /// need the rest), at most 2 GB; 256 MB where the budget is unknown.
    pub fn default_prompt_cache_ram_bytes(&self) -> u64 {
        const MAX: u64 = 2_048_000_000;
        match self.budget_bytes {
            Some(budget) => (budget.saturating_sub(self.total_bytes()) / 4).min(MAX),
            None => 256_000_000,
        }
    }

    /// The largest context (and, failing that, the smallest KV type) that would fit, for the
    /// error message: `None` when even the weights do not fit.
    pub fn suggestion(&self, shape: &ModelShape, batch_size: u32) -> Option<(u32, KvType)> {
        let mut ctx_size = self.ctx_size;
        while ctx_size >= 256 {
            for kv_type in KvType::ALL {
                let plan = MemoryPlan::new(shape, ctx_size, batch_size.min(ctx_size), kv_type, self.budget_bytes);
                if plan.fits() {
                    return Some((ctx_size, kv_type));
                }
            }
            ctx_size /= 2;
        }
        None
    }
}

/// llama.cpp's compute buffers, estimated from the shape: the output logits, the activations
/// of one micro-batch and, without flash attention, its attention scores over the context.
/// Deliberately high: it counts the attention scores even where flash attention avoids them.
fn compute_bytes(shape: &ModelShape, ctx_size: u32, batch_size: u32, kv_type: KvType) -> u64 {
    let batch = u64::from(batch_size);
    let logits = batch * shape.n_vocab * 4;
    let activations = batch * shape.n_embd * 4 * 12;
    let scores = if kv_type == KvType::F16 { batch * u64::from(ctx_size) * shape.n_head * 4 } else { 0 };
    logits + activations + scores
}

/// What may be allocated: `MemAvailable`, or less when the cgroup's limit is lower.
pub fn memory_budget() -> Option<u64> {
    let available = mem_available();
    match (available, cgroup_headroom()) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

fn mem_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `memory.max - memory.current` of this process's cgroup (v2), when a limit is set.
fn cgroup_headroom() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|line| line.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max" means no limit
    let current: u64 = std::fs::read_to_string(dir.join("memory.current")).ok()?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// A size in the largest binary unit that keeps it at least 1 ("1.5 GiB"), for every message
/// and log line that shows one.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Phi-3-mini: 32 layers, 3072 wide, 32 heads, no GQA, 32064 tokens, 2.2 GB at Q4.
    const PHI3_MINI: ModelShape = ModelShape {
        weights_bytes: 2_200_000_000,
        n_layer: 32,
        n_embd: 3072,
        n_head: 32,
        n_head_kv: 32,
        n_vocab: 32064,
    };

    #[test]
    fn phi3_mini_kv_costs_384_kib_per_token_in_f16_and_about_half_in_q8_0() {
        assert_eq!(PHI3_MINI.kv_bytes_per_token(KvType::F16), 384 * 1024);
        assert_eq!(PHI3_MINI.kv_bytes_per_token(KvType::Q8_0), 384 * 1024 * 34 / 64);
        let plan = MemoryPlan::new(&PHI3_MINI, 4096, 512, KvType::F16, None);
        assert_eq!(human_bytes(plan.kv_cache_bytes), "1.5 GiB");
    }

    #[test]
    fn a_plan_that_does_not_fit_suggests_one_that_does() {
        let budget = 3_500_000_000;
        let plan = MemoryPlan::new(&PHI3_MINI, 4096, 512, KvType::F16, Some(budget));
        assert!(!plan.fits(), "{} > {budget}", plan.total_bytes());
        let (ctx_size, kv_type) = plan.suggestion(&PHI3_MINI, 512).unwrap();
        let suggested = MemoryPlan::new(&PHI3_MINI, ctx_size, 512, kv_type, Some(budget));
        assert!(suggested.fits());
        assert_eq!((ctx_size, kv_type), (4096, KvType::Q8_0), "the context is kept when a smaller KV type fits");
        let hopeless = MemoryPlan::new(&PHI3_MINI, 4096, 512, KvType::F16, Some(1_000_000_000));
        assert_eq!(hopeless.suggestion(&PHI3_MINI, 512), None);
    }

    #[test]
    fn the_ram_tier_takes_a_quarter_of_what_is_left() {
        let plan = MemoryPlan::new(&PHI3_MINI, 4096, 512, KvType::F16, None);
        assert_eq!(plan.default_prompt_cache_ram_bytes(), 256_000_000, "budget unknown");
        let roomy = MemoryPlan::new(&PHI3_MINI, 4096, 512, KvType::F16, Some(plan.total_bytes() + 4_000_000_000));
        assert_eq!(roomy.default_prompt_cache_ram_bytes(), 1_000_000_000);
        let tight = MemoryPlan::new(&PHI3_MINI, 4096, 512, KvType::F16, Some(plan.total_bytes() - 1));
        assert_eq!(tight.default_prompt_cache_ram_bytes(), 0);
        let huge = MemoryPlan::new(&PHI3_MINI, 4096, 512, KvType::F16, Some(64_000_000_000));
        assert_eq!(huge.default_prompt_cache_ram_bytes(), 2_048_000_000);
    }

    #[test]
    fn kv_types_parse_by_name() {
        assert_eq!("q8_0".parse::<KvType>(), Ok(KvType::Q8_0));
        assert!("q5".parse::<KvType>().unwrap_err().contains("f16, q8_0, q4_0"));
    }

    #[test]
    fn bytes_read_like_a_person_writes_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(2_390_000_000), "2.2 GiB");
        assert_eq!(human_bytes(384 * 1024), "384.0 KiB");
    }
}
