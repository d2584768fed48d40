//! The OpenAI-compatible LLM client against the real mock LLM (infra/mock-llm), served
//! in-process on an ephemeral loopback port, one server per test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mock_llm::MockState;
use serde_json::Value;
use shared::ApiError;
use shared::config::{LlmSettings, Secret};
use shared::llm::{
    ChatMessage, CompletionRequest, LlmClient, ModelRegistry, OpenAiClient, ScriptedLlm,
    StreamEvent, Usage, cost_usd,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

// --- harness ---------------------------------------------------------------------------------

/// A running mock; dropping it shuts the server down.
struct Mock {
    base: String,
    http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

async fn start_mock() -> Mock {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(mock_llm::serve(
        listener,
        Arc::new(MockState::new()),
        async move {
            let _ = stopped.await;
        },
    ));
    Mock {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        _stop: stop,
    }
}

fn test_registry_path() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models.test.toml"))
}

fn settings(base_url: &str, timeout: Duration) -> LlmSettings {
    LlmSettings {
        base_url: format!("{base_url}/v1"),
        api_key: Some(Secret::new("test-key")),
        timeout,
        registry_path: Some(test_registry_path()),
        default_model: None,
    }
}

fn client_for(settings: &LlmSettings) -> OpenAiClient {
    let registry = ModelRegistry::load(settings).unwrap();
    OpenAiClient::new(settings, registry).unwrap()
}

impl Mock {
    fn client(&self) -> OpenAiClient {
        self.client_with_timeout(Duration::from_secs(10))
    }

    fn client_with_timeout(&self, timeout: Duration) -> OpenAiClient {
        client_for(&settings(&self.base, timeout))
    }

    async fn get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    /// Upstream requests per model, as the mock counted them.
    async fn calls_by_model(&self) -> BTreeMap<String, u64> {
        serde_json::from_value(self.get("/mock/stats").await["by_model"].clone()).unwrap()
    }

    async fn total_calls(&self) -> u64 {
        self.get("/mock/stats").await["total"].as_u64().unwrap()
    }

    async fn last_request_body(&self) -> Value {
        self.get("/mock/requests?limit=1").await[0]["body"].clone()
    }

    async fn reset(&self) {
        let response = self
            .http
            .post(format!("{}/mock/reset", self.base))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }
}

fn ask(model: &str, text: &str) -> CompletionRequest {
    CompletionRequest::new(model, vec![ChatMessage::user(text)])
}

fn calls(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(m, n)| ((*m).to_owned(), *n)).collect()
}

fn assert_close(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() < 1e-15,
        "cost {actual} != expected {expected}"
    );
}

// --- retries, timeouts, fallback -------------------------------------------------------------

#[tokio::test]
async fn rate_limited_twice_then_succeeds_on_the_third_attempt_after_retry_after() {
    let mock = start_mock().await;
    let started = Instant::now();
    let done = mock
        .client()
        .complete(
            &ask(
                "gpt-4o-mini",
                "hi [mock fault=429 times=2 key=twice retry_after=1]",
            ),
            None,
        )
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(done.attempts, 3);
    assert!(!done.fell_back);
    assert_eq!(done.model, "gpt-4o-mini");
    // Two waits of at least the upstream's Retry-After (1 s each).
    assert!(elapsed >= Duration::from_secs(2), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(mock.calls_by_model().await, calls(&[("gpt-4o-mini", 3)]));
}

#[tokio::test]
async fn hanging_upstream_is_a_504_after_three_timed_out_attempts() {
    let mock = start_mock().await;
    let client = mock.client_with_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = client
        .complete(&ask("gpt-4o-mini", "[mock fault=hang hang_ms=5000]"), None)
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, ApiError::UpstreamTimeout), "{err:?}");
    assert_eq!(err.status().as_u16(), 504);
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    // 3 x 300 ms plus at most 200 + 400 ms of backoff, with slack for a loaded machine.
    assert!(elapsed < Duration::from_millis(2500), "{elapsed:?}");
    assert_eq!(mock.total_calls().await, 3);
}

#[tokio::test]
async fn transient_failures_fall_back_once_to_the_registry_fallback() {
    let mock = start_mock().await;
    let client = mock.client();
    let mini = client.registry().resolve("gpt-4o-mini").unwrap().clone();
    for model in ["mock-fault-500", "mock-fault-503", "mock-fault-cut"] {
        mock.reset().await;
        let done = client.complete(&ask(model, "hello"), None).await.unwrap();
        assert!(done.fell_back, "{model}");
        assert_eq!(done.model, "gpt-4o-mini", "{model}");
        assert_eq!(done.attempts, 4, "{model}");
        assert_eq!(done.cost_usd, cost_usd(&mini, &done.usage), "{model}");
        assert_eq!(
            mock.calls_by_model().await,
            calls(&[(model, 3), ("gpt-4o-mini", 1)]),
            "{model}"
        );
    }
}

