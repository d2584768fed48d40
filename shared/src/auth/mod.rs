//! Authentication: JWT (HS256 / RS256, algorithm pinned by config) and hashed API keys,
//! resolved to a [`Principal`].
//!
//! Order of precedence on a request: `Authorization: Bearer <credential>`, else `X-API-Key`,
//! else anonymous (only when `ALLOW_ANONYMOUS=true` and the function URL reported the caller's
//! IP). A bearer credential that starts with [`API_KEY_PREFIX`] is an API key, because OpenAI
//! SDKs can only send their `api_key` that way (and always send it, so it would otherwise shadow
//! `X-API-Key`); a JWT cannot start with it (its first segment is base64url of `{"`). Any other
//! bearer credential is a JWT, and a 401 when no JWT key is configured.
//! A credential that is present but wrong is a 401; it never falls back to the next method.
//! Every credential failure is the same [`ApiError::Unauthorized`]; why it failed is logged at
//! debug level only, and no credential is ever logged.

mod api_keys;
mod jwt;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{Extensions, HeaderMap, HeaderName, HeaderValue, header};
use lambda_http::request::RequestContext;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use api_keys::{
    API_KEY_PREFIX, ApiKeyRecord, ApiKeyStore, DUPLICATE_KEY_CODE, DynamoApiKeys, InMemoryApiKeys,
    generate_api_key, hash_api_key, is_key_hash,
};
pub use jwt::{InvalidJwtKey, JwtVerifier, MAX_TOKEN_BYTES};

use crate::config::{Config, Quota, TierQuotas};
use crate::error::ApiError;

/// Header carrying an API key.
pub const API_KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");

/// User ids of anonymous principals start with this; it is reserved (tokens cannot claim it).
pub const ANONYMOUS_PREFIX: &str = "anon:";

/// No key this service generates comes close; anything longer is not worth hashing.
const MAX_API_KEY_BYTES: usize = 256;

/// Service tier; decides quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Free,
    Pro,
    Enterprise,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Pro => "pro",
            Tier::Enterprise => "enterprise",
        }
    }

    pub fn parse(value: &str) -> Option<Tier> {
        match value {
            "free" => Some(Tier::Free),
            "pro" => Some(Tier::Pro),
            "enterprise" => Some(Tier::Enterprise),
            _ => None,
        }
    }
}

/// How the caller proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Jwt,
    ApiKey,
    /// Only when `ALLOW_ANONYMOUS=true`; `user_id` is then `anon:<client ip>`.
    Anonymous,
}

/// The authenticated caller. Owns conversations and jobs; rate limits are counted per principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: String,
    pub tier: Tier,
    pub key_kind: KeyKind,
}

impl Principal {
    /// The quota that applies to this principal.
    pub fn quota(&self, quotas: &TierQuotas) -> Quota {
        match (self.key_kind, self.tier) {
            (KeyKind::Anonymous, _) => quotas.anonymous,
            (_, Tier::Free) => quotas.free,
            (_, Tier::Pro) => quotas.pro,
            (_, Tier::Enterprise) => quotas.enterprise,
        }
    }
}

/// Resolves the credentials of a request to a [`Principal`]. Built once per cold start.
pub struct Authenticator {
    /// `None` when no JWT key is configured: bearer tokens are then rejected.
    pub jwt: Option<JwtVerifier>,
    pub keys: Arc<dyn ApiKeyStore>,
    pub allow_anonymous: bool,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("jwt", &self.jwt.is_some())
            .field("allow_anonymous", &self.allow_anonymous)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Reads the auth settings of `config`. An RS256 public key that does not parse fails here,
    /// at cold start, instead of turning every request into a 401.
    pub fn from_config(config: &Config, keys: Arc<dyn ApiKeyStore>) -> Result<Self, InvalidJwtKey> {
        let jwt = config.auth.jwt.as_ref().map(JwtVerifier::new).transpose()?;
        Ok(Self {
            jwt,
            keys,
            allow_anonymous: config.auth.allow_anonymous,
        })
    }

