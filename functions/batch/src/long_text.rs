//! `POST /batch/long-text`: split a long text at its best boundaries ([`crate::chunker`]), run
//! one task over every chunk concurrently, and optionally combine the chunk outputs with one
//! final call.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use shared::auth::Principal;
use shared::chat::TokenUsage;
use shared::error::ApiError;
use shared::llm::{ChatMessage, ModelRegistry};
use shared::ratelimit::LimitStatus;
use shared::services::Services;
use utoipa::ToSchema;

use crate::chunker;
use crate::fanout::{
    ItemResult, Problems, RunOptions, ValidItem, admit_all, check_models, check_options,
    check_range, elapsed_ms, run_all, run_item, token_estimate, totals,
};

pub const MAX_TEXT_CHARS: usize = 200_000;
pub const DEFAULT_CHUNK_CHARS: u64 = 2_000;
const MIN_CHUNK_CHARS: i64 = 200;
const MAX_CHUNK_CHARS: i64 = 20_000;
/// More chunks than this in one request is a sign the chunk size is too small.
pub const MAX_CHUNKS: usize = 500;
const MAX_INSTRUCTION_CHARS: usize = 2_000;
const MAX_LANGUAGE_CHARS: usize = 50;
const DEFAULT_LANGUAGE: &str = "English";

/// What to do with each chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LongTextTask {
    Summarize,
    Translate,
    /// Apply `instruction` to each chunk.
    Custom,
}

/// `POST /batch/long-text` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LongTextRequest {
    /// At most 200000 characters.
    pub text: String,
    /// Default `summarize`.
    pub task: Option<LongTextTask>,
    /// Required for `custom`: what to do with each chunk (at most 2000 characters).
    pub instruction: Option<String>,
    /// For `translate`; default English.
    pub target_language: Option<String>,
    /// Largest chunk in characters, 200..=20000 (default 2000).
    pub chunk_chars: Option<i64>,
    /// Models assigned to the chunks round-robin (default: the registry's default model).
    pub models: Option<Vec<String>>,
    /// Run one final call over the chunk outputs (default false).
    pub combine: Option<bool>,
    /// 1..=32, default 8.
    pub max_concurrency: Option<i64>,
    /// Per call, 500..=120000 ms (default 10000).
    pub timeout_ms: Option<i64>,
    /// 0..=2, default 0.7.
    pub temperature: Option<f64>,
    /// Completion limit per call, 1..=4000 (default 1000).
    pub max_tokens: Option<i64>,
}

/// A validated long-text request, already split.
#[derive(Debug, Clone, PartialEq)]
pub struct LongTextJob {
    pub task: LongTextTask,
    pub chunk_chars: usize,
    /// One item per chunk, in text order.
    pub chunks: Vec<ValidItem>,
    /// Characters of each chunk.
    pub sizes: Vec<usize>,
    /// The final call's instruction and model, when combining.
    pub combine: Option<(String, String)>,
    pub options: RunOptions,
}

fn instructions(task: LongTextTask, instruction: &str, language: &str) -> (String, String) {
    match task {
        LongTextTask::Summarize => (
            "Summarize the following part of a longer text. Keep the key facts, names and \
             numbers. Write the summary in the language of the text."
                .to_owned(),
            "The following are summaries of consecutive parts of one text. Merge them into \
             one coherent summary without repeating yourself."
                .to_owned(),
        ),
        LongTextTask::Translate => (
            format!(
                "Translate the following part of a longer text into {language}. Keep its \
                 formatting and output only the translation."
            ),
            format!(
                "The following are consecutive parts of one text, translated into {language}. \
                 Join them into one translation, smoothing the seams; do not summarize, omit \
                 or add anything."
            ),
        ),
        LongTextTask::Custom => (
            instruction.to_owned(),
            format!(
                "The following are the results of an instruction applied to consecutive parts \
                 of one text. Combine them into one answer to the instruction.\n\n\
                 Instruction: {instruction}"
            ),
        ),
    }
}

