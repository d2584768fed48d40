//! `POST /analyze` body and its validation.
//!
//! Enumerated fields arrive as plain strings and are checked here rather than by serde, so an
//! unknown task or language is a 422 naming the field and listing the accepted values, like
//! every other validation failure, and all failures are reported at once.

use serde::{Deserialize, Serialize};
use shared::error::{ApiError, FieldError};
use utoipa::ToSchema;

/// Longest content accepted, in characters (Unicode scalar values).
pub const MAX_CONTENT_CHARS: usize = 50_000;
pub const DEFAULT_TOP_K: usize = 10;
pub const MAX_TOP_K: usize = 50;
pub const DEFAULT_SUMMARY_SENTENCES: usize = 3;
pub const MAX_SUMMARY_SENTENCES: usize = 20;

/// `POST /analyze` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"content": "这款手机的屏幕非常出色，电池续航也令人满意。", "tasks": ["sentiment", "keywords"]}))]
pub struct AnalyzeRequest {
    /// The text to analyse: 1..=50000 characters, not only whitespace.
    pub content: String,
    /// Any of `sentiment`, `keywords`, `summary`, `entities`; all four when omitted.
    /// Duplicates are ignored.
    pub tasks: Option<Vec<String>>,
    /// `auto` (default: detected from the text), `zh` or `en`.
    pub language: Option<String>,
    /// `auto` (default: the LLM when one is configured, local methods for any task it fails),
    /// `llm` (the LLM only) or `local` (local methods only, no network).
    pub mode: Option<String>,
    /// Keywords to return, 1..=50, default 10.
    pub top_k: Option<i64>,
    /// Sentences in the summary, 1..=20, default 3.
    pub summary_sentences: Option<i64>,
    /// Local keyword algorithm: `tfidf` (default) or `textrank`.
    pub keyword_algorithm: Option<String>,
}

/// One kind of analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Sentiment,
    Keywords,
    Summary,
    Entities,
}

impl Task {
    pub const ALL: [Task; 4] = [
        Task::Sentiment,
        Task::Keywords,
        Task::Summary,
        Task::Entities,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::Sentiment => "sentiment",
            Task::Keywords => "keywords",
            Task::Summary => "summary",
            Task::Entities => "entities",
        }
    }

    fn parse(name: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// The language the local methods treat the text as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Zh,
    En,
}

impl Language {
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Zh => "zh",
            Language::En => "en",
        }
    }

    /// The language's name in an LLM instruction.
    pub fn english_name(self) -> &'static str {
        match self {
            Language::Zh => "Chinese",
            Language::En => "English",
        }
    }
}

/// Who produces the results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Auto,
    Llm,
    Local,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Llm => "llm",
            Mode::Local => "local",
        }
    }
}

/// The local keyword algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeywordAlgorithm {
    Tfidf,
    Textrank,
}

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisJob {
    pub content: String,
    /// Sorted, without duplicates, never empty.
    pub tasks: Vec<Task>,
    /// `None` for `auto`: detected from the content.
    pub language: Option<Language>,
    pub mode: Mode,
    pub top_k: usize,
    pub summary_sentences: usize,
    pub keyword_algorithm: KeywordAlgorithm,
}

fn one_of<T: Copy>(
    errors: &mut Vec<FieldError>,
    field: &str,
    value: Option<&str>,
    default: T,
    choices: &[(&str, T)],
) -> T {
    let Some(raw) = value else {
        return default;
    };
    match choices.iter().find(|(name, _)| *name == raw) {
        Some((_, choice)) => *choice,
        None => {
            let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            let shown: String = raw.chars().take(40).collect();
            errors.push(FieldError::body(
                field,
                "enum",
                format!(
                    "{field} must be one of {} (got '{shown}')",
                    names.join(", ")
                ),
            ));
            default
        }
    }
}

fn in_range(
    errors: &mut Vec<FieldError>,
    field: &str,
    value: Option<i64>,
    default: usize,
    max: usize,
) -> usize {
    match value {
        None => default,
        Some(n) => match usize::try_from(n) {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => {
                errors.push(FieldError::body(
                    field,
                    "range",
                    format!("{field} must be between 1 and {max}"),
                ));
                default
            }
        },
    }
}

