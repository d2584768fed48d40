//! Harness for the integration tests.
//!
//! The tests talk to the real function binaries served by `cargo lambda watch`, to the DynamoDB
//! emulator and to the mock LLM, all started by `infra/devstack.py run -- <command>`. That script
//! exports where they are (`GW_*` variables) next to the functions' own environment
//! (`API_KEYS_TABLE`, `JWT_SECRET`, ...). Without it a test fails with [`NEEDS_STACK`]: it never
//! skips silently.
//!
//! nextest runs every test in its own process, all against one stack, so nothing here resets
//! shared state. Instead each test
//! - creates its own users ([`Stack::new_user`], [`Stack::jwt_user`]), which gives it its own
//!   rate-limit counters and conversations, and
//! - puts a [`unique`] marker into the messages it sends, so the upstream requests it caused can
//!   be picked out of the mock's log ([`Stack::upstream_requests_with`]) and no other test can
//!   share its response-cache entries (the cache key does not include the caller).

pub mod disturb;
pub mod forge;
pub mod load;
pub mod sam;
pub mod store;
pub mod template;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::auth::{
    ApiKeyRecord, ApiKeyStore, DynamoApiKeys, Tier, generate_api_key, hash_api_key,
};
use shared::llm::ModelRegistry;

/// What a test reports when the local stack's environment is missing.
pub const NEEDS_STACK: &str = "this test needs the local stack: run `make test` \
     (infra/devstack.py run -- cargo nextest run)";

/// The function binaries of the workspace, each behind its own function URL.
pub const FUNCTIONS: [&str; 4] = ["chat", "stream", "analyze", "batch"];

/// `cargo lambda watch` compiles a function on its first invocation when the stack did not build
/// it already; a generous client timeout keeps that from looking like a hang.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// The mock keeps this many request bodies (`MAX_RECORDED_REQUESTS` in infra/mock-llm).
const MOCK_LOG_CAPACITY: usize = 1000;

/// How long a minted test token stays valid.
const JWT_LIFETIME_SECS: i64 = 600;

/// Request and token quotas of the free tier under the local stack (see [`free_tier_quota`]).
const STACK_FREE_REQUESTS_PER_HOUR: u64 = 5;
const STACK_FREE_TOKENS_PER_MINUTE: u64 = 3_000;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{0} is not set; {NEEDS_STACK}")]
    MissingVar(String),
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("API key store: {0}")]
    Store(#[from] shared::ApiError),
    #[error("JWT: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
    #[error("model registry: {0}")]
    Registry(#[from] shared::llm::RegistryError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Unexpected(String),
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// How often [`Stack::send`] resends a `GET` or `HEAD` that `cargo lambda watch` failed itself.
pub const WATCH_FAULT_RETRIES: u32 = 3;

/// A variable the local stack exports; absent or empty is an error naming it.
pub fn stack_var(name: &str) -> Result<String> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => Ok(value),
        _ => Err(HarnessError::MissingVar(name.to_owned())),
    }
}

/// A per-test unique token: `prefix` and 32 hex digits, no spaces or punctuation, so it survives
/// the mock's echo of the last user message and is safe in a `[mock key=...]` directive.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// `(requests per hour, tokens per minute)` of the free tier as the stack configures it.
///
/// The local stack lowers the free tier's quotas so limits can be reached in a test; the values
/// come from the stack's environment when it exports them, else the documented test quotas.
pub fn free_tier_quota() -> (u64, u64) {
    (
        env_u64(
            "RATE_LIMIT_FREE_REQUESTS_PER_HOUR",
            STACK_FREE_REQUESTS_PER_HOUR,
        ),
        env_u64(
            "RATE_LIMIT_FREE_TOKENS_PER_MINUTE",
            STACK_FREE_TOKENS_PER_MINUTE,
        ),
    )
}

