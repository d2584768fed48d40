//! Test support: the batch function in process, on in-memory stores, in front of the real mock
//! LLM (served on an ephemeral loopback port) through the real OpenAI-compatible client, so
//! latency, faults and their mapped errors are the real ones.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request};
use batch::Batch;
use http_body_util::BodyExt;
use mock_llm::MockState;
use serde_json::Value;
use shared::auth::{ApiKeyRecord, ApiKeyStore, InMemoryApiKeys, Tier, hash_api_key};
use shared::llm::OpenAiClient;
use shared::services::Services;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower::ServiceExt;

pub const ALICE: &str = "gwk_test_alice";
pub const BOB: &str = "gwk_test_bob";
/// A free-tier caller (100 requests per hour, 20000 tokens per minute unless overridden).
pub const FRED: &str = "gwk_test_fred";

pub struct Harness {
    pub batch: Batch,
    pub mock: Arc<MockState>,
    _stop: oneshot::Sender<()>,
}

/// A harness with the default configuration.
pub async fn harness() -> Harness {
    harness_with(&[]).await
}

/// A harness whose configuration has `vars` on top of the test defaults.
pub async fn harness_with(vars: &[(&str, &str)]) -> Harness {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mock = Arc::new(MockState::new());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(mock_llm::serve(listener, mock.clone(), async move {
        let _ = stopped.await;
    }));
    let mut env: HashMap<String, String> = [
        ("OPENAI_BASE_URL", format!("http://{addr}/v1")),
        ("OPENAI_API_KEY", "test-key".to_owned()),
        (
            "MODEL_REGISTRY_PATH",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/models.test.toml").to_owned(),
        ),
        ("BATCH_LEASE_SECONDS", "30".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in vars {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    let config = shared::Config::from_lookup(|name| {
        env.get(name)
            .cloned()
            .or_else(|| name.ends_with("_TABLE").then(|| format!("t-{name}")))
    })
    .unwrap();
    let llm = Arc::new(OpenAiClient::from_config(&config).unwrap());
    let keys = Arc::new(InMemoryApiKeys::new());
    for (key, user, tier) in [
        (ALICE, "alice", Tier::Pro),
        (BOB, "bob", Tier::Pro),
        (FRED, "fred", Tier::Free),
    ] {
        keys.put(&ApiKeyRecord::new(hash_api_key(key), user, tier))
            .await
            .unwrap();
    }
    let services = Services::in_memory(config, llm, keys).unwrap();
    Harness {
        batch: Batch::new(services),
        mock,
        _stop: stop,
    }
}

impl Harness {
    pub async fn call(&self, request: Request<Body>) -> (u16, HeaderMap, Value) {
        let response = batch::app(self.batch.clone())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    pub async fn post(&self, path: &str, key: &str, body: &Value) -> (u16, HeaderMap, Value) {
        self.call(
            Request::post(path)
                .header("x-api-key", key)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }

    pub async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        let (status, _, body) = self
            .call(
                Request::get(path)
                    .header("x-api-key", key)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        (status, body)
    }

    /// How many upstream requests mentioned `marker`.
    pub fn upstream_count(&self, marker: &str) -> usize {
        self.mock
            .recent_requests(usize::MAX)
            .iter()
            .filter(|r| r.body.to_string().contains(marker))
            .count()
    }
}

/// The `loc` of every detail of a 422, each joined with dots.
pub fn locations(body: &Value) -> Vec<String> {
    body["error"]["details"]
        .as_array()
        .unwrap_or_else(|| panic!("no details in {body}"))
        .iter()
        .map(|d| {
            d["loc"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
                .join(".")
        })
        .collect()
}