#[tokio::test]
async fn persistent_500_is_a_502_after_three_attempts_and_one_fallback_try() {
    let mock = start_mock().await;
    // The directive applies to every model, so the fallback fails too.
    let err = mock
        .client()
        .complete(&ask("mock-fault-500", "[mock fault=500]"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::UpstreamFailed { .. }), "{err:?}");
    assert_eq!(err.status().as_u16(), 502);
    assert_eq!(
        mock.calls_by_model().await,
        calls(&[("mock-fault-500", 3), ("gpt-4o-mini", 1)])
    );
}

#[tokio::test]
async fn context_length_exceeded_is_a_400_without_retry_or_fallback() {
    let mock = start_mock().await;
    // gpt-4o has a fallback: it must not be used for a non-transient error.
    let err = mock
        .client()
        .complete(&ask("gpt-4o", "[mock fault=context]"), None)
        .await
        .unwrap_err();
    assert_eq!(err.status().as_u16(), 400);
    assert!(
        matches!(
            err,
            ApiError::BadRequest {
                code: "context_length_exceeded",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(mock.calls_by_model().await, calls(&[("gpt-4o", 1)]));
}

#[tokio::test]
async fn malformed_response_is_a_502_without_retry() {
    let mock = start_mock().await;
    let err = mock
        .client()
        .complete(&ask("mock-fault-malformed", "hello"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::UpstreamFailed { .. }), "{err:?}");
    assert_eq!(err.status().as_u16(), 502);
    assert_eq!(mock.total_calls().await, 1);
}

#[tokio::test]
async fn deadline_closer_than_retry_after_fails_fast_instead_of_sleeping() {
    let mock = start_mock().await;
    let started = Instant::now();
    let err = mock
        .client()
        .complete(
            &ask("gpt-4o-mini", "[mock fault=429 retry_after=5]"),
            Some(started + Duration::from_millis(500)),
        )
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(
            err,
            ApiError::UpstreamRateLimited {
                retry_after_secs: Some(5)
            }
        ),
        "{err:?}"
    );
    assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
    assert_eq!(mock.total_calls().await, 1);
}

#[tokio::test]
async fn deadline_closer_than_retry_after_goes_straight_to_the_fallback() {
    let mock = start_mock().await;
    let started = Instant::now();
    let done = mock
        .client()
        .complete(
            &ask("mock-fault-429", "[mock retry_after=5]"),
            Some(started + Duration::from_secs(1)),
        )
        .await
        .unwrap();
    assert!(done.fell_back);
    assert_eq!(done.model, "gpt-4o-mini");
    assert_eq!(done.attempts, 2);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn deadline_already_too_close_is_a_504_without_calling_upstream() {
    let mock = start_mock().await;
    let err = mock
        .client()
        .complete(
            &ask("gpt-4o-mini", "hello"),
            Some(Instant::now() + Duration::from_millis(50)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::UpstreamTimeout), "{err:?}");
    assert_eq!(mock.total_calls().await, 0);
}

// --- answers, usage and cost -----------------------------------------------------------------

#[tokio::test]
async fn completion_reports_provider_usage_priced_with_the_registry() {
    let mock = start_mock().await;
    let mut req = CompletionRequest::new(
        // An alias: the canonical id is what goes upstream and what is reported.
        "gpt-4o-2024-08-06",
        vec![
            ChatMessage::system("Be brief."),
            ChatMessage::user("Say hello"),
        ],
    );
    req.max_tokens = 50_000;
    req.seed = Some(7);
    let done = mock.client().complete(&req, None).await.unwrap();
    // The mock counts one token per word plus 4 per message: (2+4) + (2+4); 12 words back.
    assert_eq!(done.usage, Usage::reported(12, 12));
    assert_eq!(done.model, "gpt-4o");
    assert_eq!(done.finish_reason, "stop");
    assert_eq!((done.attempts, done.fell_back), (1, false));
    assert!(done.content.starts_with("[mock] messages=2 last=Say hello"));
    // gpt-4o: $0.0025 / 1K input, $0.01 / 1K output.
    assert_close(done.cost_usd, 12.0 * 0.0025 / 1000.0 + 12.0 * 0.01 / 1000.0);
    assert_close(done.cost_usd, 0.00015);

    let body = mock.last_request_body().await;
    assert_eq!(body["model"], "gpt-4o");
    assert_eq!(body["max_completion_tokens"], 16384, "clamped to the model");
    assert_eq!(body["seed"], 7);
    assert_eq!(body["messages"][0]["role"], "system");
    assert!(body.get("stream").is_none());
}

#[tokio::test]
async fn unknown_model_is_a_400_without_calling_upstream() {
    let mock = start_mock().await;
    let err = mock
        .client()
        .complete(&ask("gpt-9-ultra", "hello"), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "model_not_found");
    assert_eq!(err.status().as_u16(), 400);
    assert_eq!(mock.total_calls().await, 0);
}

#[tokio::test]
async fn without_api_key_every_call_is_a_503_and_nothing_is_sent() {
    let mock = start_mock().await;
    let mut unconfigured = settings(&mock.base, Duration::from_secs(1));
    unconfigured.api_key = None;
    let client = client_for(&unconfigured);
    let req = ask("gpt-4o-mini", "hello");
    let errors = [
        client.complete(&req, None).await.unwrap_err(),
        client.stream(&req, None).await.err().unwrap(),
        client.ping().await.unwrap_err(),
    ];
    for err in errors {
        assert!(
            matches!(
                err,
                ApiError::Unavailable {
                    dependency: "LLM",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.status().as_u16(), 503);
    }
    assert_eq!(mock.total_calls().await, 0);
}

#[tokio::test]
async fn ping_succeeds_against_the_provider_and_fails_for_an_unreachable_one() {
    let mock = start_mock().await;
    mock.client().ping().await.unwrap();

    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let client = client_for(&settings(&format!("http://{addr}"), Duration::from_secs(2)));
    let err = client.ping().await.unwrap_err();
    assert_eq!(err.status().as_u16(), 502, "{err:?}");
}

// --- streaming -------------------------------------------------------------------------------

#[tokio::test]
async fn stream_yields_deltas_as_they_arrive_then_done_with_the_provider_usage() {
    let mock = start_mock().await;
    let req = CompletionRequest::new(
        "gpt-4o-mini",
        vec![
            ChatMessage::system("Be brief."),
            ChatMessage::user("Tell me a story [mock tokens=10 token_ms=100]"),
        ],
    );
    let started = Instant::now();
    let mut stream = mock.client().stream(&req, None).await.unwrap();
    let mut deltas = Vec::new();
    let mut done = None;
    while let Some(item) = stream.next().await {
        match item.unwrap() {
            StreamEvent::Delta(text) => deltas.push((started.elapsed(), text)),
            StreamEvent::Done {
                model,
                usage,
                finish_reason,
                cost_usd,
            } => done = Some((started.elapsed(), model, usage, finish_reason, cost_usd)),
        }
    }
    let (done_at, model, usage, finish_reason, cost) = done.expect("a Done item");
    assert_eq!(deltas.len(), 10);
    let text: String = deltas.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(text.split_whitespace().count(), 10);
    assert!(text.starts_with("[mock] messages=2 last=Tell me a story"));
    // Incremental: the first delta long before the last (9 gaps of 100 ms upstream).
    let (first_at, last_at) = (deltas[0].0, deltas[9].0);
    assert!(first_at < Duration::from_millis(500), "{first_at:?}");
    assert!(
        last_at - first_at >= Duration::from_millis(700),
        "{first_at:?} .. {last_at:?}"
    );
    assert!(done_at >= last_at);
    assert_eq!(model, "gpt-4o-mini");
    assert_eq!(finish_reason, "stop");
    // (2 words + 4) + (7 words + 4) prompt tokens, 10 completion tokens, as the mock reports.
    assert_eq!(usage, Usage::reported(17, 10));
    assert_close(cost, (17.0 * 0.00015 + 10.0 * 0.0006) / 1000.0);

    let body = mock.last_request_body().await;
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn stream_cut_after_the_first_delta_yields_one_error_then_ends() {
    let mock = start_mock().await;
    let mut stream = mock
        .client()
        .stream(&ask("gpt-4o-mini", "[mock fault=cut cut_after=3]"), None)
        .await
        .unwrap();
    let mut items = Vec::new();
    while let Some(item) = stream.next().await {
        items.push(item);
    }
    let (last, deltas) = items.split_last().expect("items");
    assert_eq!(deltas.len(), 3, "{items:?}");
    assert!(
        deltas
            .iter()
            .all(|i| matches!(i, Ok(StreamEvent::Delta(_))))
    );
    assert!(
        matches!(last, Err(ApiError::UpstreamFailed { .. })),
        "{last:?}"
    );
    assert!(stream.next().await.is_none());
    assert_eq!(
        mock.total_calls().await,
        1,
        "no retry after the first delta"
    );
}

#[tokio::test]
async fn stream_retries_and_falls_back_before_the_first_delta() {
    let mock = start_mock().await;
    let client = mock.client();
    let stream = client
        .stream(&ask("mock-fault-500", "hello"), None)
        .await
        .unwrap();
    let items: Vec<_> = stream.collect().await;
    let Some(Ok(StreamEvent::Done { model, usage, .. })) = items.last() else {
        panic!("{items:?}");
    };
    assert_eq!(model, "gpt-4o-mini");
    assert!(!usage.estimated);
    assert_eq!(
        mock.calls_by_model().await,
        calls(&[("mock-fault-500", 3), ("gpt-4o-mini", 1)])
    );

    // A cut before any text is transient too: retried on the same model.
    mock.reset().await;
    let req = ask("gpt-4o-mini", "[mock fault=cut cut_after=0 times=1 key=c]");
    let items: Vec<_> = client.stream(&req, None).await.unwrap().collect().await;
    assert!(matches!(items.last(), Some(Ok(StreamEvent::Done { .. }))));
    assert_eq!(mock.total_calls().await, 2);
}

#[tokio::test]
async fn stream_time_to_first_token_is_bounded_by_the_timeout() {
    let mock = start_mock().await;
    let client = mock.client_with_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = client
        .stream(&ask("gpt-4o-mini", "[mock ttft_ms=2000]"), None)
        .await
        .err()
        .expect("a timeout");
    assert!(matches!(err, ApiError::UpstreamTimeout), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(2000));
    assert_eq!(mock.total_calls().await, 3);
}

#[tokio::test]
async fn stream_gap_longer_than_the_timeout_ends_with_a_504_item() {
    let mock = start_mock().await;
    let client = mock.client_with_timeout(Duration::from_millis(300));
    let mut stream = client
        .stream(&ask("gpt-4o-mini", "[mock tokens=5 token_ms=1500]"), None)
        .await
        .unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Ok(StreamEvent::Delta(_)))
    ));
    let started = Instant::now();
    let item = stream.next().await;
    assert!(
        matches!(item, Some(Err(ApiError::UpstreamTimeout))),
        "{item:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert!(stream.next().await.is_none());
}

// --- logs ------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn logs_of_one_call(log_prompts: bool) -> String {
    let mock = start_mock().await;
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    mock.client()
        .with_log_prompts(log_prompts)
        .complete(&ask("gpt-4o-mini", "my secret diagnosis"), None)
        .await
        .unwrap();
    logs.text()
}

#[tokio::test]
async fn logs_one_line_per_call_without_the_prompt() {
    let logs = logs_of_one_call(false).await;
    assert_eq!(logs.matches("LLM call").count(), 1, "{logs}");
    for field in [
        "model=gpt-4o-mini",
        "prompt_tokens=",
        "completion_tokens=",
        "latency_ms=",
        "attempts=1",
        "cost_usd=",
        "fell_back=false",
    ] {
        assert!(logs.contains(field), "{field} missing in {logs}");
    }
    assert!(!logs.contains("secret diagnosis"), "{logs}");
}

#[tokio::test]
async fn logs_the_prompt_only_when_asked_to() {
    let logs = logs_of_one_call(true).await;
    assert!(logs.contains("secret diagnosis"), "{logs}");
}

// --- the trait contract, for the real client and the fake alike -------------------------------

async fn check_contract(llm: &dyn LlmClient) {
    let req = ask("gpt-4o-mini-2024-07-18", "hello");
    let registry = llm.registry();

    let done = llm.complete(&req, None).await.unwrap();
    let model = registry.resolve(&done.model).expect("a registry id");
    assert_eq!(model.id, done.model);
    assert_eq!(done.cost_usd, cost_usd(model, &done.usage));
    assert_eq!(
        done.usage.total_tokens,
        done.usage.prompt_tokens + done.usage.completion_tokens
    );
    assert!(done.attempts >= 1);

    let items: Vec<_> = llm.stream(&req, None).await.unwrap().collect().await;
    let (last, deltas) = items.split_last().expect("a terminal item");
    assert!(!deltas.is_empty());
    for item in deltas {
        assert!(
            matches!(item, Ok(StreamEvent::Delta(d)) if !d.is_empty()),
            "{item:?}"
        );
    }
    let Ok(StreamEvent::Done {
        model,
        usage,
        cost_usd: cost,
        ..
    }) = last
    else {
        panic!("{last:?}");
    };
    assert_eq!(*cost, cost_usd(registry.resolve(model).unwrap(), usage));

    let err = llm
        .complete(&ask("no-such-model", "x"), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "model_not_found");
    let err = llm.complete(&req, Some(Instant::now())).await.unwrap_err();
    assert!(matches!(err, ApiError::UpstreamTimeout), "{err:?}");
    llm.ping().await.unwrap();
}

#[tokio::test]
async fn openai_client_honours_the_llm_client_contract() {
    let mock = start_mock().await;
    check_contract(&mock.client()).await;
}

#[tokio::test]
async fn scripted_fake_honours_the_llm_client_contract() {
    let fake = ScriptedLlm::new(ModelRegistry::builtin().unwrap())
        .reply("hello back")
        .reply("streamed hello back");
    check_contract(&fake).await;
    assert_eq!(fake.remaining(), 0);
}
