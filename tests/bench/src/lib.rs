//! In-process overhead of the chat handler: the whole `chat` router (request context, auth,
//! JSON extraction, validation, the chat turn, response rendering) driven by a plain timed loop
//! over `tower::ServiceExt::oneshot`, on `Services::in_memory` with a `ScriptedLlm`. No Lambda,
//! no network, no emulator: what is left is the cost of our own code per request.
//!
//! Each scenario checks every answer (status, and whether it came from the cache), so a
//! benchmark that silently measured an error path fails instead of reporting a fast number.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;
use serde_json::{Value, json};
use shared::auth::InMemoryApiKeys;
use shared::llm::{ModelRegistry, Scripted, ScriptedLlm};
use shared::services::Services;
use tower::ServiceExt;

/// HS256 secret of the in-process configuration (never used outside this process).
const SECRET: &str = "bench-in-process-secret-0123456789abcdef";
/// A conversation is continued for this many turns, then a new one starts, so the prompt
/// carries 0..=18 stored messages like the emulator runs of `make bench`.
const TURNS_PER_CONVERSATION: usize = 10;
const REPLY: &str = "A short answer of about a dozen words, like the mock LLM gives by default.";

/// What a loop measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// `GET /health`: the shared layers alone.
    Health,
    /// `POST /chat` continuing a conversation with a new message: history, admission, cache
    /// lookup (a miss), the scripted model, the turn write, settlement and the cache fill.
    ChatMiss,
    /// `POST /chat` repeating a cached prompt: admission, cache hit, the turn write.
    ChatHit,
}

impl Scenario {
    pub const ALL: [Scenario; 3] = [Scenario::Health, Scenario::ChatMiss, Scenario::ChatHit];

    pub fn name(self) -> &'static str {
        match self {
            Self::Health => "health",
            Self::ChatMiss => "chat_miss",
            Self::ChatHit => "chat_hit",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("setting up the in-memory services: {0}")]
    Setup(String),
    #[error("{scenario} request {index}: {problem}")]
    Answer {
        scenario: &'static str,
        index: usize,
        problem: String,
    },
}

/// Percentiles of one scenario, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub scenario: &'static str,
    pub iterations: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn summarize(scenario: Scenario, mut samples: Vec<Duration>) -> Summary {
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let total: Duration = samples.iter().sum();
    Summary {
        scenario: scenario.name(),
        iterations: samples.len(),
        p50_us: us(percentile(&samples, 50.0)),
        p90_us: us(percentile(&samples, 90.0)),
        p99_us: us(percentile(&samples, 99.0)),
        mean_us: us(total) / samples.len().max(1) as f64,
        max_us: us(samples.last().copied().unwrap_or_default()),
    }
}

/// The chat router on in-memory stores, with the scripted model it calls.
pub struct Harness {
    app: Router,
    llm: Arc<ScriptedLlm>,
    bearer: String,
}

impl Harness {
    pub fn new() -> Result<Self, BenchError> {
        let setup = |e: &dyn std::fmt::Display| BenchError::Setup(e.to_string());
        let config = shared::Config::from_lookup(|name| match name {
            "JWT_SECRET" => Some(SECRET.to_owned()),
            // Quotas far above what a loop can use: admission still runs, and always admits.
            "RATE_LIMIT_PRO_REQUESTS_PER_HOUR" => Some("1000000000".to_owned()),
            "RATE_LIMIT_PRO_TOKENS_PER_MINUTE" => Some("4000000000".to_owned()),
            _ => name.ends_with("_TABLE").then(|| format!("bench-{name}")),
        })
        .map_err(|e| setup(&e))?;
        let registry = ModelRegistry::builtin().map_err(|e| setup(&e))?;
        let llm = Arc::new(ScriptedLlm::new(registry));
        let services = Services::in_memory(config, llm.clone(), Arc::new(InMemoryApiKeys::new()))
            .map_err(|e| setup(&e))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| setup(&e))?
            .as_secs();
        let token = jsonwebtoken::encode(
            &Header::default(),
            &json!({"sub": "bench", "tier": "pro", "iat": now, "exp": now + 86_400}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .map_err(|e| setup(&e))?;
        Ok(Self {
            app: chat::app(services),
            llm,
            bearer: format!("Bearer {token}"),
        })
    }

    fn request(&self, scenario: Scenario, body: &Value) -> Result<Request<Body>, BenchError> {
        let built = match scenario {
            Scenario::Health => Request::get("/health").body(Body::empty()),
            Scenario::ChatMiss | Scenario::ChatHit => Request::post("/chat")
                .header("authorization", &self.bearer)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string())),
        };
        built.map_err(|e| BenchError::Setup(e.to_string()))
    }

    /// One timed request; the answer's body is read inside the timed region.
    async fn call(&self, request: Request<Body>) -> Result<(Duration, u16, Value), axum::BoxError> {
        let started = Instant::now();
        let response = self.app.clone().oneshot(request).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        let elapsed = started.elapsed();
        Ok((
            elapsed,
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// Runs `warmup` unmeasured then `iterations` measured requests of `scenario`.
    pub async fn run(
        &self,
        scenario: Scenario,
        warmup: usize,
        iterations: usize,
    ) -> Result<Vec<Duration>, BenchError> {
        let name = scenario.name();
        let mut samples = Vec::with_capacity(iterations);
        let mut conversation: Option<String> = None;
        let mut turns = 0;
        for index in 0..warmup + iterations {
            let body = match scenario {
                Scenario::Health => Value::Null,
                Scenario::ChatHit => json!({"message": "What is the capital of France?"}),
                Scenario::ChatMiss => {
                    if turns == TURNS_PER_CONVERSATION {
                        conversation = None;
                        turns = 0;
                    }
                    let mut body = json!({"message": format!("Question number {index}: why is the sky blue?")});
                    if let Some(id) = &conversation {
                        body["conversation_id"] = json!(id);
                    }
                    body
                }
            };
            // The model's answer is scripted outside the timed region.
            let expect_upstream =
                scenario == Scenario::ChatMiss || (scenario == Scenario::ChatHit && index == 0);
            if expect_upstream {
                self.llm.push(Scripted::Reply(REPLY.to_owned()));
            }
            let request = self.request(scenario, &body)?;
            let (elapsed, status, answer) =
                self.call(request).await.map_err(|e| BenchError::Answer {
                    scenario: name,
                    index,
                    problem: e.to_string(),
                })?;
            let fail = |problem: String| BenchError::Answer {
                scenario: name,
                index,
                problem,
            };
            if status != 200 {
                return Err(fail(format!("status {status}: {answer}")));
            }
            if scenario != Scenario::Health {
                let cached = answer["cached"].as_bool();
                if cached != Some(!expect_upstream) {
                    return Err(fail(format!(
                        "expected cached={}, got {answer}",
                        !expect_upstream
                    )));
                }
            }
            if scenario == Scenario::ChatMiss {
                conversation = answer["conversation_id"].as_str().map(str::to_owned);
                turns += 1;
            }
            if index >= warmup {
                samples.push(elapsed);
            }
        }
        if self.llm.remaining() != 0 {
            return Err(BenchError::Answer {
                scenario: name,
                index: warmup + iterations,
                problem: format!("{} scripted replies were never used", self.llm.remaining()),
            });
        }
        Ok(samples)
    }
}
