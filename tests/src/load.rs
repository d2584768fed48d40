//! The bounded load test with injected upstream faults (reliability suite).
//!
//! The test (`tests/reliability_load.rs`) prepares users and conversations, writes a
//! [`LoadPlan`], and starts several `load-worker` processes (`src/bin/load_worker.rs`). Each
//! worker runs [`run_worker`]: `concurrency` tasks that send requests over `chat` and `stream`
//! until the plan's duration is over, each choosing its operation and its fault from its own
//! seeded RNG, and records one [`Outcome`] per request. The test then checks every invariant
//! against the outcomes, the DynamoDB emulator and the function processes.

use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The mock's answer length in words (= tokens) that every load request asks for.
pub const MOCK_ANSWER_TOKENS: u64 = 12;

/// A request that takes longer than this is a hang: the test fails on it.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// What one load run does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadPlan {
    pub seed: u64,
    pub duration_ms: u64,
    /// Requests in flight per worker process.
    pub concurrency: usize,
    /// `$GW_FUNCTIONS_URL`.
    pub functions_url: String,
    /// Free-tier keys shared by every worker: their hourly quota must hold across processes.
    pub free_keys: Vec<String>,
    /// Pro-tier keys that own the conversations.
    pub pro_keys: Vec<String>,
    /// One pro key whose token counter is reconciled with the upstream's usage afterwards.
    pub ledger_key: String,
    /// Conversations continued concurrently by every worker: `(conversation id, index into
    /// pro_keys of its owner)`.
    pub shared_conversations: Vec<(String, usize)>,
    /// `max_tokens` of free-tier requests: small, so the hourly request quota is what binds.
    pub free_max_tokens: u32,
    /// `max_tokens` of every other request.
    pub max_tokens: u32,
}

/// The upstream fault a request asks the mock LLM for (`[mock ...]` directive in its message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Fault {
    None,
    /// 429 with `Retry-After: 1` on every attempt.
    RateLimited,
    /// 429 on the first attempt only: the gateway's retry succeeds.
    RateLimitedOnce,
    /// 500 on every attempt.
    ServerError,
    /// 500 on the first attempt only.
    ServerErrorOnce,
    /// No answer at all until the gateway's upstream timeout fires, on every attempt.
    Hang,
    /// The answer is cut off after three pieces (mid-stream for `stream`, a truncated body for
    /// `chat`).
    Cut,
}

impl Fault {
    /// The mix of the issue: 10% 429, 5% 500, 5% hangs, 5% cuts; half of the 429s and 500s
    /// happen on the first attempt only, so retries that succeed are exercised too.
    pub fn draw(rng: &mut impl Rng) -> Self {
        match rng.random_range(0..1000) {
            0..750 => Self::None,
            750..800 => Self::RateLimited,
            800..850 => Self::RateLimitedOnce,
            850..875 => Self::ServerError,
            875..900 => Self::ServerErrorOnce,
            900..950 => Self::Hang,
            _ => Self::Cut,
        }
    }

    /// The directive for this fault. It sets every option the mock reads, because the mock
    /// applies the directives of *every* message it receives, history included, in order: a
    /// continued conversation carries earlier turns' directives, and only a directive that
    /// restates all of them makes this request's own fault the one that counts. `key` names
    /// this request's `times` counter; a fault on every attempt has an unreachable `times`.
    pub fn directive(self, key: &str) -> String {
        const EVERY_ATTEMPT: u32 = u32::MAX;
        let (fault, times) = match self {
            Self::None => ("none", EVERY_ATTEMPT),
            Self::RateLimited => ("429", EVERY_ATTEMPT),
            Self::RateLimitedOnce => ("429", 1),
            Self::ServerError => ("500", EVERY_ATTEMPT),
            Self::ServerErrorOnce => ("500", 1),
            Self::Hang => ("hang", EVERY_ATTEMPT),
            Self::Cut => ("cut", EVERY_ATTEMPT),
        };
        format!(
            "[mock fault={fault} times={times} key={key} retry_after=1 hang_ms=600000 \
             cut_after=3 tokens={MOCK_ANSWER_TOKENS} ttft_ms=0 token_ms=0 latency_ms=0] "
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::RateLimited => "429",
            Self::RateLimitedOnce => "429 once",
            Self::ServerError => "500",
            Self::ServerErrorOnce => "500 once",
            Self::Hang => "hang",
            Self::Cut => "cut",
        }
    }
}

