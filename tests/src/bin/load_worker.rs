//! One client process of the load test (`tests/reliability_load.rs` starts several).
//!
//! Usage: `load-worker <plan.json> <worker index> <outcomes.json>`. Runs the worker's share of
//! the plan against the stack and writes its outcomes as one JSON array.

use std::io::Write;
use std::process::ExitCode;

use integration_tests::load::{LoadPlan, run_worker};

fn fail(message: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "load-worker: {message}");
    ExitCode::FAILURE
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [plan_path, worker, out_path] = args.as_slice() else {
        return fail("usage: load-worker <plan.json> <worker index> <outcomes.json>");
    };
    let Ok(worker) = worker.parse::<usize>() else {
        return fail("the worker index must be a number");
    };
    let plan: LoadPlan = match std::fs::read(plan_path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(plan) => plan,
        Err(err) => return fail(&format!("cannot read the plan {plan_path}: {err}")),
    };
    let outcomes = run_worker(&plan, worker).await;
    match serde_json::to_vec(&outcomes)
        .map_err(|e| e.to_string())
        .and_then(|bytes| std::fs::write(out_path, bytes).map_err(|e| e.to_string()))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&format!("cannot write {out_path}: {err}")),
    }
}