impl LongTextRequest {
    /// Every rule, all failures at once; the text is split here so a chunk size that would
    /// make too many chunks is a 422 naming `chunk_chars`.
    pub fn validate(self, registry: &ModelRegistry) -> Result<LongTextJob, ApiError> {
        let mut problems = Problems::default();
        let chars = self.text.chars().count();
        if self.text.trim().is_empty() {
            problems.body("text", "string_too_short", "text must not be empty");
        } else if chars > MAX_TEXT_CHARS {
            problems.body(
                "text",
                "string_too_long",
                format!("text must be at most {MAX_TEXT_CHARS} characters (got {chars})"),
            );
        }
        if self
            .text
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
        {
            problems.body(
                "text",
                "control_character",
                "text must not contain control characters other than line breaks and tabs",
            );
        }
        let task = self.task.unwrap_or(LongTextTask::Summarize);
        let instruction = self.instruction.unwrap_or_default();
        match task {
            LongTextTask::Custom if instruction.trim().is_empty() => problems.body(
                "instruction",
                "missing",
                "instruction is required when task is custom",
            ),
            _ if instruction.chars().count() > MAX_INSTRUCTION_CHARS => problems.body(
                "instruction",
                "string_too_long",
                format!("instruction must be at most {MAX_INSTRUCTION_CHARS} characters"),
            ),
            _ => {}
        }
        let language = self
            .target_language
            .filter(|l| !l.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_LANGUAGE.to_owned());
        if language.chars().count() > MAX_LANGUAGE_CHARS || language.chars().any(char::is_control) {
            problems.body(
                "target_language",
                "invalid",
                format!("target_language must be a language name of at most {MAX_LANGUAGE_CHARS} characters"),
            );
        }
        let chunk_chars = check_range(
            &mut problems,
            "chunk_chars",
            self.chunk_chars,
            MIN_CHUNK_CHARS..=MAX_CHUNK_CHARS,
            DEFAULT_CHUNK_CHARS,
        );
        let chunk_chars = usize::try_from(chunk_chars).unwrap_or(2_000);
        let options = check_options(
            &mut problems,
            self.max_concurrency,
            self.timeout_ms,
            self.temperature,
            self.max_tokens,
        );
        let mut models = check_models(&mut problems, registry, self.models.as_deref());
        if models.is_empty() {
            models.push(registry.default_model().id.clone());
        }
        let (per_chunk, combining) = instructions(task, instruction.trim(), language.trim());
        // Splitting an oversized text is wasted work: it is rejected anyway.
        let pieces = if chars <= MAX_TEXT_CHARS {
            chunker::split(&self.text, chunk_chars)
        } else {
            Vec::new()
        };
        if pieces.len() > MAX_CHUNKS {
            problems.body(
                "chunk_chars",
                "too_many_chunks",
                format!(
                    "the text splits into {} chunks of at most {chunk_chars} characters; at most \
                     {MAX_CHUNKS} are processed per request, so raise chunk_chars",
                    pieces.len()
                ),
            );
        }
        let sizes = pieces.iter().map(|p| p.chars().count()).collect();
        let chunks = pieces
            .iter()
            .enumerate()
            .map(|(i, piece)| ValidItem {
                id: format!("chunk-{i}"),
                model: models[i % models.len()].clone(),
                messages: vec![
                    ChatMessage::system(per_chunk.clone()),
                    ChatMessage::user((*piece).to_owned()),
                ],
            })
            .collect();
        let combine = self
            .combine
            .unwrap_or(false)
            .then(|| (combining, models[0].clone()));
        problems.into_result(LongTextJob {
            task,
            chunk_chars,
            chunks,
            sizes,
            combine,
            options,
        })
    }
}

/// One chunk's outcome.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChunkResult {
    #[serde(flatten)]
    pub result: ItemResult,
    /// Characters of the chunk.
    pub chars: usize,
}