impl AnalyzeRequest {
    /// Every rule of the contract, all failures reported at once.
    pub fn validate(self) -> Result<AnalysisJob, ApiError> {
        let mut errors = Vec::new();
        if self.content.trim().is_empty() {
            errors.push(FieldError::body(
                "content",
                "string_too_short",
                "content must not be empty",
            ));
        } else {
            // Counting stops early: a huge body must not cost a full scan to reject.
            let chars = self.content.chars().take(MAX_CONTENT_CHARS + 1).count();
            if chars > MAX_CONTENT_CHARS {
                errors.push(FieldError::body(
                    "content",
                    "string_too_long",
                    format!("content must be at most {MAX_CONTENT_CHARS} characters"),
                ));
            }
        }

        let tasks = match &self.tasks {
            None => Task::ALL.to_vec(),
            Some(names) if names.is_empty() => {
                errors.push(FieldError::body(
                    "tasks",
                    "too_short",
                    "tasks must name at least one task (or be omitted for all)",
                ));
                Vec::new()
            }
            Some(names) => {
                let mut tasks = Vec::with_capacity(names.len());
                for (i, name) in names.iter().enumerate() {
                    match Task::parse(name) {
                        Some(task) => tasks.push(task),
                        None => {
                            let shown: String = name.chars().take(40).collect();
                            errors.push(FieldError::body(
                                &format!("tasks.{i}"),
                                "enum",
                                format!(
                                    "unknown task '{shown}'; tasks are sentiment, keywords, summary, entities"
                                ),
                            ));
                        }
                    }
                }
                tasks.sort();
                tasks.dedup();
                tasks
            }
        };

        let language = one_of(
            &mut errors,
            "language",
            self.language.as_deref(),
            None,
            &[
                ("auto", None),
                ("zh", Some(Language::Zh)),
                ("en", Some(Language::En)),
            ],
        );
        let mode = one_of(
            &mut errors,
            "mode",
            self.mode.as_deref(),
            Mode::Auto,
            &[
                ("auto", Mode::Auto),
                ("llm", Mode::Llm),
                ("local", Mode::Local),
            ],
        );
        let keyword_algorithm = one_of(
            &mut errors,
            "keyword_algorithm",
            self.keyword_algorithm.as_deref(),
            KeywordAlgorithm::Tfidf,
            &[
                ("tfidf", KeywordAlgorithm::Tfidf),
                ("textrank", KeywordAlgorithm::Textrank),
            ],
        );
        let top_k = in_range(&mut errors, "top_k", self.top_k, DEFAULT_TOP_K, MAX_TOP_K);
        let summary_sentences = in_range(
            &mut errors,
            "summary_sentences",
            self.summary_sentences,
            DEFAULT_SUMMARY_SENTENCES,
            MAX_SUMMARY_SENTENCES,
        );

        if !errors.is_empty() {
            return Err(ApiError::Validation(errors));
        }
        Ok(AnalysisJob {
            content: self.content,
            tasks,
            language,
            mode,
            top_k,
            summary_sentences,
            keyword_algorithm,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn request(content: &str) -> AnalyzeRequest {
        AnalyzeRequest {
            content: content.to_owned(),
            tasks: None,
            language: None,
            mode: None,
            top_k: None,
            summary_sentences: None,
            keyword_algorithm: None,
        }
    }

    fn locations(err: ApiError) -> Vec<Vec<String>> {
        match err {
            ApiError::Validation(fields) => fields.into_iter().map(|f| f.loc).collect(),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_all_tasks_auto_and_the_documented_numbers() {
        let job = request("hello").validate().unwrap();
        assert_eq!(job.tasks, Task::ALL.to_vec());
        assert_eq!(job.language, None);
        assert_eq!(job.mode, Mode::Auto);
        assert_eq!(job.top_k, 10);
        assert_eq!(job.summary_sentences, 3);
        assert_eq!(job.keyword_algorithm, KeywordAlgorithm::Tfidf);
    }

    #[test]
    fn tasks_are_sorted_and_deduplicated() {
        let mut r = request("hello");
        r.tasks = Some(vec!["summary".into(), "sentiment".into(), "summary".into()]);
        assert_eq!(
            r.validate().unwrap().tasks,
            vec![Task::Sentiment, Task::Summary]
        );
    }

    #[test]
    fn content_length_is_counted_in_characters() {
        let at_limit = "好".repeat(MAX_CONTENT_CHARS);
        assert!(request(&at_limit).validate().is_ok());
        let over = "a".repeat(MAX_CONTENT_CHARS + 1);
        assert_eq!(
            locations(request(&over).validate().unwrap_err()),
            vec![vec!["body".to_owned(), "content".to_owned()]]
        );
        assert!(request(" \n\t ").validate().is_err());
    }

    #[test]
    fn every_failure_is_reported_with_its_location() {
        let mut r = request("");
        r.tasks = Some(vec!["sentiment".into(), "emotions".into()]);
        r.language = Some("fr".into());
        r.mode = Some("remote".into());
        r.top_k = Some(0);
        r.summary_sentences = Some(21);
        r.keyword_algorithm = Some("bm25".into());
        let locs = locations(r.validate().unwrap_err());
        let names: Vec<String> = locs.iter().map(|l| l[1..].join(".")).collect();
        assert_eq!(
            names,
            [
                "content",
                "tasks.1",
                "language",
                "mode",
                "keyword_algorithm",
                "top_k",
                "summary_sentences"
            ]
        );
    }

    #[test]
    fn an_empty_task_list_is_rejected() {
        let mut r = request("hello");
        r.tasks = Some(Vec::new());
        assert!(r.validate().is_err());
    }
}
