//! Secrets given as SSM parameter references, resolved against the local stack's emulator (it
//! serves every moto backend, SSM included, on the DynamoDB emulator's address).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;

use aws_sdk_ssm::types::ParameterType;
use shared::Config;
use shared::secrets::{SecretsError, resolve};

/// An SSM client for the emulator, built the way the functions build theirs (the standard AWS
/// chain), with the emulator's endpoint.
async fn ssm() -> aws_sdk_ssm::Client {
    let endpoint = common::stack_var("AWS_ENDPOINT_URL_DYNAMODB");
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .load()
        .await;
    aws_sdk_ssm::Client::new(&config)
}

async fn put_secure(client: &aws_sdk_ssm::Client, name: &str, value: &str) {
    client
        .put_parameter()
        .name(name)
        .value(value)
        .r#type(ParameterType::SecureString)
        .overwrite(true)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PutParameter {name}: {}",
                aws_sdk_ssm::error::DisplayErrorContext(&e)
            )
        });
}

fn tables() -> HashMap<String, String> {
    [
        "CONVERSATIONS_TABLE",
        "RATE_LIMITS_TABLE",
        "CACHE_TABLE",
        "JOBS_TABLE",
        "API_KEYS_TABLE",
    ]
    .into_iter()
    .map(|k| (k.to_owned(), "t".to_owned()))
    .collect()
}

#[tokio::test]
async fn parameter_references_become_the_decrypted_values_in_config() {
    let client = ssm().await;
    let prefix = format!("/{}", common::unique("gw-secrets"));
    let openai = format!("{prefix}/openai-api-key");
    let jwt = format!("{prefix}/jwt-secret");
    put_secure(&client, &openai, "sk-from-ssm").await;
    put_secure(&client, &jwt, "a-jwt-secret-of-more-than-32-bytes-long").await;

    let mut env = tables();
    env.insert("OPENAI_API_KEY_PARAM".into(), openai);
    env.insert("JWT_SECRET_PARAM".into(), jwt);
    env.insert("JWT_PUBLIC_KEY_PARAM".into(), String::new()); // SAM's "not configured"
    let env = resolve(env, &client).await.unwrap();
    assert_eq!(env["OPENAI_API_KEY"], "sk-from-ssm");
    assert_eq!(env["JWT_SECRET"], "a-jwt-secret-of-more-than-32-bytes-long");
    assert!(!env.contains_key("JWT_PUBLIC_KEY"));

    let config = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
    assert_eq!(config.llm.api_key.unwrap().expose(), "sk-from-ssm");
    assert_eq!(
        config.auth.jwt.unwrap().key.expose(),
        "a-jwt-secret-of-more-than-32-bytes-long"
    );
}

#[tokio::test]
async fn a_missing_parameter_fails_the_cold_start_naming_it() {
    let client = ssm().await;
    let name = format!("/{}/openai-api-key", common::unique("gw-missing"));
    let mut env = tables();
    env.insert("OPENAI_API_KEY_PARAM".into(), name.clone());
    match resolve(env, &client).await {
        Err(SecretsError::NotFound { names }) => assert_eq!(names, [name]),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn a_value_next_to_its_reference_is_refused() {
    let client = ssm().await;
    let mut env = tables();
    env.insert("OPENAI_API_KEY".into(), "sk-plain".into());
    env.insert("OPENAI_API_KEY_PARAM".into(), "/gw/openai".into());
    let err = resolve(env, &client).await.unwrap_err();
    assert!(
        matches!(
            err,
            SecretsError::Ambiguous {
                variable: "OPENAI_API_KEY"
            }
        ),
        "{err}"
    );
    assert!(!err.to_string().contains("sk-plain"), "{err}");
}

#[tokio::test]
async fn without_references_the_environment_is_used_as_it_is() {
    // No SSM call can happen here: the client points at a port nothing listens on.
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url("http://127.0.0.1:9")
        .region(aws_config::Region::new("us-east-1"))
        .load()
        .await;
    let client = aws_sdk_ssm::Client::new(&config);
    let mut env = tables();
    env.insert("OPENAI_API_KEY".into(), "sk-plain".into());
    let resolved = resolve(env.clone(), &client).await.unwrap();
    assert_eq!(resolved, env);
}
