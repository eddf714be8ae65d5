//! Generates Phi-3 GGUF models with random weights, for tests that need a model llama.cpp will
//! really load and run: a tiny one that loads and generates in milliseconds, and one with the
//! exact shapes of Phi-3-mini (7.6 GB in F16) for memory and speed checks.
//!
//! The files carry what llama.cpp's phi3 loader reads: the `phi3.*` hyperparameters, a Phi-3
//! tokenizer (generated, or copied from a real Phi-3 GGUF) and the tensors of
//! `llama.cpp/src/models/phi3.cpp`, with fused QKV and fused gate+up projections. Weights are
//! small seeded uniform noise, so output is gibberish, but varied and reproducible: the same spec
//! always gives a byte-identical file.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use sha2::{Digest, Sha256};

use crate::gguf::{GgmlType, GgufFile, GgufWriter, TensorInfo, Value, f32_to_f16};
use crate::vocab::Vocab;

/// Where the tokenizer comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum VocabSource {
    /// The generated Phi-3-style vocabulary of [`crate::vocab`].
    Phi3Style,
    /// The same with Phi-4-mini's tool tags as special tokens ([`Vocab::phi3_with_tool_tags`]).
    Phi3StyleWithToolTags,
    /// Every `tokenizer.*` key of this GGUF file, e.g. a real Phi-3 vocabulary.
    CopyFrom(PathBuf),
}

/// The shape and contents of a generated model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Becomes `general.name` and the file name; must contain "phi3" (or "phi-3"), because
    /// llama.cpp only applies Phi-3's special-token whitespace handling to models so named.
    pub name: String,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_ff: u32,
    pub context_length: u32,
    pub rms_eps: f32,
    pub rope_freq_base: f32,
    /// Phi-3-mini-4k declares 2047; some llama.cpp builds refuse a phi3 model with an unusual
    /// layer count unless the key is present (current ones read it and then disable SWA).
    pub sliding_window: u32,
    /// F32 or F16, for the matrices; norm vectors are always F32, as llama.cpp expects.
    pub weight_type: GgmlType,
    /// Weights are uniform in `-weight_scale..weight_scale`.
    pub weight_scale: f32,
    pub vocab: VocabSource,
    pub seed: u64,
}

impl ModelSpec {
    /// Two layers of width 64: about 9 MB, nearly all of it the two vocabulary-sized matrices and
    /// the vocabulary itself.
    pub fn tiny() -> Self {
        Self {
            name: "phi3-test-tiny".into(),
            n_layer: 2,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 4,
            n_ff: 128,
            context_length: 8192,
            rms_eps: 1e-5,
            rope_freq_base: 10000.0,
            sliding_window: 2047,
            weight_type: GgmlType::F16,
            weight_scale: 0.1,
            vocab: VocabSource::Phi3Style,
            seed: 1,
        }
    }

    /// The shapes of Phi-3-mini-4k-instruct: 3.8 billion parameters, 7.6 GB in F16.
    pub fn phi3_mini() -> Self {
        Self {
            name: "phi3-test-mini".into(),
            n_layer: 32,
            n_embd: 3072,
            n_head: 32,
            n_head_kv: 32,
            n_ff: 8192,
            context_length: 4096,
            weight_scale: 0.02,
            ..Self::tiny()
        }
    }

    fn head_dim(&self) -> u32 {
        self.n_embd / self.n_head
    }

    fn validate(&self) -> anyhow::Result<()> {
        let name = self.name.to_lowercase();
        ensure!(
            name.contains("phi3") || name.contains("phi-3"),
            "model name {:?} must contain \"phi3\"",
            self.name
        );
        ensure!(
            self.n_head > 0 && self.n_embd.is_multiple_of(self.n_head),
            "n_embd must split into n_head heads"
        );
        ensure!(
            self.n_head_kv > 0 && self.n_head.is_multiple_of(self.n_head_kv),
            "n_head must be a multiple of n_head_kv"
        );
        ensure!(
            self.head_dim().is_multiple_of(2),
            "rotary embeddings need an even head size"
        );
        ensure!(
            matches!(self.weight_type, GgmlType::F32 | GgmlType::F16),
            "weights must be F32 or F16"
        );
        Ok(())
    }
}

