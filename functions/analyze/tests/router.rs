//! The analyze router in process, on in-memory stores and a scripted LLM (no Lambda, no
//! network).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, LazyLock};

use axum::body::Body;
use axum::http::{HeaderMap, Request};
use serde_json::{Value, json};
use shared::ApiError;
use shared::auth::Tier;
use shared::llm::{Scripted, ScriptedLlm};
use shared::services::Services;

use analyze::local::LocalAnalyzer;

const PRO: &str = "gwk_test_pro";
const FREE: &str = "gwk_test_free";

/// One local analyser for every test: jieba's dictionary loads once per test binary.
static LOCAL: LazyLock<Arc<LocalAnalyzer>> = LazyLock::new(|| Arc::new(LocalAnalyzer::new()));

const REVIEW: &str = "The battery life is excellent and the screen is bright. \
    The camera is good, but the speaker is terrible.";

const SENTIMENT_REPLY: &str = r#"{"label": "positive", "score": 0.6}"#;
const KEYWORDS_REPLY: &str =
    r#"{"keywords": [{"word": "battery", "weight": 0.9}, {"word": "screen", "weight": 0.5}]}"#;
const SUMMARY_REPLY: &str = r#"{"sentences": ["A good phone with a weak speaker."]}"#;
const ENTITIES_REPLY: &str = r#"{"entities": []}"#;

struct Harness {
    services: Services,
    llm: Arc<ScriptedLlm>,
}

async fn harness_with(env: &[(&str, &str)]) -> Harness {
    let h = test_support::in_memory(
        &[
            (PRO, "pro-user", Tier::Pro),
            (FREE, "free-user", Tier::Free),
        ],
        env,
    )
    .await;
    Harness {
        services: h.services,
        llm: h.llm,
    }
}

/// An LLM provider is configured (the scripted one answers).
async fn harness() -> Harness {
    harness_with(&[("OPENAI_API_KEY", "sk-test")]).await
}

impl Harness {
    async fn call(&self, request: Request<Body>) -> (u16, HeaderMap, Value) {
        let router = analyze::app_with_local(self.services.clone(), LOCAL.clone());
        let reply = test_support::call(router, request).await;
        let json = reply.json();
        (reply.status, reply.headers, json)
    }

