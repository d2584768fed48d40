//! Cold-start cost of the analyze function: init time and memory of the function itself and of
//! each dictionary of the local methods, then the first (cold) and a repeated (warm) local
//! analysis through the router, in Chinese and in English.
//!
//!     cargo run --release -p analyze --example coldstart [-- --runs 5]
//!
//! Every run is a fresh process (this binary re-executes itself), because a dictionary loads
//! once per process: one kind of process times the function's init and each dictionary on its
//! own, the other serves requests the way an instance does (English, then Chinese, then the
//! longest accepted texts). The table shows the median of the runs. RSS is the resident set
//! read from /proc/self/status after each step (Linux only).
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use analyze::local::{LocalAnalyzer, Resource};
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use shared::auth::{ApiKeyRecord, ApiKeyStore, InMemoryApiKeys, Tier, hash_api_key};
use shared::llm::{ModelRegistry, ScriptedLlm};
use shared::services::Services;
use tower::ServiceExt;

const KEY: &str = "gwk_bench";

const ZH: &str = include_str!("../tests/fixtures/zh_paragraphs.txt");
const EN: &str = "Serverless computing changes how companies deploy software. Developers write \
    functions and the platform runs them on demand, scaling with the number of requests and \
    billing by the millisecond. Cold starts are the main drawback: a function that loads large \
    dictionaries or models at start-up answers its first request late. Teams keep packages \
    small, load resources lazily and pick languages that start quickly. Rust functions on AWS \
    Lambda typically initialise in tens of milliseconds, and memory use stays low, which also \
    lowers the bill. Contact ops@example.com before 2025-03-01 for the $1,200 pilot.";

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn config(lookup: &[(&str, &str)]) -> shared::Config {
    let owned: Vec<(String, String)> = lookup
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    shared::Config::from_lookup(|name| {
        owned
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| name.ends_with("_TABLE").then(|| format!("bench-{name}")))
    })
    .unwrap()
}

/// One measured step: name, milliseconds, RSS after it in KiB.
type Step = (String, f64, u64);

async fn analyze_once(router: &axum::Router, content: &str, nonce: usize) -> Duration {
    let body = serde_json::json!({"content": content, "mode": "local", "top_k": 10});
    let started = Instant::now();
    let response = router
        .clone()
        .oneshot(
            Request::post("/analyze")
                .header("x-api-key", KEY)
                .header("content-type", "application/json")
                // Each measurement must compute, never hit the response cache.
                .header("cache-control", "no-cache")
                .header("x-request-id", format!("bench-{nonce}"))
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.into_body().collect().await.unwrap();
    started.elapsed()
}

/// The function's own init, then each dictionary loaded on its own.
async fn resources_child() -> Vec<Step> {
    let mut steps: Vec<Step> = vec![("process start".into(), 0.0, rss_kib())];
    // The production wiring, as main.rs does it (dummy AWS settings: nothing is contacted).
    let started = Instant::now();
    let production = Services::from_config(config(&[("OPENAI_API_KEY", "sk-bench")]))
        .await
        .unwrap();
    let router = analyze::app(production);
    steps.push((
        "init: Services::from_config + app (main.rs)".into(),
        ms(started.elapsed()),
        rss_kib(),
    ));
    drop(router);
    let local = LocalAnalyzer::new();
    for resource in Resource::ALL {
        let took = local.load(resource);
        steps.push((format!("load {}", resource.as_str()), ms(took), rss_kib()));
    }
    steps
}

/// Requests through the router as an instance sees them: English first (English resources
/// only), then Chinese (jieba and its IDF table load inside the first one), then the longest
/// accepted texts.
async fn requests_child() -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let keys = Arc::new(InMemoryApiKeys::new());
    keys.put(&ApiKeyRecord::new(
        hash_api_key(KEY),
        "bench",
        Tier::Enterprise,
    ))
    .await
    .unwrap();
    let llm = Arc::new(ScriptedLlm::new(ModelRegistry::builtin().unwrap()));
    let services = Services::in_memory(config(&[]), llm, keys).unwrap();
    let router = analyze::app_with_local(services, Arc::new(LocalAnalyzer::new()));
    steps.push(("router built (in-memory stores)".into(), 0.0, rss_kib()));
    let zh_2k: String = ZH.lines().take(12).collect::<Vec<_>>().join("\n");
    for (label, content) in [("en", EN.to_owned()), ("zh", zh_2k)] {
        let chars = content.chars().count();
        let cold = analyze_once(&router, &content, 0).await;
        steps.push((
            format!("first {label} request, all tasks, {chars} chars (loads its dictionaries)"),
            ms(cold),
            rss_kib(),
        ));
        let warm = analyze_once(&router, &content, 1).await;
        steps.push((
            format!("warm {label} request, all tasks, {chars} chars"),
            ms(warm),
            rss_kib(),
        ));
    }
    let zh_50k: String = ZH.repeat(50).chars().take(50_000).collect();
    let en_50k: String = EN.repeat(100).chars().take(50_000).collect();
    for (label, content) in [("zh", zh_50k), ("en", en_50k)] {
        let took = analyze_once(&router, &content, 2).await;
        steps.push((
            format!("warm {label} request, all tasks, 50000 chars"),
            ms(took),
            rss_kib(),
        ));
    }
    steps
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let steps = match args.get(i + 1).map(String::as_str) {
            Some("resources") => runtime.block_on(resources_child()),
            _ => runtime.block_on(requests_child()),
        };
        println!("{}", serde_json::to_string(&steps).unwrap());
        return;
    }
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(5);
    let exe = std::env::current_exe().unwrap();
    let mut order: Vec<String> = Vec::new();
    let mut times: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut rss: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for kind in ["resources", "requests"] {
        for _ in 0..runs {
            let output = Command::new(&exe)
                .arg("--child")
                .arg(kind)
                .env("AWS_REGION", "us-east-1")
                .env("AWS_ACCESS_KEY_ID", "bench")
                .env("AWS_SECRET_ACCESS_KEY", "bench")
                .env("AWS_ENDPOINT_URL_DYNAMODB", "http://127.0.0.1:9")
                .env("METRICS_DISABLED", "true")
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let line = String::from_utf8_lossy(&output.stdout);
            let steps: Vec<Step> =
                serde_json::from_str(line.lines().last().unwrap_or("[]")).unwrap();
            for (name, took, kib) in steps {
                if !times.contains_key(&name) {
                    order.push(name.clone());
                }
                times.entry(name.clone()).or_default().push(took);
                rss.entry(name).or_default().push(kib as f64);
            }
        }
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!("analyze cold start, {profile} build, median of {runs} fresh processes");
    println!("{:<72} {:>10} {:>12}", "step", "ms", "RSS after");
    for name in order {
        let took = median(times.get_mut(&name).unwrap());
        let kib = median(rss.get_mut(&name).unwrap());
        println!("{name:<72} {took:>10.1} {:>9.1} MiB", kib / 1024.0);
    }
}
