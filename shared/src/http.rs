//! Axum pieces every function shares: the request-context layer (request id, process time,
//! one log line and one metric per request), the JSON body extractor with the contract's
//! 400/413/415/422 mapping, fallbacks, `GET /health` and `GET /openapi.json`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use utoipa::{OpenApi, ToSchema};

use crate::error::{ApiError, ErrorEnvelope, FieldError};
use crate::ratelimit::{LIMIT_HEADER, LimitStatus};
use crate::telemetry::{MetricEvent, Unit};

pub const REQUEST_ID_HEADER: &str = "x-request-id";
pub const PROCESS_TIME_HEADER: &str = "x-process-time-ms";
pub const CACHE_HEADER: &str = "x-cache";

/// `X-Cache: HIT|MISS`, on every response that could have come from the response cache.
pub fn set_cache_header(headers: &mut HeaderMap, hit: bool) {
    headers.insert(
        CACHE_HEADER,
        HeaderValue::from_static(if hit { "HIT" } else { "MISS" }),
    );
}

/// Static facts about the function serving a request.
#[derive(Debug, Clone, Copy)]
pub struct FunctionInfo {
    pub name: &'static str,
    pub version: &'static str,
    pub max_body_bytes: usize,
}

struct RequestScope {
    id: String,
    principal: OnceLock<String>,
    /// What the last admission of this request reported, for its `X-RateLimit-*` headers.
    limit: Mutex<Option<LimitStatus>>,
}

tokio::task_local! {
    static SCOPE: Arc<RequestScope>;
}

/// The id of the request being served, when called inside the request-context layer.
pub fn current_request_id() -> Option<String> {
    SCOPE.try_with(|s| s.id.clone()).ok()
}

/// Records who made the current request, for the request log line. Only a short hash is kept:
/// user ids can be e-mail addresses, which do not belong in logs.
pub fn record_principal(user_id: &str) {
    let digest = Sha256::digest(user_id.as_bytes());
    let short = hex::encode(&digest[..6]);
    let _ = SCOPE.try_with(|s| s.principal.set(short));
}

/// Records what an admission of the current request reported. Whatever the request's outcome
/// afterwards (an answer, an upstream 502, a 504 after the model timed out), its response then
/// carries the `X-RateLimit-*` headers, unless the handler set them itself.
pub fn record_limit(status: LimitStatus) {
    let _ = SCOPE.try_with(|s| {
        if let Ok(mut limit) = s.limit.lock() {
            *limit = Some(status);
        }
    });
}

/// A client-supplied id is kept when it is short and plain, so it can be correlated across
/// services without letting a client inject arbitrary text into logs and headers.
fn valid_request_id(value: &HeaderValue) -> Option<String> {
    let s = value.to_str().ok()?;
    let ok = (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| s.to_owned())
}

async fn request_context(
    State(info): State<FunctionInfo>,
    matched: Option<MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(valid_request_id)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = request.method().clone();
    request.extensions_mut().insert(info);
    let scope = Arc::new(RequestScope {
        id: id.clone(),
        principal: OnceLock::new(),
        limit: Mutex::new(None),
    });
    let mut response = SCOPE.scope(scope.clone(), next.run(request)).await;
    if !response.headers().contains_key(LIMIT_HEADER)
        && let Some(limit) = scope.limit.lock().ok().and_then(|l| *l)
    {
        limit.apply(response.headers_mut());
    }

    let elapsed = started.elapsed();
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{latency_ms:.2}")) {
        headers.insert(PROCESS_TIME_HEADER, v);
    }
    let status = response.status().as_u16();
    // Deliberately no headers or bodies here: they carry credentials and prompt text.
    tracing::info!(
        target: "request",
        request_id = %id,
        function = info.name,
        method = %method,
        route = %route,
        status,
        latency_ms = format!("{latency_ms:.2}"),
        principal = scope.principal.get().map_or("-", String::as_str),
        "request"
    );
    MetricEvent::new()
        .dimension("function", info.name)
        .dimension("route", route)
        .dimension("status", status.to_string())
        .metric("Requests", 1.0, Unit::Count)
        .metric("Latency", latency_ms, Unit::Milliseconds)
        .property("request_id", id)
        .emit();
    response
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Answers at least this large are gzip-compressed for a caller that accepts gzip.
pub const COMPRESS_ABOVE_BYTES: u64 = 1024;