    async fn analyze_as(
        &self,
        key: &str,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> (u16, HeaderMap, Value) {
        let mut request = Request::post("/analyze")
            .header("x-api-key", key)
            .header("content-type", "application/json");
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        self.call(request.body(Body::from(body.to_string())).unwrap())
            .await
    }

    async fn analyze(&self, body: Value) -> (u16, HeaderMap, Value) {
        self.analyze_as(PRO, &body, &[]).await
    }

    fn script(&self, outcomes: Vec<Scripted>) {
        for outcome in outcomes {
            self.llm.push(outcome);
        }
    }
}

fn reply(text: &str) -> Scripted {
    Scripted::Reply(text.to_owned())
}

#[tokio::test]
async fn health_names_the_function() {
    let h = harness().await;
    let (status, _, body) = h
        .call(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["function"], "analyze");
}

#[tokio::test]
async fn openapi_documents_the_analyze_route_and_its_schemas() {
    let h = harness().await;
    let (status, _, body) = h
        .call(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, 200);
    assert!(body["openapi"].as_str().unwrap().starts_with("3.1"));
    assert_eq!(body["info"]["title"], "analyze");
    for path in ["/analyze", "/health", "/openapi.json"] {
        assert!(body["paths"][path].is_object(), "{path} missing");
    }
    for schema in [
        "AnalyzeRequest",
        "AnalyzeResponse",
        "SentimentResult",
        "Entity",
    ] {
        assert!(
            body["components"]["schemas"][schema].is_object(),
            "{schema} missing"
        );
    }
    assert!(body["components"]["securitySchemes"]["api_key"].is_object());
}

#[tokio::test]
async fn unknown_route_is_404_envelope() {
    let h = harness().await;
    let (status, _, body) = h
        .call(Request::get("/nope").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
}

#[tokio::test]
async fn unknown_credentials_are_401_and_reach_nothing() {
    let h = harness().await;
    let (status, _, body) = h
        .analyze_as("gwk_nobody", &json!({"content": "hi"}), &[])
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_credentials");
    assert!(h.llm.requests().is_empty());
}

#[tokio::test]
async fn each_validation_rule_is_a_422_naming_its_field() {
    let h = harness().await;
    let cases = [
        (json!({"content": ""}), vec!["content"]),
        (json!({"content": "  \n\t "}), vec!["content"]),
        (json!({"content": "x".repeat(50_001)}), vec!["content"]),
        (
            json!({"content": "hi", "tasks": ["sentiment", "emotion"]}),
            vec!["tasks", "1"],
        ),
        (json!({"content": "hi", "tasks": []}), vec!["tasks"]),
        (json!({"content": "hi", "language": "fr"}), vec!["language"]),
        (json!({"content": "hi", "mode": "cloud"}), vec!["mode"]),
        (json!({"content": "hi", "top_k": 0}), vec!["top_k"]),
        (json!({"content": "hi", "top_k": 51}), vec!["top_k"]),
        (
            json!({"content": "hi", "summary_sentences": -1}),
            vec!["summary_sentences"],
        ),
        (
            json!({"content": "hi", "keyword_algorithm": "bm25"}),
            vec!["keyword_algorithm"],
        ),
        (json!({"content": 42}), vec!["content"]),
        (json!({"tasks": ["sentiment"]}), vec!["content"]),
    ];
    for (body, field) in cases {
        let (status, _, out) = h.analyze(body.clone()).await;
        let shown: String = body.to_string().chars().take(80).collect();
        assert_eq!(status, 422, "{shown} -> {out}");
        let mut loc = vec!["body"];
        loc.extend(field);
        assert_eq!(
            out["error"]["details"][0]["loc"],
            json!(loc),
            "{shown} -> {out}"
        );
    }
    assert!(h.llm.requests().is_empty(), "nothing reached the model");
}

#[tokio::test]
async fn content_of_exactly_50000_characters_is_accepted() {
    let h = harness().await;
    let content = "好".repeat(50_000);
    let (status, _, out) = h
        .analyze(json!({"content": content, "mode": "local", "tasks": ["sentiment"]}))
        .await;
    assert_eq!(status, 200, "{out}");
}

#[tokio::test]
async fn unknown_field_is_400() {
    let h = harness().await;
    let (status, _, out) = h.analyze(json!({"content": "hi", "topk": 3})).await;
    assert_eq!(status, 400);
    assert_eq!(out["error"]["param"], "topk");
}

#[tokio::test]
async fn llm_mode_asks_the_model_once_per_task_and_names_the_method() {
    let h = harness().await;
    h.script(vec![
        reply(SENTIMENT_REPLY),
        reply(KEYWORDS_REPLY),
        reply(SUMMARY_REPLY),
        reply(ENTITIES_REPLY),
    ]);
    let (status, headers, out) = h.analyze(json!({"content": REVIEW, "mode": "llm"})).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(headers["x-cache"], "MISS");
    let results = &out["results"];
    for task in ["sentiment", "keywords", "summary", "entities"] {
        assert_eq!(results[task]["method"], "llm", "{out}");
    }
    assert_eq!(results["sentiment"]["label"], "positive");
    assert_eq!(results["keywords"]["items"][0]["word"], "battery");
    assert_eq!(
        results["summary"]["text"],
        "A good phone with a weak speaker."
    );
    assert_eq!(out["errors"], json!({}));
    assert_eq!(out["language"], "en");
    assert_eq!(out["model"], "gpt-4o-mini");
    assert!(out["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert!(out["cost_estimate"].as_f64().unwrap() > 0.0);
    let sent = h.llm.requests();
    assert_eq!(sent.len(), 4, "one call per task");
    for request in &sent {
        assert_eq!(request.messages.last().unwrap().content, REVIEW);
        assert_eq!(request.temperature, 0.0);
    }
}

#[tokio::test]
async fn one_failing_llm_task_fills_its_error_and_the_others_return() {
    let h = harness().await;
    h.script(vec![
        reply(SENTIMENT_REPLY),
        Scripted::Fail(ApiError::UpstreamFailed {
            detail: "boom".into(),
        }),
        reply(SUMMARY_REPLY),
        reply(ENTITIES_REPLY),
    ]);
    let (status, _, out) = h.analyze(json!({"content": REVIEW, "mode": "llm"})).await;
    assert_eq!(status, 200, "{out}");
    assert!(out["results"].get("keywords").is_none(), "{out}");
    assert_eq!(out["errors"]["keywords"]["error"]["code"], "upstream_error");
    assert!(out["errors"]["keywords"]["error"]["request_id"].is_string());
    for task in ["sentiment", "summary", "entities"] {
        assert_eq!(out["results"][task]["method"], "llm", "{out}");
    }
}

#[tokio::test]
async fn every_llm_task_failing_is_502_or_their_common_error() {
    let h = harness().await;
    h.script(vec![
        Scripted::Fail(ApiError::UpstreamTimeout),
        Scripted::Fail(ApiError::UpstreamFailed {
            detail: "boom".into(),
        }),
    ]);
    let (status, _, out) = h
        .analyze(json!({"content": REVIEW, "mode": "llm", "tasks": ["sentiment", "keywords"]}))
        .await;
    assert_eq!(status, 502, "{out}");
    assert_eq!(out["error"]["code"], "upstream_error");

    h.script(vec![
        Scripted::Fail(ApiError::UpstreamTimeout),
        Scripted::Fail(ApiError::UpstreamTimeout),
    ]);
    let (status, _, out) = h
        .analyze(json!({"content": REVIEW, "mode": "llm", "tasks": ["sentiment", "keywords"]}))
        .await;
    assert_eq!(status, 504, "{out}");
}

#[tokio::test]
async fn a_malformed_reply_is_asked_again_once_then_reported() {
    let h = harness().await;
    h.script(vec![
        reply("It is positive, I think."),
        reply(SENTIMENT_REPLY),
    ]);
    let (status, _, out) = h
        .analyze(json!({"content": REVIEW, "mode": "llm", "tasks": ["sentiment"]}))
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["results"]["sentiment"]["method"], "llm");
    let sent = h.llm.requests();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].messages.len(), 3, "the retry carries a reminder");
    assert!(
        !sent[1].messages[2].content.contains("positive, I think"),
        "the bad reply is not echoed back"
    );

    h.script(vec![reply("{\"label\": \"great\"}"), reply("still no")]);
    let (status, _, out) = h
        .analyze(json!({"content": "Another text.", "mode": "llm", "tasks": ["sentiment"]}))
        .await;
    assert_eq!(status, 502, "{out}");
    assert_eq!(h.llm.requests().len(), 4, "exactly one retry");
}

#[tokio::test]
async fn auto_mode_falls_back_to_the_local_method_per_task() {
    let h = harness().await;
    h.script(vec![
        reply(SENTIMENT_REPLY),
        Scripted::Fail(ApiError::UpstreamTimeout),
    ]);
    let (status, _, out) = h
        .analyze(json!({"content": REVIEW, "tasks": ["keywords", "sentiment"]}))
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["results"]["sentiment"]["method"], "llm");
    assert!(out["results"]["sentiment"].get("fallback_reason").is_none());
    let keywords = &out["results"]["keywords"];
    assert_eq!(keywords["method"], "local", "{out}");
    assert_eq!(keywords["fallback_reason"], "upstream_timeout");
    assert_eq!(keywords["algorithm"], "tfidf");
    assert!(!keywords["items"].as_array().unwrap().is_empty());
    assert_eq!(out["errors"], json!({}));
}