/// Whose request it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Audience {
    /// A free-tier key (index into `free_keys`).
    Free(usize),
    /// A pro key (index into `pro_keys`).
    Pro(usize),
    /// The ledger key.
    Ledger,
}

/// What the client saw of a `text/event-stream` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamSeen {
    /// `conversation_id` of the `start` event, when there was one.
    pub start: Option<String>,
    /// The `delta` contents, concatenated.
    pub text: String,
    /// The `done` event.
    pub done: Option<Value>,
    /// `error.code` of the `error` event.
    pub error_code: Option<String>,
    /// Whether `data: [DONE]` closed the stream.
    pub done_marker: bool,
}

/// One request and everything observed about its answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub worker: usize,
    /// `chat` or `stream`.
    pub function: String,
    /// The documented route (`/chat` or `/chat/stream`).
    pub route: String,
    pub audience: Audience,
    pub fault: Fault,
    pub message: String,
    /// The conversation the request continued, if any.
    pub continued: Option<String>,
    /// 0 when no HTTP answer arrived.
    pub status: u16,
    /// `error.code` of an error envelope answer.
    pub error_code: Option<String>,
    /// A 200 JSON answer (chat).
    pub answer: Option<Value>,
    /// An SSE answer (stream).
    pub stream: Option<StreamSeen>,
    /// Anything that breaks the contract: a transport error, a timeout, a body that is not the
    /// documented shape, an SSE sequence out of order or not closed by `[DONE]`.
    pub problem: Option<String>,
    pub latency_ms: u64,
}

impl Outcome {
    /// The conversation a successful turn was stored in.
    pub fn stored_in(&self) -> Option<String> {
        if let Some(answer) = &self.answer {
            return answer["conversation_id"].as_str().map(str::to_owned);
        }
        self.stream
            .as_ref()
            .and_then(|s| s.done.as_ref())
            .and_then(|done| done["conversation_id"].as_str().map(str::to_owned))
    }

    /// `usage.total_tokens` the gateway reported for a completed answer.
    pub fn reported_usage(&self) -> Option<&Value> {
        if let Some(answer) = &self.answer {
            return Some(&answer["usage"]);
        }
        self.stream
            .as_ref()
            .and_then(|s| s.done.as_ref())
            .map(|done| &done["usage"])
    }

    /// `cost_estimate` of a completed answer.
    pub fn reported_cost(&self) -> Option<f64> {
        if let Some(answer) = &self.answer {
            return answer["cost_estimate"].as_f64();
        }
        self.stream
            .as_ref()
            .and_then(|s| s.done.as_ref())
            .and_then(|done| done["cost_estimate"].as_f64())
    }

    /// A name for the outcome in the run's figures: `200`, `200 sse error <code>`, `429
    /// rate_limit_exceeded`, ...
    pub fn label(&self) -> String {
        if let Some(problem) = &self.problem {
            let short: String = problem.chars().take(60).collect();
            return format!("PROBLEM {short}");
        }
        match (&self.stream, &self.error_code) {
            (Some(s), _) if s.done.is_some() => "200 sse done".to_owned(),
            (Some(s), _) => format!(
                "200 sse error {} ({})",
                s.error_code.as_deref().unwrap_or("?"),
                if s.start.is_some() {
                    "after start"
                } else {
                    "before start"
                }
            ),
            (None, Some(code)) => format!("{} {code}", self.status),
            (None, None) => self.status.to_string(),
        }
    }
}

/// One request the worker decided to send.
struct Operation {
    function: &'static str,
    route: &'static str,
    audience: Audience,
    key: String,
    fault: Fault,
    continued: Option<String>,
    max_tokens: u32,
}

