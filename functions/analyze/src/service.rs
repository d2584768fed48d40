//! One analysis: admission, cache, the tasks run concurrently, settlement.
//!
//! Rate limits count an analysis as **one request**, whatever its tasks. When the LLM will be
//! asked, the token reservation is the sum over tasks of the estimated prompt plus the task's
//! output budget (one attempt each); after the calls it is settled against the usage the
//! provider reported, retries included. With `mode=auto` a request whose token reservation does
//! not fit this minute's budget is still served, by the local methods
//! (`fallback_reason: token_budget`); with `mode=llm` it is a 429.
//!
//! The response cache key is the SHA-256 of the content, the sorted tasks, the resolved
//! language, the mode, `top_k`, `summary_sentences`, the keyword algorithm, the model and
//! whether an LLM is configured. Only complete analyses are stored (no task failed, and no
//! task fell back because of a passing LLM failure), for the configured TTL (1 h by default).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use shared::auth::Principal;
use shared::cache::CacheKey;
use shared::chat::TokenUsage;
use shared::error::ApiError;
use shared::llm::CompletionRequest;
use shared::ratelimit::{Admitted, LimitStatus};
use shared::services::Services;
use shared::telemetry::{MetricEvent, Unit};

use crate::llm::{InvalidReply, TaskSpec};
use crate::local::{LocalAnalyzer, detect_language};
use crate::request::{AnalysisJob, Language, Mode, Task};
use crate::response::{AnalysisResults, AnalyzeResponse, CachedAnalysis, TaskResult};

/// `fallback_reason` of local results when `mode=auto` has no LLM to ask.
const NOT_CONFIGURED: &str = "llm_not_configured";
/// `fallback_reason` when the token budget of the minute could not hold the LLM calls.
const TOKEN_BUDGET: &str = "token_budget";
/// `fallback_reason` (and log code) of a reply that failed validation twice.
const INVALID_REPLY: &str = "invalid_llm_reply";

/// In `mode=auto` the LLM attempt must end this long before the invocation's deadline, so the
/// local fallback (which may first have to load jieba) still has time to answer.
const FALLBACK_RESERVE: Duration = Duration::from_secs(2);

/// Reasons that describe the deployment rather than a passing failure: results carrying them
/// may be cached.
const STABLE_REASONS: [&str; 1] = [NOT_CONFIGURED];

/// How the tasks of one analysis use the LLM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LlmUse {
    /// Local methods only; the reason is recorded on each result when there is one.
    Never(Option<&'static str>),
    /// `mode=llm` without a configured provider: every task fails with 503.
    Unavailable,
    /// `mode=llm`.
    Only,
    /// `mode=auto`: local methods for any task the LLM fails.
    WithFallback,
}

/// Tokens and money one task spent upstream.
#[derive(Debug, Clone)]
struct Spend {
    usage: TokenUsage,
    cost: f64,
    calls: u32,
}

impl Default for Spend {
    fn default() -> Self {
        Self {
            usage: TokenUsage {
                prompt_tokens: 0,
                completion_tokens: 0,
                total_tokens: 0,
            },
            cost: 0.0,
            calls: 0,
        }
    }
}

impl Spend {
    fn add(&mut self, other: &Spend) {
        self.usage.prompt_tokens += other.usage.prompt_tokens;
        self.usage.completion_tokens += other.usage.completion_tokens;
        self.usage.total_tokens += other.usage.total_tokens;
        self.cost += other.cost;
        self.calls += other.calls;
    }
}

/// Why the LLM did not give a task's result.
enum LlmFailure {
    Upstream(ApiError),
    Invalid(InvalidReply),
}

impl LlmFailure {
    fn code(&self) -> &'static str {
        match self {
            LlmFailure::Upstream(err) => err.code(),
            LlmFailure::Invalid(_) => INVALID_REPLY,
        }
    }

    fn into_error(self, task: Task) -> ApiError {
        match self {
            LlmFailure::Upstream(err) => err,
            LlmFailure::Invalid(reason) => ApiError::UpstreamFailed {
                detail: format!("{} reply failed validation twice: {reason}", task.as_str()),
            },
        }
    }
}

struct TaskOutcome {
    task: Task,
    result: Result<TaskResult, ApiError>,
    spend: Spend,
}

