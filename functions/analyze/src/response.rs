//! What `POST /analyze` answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shared::chat::TokenUsage;
use shared::error::ErrorEnvelope;
use utoipa::ToSchema;

use crate::request::{KeywordAlgorithm, Language};

/// Which method produced a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Llm,
    Local,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Llm => "llm",
            Method::Local => "local",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SentimentLabel {
    Positive,
    Negative,
    Neutral,
}

impl SentimentLabel {
    /// The label of a score in [-1, 1]: the usual ±0.05 band around zero is neutral.
    pub fn of_score(score: f64) -> Self {
        if score >= 0.05 {
            Self::Positive
        } else if score <= -0.05 {
            Self::Negative
        } else {
            Self::Neutral
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SentimentResult {
    pub method: Method,
    pub label: SentimentLabel,
    /// -1 (most negative) ..= 1 (most positive).
    pub score: f64,
    /// Set when `mode=auto` fell back to the local method: the code of the LLM failure
    /// (`upstream_error`, `upstream_timeout`, `invalid_llm_reply`, `token_budget`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Keyword {
    pub word: String,
    /// Relevance; comparable within one result only (TF-IDF, TextRank or the LLM's own scale).
    pub weight: f64,
    /// jieba part-of-speech tag (`n`, `ns`, `vn`, ...); Chinese local results only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct KeywordsResult {
    pub method: Method,
    /// The local algorithm; absent for LLM results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<KeywordAlgorithm>,
    /// Most relevant first, at most `top_k`.
    pub items: Vec<Keyword>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SummaryResult {
    pub method: Method,
    /// The sentences joined (Chinese without separator, other text with a space).
    pub text: String,
    /// At most `summary_sentences`; local results are sentences of the content, in its order.
    pub sentences: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntityType {
    Person,
    Place,
    Organization,
    Email,
    Url,
    Date,
    Money,
    Number,
}

impl EntityType {
    pub const ALL: [EntityType; 8] = [
        EntityType::Person,
        EntityType::Place,
        EntityType::Organization,
        EntityType::Email,
        EntityType::Url,
        EntityType::Date,
        EntityType::Money,
        EntityType::Number,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EntityType::Person => "person",
            EntityType::Place => "place",
            EntityType::Organization => "organization",
            EntityType::Email => "email",
            EntityType::Url => "url",
            EntityType::Date => "date",
            EntityType::Money => "money",
            EntityType::Number => "number",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// One entity occurrence. Offsets count Unicode scalar values (Python `str` indices), end
/// exclusive: `content.chars().skip(start).take(end - start)` is `text`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Entity {
    pub text: String,
    #[serde(rename = "type")]
    pub kind: EntityType,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EntitiesResult {
    pub method: Method,
    /// In order of appearance, at most 1000.
    pub items: Vec<Entity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
}

/// The result of each requested task that succeeded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AnalysisResults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentiment: Option<SentimentResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keywords: Option<KeywordsResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<SummaryResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<EntitiesResult>,
}

/// `POST /analyze` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct AnalyzeResponse {
    pub results: AnalysisResults,
    /// The error envelope of each requested task that failed (only with `mode=llm`, or when a
    /// local method itself failed); the other tasks' results are still in `results`.
    pub errors: BTreeMap<&'static str, ErrorEnvelope>,
    /// The language the text was analysed as (detected when `auto`).
    pub language: Language,
    /// The model asked, when any task used the LLM.
    pub model: Option<String>,
    /// Tokens of every LLM call this analysis made, retries included.
    pub usage: TokenUsage,
    /// USD spent upstream for this analysis (0 when served from the cache).
    pub cost_estimate: f64,
    pub processing_time_ms: u64,
    pub cached: bool,
}

/// What the response cache keeps of an analysis: only complete ones are stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedAnalysis {
    pub results: AnalysisResults,
    pub language: Language,
    pub model: Option<String>,
    pub usage: TokenUsage,
}

/// The result of one task, whichever method produced it.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskResult {
    Sentiment(SentimentResult),
    Keywords(KeywordsResult),
    Summary(SummaryResult),
    Entities(EntitiesResult),
}

impl TaskResult {
    pub fn method(&self) -> Method {
        match self {
            TaskResult::Sentiment(r) => r.method,
            TaskResult::Keywords(r) => r.method,
            TaskResult::Summary(r) => r.method,
            TaskResult::Entities(r) => r.method,
        }
    }

    /// Marks a local result as the fallback for a failed LLM attempt.
    pub fn with_fallback_reason(mut self, reason: &str) -> Self {
        let slot = match &mut self {
            TaskResult::Sentiment(r) => &mut r.fallback_reason,
            TaskResult::Keywords(r) => &mut r.fallback_reason,
            TaskResult::Summary(r) => &mut r.fallback_reason,
            TaskResult::Entities(r) => &mut r.fallback_reason,
        };
        *slot = Some(reason.to_owned());
        self
    }

    pub fn fallback_reason(&self) -> Option<&str> {
        match self {
            TaskResult::Sentiment(r) => r.fallback_reason.as_deref(),
            TaskResult::Keywords(r) => r.fallback_reason.as_deref(),
            TaskResult::Summary(r) => r.fallback_reason.as_deref(),
            TaskResult::Entities(r) => r.fallback_reason.as_deref(),
        }
    }

    /// Puts this result in its slot of `results`.
    pub fn store(self, results: &mut AnalysisResults) {
        match self {
            TaskResult::Sentiment(r) => results.sentiment = Some(r),
            TaskResult::Keywords(r) => results.keywords = Some(r),
            TaskResult::Summary(r) => results.summary = Some(r),
            TaskResult::Entities(r) => results.entities = Some(r),
        }
    }
}
