//! `admin jwt mint`: tokens with exactly the claims the functions' verifier reads.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use shared::auth::Tier;

use crate::AdminError;

/// Same floor as the functions' configuration: they refuse shorter HS256 secrets, so a token
/// signed with one could never be verified.
const MIN_SECRET_BYTES: usize = 32;

pub struct Signer {
    algorithm: Algorithm,
    key: EncodingKey,
}

pub struct TokenRequest<'a> {
    pub user: &'a str,
    pub tier: Tier,
    pub ttl: Duration,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    tier: Tier,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

impl Signer {
    /// HS256 signs with `JWT_SECRET` (never taken from the command line, where it would land in
    /// shell history); RS256 with the PEM private key at `private_key`.
    pub fn from_env(algorithm: &str, private_key: Option<&Path>) -> Result<Self, AdminError> {
        match algorithm.trim().to_ascii_uppercase().as_str() {
            "HS256" => {
                if private_key.is_some() {
                    return Err(AdminError::Invalid {
                        what: "--private-key",
                        reason: "only used with JWT_ALGORITHM=RS256".to_owned(),
                    });
                }
                // Trimmed exactly as the functions' configuration trims it.
                let secret = std::env::var("JWT_SECRET")
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .ok_or(AdminError::MissingSetting {
                        name: "JWT_SECRET",
                        hint: "export the HS256 secret the functions are configured with",
                    })?;
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(AdminError::Invalid {
                        what: "JWT_SECRET",
                        reason: format!(
                            "it must be at least {MIN_SECRET_BYTES} bytes, like the functions require"
                        ),
                    });
                }
                Ok(Self {
                    algorithm: Algorithm::HS256,
                    key: EncodingKey::from_secret(secret.as_bytes()),
                })
            }
            "RS256" => {
                let path = private_key.ok_or(AdminError::MissingSetting {
                    name: "--private-key",
                    hint: "RS256 tokens are signed with a PEM private key file",
                })?;
                let pem = std::fs::read(path).map_err(|source| AdminError::ReadFile {
                    path: path.to_owned(),
                    source,
                })?;
                let not_private = |detail: String| AdminError::Invalid {
                    what: "--private-key",
                    reason: format!(
                        "{} is not an RSA private key in PEM: {detail}",
                        path.display()
                    ),
                };
                // jsonwebtoken loads a *public* key PEM here without complaint and only fails
                // when signing, with an opaque message: check the PEM label first.
                let text = String::from_utf8_lossy(&pem);
                if !(text.contains("-----BEGIN PRIVATE KEY-----")
                    || text.contains("-----BEGIN RSA PRIVATE KEY-----"))
                {
                    return Err(not_private(
                        "expected a BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY block".to_owned(),
                    ));
                }
                let key =
                    EncodingKey::from_rsa_pem(&pem).map_err(|err| not_private(err.to_string()))?;
                Ok(Self {
                    algorithm: Algorithm::RS256,
                    key,
                })
            }
            other => Err(AdminError::Invalid {
                what: "JWT_ALGORITHM",
                reason: format!("'{other}' is not HS256 or RS256"),
            }),
        }
    }

    pub fn mint(&self, request: &TokenRequest<'_>) -> Result<String, AdminError> {
        let now = shared::dynamo::now_epoch();
        let claims = Claims {
            sub: request.user,
            tier: request.tier,
            iat: now,
            exp: now + request.ttl.as_secs(),
            iss: request.issuer,
            aud: request.audience,
        };
        Ok(jsonwebtoken::encode(
            &Header::new(self.algorithm),
            &claims,
            &self.key,
        )?)
    }
}
