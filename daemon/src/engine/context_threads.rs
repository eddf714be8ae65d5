//! Changing a live context's thread counts between decode steps, for the thread governor.
//!
//! llama.cpp has `llama_set_n_threads` for this, but llama-cpp-2 (0.1.160, the newest
//! release) neither wraps it nor hands out the context's pointer, and no other crate or
//! llama.cpp setting does it (OpenMP's own controls are overridden by ggml's `num_threads`
//! clause). So the pointer is read from the `LlamaContext` value itself, under checks that make
//! a mistake fail closed: the struct must have the size of the layout this code knows (a
//! pointer and an empty `Vec`, checked when compiling), exactly one of its words may look like
//! a heap pointer, and llama.cpp must report, through that pointer, the context size, batch
//! size and thread count the context was created with. When any check fails, the worker
//! keeps the configured count and says so; nothing is guessed.

use llama_cpp_2::context::LlamaContext;
use llama_cpp_sys_2::llama_context;

/// A handle to set a context's thread counts; valid as long as the context it was found in.
pub struct ContextThreads {
    raw: *mut llama_context,
}

const WORDS: usize = 4;
const _: () = assert!(
    size_of::<LlamaContext<'static>>() == WORDS * size_of::<usize>(),
    "llama-cpp-2's LlamaContext changed layout: review context_threads.rs"
);

/// Addresses below this are never heap pointers (an empty `Vec` holds its alignment there).
const LOWEST_HEAP_ADDRESS: usize = 1 << 16;

impl ContextThreads {
    /// Finds the pointer of `ctx`, created with `threads` threads for both kinds of step.
    pub fn find(ctx: &LlamaContext<'_>, threads: u32) -> Option<ContextThreads> {
        // SAFETY: a bitwise copy of a value of exactly WORDS words (checked above), read as
        // integers and never dropped or used as the original type.
        let words: [usize; WORDS] = unsafe { std::mem::transmute_copy(ctx) };
        let mut candidates =
            words.iter().copied().filter(|&word| word >= LOWEST_HEAP_ADDRESS && word % align_of::<usize>() == 0);
        let raw = candidates.next()? as *mut llama_context;
        if candidates.next().is_some() {
            return None;
        }
        // SAFETY: `raw` is the only word of the struct that can be a pointer: the context
        // pointer (the rest is an empty Vec). These calls read plain fields of the context.
        let (n_ctx, n_batch, n_threads, n_threads_batch) = unsafe {
            (
                llama_cpp_sys_2::llama_n_ctx(raw),
                llama_cpp_sys_2::llama_n_batch(raw),
                llama_cpp_sys_2::llama_n_threads(raw),
                llama_cpp_sys_2::llama_n_threads_batch(raw),
            )
        };
        let matches = n_ctx == ctx.n_ctx()
            && n_batch == ctx.n_batch()
            && n_threads == threads as i32
            && n_threads_batch == threads as i32;
        matches.then_some(ContextThreads { raw })
    }

    /// Sets the threads of single-token steps and of batches, from the next decode on. The
    /// context this handle was found in must still be alive (the worker owns both).
    pub fn set(&self, single: u32, batch: u32) {
        // SAFETY: `raw` is the live context's pointer (see `find`), used on the worker thread
        // that owns the context, between decodes.
        unsafe { llama_cpp_sys_2::llama_set_n_threads(self.raw, single as i32, batch as i32) }
    }
}