/// Requests per hour of `tier` under the stack (the architecture's defaults unless overridden).
pub fn requests_per_hour(tier: Tier) -> u64 {
    match tier {
        Tier::Free => free_tier_quota().0,
        Tier::Pro => env_u64("RATE_LIMIT_PRO_REQUESTS_PER_HOUR", 1_000),
        Tier::Enterprise => env_u64("RATE_LIMIT_ENTERPRISE_REQUESTS_PER_HOUR", 10_000),
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The `N` of a mock reply that starts with `[mock] messages=<N> last=...`: how many messages the
/// upstream request carried.
pub fn mock_message_count(reply: &str) -> Option<usize> {
    reply
        .strip_prefix("[mock] messages=")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How many characters of the last user message the mock echoes (`ECHO_CHARS` in
/// infra/mock-llm/src/reply.rs).
const MOCK_ECHO_CHARS: usize = 40;

/// The start of the mock's reply to an upstream request of `messages` messages whose last user
/// message is `last_user` (without `[mock ...]` directives): `[mock] messages=<N> last=<echo>`.
pub fn mock_reply_prefix(messages: usize, last_user: &str) -> String {
    let collapsed = last_user.split_whitespace().collect::<Vec<_>>().join(" ");
    let echo: String = collapsed.chars().take(MOCK_ECHO_CHARS).collect();
    format!("[mock] messages={messages} last={}", echo.trim_end())
}

/// USD for `prompt` and `completion` tokens at `model`'s registry prices.
pub fn expected_cost(model: &shared::llm::ModelInfo, prompt: u64, completion: u64) -> f64 {
    // Token counts in tests are tiny, far below f64's exact integer range.
    (prompt as f64 * model.input_per_1k_usd + completion as f64 * model.output_per_1k_usd) / 1000.0
}

/// Whether two USD amounts agree up to floating-point noise (sums of per-turn costs may be
/// added in another order than the test adds them).
pub fn same_cost(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 + 1e-9 * a.abs().max(b.abs())
}

/// Whether `value` is an RFC 3339 timestamp.
pub fn is_rfc3339(value: &str) -> bool {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).is_ok()
}

/// Seconds since the Unix epoch.
pub fn now_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ------------------------------------------------------------------------------------------
// The stack

/// Where the local stack is, and an HTTP client for it.
#[derive(Debug, Clone)]
pub struct Stack {
    functions_url: String,
    mock_url: String,
    dev_api_key: String,
    template: PathBuf,
    env_file: PathBuf,
    table_prefix: String,
    http: reqwest::Client,
}

impl Stack {
    /// Reads the `GW_*` variables of `infra/devstack.py run`.
    pub fn from_env() -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .no_proxy()
            .build()?;
        Ok(Self {
            functions_url: stack_var("GW_FUNCTIONS_URL")?
                .trim_end_matches('/')
                .to_owned(),
            mock_url: stack_var("GW_MOCK_LLM_URL")?
                .trim_end_matches('/')
                .to_owned(),
            dev_api_key: stack_var("GW_DEV_API_KEY")?,
            template: PathBuf::from(stack_var("GW_TEMPLATE")?),
            env_file: PathBuf::from(stack_var("GW_STACK_ENV_FILE")?),
            table_prefix: stack_var("GW_TABLE_PREFIX")?,
            http,
        })
    }

    /// [`Stack::from_env`] for tests: without the stack the test fails with [`NEEDS_STACK`].
    #[allow(
        clippy::panic,
        reason = "a test that cannot reach the stack must fail loudly, never skip"
    )]
    pub fn require() -> Self {
        match Self::from_env() {
            Ok(stack) => stack,
            Err(err) => panic!("{err}"),
        }
    }

    /// `$GW_FUNCTIONS_URL/<function>/<path>`.
    pub fn url(&self, function: &str, path: &str) -> String {
        format!(
            "{}/{function}/{}",
            self.functions_url,
            path.trim_start_matches('/')
        )
    }

    /// [`Stack::url`] with query parameters, percent-encoded.
    pub fn url_with_query(&self, function: &str, path: &str, query: &[(&str, &str)]) -> String {
        match Url::parse(&self.url(function, path)) {
            Ok(mut url) => {
                url.query_pairs_mut().extend_pairs(query);
                url.into()
            }
            // `url()` of a valid base is always a valid URL; keep whatever it is so the request
            // itself reports the problem.
            Err(_) => self.url(function, path),
        }
    }

    pub fn functions_url(&self) -> &str {
        &self.functions_url
    }

    pub fn mock_url(&self) -> &str {
        &self.mock_url
    }

    /// The stack's own key (user `dev`, tier pro). Tests that count anything use their own user.
    pub fn dev_api_key(&self) -> &str {
        &self.dev_api_key
    }

    /// Absolute path of template.yaml.
    pub fn template_path(&self) -> &Path {
        &self.template
    }

    /// The env file the functions were started with.
    pub fn env_file(&self) -> &Path {
        &self.env_file
    }

    pub fn table_prefix(&self) -> &str {
        &self.table_prefix
    }

    /// The workspace root (the directory of template.yaml).
    pub fn workspace_root(&self) -> &Path {
        self.template.parent().unwrap_or(Path::new("."))
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A request to a function route, with `caller`'s credentials.
    pub fn request(
        &self,
        method: Method,
        function: &str,
        path: &str,
        caller: &Caller,
    ) -> RequestBuilder {
        caller.authorize(self.http.request(method, self.url(function, path)))
    }

    /// Sends `request` and reads the whole answer.
    ///
    /// A `GET` or `HEAD` that `cargo lambda watch` itself failed ([`Reply::is_watch_fault`]) is
    /// sent again, at most [`WATCH_FAULT_RETRIES`] times, and each resend is reported on stderr.
    /// Nothing else is retried: a function's own 500 comes back as it is, and so does a watch
    /// fault on any other method, whose first attempt may have changed state.
    pub async fn send(&self, request: RequestBuilder) -> Result<Reply> {
        let (client, request) = request.build_split();
        let mut request = request?;
        let idempotent = matches!(*request.method(), Method::GET | Method::HEAD);
        let mut resends = 0;
        loop {
            let again = if idempotent {
                request.try_clone()
            } else {
                None
            };
            let target = format!("{} {}", request.method(), request.url());
            let reply = Reply::read(client.execute(request).await?).await?;
            match again {
                Some(again) if reply.is_watch_fault() && resends < WATCH_FAULT_RETRIES => {
                    resends += 1;
                    #[allow(clippy::print_stderr)]
                    {
                        eprintln!(
                            "{target}: cargo lambda watch answered its own 500 (see Reply::is_watch_fault); resend {resends} of {WATCH_FAULT_RETRIES}"
                        );
                    }
                    request = again;
                }
                _ => return Ok(reply),
            }
        }
    }

    /// `GET <function>/<path>` as `caller`.
    pub async fn get(&self, function: &str, path: &str, caller: &Caller) -> Result<Reply> {
        self.send(self.request(Method::GET, function, path, caller))
            .await
    }

    /// `function`'s OpenAPI document (`GET <function>/openapi.json`, which must answer 200).
    pub async fn openapi(&self, function: &str) -> Result<Value> {
        let doc = self
            .get(function, "openapi.json", &Caller::anonymous())
            .await?;
        doc.assert_status(200);
        Ok(doc.json)
    }

    /// `POST <function>/<path>` with a JSON body as `caller`.
    pub async fn post_json(
        &self,
        function: &str,
        path: &str,
        caller: &Caller,
        body: &Value,
    ) -> Result<Reply> {
        self.send(
            self.request(Method::POST, function, path, caller)
                .json(body),
        )
        .await
    }

    // -- chat ------------------------------------------------------------------------------

    /// `POST /chat/chat` with `body`.
    pub async fn chat(&self, caller: &Caller, body: &Value) -> Result<Reply> {
        self.post_json("chat", "chat", caller, body).await
    }

    /// One successful chat turn; anything but 200 is an error carrying the whole reply.
    pub async fn chat_ok(&self, caller: &Caller, body: &Value) -> Result<Value> {
        let reply = self.chat(caller, body).await?;
        if reply.status != StatusCode::OK {
            return Err(HarnessError::Unexpected(format!(
                "POST /chat/chat {body} answered\n{reply}"
            )));
        }
        Ok(reply.json)
    }

    /// `GET /chat/conversations/{id}` as `caller`.
    pub async fn conversation(&self, caller: &Caller, id: &str) -> Result<Reply> {
        self.get("chat", &format!("conversations/{id}"), caller)
            .await
    }

    // -- mock LLM ---------------------------------------------------------------------------

    /// `GET /mock/stats`. Other tests run at the same time, so totals only ever grow; compare
    /// per-marker request counts ([`Stack::upstream_requests_with`]) instead of totals.
    pub async fn mock_stats(&self) -> Result<MockStats> {
        let response = self
            .http
            .get(format!("{}/mock/stats", self.mock_url))
            .send()
            .await?
            .error_for_status()?;
        Ok(response.json().await?)
    }

    /// The last `limit` chat-completion requests the mock received, oldest first.
    pub async fn mock_requests(&self, limit: usize) -> Result<Vec<UpstreamRequest>> {
        let response = self
            .http
            .get(format!("{}/mock/requests?limit={limit}", self.mock_url))
            .send()
            .await?
            .error_for_status()?;
        Ok(response.json().await?)
    }

    /// `POST /mock/reset`: forgets counters, recorded requests and `times` usage of **every**
    /// test running against this stack. Only for a test that runs alone; parallel tests must
    /// use unique markers and `key=` values instead.
    pub async fn mock_reset(&self) -> Result<()> {
        self.http
            .post(format!("{}/mock/reset", self.mock_url))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// The upstream requests, oldest first, whose body mentions `marker` anywhere (a message,
    /// the system prompt, history).
    pub async fn upstream_requests_with(&self, marker: &str) -> Result<Vec<UpstreamRequest>> {
        Ok(self
            .mock_requests(MOCK_LOG_CAPACITY)
            .await?
            .into_iter()
            .filter(|request| request.mentions(marker))
            .collect())
    }

    /// The one upstream request whose last message's content is exactly `content`.
    pub async fn upstream_request_ending_with(&self, content: &str) -> Result<UpstreamRequest> {
        let mut found: Vec<UpstreamRequest> = self
            .mock_requests(MOCK_LOG_CAPACITY)
            .await?
            .into_iter()
            .filter(|request| {
                request
                    .messages()
                    .last()
                    .is_some_and(|m| m["content"].as_str() == Some(content))
            })
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            n => Err(HarnessError::Unexpected(format!(
                "expected exactly one upstream request ending with {content:?}, found {n}"
            ))),
        }
    }

    // -- principals -------------------------------------------------------------------------

    /// A DynamoDB client for the emulator (never for a real account: the endpoint must be set).
    pub async fn dynamodb(&self) -> Result<aws_sdk_dynamodb::Client> {
        stack_var("AWS_ENDPOINT_URL_DYNAMODB")?;
        Ok(shared::dynamo::client().await)
    }

    async fn api_keys(&self) -> Result<DynamoApiKeys> {
        let table = stack_var("API_KEYS_TABLE")?;
        Ok(DynamoApiKeys::new(self.dynamodb().await?, table))
    }

    /// A fresh user of `tier` with a new API key stored (hashed) in the ApiKeys table, so the
    /// test has its own rate-limit counters and conversations.
    pub async fn new_user(&self, tier: Tier) -> Result<Caller> {
        self.new_key_for(&unique("it-user-"), tier).await
    }

    /// Another API key for an existing user id.
    pub async fn new_key_for(&self, user_id: &str, tier: Tier) -> Result<Caller> {
        let key = generate_api_key();
        let record = ApiKeyRecord::new(hash_api_key(&key), user_id, tier);
        self.api_keys().await?.put(&record).await?;
        Ok(Caller {
            user_id: user_id.to_owned(),
            tier,
            credential: Credential::ApiKey(key),
        })
    }

    /// Marks `caller`'s API key revoked; `false` when it has none or it was not stored.
    pub async fn revoke(&self, caller: &Caller) -> Result<bool> {
        match caller.api_key() {
            Some(key) => Ok(self.api_keys().await?.revoke(&hash_api_key(key)).await?),
            None => Ok(false),
        }
    }

    /// A fresh user authenticated by an HS256 JWT signed with the stack's `JWT_SECRET`;
    /// `tier: None` leaves the claim out (the gateway then assumes free).
    pub async fn jwt_user(&self, tier: Option<Tier>) -> Result<Caller> {
        let user_id = unique("it-jwt-");
        let mut claims = json!({"sub": user_id, "exp": jwt_expiry(JWT_LIFETIME_SECS)});
        if let Some(tier) = tier {
            claims["tier"] = json!(tier.as_str());
        }
        let token = mint_jwt(&stack_var("JWT_SECRET")?, &claims)?;
        Ok(Caller {
            user_id,
            tier: tier.unwrap_or(Tier::Free),
            credential: Credential::Bearer(token),
        })
    }

    /// The model registry the functions serve: `MODEL_REGISTRY_PATH` when the stack sets it
    /// (relative paths are taken from the workspace root, the functions' working directory),
    /// else the compiled-in one.
    pub fn registry(&self) -> Result<ModelRegistry> {
        let registry = match std::env::var("MODEL_REGISTRY_PATH") {
            Ok(path) if !path.trim().is_empty() => {
                ModelRegistry::from_path(&self.workspace_root().join(path))?
            }
            _ => ModelRegistry::builtin()?,
        };
        match std::env::var("DEFAULT_MODEL") {
            Ok(model) if !model.trim().is_empty() => Ok(registry.with_default(&model)?),
            _ => Ok(registry),
        }
    }
}

/// `exp` for a token that expires `offset_secs` from now (negative: already expired).
pub fn jwt_expiry(offset_secs: i64) -> i64 {
    i64::try_from(now_epoch())
        .unwrap_or(i64::MAX)
        .saturating_add(offset_secs)
}

/// An HS256 token over `claims`.
pub fn mint_jwt(secret: &str, claims: &Value) -> Result<String> {
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

// ------------------------------------------------------------------------------------------
// Callers

/// How a request proves who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// `X-API-Key: <key>`.
    ApiKey(String),
    /// `Authorization: Bearer <value>` (a JWT, or an API key the way OpenAI SDKs send it).
    Bearer(String),
    None,
}

/// A principal the test acts as.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: String,
    pub tier: Tier,
    pub credential: Credential,
}

