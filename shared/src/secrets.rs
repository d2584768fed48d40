//! Secrets (the OpenAI key, the JWT key) read from SSM Parameter Store at cold start.
//!
//! A deployed function never sees a secret in its environment or in the template: template.yaml
//! passes the *name* of an SSM `SecureString` parameter in `<VARIABLE>_PARAM` (for example
//! `OPENAI_API_KEY_PARAM=/ai-gateway/prod/openai-api-key`), and [`load_config`] fetches every
//! referenced parameter, decrypted, in one `GetParameters` call before [`Config`] is built. The
//! values then live in `Config` for the life of the instance: that is the cache, so a warm
//! invocation never calls SSM, and a rotated secret takes effect at the next cold start.
//!
//! When no `*_PARAM` variable is set (the local stack, tests) nothing is fetched, no SSM client
//! is built, and the plain variables (`OPENAI_API_KEY`, `JWT_SECRET`, ...) are used as before.
//! The SSM endpoint follows the standard AWS chain, so `AWS_ENDPOINT_URL_SSM` points it at an
//! emulator.

use std::collections::HashMap;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ssm::error::DisplayErrorContext;

use crate::config::Config;
use crate::services::StartupError;

/// The variables that may be given by reference instead of by value.
pub const SECRET_VARIABLES: [&str; 3] = ["OPENAI_API_KEY", "JWT_SECRET", "JWT_PUBLIC_KEY"];

/// `<VARIABLE><PARAM_SUFFIX>` holds the SSM parameter name for `<VARIABLE>`.
pub const PARAM_SUFFIX: &str = "_PARAM";

/// `GetParameters` accepts at most this many names per call.
const MAX_NAMES_PER_CALL: usize = 10;

/// Why the secrets could not be read. Never carries a secret value.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{variable} and {variable}{PARAM_SUFFIX} are both set: give the secret one way only")]
    Ambiguous { variable: &'static str },
    #[error("SSM parameter(s) not found: {}", .names.join(", "))]
    NotFound { names: Vec<String> },
    #[error("SSM parameter {name} is empty")]
    Empty { name: String },
    #[error("reading SSM parameters {}: {detail}", .names.join(", "))]
    Fetch { names: Vec<String>, detail: String },
}

/// Reads the process environment, resolves the secret references in it and builds [`Config`].
///
/// This is what every function's `main.rs` calls once, at cold start.
pub async fn load_config() -> Result<Config, StartupError> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let env = if references(&env).is_empty() {
        env
    } else {
        resolve(env, &client().await).await?
    };
    Ok(Config::from_lookup(|name| env.get(name).cloned())?)
}

/// `(variable, parameter name)` of every secret given by reference, in [`SECRET_VARIABLES`] order.
pub fn references(env: &HashMap<String, String>) -> Vec<(&'static str, String)> {
    SECRET_VARIABLES
        .iter()
        .filter_map(|variable| {
            let name = env.get(&format!("{variable}{PARAM_SUFFIX}"))?.trim();
            (!name.is_empty()).then(|| (*variable, name.to_owned()))
        })
        .collect()
}

/// `env` with every `<VARIABLE>_PARAM` reference replaced by `<VARIABLE>` = the parameter's
/// decrypted value, fetched through `ssm`.
pub async fn resolve(
    mut env: HashMap<String, String>,
    ssm: &aws_sdk_ssm::Client,
) -> Result<HashMap<String, String>, SecretsError> {
    let wanted = references(&env);
    for (variable, _) in &wanted {
        // Both set would leave it to chance which one wins; a plaintext value next to a
        // reference is a deployment mistake worth stopping for.
        if env.get(*variable).is_some_and(|v| !v.trim().is_empty()) {
            return Err(SecretsError::Ambiguous { variable });
        }
    }
    let mut names: Vec<String> = wanted.iter().map(|(_, name)| name.clone()).collect();
    names.sort();
    names.dedup();
    let mut values: HashMap<String, String> = HashMap::new();
    for chunk in names.chunks(MAX_NAMES_PER_CALL) {
        let out = ssm
            .get_parameters()
            .set_names(Some(chunk.to_vec()))
            .with_decryption(true)
            .send()
            .await
            .map_err(|err| SecretsError::Fetch {
                names: chunk.to_vec(),
                detail: DisplayErrorContext(&err).to_string(),
            })?;
        if !out.invalid_parameters().is_empty() {
            return Err(SecretsError::NotFound {
                names: out.invalid_parameters().to_vec(),
            });
        }
        for parameter in out.parameters() {
            if let (Some(name), Some(value)) = (parameter.name(), parameter.value()) {
                values.insert(name.to_owned(), value.to_owned());
            }
        }
    }
    for (variable, name) in wanted {
        match values.get(&name) {
            Some(value) if !value.trim().is_empty() => {
                env.insert(variable.to_owned(), value.clone());
            }
            Some(_) => return Err(SecretsError::Empty { name }),
            None => return Err(SecretsError::NotFound { names: vec![name] }),
        }
    }
    Ok(env)
}

/// An SSM client for the cold start. The whole init phase of a Lambda function is limited to
/// 10 s, so the call is bounded well inside it; the standard retry absorbs a throttled attempt.
pub async fn client() -> aws_sdk_ssm::Client {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(1))
                .operation_attempt_timeout(Duration::from_secs(2))
                .operation_timeout(Duration::from_secs(5))
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .http_client(crate::tls::aws_http_client())
        .load()
        .await;
    aws_sdk_ssm::Client::new(&config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn finds_only_non_blank_references_to_known_variables() {
        let vars = env(&[
            ("OPENAI_API_KEY_PARAM", "/gw/openai"),
            ("JWT_SECRET_PARAM", "  "),
            ("SOMETHING_ELSE_PARAM", "/gw/other"),
        ]);
        assert_eq!(
            references(&vars),
            vec![("OPENAI_API_KEY", "/gw/openai".to_owned())]
        );
    }

    #[test]
    fn without_references_nothing_is_fetched() {
        assert!(references(&env(&[("OPENAI_API_KEY", "sk-local")])).is_empty());
    }
}