/// Runs analyses; built once per cold start.
#[derive(Clone)]
pub struct Analyzer {
    services: Services,
    local: Arc<LocalAnalyzer>,
}

impl Analyzer {
    pub fn new(services: Services, local: Arc<LocalAnalyzer>) -> Self {
        Self { services, local }
    }

    pub fn local(&self) -> &Arc<LocalAnalyzer> {
        &self.local
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    fn llm_configured(&self) -> bool {
        self.services.config.llm.api_key.is_some()
    }

    /// Runs `job` for `principal`: the response and the rate-limit status for its headers.
    pub async fn analyze(
        &self,
        principal: &Principal,
        job: AnalysisJob,
        use_cache: bool,
        deadline: Option<Instant>,
    ) -> Result<(AnalyzeResponse, LimitStatus), ApiError> {
        let started = Instant::now();
        let language = job
            .language
            .unwrap_or_else(|| detect_language(&job.content));
        let model = self.services.chat.llm.registry().default_model().id.clone();
        let configured = self.llm_configured();
        let mut llm_use = match (job.mode, configured) {
            (Mode::Local, _) => LlmUse::Never(None),
            (Mode::Auto, false) => LlmUse::Never(Some(NOT_CONFIGURED)),
            (Mode::Llm, false) => LlmUse::Unavailable,
            (Mode::Llm, true) => LlmUse::Only,
            (Mode::Auto, true) => LlmUse::WithFallback,
        };
        let specs: Vec<TaskSpec> = job
            .tasks
            .iter()
            .map(|&task| TaskSpec {
                task,
                language,
                top_k: job.top_k,
                summary_sentences: job.summary_sentences,
            })
            .collect();
        // Built only when the LLM will be asked: each carries a copy of the content.
        let uses_llm = matches!(llm_use, LlmUse::Only | LlmUse::WithFallback);
        let requests: Vec<Option<CompletionRequest>> = specs
            .iter()
            .map(|spec| uses_llm.then(|| spec.request(&model, &job.content)))
            .collect();
        let estimate = requests
            .iter()
            .flatten()
            .map(|r| r.estimated_prompt_tokens() + u64::from(r.max_tokens))
            .sum();

        let admitted = self.admit(principal, estimate, &mut llm_use).await?;
        let key = cache_key(&job, language, &model, configured);
        if use_cache && let Some(hit) = self.cached(&key).await {
            self.settle(admitted.reservation, 0).await;
            record(&job, language, &hit.results, &[], true, &Spend::default());
            let response = AnalyzeResponse {
                results: hit.results,
                errors: Default::default(),
                language: hit.language,
                model: hit.model,
                usage: hit.usage,
                cost_estimate: 0.0,
                processing_time_ms: elapsed_ms(started),
                cached: true,
            };
            return Ok((response, admitted.status));
        }

        let content: Arc<str> = Arc::from(job.content.as_str());
        let outcomes =
            futures::future::join_all(specs.iter().zip(requests).map(|(spec, request)| {
                let request = (request, model.as_str());
                self.run_task(*spec, request, content.clone(), &job, llm_use, deadline)
            }))
            .await;

        let mut spend = Spend::default();
        for outcome in &outcomes {
            spend.add(&outcome.spend);
        }
        self.settle(admitted.reservation, spend.usage.total_tokens)
            .await;

        let mut results = AnalysisResults::default();
        let mut errors = std::collections::BTreeMap::new();
        let mut failures = Vec::new();
        let mut cacheable = true;
        for outcome in outcomes {
            match outcome.result {
                Ok(result) => {
                    cacheable &= result
                        .fallback_reason()
                        .is_none_or(|r| STABLE_REASONS.contains(&r));
                    result.store(&mut results);
                }
                Err(err) => {
                    cacheable = false;
                    errors.insert(outcome.task.as_str(), err.envelope());
                    failures.push(err);
                }
            }
        }
        record(&job, language, &results, &failures, false, &spend);
        if failures.len() == job.tasks.len() {
            return Err(every_task_failed(failures));
        }

        let model_used = (spend.calls > 0).then_some(model);
        if use_cache && cacheable {
            let cached = CachedAnalysis {
                results: results.clone(),
                language,
                model: model_used.clone(),
                usage: spend.usage,
            };
            self.store(&key, &cached).await;
        }
        let response = AnalyzeResponse {
            results,
            errors,
            language,
            model: model_used,
            usage: spend.usage,
            cost_estimate: spend.cost,
            processing_time_ms: elapsed_ms(started),
            cached: false,
        };
        Ok((response, admitted.status))
    }

    /// Counts the request and reserves the LLM tokens; in `mode=auto` a token budget that
    /// cannot hold the reservation turns the analysis local instead of failing it.
    async fn admit(
        &self,
        principal: &Principal,
        estimate: u64,
        llm_use: &mut LlmUse,
    ) -> Result<Admitted, ApiError> {
        let limiter = &self.services.chat.limiter;
        match limiter.admit(principal, 1, estimate).await {
            Ok(admitted) => Ok(admitted),
            Err(ApiError::RateLimited { .. }) if *llm_use == LlmUse::WithFallback => {
                // Rejected charges add nothing, so this only counts the request: if it was the
                // request quota that was exhausted, this fails the same way.
                let admitted = limiter.admit(principal, 1, 0).await?;
                *llm_use = LlmUse::Never(Some(TOKEN_BUDGET));
                Ok(admitted)
            }
            Err(err) => Err(err),
        }
    }

    async fn cached(&self, key: &CacheKey) -> Option<CachedAnalysis> {
        match self.services.chat.cache.get(key).await {
            Ok(Some(hit)) => serde_json::from_str(&hit.payload).ok(),
            Ok(None) => None,
            // The cache is an optimisation: a failing read is a miss.
            Err(err) => {
                tracing::warn!(error = %err, "analysis cache read failed");
                None
            }
        }
    }

    async fn store(&self, key: &CacheKey, analysis: &CachedAnalysis) {
        let Ok(payload) = serde_json::to_string(analysis) else {
            return;
        };
        let ttl = self.services.chat.cache_ttl;
        if let Err(err) = self.services.chat.cache.put(key, payload, ttl).await {
            tracing::warn!(error = %err, "analysis cache write failed");
        }
    }

    async fn settle(&self, reservation: shared::ratelimit::TokenReservation, used: u64) {
        if let Err(err) = self.services.chat.limiter.settle(reservation, used).await {
            tracing::warn!(error = %err, "settling a token reservation failed");
        }
    }

    async fn run_task(
        &self,
        spec: TaskSpec,
        (request, model): (Option<CompletionRequest>, &str),
        content: Arc<str>,
        job: &AnalysisJob,
        llm_use: LlmUse,
        deadline: Option<Instant>,
    ) -> TaskOutcome {
        let task = spec.task;
        let request = || request.unwrap_or_else(|| spec.request(model, &content));
        let local = |reason: Option<&str>| {
            let reason = reason.map(str::to_owned);
            let content = content.clone();
            async move {
                let result = self.run_local(task, content, job, spec.language).await;
                match reason {
                    Some(why) => result.map(|r| r.with_fallback_reason(&why)),
                    None => result,
                }
            }
        };
        let (result, spend) = match llm_use {
            LlmUse::Never(reason) => (local(reason).await, Spend::default()),
            LlmUse::Unavailable => (
                Err(ApiError::Unavailable {
                    dependency: "LLM",
                    detail: "mode=llm but no LLM provider is configured".to_owned(),
                }),
                Spend::default(),
            ),
            LlmUse::Only => {
                let (result, spend) = self.run_llm(spec, request(), &content, deadline).await;
                (result.map_err(|f| f.into_error(task)), spend)
            }
            LlmUse::WithFallback => {
                let llm_deadline = deadline.map(|d| d.checked_sub(FALLBACK_RESERVE).unwrap_or(d));
                let (result, spend) = self.run_llm(spec, request(), &content, llm_deadline).await;
                match result {
                    Ok(result) => (Ok(result), spend),
                    Err(failure) => (local(Some(failure.code())).await, spend),
                }
            }
        };
        TaskOutcome {
            task,
            result,
            spend,
        }
    }

    /// The LLM attempt of one task: the call, and one more with a reminder when the reply does
    /// not validate. Upstream errors are not retried here: the client already retried them.
    async fn run_llm(
        &self,
        spec: TaskSpec,
        request: CompletionRequest,
        content: &str,
        deadline: Option<Instant>,
    ) -> (Result<TaskResult, LlmFailure>, Spend) {
        let llm = &self.services.chat.llm;
        let mut spend = Spend::default();
        let mut current = request;
        for attempt in 0..2 {
            let completion = match llm.complete(&current, deadline).await {
                Ok(completion) => completion,
                Err(err) => return (Err(LlmFailure::Upstream(err)), spend),
            };
            spend.add(&Spend {
                usage: completion.usage.into(),
                cost: completion.cost_usd,
                calls: 1,
            });
            match spec.parse(&completion.content, content) {
                Ok(result) => return (Ok(result), spend),
                Err(problem) if attempt == 0 => {
                    tracing::info!(task = spec.task.as_str(), problem = %problem, "LLM reply rejected, asking again");
                    current = spec.retry(&current, problem.0);
                }
                Err(problem) => return (Err(LlmFailure::Invalid(problem)), spend),
            }
        }
        (
            Err(LlmFailure::Invalid(InvalidReply("no attempt was made"))),
            spend,
        )
    }

    /// A local method on a blocking thread: segmentation and ranking are CPU-bound and must not
    /// stall the runtime's other tasks.
    async fn run_local(
        &self,
        task: Task,
        content: Arc<str>,
        job: &AnalysisJob,
        language: Language,
    ) -> Result<TaskResult, ApiError> {
        let local = self.local.clone();
        let (top_k, sentences, algorithm) =
            (job.top_k, job.summary_sentences, job.keyword_algorithm);
        tokio::task::spawn_blocking(move || match task {
            Task::Sentiment => TaskResult::Sentiment(local.sentiment(&content, language)),
            Task::Keywords => {
                TaskResult::Keywords(local.keywords(&content, language, top_k, algorithm))
            }
            Task::Summary => TaskResult::Summary(local.summary(&content, language, sentences)),
            Task::Entities => TaskResult::Entities(local.entities(&content, language)),
        })
        .await
        .map_err(|err| ApiError::internal(format!("local {} failed: {err}", task.as_str())))
    }
}

/// The response-cache key of an analysis: everything that decides its results.
fn cache_key(job: &AnalysisJob, language: Language, model: &str, configured: bool) -> CacheKey {
    CacheKey::for_request(
        "analyze",
        &json!({
            "content": job.content,
            "tasks": job.tasks,
            "language": language,
            "mode": job.mode,
            "top_k": job.top_k,
            "summary_sentences": job.summary_sentences,
            "keyword_algorithm": job.keyword_algorithm,
            "model": model,
            "llm_configured": configured,
        }),
    )
}

/// The error of an analysis whose every task failed: the common error when they all failed
/// alike (a 503 for no provider, a 429 with its `Retry-After`, a 504), else a 502.
fn every_task_failed(mut failures: Vec<ApiError>) -> ApiError {
    let alike = failures
        .windows(2)
        .all(|pair| pair[0].code() == pair[1].code());
    if alike && !failures.is_empty() {
        return failures.swap_remove(0);
    }
    ApiError::UpstreamFailed {
        detail: "every analysis task failed".to_owned(),
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One log line and one metric per task: what ran and how, never the text.
fn record(
    job: &AnalysisJob,
    language: Language,
    results: &AnalysisResults,
    failures: &[ApiError],
    cached: bool,
    spend: &Spend,
) {
    let methods: Vec<String> = [
        results.sentiment.as_ref().map(|r| ("sentiment", r.method)),
        results.keywords.as_ref().map(|r| ("keywords", r.method)),
        results.summary.as_ref().map(|r| ("summary", r.method)),
        results.entities.as_ref().map(|r| ("entities", r.method)),
    ]
    .into_iter()
    .flatten()
    .map(|(task, method)| format!("{task}:{}", method.as_str()))
    .collect();
    tracing::info!(
        target: "analyze",
        language = language.as_str(),
        mode = job.mode.as_str(),
        content_chars = job.content.chars().count(),
        methods = methods.join(","),
        failed = failures.len(),
        llm_calls = spend.calls,
        total_tokens = spend.usage.total_tokens,
        cached,
        "analysis"
    );
    for method in methods {
        MetricEvent::new()
            .dimension("function", crate::FUNCTION_NAME)
            .dimension("task_method", method)
            .dimension("cached", if cached { "true" } else { "false" })
            .metric("AnalysisTasks", 1.0, Unit::Count)
            .emit();
    }
}