impl Caller {
    /// No credentials at all.
    pub fn anonymous() -> Self {
        Self {
            user_id: String::new(),
            tier: Tier::Free,
            credential: Credential::None,
        }
    }

    /// Someone presenting `credential` (which may be invalid) on behalf of nobody in particular.
    pub fn presenting(credential: Credential) -> Self {
        Self {
            credential,
            ..Self::anonymous()
        }
    }

    /// The same principal presenting its API key as `Authorization: Bearer <key>`.
    pub fn with_api_key_as_bearer(&self) -> Self {
        let credential = match &self.credential {
            Credential::ApiKey(key) => Credential::Bearer(key.clone()),
            other => other.clone(),
        };
        Self {
            credential,
            ..self.clone()
        }
    }

    /// The API key, when this caller uses one (in either header).
    pub fn api_key(&self) -> Option<&str> {
        match &self.credential {
            Credential::ApiKey(key) => Some(key),
            Credential::Bearer(value) if value.starts_with(shared::auth::API_KEY_PREFIX) => {
                Some(value)
            }
            _ => None,
        }
    }

    /// Adds the credential headers to `request`.
    pub fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.credential {
            Credential::ApiKey(key) => request.header("x-api-key", key),
            Credential::Bearer(value) => request.bearer_auth(value),
            Credential::None => request,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Replies

/// A whole HTTP answer: status, headers, body text and the body as JSON (`Null` if it is not).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Reply {
    pub async fn read(response: reqwest::Response) -> Result<Self> {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await?;
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Self {
            status,
            headers,
            text,
            json,
        })
    }

