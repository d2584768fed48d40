//! The batch router in process: validation, fan-out with partial failures and timeouts, rate
//! limits, long-text chunking, and the job routes (no Lambda, no DynamoDB).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use common::{ALICE, BOB, FRED, harness, harness_with, locations};
use serde_json::{Value, json};

fn prompts(marker: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"id": format!("q{i}"), "prompt": format!("item{i} {marker}")}))
        .collect()
}

#[tokio::test]
async fn health_names_the_function() {
    let h = harness().await;
    let (status, _, body) = h
        .call(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["function"], "batch");
}

#[tokio::test]
async fn openapi_documents_every_route() {
    let h = harness().await;
    let (status, _, body) = h
        .call(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, 200);
    assert!(body["openapi"].as_str().unwrap().starts_with("3.1"));
    assert_eq!(body["info"]["title"], "batch");
    for path in [
        "/batch",
        "/batch/long-text",
        "/batch/jobs",
        "/batch/jobs/{id}",
        "/health",
        "/openapi.json",
    ] {
        assert!(body["paths"][path].is_object(), "{path} missing");
    }
    for schema in [
        "BatchRequest",
        "BatchResponse",
        "ItemResult",
        "LongTextRequest",
        "JobView",
    ] {
        assert!(
            body["components"]["schemas"][schema].is_object(),
            "{schema} missing"
        );
    }
}

#[tokio::test]
async fn unknown_route_is_404_envelope() {
    let h = harness().await;
    let (status, body) = h.get("/definitely/not/here", ALICE).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
}

#[tokio::test]
async fn missing_credentials_are_401_and_nothing_goes_upstream() {
    let h = harness().await;
    let (status, _, body) = h
        .post("/batch", "gwk_nobody", &json!({"items": prompts("x", 2)}))
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_credentials");
    assert_eq!(h.mock.stats().total, 0);
}

#[tokio::test]
async fn zero_or_101_items_are_422_naming_items() {
    let h = harness().await;
    for items in [vec![], prompts("x", 101)] {
        let (status, _, body) = h.post("/batch", ALICE, &json!({ "items": items })).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(locations(&body), ["body.items"]);
    }
    let (status, _, body) = h.post("/batch", ALICE, &json!({"prompt": "x"})).await;
    assert_eq!(status, 400, "unknown field: {body}");
    assert_eq!(h.mock.stats().total, 0);
}

#[tokio::test]
async fn bad_concurrency_timeout_and_sampling_options_are_422_each_named() {
    let h = harness().await;
    for (field, value) in [
        ("max_concurrency", json!(0)),
        ("max_concurrency", json!(33)),
        ("max_concurrency", json!(-1)),
        ("max_concurrency", json!("eight")),
        ("max_concurrency", json!(2.5)),
        ("timeout_ms", json!(10)),
        ("timeout_ms", json!(600_000)),
        ("temperature", json!(3)),
        ("max_tokens", json!(0)),
    ] {
        let mut body = json!({"items": prompts("x", 1)});
        body[field] = value.clone();
        let (status, _, reply) = h.post("/batch", ALICE, &body).await;
        assert_eq!(status, 422, "{field}={value}: {reply}");
        assert_eq!(
            locations(&reply),
            [format!("body.{field}")],
            "{field}={value}"
        );
    }
    assert_eq!(h.mock.stats().total, 0);
}