/// Wraps a function's routes with everything the contract requires of every response.
///
/// Outermost, answers of [`COMPRESS_ABOVE_BYTES`] or more are gzip-compressed when the request
/// accepts gzip: function URLs do not compress on their own, and the large answers (a batch's
/// results, a conversation, the OpenAPI documents) are JSON that shrinks five- to tenfold, which
/// also keeps a big batch well inside Lambda's 6 MB limit for a buffered answer. lambda_http
/// sends a body with `Content-Encoding` base64-encoded, as Lambda requires for binary bodies.
/// Server-sent events are never compressed: a compressor holds bytes back, and a stream must
/// not wait.
pub fn serve(routes: Router, info: FunctionInfo) -> Router {
    let compress_when = SizeAbove::new(COMPRESS_ABOVE_BYTES)
        .and(NotForContentType::SSE)
        .and(NotForContentType::IMAGES)
        .and(NotForContentType::GRPC);
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(info.max_body_bytes))
        .layer(middleware::from_fn_with_state(info, request_context))
        .layer(CompressionLayer::new().compress_when(compress_when))
}

/// A JSON body, parsed with the contract's status mapping: wrong content type 415, too large
/// 413, malformed JSON or unknown field 400, wrong types or missing fields 422 naming the field.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = request
            .extensions()
            .get::<FunctionInfo>()
            .map_or(0, |i| i.max_body_bytes);
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge { limit }
                } else {
                    ApiError::bad_request("invalid_body", "the request body could not be read")
                }
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Query-string parameters with the contract's error mapping: 422 naming the parameter.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| ApiQuery(q.0))
            .map_err(|rejection| {
                let text = rejection.body_text();
                let field = query_field(&text);
                let msg = text
                    .rsplit(": ")
                    .next()
                    .unwrap_or("invalid query string")
                    .to_owned();
                ApiError::Validation(vec![FieldError::at("query", &field, "query", msg)])
            })
    }
}

/// The parameter a query-string rejection is about. serde_urlencoded names a failing value as
/// `<name>: <why>` (and quotes the offending text in backticks, which is not the name); an unknown
/// or missing field is named in backticks.
fn query_field(rejection: &str) -> String {
    let detail = rejection
        .split_once("query string: ")
        .map_or(rejection, |(_, detail)| detail);
    match detail.split_once(": ") {
        Some((name, _))
            if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.') =>
        {
            name.to_owned()
        }
        _ => backticked(detail).unwrap_or_default(),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// Parses a JSON document into `T` with the contract's error mapping (see [`ApiJson`]).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        classify_json_error(&path, &inner)
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request("invalid_json", format!("malformed JSON: {e}")))?;
    Ok(value)
}

fn classify_json_error(path: &str, err: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let message = err.to_string();
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request("invalid_json", format!("malformed JSON: {message}"))
        }
        Category::Data if message.starts_with("unknown field") => {
            let field = backticked(&message).unwrap_or_default();
            // The path already ends with the offending key, except at the root.
            let param = if path == "." || path.is_empty() {
                field
            } else {
                path.to_owned()
            };
            ApiError::BadRequest {
                code: "unknown_field",
                message: format!("unknown field '{param}'"),
                param: Some(param),
            }
        }
        Category::Data => {
            let parent = if path == "." { "" } else { path };
            let (field, kind) = match backticked(&message) {
                Some(name) if message.starts_with("missing field") => {
                    (join_path(parent, &name), "missing")
                }
                _ => (parent.to_owned(), "type_error"),
            };
            // serde's message ends with "at line L column C", which helps nobody in a 422.
            let msg = message
                .split(" at line ")
                .next()
                .unwrap_or(&message)
                .to_owned();
            ApiError::Validation(vec![FieldError::body(&field, kind, msg)])
        }
    }
}