    /// A header as text (the first one when repeated).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A header as an unsigned integer.
    pub fn header_u64(&self, name: &str) -> Option<u64> {
        self.header(name).and_then(|v| v.trim().parse().ok())
    }

    /// `error.code` of an error envelope.
    pub fn error_code(&self) -> Option<&str> {
        self.json["error"]["code"].as_str()
    }

    /// Whether this is `cargo lambda watch`'s own 500, not an answer of the function.
    ///
    /// watch (1.9.2) answers the runtime's `POST .../response` as soon as it has the head, before
    /// it has read the body. Under strace, a lost answer looked like this: watch read the first
    /// 16 KiB of the runtime's POST, answered it 200, read the rest of the body, then got EOF:
    /// the function's runtime client had closed that connection instead of reusing it for its
    /// next `GET .../next`. watch failed the invocation on that close and answered the caller
    /// with its own problem document, although the function had logged a normal answer. Only
    /// answers larger than that first read are hit, about 4 % of chat's and batch's OpenAPI
    /// documents (18 KB) with two callers in a loop (RELIABILITY.md). The harness asks for gzip,
    /// so the functions' large answers usually travel well below 16 KiB; this resend covers the
    /// rest. Lambda's runtime API and the emulator under `sam local` are other implementations.
    ///
    /// It is recognisable: every answer of a function carries `x-request-id`; watch's has none,
    /// is `text/plain`, and names `httpstatuses.com/500` as its type.
    pub fn is_watch_fault(&self) -> bool {
        self.status == StatusCode::INTERNAL_SERVER_ERROR
            && self.header("x-request-id").is_none()
            && self
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/plain"))
            && self.json["type"] == "https://httpstatuses.com/500"
    }

