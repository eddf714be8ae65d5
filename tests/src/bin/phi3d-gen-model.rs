//! `phi3d-gen-model`: writes a generated Phi-3 GGUF test model (random weights, Phi-3 tokenizer),
//! optionally quantized by llama.cpp, e.g. to try phi3d on a Phi-3-mini-sized model without
//! downloading one:
//!
//! ```text
//! phi3d-gen-model --shape phi3-mini --quantize q4_k_m phi3-mini-q4_k_m.gguf
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Parser, ValueEnum};
use phi3d_tests::model_gen::{self, ModelSpec, Quantization, VocabSource};

#[derive(Parser)]
#[command(about = "Write a generated Phi-3 GGUF model with random weights")]
struct Args {
    /// Model shape: `tiny` (2 layers, ~9 MB) or `phi3-mini` (Phi-3-mini's shapes, 7.6 GB in F16).
    #[arg(long, value_enum)]
    shape: Shape,
    /// Quantize the F16 model with llama.cpp (takes minutes for phi3-mini).
    #[arg(long, value_enum)]
    quantize: Option<Quant>,
    /// Copy every `tokenizer.*` key from this GGUF file (e.g. a real Phi-3 vocabulary) instead
    /// of using the generated Phi-3-style vocabulary.
    #[arg(long, value_name = "FILE")]
    vocab_from: Option<PathBuf>,
    /// Seed for the weights (the same seed and options give a byte-identical F16 file).
    #[arg(long)]
    seed: Option<u64>,
    /// Where to write the model.
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shape {
    Tiny,
    Phi3Mini,
}

#[derive(Clone, Copy, ValueEnum)]
enum Quant {
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k_m")]
    Q4KM,
    #[value(name = "q8_0")]
    Q8_0,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut spec = match args.shape {
        Shape::Tiny => ModelSpec::tiny(),
        Shape::Phi3Mini => ModelSpec::phi3_mini(),
    };
    if let Some(path) = args.vocab_from {
        spec.vocab = VocabSource::CopyFrom(path);
    }
    if let Some(seed) = args.seed {
        spec.seed = seed;
    }
    let start = Instant::now();

    match args.quantize {
        None => write(&args.out, &spec)?,
        Some(quant) => {
            let dir = args
                .out
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            // Next to the output, where there is room for a model (unlike, often, /tmp).
            let f16 = tempfile::Builder::new()
                .suffix(".f16.gguf")
                .tempfile_in(dir)?;
            write(f16.path(), &spec)?;
            let (quantization, name) = match quant {
                Quant::Q4_0 => (Quantization::Q4_0, "q4_0"),
                Quant::Q4KM => (Quantization::Q4KM, "q4_k_m"),
                Quant::Q8_0 => (Quantization::Q8_0, "q8_0"),
            };
            println!("quantizing to {name} with llama.cpp (it logs each tensor to stderr)");
            model_gen::quantize(f16.path(), &args.out, quantization)?;
        }
    }

    let size = std::fs::metadata(&args.out)?.len();
    println!(
        "wrote {} ({:.2} GB) in {:.1} s",
        args.out.display(),
        size as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes the unquantized model, printing a line at every tenth of the tensor data.
fn write(path: &Path, spec: &ModelSpec) -> anyhow::Result<()> {
    println!(
        "writing {} ({} layers, n_embd {}, {} heads, n_ff {}, {} weights) to {}",
        spec.name,
        spec.n_layer,
        spec.n_embd,
        spec.n_head,
        spec.n_ff,
        spec.weight_type,
        path.display()
    );
    let mut next_tenth = 1;
    model_gen::write_model_with_progress(path, spec, |done, total| {
        while done * 10 >= total * next_tenth && next_tenth <= 10 {
            println!(
                "  {:3}%  {} / {} MB",
                next_tenth * 10,
                done / 1_000_000,
                total / 1_000_000
            );
            next_tenth += 1;
        }
    })
}
