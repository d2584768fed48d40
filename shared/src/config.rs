//! Typed configuration, read from the environment once at cold start.
//!
//! Every problem is collected before failing, so a misconfigured deployment reports all of its
//! missing or malformed variables in one log line instead of one per redeploy.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A secret value whose `Debug` never reveals it (configs get logged at start-up by accident).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// DynamoDB table names; always from the environment (template.yaml or the local stack).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    pub conversations: String,
    pub rate_limits: String,
    pub cache: String,
    pub jobs: String,
    pub api_keys: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    Hs256,
    Rs256,
}

#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub algorithm: JwtAlgorithm,
    /// HS256: the shared secret; RS256: the PEM-encoded public key.
    pub key: Secret,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// `None` when no JWT key is configured: only API keys are accepted.
    pub jwt: Option<JwtSettings>,
    pub allow_anonymous: bool,
}

/// Per-tier quotas. Requests are counted per hour, tokens per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub requests_per_hour: u64,
    pub tokens_per_minute: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierQuotas {
    pub anonymous: Quota,
    pub free: Quota,
    pub pro: Quota,
    pub enterprise: Quota,
}

#[derive(Debug, Clone)]
pub struct LlmSettings {
    pub base_url: String,
    /// `None` means no provider is configured: LLM routes answer 503.
    pub api_key: Option<Secret>,
    pub timeout: Duration,
    pub registry_path: Option<PathBuf>,
    pub default_model: Option<String>,
}

/// How the batch function drains asynchronous jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Upper bound on one drain's upstream calls in flight, whatever a job asked for
    /// (`BATCH_DRAIN_CONCURRENCY`, default 8).
    pub drain_concurrency: usize,
    /// How long a claimed job stays with its drain without a renewal; a crashed drain's job is
    /// picked up again this long after its last renewal (`BATCH_LEASE_SECONDS`, default 120).
    pub lease: Duration,
    /// Time left unused before the Lambda deadline, so a drain can record and release in time
    /// (`BATCH_DRAIN_MARGIN_MS`, default 5000).
    pub drain_margin: Duration,
    /// How long jobs and their results are kept after submission (`BATCH_JOB_TTL_DAYS`,
    /// default 7).
    pub job_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub tables: Tables,
    pub llm: LlmSettings,
    pub auth: AuthSettings,
    pub quotas: TierQuotas,
    pub cache_ttl: Duration,
    pub history_retention_days: u32,
    pub max_body_bytes: usize,
    pub log_prompts: bool,
    /// Public URL of the stream function, named in the 400 for `stream: true` on chat.
    pub stream_function_url: Option<String>,
    /// How long a stream waits for the first token before it starts sending `: ping` comments.
    pub stream_heartbeat: Duration,
    pub batch: BatchSettings,
}