    /// Asserts the status, showing the whole reply when it differs.
    #[track_caller]
    pub fn assert_status(&self, expected: u16) -> &Self {
        let origin = if self.is_watch_fault() {
            " (this 500 is cargo lambda watch's own, not the function's: see Reply::is_watch_fault)"
        } else {
            ""
        };
        assert_eq!(
            self.status.as_u16(),
            expected,
            "unexpected status{origin}; the reply was\n{self}"
        );
        self
    }

    /// Asserts that this is the contract's error envelope with `status` and `code`:
    /// `{"error": {"type", "code", "message", "param", "request_id"}}`, every key present, and
    /// `request_id` equal to the `x-request-id` header.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) -> &Self {
        self.assert_status(status);
        // Without an `error` object, compare against an empty one so the assertions below name
        // the missing keys.
        let empty = serde_json::Map::new();
        let error = self.json["error"].as_object().unwrap_or(&empty);
        for key in ["type", "code", "message", "param", "request_id"] {
            assert!(
                error.contains_key(key),
                "error envelope lacks `{key}`; the reply was\n{self}"
            );
        }
        assert!(
            error["type"].as_str().is_some_and(|t| !t.is_empty()),
            "error.type must be a non-empty string; the reply was\n{self}"
        );
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error.message must be a non-empty string; the reply was\n{self}"
        );
        assert_eq!(
            self.error_code(),
            Some(code),
            "unexpected error code; the reply was\n{self}"
        );
        let header = self.header("x-request-id");
        assert!(
            header.is_some_and(|h| !h.is_empty()),
            "x-request-id header missing; the reply was\n{self}"
        );
        assert_eq!(
            error["request_id"].as_str(),
            header,
            "error.request_id must equal the x-request-id header; the reply was\n{self}"
        );
        self
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 4_000;
        writeln!(f, "HTTP {}", self.status)?;
        for (name, value) in &self.headers {
            writeln!(f, "{name}: {}", value.to_str().unwrap_or("<binary>"))?;
        }
        let body: String = self.text.chars().take(SHOWN).collect();
        write!(f, "\n{body}")?;
        if self.text.chars().count() > SHOWN {
            write!(f, "... ({} bytes in all)", self.text.len())?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Mock LLM introspection

/// `GET /mock/stats`.
#[derive(Debug, Clone, Deserialize)]
pub struct MockStats {
    pub total: u64,
    pub by_model: BTreeMap<String, u64>,
}

/// One chat-completion request as the mock received it (`GET /mock/requests`).
#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamRequest {
    pub model: Option<String>,
    /// Only the `x-mock-*` headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub body: Value,
}

