//! The neighbour scenario: decode and prompt speed while another process computes on the same
//! cores, as Home Assistant and a voice pipeline do on a board.
//!
//! For each neighbour load (in cores: 0, half of one core, one core, and on machines with more
//! than two cores all cores but one), the bench starts a neighbour (this bench binary again,
//! computing in 20 ms bursts), then measures, in an order that alternates between runs: the
//! raw llama.cpp loop at every fixed thread count, phi3d in its default configuration
//! (threads chosen per step), phi3d with the thread count fixed at the cores (how it ran before
//! it chose), and llama-server with its thread count at the cores when `LLAMA_SERVER` is set.
//! A daemon is measured warm, as a long-running one is: one request first, then the measured
//! one, both beside the neighbour. The figures are medians over the runs; the ratios compare
//! phi3d with the best fixed-thread raw loop under the same neighbour.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llama_cpp_2::llama_backend::LlamaBackend;
use phi3d_proto::v1::GetStatusRequest;
use phi3d_proto::v1::admin_client::AdminClient;

use super::scenarios::{LlamaServer, Phi3d, Server};
use super::{Setup, median_value, run_baseline};

/// A process that keeps `cores` cores busy (a fraction: bursts of 20 ms, then a pause);
/// killed when dropped.
pub struct Neighbour {
    child: Child,
}

/// The hidden option with which the bench runs as a neighbour.
pub const NEIGHBOUR_FLAG: &str = "--neighbour-cores";