/// Key holding a digest of the generator's source and the spec, so that [`ensure_model`] can tell
/// a cached file from an outdated one.
const FINGERPRINT_KEY: &str = "phi3d.test_model.fingerprint";

fn fingerprint(spec: &ModelSpec) -> String {
    // Hashing the source catches every change to what would be written, without a version
    // number that someone has to remember to bump.
    let mut h = Sha256::new();
    for source in [
        include_str!("gguf.rs"),
        include_str!("vocab.rs"),
        include_str!("model_gen.rs"),
    ] {
        h.update(source.as_bytes());
    }
    h.update(format!("{spec:?}").as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Declares the metadata and tensors of the model; the data is produced while writing.
fn plan(spec: &ModelSpec) -> anyhow::Result<GgufWriter> {
    spec.validate()?;
    let tokenizer = match &spec.vocab {
        VocabSource::Phi3Style => Vocab::phi3().metadata(),
        VocabSource::Phi3StyleWithToolTags => Vocab::phi3_with_tool_tags().metadata(),
        VocabSource::CopyFrom(path) => {
            let file = GgufFile::open(path)?;
            file.metadata
                .into_iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .collect()
        }
    };
    let n_vocab = tokenizer
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.as_array())
        .map(|a| a.items().len() as u64)
        .context("the vocabulary has no tokenizer.ggml.tokens array")?;

    let mut w = GgufWriter::new();
    let arch = |key: &str| format!("phi3.{key}");
    w.set("general.architecture", Value::str("phi3"));
    w.set("general.name", Value::str(&spec.name));
    let llama_ftype = match spec.weight_type {
        GgmlType::F16 => 1, // LLAMA_FTYPE_MOSTLY_F16
        _ => 0,             // LLAMA_FTYPE_ALL_F32
    };
    w.set("general.file_type", Value::U32(llama_ftype));
    w.set(arch("context_length"), Value::U32(spec.context_length));
    w.set(
        arch("rope.scaling.original_context_length"),
        Value::U32(spec.context_length),
    );
    w.set(arch("embedding_length"), Value::U32(spec.n_embd));
    w.set(arch("feed_forward_length"), Value::U32(spec.n_ff));
    w.set(arch("block_count"), Value::U32(spec.n_layer));
    w.set(arch("attention.head_count"), Value::U32(spec.n_head));
    w.set(arch("attention.head_count_kv"), Value::U32(spec.n_head_kv));
    w.set(
        arch("attention.layer_norm_rms_epsilon"),
        Value::F32(spec.rms_eps),
    );
    w.set(
        arch("attention.sliding_window"),
        Value::U32(spec.sliding_window),
    );
    w.set(arch("rope.dimension_count"), Value::U32(spec.head_dim()));
    w.set(arch("rope.freq_base"), Value::F32(spec.rope_freq_base));
    for (key, value) in tokenizer {
        w.set(key, value);
    }
    w.set(FINGERPRINT_KEY, Value::str(fingerprint(spec)));

    let (n_embd, n_ff) = (u64::from(spec.n_embd), u64::from(spec.n_ff));
    let n_embd_kv = u64::from(spec.head_dim() * spec.n_head_kv);
    let wt = spec.weight_type;
    w.add_tensor("token_embd.weight", &[n_embd, n_vocab], wt)?;
    w.add_tensor("output_norm.weight", &[n_embd], GgmlType::F32)?;
    w.add_tensor("output.weight", &[n_embd, n_vocab], wt)?;
    for i in 0..spec.n_layer {
        let blk = |t: &str| format!("blk.{i}.{t}.weight");
        w.add_tensor(blk("attn_norm"), &[n_embd], GgmlType::F32)?;
        w.add_tensor(blk("attn_qkv"), &[n_embd, n_embd + 2 * n_embd_kv], wt)?;
        w.add_tensor(blk("attn_output"), &[n_embd, n_embd], wt)?;
        w.add_tensor(blk("ffn_norm"), &[n_embd], GgmlType::F32)?;
        w.add_tensor(blk("ffn_up"), &[n_embd, 2 * n_ff], wt)?;
        w.add_tensor(blk("ffn_down"), &[n_ff, n_embd], wt)?;
    }
    Ok(w)
}

/// SplitMix64: tiny, fast, and fixed forever, unlike `rand`'s `StdRng`, whose algorithm may
/// change between releases (and with it every generated file).
struct SplitMix64(u64);

impl SplitMix64 {
    /// Each tensor gets its own stream, so its contents do not depend on the tensors before it.
    fn for_tensor(seed: u64, name: &str) -> Self {
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Self(seed ^ name_hash)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `-1.0..1.0`, from the top 24 bits (all an f32 mantissa holds).
    fn next_signed_unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn fill_tensor(spec: &ModelSpec, t: &TensorInfo, out: &mut dyn Write) -> anyhow::Result<()> {
    // Unit norms leave the random matrices in charge of the output.
    let is_norm = t.name.ends_with("_norm.weight");
    let mut rng = SplitMix64::for_tensor(spec.seed, &t.name);
    let mut next = || {
        if is_norm {
            1.0
        } else {
            rng.next_signed_unit() * spec.weight_scale
        }
    };

    const CHUNK: u64 = 1 << 16;
    let mut buf = Vec::with_capacity(CHUNK as usize * 4);
    let mut left = t.n_elements();
    while left > 0 {
        let n = left.min(CHUNK);
        buf.clear();
        for _ in 0..n {
            match t.ty {
                GgmlType::F16 => buf.extend_from_slice(&f32_to_f16(next()).to_le_bytes()),
                _ => buf.extend_from_slice(&next().to_le_bytes()),
            }
        }
        out.write_all(&buf)?;
        left -= n;
    }
    Ok(())
}

/// A temporary file in `path`'s directory, to be renamed over `path` once complete, so that no
/// reader ever sees half a model.
fn temp_beside(path: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .context("output path has no file name")?
        .to_string_lossy();
    let prefix = format!(".{file_name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // Temporary files are private to their owner; a model is for others to read too, such as a
    // daemon running as another user.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    builder
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))
}

/// Writes the model to `path`, atomically (see [`temp_beside`]).
pub fn write_model(path: &Path, spec: &ModelSpec) -> anyhow::Result<()> {
    write_model_with_progress(path, spec, |_, _| {})
}

/// [`write_model`], reporting `(tensor bytes written, total tensor bytes)` after each tensor.
pub fn write_model_with_progress(
    path: &Path,
    spec: &ModelSpec,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<()> {
    let plan = plan(spec)?;
    let total = plan.tensor_data_len();
    let tmp = temp_beside(path)?;
    let mut done = 0;
    let out = BufWriter::with_capacity(1 << 20, tmp.as_file());
    plan.write(out, |t, out| {
        fill_tensor(spec, t, out)?;
        done += t.byte_len().expect("the plan only holds F32/F16 tensors");
        progress(done, total);
        Ok(())
    })?
    .into_inner()
    .map_err(|e| e.into_error())?
    // Before the rename, so that a crash cannot leave an empty file under the final name.
    .sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("renaming the model to {}", path.display()))?;
    Ok(())
}

/// Returns `<dir>/<spec.name>.gguf`, generating it unless a file made by this very generator
/// from this very spec is already there. Safe to call from concurrent processes: each writes its
/// own temporary file and renames it into place, and all of them write identical bytes. (A
/// vocabulary copied from a file is identified by the file's path, not its contents.)
pub fn ensure_model(dir: &Path, spec: &ModelSpec) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{}.gguf", spec.name));
    let current = GgufFile::open(&path).ok().is_some_and(|f| {
        f.get(FINGERPRINT_KEY).and_then(Value::as_str) == Some(&fingerprint(spec))
    });
    if !current {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_model(&path, spec)?;
    }
    Ok(path)
}

/// Quantization types that [`quantize`] offers (the common ones for Phi-3-mini).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// `Q4_0`: 4.5 bits per weight in blocks of 32.
    Q4_0,
    /// `Q4_K_M`: llama.cpp's mixed K-quant preset (mostly Q4_K, some Q6_K).
    Q4KM,
    /// `Q8_0`: 8.5 bits per weight in blocks of 32; twice Q4's bytes per token, little compute.
    Q8_0,
}