/// Everything wrong with the environment, each naming its variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {}", .problems.join("; "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_lookup(|name| vars.get(name).cloned())
    }

    /// Reads configuration through `lookup`, so tests need not mutate the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut env = Reader {
            lookup: &lookup,
            problems: Vec::new(),
        };
        let tables = Tables {
            conversations: env.required("CONVERSATIONS_TABLE"),
            rate_limits: env.required("RATE_LIMITS_TABLE"),
            cache: env.required("CACHE_TABLE"),
            jobs: env.required("JOBS_TABLE"),
            api_keys: env.required("API_KEYS_TABLE"),
        };
        let llm = LlmSettings {
            base_url: env
                .optional("OPENAI_BASE_URL")
                .unwrap_or_else(|| DEFAULT_BASE_URL.to_owned()),
            api_key: env.optional("OPENAI_API_KEY").map(Secret::new),
            timeout: Duration::from_millis(env.number("LLM_TIMEOUT_MS", 10_000, 1..=900_000)),
            registry_path: env.optional("MODEL_REGISTRY_PATH").map(PathBuf::from),
            default_model: env.optional("DEFAULT_MODEL"),
        };
        if let Some(url) = env.optional("OPENAI_BASE_URL")
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            env.problem(format!(
                "OPENAI_BASE_URL must be an http(s) URL (got '{url}')"
            ));
        }
        let auth = AuthSettings {
            jwt: env.jwt(),
            allow_anonymous: env.flag("ALLOW_ANONYMOUS", false),
        };
        let quotas = TierQuotas {
            anonymous: env.quota("ANONYMOUS", 20, 2_000),
            free: env.quota("FREE", 100, 20_000),
            pro: env.quota("PRO", 1_000, 200_000),
            enterprise: env.quota("ENTERPRISE", 10_000, 2_000_000),
        };
        let config = Config {
            tables,
            llm,
            auth,
            quotas,
            cache_ttl: Duration::from_secs(env.number("CACHE_TTL_SECONDS", 3_600, 1..=2_592_000)),
            history_retention_days: u32::try_from(env.number(
                "HISTORY_RETENTION_DAYS",
                30,
                1..=3_650,
            ))
            .unwrap_or(30),
            max_body_bytes: usize::try_from(env.number(
                "MAX_BODY_BYTES",
                1_048_576,
                1_024..=6_291_456,
            ))
            .unwrap_or(1_048_576),
            log_prompts: env.flag("LOG_PROMPTS", false),
            stream_function_url: env.optional("STREAM_FUNCTION_URL"),
            stream_heartbeat: Duration::from_millis(env.number(
                "STREAM_HEARTBEAT_MS",
                3_000,
                100..=60_000,
            )),
            batch: BatchSettings {
                drain_concurrency: usize::try_from(env.number(
                    "BATCH_DRAIN_CONCURRENCY",
                    8,
                    1..=64,
                ))
                .unwrap_or(8),
                lease: Duration::from_secs(env.number("BATCH_LEASE_SECONDS", 120, 10..=3_600)),
                drain_margin: Duration::from_millis(env.number(
                    "BATCH_DRAIN_MARGIN_MS",
                    5_000,
                    100..=60_000,
                )),
                job_ttl: Duration::from_secs(env.number("BATCH_JOB_TTL_DAYS", 7, 1..=365) * 86_400),
            },
        };
        if env.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                problems: env.problems,
            })
        }
    }
}

struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<String>,
}