#[tokio::test]
async fn local_mode_makes_no_llm_call_and_analyses_chinese() {
    let h = harness().await;
    let content =
        "这款手机的屏幕显示效果非常出色，电池续航令人满意。张伟在北京买了它，花了3999元。";
    let (status, _, out) = h
        .analyze(json!({"content": content, "mode": "local", "top_k": 3}))
        .await;
    assert_eq!(status, 200, "{out}");
    assert!(h.llm.requests().is_empty());
    assert_eq!(out["language"], "zh");
    assert_eq!(out["model"], Value::Null);
    assert_eq!(out["usage"]["total_tokens"], 0);
    let results = &out["results"];
    for task in ["sentiment", "keywords", "summary", "entities"] {
        assert_eq!(results[task]["method"], "local", "{out}");
        assert!(results[task].get("fallback_reason").is_none());
    }
    assert_eq!(results["sentiment"]["label"], "positive");
    assert_eq!(results["keywords"]["items"].as_array().unwrap().len(), 3);
    assert!(results["keywords"]["items"][0]["pos"].is_string());
    let entities = results["entities"]["items"].as_array().unwrap();
    assert!(
        entities
            .iter()
            .any(|e| e["text"] == "3999元" && e["type"] == "money"),
        "{out}"
    );
    assert!(
        entities
            .iter()
            .any(|e| e["text"] == "北京" && e["type"] == "place"),
        "{out}"
    );
}

