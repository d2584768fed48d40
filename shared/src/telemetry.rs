//! Logging and metrics.
//!
//! Logs are JSON on Lambda (where CloudWatch parses them) and readable text locally; the level
//! and format follow Lambda's advanced logging controls (`AWS_LAMBDA_LOG_LEVEL`,
//! `AWS_LAMBDA_LOG_FORMAT`). Metrics are CloudWatch Embedded Metric Format lines on stdout: the
//! serverless equivalent of a Prometheus endpoint, which has no meaning per Lambda instance.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Chooses the log format from the environment: Lambda's `AWS_LAMBDA_LOG_FORMAT` wins, then
/// `LOG_FORMAT`, then JSON when running inside the Lambda service, text otherwise.
pub fn log_format(lookup: impl Fn(&str) -> Option<String>) -> LogFormat {
    let explicit = lookup("AWS_LAMBDA_LOG_FORMAT").or_else(|| lookup("LOG_FORMAT"));
    match explicit.map(|v| v.to_ascii_lowercase()).as_deref() {
        Some("json") => LogFormat::Json,
        Some("text") => LogFormat::Text,
        _ if lookup("AWS_EXECUTION_ENV").is_some_and(|v| v.starts_with("AWS_Lambda")) => {
            LogFormat::Json
        }
        _ => LogFormat::Text,
    }
}

/// The tracing filter: `AWS_LAMBDA_LOG_LEVEL` (Lambda's level names) over `RUST_LOG` over `info`.
/// The AWS SDK and hyper are held at `warn` unless asked for, because their `info` lines are
/// per-request noise that Lambda bills by the byte.
pub fn log_filter(lookup: impl Fn(&str) -> Option<String>) -> String {
    let level = lookup("AWS_LAMBDA_LOG_LEVEL").map(|lvl| match lvl.to_ascii_lowercase().as_str() {
        "fatal" => "error".to_owned(),
        other => other.to_owned(),
    });
    match (level, lookup("RUST_LOG")) {
        (Some(level), _) => format!("{level},aws_smithy_runtime=warn,aws_config=warn,hyper=warn"),
        (None, Some(rust_log)) => rust_log,
        (None, None) => "info,aws_smithy_runtime=warn,aws_config=warn,hyper=warn".to_owned(),
    }
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    let env = |name: &str| std::env::var(name).ok();
    let filter = EnvFilter::try_new(log_filter(env)).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    // A second init (tests, a reused process) keeps the first subscriber: not an error.
    let _ = match log_format(env) {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_ansi(false)
            .without_time()
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}

/// CloudWatch metric units used by this project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
    None,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
            Unit::None => "None",
        }
    }
}

/// One EMF record: a set of dimensions and the metric values observed under them.
#[derive(Debug, Clone)]
pub struct MetricEvent {
    namespace: String,
    dimensions: BTreeMap<String, String>,
    metrics: Vec<(String, f64, Unit)>,
    properties: BTreeMap<String, Value>,
}

pub const DEFAULT_NAMESPACE: &str = "AiGateway";

impl MetricEvent {
    pub fn new() -> Self {
        let namespace = std::env::var("METRICS_NAMESPACE")
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        Self {
            namespace,
            dimensions: BTreeMap::new(),
            metrics: Vec::new(),
            properties: BTreeMap::new(),
        }
    }

    pub fn dimension(mut self, name: &str, value: impl Into<String>) -> Self {
        self.dimensions.insert(name.to_owned(), value.into());
        self
    }

    pub fn metric(mut self, name: &str, value: f64, unit: Unit) -> Self {
        self.metrics.push((name.to_owned(), value, unit));
        self
    }

    /// A searchable field that is not a dimension (no extra CloudWatch cost).
    pub fn property(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.properties.insert(name.to_owned(), value.into());
        self
    }

    /// The EMF JSON document for this event at `timestamp_ms`.
    pub fn render(&self, timestamp_ms: u128) -> Value {
        let mut root = Map::new();
        for (k, v) in &self.properties {
            root.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.dimensions {
            root.insert(k.clone(), Value::String(v.clone()));
        }
        for (name, value, _) in &self.metrics {
            root.insert(name.clone(), json!(value));
        }
        let dims: Vec<&String> = self.dimensions.keys().collect();
        let defs: Vec<Value> = self
            .metrics
            .iter()
            .map(|(name, _, unit)| json!({"Name": name, "Unit": unit.as_str()}))
            .collect();
        root.insert(
            "_aws".to_owned(),
            json!({
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": self.namespace,
                    "Dimensions": [dims],
                    "Metrics": defs,
                }],
            }),
        );
        Value::Object(root)
    }

    /// Writes the event as one stdout line, where the Lambda log agent extracts it.
    pub fn emit(self) {
        if std::env::var("METRICS_DISABLED").is_ok_and(|v| v == "true") {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let mut line = self.render(now).to_string();
        line.push('\n');
        // One write call per line keeps concurrent emitters from interleaving.
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
}

impl Default for MetricEvent {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn lambda_log_format_variable_wins() {
        assert_eq!(
            log_format(vars(&[("AWS_LAMBDA_LOG_FORMAT", "JSON")])),
            LogFormat::Json
        );
        assert_eq!(
            log_format(vars(&[
                ("AWS_LAMBDA_LOG_FORMAT", "Text"),
                ("AWS_EXECUTION_ENV", "AWS_Lambda_x")
            ])),
            LogFormat::Text
        );
        assert_eq!(
            log_format(vars(&[("AWS_EXECUTION_ENV", "AWS_Lambda_provided")])),
            LogFormat::Json
        );
        assert_eq!(log_format(vars(&[])), LogFormat::Text);
    }

    #[test]
    fn lambda_log_level_overrides_rust_log() {
        let filter = log_filter(vars(&[
            ("AWS_LAMBDA_LOG_LEVEL", "DEBUG"),
            ("RUST_LOG", "trace"),
        ]));
        assert!(filter.starts_with("debug,"), "{filter}");
        assert!(log_filter(vars(&[("AWS_LAMBDA_LOG_LEVEL", "FATAL")])).starts_with("error,"));
        assert_eq!(log_filter(vars(&[("RUST_LOG", "trace")])), "trace");
    }

    #[test]
    fn emf_document_declares_every_metric_and_dimension() {
        let doc = MetricEvent::new()
            .dimension("function", "chat")
            .dimension("route", "/chat")
            .metric("Requests", 1.0, Unit::Count)
            .metric("Latency", 12.5, Unit::Milliseconds)
            .property("request_id", "abc")
            .render(1_700_000_000_000);
        assert_eq!(doc["function"], "chat");
        assert_eq!(doc["Latency"], 12.5);
        assert_eq!(doc["request_id"], "abc");
        let cw = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(cw["Namespace"], "AiGateway");
        assert_eq!(cw["Dimensions"], json!([["function", "route"]]));
        assert_eq!(
            cw["Metrics"][1],
            json!({"Name": "Latency", "Unit": "Milliseconds"})
        );
        assert_eq!(doc["_aws"]["Timestamp"], 1_700_000_000_000u64);
    }
}