impl Reader<'_> {
    fn problem(&mut self, message: String) {
        self.problems.push(message);
    }

    /// An unset or blank variable counts as absent: SAM passes empty strings for unset parameters.
    fn optional(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn required(&mut self, name: &str) -> String {
        self.optional(name).unwrap_or_else(|| {
            self.problem(format!("{name} is required but not set"));
            String::new()
        })
    }

    fn number(&mut self, name: &str, default: u64, range: std::ops::RangeInclusive<u64>) -> u64 {
        let Some(raw) = self.optional(name) else {
            return default;
        };
        match raw.parse::<u64>() {
            Ok(n) if range.contains(&n) => n,
            _ => {
                self.problem(format!(
                    "{name} must be an integer in {}..={} (got '{raw}')",
                    range.start(),
                    range.end()
                ));
                default
            }
        }
    }

    fn flag(&mut self, name: &str, default: bool) -> bool {
        match self
            .optional(name)
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
        {
            None => default,
            Some("true" | "1" | "yes") => true,
            Some("false" | "0" | "no") => false,
            Some(other) => {
                self.problem(format!("{name} must be true or false (got '{other}')"));
                default
            }
        }
    }

    fn quota(&mut self, tier: &str, requests_per_hour: u64, tokens_per_minute: u64) -> Quota {
        Quota {
            requests_per_hour: self.number(
                &format!("RATE_LIMIT_{tier}_REQUESTS_PER_HOUR"),
                requests_per_hour,
                1..=u64::from(u32::MAX),
            ),
            tokens_per_minute: self.number(
                &format!("RATE_LIMIT_{tier}_TOKENS_PER_MINUTE"),
                tokens_per_minute,
                1..=u64::from(u32::MAX),
            ),
        }
    }

    fn jwt(&mut self) -> Option<JwtSettings> {
        let algorithm = match self.optional("JWT_ALGORITHM").as_deref() {
            None | Some("HS256") => JwtAlgorithm::Hs256,
            Some("RS256") => JwtAlgorithm::Rs256,
            Some(other) => {
                self.problem(format!(
                    "JWT_ALGORITHM must be HS256 or RS256 (got '{other}')"
                ));
                return None;
            }
        };
        let key = match algorithm {
            JwtAlgorithm::Hs256 => {
                if self.optional("JWT_PUBLIC_KEY").is_some() {
                    self.problem("JWT_PUBLIC_KEY is set but JWT_ALGORITHM is not RS256".to_owned());
                }
                let secret = self.optional("JWT_SECRET")?;
                // Short HMAC secrets can be brute-forced offline from any issued token.
                if secret.len() < 32 {
                    self.problem("JWT_SECRET must be at least 32 bytes".to_owned());
                    return None;
                }
                secret
            }
            JwtAlgorithm::Rs256 => match self.optional("JWT_PUBLIC_KEY") {
                Some(pem) if pem.contains("BEGIN PUBLIC KEY") => pem.replace("\\n", "\n"),
                Some(_) => {
                    self.problem("JWT_PUBLIC_KEY must be a PEM public key".to_owned());
                    return None;
                }
                None => {
                    self.problem("JWT_PUBLIC_KEY is required when JWT_ALGORITHM=RS256".to_owned());
                    return None;
                }
            },
        };
        Some(JwtSettings {
            algorithm,
            key: Secret::new(key),
            issuer: self.optional("JWT_ISSUER"),
            audience: self.optional("JWT_AUDIENCE"),
            leeway: Duration::from_secs(self.number("JWT_LEEWAY_SECONDS", 30, 0..=300)),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn base() -> HashMap<String, String> {
        [
            ("CONVERSATIONS_TABLE", "conv"),
            ("RATE_LIMITS_TABLE", "rl"),
            ("CACHE_TABLE", "cache"),
            ("JOBS_TABLE", "jobs"),
            ("API_KEYS_TABLE", "keys"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn load(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
        Config::from_lookup(|k| vars.get(k).cloned())
    }

    #[test]
    fn minimal_environment_gets_documented_defaults() {
        let config = load(&base()).unwrap();
        assert_eq!(config.tables.conversations, "conv");
        assert_eq!(config.llm.base_url, DEFAULT_BASE_URL);
        assert!(config.llm.api_key.is_none());
        assert_eq!(config.llm.timeout, Duration::from_secs(10));
        assert_eq!(config.quotas.free.requests_per_hour, 100);
        assert_eq!(config.quotas.pro.tokens_per_minute, 200_000);
        assert_eq!(config.quotas.enterprise.requests_per_hour, 10_000);
        assert_eq!(config.cache_ttl, Duration::from_secs(3600));
        assert!(config.auth.jwt.is_none());
        assert!(!config.auth.allow_anonymous);
        assert_eq!(config.max_body_bytes, 1_048_576);
    }

    #[test]
    fn names_every_missing_table_variable_at_once() {
        let err = load(&HashMap::new()).unwrap_err();
        for name in [
            "CONVERSATIONS_TABLE",
            "RATE_LIMITS_TABLE",
            "CACHE_TABLE",
            "JOBS_TABLE",
            "API_KEYS_TABLE",
        ] {
            assert!(
                err.problems.iter().any(|p| p.starts_with(name)),
                "{name} not reported in {err}"
            );
        }
        assert_eq!(err.problems.len(), 5);
    }

    #[test]
    fn reports_malformed_numbers_and_flags_with_the_value_seen() {
        let mut vars = base();
        vars.insert("LLM_TIMEOUT_MS".into(), "soon".into());
        vars.insert("ALLOW_ANONYMOUS".into(), "maybe".into());
        vars.insert("RATE_LIMIT_PRO_REQUESTS_PER_HOUR".into(), "0".into());
        let err = load(&vars).unwrap_err().to_string();
        assert!(err.contains("LLM_TIMEOUT_MS must be an integer"), "{err}");
        assert!(err.contains("'soon'"), "{err}");
        assert!(
            err.contains("ALLOW_ANONYMOUS must be true or false (got 'maybe')"),
            "{err}"
        );
        assert!(err.contains("RATE_LIMIT_PRO_REQUESTS_PER_HOUR"), "{err}");
    }

    #[test]
    fn tier_quotas_are_overridable() {
        let mut vars = base();
        vars.insert("RATE_LIMIT_FREE_REQUESTS_PER_HOUR".into(), "5".into());
        vars.insert("RATE_LIMIT_FREE_TOKENS_PER_MINUTE".into(), "700".into());
        let config = load(&vars).unwrap();
        assert_eq!(
            config.quotas.free,
            Quota {
                requests_per_hour: 5,
                tokens_per_minute: 700
            }
        );
    }

    #[test]
    fn rejects_short_hmac_secret_and_rs256_without_key() {
        let mut vars = base();
        vars.insert("JWT_SECRET".into(), "short".into());
        let err = load(&vars).unwrap_err().to_string();
        assert!(
            err.contains("JWT_SECRET must be at least 32 bytes"),
            "{err}"
        );

        let mut vars = base();
        vars.insert("JWT_ALGORITHM".into(), "RS256".into());
        let err = load(&vars).unwrap_err().to_string();
        assert!(err.contains("JWT_PUBLIC_KEY is required"), "{err}");

        let mut vars = base();
        vars.insert("JWT_ALGORITHM".into(), "none".into());
        let err = load(&vars).unwrap_err().to_string();
        assert!(
            err.contains("JWT_ALGORITHM must be HS256 or RS256"),
            "{err}"
        );
    }

    #[test]
    fn batch_settings_have_defaults_and_are_overridable_within_bounds() {
        let config = load(&base()).unwrap();
        assert_eq!(
            config.batch,
            BatchSettings {
                drain_concurrency: 8,
                lease: Duration::from_secs(120),
                drain_margin: Duration::from_secs(5),
                job_ttl: Duration::from_secs(7 * 86_400),
            }
        );

        let mut vars = base();
        vars.insert("BATCH_DRAIN_CONCURRENCY".into(), "32".into());
        vars.insert("BATCH_LEASE_SECONDS".into(), "45".into());
        vars.insert("BATCH_DRAIN_MARGIN_MS".into(), "1500".into());
        vars.insert("BATCH_JOB_TTL_DAYS".into(), "2".into());
        let batch = load(&vars).unwrap().batch;
        assert_eq!(batch.drain_concurrency, 32);
        assert_eq!(batch.lease, Duration::from_secs(45));
        assert_eq!(batch.drain_margin, Duration::from_millis(1500));
        assert_eq!(batch.job_ttl, Duration::from_secs(2 * 86_400));

        let mut vars = base();
        vars.insert("BATCH_DRAIN_CONCURRENCY".into(), "0".into());
        vars.insert("BATCH_LEASE_SECONDS".into(), "5".into());
        vars.insert("BATCH_JOB_TTL_DAYS".into(), "forever".into());
        let err = load(&vars).unwrap_err().to_string();
        for name in [
            "BATCH_DRAIN_CONCURRENCY",
            "BATCH_LEASE_SECONDS",
            "BATCH_JOB_TTL_DAYS",
        ] {
            assert!(err.contains(name), "{name} not reported in {err}");
        }
    }

    #[test]
    fn rejects_non_http_base_url() {
        let mut vars = base();
        vars.insert("OPENAI_BASE_URL".into(), "ftp://x".into());
        let err = load(&vars).unwrap_err().to_string();
        assert!(
            err.contains("OPENAI_BASE_URL must be an http(s) URL"),
            "{err}"
        );
    }

    #[test]
    fn debug_output_never_contains_secrets() {
        let mut vars = base();
        vars.insert(
            "JWT_SECRET".into(),
            "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t".into(),
        );
        vars.insert("OPENAI_API_KEY".into(), "sk-live-abcdef".into());
        let rendered = format!("{:?}", load(&vars).unwrap());
        assert!(!rendered.contains("s3cr3t"), "{rendered}");
        assert!(!rendered.contains("sk-live"), "{rendered}");
    }
}