#[tokio::test]
async fn without_an_llm_auto_is_local_and_llm_mode_is_503() {
    let h = harness_with(&[]).await;
    let (status, _, out) = h
        .analyze(json!({"content": REVIEW, "tasks": ["sentiment"]}))
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["results"]["sentiment"]["method"], "local");
    assert_eq!(
        out["results"]["sentiment"]["fallback_reason"],
        "llm_not_configured"
    );
    let (status, _, out) = h
        .analyze(json!({"content": REVIEW, "mode": "llm", "tasks": ["sentiment", "summary"]}))
        .await;
    assert_eq!(status, 503, "{out}");
    assert!(h.llm.requests().is_empty());
}

#[tokio::test]
async fn a_repeat_is_a_cache_hit_without_upstream_call_unless_no_cache() {
    let h = harness().await;
    h.script(vec![reply(SENTIMENT_REPLY)]);
    let body = json!({"content": REVIEW, "mode": "llm", "tasks": ["sentiment"]});
    let (status, headers, first) = h.analyze(body.clone()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(headers["x-cache"], "MISS");
    assert_eq!(first["cached"], false);

    let (status, headers, second) = h.analyze(body.clone()).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(headers["x-cache"], "HIT");
    assert_eq!(second["cached"], true);
    assert_eq!(second["cost_estimate"], 0.0);
    assert_eq!(second["results"], first["results"]);
    assert_eq!(h.llm.requests().len(), 1, "the hit made no upstream call");

    // Other options are another entry; `Cache-Control: no-cache` skips the cache.
    let (_, headers, _) = h
        .analyze(json!({"content": REVIEW, "mode": "local", "tasks": ["sentiment"]}))
        .await;
    assert_eq!(headers["x-cache"], "MISS");
    h.script(vec![reply(SENTIMENT_REPLY)]);
    let (status, headers, _) = h
        .analyze_as(PRO, &body, &[("cache-control", "no-cache")])
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-cache"], "MISS");
    assert_eq!(h.llm.requests().len(), 2);
}

#[tokio::test]
async fn partial_results_are_not_cached() {
    let h = harness().await;
    let body = json!({"content": REVIEW, "mode": "llm", "tasks": ["sentiment", "summary"]});
    h.script(vec![
        reply(SENTIMENT_REPLY),
        Scripted::Fail(ApiError::UpstreamTimeout),
    ]);
    let (status, _, _) = h.analyze(body.clone()).await;
    assert_eq!(status, 200);
    h.script(vec![reply(SENTIMENT_REPLY), reply(SUMMARY_REPLY)]);
    let (status, headers, out) = h.analyze(body).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-cache"], "MISS");
    assert_eq!(out["errors"], json!({}));
    assert_eq!(h.llm.requests().len(), 4);
}

#[tokio::test]
async fn an_analysis_counts_as_one_request_whatever_its_tasks() {
    let h = harness().await;
    let (_, headers, _) = h
        .analyze(json!({"content": "First text.", "mode": "local"}))
        .await;
    assert_eq!(headers["x-ratelimit-limit"], "1000");
    assert_eq!(headers["x-ratelimit-remaining"], "999");
    let (_, headers, _) = h
        .analyze(json!({"content": "Second text.", "mode": "local"}))
        .await;
    assert_eq!(headers["x-ratelimit-remaining"], "998");
}

#[tokio::test]
async fn an_exhausted_token_budget_turns_auto_local_and_llm_mode_429() {
    let h = harness_with(&[
        ("OPENAI_API_KEY", "sk-test"),
        ("RATE_LIMIT_FREE_TOKENS_PER_MINUTE", "50"),
    ])
    .await;
    let body = json!({"content": REVIEW, "tasks": ["sentiment", "summary"]});
    let (status, _, out) = h.analyze_as(FREE, &body, &[]).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        out["results"]["sentiment"]["fallback_reason"],
        "token_budget"
    );
    assert_eq!(out["results"]["summary"]["method"], "local");
    assert!(h.llm.requests().is_empty());

    let (status, headers, out) = h
        .analyze_as(
            FREE,
            &json!({"content": REVIEW, "mode": "llm", "tasks": ["sentiment"]}),
            &[],
        )
        .await;
    assert_eq!(status, 429, "{out}");
    assert!(headers.contains_key("retry-after"));
}

