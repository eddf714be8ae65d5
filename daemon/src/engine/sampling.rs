//! Turns validated [`GenerationParams`] into a llama.cpp sampler chain.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;

use super::task::{GenerationParams, Grammar};

/// How many recent tokens the repeat penalty looks at (llama.cpp's default).
const PENALTY_LAST_N: i32 = 64;

/// The chain for one task. Fails only on a grammar llama.cpp rejects.
pub fn build_sampler(params: &GenerationParams, model: &LlamaModel) -> Result<LlamaSampler, String> {
    let sampling = &params.sampling;
    let mut chain = Vec::new();
    // The grammar masks first, so that every later step only sees allowed tokens.
    if let Some(grammar) = &params.grammar {
        chain.push(grammar_sampler(grammar, model)?);
    }
    if sampling.repeat_penalty != 1.0 {
        chain.push(LlamaSampler::penalties(model.n_vocab(), PENALTY_LAST_N, sampling.repeat_penalty, 0.0, 0.0));
    }
    if sampling.temperature == 0.0 {
        chain.push(LlamaSampler::greedy());
        return Ok(LlamaSampler::chain_simple(chain));
    }
    if sampling.top_k > 0 {
        chain.push(LlamaSampler::top_k(sampling.top_k as i32));
    }
    chain.push(LlamaSampler::top_p(sampling.top_p, 1));
    if sampling.min_p > 0.0 {
        chain.push(LlamaSampler::min_p(sampling.min_p, 1));
    }
    chain.push(LlamaSampler::temp(sampling.temperature));
    chain.push(LlamaSampler::dist(sampling.seed));
    Ok(LlamaSampler::chain_simple(chain))
}

/// The grammar's sampler: lazy, switched on by its trigger, when it has one.
fn grammar_sampler(grammar: &Grammar, model: &LlamaModel) -> Result<LlamaSampler, String> {
    let sampler = match &grammar.trigger {
        None => LlamaSampler::grammar(model, &grammar.gbnf, "root"),
        Some(trigger) => {
            // A special token is matched as a token; plain text as a word.
            let tokens = model.vocab().tokenize(trigger.as_bytes(), false, true);
            if tokens.len() == 1 {
                LlamaSampler::grammar_lazy(model, &grammar.gbnf, "root", std::iter::empty::<&[u8]>(), &tokens)
            } else {
                LlamaSampler::grammar_lazy(model, &grammar.gbnf, "root", [trigger.as_bytes()], &[])
            }
        }
    };
    sampler.map_err(|err| err.to_string())
}