#[tokio::test]
async fn malformed_items_are_422_at_their_own_location() {
    let h = harness().await;
    let body = json!({
        "items": [
            {"prompt": "fine"},
            {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
            {"id": "no-text"},
            {"prompt": "   "},
            {"prompt": "ok", "model": "gpt-9"},
            {"messages": [{"role": "robot", "content": "hi"}]},
            {"prompt": "x".repeat(20_001)},
        ],
        "models": ["gpt-4o", "nope"]
    });
    let (status, _, reply) = h.post("/batch", ALICE, &body).await;
    assert_eq!(status, 422, "{reply}");
    assert_eq!(
        locations(&reply),
        [
            "body.models.1",
            "body.items.1",
            "body.items.2",
            "body.items.3.prompt",
            "body.items.4.model",
            "body.items.5.messages.0.role",
            "body.items.6",
        ]
    );
}

#[tokio::test]
async fn partial_failure_keeps_order_maps_each_error_and_counts_add_up() {
    let h = harness().await;
    let m = "pf7c1";
    let body = json!({
        "items": [
            {"id": "a", "prompt": format!("first {m}")},
            {"id": "b", "prompt": format!("second {m} [mock fault=500]")},
            {"id": "c", "prompt": format!("third {m}"), "model": "mock-fault-context"},
            {"id": "d", "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": format!("fourth {m}")}
            ], "model": "gpt-4o"},
            {"id": "e", "prompt": format!("fifth {m}"), "model": "mock-fault-malformed"},
            {"prompt": format!("sixth {m}")},
        ],
        "max_concurrency": 3,
        "max_tokens": 50
    });
    let (status, headers, reply) = h.post("/batch", ALICE, &body).await;
    assert_eq!(status, 200, "{reply}");
    let results = reply["results"].as_array().unwrap();
    let ids: Vec<&str> = results.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["a", "b", "c", "d", "e", "5"],
        "input order, default ids"
    );
    let statuses: Vec<&str> = results
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["ok", "error", "error", "ok", "error", "ok"]);
    for (i, word) in [(0, "first"), (3, "fourth"), (5, "sixth")] {
        let output = results[i]["output"].as_str().unwrap();
        assert!(output.contains(&format!("last={word} {m}")), "{output}");
        assert!(results[i]["error"].is_null());
        assert!(results[i]["usage"]["total_tokens"].as_u64().unwrap() > 0);
        assert!(results[i]["cost_estimate"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(results[3]["model"], "gpt-4o");
    assert_eq!(results[0]["model"], "gpt-4o-mini");
    // Each failure carries the status and code it would have had as a whole request.
    let error = |i: usize| {
        (
            results[i]["error"]["status"].as_u64().unwrap(),
            results[i]["error"]["code"].as_str().unwrap(),
        )
    };
    assert_eq!(error(1), (502, "upstream_error"));
    assert_eq!(error(2), (400, "context_length_exceeded"));
    assert_eq!(error(4), (502, "upstream_error"));
    assert!(results[1]["output"].is_null() && results[1]["usage"].is_null());

    assert_eq!(reply["total"], 6);
    assert_eq!(reply["successful"], 3);
    assert_eq!(reply["failed"], 3);
    let summed: u64 = results
        .iter()
        .map(|r| r["usage"]["total_tokens"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(reply["usage"]["total_tokens"].as_u64().unwrap(), summed);
    let cost: f64 = results
        .iter()
        .map(|r| r["cost_estimate"].as_f64().unwrap())
        .sum();
    assert!((reply["total_cost"].as_f64().unwrap() - cost).abs() < 1e-12);
    // Six items were admitted as six requests of the pro tier's 1000.
    assert_eq!(headers["x-ratelimit-remaining"], "994");
}

#[tokio::test]
async fn per_item_timeout_is_honoured_without_holding_up_the_others() {
    let h = harness().await;
    let body = json!({
        "items": [
            {"id": "slow", "prompt": "slow one [mock latency_ms=5000]"},
            {"id": "quick", "prompt": "quick one"},
            {"id": "also-quick", "prompt": "quick two [mock latency_ms=100]"},
        ],
        "timeout_ms": 700
    });
    let started = Instant::now();
    let (status, _, reply) = h.post("/batch", ALICE, &body).await;
    let took = started.elapsed().as_millis();
    assert_eq!(status, 200, "{reply}");
    let slow = &reply["results"][0];
    assert_eq!(slow["status"], "error");
    assert_eq!(slow["error"]["status"], 504);
    assert_eq!(slow["error"]["code"], "upstream_timeout");
    // The client gives up on its own a little before the item's deadline (its safety margin);
    // never after it.
    let latency = slow["latency_ms"].as_u64().unwrap();
    assert!(
        (300..=900).contains(&latency),
        "timed out after {latency} ms"
    );
    assert_eq!(reply["results"][1]["status"], "ok");
    assert_eq!(reply["results"][2]["status"], "ok");
    assert!(reply["results"][1]["latency_ms"].as_u64().unwrap() < 600);
    assert!(took < 2_000, "the batch took {took} ms");
}

#[tokio::test]
async fn fan_out_never_exceeds_max_concurrency_and_overlaps_the_calls() {
    let h = harness().await;
    let items: Vec<Value> = (0..20)
        .map(|i| json!({"prompt": format!("fan {i} [mock latency_ms=100]")}))
        .collect();
    let (status, _, reply) = h
        .post(
            "/batch",
            ALICE,
            &json!({"items": items, "max_concurrency": 4}),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["successful"], 20);
    let stats = h.mock.stats();
    assert_eq!(stats.total, 20);
    assert!(stats.peak_in_flight <= 4, "peak {}", stats.peak_in_flight);
    assert!(
        stats.peak_in_flight >= 3,
        "calls did not overlap: peak {}",
        stats.peak_in_flight
    );
    // Five waves of 100 ms: far below the 2 s a sequential run would take.
    let took = reply["processing_time_ms"].as_u64().unwrap();
    assert!((500..1_500).contains(&took), "took {took} ms");
}

#[tokio::test]
async fn a_batch_that_cannot_fit_is_429_before_any_upstream_call() {
    let h = harness_with(&[("RATE_LIMIT_FREE_TOKENS_PER_MINUTE", "5000")]).await;
    // 10 items x (prompt + 1000 max_tokens) cannot fit 5000 tokens per minute.
    let (status, headers, reply) = h
        .post("/batch", FRED, &json!({"items": prompts("big", 10)}))
        .await;
    assert_eq!(status, 429, "{reply}");
    assert_eq!(reply["error"]["code"], "rate_limit_exceeded");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(h.mock.stats().total, 0);

    // The same items with a small completion limit fit, and count as 10 requests.
    let body = json!({"items": prompts("small", 10), "max_tokens": 100});
    let (status, headers, reply) = h.post("/batch", FRED, &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(headers["x-ratelimit-remaining"], "90");
    assert_eq!(h.mock.stats().total, 10);
}

#[tokio::test]
async fn long_text_over_200000_chars_or_blank_is_422() {
    let h = harness().await;
    for (text, kind) in [
        ("a".repeat(200_001), "string_too_long"),
        ("  \n ".to_owned(), "string_too_short"),
    ] {
        let (status, _, reply) = h
            .post("/batch/long-text", ALICE, &json!({ "text": text }))
            .await;
        assert_eq!(status, 422, "{reply}");
        assert_eq!(locations(&reply), ["body.text"]);
        assert_eq!(reply["error"]["details"][0]["type"], kind);
    }
    let cases = [
        (json!({"text": "x", "task": "custom"}), "body.instruction"),
        (json!({"text": "x", "task": "poem"}), "body.task"),
        (json!({"text": "x", "chunk_chars": 10}), "body.chunk_chars"),
        (
            json!({"text": "a. ".repeat(60_000), "chunk_chars": 200}),
            "body.chunk_chars",
        ),
    ];
    for (body, location) in cases {
        let (status, _, reply) = h.post("/batch/long-text", ALICE, &body).await;
        assert_eq!(status, 422, "{reply}");
        assert_eq!(locations(&reply), [location]);
    }
    assert_eq!(h.mock.stats().total, 0);
}

fn paragraph(word: &str, sentences: usize) -> String {
    (0..sentences)
        .map(|i| format!("The {word} sentence number {i} is here."))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn long_text_chunks_at_paragraphs_round_robin_and_combines() {
    let h = harness().await;
    let text = [
        paragraph("alpha", 8),
        paragraph("beta", 8),
        paragraph("gamma", 8),
    ]
    .join("\n\n");
    let body = json!({
        "text": text,
        "task": "summarize",
        "chunk_chars": 400,
        "models": ["gpt-4o-mini", "gpt-4o"],
        "combine": true,
        "max_tokens": 60
    });
    let (status, headers, reply) = h.post("/batch/long-text", ALICE, &body).await;
    assert_eq!(status, 200, "{reply}");
    let chunks = reply["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), 3, "{reply}");
    assert_eq!(reply["total_chunks"], 3);
    assert_eq!(
        (reply["successful"].as_u64(), reply["failed"].as_u64()),
        (Some(3), Some(0))
    );
    let models: Vec<&str> = chunks
        .iter()
        .map(|c| c["model"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini"]);
    for (chunk, word) in chunks.iter().zip(["alpha", "beta", "gamma"]) {
        assert!(
            chunk["output"]
                .as_str()
                .unwrap()
                .contains(&format!("last=The {word}"))
        );
    }
    let sizes: usize = chunks
        .iter()
        .map(|c| c["chars"].as_u64().unwrap() as usize)
        .sum();
    assert_eq!(sizes, text.chars().count());
    assert_eq!(reply["combined"]["status"], "ok");
    assert_eq!(reply["output"], reply["combined"]["output"]);
    // Three chunk calls and the final one, each a request.
    assert_eq!(h.mock.stats().total, 4);
    assert_eq!(headers["x-ratelimit-remaining"], "996");
    let final_call = h.mock.recent_requests(1).remove(0);
    let last = final_call.body["messages"][1]["content"].as_str().unwrap();
    assert_eq!(
        last.matches("[mock] messages=2").count(),
        3,
        "the chunk outputs: {last}"
    );
}

#[tokio::test]
async fn long_text_reports_a_failing_chunk_and_still_returns_the_others() {
    let h = harness().await;
    let text = [
        paragraph("one", 6),
        format!("{} [mock fault=500]", paragraph("two", 5)),
        paragraph("three", 6),
    ]
    .join("\n\n");
    let body =
        json!({"text": text, "task": "translate", "target_language": "French", "chunk_chars": 300});
    let (status, _, reply) = h.post("/batch/long-text", ALICE, &body).await;
    assert_eq!(status, 200, "{reply}");
    let statuses: Vec<&str> = reply["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["ok", "error", "ok"]);
    assert_eq!(reply["chunks"][1]["error"]["code"], "upstream_error");
    assert!(reply["combined"].is_null());
    let output = reply["output"].as_str().unwrap();
    assert!(output.contains("last=The one") && output.contains("last=The three"));
    let system = h.mock.recent_requests(1)[0].body["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(system.contains("into French"), "{system}");
}

#[tokio::test]
async fn a_job_is_accepted_drained_and_read_back_page_by_page() {
    let h = harness().await;
    let m = "jobpages";
    let (status, headers, accepted) = h
        .post(
            "/batch/jobs",
            ALICE,
            &json!({"items": prompts(m, 12), "max_concurrency": 4, "max_tokens": 40}),
        )
        .await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["status"], "queued");
    assert_eq!(accepted["total"], 12);
    let id = accepted["job_id"].as_str().unwrap().to_owned();
    assert_eq!(headers["location"], format!("/batch/jobs/{id}"));
    assert_eq!(h.mock.stats().total, 0, "nothing runs at submission");

    let (status, queued) = h.get(&format!("/batch/jobs/{id}"), ALICE).await;
    assert_eq!(status, 200, "{queued}");
    assert_eq!(queued["status"], "queued");
    assert_eq!(
        (queued["pending"].as_u64(), queued["completed"].as_u64()),
        (Some(12), Some(0))
    );
    assert!(
        queued["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "pending")
    );
    assert_eq!(queued["results"][3]["id"], "q3");

    let report = batch::drain(
        &h.batch,
        Instant::now() + std::time::Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        (report.jobs_claimed, report.jobs_finished),
        (1, 1),
        "{report:?}"
    );
    assert_eq!(report.items_processed, 12);
    assert!(h.mock.stats().peak_in_flight <= 4);

    let (_, first) = h.get(&format!("/batch/jobs/{id}?limit=5"), ALICE).await;
    assert_eq!(first["status"], "done");
    assert_eq!(
        (first["successful"].as_u64(), first["failed"].as_u64()),
        (Some(12), Some(0))
    );
    let mut seen: Vec<String> = Vec::new();
    let mut page = first;
    loop {
        for result in page["results"].as_array().unwrap() {
            assert_eq!(result["status"], "ok");
            let id = result["id"].as_str().unwrap().to_owned();
            let i: usize = id[1..].parse().unwrap();
            assert!(
                result["output"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("last=item{i} {m}"))
            );
            seen.push(id);
        }
        let Some(cursor) = page["next_cursor"].as_str().map(str::to_owned) else {
            break;
        };
        page = h
            .get(&format!("/batch/jobs/{id}?limit=5&cursor={cursor}"), ALICE)
            .await
            .1;
    }
    let expected: Vec<String> = (0..12).map(|i| format!("q{i}")).collect();
    assert_eq!(seen, expected);

    // A cursor only works for the job it came from, and the limit is bounded.
    let (_, _, other) = h
        .post("/batch/jobs", ALICE, &json!({"items": prompts("other", 3)}))
        .await;
    let other_id = other["job_id"].as_str().unwrap();
    let (_, again) = h.get(&format!("/batch/jobs/{id}?limit=5"), ALICE).await;
    let cursor = again["next_cursor"].as_str().unwrap();
    let (status, reply) = h
        .get(&format!("/batch/jobs/{other_id}?cursor={cursor}"), ALICE)
        .await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("invalid_cursor"))
    );
    let (status, _) = h.get(&format!("/batch/jobs/{id}?limit=0"), ALICE).await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn another_principals_job_is_404_like_an_unknown_one() {
    let h = harness().await;
    let (_, _, accepted) = h
        .post("/batch/jobs", ALICE, &json!({"items": prompts("mine", 2)}))
        .await;
    let id = accepted["job_id"].as_str().unwrap();
    let (status, reply) = h.get(&format!("/batch/jobs/{id}"), BOB).await;
    assert_eq!(status, 404, "{reply}");
    assert_eq!(reply["error"]["code"], "not_found");
    let (status, _) = h
        .get(&format!("/batch/jobs/{}", uuid::Uuid::new_v4()), ALICE)
        .await;
    assert_eq!(status, 404);
    let (status, reply) = h.get("/batch/jobs/not-a-uuid", ALICE).await;
    assert_eq!(status, 422);
    assert_eq!(locations(&reply), ["path.id"]);
}

#[tokio::test]
async fn jobs_take_up_to_10000_items_and_reject_more() {
    let h = harness().await;
    let items: Vec<Value> = (0..10_001).map(|_| json!({"prompt": "p"})).collect();
    let (status, _, reply) = h
        .post("/batch/jobs", ALICE, &json!({ "items": items }))
        .await;
    assert_eq!(status, 422, "{reply}");
    assert_eq!(locations(&reply), ["body.items"]);
    let items: Vec<Value> = (0..10_000).map(|_| json!({"prompt": "p"})).collect();
    let (status, _, reply) = h
        .post("/batch/jobs", ALICE, &json!({ "items": items }))
        .await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["total"], 10_000);
}