#[tokio::test]
async fn textrank_can_be_chosen_for_local_keywords() {
    let h = harness().await;
    let (status, _, out) = h
        .analyze(json!({
            "content": "Rust makes memory safety practical. Memory safety without garbage collection makes Rust fast.",
            "mode": "local",
            "tasks": ["keywords"],
            "keyword_algorithm": "textrank",
            "top_k": 2
        }))
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["results"]["keywords"]["algorithm"], "textrank");
    assert_eq!(out["results"]["keywords"]["items"][0]["weight"], 1.0);
}

#[tokio::test]
async fn auto_mode_stops_asking_the_llm_in_time_for_the_fallback() {
    let h = harness().await;
    h.script(vec![reply(SENTIMENT_REPLY)]);
    let request = |mode: &str| {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        // One second left: less than the time kept for the fallback.
        let mut context = lambda_http::Context::default();
        context.deadline = u64::try_from(now_ms).unwrap() + 1_000;
        let body =
            json!({"content": format!("{REVIEW} {mode}"), "mode": mode, "tasks": ["sentiment"]});
        let mut request = Request::post("/analyze")
            .header("x-api-key", PRO)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        request.extensions_mut().insert(context);
        request
    };
    let (status, _, out) = h.call(request("auto")).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["results"]["sentiment"]["method"], "local");
    assert_eq!(
        out["results"]["sentiment"]["fallback_reason"],
        "upstream_timeout"
    );
    assert_eq!(h.llm.remaining(), 1, "the model was not asked");

    // Without a fallback to make room for, the LLM gets the whole invocation.
    let (status, _, out) = h.call(request("llm")).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["results"]["sentiment"]["method"], "llm");
}

/// Collects what the handler logs on the test's thread.
#[derive(Clone, Default)]
struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_analysed_text_never_reaches_the_logs() {
    let h = harness().await;
    let secret = "Zanzibar-7731 quarterly merger memo";
    let buffer = LogBuffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    h.script(vec![
        reply(&format!("I would say: {secret}")),
        reply("still prose"),
        Scripted::Fail(ApiError::UpstreamFailed {
            detail: "upstream said no".into(),
        }),
    ]);
    let (status, _, out) = h
        .analyze(json!({"content": secret, "mode": "llm", "tasks": ["sentiment", "summary"]}))
        .await;
    assert_eq!(status, 502, "{out}");
    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("analysis"), "the analysis is logged: {logs}");
    assert!(logs.contains("LLM reply rejected"), "{logs}");
    assert!(!logs.contains("Zanzibar"), "{logs}");
}
