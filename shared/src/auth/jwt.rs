//! Bearer-token verification with `jsonwebtoken`, the algorithm pinned by configuration.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{KeyKind, Principal, Tier};
use crate::config::{JwtAlgorithm, JwtSettings};
use crate::error::ApiError;

/// Tokens longer than this are rejected before any decoding: a legitimate token with a handful
/// of claims is a few hundred bytes, and base64 + JSON + signature work grows with the input.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A verification key could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
#[error("JWT {algorithm:?} key is unusable: {reason}")]
pub struct InvalidJwtKey {
    pub algorithm: JwtAlgorithm,
    pub reason: String,
}

/// The claims this service reads. `exp` (and `nbf`, `iss`, `aud`) are checked by
/// `jsonwebtoken`'s validation, which reads them from the raw payload.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    /// Absent or `null` means free; any other value than the three tiers fails deserialization.
    #[serde(default)]
    tier: Option<Tier>,
}

/// Verifies bearer tokens: signature with the one configured algorithm and key, `exp` and `sub`
/// required, `nbf` honoured, `iss`/`aud` required and checked when configured, and the clock
/// leeway from configuration.
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl JwtVerifier {
    /// Builds the key once (cold start); a PEM that does not hold an RSA public key fails here
    /// rather than on the first request.
    pub fn new(settings: &JwtSettings) -> Result<Self, InvalidJwtKey> {
        let (algorithm, key) = match settings.algorithm {
            JwtAlgorithm::Hs256 => (
                Algorithm::HS256,
                DecodingKey::from_secret(settings.key.expose().as_bytes()),
            ),
            JwtAlgorithm::Rs256 => (
                Algorithm::RS256,
                DecodingKey::from_rsa_pem(settings.key.expose().as_bytes()).map_err(|err| {
                    InvalidJwtKey {
                        algorithm: settings.algorithm,
                        reason: err.to_string(),
                    }
                })?,
            ),
        };
        // `Validation::new` allows exactly this one algorithm, so the token header cannot pick
        // another one: no `none`, and no HS256 token "signed" with the RS256 public key.
        let mut validation = Validation::new(algorithm);
        let mut required = vec!["exp", "sub"];
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = settings.leeway.as_secs();
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &settings.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // jsonwebtoken rejects any token carrying `aud` when no audience is expected; with no
            // audience configured, this service does not care whom the issuer meant it for.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Self { key, validation })
    }

    /// The principal a token proves, or `Unauthorized`. Why a token was rejected goes only to a
    /// debug log line (the token itself never does); the response is the same for every reason.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        if token.len() > MAX_TOKEN_BYTES {
            tracing::debug!(
                reason = "token too large",
                bytes = token.len(),
                "JWT rejected"
            );
            return Err(ApiError::Unauthorized);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|err| {
                tracing::debug!(reason = rejection_reason(err.kind()), "JWT rejected");
                ApiError::Unauthorized
            })?
            .claims;
        // The `anon:` namespace belongs to unauthenticated callers identified by IP; a token must
        // not be able to act as one of them (and share their conversations).
        if claims.sub.trim().is_empty() || claims.sub.starts_with(super::ANONYMOUS_PREFIX) {
            tracing::debug!(reason = "unusable sub", "JWT rejected");
            return Err(ApiError::Unauthorized);
        }
        Ok(Principal {
            user_id: claims.sub,
            tier: claims.tier.unwrap_or(Tier::Free),
            key_kind: KeyKind::Jwt,
        })
    }
}