    /// Who is calling. `client_ip` must come from the platform (the function URL's request
    /// context), never from a header the client controls.
    ///
    /// Errors: `Unauthorized` for missing or bad credentials; a failing key store propagates
    /// (503), because an outage must not tell a client its key is wrong.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        client_ip: Option<IpAddr>,
    ) -> Result<Principal, ApiError> {
        if let Some(value) = single_header(headers, &header::AUTHORIZATION)? {
            return self.bearer(value).await;
        }
        if let Some(value) = single_header(headers, &API_KEY_HEADER)? {
            let Ok(key) = value.to_str() else {
                return reject("API key header is not visible ASCII");
            };
            return self.api_key(key).await;
        }
        match client_ip {
            Some(ip) if self.allow_anonymous => Ok(Principal {
                // An IPv4 client seen through an IPv6 socket is the same client.
                user_id: format!("{ANONYMOUS_PREFIX}{}", ip.to_canonical()),
                tier: Tier::Free,
                key_kind: KeyKind::Anonymous,
            }),
            _ => reject(if self.allow_anonymous {
                "no credentials and no client IP"
            } else {
                "no credentials"
            }),
        }
    }

    async fn bearer(&self, value: &HeaderValue) -> Result<Principal, ApiError> {
        let Some(token) = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
        else {
            return reject("Authorization is not a bearer token");
        };
        if token.starts_with(API_KEY_PREFIX) {
            return self.api_key(token).await;
        }
        match &self.jwt {
            Some(verifier) => verifier.verify(token),
            None => reject("bearer token but no JWT key configured"),
        }
    }

    async fn api_key(&self, key: &str) -> Result<Principal, ApiError> {
        let key = key.trim();
        if !(1..=MAX_API_KEY_BYTES).contains(&key.len()) {
            return reject("malformed API key");
        }
        // The key is hashed first and the digest is the table's primary key: a wrong key costs
        // one hash and one point lookup, whatever keys are stored, and no stored secret is ever
        // compared byte by byte with the presented one (nothing for a timing attack to measure).
        let key_hash = hash_api_key(key);
        match self.keys.find(&key_hash).await? {
            Some(record) if !record.revoked => Ok(Principal {
                user_id: record.user_id,
                tier: record.tier,
                key_kind: KeyKind::ApiKey,
            }),
            Some(_) => {
                tracing::debug!(
                    reason = "revoked API key",
                    key_hash_prefix = key_hash.get(..8).unwrap_or_default(),
                    "credentials rejected"
                );
                Err(ApiError::Unauthorized)
            }
            None => reject("unknown API key"),
        }
    }
}

fn reject(reason: &'static str) -> Result<Principal, ApiError> {
    tracing::debug!(reason, "credentials rejected");
    Err(ApiError::Unauthorized)
}

/// The header's value when it occurs once. Repeated credential headers are rejected: which copy a
/// proxy or framework would pick is ambiguous, and ambiguity in authentication is a bug magnet.
fn single_header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a HeaderValue>, ApiError> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(value), None) => Ok(Some(value)),
        (Some(_), Some(_)) => {
            tracing::debug!(reason = "repeated credential header", header = %name, "credentials rejected");
            Err(ApiError::Unauthorized)
        }
    }
}

/// The caller's IP as the function URL saw the TCP connection (`requestContext.http.sourceIp`).
/// `X-Forwarded-For` and friends are deliberately ignored: the client writes them.
pub fn client_ip(extensions: &Extensions) -> Option<IpAddr> {
    match extensions.get::<RequestContext>()? {
        RequestContext::ApiGatewayV2(context) => context.http.source_ip.as_deref()?.parse().ok(),
        _ => None,
    }
}