fn join_path(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_owned()
    } else {
        format!("{parent}.{field}")
    }
}

fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

/// Liveness answer of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` when a deep check failed.
    pub status: &'static str,
    pub function: &'static str,
    pub version: &'static str,
    /// Deep checks only: each dependency and `ok` or `failed`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<&'static str, &'static str>,
}

/// A dependency that `GET /health?deep=true` checks.
#[async_trait::async_trait]
pub trait Probe: Send + Sync {
    fn name(&self) -> &'static str;
    async fn check(&self) -> Result<(), ApiError>;
}

/// The probes of a function, added to its router as an `Extension`.
#[derive(Clone, Default)]
pub struct Probes(pub Arc<Vec<Arc<dyn Probe>>>);

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HealthQuery {
    /// Also check DynamoDB and the LLM provider.
    pub deep: Option<bool>,
}

/// Liveness; with `deep=true` also DynamoDB and the LLM provider, each checked concurrently.
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    params(HealthQuery),
    responses(
        (status = 200, description = "The function (and, when deep, every dependency) is up", body = Health),
        (status = 422, description = "`deep` is not `true` or `false`", body = ErrorEnvelope),
        (status = 503, description = "A deep check failed; `checks` names it", body = Health)
    )
)]
pub async fn health(
    Extension(info): Extension<FunctionInfo>,
    extensions: axum::http::Extensions,
    ApiQuery(query): ApiQuery<HealthQuery>,
) -> Response {
    let deep = query.deep.unwrap_or(false);
    let mut checks = BTreeMap::new();
    if deep && let Some(probes) = extensions.get::<Probes>() {
        let results = futures::future::join_all(probes.0.iter().map(|p| async move {
            let outcome = p.check().await;
            if let Err(err) = &outcome {
                tracing::warn!(probe = p.name(), error = %err, "deep health check failed");
            }
            (p.name(), outcome.is_ok())
        }))
        .await;
        for (name, ok) in results {
            checks.insert(name, if ok { "ok" } else { "failed" });
        }
    }
    let healthy = checks.values().all(|v| *v == "ok");
    let body = Health {
        status: if healthy { "ok" } else { "degraded" },
        function: info.name,
        version: info.version,
        checks,
    };
    let status = if healthy {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// The Lambda invocation's deadline, when running under the Lambda runtime.
pub fn deadline(extensions: &axum::http::Extensions) -> Option<Instant> {
    let context = extensions.get::<lambda_http::Context>()?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis();
    let left = u128::from(context.deadline).checked_sub(now_ms)?;
    Some(Instant::now() + std::time::Duration::from_millis(u64::try_from(left).ok()?))
}

/// This function's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "OpenAPI 3.1 document of this function", content_type = "application/json"))
)]
pub async fn openapi_document() {}

/// Declares the two credential schemes (`X-API-Key` and `Authorization: Bearer`).
pub struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A JWT, or an API key (`gwk_...`) as OpenAI SDKs send it",
                    ))
                    .build(),
            ),
        );
    }
}

/// The parts of the API every function shares: health, the OpenAPI document, the error shape.
#[derive(OpenApi)]
#[openapi(
    paths(health, openapi_document),
    components(schemas(ErrorEnvelope, FieldError))
)]
pub struct CommonApi;

/// Routes for `/health` and `/openapi.json`, serving `doc` merged with [`CommonApi`]. The
/// document is rendered once at cold start, not per request.
pub fn common_routes(mut doc: utoipa::openapi::OpenApi) -> Router {
    doc.merge(CommonApi::openapi());
    document_shared_responses(&mut doc);
    let rendered = Bytes::from(doc.to_json().unwrap_or_else(|_| "{}".to_owned()));
    Router::new().route("/health", get(health)).route(
        "/openapi.json",
        get(move || {
            let body = rendered.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() }
        }),
    )
}