/// A fixed description per failure: library messages can quote claim values from the payload.
fn rejection_reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidToken => "not a JWT",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => "algorithm not allowed",
        ErrorKind::UnsupportedAlgorithm => "unsupported algorithm",
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not yet valid",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::MissingRequiredClaim(_) => "missing required claim",
        ErrorKind::InvalidClaimFormat(_) => "malformed claim",
        ErrorKind::Base64(_) => "bad base64",
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => "claims or header do not parse",
        _ => "invalid token",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::time::Duration;

    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::{Value, json};

    use super::*;
    use crate::config::Secret;

    const SECRET: &str = "unit-test-secret-unit-test-secret-0123";
    const RS_PUBLIC: &str = include_str!("../../tests/fixtures/rs256_public.pem");
    const RS_PRIVATE: &str = include_str!("../../tests/fixtures/rs256_private.pem");
    /// base64url of `{"alg":"none","typ":"JWT"}`.
    const ALG_NONE_HEADER: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";

    fn settings(algorithm: JwtAlgorithm, key: &str) -> JwtSettings {
        JwtSettings {
            algorithm,
            key: Secret::new(key),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        }
    }

    fn hs256() -> JwtVerifier {
        JwtVerifier::new(&settings(JwtAlgorithm::Hs256, SECRET)).unwrap()
    }

    fn rs256() -> JwtVerifier {
        JwtVerifier::new(&settings(JwtAlgorithm::Rs256, RS_PUBLIC)).unwrap()
    }

    fn now() -> i64 {
        i64::try_from(crate::dynamo::now_epoch()).unwrap()
    }

    fn claims(extra: Value) -> Value {
        let mut base = json!({"sub": "alice", "tier": "pro", "exp": now() + 600});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                base.as_object_mut().unwrap().remove(k);
            } else {
                base[k] = v.clone();
            }
        }
        base
    }

    fn sign_hs(claims: &Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn hs_token(claims: &Value) -> String {
        sign_hs(claims, SECRET.as_bytes())
    }

    fn rs_token(claims: &Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            claims,
            &EncodingKey::from_rsa_pem(RS_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    /// Every rejection must be the one generic 401: same status, same envelope.
    fn assert_rejected(verifier: &JwtVerifier, token: &str) {
        let err = verifier.verify(token).unwrap_err();
        assert!(matches!(err, ApiError::Unauthorized), "{err:?}");
        assert_eq!(err.status(), axum::http::StatusCode::UNAUTHORIZED);
        assert_eq!(
            serde_json::to_value(err.envelope()).unwrap(),
            serde_json::to_value(ApiError::Unauthorized.envelope()).unwrap()
        );
    }

    #[test]
    fn accepts_valid_hs256_token_with_its_tier() {
        let principal = hs256().verify(&hs_token(&claims(json!({})))).unwrap();
        assert_eq!(
            principal,
            Principal {
                user_id: "alice".into(),
                tier: Tier::Pro,
                key_kind: KeyKind::Jwt
            }
        );
    }

    #[test]
    fn accepts_valid_rs256_token_with_its_tier() {
        let token = rs_token(&claims(json!({"tier": "enterprise"})));
        let principal = rs256().verify(&token).unwrap();
        assert_eq!(principal.user_id, "alice");
        assert_eq!(principal.tier, Tier::Enterprise);
    }

    #[test]
    fn token_without_tier_gets_free() {
        let token = hs_token(&claims(json!({"tier": null})));
        assert_eq!(hs256().verify(&token).unwrap().tier, Tier::Free);
    }

    #[test]
    fn rejects_unknown_tier_with_401() {
        assert_rejected(&hs256(), &hs_token(&claims(json!({"tier": "platinum"}))));
        assert_rejected(&hs256(), &hs_token(&claims(json!({"tier": 3}))));
    }

    #[test]
    fn rejects_alg_none_with_401() {
        let valid = hs_token(&claims(json!({})));
        let payload = valid.split('.').nth(1).unwrap();
        assert_rejected(&hs256(), &format!("{ALG_NONE_HEADER}.{payload}."));
        assert_rejected(&rs256(), &format!("{ALG_NONE_HEADER}.{payload}."));
        // With the original signature kept as well.
        let signature = valid.split('.').nth(2).unwrap();
        assert_rejected(
            &hs256(),
            &format!("{ALG_NONE_HEADER}.{payload}.{signature}"),
        );
    }

    #[test]
    fn rejects_hs256_token_signed_with_the_rs256_public_key_with_401() {
        // The classic confusion attack: the attacker knows the public key and uses its PEM bytes
        // as an HMAC secret, hoping the verifier follows the token's `alg`.
        let forged = sign_hs(&claims(json!({})), RS_PUBLIC.as_bytes());
        assert_rejected(&rs256(), &forged);
    }

    #[test]
    fn rejects_expired_jwt_with_401() {
        assert_rejected(&hs256(), &hs_token(&claims(json!({"exp": now() - 3600}))));
    }

    #[test]
    fn honours_the_configured_leeway_on_exp() {
        let recently_expired = hs_token(&claims(json!({"exp": now() - 10})));
        assert!(hs256().verify(&recently_expired).is_ok());
        let mut strict = settings(JwtAlgorithm::Hs256, SECRET);
        strict.leeway = Duration::ZERO;
        assert_rejected(&JwtVerifier::new(&strict).unwrap(), &recently_expired);
    }

    #[test]
    fn rejects_token_without_exp_with_401() {
        assert_rejected(&hs256(), &hs_token(&claims(json!({"exp": null}))));
    }

    #[test]
    fn rejects_not_yet_valid_jwt_with_401() {
        assert_rejected(&hs256(), &hs_token(&claims(json!({"nbf": now() + 3600}))));
        // An nbf in the past is fine.
        assert!(
            hs256()
                .verify(&hs_token(&claims(json!({"nbf": now() - 60}))))
                .is_ok()
        );
    }

    #[test]
    fn rejects_wrong_issuer_with_401() {
        let mut with_issuer = settings(JwtAlgorithm::Hs256, SECRET);
        with_issuer.issuer = Some("https://issuer.example".into());
        let verifier = JwtVerifier::new(&with_issuer).unwrap();
        assert_rejected(
            &verifier,
            &hs_token(&claims(json!({"iss": "https://evil.example"}))),
        );
        assert_rejected(&verifier, &hs_token(&claims(json!({}))));
        assert!(
            verifier
                .verify(&hs_token(&claims(json!({"iss": "https://issuer.example"}))))
                .is_ok()
        );
    }

    #[test]
    fn rejects_wrong_audience_with_401() {
        let mut with_audience = settings(JwtAlgorithm::Hs256, SECRET);
        with_audience.audience = Some("gateway".into());
        let verifier = JwtVerifier::new(&with_audience).unwrap();
        assert_rejected(&verifier, &hs_token(&claims(json!({"aud": "billing"}))));
        assert_rejected(&verifier, &hs_token(&claims(json!({}))));
        assert!(
            verifier
                .verify(&hs_token(&claims(json!({"aud": ["billing", "gateway"]}))))
                .is_ok()
        );
    }

    #[test]
    fn accepts_any_audience_when_none_is_configured() {
        let token = hs_token(&claims(json!({"aud": "someone-else"})));
        assert!(hs256().verify(&token).is_ok());
    }

    #[test]
    fn rejects_tampered_payload_with_401() {
        // Keep alice's header and signature, swap in a payload claiming enterprise tier.
        let genuine = hs_token(&claims(json!({"tier": "free"})));
        let upgraded = sign_hs(&claims(json!({"tier": "enterprise"})), b"attacker-secret");
        let mut parts: Vec<&str> = genuine.split('.').collect();
        parts[1] = upgraded.split('.').nth(1).unwrap();
        assert_rejected(&hs256(), &parts.join("."));
        // A token signed with another secret is rejected too.
        assert_rejected(&hs256(), &upgraded);
    }

    #[test]
    fn rejects_truncated_token_with_401() {
        let token = hs_token(&claims(json!({})));
        assert_rejected(&hs256(), &token[..token.len() - 5]);
        let without_signature = token.rsplit_once('.').unwrap().0;
        assert_rejected(&hs256(), without_signature);
        assert_rejected(&hs256(), &format!("{without_signature}."));
        assert_rejected(&hs256(), "");
        assert_rejected(&hs256(), "not-a-jwt");
    }

    #[test]
    fn rejects_token_without_sub_with_401() {
        assert_rejected(&hs256(), &hs_token(&claims(json!({"sub": null}))));
        assert_rejected(&hs256(), &hs_token(&claims(json!({"sub": ""}))));
        assert_rejected(&hs256(), &hs_token(&claims(json!({"sub": 42}))));
    }

    #[test]
    fn rejects_sub_in_the_anonymous_namespace() {
        assert_rejected(
            &hs256(),
            &hs_token(&claims(json!({"sub": "anon:203.0.113.7"}))),
        );
    }

    #[test]
    fn rejects_oversized_token_with_401() {
        // Correctly signed and otherwise valid: only the size check can reject it.
        let token = hs_token(&claims(json!({"pad": "x".repeat(MAX_TOKEN_BYTES)})));
        assert!(token.len() > MAX_TOKEN_BYTES);
        assert_rejected(&hs256(), &token);
        let just_fits = hs_token(&claims(json!({"pad": "x".repeat(1024)})));
        assert!(hs256().verify(&just_fits).is_ok());
    }

    #[test]
    fn rs256_verifier_rejects_a_malformed_public_key_at_construction() {
        let pem = "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n";
        let err = JwtVerifier::new(&settings(JwtAlgorithm::Rs256, pem)).unwrap_err();
        assert_eq!(err.algorithm, JwtAlgorithm::Rs256);
        assert!(!err.to_string().contains("bm90IGEga2V5"), "{err}");
    }
}