fn choose(plan: &LoadPlan, rng: &mut StdRng) -> Operation {
    let pick = rng.random_range(0..100);
    // The ledger always streams: a stream cut after it started is the case where "reconcile"
    // needs the gateway's own estimate, and the ledger must see some.
    let streamed = (20..35).contains(&pick) || rng.random_bool(0.5);
    let (function, route) = if streamed {
        ("stream", "/chat/stream")
    } else {
        ("chat", "/chat")
    };
    let fault = Fault::draw(rng);
    let (audience, key, continued, max_tokens) = match pick {
        0..20 if !plan.free_keys.is_empty() => {
            let i = rng.random_range(0..plan.free_keys.len());
            (
                Audience::Free(i),
                plan.free_keys[i].clone(),
                None,
                plan.free_max_tokens,
            )
        }
        20..35 => (
            Audience::Ledger,
            plan.ledger_key.clone(),
            None,
            plan.max_tokens,
        ),
        35..70 if !plan.shared_conversations.is_empty() => {
            let (id, owner) =
                &plan.shared_conversations[rng.random_range(0..plan.shared_conversations.len())];
            (
                Audience::Pro(*owner),
                plan.pro_keys.get(*owner).cloned().unwrap_or_default(),
                Some(id.clone()),
                plan.max_tokens,
            )
        }
        _ => {
            let i = rng.random_range(0..plan.pro_keys.len().max(1));
            (
                Audience::Pro(i),
                plan.pro_keys.get(i).cloned().unwrap_or_default(),
                None,
                plan.max_tokens,
            )
        }
    };
    Operation {
        function,
        route,
        audience,
        key,
        fault,
        continued,
        max_tokens,
    }
}

/// Runs one worker's share of the plan and returns its outcomes.
pub async fn run_worker(plan: &LoadPlan, worker: usize) -> Vec<Outcome> {
    let http = match reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .no_proxy()
        .pool_max_idle_per_host(plan.concurrency)
        .build()
    {
        Ok(http) => http,
        Err(err) => {
            return vec![Outcome {
                worker,
                function: String::new(),
                route: String::new(),
                audience: Audience::Ledger,
                fault: Fault::None,
                message: String::new(),
                continued: None,
                status: 0,
                error_code: None,
                answer: None,
                stream: None,
                problem: Some(format!("cannot build an HTTP client: {err}")),
                latency_ms: 0,
            }];
        }
    };
    let deadline = Instant::now() + Duration::from_millis(plan.duration_ms);
    let tasks = (0..plan.concurrency).map(|slot| {
        let http = http.clone();
        async move {
            // Every task has its own RNG, so the sequence of operations it chooses is the same
            // on every run with this seed (the timing, and so the interleaving, is not).
            let task_seed = plan.seed ^ ((worker as u64) << 32) ^ (slot as u64);
            let mut rng = StdRng::seed_from_u64(task_seed);
            let mut outcomes = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let op = choose(plan, &mut rng);
                let tag = format!("s{}w{worker}t{slot}n{n}", plan.seed);
                outcomes.push(execute(&http, plan, worker, op, &tag).await);
                n += 1;
            }
            outcomes
        }
    });
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

async fn execute(
    http: &reqwest::Client,
    plan: &LoadPlan,
    worker: usize,
    op: Operation,
    tag: &str,
) -> Outcome {
    let message = format!("{}load {tag}", op.fault.directive(tag));
    let mut body = json!({"message": message, "max_tokens": op.max_tokens});
    if let Some(id) = &op.continued {
        body["conversation_id"] = json!(id);
    }
    let url = format!(
        "{}/{}/{}",
        plan.functions_url.trim_end_matches('/'),
        op.function,
        op.route.trim_start_matches('/')
    );
    let mut outcome = Outcome {
        worker,
        function: op.function.to_owned(),
        route: op.route.to_owned(),
        audience: op.audience,
        fault: op.fault,
        message,
        continued: op.continued.clone(),
        status: 0,
        error_code: None,
        answer: None,
        stream: None,
        problem: None,
        latency_ms: 0,
    };
    let started = Instant::now();
    let sent = http
        .post(&url)
        .header("x-api-key", &op.key)
        .json(&body)
        .send()
        .await;
    match sent {
        Err(err) => outcome.problem = Some(format!("transport: {err}")),
        Ok(response) => read_answer(response, &mut outcome).await,
    }
    outcome.latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    outcome
}

