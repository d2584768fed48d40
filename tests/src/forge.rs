//! Tokens an attacker would send: JWTs with a chosen header, claims and signature, built by
//! hand where `jsonwebtoken` (rightly) refuses to build them, such as `alg: none`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::{Result, jwt_expiry, unique};

/// The RSA key pair the RS256 audit stack trusts (`JWT_PUBLIC_KEY`) and a key nobody trusts.
pub const TRUSTED_RS256_PRIVATE: &str =
    include_str!("../../shared/tests/fixtures/rs256_private.pem");
pub const TRUSTED_RS256_PUBLIC: &str = include_str!("../../shared/tests/fixtures/rs256_public.pem");
pub const ATTACKER_RS256_PRIVATE: &str = include_str!("../fixtures/attacker_rs256_private.pem");

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// `header.claims.signature` with the given parts, signature taken as is.
pub fn raw(header: &Value, claims: &Value, signature: &str) -> String {
    format!("{}.{}.{signature}", b64(header), b64(claims))
}

/// Claims of a fresh user that would be accepted: `sub`, `exp` in ten minutes.
pub fn claims() -> Value {
    json!({"sub": unique("attacker-"), "exp": jwt_expiry(600), "tier": "pro"})
}

/// A token signed with `algorithm` and an HMAC `secret`.
pub fn hmac(algorithm: Algorithm, secret: &[u8], claims: &Value) -> Result<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret),
    )?)
}

/// A token signed with `algorithm` (RS*/PS*) and an RSA private key in PEM.
pub fn rsa(algorithm: Algorithm, private_pem: &str, claims: &Value) -> Result<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_rsa_pem(private_pem.as_bytes())?,
    )?)
}

/// `token` with its claims replaced by `claims` and its signature kept.
pub fn tampered(token: &str, claims: &Value) -> String {
    let mut parts = token.splitn(3, '.');
    let header = parts.next().unwrap_or_default();
    let _ = parts.next();
    let signature = parts.next().unwrap_or_default();
    format!("{header}.{}.{signature}", b64(claims))
}