/// Adds the answers that the shared layers give on an operation, whatever its handler
/// documents: [`ApiJson`] answers 400, 413, 415 and 422 on every operation with a body, and the
/// [`crate::auth::Principal`] extractor 401 on every secured one. Clients and contract testers
/// (schemathesis, in the reliability suite) then find every status they can get documented.
/// A route annotates one of these statuses itself only to say something more specific (the
/// OpenAI route's 400 also covers `stream: true`); its description is then kept.
fn document_shared_responses(doc: &mut utoipa::openapi::OpenApi) {
    const BODY: [(&str, &str); 4] = [
        ("400", "Malformed JSON or unknown field"),
        ("413", "Body too large"),
        ("415", "Content type is not JSON"),
        ("422", "Validation failed; `details` names each field"),
    ];
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            if operation.request_body.is_some() {
                for (status, description) in BODY {
                    ensure_error_response(operation, status, description);
                }
            }
            if operation.security.is_some() {
                ensure_error_response(operation, "401", "Missing or invalid credentials");
            }
        }
    }
}

fn ensure_error_response(
    operation: &mut utoipa::openapi::path::Operation,
    status: &str,
    description: &str,
) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    operation
        .responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorEnvelope")))
                        .build(),
                )
                .build()
                .into()
        });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use axum::body::Body;
    use axum::routing::post;
    use http_body_util::BodyExt;
    use serde::Deserialize;
    use tower::ServiceExt;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Probe {
        message: String,
        temperature: Option<f64>,
        nested: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        depth: u32,
    }

    fn app() -> Router {
        let info = FunctionInfo {
            name: "test",
            version: "0.0.0",
            max_body_bytes: 1024,
        };
        let routes = Router::new()
            .route(
                "/echo",
                post(|ApiJson(p): ApiJson<Probe>| async move { p.message }),
            )
            .route("/big", get(|| async { Json(big_document()) }))
            .route(
                "/events",
                get(|| async {
                    let events = "data: {\"delta\":\"token\"}\n\n".repeat(200);
                    ([(header::CONTENT_TYPE, "text/event-stream")], events)
                }),
            )
            .merge(common_routes(utoipa::openapi::OpenApi::default()));
        serve(routes, info)
    }

    /// A JSON answer of about 6 KB, like a batch's results.
    fn big_document() -> serde_json::Value {
        let results: Vec<serde_json::Value> = (0..60)
            .map(|i| serde_json::json!({"id": format!("item-{i}"), "status": "ok", "answer": "the same answer"}))
            .collect();
        serde_json::json!({ "results": results })
    }

    async fn get_raw(path: &str, accept_encoding: Option<&str>) -> (HeaderMap, Bytes) {
        let mut request = axum::http::Request::get(path);
        if let Some(accept) = accept_encoding {
            request = request.header(header::ACCEPT_ENCODING, accept);
        }
        let response = app()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        (
            headers,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }

    #[tokio::test]
    async fn a_large_answer_is_gzipped_for_a_caller_that_accepts_gzip_and_plain_otherwise() {
        let (headers, body) = get_raw("/big", Some("gzip, deflate, br")).await;
        assert_eq!(headers[header::CONTENT_ENCODING], "gzip");
        assert!(headers.contains_key(REQUEST_ID_HEADER));
        let mut json = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut json)
            .unwrap();
        let plain = serde_json::to_vec(&big_document()).unwrap();
        assert_eq!(json, plain);
        assert!(
            body.len() * 5 < plain.len(),
            "{} bytes gzipped from {}",
            body.len(),
            plain.len()
        );

        let (headers, body) = get_raw("/big", None).await;
        assert!(!headers.contains_key(header::CONTENT_ENCODING));
        assert_eq!(body, plain);
        let (headers, _) = get_raw("/big", Some("identity")).await;
        assert!(!headers.contains_key(header::CONTENT_ENCODING));
    }

    #[tokio::test]
    async fn small_answers_and_event_streams_are_never_compressed() {
        let (headers, body) = get_raw("/health", Some("gzip")).await;
        assert!(!headers.contains_key(header::CONTENT_ENCODING));
        assert!((body.len() as u64) < COMPRESS_ABOVE_BYTES);

        let (headers, body) = get_raw("/events", Some("gzip")).await;
        assert!(!headers.contains_key(header::CONTENT_ENCODING));
        assert!(body.len() as u64 > COMPRESS_ABOVE_BYTES);
        assert!(body.starts_with(b"data: "));
    }

    async fn call(request: axum::http::Request<Body>) -> (u16, HeaderMap, serde_json::Value) {
        let response = app().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, headers, body)
    }

    fn post_json(body: impl Into<Body>) -> axum::http::Request<Body> {
        axum::http::Request::post("/echo")
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap()
    }

    #[tokio::test]
    async fn every_response_carries_request_id_and_process_time() {
        let (status, headers, body) = call(
            axum::http::Request::get("/health")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(body["status"], "ok");
        assert!(uuid::Uuid::parse_str(headers[REQUEST_ID_HEADER].to_str().unwrap()).is_ok());
        assert!(
            headers[PROCESS_TIME_HEADER]
                .to_str()
                .unwrap()
                .parse::<f64>()
                .is_ok()
        );
    }

    #[tokio::test]
    async fn keeps_a_valid_incoming_request_id_and_replaces_a_hostile_one() {
        let req = axum::http::Request::get("/health")
            .header(REQUEST_ID_HEADER, "trace-123.abc")
            .body(Body::empty())
            .unwrap();
        let (_, headers, _) = call(req).await;
        assert_eq!(headers[REQUEST_ID_HEADER], "trace-123.abc");

        let req = axum::http::Request::get("/health")
            .header(REQUEST_ID_HEADER, "a b\"<script>")
            .body(Body::empty())
            .unwrap();
        let (_, headers, _) = call(req).await;
        assert_ne!(headers[REQUEST_ID_HEADER], "a b\"<script>");
    }

    #[tokio::test]
    async fn error_envelope_carries_the_same_request_id_as_the_header() {
        let (status, headers, body) = call(
            axum::http::Request::get("/nope")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, 404);
        assert_eq!(
            body["error"]["request_id"],
            headers[REQUEST_ID_HEADER].to_str().unwrap()
        );
    }

    #[test]
    fn query_rejections_name_the_parameter_not_the_quoted_value() {
        let prefix = "Failed to deserialize query string: ";
        for (why, field) in [
            ("deep: provided string was not `true` or `false`", "deep"),
            ("limit: invalid digit found in string", "limit"),
            ("unknown field `foo`, expected `limit` or `cursor`", "foo"),
        ] {
            assert_eq!(query_field(&format!("{prefix}{why}")), field, "{why}");
        }
    }

    #[tokio::test]
    async fn health_deep_must_be_a_boolean() {
        for (query, status) in [
            ("", 200),
            ("?deep=false", 200),
            ("?deep=true", 200),
            ("?other=1", 200),
        ] {
            let (got, _, body) = call(
                axum::http::Request::get(format!("/health{query}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
            assert_eq!(got, status, "{query}: {body}");
        }
        let (status, _, body) = call(
            axum::http::Request::get("/health?deep=maybe")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(
            body["error"]["details"][0]["loc"],
            serde_json::json!(["query", "deep"])
        );
    }

    #[tokio::test]
    async fn wrong_method_is_405_with_envelope() {
        let (status, _, body) = call(
            axum::http::Request::delete("/health")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, 405);
        assert_eq!(body["error"]["code"], "method_not_allowed");
    }

    #[tokio::test]
    async fn malformed_json_is_400() {
        let (status, _, body) = call(post_json("{\"message\": ")).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["code"], "invalid_json");
        let (status, _, _) = call(post_json("{\"message\": \"a\"} trailing")).await;
        assert_eq!(status, 400);
    }

    #[tokio::test]
    async fn unknown_field_is_400_naming_it() {
        let (status, _, body) =
            call(post_json(r#"{"message":"a","nested":{"depth":1,"x":2}}"#)).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["code"], "unknown_field");
        assert_eq!(body["error"]["param"], "nested.x");
    }

    #[tokio::test]
    async fn wrong_type_and_missing_field_are_422_naming_the_field() {
        let (status, _, body) = call(post_json(r#"{"message":"a","temperature":"hot"}"#)).await;
        assert_eq!(status, 422);
        assert_eq!(
            body["error"]["details"][0]["loc"],
            serde_json::json!(["body", "temperature"])
        );

        let (status, _, body) = call(post_json(r#"{"temperature":1}"#)).await;
        assert_eq!(status, 422);
        assert_eq!(
            body["error"]["details"][0]["loc"],
            serde_json::json!(["body", "message"])
        );
        assert_eq!(body["error"]["details"][0]["type"], "missing");
    }

    #[tokio::test]
    async fn oversized_body_is_413_and_wrong_content_type_is_415() {
        let big = format!("{{\"message\":\"{}\"}}", "x".repeat(4096));
        let (status, _, body) = call(post_json(big)).await;
        assert_eq!(status, 413);
        assert_eq!(body["error"]["code"], "payload_too_large");

        let req = axum::http::Request::post("/echo")
            .header("content-type", "text/plain")
            .body(Body::from("{\"message\":\"a\"}"))
            .unwrap();
        let (status, _, _) = call(req).await;
        assert_eq!(status, 415);
    }

    #[tokio::test]
    async fn deeply_nested_json_is_rejected_without_crashing() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let body = format!("{{\"message\":\"a\",\"nested\":{deep}}}");
        let req = axum::http::Request::post("/echo")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        // Larger than the 1 KiB test limit: still a clean 413, never a stack overflow.
        let (status, _, _) = call(req).await;
        assert_eq!(status, 413);
        let err = parse_json::<Probe>(format!("{{\"nested\":{deep}}}").as_bytes()).unwrap_err();
        assert!(matches!(
            err,
            ApiError::BadRequest { .. } | ApiError::Validation(_)
        ));
    }

    #[test]
    fn shared_layer_responses_are_documented_on_every_operation() {
        use utoipa::openapi::path::{HttpMethod, OperationBuilder};
        use utoipa::openapi::request_body::RequestBodyBuilder;
        use utoipa::openapi::security::SecurityRequirement;
        use utoipa::openapi::{PathsBuilder, ResponseBuilder};
        let with_body = OperationBuilder::new()
            .request_body(Some(RequestBodyBuilder::new().build()))
            .security(SecurityRequirement::new("api_key", Vec::<String>::new()))
            .response("200", ResponseBuilder::new().description("ok").build())
            .response(
                "413",
                ResponseBuilder::new().description("own words").build(),
            )
            .build();
        let plain = OperationBuilder::new()
            .response("200", ResponseBuilder::new().description("ok").build())
            .build();
        let mut doc = utoipa::openapi::OpenApiBuilder::new()
            .paths(
                PathsBuilder::new()
                    .path(
                        "/in",
                        utoipa::openapi::PathItem::new(HttpMethod::Post, with_body),
                    )
                    .path(
                        "/out",
                        utoipa::openapi::PathItem::new(HttpMethod::Get, plain),
                    ),
            )
            .build();
        document_shared_responses(&mut doc);
        let json = serde_json::to_value(&doc).unwrap();
        let documented = |path: &str, method: &str| -> Vec<String> {
            json["paths"][path][method]["responses"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        assert_eq!(
            documented("/in", "post"),
            ["200", "400", "401", "413", "415", "422"]
        );
        assert_eq!(documented("/out", "get"), ["200"]);
        // What a handler documented itself is kept.
        assert_eq!(
            json["paths"]["/in"]["post"]["responses"]["413"]["description"],
            "own words"
        );
        assert_eq!(
            json["paths"]["/in"]["post"]["responses"]["415"]["content"]["application/json"]["schema"]
                ["$ref"],
            "#/components/schemas/ErrorEnvelope"
        );
    }

    #[tokio::test]
    async fn openapi_document_lists_shared_paths() {
        let (status, _, body) = call(
            axum::http::Request::get("/openapi.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        assert!(body["openapi"].as_str().unwrap().starts_with("3.1"));
        assert!(body["paths"]["/health"]["get"].is_object());
        assert!(body["components"]["schemas"]["ErrorEnvelope"].is_object());
    }
}
