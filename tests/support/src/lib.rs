//! The in-process harness of the functions' router tests (a dev-dependency of each function,
//! never in a Lambda build): the in-memory services every router test starts from, one way to
//! call a router, and the router checks every function must pass for requests `cargo lambda
//! watch` cannot deliver as they are.
//!
//! Setup failures panic: this is test code, and a test whose harness cannot be built must fail
//! loudly at that line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use shared::Config;
use shared::auth::{ApiKeyRecord, ApiKeyStore, InMemoryApiKeys, Tier, hash_api_key};
use shared::llm::{ModelRegistry, ScriptedLlm};
use shared::services::Services;

/// Services on in-memory stores, with a scripted LLM the test pushes answers to.
pub struct InMemory {
    pub services: Services,
    pub llm: Arc<ScriptedLlm>,
}

/// In-memory services with the API keys `keys` (key, user, tier) stored, configured by `vars`
/// on top of the test defaults (every table variable set to `t-<NAME>`).
pub async fn in_memory(keys: &[(&str, &str, Tier)], vars: &[(&str, &str)]) -> InMemory {
    let config = Config::from_lookup(|name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
            .or_else(|| name.ends_with("_TABLE").then(|| format!("t-{name}")))
    })
    .expect("test configuration");
    let store = Arc::new(InMemoryApiKeys::new());
    for (key, user, tier) in keys {
        store
            .put(&ApiKeyRecord::new(hash_api_key(key), *user, *tier))
            .await
            .expect("store a test API key");
    }
    let llm = Arc::new(ScriptedLlm::new(
        ModelRegistry::builtin().expect("built-in model registry"),
    ));
    let services = Services::in_memory(config, llm.clone(), store).expect("in-memory services");
    InMemory { services, llm }
}

/// A router's whole answer, body read.
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The body as text (an SSE stream, for instance).
    pub fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).expect("a UTF-8 body")
    }
}

/// Sends one request through `router` and reads the whole answer.
pub async fn call(router: Router, request: Request<Body>) -> Reply {
    let response = router.oneshot(request).await.expect("the router answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the body can be read")
        .to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// What a function's router does with requests that `cargo lambda watch` cannot deliver as they
/// are (it answers CORS itself, answers a non-UTF-8 `application/json` body and a non-ASCII
/// header with its own 500, and keeps one copy of a repeated header). Each check takes the
/// function's router (`app`), one of its POST routes taking a JSON body, and a valid API key.
pub mod hardening {
    use super::*;

    const FOREIGN_ORIGIN: &str = "https://attacker.example";

    /// No `Access-Control-*` header for a foreign origin, on plain, preflight, refused and
    /// unauthenticated requests: CORS belongs to the function URL's configuration.
    pub async fn no_cors_header_for_a_foreign_origin(
        app: impl Fn() -> Router,
        route: &str,
        key: &str,
    ) {
        let requests = [
            Request::get("/health")
                .header("origin", FOREIGN_ORIGIN)
                .body(Body::empty())
                .unwrap(),
            Request::options(route)
                .header("origin", FOREIGN_ORIGIN)
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "x-api-key, content-type")
                .body(Body::empty())
                .unwrap(),
            Request::post(route)
                .header("origin", FOREIGN_ORIGIN)
                .header("x-api-key", key)
                .header("content-type", "application/json")
                .body(Body::from(r#"{"no such field": ""}"#))
                .unwrap(),
            Request::post(route)
                .header("origin", FOREIGN_ORIGIN)
                .body(Body::empty())
                .unwrap(),
        ];
        for request in requests {
            let what = format!("{} {}", request.method(), request.uri());
            let reply = call(app(), request).await;
            for header in reply.headers.keys() {
                assert!(
                    !header.as_str().starts_with("access-control-"),
                    "{what}: the function itself sent {header}"
                );
            }
        }
    }

    /// A JSON body that is not UTF-8 is 400 `invalid_json`.
    pub async fn a_json_body_that_is_not_utf8_is_400(
        app: impl Fn() -> Router,
        route: &str,
        key: &str,
    ) {
        let request = Request::post(route)
            .header("x-api-key", key)
            .header("content-type", "application/json")
            // In the first key, so that every route meets it before any field of its own.
            .body(Body::from(&b"{\"caf\xc3\x28 \xff\xfe\": \"a\"}"[..]))
            .unwrap();
        let reply = call(app(), request).await;
        let json = reply.json();
        assert_eq!(reply.status, 400, "{json}");
        assert_eq!(json["error"]["code"], "invalid_json");
    }

    /// An API key with non-ASCII bytes, or sent twice, is 401 `invalid_credentials`, never
    /// taken as one of the two or as anonymous.
    pub async fn non_ascii_or_repeated_api_keys_are_401(
        app: impl Fn() -> Router,
        route: &str,
        key: &str,
    ) {
        let non_ascii = Request::post(route)
            .header(
                "x-api-key",
                HeaderValue::from_bytes(b"gwk_\xff\xfe").unwrap(),
            )
            .header("content-type", "application/json")
            .body(Body::from(r#"{"message": "hi"}"#))
            .unwrap();
        let repeated = Request::post(route)
            .header("x-api-key", key)
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body(Body::from(r#"{"message": "hi"}"#))
            .unwrap();
        for request in [non_ascii, repeated] {
            let reply = call(app(), request).await;
            let json = reply.json();
            assert_eq!(reply.status, 401, "{json}");
            assert_eq!(json["error"]["code"], "invalid_credentials");
        }
    }
}

/// The three [`hardening`] checks as `#[tokio::test]`s for one function: `$app` makes its
/// router from [`Services`] (e.g. `chat::app`), `$route` is one of its POST routes taking a JSON
/// body. The test crate needs `tokio` (with its `macros`) among its dependencies.
#[macro_export]
macro_rules! router_hardening_tests {
    ($app:expr, $route:expr) => {
        const HARDENING_KEY: &str = "gwk_hardening_test";

        async fn hardening_app() -> impl Fn() -> ::axum::Router {
            let harness = $crate::in_memory(
                &[(HARDENING_KEY, "hardening", ::shared::auth::Tier::Pro)],
                &[],
            )
            .await;
            let make = $app;
            move || make(harness.services.clone())
        }

        #[tokio::test]
        async fn no_cors_header_for_a_foreign_origin_on_any_kind_of_request() {
            $crate::hardening::no_cors_header_for_a_foreign_origin(
                hardening_app().await,
                $route,
                HARDENING_KEY,
            )
            .await;
        }

        #[tokio::test]
        async fn a_json_body_that_is_not_utf8_is_400_invalid_json() {
            $crate::hardening::a_json_body_that_is_not_utf8_is_400(
                hardening_app().await,
                $route,
                HARDENING_KEY,
            )
            .await;
        }

        #[tokio::test]
        async fn non_ascii_or_repeated_api_keys_are_401() {
            $crate::hardening::non_ascii_or_repeated_api_keys_are_401(
                hardening_app().await,
                $route,
                HARDENING_KEY,
            )
            .await;
        }
    };
}
