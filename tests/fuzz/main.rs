//! Property-based fuzzing (proptest) of the parsers that take outside input: the Ollama and
//! OpenAI request bodies, the model's tool-call replies, plugin manifests, the config file and
//! the JSON-schema limits. Nothing they are given may panic; what they refuse is an error.
//!
//! Each target runs `PHI3D_FUZZ_CASES` cases (256 unless set; `.ci/run` sets more) as part of
//! `cargo test`, with fresh random inputs each run, and prints how many it ran:
//! `cargo test --release -p phi3d --test fuzz -- --nocapture`. A failure shows the smallest
//! input proptest shrank it to; add that input as a plain test beside the target.

mod config;
mod http_bodies;
mod manifests;
mod schemas;
mod strategies;
mod tool_replies;

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Cases per target: `PHI3D_FUZZ_CASES`, 256 unless set.
pub fn cases() -> u32 {
    match std::env::var("PHI3D_FUZZ_CASES") {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| panic!("PHI3D_FUZZ_CASES={text:?} is not a number of cases")),
        Err(_) => 256,
    }
}

/// Runs `check` on `cases()` inputs drawn from `strategy`; a panic or an `Err` fails the test
/// with the smallest input found. Returns the number of executions (shrinking included).
pub fn fuzz<S: Strategy>(name: &str, strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>) -> u64
where
    S::Value: std::fmt::Debug,
{
    let config = Config {
        cases: cases(),
        // No files written into the repository: a failure prints its input instead.
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let executions = AtomicU64::new(0);
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |value| {
        executions.fetch_add(1, Ordering::Relaxed);
        check(value)
    });
    let executions = executions.into_inner();
    println!("fuzz {name}: {executions} executions ({} cases)", cases());
    if let Err(failure) = result {
        // Debug: the reason and the smallest failing input.
        panic!("fuzz {name} failed after {executions} executions: {failure:?}");
    }
    executions
}
