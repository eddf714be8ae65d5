//! Turns validated [`GenerationParams`] into a llama.cpp sampler chain, and samples with it
//! so that nothing reaches llama.cpp's code paths that abort the process.

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;

use super::task::{EngineError, GenerationParams, Grammar};

/// How many recent tokens the repeat penalty looks at (llama.cpp's default).
const PENALTY_LAST_N: i32 = 64;

/// The CPU time one token's sampling may take. A grammar checks every candidate token against
/// every alternative open at that point, and the schema limits bound alternatives one by one,
/// not their products (an `anyOf` of enums): a request whose grammar makes one step take
/// longer than this ends, rather than holding the engine thread that every client shares.
/// Ordinary steps take milliseconds; CPU time, so that a busy neighbour does not count.
const SAMPLING_CPU_BUDGET: std::time::Duration = std::time::Duration::from_secs(1);

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

/// The next token from the logits at batch position `index`, checked before the sampler
/// accepts it.
///
/// llama.cpp's own `llama_sampler_sample` accepts whatever the chain selected: a token the
/// grammar forbids (selected when NaN logits or an empty candidate set confuse the chain)
/// makes the grammar throw, which Rust cannot catch, or abort outright (an end-of-generation
/// token the grammar does not allow yet). Here NaN logits count as impossible, the selected
/// token must still have a finite logit after the grammar has masked, and an exception while
/// accepting is caught (llama-cpp-2's `try_accept`): each ends this request with an error.
pub fn sample(sampler: &mut LlamaSampler, ctx: &LlamaContext<'_>, index: i32) -> Result<LlamaToken, EngineError> {
    let logits = ctx.candidates_ith(index).map(|mut candidate| {
        if candidate.logit().is_nan() {
            candidate.set_logit(f32::NEG_INFINITY);
        }
        candidate
    });
    let mut candidates = LlamaTokenDataArray::from_iter(logits, false);
    if !candidates.data.iter().any(|candidate| candidate.logit().is_finite()) {
        return Err(EngineError::Sampling("the model gave no finite logits".into()));
    }
    let before = thread_cpu_time();
    sampler.apply(&mut candidates);
    let spent = thread_cpu_time().saturating_sub(before);
    if spent > SAMPLING_CPU_BUDGET {
        return Err(EngineError::Grammar(format!(
            "choosing one token took {} ms of CPU time, more than {} ms: the request's schema or grammar offers \
             too many alternatives at once; offer fewer enum values or anyOf branches",
            spent.as_millis(),
            SAMPLING_CPU_BUDGET.as_millis()
        )));
    }
    let selected = candidates.selected.and_then(|selected| candidates.data.get(selected));
    let Some(chosen) = selected.filter(|candidate| candidate.logit().is_finite()) else {
        return Err(EngineError::Sampling(
            "no token is allowed here (the grammar and the sampling options leave nothing to choose)".into(),
        ));
    };
    let token = chosen.id();
    sampler
        .try_accept(token)
        .map_err(|err| EngineError::Sampling(format!("llama.cpp refused the sampled token {}: {err}", token.0)))?;
    Ok(token)
}

/// CPU time this thread has used.
fn thread_cpu_time() -> std::time::Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec to write; CLOCK_THREAD_CPUTIME_ID is always supported
    // on Linux. On failure it stays zero and the budget is not enforced.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    std::time::Duration::new(now.tv_sec.max(0) as u64, now.tv_nsec.clamp(0, 999_999_999) as u32)
}
