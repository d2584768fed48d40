//! Token attacks against an RS256 configuration with issuer and audience (issue 11), through
//! the function URLs of the audit stack (`make reliability` starts it with
//! `JWT_ALGORITHM=RS256`, the public key of shared/tests/fixtures, `JWT_ISSUER` and
//! `JWT_AUDIENCE`): the classic key confusion (HS256 "signed" with the RSA public key), other
//! algorithms, a stranger's key, wrong or missing issuer and audience, and the stack's own HMAC
//! secret. All are the same 401; the genuine token is accepted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use integration_tests::disturb::require_dedicated_stack;
use integration_tests::forge::{
    self, ATTACKER_RS256_PRIVATE, TRUSTED_RS256_PRIVATE, TRUSTED_RS256_PUBLIC,
};
use integration_tests::{Caller, Credential, Reply, Stack, jwt_expiry, stack_var, unique};
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

async fn with_token(stack: &Stack, token: &str) -> Vec<Reply> {
    let caller = Caller::presenting(Credential::Bearer(token.to_owned()));
    vec![
        stack.get("chat", "models", &caller).await.unwrap(),
        stack
            .post_json(
                "stream",
                "chat/stream",
                &caller,
                &json!({"message": format!("rs256 {}", unique("m"))}),
            )
            .await
            .unwrap(),
    ]
}

#[tokio::test]
async fn rs256_rejects_key_confusion_foreign_keys_and_wrong_issuer_or_audience_alike() {
    let stack = require_dedicated_stack("audit");
    assert_eq!(stack_var("JWT_ALGORITHM").unwrap(), "RS256");
    let issuer = stack_var("JWT_ISSUER").unwrap();
    let audience = stack_var("JWT_AUDIENCE").unwrap();
    let claims = json!({
        "sub": unique("rs-user-"), "tier": "pro", "exp": jwt_expiry(600),
        "iss": issuer, "aud": audience,
    });
    let with = |extra: Value| {
        let mut c = claims.clone();
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let trusted = |c: &Value| forge::rsa(Algorithm::RS256, TRUSTED_RS256_PRIVATE, c).unwrap();

    // The control: the genuine token works on both functions.
    for reply in with_token(&stack, &trusted(&claims)).await {
        reply.assert_status(200);
    }

    let genuine = trusted(&claims);
    let attacks: Vec<(&str, String)> = vec![
        (
            "HS256 with the RSA public key (PEM) as secret",
            forge::hmac(Algorithm::HS256, TRUSTED_RS256_PUBLIC.as_bytes(), &claims).unwrap(),
        ),
        (
            "HS256 with the public key, trimmed",
            forge::hmac(
                Algorithm::HS256,
                TRUSTED_RS256_PUBLIC.trim().as_bytes(),
                &claims,
            )
            .unwrap(),
        ),
        (
            "HS256 with the stack's JWT_SECRET",
            forge::hmac(
                Algorithm::HS256,
                stack_var("JWT_SECRET").unwrap().as_bytes(),
                &claims,
            )
            .unwrap(),
        ),
        (
            "alg none",
            forge::raw(&json!({"alg": "none", "typ": "JWT"}), &claims, ""),
        ),
        (
            "RS256 by a stranger's key",
            forge::rsa(Algorithm::RS256, ATTACKER_RS256_PRIVATE, &claims).unwrap(),
        ),
        (
            "RS384 by the trusted key",
            forge::rsa(Algorithm::RS384, TRUSTED_RS256_PRIVATE, &claims).unwrap(),
        ),
        (
            "RS512 by the trusted key",
            forge::rsa(Algorithm::RS512, TRUSTED_RS256_PRIVATE, &claims).unwrap(),
        ),
        (
            "PS256 by the trusted key",
            forge::rsa(Algorithm::PS256, TRUSTED_RS256_PRIVATE, &claims).unwrap(),
        ),
        (
            "wrong issuer",
            trusted(&with(json!({"iss": "https://evil.example"}))),
        ),
        ("no issuer", trusted(&with(json!({"iss": null})))),
        (
            "wrong audience",
            trusted(&with(json!({"aud": "someone-else"}))),
        ),
        (
            "audience list without ours",
            trusted(&with(json!({"aud": ["a", "b"]}))),
        ),
        ("no audience", trusted(&with(json!({"aud": null})))),
        ("expired", trusted(&with(json!({"exp": jwt_expiry(-3600)})))),
        (
            "not yet valid",
            trusted(&with(json!({"nbf": jwt_expiry(3600)}))),
        ),
        (
            "tampered payload",
            forge::tampered(&genuine, &with(json!({"sub": "victim"}))),
        ),
        ("truncated", genuine[..genuine.len() - 10].to_owned()),
    ];
    let mut bodies: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (what, token) in &attacks {
        for reply in with_token(&stack, token).await {
            if reply.status != 401 || reply.error_code() != Some("invalid_credentials") {
                wrong.push(format!("{what}: expected 401, got\n{reply}"));
                continue;
            }
            let mut body = reply.json.clone();
            body["error"]["request_id"] = Value::Null;
            bodies.entry(body.to_string()).or_default().push(what);
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    assert_eq!(bodies.len(), 1, "rejections differ: {bodies:#?}");
}