impl UpstreamRequest {
    /// The `messages` array of the body.
    pub fn messages(&self) -> &[Value] {
        self.body["messages"].as_array().map_or(&[], Vec::as_slice)
    }

    /// `(role, content)` of every message whose content is plain text.
    pub fn turns(&self) -> Vec<(String, String)> {
        self.messages()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap_or_default().to_owned(),
                    m["content"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// Whether `marker` occurs anywhere in the body.
    pub fn mentions(&self, marker: &str) -> bool {
        self.body.to_string().contains(marker)
    }

    /// The prompt tokens the mock reports for this request: per message, its whitespace-separated
    /// words plus 4 (`prompt_tokens` in infra/mock-llm/src/reply.rs).
    pub fn mock_prompt_tokens(&self) -> u64 {
        self.turns()
            .iter()
            .map(|(_, content)| content.split_whitespace().count() as u64 + 4)
            .sum()
    }

    /// The completion limit the request asked for, under either OpenAI field name.
    pub fn token_limit(&self) -> Option<u64> {
        self.body["max_completion_tokens"]
            .as_u64()
            .or_else(|| self.body["max_tokens"].as_u64())
    }
}

// ------------------------------------------------------------------------------------------
// Streaming helpers

impl Stack {
    /// Streamed answers of requests carrying `[mock key=<key>]` whose client went away before
    /// the end, as the mock counted them (`streams_cancelled_by_key` of `GET /mock/stats`).
    pub async fn mock_streams_cancelled(&self, key: &str) -> Result<u64> {
        let response = self
            .http
            .get(format!("{}/mock/stats", self.mock_url))
            .send()
            .await?
            .error_for_status()?;
        let stats: Value = response.json().await?;
        if !stats["streams_cancelled_by_key"].is_object() {
            return Err(HarnessError::Unexpected(format!(
                "GET /mock/stats has no streams_cancelled_by_key: {stats}"
            )));
        }
        Ok(stats["streams_cancelled_by_key"][key].as_u64().unwrap_or(0))
    }
}

/// A Python interpreter that can import the pinned `openai` package: `python` on PATH (the
/// venv's under `infra/devstack.py run`), else the workspace's `.venv`.
pub async fn python_with_openai() -> Result<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    for candidate in [PathBuf::from("python"), venv] {
        let probe = tokio::process::Command::new(&candidate)
            .args(["-c", "import openai"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await;
        if probe.is_ok_and(|status| status.success()) {
            return Ok(candidate);
        }
    }
    Err(HarnessError::Unexpected(
        "no Python with the `openai` package: run infra/bootstrap.sh (it installs the pinned \
         tools into .venv)"
            .to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn reply(status: u16, headers: &[(&str, &str)], text: &str) -> Reply {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            text: text.to_owned(),
            json: serde_json::from_str(text).unwrap_or(Value::Null),
        }
    }

    const WATCH_PROBLEM: &str =
        r#"{"type":"https://httpstatuses.com/500","status":500,"title":"Internal Server Error"}"#;

    #[test]
    fn watch_own_500_is_told_apart_from_every_answer_of_a_function() {
        let plain = [("content-type", "text/plain; charset=utf-8")];
        assert!(reply(500, &plain, WATCH_PROBLEM).is_watch_fault());

        // A function's 500 is the JSON envelope with a request id: never resent.
        let envelope = r#"{"error":{"type":"server_error","code":"internal","message":"x","param":null,"request_id":"r"}}"#;
        let function = [("content-type", "application/json"), ("x-request-id", "r")];
        assert!(!reply(500, &function, envelope).is_watch_fault());
        // Even the problem document is not watch's when a function stamped it.
        let stamped = [("content-type", "text/plain"), ("x-request-id", "r")];
        assert!(!reply(500, &stamped, WATCH_PROBLEM).is_watch_fault());
        // Another status, another type, or JSON: not watch's 500.
        assert!(!reply(502, &plain, WATCH_PROBLEM).is_watch_fault());
        assert!(!reply(500, &plain, r#"{"type":"about:blank"}"#).is_watch_fault());
        let json = [("content-type", "application/json")];
        assert!(!reply(500, &json, WATCH_PROBLEM).is_watch_fault());
    }
}