/// Handlers take a `Principal` argument to require authentication. The router's state must
/// provide an `Arc<Authenticator>` (`FromRef`).
impl<S> FromRequestParts<S> for Principal
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // A layer and a handler may both ask: authenticate (and hit the key store) once.
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(principal.clone());
        }
        let authenticator = Arc::<Authenticator>::from_ref(state);
        let ip = client_ip(&parts.extensions);
        let principal = authenticator.authenticate(&parts.headers, ip).await?;
        crate::http::record_principal(&principal.user_id);
        parts.extensions.insert(principal.clone());
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::time::Duration;

    use async_trait::async_trait;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use http_body_util::BodyExt;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::json;
    use tower::ServiceExt;

    use super::*;
    use crate::config::{JwtAlgorithm, JwtSettings, Secret};

    const SECRET: &str = "unit-test-secret-unit-test-secret-0123";
    const FUNCTION_URL_EVENT: &str = include_str!("../../tests/fixtures/function_url_request.json");

    fn verifier() -> JwtVerifier {
        JwtVerifier::new(&JwtSettings {
            algorithm: JwtAlgorithm::Hs256,
            key: Secret::new(SECRET),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        })
        .unwrap()
    }

    fn token(sub: &str, tier: &str) -> String {
        let exp = crate::dynamo::now_epoch() + 600;
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": sub, "tier": tier, "exp": exp}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    /// An authenticator with JWT configured and one valid and one revoked key stored.
    async fn authenticator(allow_anonymous: bool) -> (Authenticator, String, String) {
        let keys = InMemoryApiKeys::new();
        let valid = generate_api_key();
        let revoked = generate_api_key();
        keys.put(&ApiKeyRecord::new(hash_api_key(&valid), "bob", Tier::Pro))
            .await
            .unwrap();
        keys.put(&ApiKeyRecord::new(
            hash_api_key(&revoked),
            "carol",
            Tier::Enterprise,
        ))
        .await
        .unwrap();
        assert!(keys.revoke(&hash_api_key(&revoked)).await.unwrap());
        let auth = Authenticator {
            jwt: Some(verifier()),
            keys: Arc::new(keys),
            allow_anonymous,
        };
        (auth, valid, revoked)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    const IP: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7)));

    async fn assert_rejected(auth: &Authenticator, pairs: &[(&str, &str)]) {
        let err = auth.authenticate(&headers(pairs), IP).await.unwrap_err();
        assert!(matches!(err, ApiError::Unauthorized), "{err:?}");
        assert_eq!(
            serde_json::to_value(err.envelope()).unwrap(),
            serde_json::to_value(ApiError::Unauthorized.envelope()).unwrap()
        );
    }

    #[tokio::test]
    async fn accepts_bearer_jwt() {
        let (auth, _, _) = authenticator(false).await;
        let bearer = format!("Bearer {}", token("alice", "enterprise"));
        let principal = auth
            .authenticate(&headers(&[("authorization", &bearer)]), None)
            .await
            .unwrap();
        assert_eq!(
            principal,
            Principal {
                user_id: "alice".into(),
                tier: Tier::Enterprise,
                key_kind: KeyKind::Jwt
            }
        );
        // The scheme is case-insensitive (RFC 7235).
        let lower = format!("bearer {}", token("alice", "free"));
        assert!(
            auth.authenticate(&headers(&[("authorization", &lower)]), None)
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn accepts_api_key_with_its_stored_tier() {
        let (auth, valid, _) = authenticator(false).await;
        let principal = auth
            .authenticate(&headers(&[("x-api-key", &valid)]), None)
            .await
            .unwrap();
        assert_eq!(
            principal,
            Principal {
                user_id: "bob".into(),
                tier: Tier::Pro,
                key_kind: KeyKind::ApiKey
            }
        );
    }

    #[tokio::test]
    async fn rejects_unknown_api_key_with_401() {
        let (auth, _, _) = authenticator(true).await;
        assert_rejected(&auth, &[("x-api-key", &generate_api_key())]).await;
        assert_rejected(&auth, &[("x-api-key", "")]).await;
        assert_rejected(&auth, &[("x-api-key", &"k".repeat(MAX_API_KEY_BYTES + 1))]).await;
    }

    #[tokio::test]
    async fn rejects_revoked_api_key_with_401() {
        let (auth, _, revoked) = authenticator(true).await;
        assert_rejected(&auth, &[("x-api-key", &revoked)]).await;
    }

    #[tokio::test]
    async fn prefers_authorization_over_x_api_key() {
        let (auth, valid, _) = authenticator(false).await;
        let bearer = format!("Bearer {}", token("alice", "free"));
        let principal = auth
            .authenticate(
                &headers(&[("x-api-key", &valid), ("authorization", &bearer)]),
                None,
            )
            .await
            .unwrap();
        assert_eq!(principal.user_id, "alice");
        assert_eq!(principal.key_kind, KeyKind::Jwt);
        // A bad token is not rescued by a good key next to it.
        assert_rejected(
            &auth,
            &[("authorization", "Bearer not.a.jwt"), ("x-api-key", &valid)],
        )
        .await;
    }

    #[tokio::test]
    async fn bearer_token_without_jwt_configured_is_401() {
        let (mut auth, _, _) = authenticator(false).await;
        let bearer = format!("Bearer {}", token("alice", "pro"));
        assert!(
            auth.authenticate(&headers(&[("authorization", &bearer)]), None)
                .await
                .is_ok()
        );
        auth.jwt = None;
        assert_rejected(&auth, &[("authorization", &bearer)]).await;
    }

    #[tokio::test]
    async fn api_key_is_accepted_as_a_bearer_credential_like_openai_sdks_send_it() {
        let (mut auth, valid, revoked) = authenticator(false).await;
        for jwt in [Some(verifier()), None] {
            auth.jwt = jwt;
            let principal = auth
                .authenticate(
                    &headers(&[("authorization", &format!("Bearer {valid}"))]),
                    None,
                )
                .await
                .unwrap();
            assert_eq!(
                (
                    principal.user_id.as_str(),
                    principal.tier,
                    principal.key_kind
                ),
                ("bob", Tier::Pro, KeyKind::ApiKey)
            );
            assert_rejected(&auth, &[("authorization", &format!("Bearer {revoked}"))]).await;
            let unknown = generate_api_key();
            assert_rejected(&auth, &[("authorization", &format!("Bearer {unknown}"))]).await;
            // The bearer key wins over a different key in X-API-Key, like a bearer JWT does.
            assert_rejected(
                &auth,
                &[
                    ("authorization", &format!("Bearer {unknown}")),
                    ("x-api-key", &valid),
                ],
            )
            .await;
        }
    }

    #[tokio::test]
    async fn rejects_non_bearer_or_repeated_credentials_with_401() {
        let (auth, valid, _) = authenticator(true).await;
        assert_rejected(&auth, &[("authorization", "Basic YWxpY2U6cHc=")]).await;
        assert_rejected(&auth, &[("authorization", "Bearer ")]).await;
        assert_rejected(&auth, &[("authorization", "Bearer")]).await;
        assert_rejected(&auth, &[("x-api-key", &valid), ("x-api-key", &valid)]).await;
    }

    #[tokio::test]
    async fn anonymous_allowed_gets_a_free_principal_per_client_ip() {
        let (auth, _, _) = authenticator(true).await;
        let principal = auth.authenticate(&HeaderMap::new(), IP).await.unwrap();
        assert_eq!(
            principal,
            Principal {
                user_id: "anon:203.0.113.7".into(),
                tier: Tier::Free,
                key_kind: KeyKind::Anonymous
            }
        );
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        let principal = auth
            .authenticate(&HeaderMap::new(), Some(mapped))
            .await
            .unwrap();
        assert_eq!(principal.user_id, "anon:203.0.113.7");
    }

    #[tokio::test]
    async fn anonymous_disallowed_or_without_client_ip_is_401() {
        let (auth, _, _) = authenticator(false).await;
        assert_rejected(&auth, &[]).await;
        let (auth, _, _) = authenticator(true).await;
        let err = auth
            .authenticate(&HeaderMap::new(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::Unauthorized));
    }

    #[tokio::test]
    async fn bad_credentials_never_fall_back_to_anonymous() {
        let (auth, _, revoked) = authenticator(true).await;
        assert_rejected(&auth, &[("x-api-key", &revoked)]).await;
        assert_rejected(&auth, &[("authorization", "Bearer garbage")]).await;
    }

    struct DownStore;

    #[async_trait]
    impl ApiKeyStore for DownStore {
        async fn find(&self, _: &str) -> Result<Option<ApiKeyRecord>, ApiError> {
            Err(ApiError::Unavailable {
                dependency: "DynamoDB",
                detail: "connection refused".into(),
            })
        }
        async fn put(&self, _: &ApiKeyRecord) -> Result<(), ApiError> {
            Ok(())
        }
        async fn revoke(&self, _: &str) -> Result<bool, ApiError> {
            Ok(false)
        }
    }

    #[tokio::test]
    async fn key_store_outage_is_503_not_401() {
        let auth = Authenticator {
            jwt: None,
            keys: Arc::new(DownStore),
            allow_anonymous: false,
        };
        let err = auth
            .authenticate(&headers(&[("x-api-key", &generate_api_key())]), None)
            .await
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
    }

    fn config(vars: &[(&str, &str)]) -> Config {
        let mut all = vec![
            ("CONVERSATIONS_TABLE", "c"),
            ("RATE_LIMITS_TABLE", "r"),
            ("CACHE_TABLE", "k"),
            ("JOBS_TABLE", "j"),
            ("API_KEYS_TABLE", "a"),
        ];
        all.extend_from_slice(vars);
        Config::from_lookup(|name| {
            all.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
        .unwrap()
    }

    #[test]
    fn from_config_builds_the_configured_verifier_and_fails_on_a_bad_pem() {
        let keys: Arc<dyn ApiKeyStore> = Arc::new(InMemoryApiKeys::new());
        let auth = Authenticator::from_config(
            &config(&[("JWT_SECRET", SECRET), ("ALLOW_ANONYMOUS", "true")]),
            keys.clone(),
        )
        .unwrap();
        assert!(auth.jwt.is_some() && auth.allow_anonymous);
        let public = include_str!("../../tests/fixtures/rs256_public.pem");
        assert!(
            Authenticator::from_config(
                &config(&[("JWT_ALGORITHM", "RS256"), ("JWT_PUBLIC_KEY", public)]),
                keys.clone(),
            )
            .unwrap()
            .jwt
            .is_some()
        );
        let bad = "-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----";
        let err = Authenticator::from_config(
            &config(&[("JWT_ALGORITHM", "RS256"), ("JWT_PUBLIC_KEY", bad)]),
            keys,
        )
        .unwrap_err();
        assert_eq!(err.algorithm, JwtAlgorithm::Rs256);
    }

    /// A router whose state provides the authenticator, as a function's `main` would build it.
    fn whoami(auth: Authenticator) -> Router {
        Router::new()
            .route(
                "/whoami",
                get(|principal: Principal| async move { principal.user_id }),
            )
            .with_state(Arc::new(auth))
    }

    /// The fixture event converted exactly as `lambda_http` converts it on Lambda.
    fn function_url_request(extra: &[(&str, &str)]) -> axum::http::Request<Body> {
        let event: lambda_http::request::LambdaRequest =
            serde_json::from_str(FUNCTION_URL_EVENT).unwrap();
        let mut request = axum::http::Request::from(event).map(|b| Body::from(b.to_vec()));
        for (name, value) in extra {
            request.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        request
    }

    async fn call(router: Router, request: axum::http::Request<Body>) -> (u16, String) {
        let response = router.oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn extractor_takes_client_ip_from_the_function_url_context_not_forwarded_headers() {
        let (auth, _, _) = authenticator(true).await;
        let (status, body) = call(whoami(auth), function_url_request(&[])).await;
        assert_eq!(status, 200, "{body}");
        // The fixture also sends X-Forwarded-For: 10.9.9.9, which must be ignored.
        assert_eq!(body, "anon:198.51.100.23");
    }

    #[tokio::test]
    async fn extractor_without_request_context_cannot_be_anonymous() {
        let (auth, _, _) = authenticator(true).await;
        let request = axum::http::Request::get("/whoami")
            .header("x-forwarded-for", "10.9.9.9")
            .body(Body::empty())
            .unwrap();
        let (status, body) = call(whoami(auth), request).await;
        assert_eq!(status, 401);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "invalid_credentials");
        assert_eq!(body["error"]["type"], "authentication_error");
    }

    #[tokio::test]
    async fn extractor_authenticates_api_keys_and_rejects_bad_ones_with_the_envelope() {
        let (auth, valid, revoked) = authenticator(false).await;
        let router = whoami(auth);
        let (status, body) = call(
            router.clone(),
            function_url_request(&[("x-api-key", &valid)]),
        )
        .await;
        assert_eq!((status, body.as_str()), (200, "bob"));
        let (status, body) = call(router, function_url_request(&[("x-api-key", &revoked)])).await;
        assert_eq!(status, 401);
        assert!(body.contains("\"invalid_credentials\""), "{body}");
        assert!(!body.contains(&revoked));
    }
}
