//! `rpc-split`: what spreading the model over two boards costs per token. A `phi3d rpc-worker`
//! on a loopback port holds the last half of the layers and the output layer; the `single` run
//! (one stream, greedy) is measured with every layer in the daemon and with that split, the
//! sides alternating, and the medians printed with the ratio split/local. Loopback carries the
//! activations without a wire, so this is the protocol's and the hand-over's cost; a real link
//! adds its round trip (twice per token: there and back) and its transfer time. The worker gets
//! as many threads as the daemon: the two compute in turn, never at once (deploy/README.md,
//! "One model on several boards").

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};

use super::{METRICS, Setup, free_port, median, run_phi3d_with};

/// `phi3d rpc-worker`, killed when dropped.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(setup: &Setup, runs: usize) -> anyhow::Result<()> {
    let endpoint = free_port()?.to_string();
    let mut worker = Worker(
        Command::new(&setup.phi3d)
            .args(["rpc-worker", "--listen", &endpoint, "--threads", &setup.threads.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&endpoint).is_err() {
        if let Some(status) = worker.0.try_wait()? {
            bail!("phi3d rpc-worker exited ({status}) before it listened; run it by hand to see why");
        }
        ensure!(Instant::now() < deadline, "phi3d rpc-worker did not listen on {endpoint}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let split_flags = ["--rpc-worker".to_owned(), endpoint.clone()];
    println!("\nrpc-split: the last half of the layers and the output layer on a phi3d rpc-worker at {endpoint} (loopback), {} threads each", setup.threads);
    let (mut local_runs, mut split_runs) = (Vec::new(), Vec::new());
    let mut same_text = true;
    for run in 0..runs {
        let (local, split) = if run % 2 == 0 {
            let local = run_phi3d_with(setup, &[]).await?;
            (local, run_phi3d_with(setup, &split_flags).await?)
        } else {
            let split = run_phi3d_with(setup, &split_flags).await?;
            (run_phi3d_with(setup, &[]).await?, split)
        };
        same_text &= local.text == split.text;
        local_runs.push(local.figures);
        split_runs.push(split.figures);
    }
    drop(worker);
    let (local, split) = (median(&local_runs), median(&split_runs));
    println!("median of {runs} runs");
    println!("{:<32} {:>12} {:>12} {:>8}", "", "local", "split", "ratio");
    // The split daemon's resident memory is its half; the worker's is not counted.
    for (index, name) in METRICS.iter().enumerate() {
        println!("{name:<32} {:>12.1} {:>12.1} {:>8.2}", local[index], split[index], split[index] / local[index]);
    }
    let per_token = |figures: &[f64]| 1000.0 / figures[3];
    println!(
        "per generated token: {:.2} ms local, {:.2} ms split: the split adds {:.2} ms",
        per_token(&local),
        per_token(&split),
        per_token(&split) - per_token(&local)
    );
    println!("text        {}", if same_text { "identical in every run" } else { "differs between local and split" });
    Ok(())
}