/// Quantizes `src` into `dst` (atomically, see [`temp_beside`]) with llama.cpp's own quantizer,
/// on all cores. llama.cpp logs one line per tensor (to stderr unless a log callback is
/// installed). Tensors whose rows do not split into the type's blocks (the tiny model's 64-wide
/// rows with the 256-wide K-quants) get llama.cpp's fallback type instead.
pub fn quantize(src: &Path, dst: &Path, quantization: Quantization) -> anyhow::Result<()> {
    let c_path = |p: &Path| {
        let s = p
            .to_str()
            .with_context(|| format!("{} is not UTF-8", p.display()))?;
        Ok::<_, anyhow::Error>(std::ffi::CString::new(s)?)
    };
    let tmp = temp_beside(dst)?;
    let (src_c, tmp_c) = (c_path(src)?, c_path(tmp.path())?);
    // SAFETY: llama_backend_init only sets up timers and lookup tables and may be called any
    // number of times, so this is safe even when a `LlamaBackend` exists (whose `init` may only
    // run once per process, so it cannot be used here).
    unsafe { llama_cpp_sys_2::llama_backend_init() };
    // SAFETY: plain struct returned by value.
    let mut params = unsafe { llama_cpp_sys_2::llama_model_quantize_default_params() };
    params.ftype = match quantization {
        Quantization::Q4_0 => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q4_0,
        Quantization::Q4KM => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q4_K_M,
        Quantization::Q8_0 => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q8_0,
    };
    // SAFETY: both paths are NUL-terminated and outlive the call; params is a valid struct.
    let rc =
        unsafe { llama_cpp_sys_2::llama_model_quantize(src_c.as_ptr(), tmp_c.as_ptr(), &params) };
    if rc != 0 {
        bail!(
            "llama.cpp failed to quantize {} to {quantization:?}",
            src.display()
        );
    }
    tmp.persist(dst)
        .with_context(|| format!("renaming the model to {}", dst.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab;
    use llama_cpp_2::context::params::LlamaContextParams;
    use llama_cpp_2::llama_backend::LlamaBackend;
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::model::params::LlamaModelParams;
    use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
    use llama_cpp_2::sampling::LlamaSampler;
    use llama_cpp_2::token::LlamaToken;
    use std::collections::HashSet;
    use std::fs::File;
    use std::num::NonZeroU32;
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    /// llama.cpp may be initialised only once per process, and tests run on parallel threads.
    fn backend() -> &'static LlamaBackend {
        static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
        BACKEND.get_or_init(|| {
            let mut backend = LlamaBackend::init().expect("llama.cpp backend");
            // Loading logs hundreds of lines per model; set PHI3D_TEST_LLAMA_LOGS to see them.
            if std::env::var_os("PHI3D_TEST_LLAMA_LOGS").is_none() {
                backend.void_logs();
            }
            backend
        })
    }

    fn load(path: &Path) -> LlamaModel {
        LlamaModel::load_from_file(backend(), path, &LlamaModelParams::default())
            .unwrap_or_else(|e| panic!("llama.cpp cannot load {}: {e}", path.display()))
    }

    fn tokenize(
        model: &LlamaModel,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Vec<i32> {
        let tokens = model
            .vocab()
            .tokenize(text.as_bytes(), add_special, parse_special);
        tokens.into_iter().map(|t| t.0).collect()
    }

    /// Greedily continues `prompt`; returns the new tokens and the time per generated token.
    fn generate(model: &LlamaModel, prompt: &str, n: usize) -> (Vec<i32>, Duration) {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(256))
            .with_n_batch(256)
            // Tests run in parallel on few cores, and the tiny model gains nothing from more.
            .with_n_threads(1)
            .with_n_threads_batch(1);
        let mut ctx = model.new_context(backend(), params).expect("context");
        let prompt = model.vocab().tokenize(prompt.as_bytes(), true, true);
        let mut batch = LlamaBatch::new(256, 1);
        for (pos, &t) in prompt.iter().enumerate() {
            batch
                .add(t, pos as i32, &[0], pos + 1 == prompt.len())
                .unwrap();
        }
        ctx.decode(&mut batch).expect("decoding the prompt");

        let mut sampler = LlamaSampler::greedy();
        let mut out = Vec::new();
        let start = Instant::now();
        for pos in prompt.len()..prompt.len() + n {
            let t = sampler.sample(&ctx, batch.n_tokens() - 1);
            sampler.accept(t);
            out.push(t.0);
            batch.clear();
            batch.add(t, pos as i32, &[0], true).unwrap();
            ctx.decode(&mut batch).expect("decoding a token");
        }
        (out, start.elapsed() / n as u32)
    }

    fn shared_data() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
    }

    fn real_phi3_vocab() -> Option<PathBuf> {
        let path = shared_data().join("ggml-vocab-phi-3.gguf");
        if path.is_file() {
            Some(path)
        } else {
            crate::skip_outside_repository(format!("{} is absent (the real Phi-3 tokenizer)", path.display()));
            None
        }
    }

    /// llama.cpp's tokenizer test cases: the texts of `.inp` (each followed by a separator line)
    /// and, line by line, the ids of `.out`.
    fn tokenizer_cases(vocab_file: &Path) -> Vec<(String, Vec<i32>)> {
        let read = |ext: &str| fs::read_to_string(vocab_file.with_extension(ext)).unwrap();
        let inp = read("gguf.inp");
        let out = read("gguf.out");
        let texts: Vec<&str> = inp
            .strip_suffix("\n__ggml_vocab_test__\n")
            .expect("trailing separator")
            .split("\n__ggml_vocab_test__\n")
            .collect();
        let ids: Vec<Vec<i32>> = out
            .lines()
            .map(|l| l.split_whitespace().map(|id| id.parse().unwrap()).collect())
            .collect();
        assert_eq!(texts.len(), ids.len(), ".inp and .out disagree");
        texts.into_iter().map(String::from).zip(ids).collect()
    }

    #[test]
    fn phi3_mini_has_the_real_parameter_count() {
        let plan = plan(&ModelSpec::phi3_mini()).unwrap();
        let params: u64 = plan.tensors().iter().map(TensorInfo::n_elements).sum();
        assert_eq!(params, 3_821_079_552, "Phi-3-mini-4k's published size");
        assert_eq!(plan.tensors().len(), 3 + 6 * 32);
        let gb = plan.tensor_data_len() as f64 / 1e9;
        assert!((7.6..7.7).contains(&gb), "{gb} GB");
    }

    #[test]
    fn same_spec_gives_identical_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a.gguf"),
            dir.path().join("b.gguf"),
            dir.path().join("c.gguf"),
        );
        let spec = ModelSpec::tiny();
        write_model(&a, &spec).unwrap();
        write_model(&b, &spec).unwrap();
        write_model(&c, &ModelSpec { seed: 2, ..spec }).unwrap();
        let (a, b, c) = (
            fs::read(a).unwrap(),
            fs::read(b).unwrap(),
            fs::read(c).unwrap(),
        );
        assert!(a == b, "same spec, different bytes");
        assert!(
            a != c && a.len() == c.len(),
            "the seed must change the weights only"
        );
        eprintln!("tiny model: {} bytes", a.len());
        assert!(a.len() < 10_000_000);
    }

    #[test]
    fn written_metadata_and_weights_are_as_specified() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec {
            weight_type: GgmlType::F32,
            ..ModelSpec::tiny()
        };
        let path = dir.path().join("m.gguf");
        write_model(&path, &spec).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get("general.architecture"), Some(&Value::str("phi3")));
        assert_eq!(f.get("phi3.rope.dimension_count"), Some(&Value::U32(16)));
        assert_eq!(
            f.get("phi3.attention.sliding_window"),
            Some(&Value::U32(2047))
        );
        assert_eq!(
            f.get("tokenizer.ggml.eos_token_id"),
            Some(&Value::U32(vocab::ENDOFTEXT))
        );
        assert_eq!(f.tensor("blk.1.attn_qkv.weight").unwrap().dims, [64, 192]);
        assert_eq!(f.tensor("blk.1.ffn_up.weight").unwrap().dims, [64, 256]);
        assert_eq!(f.tensor("token_embd.weight").unwrap().dims, [64, 32064]);

        let mut file = File::open(&path).unwrap();
        let floats = |name: &str, file: &mut File| -> Vec<f32> {
            let bytes = f.read_tensor_data(file, name).unwrap();
            bytes
                .chunks(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        };
        assert!(
            floats("blk.0.ffn_norm.weight", &mut file)
                .iter()
                .all(|&x| x == 1.0)
        );
        let w = floats("blk.0.ffn_down.weight", &mut file);
        assert!(w.iter().all(|x| x.abs() <= spec.weight_scale));
        let mean_abs = w.iter().map(|x| x.abs()).sum::<f32>() / w.len() as f32;
        assert!(
            (mean_abs - spec.weight_scale / 2.0).abs() < 0.005,
            "not uniform: {mean_abs}"
        );

        let bad = ModelSpec {
            name: "tiny".into(),
            ..ModelSpec::tiny()
        };
        assert!(write_model(&dir.path().join("bad.gguf"), &bad).is_err());
    }

    #[test]
    fn ensure_model_reuses_current_files_and_replaces_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::tiny();
        let paths: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| s.spawn(|| ensure_model(dir.path(), &spec).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let path = dir.path().join("phi3-test-tiny.gguf");
        assert!(paths.iter().all(|p| *p == path));
        let entries: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            entries,
            ["phi3-test-tiny.gguf"],
            "temporary files left behind"
        );

        let modified = fs::metadata(&path).unwrap().modified().unwrap();
        ensure_model(dir.path(), &spec).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().modified().unwrap(),
            modified,
            "rewrote a current file"
        );

        let reseeded = ModelSpec { seed: 9, ..spec };
        ensure_model(dir.path(), &reseeded).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(
            f.get(FINGERPRINT_KEY).and_then(Value::as_str),
            Some(fingerprint(&reseeded).as_str())
        );
    }

    #[test]
    fn tiny_model_loads_templates_tokenizes_and_generates() {
        let dir = tempfile::tempdir().unwrap();
        let path = ensure_model(dir.path(), &ModelSpec::tiny()).unwrap();
        let start = Instant::now();
        let model = load(&path);
        let load_time = start.elapsed();
        assert_eq!(model.n_vocab(), 32064);
        assert_eq!(model.n_ctx_train(), 8192);
        assert_eq!(model.n_layer(), 2);

        let template = model
            .chat_template(None)
            .expect("the model has a chat template");
        let chat = [LlamaChatMessage::new("user".into(), "hi".into()).unwrap()];
        let prompt = model.apply_chat_template(&template, &chat, true).unwrap();
        assert_eq!(prompt, "<|user|>\nhi<|end|>\n<|assistant|>\n");

        let vocab = model.vocab();
        assert_eq!(
            tokenize(&model, "<|user|>", false, true),
            [vocab::USER as i32]
        );
        assert_eq!(
            tokenize(&model, "<|end|>", false, true),
            [vocab::END as i32]
        );
        assert_eq!(vocab.bos(), LlamaToken(vocab::BOS as i32));
        assert_eq!(vocab.eos(), LlamaToken(vocab::ENDOFTEXT as i32));
        // No eot key in the file (nor in the real one): llama.cpp picks the first of several
        // known texts it meets in a hash map, so EOT may be either; both end generation.
        assert!(
            [vocab::END, vocab::ENDOFTEXT]
                .map(|t| LlamaToken(t as i32))
                .contains(&vocab.eot())
        );
        assert!(vocab.is_eog(LlamaToken(vocab::END as i32)));
        assert!(vocab.is_eog(LlamaToken(vocab::ENDOFTEXT as i32)));
        assert!(!vocab.is_eog(LlamaToken(vocab::ASSISTANT as i32)));
        // Phi-3 handling (enabled by the "phi3" in the name): the specials after `<s>` swallow
        // the whitespace that follows them.
        let pieces: Vec<String> = tokenize(&model, &prompt, true, true)
            .into_iter()
            .map(|t| {
                vocab
                    .text(LlamaToken(t))
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            pieces,
            ["<s>", "<|user|>", "\u{2581}hi", "<|end|>", "<|assistant|>"]
        );
        let hello = tokenize(&model, "Hello world", false, false);
        let text = String::from_utf8(vocab.detokenize(
            &hello.iter().map(|&t| LlamaToken(t)).collect::<Vec<_>>(),
            false,
            false,
        ))
        .unwrap();
        assert_eq!(text, "Hello world");

        let (generated, per_token) = generate(&model, &prompt, 20);
        let distinct: HashSet<_> = generated.iter().collect();
        eprintln!(
            "tiny model: loaded in {load_time:?}, {per_token:?} per token, {} distinct of {}: {generated:?}",
            distinct.len(),
            generated.len()
        );
        assert!(distinct.len() >= 3, "generation is stuck: {generated:?}");
        // About 0.6 ms on one idle core; the bound only catches pathologies, as tests share cores.
        assert!(
            per_token < Duration::from_millis(250),
            "{per_token:?} per token"
        );
    }

    #[test]
    fn quantized_tiny_models_load_and_generate() {
        let dir = tempfile::tempdir().unwrap();
        let src = ensure_model(dir.path(), &ModelSpec::tiny()).unwrap();
        for (q, qkv_types) in [
            (Quantization::Q4_0, &[GgmlType::Q4_0][..]),
            // 64-wide rows do not split into Q4_K's 256-element blocks: llama.cpp falls back.
            // (Q4_K to Q5_0 = 6, Q5_K to Q5_1 = 7, Q6_K to Q8_0).
            (
                Quantization::Q4KM,
                &[GgmlType(6), GgmlType(7), GgmlType::Q8_0][..],
            ),
        ] {
            let dst = dir.path().join(format!("{q:?}.gguf"));
            backend();
            quantize(&src, &dst, q).unwrap();
            let f = GgufFile::open(&dst).unwrap();
            let qkv = f.tensor("blk.0.attn_qkv.weight").unwrap().ty;
            assert!(qkv_types.contains(&qkv), "{q:?}: attn_qkv is {qkv:?}");
            assert_eq!(
                f.tensor("blk.0.attn_norm.weight").unwrap().ty,
                GgmlType::F32
            );
            let model = load(&dst);
            let (generated, _) = generate(&model, "Hello", 5);
            assert_eq!(generated.len(), 5);
        }
    }

    /// Minutes and 10 GB of disk: `cargo test --release -p phi3d-tests -- --ignored phi3_mini`.
    #[test]
    #[ignore]
    fn phi3_mini_loads_generates_and_quantizes() {
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let f16 = ensure_model(dir.path(), &ModelSpec::phi3_mini()).unwrap();
        eprintln!("phi3-mini F16: written in {:?}", start.elapsed());
        let q4 = dir.path().join("phi3-test-mini-q4_k_m.gguf");
        let start = Instant::now();
        backend();
        quantize(&f16, &q4, Quantization::Q4KM).unwrap();
        eprintln!(
            "phi3-mini Q4_K_M: {} bytes, quantized in {:?}",
            fs::metadata(&q4).unwrap().len(),
            start.elapsed()
        );
        for path in [&f16, &q4] {
            let start = Instant::now();
            let model = load(path);
            assert_eq!(
                (model.n_layer(), model.n_embd(), model.n_vocab()),
                (32, 3072, 32064)
            );
            let loaded = start.elapsed();
            let (generated, per_token) = generate(&model, "Hello", 3);
            eprintln!(
                "{}: loaded in {loaded:?}, {per_token:?} per token: {generated:?}",
                path.display()
            );
        }
    }

    /// Compares llama.cpp's tokenization with the ids of its own test vectors for Phi-3, first
    /// with the real tokenizer copied into a generated model (must match exactly), then with the
    /// generated vocabulary (ids cannot match; reports how often the pieces do).
    #[test]
    fn tokenizer_fidelity_against_real_phi3() {
        let Some(real_path) = real_phi3_vocab() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let cases = tokenizer_cases(&real_path);
        let real_tokens: Vec<String> = match GgufFile::open(&real_path)
            .unwrap()
            .get("tokenizer.ggml.tokens")
        {
            Some(Value::Array(a)) => a
                .items()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect(),
            other => panic!("no token list: {other:?}"),
        };

        let spec = ModelSpec {
            name: "phi3-test-tiny-real-vocab".into(),
            vocab: VocabSource::CopyFrom(real_path.clone()),
            ..ModelSpec::tiny()
        };
        let real = load(&ensure_model(dir.path(), &spec).unwrap());
        for (text, want) in &cases {
            // As llama.cpp's test-tokenizer-0: no BOS, special tokens as plain text.
            assert_eq!(&tokenize(&real, text, false, false), want, "text {text:?}");
        }
        assert_eq!(
            tokenize(&real, "<|user|>", false, true),
            [vocab::USER as i32]
        );

        let ours = load(&ensure_model(dir.path(), &ModelSpec::tiny()).unwrap());
        let pieces = |ids: &[i32], tokens: &dyn Fn(i32) -> String| -> Vec<String> {
            ids.iter().map(|&id| tokens(id)).collect()
        };
        let our_vocab = Vocab::phi3();
        let (mut same_ids, mut same_pieces, mut ours_total, mut real_total) = (0, 0, 0, 0);
        for (text, want) in &cases {
            let got = tokenize(&ours, text, false, false);
            same_ids += usize::from(&got == want);
            let got_pieces = pieces(&got, &|id| our_vocab.tokens[id as usize].clone());
            let want_pieces = pieces(want, &|id| real_tokens[id as usize].clone());
            same_pieces += usize::from(got_pieces == want_pieces);
            ours_total += got.len();
            real_total += want.len();
        }
        eprintln!(
            "generated vocab on llama.cpp's {} Phi-3 test strings: {same_ids} tokenized to the same \
             ids, {same_pieces} to the same pieces; {ours_total} tokens in all vs {real_total} \
             with the real vocab",
            cases.len()
        );
    }
}
