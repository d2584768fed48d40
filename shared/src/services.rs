//! Everything a function builds once per cold start, from [`Config`]: the DynamoDB client, the
//! stores, the LLM client, the authenticator and the chat service. `main.rs` of each function
//! calls [`Services::from_config`]; handler tests call [`Services::in_memory`].

use std::sync::Arc;

use axum::extract::FromRef;

use crate::auth::{ApiKeyStore, Authenticator, DynamoApiKeys, InvalidJwtKey};
use crate::cache::{DynamoCache, InMemoryCache};
use crate::chat::{ChatService, LlmProbe};
use crate::config::{Config, ConfigError};
use crate::conversations::{DynamoConversations, InMemoryConversations};
use crate::dynamo::DynamoProbe;
use crate::http::{Probe, Probes};
use crate::llm::{ClientInitError, LlmClient, OpenAiClient};
use crate::ratelimit::{DynamoRateLimits, InMemoryRateLimits, RateLimiter};

/// Why a function could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("LLM client: {0}")]
    Llm(#[from] ClientInitError),
    #[error("JWT: {0}")]
    Jwt(#[from] InvalidJwtKey),
    #[error("secrets: {0}")]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error("TLS: {0}")]
    TrustRoots(#[from] crate::tls::NoTrustRoots),
}

/// The application state shared by every handler (cheap to clone: all `Arc`s).
#[derive(Clone)]
pub struct Services {
    pub config: Arc<Config>,
    pub auth: Arc<Authenticator>,
    pub chat: ChatService,
    pub probes: Probes,
    /// The DynamoDB client (absent for the in-memory variant used by handler tests).
    pub dynamo: Option<aws_sdk_dynamodb::Client>,
}

impl FromRef<Services> for Arc<Authenticator> {
    fn from_ref(services: &Services) -> Self {
        services.auth.clone()
    }
}

impl Services {
    /// What every function's `main.rs` calls once per cold start: reads the configuration, with
    /// the secrets given by SSM reference fetched first ([`crate::secrets`]), and builds the
    /// production wiring.
    pub async fn from_env() -> Result<Self, StartupError> {
        // A bad SSL_CERT_FILE stops the cold start here, before any client is built on it.
        crate::tls::roots()?;
        Self::from_config(crate::secrets::load_config().await?).await
    }

    /// The production wiring: DynamoDB stores and the OpenAI-compatible client.
    pub async fn from_config(config: Config) -> Result<Self, StartupError> {
        crate::tls::roots()?;
        let client = crate::dynamo::client().await;
        let tables = &config.tables;
        let llm: Arc<dyn LlmClient> = Arc::new(OpenAiClient::from_config(&config)?);
        let keys: Arc<dyn ApiKeyStore> =
            Arc::new(DynamoApiKeys::new(client.clone(), tables.api_keys.clone()));
        let auth = Arc::new(Authenticator::from_config(&config, keys)?);
        let chat = ChatService {
            limiter: RateLimiter::new(
                Arc::new(DynamoRateLimits::new(
                    client.clone(),
                    tables.rate_limits.clone(),
                )),
                config.quotas,
            ),
            conversations: Arc::new(DynamoConversations::new(
                client.clone(),
                tables.conversations.clone(),
                config.history_retention_days,
            )),
            cache: Arc::new(DynamoCache::new(client.clone(), tables.cache.clone())),
            llm: llm.clone(),
            cache_ttl: config.cache_ttl,
        };
        let probes: Vec<Arc<dyn Probe>> = vec![
            Arc::new(DynamoProbe {
                client: client.clone(),
                table: tables.rate_limits.clone(),
            }),
            Arc::new(LlmProbe(llm)),
        ];
        Ok(Self {
            config: Arc::new(config),
            auth,
            chat,
            probes: Probes(Arc::new(probes)),
            dynamo: Some(client),
        })
    }

    /// In-memory stores around the given LLM client and key store, for handler tests.
    pub fn in_memory(
        config: Config,
        llm: Arc<dyn LlmClient>,
        keys: Arc<dyn ApiKeyStore>,
    ) -> Result<Self, StartupError> {
        let auth = Arc::new(Authenticator::from_config(&config, keys)?);
        let chat = ChatService {
            limiter: RateLimiter::new(Arc::new(InMemoryRateLimits::new()), config.quotas),
            conversations: Arc::new(InMemoryConversations::new()),
            cache: Arc::new(InMemoryCache::new()),
            llm: llm.clone(),
            cache_ttl: config.cache_ttl,
        };
        Ok(Self {
            config: Arc::new(config),
            auth,
            chat,
            probes: Probes(Arc::new(vec![Arc::new(LlmProbe(llm)) as Arc<dyn Probe>])),
            dynamo: None,
        })
    }
}
