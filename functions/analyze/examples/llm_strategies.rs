//! One LLM call per task, or one call for all tasks? Measured against the mock LLM, served in
//! process, through the production LLM client.
//!
//!     METRICS_DISABLED=true cargo run --release -p analyze --example llm_strategies
//!
//! The mock answers after `ttft_ms` and then spends `token_ms` per output token when streaming,
//! so each request carries a directive that makes it produce the answer length a real model
//! would (estimates of the JSON answers: sentiment 20 tokens, 10 keywords 100, a 3-sentence
//! summary 90, entities 150; the combined answer is their sum plus its wrapper). With
//! 300 ms to the first token and 10 ms per token (a fast hosted model), the wall time of each
//! strategy follows; prompt tokens are what the mock reports (one token per word). The last
//! scenario makes exactly one upstream request fail and counts the tasks left without an
//! answer.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use analyze::llm::TaskSpec;
use analyze::request::{Language, Task};
use futures::StreamExt;
use shared::llm::{ChatMessage, CompletionRequest, LlmClient, OpenAiClient, StreamEvent};

const TEXT: &str = "Serverless computing changes how companies deploy software. Developers \
    write functions and the platform runs them on demand, scaling with the number of requests \
    and billing by the millisecond. Cold starts are the main drawback: a function that loads \
    large dictionaries or models at start-up answers its first request late. Teams keep \
    packages small, load resources lazily and pick languages that start quickly. Rust functions \
    on AWS Lambda typically initialise in tens of milliseconds, and memory use stays low, which \
    also lowers the bill. Contact ops@example.com before 2025-03-01 about the $1,200 pilot.";

const TTFT_MS: u64 = 300;
const TOKEN_MS: u64 = 10;

fn answer_tokens(task: Task) -> u64 {
    match task {
        Task::Sentiment => 20,
        Task::Keywords => 100,
        Task::Summary => 90,
        Task::Entities => 150,
    }
}

fn spec(task: Task) -> TaskSpec {
    TaskSpec {
        task,
        language: Language::En,
        top_k: 10,
        summary_sentences: 3,
    }
}

/// Adds the mock directive that sets the answer's timing and length (the mock strips it from
/// what it echoes; it still counts as prompt words, equally for both strategies).
fn with_timing(mut request: CompletionRequest, tokens: u64, extra: &str) -> CompletionRequest {
    request.messages.push(ChatMessage::user(format!(
        "[mock ttft_ms={TTFT_MS} token_ms={TOKEN_MS} tokens={tokens} {extra}]"
    )));
    request
}

fn per_task_requests(extra: &str) -> Vec<CompletionRequest> {
    Task::ALL
        .iter()
        .map(|&task| {
            with_timing(
                spec(task).request("gpt-4o-mini", TEXT),
                answer_tokens(task),
                extra,
            )
        })
        .collect()
}

/// The alternative: every task's instructions in one system message, one JSON object with a
/// member per task.
fn combined_request(extra: &str) -> CompletionRequest {
    let instructions: Vec<String> = Task::ALL
        .iter()
        .map(|&task| {
            let request = spec(task).request("gpt-4o-mini", TEXT);
            format!("For \"{}\": {}", task.as_str(), request.messages[0].content)
        })
        .collect();
    let system = format!(
        "Answer four tasks in one JSON object with the members sentiment, keywords, summary and \
         entities, each following its own schema.\n{}",
        instructions.join("\n")
    );
    let mut request = CompletionRequest::new(
        "gpt-4o-mini",
        vec![ChatMessage::system(system), ChatMessage::user(TEXT)],
    );
    request.temperature = 0.0;
    request.max_tokens = Task::ALL
        .iter()
        .map(|&t| spec(t).request("gpt-4o-mini", TEXT).max_tokens)
        .sum();
    let tokens = Task::ALL.iter().map(|&t| answer_tokens(t)).sum::<u64>() + 15;
    with_timing(request, tokens, extra)
}

/// Streams one request to its end: (ok, prompt tokens, completion tokens).
async fn run(llm: &OpenAiClient, request: &CompletionRequest) -> (bool, u64, u64) {
    let Ok(mut stream) = llm.stream(request, None).await else {
        return (false, 0, 0);
    };
    while let Some(item) = stream.next().await {
        match item {
            Ok(StreamEvent::Done { usage, .. }) => {
                return (true, usage.prompt_tokens, usage.completion_tokens);
            }
            Ok(StreamEvent::Delta(_)) => {}
            Err(_) => return (false, 0, 0),
        }
    }
    (false, 0, 0)
}

struct Outcome {
    wall: Duration,
    calls: usize,
    prompt_tokens: u64,
    completion_tokens: u64,
    tasks_without_answer: usize,
}

async fn per_task(llm: &OpenAiClient, extra: &str) -> Outcome {
    let requests = per_task_requests(extra);
    let started = Instant::now();
    let results = futures::future::join_all(requests.iter().map(|r| run(llm, r))).await;
    Outcome {
        wall: started.elapsed(),
        calls: requests.len(),
        prompt_tokens: results.iter().map(|r| r.1).sum(),
        completion_tokens: results.iter().map(|r| r.2).sum(),
        tasks_without_answer: results.iter().filter(|r| !r.0).count(),
    }
}

async fn combined(llm: &OpenAiClient, extra: &str) -> Outcome {
    let request = combined_request(extra);
    let started = Instant::now();
    let (ok, prompt, completion) = run(llm, &request).await;
    Outcome {
        wall: started.elapsed(),
        calls: 1,
        prompt_tokens: prompt,
        completion_tokens: completion,
        tasks_without_answer: if ok { 0 } else { Task::ALL.len() },
    }
}

fn show(name: &str, outcome: &Outcome) {
    println!(
        "{name:<34} {:>8.0} {:>6} {:>14} {:>18} {:>22}",
        outcome.wall.as_secs_f64() * 1000.0,
        outcome.calls,
        outcome.prompt_tokens,
        outcome.completion_tokens,
        outcome.tasks_without_answer
    );
}

#[tokio::main]
async fn main() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let state = Arc::new(mock_llm::MockState::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mock_llm::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    let base_url = format!("http://{address}/v1");
    let config = shared::Config::from_lookup(|name| match name {
        "OPENAI_BASE_URL" => Some(base_url.clone()),
        "OPENAI_API_KEY" => Some("mock-key".to_owned()),
        "LLM_TIMEOUT_MS" => Some("20000".to_owned()),
        _ => name.ends_with("_TABLE").then(|| format!("bench-{name}")),
    })
    .unwrap();
    let llm = OpenAiClient::from_config(&config).unwrap();

    println!(
        "mock LLM: {TTFT_MS} ms to the first token, {TOKEN_MS} ms per output token; {} chars of English",
        TEXT.chars().count()
    );
    println!(
        "{:<34} {:>8} {:>6} {:>14} {:>18} {:>22}",
        "strategy",
        "wall ms",
        "calls",
        "prompt tokens",
        "completion tokens",
        "tasks without answer"
    );
    // Warm the connection pool so neither strategy pays the first connect.
    let _ = per_task(&llm, "").await;
    show("one call per task (concurrent)", &per_task(&llm, "").await);
    show("one call for all tasks", &combined(&llm, "").await);
    let key = format!("strategy-{}", std::process::id());
    show(
        "per task, one upstream failure",
        &per_task(&llm, &format!("fault=malformed times=1 key={key}-a")).await,
    );
    show(
        "all in one, one upstream failure",
        &combined(&llm, &format!("fault=malformed times=1 key={key}-b")).await,
    );
    let _ = stop.send(());
    let _ = server.await;
}