impl Neighbour {
    /// `nice`: the neighbour's niceness (above 0, it yields to the sides measured, as when
    /// phi3d's unit gets `Nice=` below the neighbour's or a larger `CPUWeight=`).
    pub fn start(cores: f64, nice: i32) -> anyhow::Result<Option<Neighbour>> {
        if cores <= 0.0 {
            return Ok(None);
        }
        let child = Command::new("nice")
            .args(["-n", &nice.to_string()])
            .arg(std::env::current_exe()?)
            .args([NEIGHBOUR_FLAG, &cores.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        // Give its threads a moment to start.
        std::thread::sleep(Duration::from_millis(200));
        Ok(Some(Neighbour { child }))
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The neighbour's own work, in this process: one thread per started core, each computing
/// for 20 ms at a time and pausing for what is left of its share.
pub fn be_a_neighbour(cores: f64) -> ! {
    const BURST: Duration = Duration::from_millis(20);
    let threads = cores.ceil() as usize;
    for index in 0..threads {
        let share = (cores - index as f64).clamp(0.0, 1.0);
        std::thread::spawn(move || {
            let pause = BURST.mul_f64((1.0 - share) / share.max(0.01));
            let mut x = 1u64;
            loop {
                let started = Instant::now();
                while started.elapsed() < BURST {
                    for _ in 0..1000 {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                }
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
        });
    }
    loop {
        std::thread::park();
    }
}

/// The neighbour loads to measure on this machine, in cores.
pub fn default_loads() -> Vec<f64> {
    let cores = num_cpus::get();
    let mut loads = vec![0.0, 0.5, 1.0];
    if cores > 2 {
        loads.push((cores - 1) as f64);
    }
    loads
}

/// One side's figures under one neighbour: decode tok/s, prompt tok/s, and for phi3d the
/// threads it used (single-token steps).
#[derive(Clone, Copy, Default)]
struct Figures {
    decode: f64,
    prompt: f64,
    threads: u32,
}

pub async fn run(
    backend: &LlamaBackend,
    setup: &Setup,
    loads: &[f64],
    nice: i32,
    runs: usize,
    llama_server: Option<&Path>,
) -> anyhow::Result<()> {
    let max = setup.threads;
    println!(
        "\nneighbours: a process computing in 20 ms bursts beside each side (nice {nice}); prompt {} tokens, \
         generate {}, up to {max} threads, {runs} run(s), medians",
        setup.tokens.len(),
        setup.gen_tokens
    );
    let mut idle_best = None;
    for &load in loads {
        // sides: raw at 1..=max threads, phi3d adaptive, phi3d fixed, llama-server.
        let sides = max as usize + 2 + usize::from(llama_server.is_some());
        let mut measured: Vec<Vec<Figures>> = vec![Vec::new(); sides];
        for run in 0..runs {
            let _neighbour = Neighbour::start(load, nice)?;
            let mut order: Vec<usize> = (0..sides).collect();
            if run % 2 == 1 {
                order.reverse();
            }
            for side in order {
                let figures = if side < max as usize {
                    raw(backend, setup, side as u32 + 1)?
                } else if side == max as usize {
                    daemon(setup, None).await?
                } else if side == max as usize + 1 {
                    daemon(setup, Some(max)).await?
                } else {
                    peer(llama_server.expect("a side for it"), setup).await?
                };
                measured[side].push(figures);
            }
        }
        let medians: Vec<Figures> = measured.iter().map(|runs| median(runs)).collect();
        let best_raw = medians[..max as usize].iter().copied().max_by(|a, b| a.decode.total_cmp(&b.decode)).unwrap_or_default();
        let best_raw_prompt = medians[..max as usize].iter().map(|f| f.prompt).fold(0.0, f64::max);
        let adaptive = medians[max as usize];
        if load == 0.0 {
            idle_best = Some(adaptive.decode);
        }
        println!("\nneighbour at {load} core(s)          decode tok/s   prompt tok/s   decode vs best raw   prompt vs best raw");
        let line = |name: String, figures: Figures| {
            println!(
                "{name:<36}{:>12.2}{:>15.2}{:>21.2}{:>21.2}",
                figures.decode,
                figures.prompt,
                figures.decode / best_raw.decode,
                figures.prompt / best_raw_prompt
            );
        };
        for threads in 1..=max {
            line(format!("raw loop, {threads} thread(s)"), medians[threads as usize - 1]);
        }
        line(format!("phi3d default (chose {} thread(s))", adaptive.threads), adaptive);
        line(format!("phi3d, threads fixed at {max}"), medians[max as usize + 1]);
        if llama_server.is_some() {
            line(format!("llama-server, -t {max}"), medians[max as usize + 2]);
        }
        if let Some(idle) = idle_best.filter(|_| load > 0.0) {
            println!("phi3d default keeps {:.2} of its idle decode speed", adaptive.decode / idle);
        }
    }
    Ok(())
}

fn raw(backend: &LlamaBackend, setup: &Setup, threads: u32) -> anyhow::Result<Figures> {
    let mut with_threads = setup.clone();
    with_threads.threads = threads;
    let measured = run_baseline(backend, &with_threads)?;
    // decode: tokens after the first over their time; prompt: over the time to first token.
    Ok(Figures { decode: measured.figures[3], prompt: setup.tokens.len() as f64 / (measured.figures[2] / 1000.0), threads })
}

/// A warm daemon: one request, then the measured one.
async fn daemon(setup: &Setup, threads: Option<u32>) -> anyhow::Result<Figures> {
    let cache = tempfile::tempdir()?;
    let phi3d = Phi3d::start_with(setup, 1, cache.path(), threads, &[]).await?;
    // Distinct prompts, so that the measured one finds nothing cached.
    phi3d.complete(&format!("Warm up: {}", setup.prompt), setup.gen_tokens).await?;
    let figures = phi3d.complete(&format!("Measure: {}", setup.prompt), setup.gen_tokens).await?;
    let status = AdminClient::new(phi3d.channel()).get_status(GetStatusRequest {}).await?.into_inner();
    Ok(Figures {
        decode: figures.decode_tok_s,
        prompt: figures.prompt_tokens as f64 / (figures.first_token_ms / 1000.0),
        threads: status.threads.map_or(0, |threads| threads.single),
    })
}

async fn peer(binary: &Path, setup: &Setup) -> anyhow::Result<Figures> {
    let server = LlamaServer::start(binary, setup, 1).await?;
    server.complete(&format!("Warm up: {}", setup.prompt), setup.gen_tokens).await?;
    let figures = server.complete(&format!("Measure: {}", setup.prompt), setup.gen_tokens).await?;
    Ok(Figures {
        decode: figures.decode_tok_s,
        prompt: figures.prompt_tokens as f64 / (figures.first_token_ms / 1000.0),
        threads: setup.threads,
    })
}

fn median(runs: &[Figures]) -> Figures {
    let pick = |value: fn(&Figures) -> f64| median_value(runs.iter().map(value).collect());
    let mut threads: Vec<u32> = runs.iter().map(|figures| figures.threads).collect();
    threads.sort_unstable();
    Figures { decode: pick(|f| f.decode), prompt: pick(|f| f.prompt), threads: threads[threads.len() / 2] }
}
