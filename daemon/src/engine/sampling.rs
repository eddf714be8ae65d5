//! Turns validated [`SamplingParams`] into a llama.cpp sampler chain.

use llama_cpp_2::sampling::LlamaSampler;

use super::task::SamplingParams;

/// How many recent tokens the repeat penalty looks at (llama.cpp's default).
const PENALTY_LAST_N: i32 = 64;

pub fn build_sampler(params: &SamplingParams, n_vocab: i32) -> LlamaSampler {
    let mut chain = Vec::new();
    if params.repeat_penalty != 1.0 {
        chain.push(LlamaSampler::penalties(n_vocab, PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0));
    }
    if params.temperature == 0.0 {
        chain.push(LlamaSampler::greedy());
        return LlamaSampler::chain_simple(chain);
    }
    if params.top_k > 0 {
        chain.push(LlamaSampler::top_k(params.top_k as i32));
    }
    chain.push(LlamaSampler::top_p(params.top_p, 1));
    if params.min_p > 0.0 {
        chain.push(LlamaSampler::min_p(params.min_p, 1));
    }
    chain.push(LlamaSampler::temp(params.temperature));
    chain.push(LlamaSampler::dist(params.seed));
    LlamaSampler::chain_simple(chain)
}