async fn read_answer(response: reqwest::Response, outcome: &mut Outcome) {
    outcome.status = response.status().as_u16();
    let event_stream = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if outcome.status == 200 && event_stream {
        let (seen, problem) = read_event_stream(response).await;
        outcome.stream = Some(seen);
        outcome.problem = problem;
        return;
    }
    let text = match response.text().await {
        Ok(text) => text,
        Err(err) => {
            outcome.problem = Some(format!("body: {err}"));
            return;
        }
    };
    let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if outcome.status == 200 {
        if json["conversation_id"].is_string() && json["usage"]["total_tokens"].is_u64() {
            outcome.answer = Some(json);
        } else {
            outcome.problem = Some(format!("200 without a ChatResponse: {text:.200}"));
        }
        return;
    }
    match envelope_code(&json) {
        Some(code) => outcome.error_code = Some(code),
        None => outcome.problem = Some(format!("error without the envelope: {text:.200}")),
    }
}

/// `error.code` of a well-formed error envelope body (`{"type", "code", "message", "param",
/// "request_id"}` all present).
pub fn envelope_code(json: &Value) -> Option<String> {
    let error = json.get("error")?.as_object()?;
    let complete = ["type", "code", "message", "param", "request_id"]
        .iter()
        .all(|k| error.contains_key(*k));
    complete
        .then(|| error["code"].as_str().map(str::to_owned))
        .flatten()
}

/// Reads an SSE answer of `/chat/stream` and checks its grammar: (`start` `delta`* (`done` |
/// `error`) | `error`) then `[DONE]`, nothing after.
async fn read_event_stream(response: reqwest::Response) -> (StreamSeen, Option<String>) {
    let mut seen = StreamSeen::default();
    let mut events = response.bytes_stream().eventsource();
    let mut finished = false;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(err) => return (seen, Some(format!("stream broke: {err}"))),
        };
        if seen.done_marker {
            return (seen, Some(format!("data after [DONE]: {}", event.data)));
        }
        if event.data == "[DONE]" {
            seen.done_marker = true;
            continue;
        }
        let data: Value = match serde_json::from_str(&event.data) {
            Ok(data) => data,
            Err(_) => return (seen, Some(format!("event is not JSON: {}", event.data))),
        };
        let kind = data["type"].as_str().unwrap_or_default();
        let in_order = match kind {
            "start" => seen.start.is_none() && !finished,
            "delta" => seen.start.is_some() && !finished,
            "done" => seen.start.is_some() && !finished,
            "error" => !finished,
            _ => false,
        };
        if !in_order {
            return (seen, Some(format!("event out of order: {}", event.data)));
        }
        match kind {
            "start" => {
                seen.start = data["conversation_id"].as_str().map(str::to_owned);
                if seen.start.is_none() {
                    return (seen, Some(format!("start without id: {}", event.data)));
                }
            }
            "delta" => seen
                .text
                .push_str(data["content"].as_str().unwrap_or_default()),
            "done" => {
                finished = true;
                seen.done = Some(data);
            }
            _ => {
                finished = true;
                match envelope_code(&data) {
                    Some(code) => seen.error_code = Some(code),
                    None => {
                        return (
                            seen,
                            Some(format!("error event without the envelope: {data}")),
                        );
                    }
                }
            }
        }
    }
    let problem = if !seen.done_marker {
        Some("stream ended without [DONE]".to_owned())
    } else if !finished {
        Some("[DONE] without a done or error event".to_owned())
    } else {
        None
    };
    (seen, problem)
}