/// `POST /batch/long-text` answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LongTextResponse {
    pub task: LongTextTask,
    pub chunk_chars: usize,
    /// In text order.
    pub chunks: Vec<ChunkResult>,
    pub total_chunks: usize,
    pub successful: usize,
    pub failed: usize,
    /// The final call over the chunk outputs (`combine: true` only).
    pub combined: Option<ItemResult>,
    /// The combined output when combining succeeded, otherwise the successful chunk outputs
    /// joined by blank lines (absent when no chunk succeeded).
    pub output: Option<String>,
    /// Every call together, the final one included.
    pub usage: TokenUsage,
    /// USD, every call together.
    pub total_cost: f64,
    pub processing_time_ms: u64,
}

/// Admits every call at once (chunks, plus the final one), runs the chunks with bounded
/// concurrency, then the combining call.
pub async fn process(
    services: &Services,
    principal: &Principal,
    job: LongTextJob,
    deadline: Option<Instant>,
) -> Result<(LongTextResponse, LimitStatus), ApiError> {
    let started = Instant::now();
    let options = job.options;
    let mut tokens: u64 = job.chunks.iter().map(|c| token_estimate(c, &options)).sum();
    let mut calls = job.chunks.len() as u64;
    if let Some((instruction, model)) = &job.combine {
        // The final prompt is at most every chunk's output (each bounded by max_tokens).
        let outputs = calls.saturating_mul(u64::from(options.max_tokens));
        let probe = ValidItem {
            id: String::new(),
            model: model.clone(),
            messages: vec![ChatMessage::system(instruction.clone())],
        };
        tokens = tokens.saturating_add(token_estimate(&probe, &options) + outputs);
        calls += 1;
    }
    let chat = &services.chat;
    let admitted = admit_all(
        &chat.limiter,
        &services.config.quotas,
        principal,
        calls,
        tokens,
    )
    .await?;
    let results = run_all(chat.llm.as_ref(), &job.chunks, &options, deadline).await;
    let outputs: Vec<&str> = results.iter().filter_map(|r| r.output.as_deref()).collect();
    let joined = (!outputs.is_empty()).then(|| outputs.join("\n\n"));
    let combined = match (&job.combine, &joined) {
        (None, _) => None,
        (Some((instruction, model)), Some(joined)) => {
            let item = ValidItem {
                id: "combined".to_owned(),
                model: model.clone(),
                messages: vec![
                    ChatMessage::system(instruction.clone()),
                    ChatMessage::user(joined.clone()),
                ],
            };
            Some(run_item(chat.llm.as_ref(), results.len(), &item, &options, deadline).await)
        }
        (Some((_, model)), None) => {
            let item = ValidItem {
                id: "combined".to_owned(),
                model: model.clone(),
                messages: Vec::new(),
            };
            let err = ApiError::UpstreamFailed {
                detail: "no chunk succeeded, nothing to combine".to_owned(),
            };
            Some(ItemResult::failed(results.len(), &item, &err, 0))
        }
    };
    let all = totals(results.iter().chain(combined.iter()));
    if let Err(err) = chat
        .limiter
        .settle(admitted.reservation, all.usage.total_tokens)
        .await
    {
        tracing::warn!(error = %err, "settling a token reservation failed");
    }
    let chunk_totals = totals(&results);
    let output = match &combined {
        Some(result) if result.is_ok() => result.output.clone(),
        _ => joined,
    };
    let chunks = results
        .into_iter()
        .zip(job.sizes)
        .map(|(result, chars)| ChunkResult { result, chars })
        .collect::<Vec<_>>();
    let response = LongTextResponse {
        task: job.task,
        chunk_chars: job.chunk_chars,
        total_chunks: chunks.len(),
        successful: chunk_totals.successful,
        failed: chunk_totals.failed,
        chunks,
        combined,
        output,
        usage: all.usage,
        total_cost: all.cost,
        processing_time_ms: elapsed_ms(started),
    };
    Ok((response, admitted.status))
}
