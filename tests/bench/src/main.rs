//! `inproc [--iterations N] [--warmup N]`: runs every in-process scenario and prints one JSON
//! document (`{"scenarios": [...]}`) with p50/p90/p99/mean/max in microseconds.

use std::io::Write;

use bench::{Harness, Scenario, summarize};

fn arg(args: &[String], name: &str, default: usize) -> Result<usize, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a number")),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let iterations = arg(&args, "--iterations", 10_000)?;
    let warmup = arg(&args, "--warmup", 500)?;
    let mut summaries = Vec::new();
    for scenario in Scenario::ALL {
        // A fresh harness per scenario: the in-memory stores start empty each time.
        let harness = Harness::new()?;
        let samples = harness.run(scenario, warmup, iterations).await?;
        summaries.push(summarize(scenario, samples));
    }
    let document = serde_json::json!({
        "iterations": iterations,
        "warmup": warmup,
        "runtime": "tokio current_thread",
        "scenarios": summaries,
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{document}")?;
    Ok(())
}
